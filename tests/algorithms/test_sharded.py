"""A rank's contiguous share of the training batch."""

from spinlm.algorithms import sharded
from spinlm.utils.distributed import DistInfo


def test_local_rows_is_this_ranks_contiguous_share(monkeypatch):
    import torch

    batch = {"a": torch.arange(8), "b": torch.arange(16).view(8, 2)}
    assert sharded.local_rows(batch) is batch
    monkeypatch.setattr(sharded, "info", lambda: DistInfo(rank=1, world_size=4))
    rows = sharded.local_rows(batch)
    assert rows["a"].tolist() == [2, 3] and rows["b"].tolist() == [[4, 5], [6, 7]]
