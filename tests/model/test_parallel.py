"""DDP and FSDP2 models on two gloo ranks match one process; full state dicts move between strategies."""

import copy
import importlib.util

import pytest
import torch
from spawn import run_ranks

from spinlm.errors import ConfigError
from spinlm.model import parallel
from spinlm.model.loading import unwrap
from spinlm.utils.distributed import broadcast_from_main
from spinlm.utils.guards import clip_checked
from spinlm.model.tiny import build_tiny_model, build_tiny_tokenizer


def test_resolve_strategy():
    assert parallel.resolve_strategy("auto", 1) == "single"
    assert parallel.resolve_strategy("fsdp", 1) == "single"
    assert parallel.resolve_strategy("auto", 2) == "ddp"
    assert parallel.resolve_strategy("fsdp", 8) == "fsdp"
    with pytest.raises(ConfigError, match="trainer.strategy"):
        parallel.resolve_strategy("deepspeed", 2)


def test_decoder_layers_are_the_transformer_blocks(tokenizer):
    model = build_tiny_model(tokenizer, num_layers=3)
    assert parallel.decoder_layers(model) == list(model.model.layers)


def test_with_tied_names_fills_a_dropped_tied_weight(tokenizer):
    model = build_tiny_model(tokenizer)
    model.lm_head.weight = model.model.embed_tokens.weight  # tie
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    full = parallel.with_tied_names(model, state)
    assert full["lm_head.weight"] is full["model.embed_tokens.weight"]


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 300, (4, 12), generator=g)


def _train_steps(model, optimizer, rows, world, rank, steps=2):
    """Mean-token-logit 'loss' over each rank's share of a fixed global batch, AdamW steps."""
    for step in range(steps):
        x = _batch(step)
        mine = x[rank * len(x) // world:(rank + 1) * len(x) // world]
        optimizer.zero_grad()
        loss = model(input_ids=mine).logits.float().logsumexp(-1).mean()
        loss.backward()
        clip_checked(model, 1.0)
        optimizer.step()


def _make(tie):
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok, seed=3)
    if tie:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def _train(rank, strategy, tie, resume_state):
    model = _make(tie)
    reference = copy.deepcopy(model)
    model = parallel.wrap_policy(model, strategy, torch.device("cpu"))
    reference = parallel.shard(reference, torch.device("cpu")) if strategy == "fsdp" else reference
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    if resume_state is not None:
        parallel.load_full_state_dict(model, resume_state["model"])
        parallel.load_full_optimizer_state_dict(model, optimizer, resume_state["optimizer"])
    _train_steps(model, optimizer, 4, 2, rank)
    reference.load_state_dict(unwrap(model).state_dict())  # the iteration-end refresh, shard to shard
    return {
        "model": parallel.full_state_dict(model),
        "reference": parallel.full_state_dict(reference),
        "optimizer": parallel.full_optimizer_state_dict(model, optimizer),
        "sharded": parallel.is_sharded(model),
    }


def _strategy_run(rank, strategy, tie):
    """Two steps with `strategy`, then two more with the other strategy resumed from rank 0's full state."""
    first = _train(rank, strategy, tie, None)
    other = "fsdp" if strategy == "ddp" else "ddp"
    resumed = _train(rank, other, tie, broadcast_from_main(copy.deepcopy(first)))  # rank 0 keeps `first` intact
    return {"first": first, "resumed": resumed}


def _single_run(tie, steps, resume_state=None):
    model = _make(tie)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    if resume_state is not None:
        parallel.load_full_state_dict(model, resume_state["model"])
        parallel.load_full_optimizer_state_dict(model, optimizer, resume_state["optimizer"])
    for _ in range(steps // 2):
        _train_steps(model, optimizer, 4, 1, 0)
    return {"model": parallel.full_state_dict(model), "optimizer": parallel.full_optimizer_state_dict(model, optimizer)}


def _assert_close(a, b, atol=1e-5):
    assert set(a) == set(b)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol), k


CASES = [("ddp", False), ("fsdp", True)]  # FSDP2 with tied embeddings (as SmolLM2)


def _all_cases(rank, tied_model_dir):
    out = {case: _strategy_run(rank, *case) for case in CASES}  # one process pair: starting one costs ~10 s
    return {**out, "build": _build_runs(tied_model_dir)}


