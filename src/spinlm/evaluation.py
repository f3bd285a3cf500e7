"""Held-out evaluation: exact-match accuracy of greedy answers and the SFT loss of the ground truth.

`spinlm evaluate MODEL FILE` and the trainer (before training and after each SPIN iteration,
when `model.data.test_ds.file_path` is set) both call `evaluate`:

- accuracy: each prompt (the conversation up to its final assistant turn) is answered by
  greedy decoding of at most `max_new_tokens` tokens, in batches; the reply is correct when
  `spinlm.data.answers.extract_answer` gives the same answer for it as for the ground truth;
- SFT loss: the token-mean negative log-likelihood of the ground-truth answers (with their
  end-of-turn token), the same quantity as the trainer's `val/loss`. With cached decoding the
  answers are scored in the generation pass, on each prompt's KV cache right after its prefill
  (no second forward over the prompts: half of the evaluation's time before); otherwise by a
  separate pass. The two differ by float rounding only (~1e-7 relative);
- answer style: the fraction of replies that state "answer is" (the ground truth's style).

MODEL may be a Hugging Face model directory (the start model, or a run's `final/` export), a
`.gguf` file, a checkpoint directory `RUN/checkpoints/step_N` (the run's `config.yaml` names
the base model) or a run directory (its `final/` export).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from spinlm.algorithms.sharded import answer_nll_sharded
from spinlm.data.answers import extract_answer
from spinlm.data.chat import Conversation
from spinlm.data.dataset import fit_to_length
from spinlm.data.render import ChatRenderer
from spinlm.data.sources import DataSource, read_conversations
from spinlm.errors import ConfigError
from spinlm.model import parallel
from spinlm.model.generation import DecoderBackend, SamplingParams
from spinlm.utils.checkpoint import atomic_write_text
from spinlm.utils.distributed import info
from spinlm.utils.rundir import RUN_CONFIG, lookup, read_run_config, refuse_links_out

log = logging.getLogger(__name__)


@dataclass
class EvalItem:
    """One held-out conversation: what the model is asked, and the ground truth."""

    prompt_ids: list[int]
    answer_ids: list[int]  # ground-truth answer + end-of-turn, for the SFT loss
    question: str  # the last user message
    expected: str  # the ground-truth answer text
    skill: str = ""


@dataclass
class EvalResult:
    accuracy: float
    sft_loss: float
    answer_style: float  # fraction of replies saying "answer is"
    records: list[dict[str, Any]] = field(default_factory=list)

    def by_skill(self) -> dict[str, tuple[int, int]]:
        """skill -> (correct, total), skills sorted by name."""
        counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for r in self.records:
            counts[r["skill"]][0] += int(r["correct"])
            counts[r["skill"]][1] += 1
        return {k: (v[0], v[1]) for k, v in sorted(counts.items())}

    def metrics(self) -> dict[str, float]:
        return {"eval/accuracy": self.accuracy, "eval/sft_loss": self.sft_loss, "eval/answer_style": self.answer_style}

    def summary(self) -> str:
        n = len(self.records)
        correct = sum(r["correct"] for r in self.records)
        skills = ", ".join(f"{k} {c}/{t}" for k, (c, t) in self.by_skill().items())
        return (f"held-out accuracy {self.accuracy:.1%} ({correct}/{n}), SFT loss {self.sft_loss:.4f}, "
                f"'answer is' style {self.answer_style:.0%}; per skill: {skills}")


def load_eval_items(
    data: DataSource | str | Path | Sequence[Conversation], renderer: ChatRenderer, max_seq_length: int,
    max_new_tokens: int, limit: int | None = None,
) -> list[EvalItem]:
    """The first `limit` conversations of a source (`sources.read_conversations`) or of conversations
    already read, rendered; long prompts keep their end."""
    if max_new_tokens >= max_seq_length:
        raise ConfigError(f"eval: max_new_tokens ({max_new_tokens}) must be below max_seq_length ({max_seq_length})")
    conversations = read_conversations(data)[:limit]
    items = []
    for conv, prompt, answer in zip(conversations, *renderer.render_batch(conversations)):
        fitted = fit_to_length(prompt, answer, max_seq_length, max_seq_length - max_new_tokens, "truncate")
        if fitted is None:
            continue
        users = [t.content for t in conv.turns if t.role == "user"]
        items.append(EvalItem(fitted[0], fitted[1], users[-1], conv.turns[-1].content, str(conv.extra.get("skill", ""))))
    return items


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    items: list[EvalItem],
    end_strings: list[str],
    max_new_tokens: int = 48,
    batch_size: int = 16,
    autocast: Callable[[], Any] = contextlib.nullcontext,
    show_progress: bool = True,
    loss_in_decoding: bool = True,
) -> EvalResult:
    """Greedy answers, exact-match accuracy and the SFT loss of `items` under `model`.

    `loss_in_decoding=False` scores the answers in a separate pass even where decoding could."""
    if not items:
        raise ConfigError("eval: no held-out conversation to evaluate")
    params = SamplingParams(use_greedy=True, end_strings=list(end_strings), max_length=max_new_tokens, min_length=1)
    # generation and scoring are dealt to the ranks under torchrun, as the trainer's (one process: plain)
    with autocast():
        gens = DecoderBackend(tokenizer, batch_size).generate(
            model, [it.prompt_ids for it in items], params, show_progress=show_progress,
            answers=[it.answer_ids for it in items] if loss_in_decoding else None)
    records = []
    for item, ids, cut in zip(items, gens.ids, gens.truncated):
        reply = tokenizer.decode(ids, skip_special_tokens=True).strip()
        got, want = extract_answer(reply), extract_answer(item.expected)
        records.append({
            "skill": item.skill, "question": item.question, "expected": want, "extracted": got,
            "correct": got is not None and got == want, "truncated": cut, "reply": reply,
        })
    n = len(records)
    if gens.answer_logps is not None:
        loss = -sum(gens.answer_logps) / sum(len(it.answer_ids) for it in items)
    else:  # HF generate (no cached decoding) or asked: a forward over prompt + answer
        loss = sft_loss(model, items, tokenizer.eos_token_id, batch_size, autocast)
    return EvalResult(
        accuracy=sum(r["correct"] for r in records) / n,
        sft_loss=loss,
        answer_style=sum("answer is" in r["reply"].lower() for r in records) / n,
        records=records,
    )


def sft_loss(model: nn.Module, items: list[EvalItem], pad_id: int, batch_size: int = 16,
             autocast: Callable[[], Any] = contextlib.nullcontext) -> float:
    """Token-mean NLL of the ground-truth answers (every answer token, including its end token),
    computed as the trainer's val/loss is."""
    was_training = model.training
    model.eval()
    try:
        pairs = [{"prompt_ids": it.prompt_ids, "answer_ids": it.answer_ids} for it in items]
        nll, tokens = answer_nll_sharded(model, pairs, [list(range(len(pairs)))], batch_size, pad_id, autocast)
    finally:
        model.train(was_training)
    return nll / max(tokens, 1)


