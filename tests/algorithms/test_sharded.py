"""How work is dealt to ranks: round-robin whole batches, dummies to keep FSDP2 ranks in step."""

from spinlm.algorithms import sharded
from spinlm.utils.distributed import DistInfo


def test_my_batches_round_robin_with_lockstep_padding(monkeypatch):
    assert sharded.my_batches(3, lockstep=True) == [0, 1, 2]  # one process: everything
    monkeypatch.setattr(sharded, "info", lambda: DistInfo(rank=1, world_size=2))
    assert sharded.my_batches(3, lockstep=False) == [1]
    assert sharded.my_batches(3, lockstep=True) == [1, None]  # rank 0 runs two batches: one dummy here
    assert sharded.my_batches(0, lockstep=True) == []


def test_local_rows_is_this_ranks_contiguous_share(monkeypatch):
    import torch

    batch = {"a": torch.arange(8), "b": torch.arange(16).view(8, 2)}
    assert sharded.local_rows(batch) is batch
    monkeypatch.setattr(sharded, "info", lambda: DistInfo(rank=1, world_size=4))
    rows = sharded.local_rows(batch)
    assert rows["a"].tolist() == [2, 3] and rows["b"].tolist() == [[4, 5], [6, 7]]
