"""Rank discovery from torchrun and Slurm environments, nodelist parsing, and shard ranges."""

import os
from unittest import mock

import pytest

from dpo_dist import dist


@pytest.mark.parametrize("nodelist,first", [
    ("node01", "node01"), ("gpu[003-005,010]", "gpu003"), ("gpu[010,003-005],cpu01", "gpu010"),
    ("a-b-7,c", "a-b-7"), ("localhost", "localhost")])
def test_first_host_of_a_slurm_nodelist(nodelist, first):
    assert dist.first_host(nodelist) == first


def test_rank_from_torchrun_then_slurm_then_single(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS",
                "SLURM_LOCALID", "SLURM_NNODES", "SLURM_NODEID", "SLURM_TASKS_PER_NODE", "SLURM_STEP_TASKS_PER_NODE",
                "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(key, raising=False)
    assert dist.read_env() == dist.DistEnv()
    # The shell of `sbatch -n 8` (read on this machine's Slurm): rank 0 of the allocation, but no
    # step -- one process, which must not wait for 7 more.
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    assert dist.read_env() == dist.DistEnv()
    monkeypatch.setenv("SLURM_PROCID", "5")  # task 5 of `srun -n 8`
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_NNODES", "2")
    assert dist.read_env() == dist.DistEnv(rank=5, world_size=8, local_rank=1, local_world_size=4)
    monkeypatch.setenv("SLURM_NTASKS", "16")  # `srun -E -n 8` in a 16-task allocation keeps the caller's
    assert dist.read_env().world_size == 8
    monkeypatch.setenv("RANK", "3")  # torchrun inside a Slurm step wins
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert dist.read_env() == dist.DistEnv(rank=3, world_size=4, local_rank=1, local_world_size=2)


@pytest.mark.parametrize("spec,tasks", [
    ("8", [8]), ("4(x2)", [4, 4]), ("3,2", [3, 2]), ("2(x3),1", [2, 2, 2, 1]), ("", []), ("2(xx),1", []),
    ("a,2", [])])
def test_tasks_per_node_from_slurms_compressed_list(spec, tasks):
    assert dist.parse_tasks_per_node(spec) == tasks


def test_uneven_slurm_tasks_give_each_node_its_own_local_world(monkeypatch):
    """`srun -n 5` over 2 nodes: 3 tasks on the first, 2 on the second; each node's ranks split its
    own GPUs, not 5 // 2 of them."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_TASKS_PER_NODE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in {"SLURM_PROCID": "4", "SLURM_NTASKS": "5", "SLURM_LOCALID": "1", "SLURM_NNODES": "2",
                       "SLURM_NODEID": "1", "SLURM_STEP_TASKS_PER_NODE": "3,2", "SLURM_STEP_NUM_TASKS": "5"}.items():
        monkeypatch.setenv(key, value)
    assert dist.read_env() == dist.DistEnv(rank=4, world_size=5, local_rank=1, local_world_size=2)
    monkeypatch.setenv("SLURM_NODEID", "0")
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_LOCALID", "0")
    assert dist.read_env().local_world_size == 3
    monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", "garbage")  # an even split, as before
    assert dist.read_env().local_world_size == 2


@pytest.mark.parametrize("n,world", [(7, 2), (10, 3), (2, 4), (0, 2), (16, 16)])
def test_shards_cover_everything_once_in_order(n, world):
    shards = [dist.shard_range(n, r, world) for r in range(world)]
    assert [i for s in shards for i in s] == list(range(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


@pytest.mark.parametrize("environ,problem", [
    # torchrun (also inside a Slurm step) and DeepSpeed's launcher set RANK: their layout is even.
    ({"TORCHELASTIC_RUN_ID": "1", "SLURM_PROCID": "1", "SLURM_STEP_TASKS_PER_NODE": "3,2"}, ""),
    ({"RANK": "3", "WORLD_SIZE": "8", "SLURM_PROCID": "0", "SLURM_TASKS_PER_NODE": "5,3"}, ""),
    ({}, ""),
    # One node; --ntasks-per-node=8 on 4 nodes.
    ({"SLURM_PROCID": "3", "SLURM_NODEID": "0", "SLURM_LOCALID": "3", "SLURM_STEP_TASKS_PER_NODE": "8"}, ""),
    ({"SLURM_PROCID": "29", "SLURM_NODEID": "3", "SLURM_LOCALID": "5", "SLURM_STEP_TASKS_PER_NODE": "8(x4)"}, ""),
    # A batch script or salloc shell: the job's uneven layout says nothing about a launcher's ranks.
    ({"SLURM_PROCID": "0", "SLURM_NODEID": "0", "SLURM_TASKS_PER_NODE": "5,3"}, ""),
    # An even step inside an uneven job: the step's layout counts.
    ({"SLURM_PROCID": "1", "SLURM_NODEID": "0", "SLURM_LOCALID": "1", "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
      "SLURM_TASKS_PER_NODE": "5,3"}, ""),
    # Uneven tasks per node in the step: named with Slurm's own spec and the ways out.
    ({"SLURM_PROCID": "4", "SLURM_NODEID": "1", "SLURM_LOCALID": "0", "SLURM_STEP_TASKS_PER_NODE": "4,2"},
     "SLURM_STEP_TASKS_PER_NODE=4,2): start the same number on every node"),
    # The same step after this process's own rendezvous exported RANK / WORLD_SIZE for DeepSpeed (round
    # 2's generation, the sbatch script's evaluate step): still Slurm's ranks, still uneven.
    ({"SLURM_PROCID": "4", "SLURM_NODEID": "1", "SLURM_LOCALID": "0", "SLURM_STEP_TASKS_PER_NODE": "4,2",
      "SLURM_STEP_NUM_TASKS": "6", "RANK": "4", "WORLD_SIZE": "6"}, "SLURM_STEP_TASKS_PER_NODE=4,2)"),
    # DeepSpeed's launcher inside a one-task step: its ranks, not Slurm's.
    ({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1", "SLURM_STEP_TASKS_PER_NODE": "1", "RANK": "0", "WORLD_SIZE": "8"}, ""),
])
def test_pooling_problem_from_the_slurm_step_layout(environ, problem):
    found = dist.pooling_problem(environ)
    assert (problem in found and found) if problem else found == ""


def test_cyclic_slurm_ranks_pool_into_engines_numbered_node_by_node():
    """srun -m cyclic over 2 nodes of 2 tasks with one GPU each, tp=2: ranks 0 and 2 share node 0,
    ranks 1 and 3 node 1. Engines are numbered by place node by node, so node 0's leader runs engine
    0 and node 1's engine 1: every engine once, none twice (rank // group would give rank 1 engine 0)."""
    placed = []
    for rank, node, local in [(0, 0, 0), (1, 1, 0), (2, 0, 1), (3, 1, 1)]:
        environ = {"SLURM_PROCID": str(rank), "SLURM_NODEID": str(node), "SLURM_LOCALID": str(local),
                   "SLURM_STEP_TASKS_PER_NODE": "2(x2)"}
        position = dist.node_major_position(environ, rank, local)
        placed.append(dist.place_engine(["0", "1"], rank, 4, local, 2, 2, False, dist.pooling_problem(environ), position))
    leaders = sorted(p.engine for p in placed if p.engine is not None)
    assert leaders == [0, 1] and {p.num_engines for p in placed} == {2}
    assert placed[0].engine == 0 and placed[0].devices == ("0", "1")
    # torchrun: the rank is its place.
    assert dist.node_major_position({"TORCHELASTIC_RUN_ID": "x", "SLURM_STEP_TASKS_PER_NODE": "2(x2)"}, 5, 1) == 5


def test_a_cyclic_steps_engines_stay_numbered_node_by_node_after_the_rendezvous():
    """The rendezvous of srun without torchrun exports RANK and WORLD_SIZE (DeepSpeed needs them); the
    vLLM engines placed after it (round 2, the evaluate step) must still be numbered by the step's
    layout: under -m cyclic, rank 1 is node 1's first task and leads engine 1, not rank // 2 = 0."""
    before = dict(os.environ)
    # The rendezvous writes os.environ itself: cleared for the test (as if in no launcher), all put back.
    with mock.patch.dict(os.environ, clear=True):
        os.environ.update({"SLURM_PROCID": "1", "SLURM_NTASKS": "4", "SLURM_NNODES": "2", "SLURM_NODEID": "1",
                           "SLURM_LOCALID": "0", "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_STEP_NUM_TASKS": "4",
                           "SLURM_JOB_NODELIST": "gpu[001-002]", "SLURM_JOB_ID": "7"})
        e = dist.read_env()
        assert dist.node_major_position(os.environ, e.rank, e.local_rank) == 2
        dist._rendezvous_from_slurm(e)
        assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["MASTER_ADDR"]) == ("1", "4", "gpu001")
        assert dist.node_major_position(os.environ, e.rank, e.local_rank) == 2
        assert dist.place_engine(["0", "1"], 1, 4, 0, 2, 2, False, dist.pooling_problem(os.environ),
                                 dist.node_major_position(os.environ, 1, 0)).engine == 1
    assert dict(os.environ) == before