class HeldOutEvaluator:
    """What the trainer calls before training and after each iteration: evaluates the policy,
    writes every answer to `out_dir/iter_N.jsonl` and returns the metrics to log."""

    def __init__(self, items: list[EvalItem], tokenizer: Any, end_strings: list[str], max_new_tokens: int,
                 batch_size: int, out_dir: str | Path):
        self.items, self.tokenizer, self.end_strings = items, tokenizer, end_strings
        self.max_new_tokens, self.batch_size, self.out_dir = max_new_tokens, batch_size, Path(out_dir)

    @classmethod
    def from_config(cls, cfg: Any, tokenizer: Any, renderer: ChatRenderer,
                    data: Any = None) -> HeldOutEvaluator | None:
        """The evaluator of `model.data.test_ds` (None when its file_path is null and no in-memory `data`
        is given); reads the data now, so a bad record fails before the weights load."""
        test = cfg.model.data.test_ds
        if test.file_path is None and data is None:
            return None
        spin = cfg.trainer.spin
        source = DataSource.from_config(test, "model.data.test_ds", data)
        items = load_eval_items(source, renderer, test.max_seq_length, spin.eval_max_new_tokens)
        end_strings = list(dict.fromkeys(list(cfg.model.spin.sampling_params.end_strings) + renderer.end_strings))
        out_dir = Path(cfg.exp_manager.explicit_log_dir) / "eval"
        return cls(items, tokenizer, end_strings, spin.eval_max_new_tokens, spin.eval_batch_size, out_dir)

    def __call__(self, model: nn.Module, completed_iterations: int,
                 autocast: Callable[[], Any] = contextlib.nullcontext) -> dict[str, float]:
        t0 = time.perf_counter()
        result = evaluate(model, self.tokenizer, self.items, self.end_strings, self.max_new_tokens,
                          self.batch_size, autocast, show_progress=info().is_main)
        seconds = time.perf_counter() - t0
        if info().is_main:  # every rank evaluates the same items (same answers); one writes
            write_records(self.out_dir / f"iter_{completed_iterations}.jsonl", result.records)
        log.info("after %d iteration(s): %s (%.0fs)", completed_iterations, result.summary(), seconds)
        return {**result.metrics(), "eval/iteration": completed_iterations, "timing/eval_s": seconds}