BUILDS = [(s, scheme) for s in ("ddp", "fsdp") for scheme in ("none", "lora")]


def _build_runs(model_dir):
    """`build.build_models` under each strategy, full fine-tuning and LoRA: the weights every rank ends with
    (rank 1 never reads the file), whether the LM head stays tied, and the logits of policy and reference."""
    from spinlm.config import load_config
    from spinlm.model.build import build_models
    from spinlm.model.loading import load_tokenizer

    out = {}
    for strategy, scheme in BUILDS:
        if scheme == "lora" and importlib.util.find_spec("peft") is None:
            continue
        cfg = load_config([f"pretrained_checkpoint.restore_from_path={model_dir}", "model.cpu_linear_kernel=default",
                           "trainer.precision=32",  # the reference in fp32: compared with the policy, no autocast
                           f"model.peft.peft_scheme={scheme}", "model.peft.lora_tuning.target_modules=all",
                           "model.data.train_ds.file_path=unused", "model.data.validation_ds.file_path=unused"])
        policy, reference = build_models(cfg, load_tokenizer(model_dir), strategy, torch.device("cpu"), "default")
        inner = unwrap(policy)
        with torch.no_grad(), reference.active() as ref:
            ref_logits = ref(input_ids=_batch(0)).logits
        with torch.no_grad():
            logits = policy(input_ids=_batch(0)).logits
        out[strategy, scheme] = {"policy": parallel.full_state_dict(policy), "reference": reference.full_state_dict(),
                                 "logits": logits, "ref_logits": ref_logits,
                                 "tied": inner.lm_head.weight is inner.model.embed_tokens.weight}
    return out


@pytest.fixture(scope="module")
def tied_model_dir(tmp_path_factory):
    """The tiny model with tied embeddings (as SmolLM2), saved."""
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok, seed=5)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    out = tmp_path_factory.mktemp("tied")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, tied_model_dir):
    return run_ranks(_all_cases, 2, tmp_path_factory.mktemp("ranks"), str(tied_model_dir))


@pytest.mark.parametrize("strategy,scheme", BUILDS)
def test_build_on_two_ranks_gives_every_rank_the_weights_rank_0_read(two_ranks, tied_model_dir, strategy, scheme):
    from spinlm.model.loading import load_model, load_tokenizer

    if scheme == "lora":
        pytest.importorskip("peft")
    got = two_ranks[0]["build"][strategy, scheme]
    model = load_model(tied_model_dir, load_tokenizer(tied_model_dir), cpu_linear_kernel="default")
    expected = model.state_dict()
    assert got["tied"]
    _assert_close(got["reference"], expected, atol=0)
    policy = got["policy"] if scheme == "none" else {k: v for k, v in got["policy"].items() if "lora_" not in k}
    _assert_close({k.replace(".base_layer.", "."): v for k, v in policy.items()}, expected, atol=0)
    with torch.no_grad():
        logits = model(input_ids=_batch(0)).logits  # fresh adapters (B = 0) change nothing
    for rank in two_ranks:  # rank 1's weights and buffers came from rank 0 (FSDP2: its shards feed rank 0's too)
        torch.testing.assert_close(rank["build"][strategy, scheme]["logits"], logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(rank["build"][strategy, scheme]["ref_logits"], logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("strategy,tie", CASES)
def test_two_ranks_match_one_process_and_state_dicts_move_between_strategies(two_ranks, strategy, tie):
    r0, r1 = (r[(strategy, tie)] for r in two_ranks)
    first = r0["first"]
    assert first["sharded"] == (strategy == "fsdp")
    if strategy == "fsdp":
        assert r1["first"]["model"] == {}  # only rank 0 gathers the full weights (the rank that saves)
    _assert_close(first["model"], _single_run(tie, steps=2)["model"])
    _assert_close(first["reference"], first["model"], atol=0)
    assert "model.layers.0.self_attn.q_proj.weight" in first["optimizer"]["state"]  # keyed by name

    # resumed on 2 ranks of the other strategy, and on 1 process: both end where 4 straight steps do
    straight = _single_run(tie, steps=4)
    _assert_close(r0["resumed"]["model"], straight["model"])
    _assert_close(_single_run(tie, steps=2, resume_state=first)["model"], straight["model"])
