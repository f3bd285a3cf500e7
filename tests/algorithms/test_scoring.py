import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from spinlm.algorithms.scoring import batch_pairs, pair_logprobs, reference_pair_logprobs
from spinlm.data.collate import spin_custom_collate
from spinlm.model.tiny import build_tiny_model, build_tiny_tokenizer

PAD = 0


@pytest.fixture(scope="module")
def model():
    return build_tiny_model(build_tiny_tokenizer(), seed=5).eval()


def _seqs(seed, lengths):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 300, (n,), generator=g).tolist() for n in lengths]


def test_packed_and_padded_paths_agree(model):
    p, a, g = _seqs(0, [4, 9, 2]), _seqs(1, [3, 1, 7]), _seqs(2, [6, 2, 1])
    with torch.no_grad():
        packed = pair_logprobs(model, p, a, g, PAD, packed=True)
        padded = pair_logprobs(model, p, a, g, PAD, packed=False)
    for x, y in zip(packed, padded):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mbs", [1, 2, 5])
def test_reference_micro_batches_restore_input_order(model, mbs):
    p, a, g = _seqs(3, [8, 2, 5, 3, 6]), _seqs(4, [1, 6, 2, 4, 3]), _seqs(5, [5, 1, 3, 2, 7])
    act, gen = reference_pair_logprobs(model, p, a, g, PAD, micro_batch_size=mbs)
    assert not act.requires_grad
    for i in range(5):
        with torch.no_grad():
            one_a, one_g = pair_logprobs(model, [p[i]], [a[i]], [g[i]], PAD, packed=False)
        torch.testing.assert_close(act[i : i + 1], one_a, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gen[i : i + 1], one_g, atol=1e-5, rtol=1e-5)


def test_batch_pairs_recovers_the_ids():
    p, a, g = _seqs(6, [3, 5]), _seqs(7, [4, 2]), _seqs(8, [1, 6])
    act = spin_custom_collate([{"prompt_ids": x, "answer_ids": y} for x, y in zip(p, a)], PAD)
    gen = spin_custom_collate([{"prompt_ids": x, "answer_ids": y} for x, y in zip(p, g)], PAD)
    batch = {
        "actual": act["prompts_and_answers"], "actual_mask": act["masks"], "generated": gen["prompts_and_answers"],
        "prompt_lengths": act["prompt_lengths"], "generated_lengths": gen["combined_lengths"] - gen["prompt_lengths"],
    }
    assert batch_pairs(batch, slice(0, 2)) == (p, a, g)
    assert batch_pairs(batch, slice(1, 2)) == ([p[1]], [a[1]], [g[1]])