def write_records(path: Path, records: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def load_model_for_eval(path: str | Path, trust_remote_code: bool = False):
    """(model, tokenizer) from a model directory, a .gguf, a checkpoint directory or a run directory.

    Nothing found there runs code: a run directory with a link leading out of it is refused, a
    checkpoint is verified against its manifest, and the model's own Python code (auto_map) runs
    only with `trust_remote_code` (`--trust-remote-code`), never because a run's config asks."""
    from spinlm.model.loading import load_pretrained

    path = Path(path)
    if path.is_dir() and not (path / "config.json").is_file():
        if (path / "final" / "config.json").is_file():
            refuse_links_out(path, "evaluate")
            return load_pretrained(path / "final", trust_remote_code=trust_remote_code)
        if (path / "policy.safetensors").is_file():
            return _load_checkpoint_policy(path, trust_remote_code)
    return load_pretrained(path, trust_remote_code=trust_remote_code)


def _load_checkpoint_policy(ckpt_dir: Path, trust_remote_code: bool):
    """A checkpoint holds only weights: load the run's base model, then the policy weights into it."""
    from spinlm.model.loading import load_pretrained
    from spinlm.utils.checkpoint import Checkpointer

    run_dir = ckpt_dir.parent.parent
    if not (run_dir / RUN_CONFIG).is_file():
        raise ConfigError(f"{ckpt_dir}: a checkpoint directory, but {run_dir / RUN_CONFIG} (which names its base "
                          "model) is missing")
    refuse_links_out(run_dir, "evaluate")
    checkpointer = Checkpointer(ckpt_dir.parent)
    checkpointer.verify(ckpt_dir, ["policy.safetensors"])  # what it reads matches; no link, no entry outside
    base = lookup(read_run_config(run_dir), "pretrained_checkpoint.restore_from_path")
    if not isinstance(base, str) or "${" in base:
        raise ConfigError(f"{run_dir / RUN_CONFIG}: pretrained_checkpoint.restore_from_path must be a plain path, "
                          f"got {base!r}")
    model, tokenizer = load_pretrained(base, trust_remote_code=trust_remote_code)
    parallel.load_full_state_dict(model, checkpointer.weights(ckpt_dir, "policy"))
    return model, tokenizer