def test_pooling_raises_on_uneven_nodes_and_leading_alone_does_not():
    """tp=2 over ranks of one GPU each pools two ranks per engine: with a layout problem that raises,
    naming it; with two GPUs per rank each rank leads its own engine, and the layout does not matter."""
    with pytest.raises(RuntimeError, match="tensor_parallel_size=2 pools 2 ranks.*uneven"):
        dist.place_engine(["0", "1", "2", "3"], 1, 8, 0, 4, 2, False, "Slurm placed uneven tasks ...")
    assert dist.place_engine(["0", "1"], 3, 4, 0, 1, 2, False, "uneven").engine == 3


def test_deepspeeds_launcher_gives_its_local_size():
    """launch/deepspeed.sh: DeepSpeed's launcher exports LOCAL_SIZE, not LOCAL_WORLD_SIZE; 2 nodes of
    8 must give each node 8 local ranks, not the world's 16 (which leaves every rank 0 GPUs)."""
    env = {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_SIZE": "8"}
    with pytest.MonkeyPatch.context() as mp:
        for key in ("LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
            mp.delenv(key, raising=False)
        for key, value in env.items():
            mp.setenv(key, value)
        assert dist.read_env() == dist.DistEnv(rank=9, world_size=16, local_rank=1, local_world_size=8)


def test_a_task_seeing_fewer_gpus_than_its_nodes_tasks_owns_them_with_uneven_tasks():
    """srun -n 3 -N 2 ("2,1"), each task bound to one GPU without SLURM_GPUS_PER_TASK: node 0 has 2
    tasks, so a task seeing 1 GPU sees its own (an even split, 3 // 2 = 1, said shared)."""
    environ = {"SLURM_PROCID": "1", "SLURM_NTASKS": "3", "SLURM_NNODES": "2", "SLURM_NODEID": "0",
               "SLURM_LOCALID": "1", "SLURM_STEP_TASKS_PER_NODE": "2,1"}
    assert dist.tasks_own_devices(environ, 1) is True
