"""Rank helpers and collectives: no-ops in one process, agreement across two gloo ranks."""

import torch
from spawn import run_ranks

from spinlm.utils import distributed as D


def test_single_process_helpers_are_identities():
    assert D.info() == D.DistInfo()
    assert D.any_rank(True) and not D.any_rank(False)
    t = torch.arange(3.0)
    assert torch.equal(D.gather_rows(t), t)
    assert D.broadcast_from_main({"x": 1}) == {"x": 1}
    assert D.all_gather_objects(5) == [5]


def test_my_share_deals_round_robin_to_ranks_or_groups_with_lockstep_padding(monkeypatch):
    assert D.my_share(3, lockstep=True) == [0, 1, 2]  # one process: everything
    monkeypatch.setattr(D, "info", lambda: D.DistInfo(rank=1, world_size=2))
    assert D.my_share(3) == [1]
    assert D.my_share(3, lockstep=True) == [1, None]  # rank 0 runs two items: one dummy here
    assert D.my_share(0, lockstep=True) == []
    monkeypatch.setattr(D, "info", lambda: D.DistInfo(rank=3, world_size=4))
    assert D.my_share(5, group_size=2) == [1, 3]  # ranks 2 and 3 form group 1 of 2: the same share
    monkeypatch.setattr(D, "info", lambda: D.DistInfo(rank=2, world_size=4))
    assert D.my_share(5, group_size=2) == [1, 3]


def test_env_info_reads_torchrun_variables(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("RANK", "9")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    env = D.env_info()
    assert (env.rank, env.world_size, env.local_rank, env.num_nodes) == (9, 16, 1, 2)
    assert not env.is_main and env.is_distributed
    assert D.backend_for("cuda") == "nccl" and D.backend_for("cpu") == "gloo"


def _collectives(rank):
    return {
        "info": D.info(),
        "any_true": D.any_rank(rank == 1),
        "any_false": D.any_rank(False),
        "sum": D.all_reduce_sum([rank + 1.0, 2.0]),
        "rows": D.gather_rows(torch.full((2, 3), float(rank))),
        "main": D.broadcast_from_main(f"from {rank}"),
        "objects": D.all_gather_objects({"rank": rank}),
        # rank 0 alone holds the weights (as a reference's full state dict under torchrun)
        "tensors": dict(D.broadcast_tensors_from_main(
            {"w": torch.arange(6.0).view(2, 3), "b": torch.tensor([7], dtype=torch.int64)} if rank == 0 else {})),
    }


def test_two_ranks_agree(tmp_path):
    r0, r1 = run_ranks(_collectives, 2, tmp_path)
    assert (r0["info"].rank, r1["info"].rank, r1["info"].world_size) == (0, 1, 2)
    for r in (r0, r1):
        assert r["any_true"] is True and r["any_false"] is False
        assert r["sum"] == [3.0, 4.0]
        assert torch.equal(r["rows"], torch.cat([torch.zeros(2, 3), torch.ones(2, 3)]))
        assert r["main"] == "from 0"
        assert r["objects"] == [{"rank": 0}, {"rank": 1}]
        assert list(r["tensors"]) == ["w", "b"] and torch.equal(r["tensors"]["w"], torch.arange(6.0).view(2, 3))
        assert r["tensors"]["b"].dtype == torch.int64 and r["tensors"]["b"].tolist() == [7]


def test_local_launch_starts_the_devices_a_lone_process_was_asked_for(monkeypatch):
    import pytest

    from spinlm.errors import ConfigError

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    argv = ["trainer.devices=2", "model.seed=3"]
    assert D.local_launch(None, 1, "cpu", argv) is None and D.local_launch(1, 1, "cpu", argv) is None
    command = D.local_launch(2, 1, "cpu", argv)
    assert command[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "spinlm", "train", *argv]
    with pytest.raises(ConfigError, match="trainer.num_nodes=2: start spinlm on each node with torchrun"):
        D.local_launch(8, 2, "cpu", argv)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match="trainer.devices=2 but 1 CUDA device"):
        D.local_launch(2, 1, "gpu", argv)
    monkeypatch.setenv("WORLD_SIZE", "2")  # already started by a launcher
    assert D.local_launch(2, 1, "cpu", argv) is None
