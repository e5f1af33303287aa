"""Rank discovery from torchrun and Slurm environments, nodelist parsing, and shard ranges."""

import pytest

from dpo_dist import dist


@pytest.mark.parametrize("nodelist,first", [
    ("node01", "node01"), ("gpu[003-005,010]", "gpu003"), ("gpu[010,003-005],cpu01", "gpu010"),
    ("a-b-7,c", "a-b-7"), ("localhost", "localhost")])
def test_first_host_of_a_slurm_nodelist(nodelist, first):
    assert dist.first_host(nodelist) == first


def test_rank_from_torchrun_then_slurm_then_single(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS",
                "SLURM_LOCALID", "SLURM_NNODES"):
        monkeypatch.delenv(key, raising=False)
    assert dist.read_env() == dist.DistEnv()
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_NNODES", "2")
    assert dist.read_env() == dist.DistEnv(rank=5, world_size=8, local_rank=1, local_world_size=4)
    monkeypatch.setenv("RANK", "3")  # torchrun inside a Slurm step wins
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert dist.read_env() == dist.DistEnv(rank=3, world_size=4, local_rank=1, local_world_size=2)


@pytest.mark.parametrize("n,world", [(7, 2), (10, 3), (2, 4), (0, 2), (16, 16)])
def test_shards_cover_everything_once_in_order(n, world):
    shards = [dist.shard_range(n, r, world) for r in range(world)]
    assert [i for s in shards for i in s] == list(range(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
