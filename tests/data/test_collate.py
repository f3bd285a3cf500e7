import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from spinlm.data.collate import pad_right, spin_custom_collate

EOS = 9


def test_pad_right_lists_and_tensors():
    out = pad_right([[1, 2, 3], torch.tensor([4]), []], pad=0)
    assert out.dtype == torch.long
    assert out.tolist() == [[1, 2, 3], [4, 0, 0], [0, 0, 0]]


def test_collate_matches_hand_built_batch():
    batch = [
        {"prompt_ids": [1, 2, 3], "answer_ids": [4, 5], "index": 7},
        {"prompt_ids": torch.tensor([6]), "answer_ids": torch.tensor([7, 8, 5, 4]), "index": 2},
    ]
    out = spin_custom_collate(batch, eos_id=EOS)
    expected = {
        "prompts_and_answers": [[1, 2, 3, 4, 5], [6, 7, 8, 5, 4]],
        "masks": [[False, False, False, True, True], [False, True, True, True, True]],
        "prompts_only": [[1, 2, 3], [6, EOS, EOS]],
        "answers_only": [[4, 5, EOS, EOS], [7, 8, 5, 4]],
        "prompt_lengths": [3, 1],
        "combined_lengths": [5, 5],
        "sample_index": [7, 2],
    }
    assert set(out) == set(expected)
    for key, value in expected.items():
        assert out[key].tolist() == value, key
    assert out["masks"].dtype == torch.bool
    assert all(out[k].dtype == torch.long for k in expected if k != "masks")


def test_padding_is_eos_and_masks_false_on_padding():
    batch = [{"prompt_ids": [1], "answer_ids": [2]}, {"prompt_ids": [1, 1, 1], "answer_ids": [2, 2, 2]}]
    out = spin_custom_collate(batch, eos_id=EOS)
    assert out["prompts_and_answers"].tolist() == [[1, 2] + [EOS] * 4, [1, 1, 1, 2, 2, 2]]
    assert out["masks"].tolist()[0] == [False, True, False, False, False, False]
    assert "sample_index" not in out


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_any_batch_size_masks_exactly_the_answer(batch_size):
    g = torch.Generator().manual_seed(batch_size)
    batch = [
        {
            "prompt_ids": torch.randint(0, 50, (int(torch.randint(1, 10, (1,), generator=g)),), generator=g),
            "answer_ids": torch.randint(0, 50, (int(torch.randint(1, 10, (1,), generator=g)),), generator=g),
            "index": i,
        }
        for i in range(batch_size)
    ]
    out = spin_custom_collate(batch, eos_id=EOS)
    width = max(len(b["prompt_ids"]) + len(b["answer_ids"]) for b in batch)
    assert out["prompts_and_answers"].shape == out["masks"].shape == (batch_size, width)
    for row, item in enumerate(batch):
        p, a = len(item["prompt_ids"]), len(item["answer_ids"])
        expected_mask = [p <= j < p + a for j in range(width)]
        assert out["masks"][row].tolist() == expected_mask
        assert out["prompts_and_answers"][row, out["masks"][row]].tolist() == item["answer_ids"].tolist()
        assert out["prompts_and_answers"][row, p + a :].eq(EOS).all()
    assert out["sample_index"].tolist() == list(range(batch_size))


@pytest.mark.parametrize("flag", ["reset_position_ids", "reset_attention_mask", "eod_mask_loss"])
def test_packing_flags_not_implemented(flag):
    with pytest.raises(NotImplementedError, match="Megatron"):
        spin_custom_collate([{"prompt_ids": [1], "answer_ids": [2]}], eos_id=EOS, **{flag: True})


def test_works_as_dataloader_collate_fn():
    from functools import partial

    from spinlm.data.dataset import SPINDataset

    ds = SPINDataset([{"prompt_ids": [i] * (i + 1), "answer_ids": [i]} for i in range(5)])
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=partial(spin_custom_collate, eos_id=EOS))
    batches = list(loader)
    assert [b["sample_index"].tolist() for b in batches] == [[0, 1], [2, 3], [4]]
