"""The one module that touches torch.distributed and DeepSpeed.

Rank and world size come from torchrun (RANK, WORLD_SIZE, LOCAL_RANK) or, for one task per GPU
under srun without torchrun, from Slurm (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; in an srun step
only, not in the batch script's shell). A plain ``python -m ...`` is world size 1: the same code
path, no special case.

The rest of the package sees: ``init()``, ``is_main()``, ``barrier()``, ``all_reduce_sum()``,
``all_gather_object()``, ``shard_range()``, ``build_engine()``, ``full_state_dict()``, ``shutdown()``.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import pickle
import re
import socket
import sys
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence, TypeVar

import torch
import torch.distributed as torch_dist

from dpo_dist.config import DeepSpeedConfig, OptimConfig, TrainConfig

T = TypeVar("T")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def read_env() -> DistEnv:
    e = os.environ
    if "RANK" in e and "WORLD_SIZE" in e:
        world = int(e["WORLD_SIZE"])
        # DeepSpeed's own launcher (launch/deepspeed.sh) exports LOCAL_SIZE, not LOCAL_WORLD_SIZE.
        local_world = e.get("LOCAL_WORLD_SIZE") or e.get("LOCAL_SIZE") or world
        return DistEnv(int(e["RANK"]), world, int(e.get("LOCAL_RANK", 0)), int(local_world))
    # Slurm's ranks are the tasks of an srun step. A batch script's shell has SLURM_PROCID=0 and the
    # allocation's SLURM_NTASKS too, but it is one process: taken as rank 0 of N, a stage started there
    # would wait for ranks that never come. Only srun sets SLURM_STEP_NUM_TASKS, and it is the step's
    # count even where SLURM_NTASKS is still the allocation's (srun -E, --preserve-env, keeps the caller's).
    if "SLURM_PROCID" in e and int(e.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
        ntasks = int(e["SLURM_STEP_NUM_TASKS"])
        return DistEnv(int(e["SLURM_PROCID"]), ntasks, int(e.get("SLURM_LOCALID", 0)), _slurm_tasks_per_node(e))
    return DistEnv()


def parse_tasks_per_node(spec: str) -> list[int]:
    """Slurm's compressed tasks-per-node list, expanded: "2(x3),1" is [2, 2, 2, 1]; [] if malformed."""
    counts: list[int] = []
    for part in spec.split(","):
        count, _, repeat = part.strip().partition("(x")
        if not count.isdigit() or (repeat and not repeat.rstrip(")").isdigit()):
            return []
        counts += [int(count)] * (int(repeat.rstrip(")")) if repeat else 1)
    return counts


def _slurm_step_layout(environ: Mapping[str, str]) -> list[int]:
    """Tasks per node of the srun step this rank is a task of; [] where the ranks do not come from
    Slurm (torchrun or DeepSpeed's launcher set RANK, also inside a step) or outside a step (a batch
    script or salloc shell, whose job layout says nothing of how another launcher placed ranks).
    RANK and WORLD_SIZE that are the task's own Slurm numbers are the ones _rendezvous_from_slurm
    exported for DeepSpeed: still Slurm's ranks, in this process and its children (round 2's vLLM
    process, the sbatch script's evaluate step), so the step's layout still counts."""
    slurms = (environ.get("RANK"), environ.get("WORLD_SIZE")) == (environ.get("SLURM_PROCID"),
                                                                  environ.get("SLURM_STEP_NUM_TASKS"))
    if "TORCHELASTIC_RUN_ID" in environ or ("RANK" in environ and "WORLD_SIZE" in environ and not slurms):
        return []
    if "SLURM_PROCID" not in environ or "SLURM_STEP_TASKS_PER_NODE" not in environ:
        return []
    return parse_tasks_per_node(environ["SLURM_STEP_TASKS_PER_NODE"])


def pooling_problem(environ: Mapping[str, str]) -> str:
    """Why a node's ranks cannot pool their GPUs into shared vLLM engines (place_engine), or "" when
    they can. Pooled engines are numbered node by node, and their count is world // group, which needs
    the same number of ranks on every node: a Slurm step with uneven tasks per node (`srun -n 5` over
    2 nodes) would leave an engine's shard unwritten."""
    counts = _slurm_step_layout(environ)
    if len(set(counts)) > 1:
        return (f"Slurm placed uneven tasks on the step's nodes (SLURM_STEP_TASKS_PER_NODE="
                f"{environ['SLURM_STEP_TASKS_PER_NODE']}): start the same number on every node (--ntasks-per-node, "
                f"or -n a multiple of -N), give each task its own GPUs (--gpus-per-task=<tp>), or launch with torchrun")
    return ""


def node_major_position(environ: Mapping[str, str], rank: int, local_rank: int) -> int:
    """This rank's index when ranks are counted node by node. torchrun numbers them so (the rank
    itself); a Slurm step with `-m cyclic` numbers tasks across nodes, so a pooled engine's number
    (place_engine) comes from the node's place in the step and the task's place on its node."""
    counts = _slurm_step_layout(environ)
    node = int(environ.get("SLURM_NODEID", 0))
    if not counts or not 0 <= node < len(counts):
        return rank
    return sum(counts[:node]) + local_rank


def launch_id(environ: Mapping[str, str]) -> str:
    """What every rank of one launch of a job shares and a later launch of the same command does not,
    from the launcher's variables ("" where none says): torchrun's run id (a fresh uuid with
    --standalone; launch/torchrun.sh passes the Slurm job id on several nodes) and restart count,
    Slurm's job, step and requeue count. File barriers are named with it (artifacts.file_barrier)."""
    keys = ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_RESTART_COUNT")
    return ".".join(re.sub(r"[^A-Za-z0-9_-]", "_", environ[k]) for k in keys if environ.get(k))


_ENV: DistEnv | None = None
# Process groups this process has made: each gets a key namespace of its own in the rendezvous store.
_GROUPS = 0


def env() -> DistEnv:
    return _ENV if _ENV is not None else read_env()


def is_main() -> bool:
    return env().is_main


def torch_at_least(major: int, minor: int) -> bool:
    return tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (major, minor)


def fused_adamw(dev: torch.device) -> bool:
    """Whether torch has a fused AdamW kernel for ``dev``: CUDA, and the CPU from torch 2.4. Without
    one, AdamW steps parameter by parameter, op by op: 0.53 s a step for the bundled model's 135M
    parameters on this machine's two cores, against 0.10 s fused (the same update to float rounding)."""
    return dev.type == "cuda" or (dev.type == "cpu" and torch_at_least(2, 4))


# ---------------------------------------------------------------- devices
# Which GPUs a rank (and a vLLM engine) takes is decided by pure functions of the environment, tested
# as tables (tests/test_placement.py); device(), init() and generate.VLLMBackend apply them.

def visible_devices(environ: Mapping[str, str], device_count: int) -> list[str]:
    """The GPUs this process can use, as CUDA_VISIBLE_DEVICES names them (indices such as "4" or
    UUIDs), in CUDA's order: ``cuda:i`` is entry i. Unset, every GPU of the machine (``device_count``)."""
    value = environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return [str(i) for i in range(device_count)]
    return [d.strip() for d in value.split(",") if d.strip()]


def tasks_own_devices(environ: Mapping[str, str], num_visible: int | None = None) -> bool:
    """Whether each rank sees only its own GPUs rather than all of its node's. torchrun starts every
    rank of a node with the same CUDA_VISIBLE_DEVICES (shared); so does srun with --gpus-per-node.
    srun with --gpus-per-task (or --gpu-bind=single/map_gpu) gives each task its own list, which
    starts at cuda:0. Slurm says so in SLURM_GPUS_PER_TASK; where it does not, a task that sees fewer
    GPUs (``num_visible``) than its node has tasks can only be seeing its own."""
    if "TORCHELASTIC_RUN_ID" in environ:  # torchrun, also when it runs inside a Slurm step
        return False
    if "SLURM_PROCID" not in environ:
        return False
    bind = environ.get("SLURM_GPU_BIND", "")
    if environ.get("SLURM_GPUS_PER_TASK") or bind.startswith(("single", "map_gpu", "mask_gpu")):
        return True
    tasks_per_node = _slurm_tasks_per_node(environ)
    return num_visible is not None and 0 < num_visible < tasks_per_node


def _slurm_tasks_per_node(environ: Mapping[str, str]) -> int:
    """Tasks on this node: `srun -n 5` over 2 nodes places 3 and 2, so this node's own count, not
    5 // 2, decides how many ranks share its GPUs (rank_device_index, tasks_own_devices). An even
    split where Slurm gives no layout. The step's layout (SLURM_STEP_TASKS_PER_NODE, which srun always
    sets), else in a batch script or salloc shell the job's."""
    counts = parse_tasks_per_node(environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE") or "")
    node = int(environ.get("SLURM_NODEID", 0))
    if 0 <= node < len(counts):
        return counts[node]
    ntasks = int(environ.get("SLURM_NTASKS", "1"))
    return max(1, ntasks // max(1, int(environ.get("SLURM_NNODES", "1"))))


def _devices_per_rank(visible: Sequence[str], local_rank: int, local_world_size: int, own_devices: bool) -> int:
    """How many of the visible GPUs belong to each rank (its slot starts at local_rank x this when
    shared, at 0 when the rank sees only its own). Raises when the rank would have none."""
    if own_devices:
        if not visible:
            raise RuntimeError(f"rank {local_rank} of its node sees no GPU (CUDA_VISIBLE_DEVICES is empty): "
                               "give every Slurm task one (--gpus-per-task=1)")
        return len(visible)
    per_rank = len(visible) // local_world_size
    if per_rank == 0:
        raise RuntimeError(
            f"local rank {local_rank} has no GPU: {local_world_size} ranks on this node share {len(visible)} visible "
            f"GPU(s) (CUDA_VISIBLE_DEVICES={','.join(visible)}); start one rank per GPU (NPROC_PER_NODE / "
            "--ntasks-per-node at most the GPUs per node), or give each task its own (--gpus-per-task=1)")
    return per_rank


def rank_device_index(visible: Sequence[str], local_rank: int, local_world_size: int, own_devices: bool) -> int:
    """This rank's training GPU as an index into ``visible`` (its ``cuda:<index>``).

    Ranks sharing a node's list train on cuda:<local rank> (torchrun: rank r on cuda:r), also with
    fewer ranks than GPUs: that is where DeepSpeed puts the engine and zero.Init the partitions
    (from LOCAL_RANK), so the batch must go there too. A rank that sees only its own GPUs
    (srun --gpus-per-task) takes cuda:0, and LOCAL_RANK is set to match (deepspeed_local_rank)."""
    _devices_per_rank(visible, local_rank, local_world_size, own_devices)  # raises for a rank with none
    return 0 if own_devices else local_rank


def _slot_start(visible: Sequence[str], local_rank: int, local_world_size: int, own_devices: bool) -> int:
    """Where this rank's equal share of the node's GPUs starts (vLLM engines may take several)."""
    return 0 if own_devices else local_rank * _devices_per_rank(visible, local_rank, local_world_size, own_devices)


@dataclass(frozen=True)
class EnginePlacement:
    """Where a rank's inference engine runs. ``engine``: this rank's engine in [0, num_engines), or
    None when another rank of its tensor-parallel group leads the engine (this rank then generates
    nothing). ``devices``: CUDA_VISIBLE_DEVICES entries for the engine (() on the CPU)."""
    engine: int | None
    num_engines: int
    devices: tuple[str, ...] = ()


def place_engine(visible: Sequence[str], rank: int, world_size: int, local_rank: int, local_world_size: int,
                 tensor_parallel_size: int, own_devices: bool, pooling_problem: str = "",
                 position: int | None = None) -> EnginePlacement:
    """One inference engine (vLLM) per tensor-parallel group: which GPUs this rank's engine gets, or
    that this rank leads none. Work is split over ``num_engines`` engines, not over ranks.

    Every rank owns a slot of the visible GPUs (``rank_device_index``). An engine needs
    ``tensor_parallel_size`` GPUs: when a slot holds that many, each rank leads an engine on the
    first of its own; otherwise consecutive ranks of a node pool their slots, and the group's first
    rank starts the engine on all of them (the engine's TP workers are vLLM's own processes). Ranks
    that see only their own GPUs cannot pool them. Without GPUs (``visible`` empty: vLLM on the CPU)
    every rank leads its own engine. Ranks are numbered node by node (torchrun and Slurm's default
    block distribution), so a group's ranks are consecutive and the group's engine is rank // group;
    under another numbering (srun -m cyclic) ``position``, the rank's index node by node
    (node_major_position), numbers it instead. ``pooling_problem`` (from the function of that name)
    says when nodes hold different numbers of ranks, and pooling raises.
    """
    tp = tensor_parallel_size
    if tp < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {tp}")
    if not visible:
        return EnginePlacement(rank, world_size)
    per_rank = _devices_per_rank(visible, local_rank, local_world_size, own_devices)
    start = _slot_start(visible, local_rank, local_world_size, own_devices)
    if per_rank >= tp:
        return EnginePlacement(rank, world_size, tuple(visible[start:start + tp]))
    shown = f"CUDA_VISIBLE_DEVICES={','.join(visible)}"
    if own_devices:
        raise RuntimeError(
            f"generation.tensor_parallel_size={tp} needs {tp} GPUs per vLLM engine, but each Slurm task sees only "
            f"{per_rank} ({shown}): give each task {tp} (--gpus-per-task={tp}), or launch with torchrun "
            f"(LAUNCHER=torchrun, --gpus-per-node) so a node's ranks can pool their GPUs")
    group = tp // per_rank
    if pooling_problem:
        raise RuntimeError(f"generation.tensor_parallel_size={tp} pools {group} ranks' GPUs per vLLM engine, but "
                           f"{pooling_problem}")
    if tp % per_rank or local_world_size % group:
        raise RuntimeError(
            f"generation.tensor_parallel_size={tp} does not split {local_world_size} rank(s) x {per_rank} GPU(s) of a "
            f"node ({shown}) into whole engines: use a tensor-parallel size that divides the node's "
            f"{local_world_size * per_rank} GPUs")
    if local_rank % group:
        return EnginePlacement(None, world_size // group)
    return EnginePlacement((rank if position is None else position) // group, world_size // group,
                           tuple(visible[start:start + tp]))


# What torchrun (and DeepSpeed's launcher) export for their own process group.
_LAUNCHER_RANK_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR",
                       "MASTER_PORT", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME")


def engine_environment(environ: Mapping[str, str], devices: Sequence[str]) -> dict[str, str | None]:
    """The changes to a vLLM engine's process environment (None: remove), made before anything in
    that process touches CUDA, which reads CUDA_VISIBLE_DEVICES once, when it starts:
    - the engine's GPUs only (``devices``, from place_engine; none on the CPU), as cuda:0..tp-1;
    - spawned workers, which start clean whatever this process has touched (vLLM forks by default,
      and a fork after CUDA started fails in the child);
    - none of the launcher's rank variables, so vLLM sets up its own process group; and none of
      torchrun's TORCHELASTIC_*: with TORCHELASTIC_USE_AGENT_STORE=True, torch makes every rank of a
      tcp:// rendezvous a client of a store that torchrun's agent serves on the trainer's port, so
      vLLM's tensor-parallel workers would wait on a store nobody serves for their group."""
    changes: dict[str, str | None] = {k: None for k in environ
                                      if k in _LAUNCHER_RANK_KEYS or k.startswith("TORCHELASTIC_")}
    if devices:
        changes["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
    if "VLLM_WORKER_MULTIPROC_METHOD" not in environ:
        changes["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"
    return changes


def apply_environment(changes: Mapping[str, str | None]) -> None:
    """Set this process's environment variables as ``changes`` says (None: remove)."""
    for key, value in changes.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def local_devices() -> tuple[list[str], bool]:
    """This process's visible GPUs and whether they are its own (see the functions above). Counts
    GPUs through NVML where it can (torch.cuda.device_count), so CUDA itself is not initialised: a
    process that later starts vLLM may still fork."""
    # Where CUDA_VISIBLE_DEVICES is set (always under Slurm) the count is not needed: without NVML
    # (MIG devices, no driver library) torch counts by starting CUDA.
    count = 0 if "CUDA_VISIBLE_DEVICES" in os.environ else torch.cuda.device_count()
    visible = visible_devices(os.environ, count)
    return visible, tasks_own_devices(os.environ, len(visible))


def device() -> torch.device:
    """This rank's device: its GPU (``rank_device_index``), or the CPU without one."""
    return _device_of(env())


def _device_of(e: DistEnv) -> torch.device:
    if not torch.cuda.is_available():
        return torch.device("cpu")
    visible, own = local_devices()
    return torch.device("cuda", rank_device_index(visible, e.local_rank, e.local_world_size, own))


def _set_threads(local_world_size: int) -> None:
    # On CPU, ranks on one node share its cores: N ranks each using every core oversubscribe the
    # machine and run ~100x slower. torchrun exports OMP_NUM_THREADS=1; honour an explicit value,
    # otherwise split the cores.
    if "OMP_NUM_THREADS" in os.environ:
        torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"])))
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world_size))


def init(process_group: bool = True) -> DistEnv:
    """Set this rank's threads and, when world size > 1, join the process group (gloo on CPU, nccl
    on GPU). Idempotent. Stages that must not own a process group (vLLM sets up its own) pass
    ``process_group=False`` and synchronise through files."""
    global _ENV, _GROUPS
    e = read_env()
    _set_threads(e.local_world_size)
    if process_group and e.world_size > 1 and not torch_dist.is_initialized():
        if "SLURM_PROCID" in os.environ and "RANK" not in os.environ:
            _rendezvous_from_slurm(e)
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(_device_of(e))
        timeout = datetime.timedelta(minutes=int(os.environ.get("DPO_DIST_TIMEOUT_MIN", "30")))
        # The pipeline leaves its group before evaluating and makes a new one for the next round (or
        # the next job of a sweep), in the same store: torchrun's agent keeps one for the whole job.
        # torch names every new default group alike, so without a namespace of its own a rank could
        # read the keys of the group before (NCCL's unique id: pytorch issue 119196).
        store, _, _ = next(torch_dist.rendezvous("env://", e.rank, e.world_size, timeout=timeout))
        store.set_timeout(timeout)
        store = torch_dist.PrefixStore(f"dpo_dist/group-{_GROUPS}", store)
        _GROUPS += 1
        torch_dist.init_process_group(backend=backend, store=store, rank=e.rank, world_size=e.world_size,
                                      timeout=timeout)
    _ENV = e
    return e


def _rendezvous_from_slurm(e: DistEnv) -> None:
    """srun without torchrun: the first host of the job is the rendezvous, the port from the job id."""
    if "MASTER_ADDR" not in os.environ:
        nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST", "localhost")
        os.environ["MASTER_ADDR"] = first_host(nodelist)
    os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000))
    # What torchrun would have exported: deepspeed.initialize refuses to start without LOCAL_RANK.
    # LOCAL_WORLD_SIZE too, or read_env would take every rank of the job for this node's.
    for key, value in (("RANK", e.rank), ("WORLD_SIZE", e.world_size), ("LOCAL_RANK", e.local_rank),
                       ("LOCAL_WORLD_SIZE", e.local_world_size)):
        os.environ.setdefault(key, str(value))


def first_host(nodelist: str) -> str:
    """First host of a Slurm nodelist such as 'gpu[003-005,010],cpu01' -> 'gpu003' (no scontrol needed)."""
    head = nodelist.split(",")[0] if "[" not in nodelist.split(",")[0] else nodelist[: nodelist.index("]") + 1]
    if "[" not in head:
        return head
    prefix, rng = head.split("[", 1)
    first = rng.rstrip("]").split(",")[0].split("-")[0]
    return prefix + first


def barrier() -> None:
    if torch_dist.is_initialized():
        torch_dist.barrier()


def all_reduce_sum(values: dict[str, float]) -> dict[str, float]:
    """Sum scalar metrics over ranks (float64, so sums of many values stay exact enough)."""
    if not torch_dist.is_initialized():
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    if torch.cuda.is_available():
        t = t.to(device())
    torch_dist.all_reduce(t)
    return {k: float(v) for k, v in zip(keys, t.cpu().tolist())}


def all_gather_object(obj: Any) -> list[Any]:
    """One object from every rank, in rank order (in-memory messages between our own ranks)."""
    if not torch_dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    if not torch_dist.is_initialized():
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(decide: Callable[[], T]) -> T:
    """``decide()`` run on rank 0 alone, its result given to every rank, and what it raises raised
    on every rank. For decisions about shared files: another node may see them late (NFS attribute
    caching), and one decision is followed by all; and a rank that fails alone would leave the
    others in the next collective until the timeout, where a launcher does not stop them (srun
    without --kill-on-bad-exit). Whatever stops rank 0 (an exception, SIGINT, SystemExit) reaches
    the broadcast; the other ranks get the error itself when it survives pickling, else a
    RuntimeError naming it."""
    if not torch_dist.is_initialized():
        return decide()
    outcome, error = None, None
    if read_env().rank == 0:
        try:
            outcome = (True, decide())
            pickle.dumps(outcome)  # fails here, not inside the broadcast with the others waiting
        except BaseException as e:  # noqa: BLE001 -- given to every rank, then raised on each
            error = e
            outcome = (False, _portable(e))
    ok, value = broadcast_object(outcome)
    if not ok:
        raise error if error is not None else value
    return value


def _portable(e: BaseException) -> BaseException:
    """``e`` if it comes back from pickling (an exception whose __init__ takes other arguments than
    it stores does not), else a RuntimeError with its type and text."""
    try:
        if isinstance(e, Exception):
            back = pickle.loads(pickle.dumps(e))
            if type(back) is type(e) and str(back) == str(e):
                return e
    except Exception:  # noqa: BLE001 -- any failure means: send its text
        pass
    return RuntimeError(f"rank 0: {type(e).__name__}: {e}")


def shard_range(n: int, rank: int, world_size: int) -> range:
    """A contiguous shard of n items; the first n % world_size ranks get one more."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def shutdown(clean: bool = True) -> None:
    """Tear the process group down before the interpreter exits. Exiting with a live gloo group lets
    its worker threads be destroyed during interpreter teardown, which aborts the rank (SIGABRT) with
    "terminate called without an active exception". Measured on this CPU with a 2-rank gloo job that
    all-reduces once and exits: 4 of 20 launches aborted without this teardown, 0 of 20 with it.
    ``clean``: all ranks finished, so wait for each other first; after an error there is no barrier
    (the other ranks may never arrive)."""
    global _ENV, _HF_DS_CONFIG
    if torch_dist.is_initialized():
        if clean:
            torch_dist.barrier()
        # DeepSpeed caches the world and data-parallel groups; its own destroy forgets them too, so
        # the next job in this process (a Hydra sweep with the basic launcher) does not reuse dead ones.
        ds_comm = sys.modules.get("deepspeed.comm")
        if ds_comm is not None and ds_comm.is_initialized():
            ds_comm.destroy_process_group()
        else:
            torch_dist.destroy_process_group()
    _ENV = _HF_DS_CONFIG = None


# ---------------------------------------------------------------- DeepSpeed

def _import_deepspeed():
    import deepspeed
    import deepspeed.ops

    if not torch.cuda.is_available():
        # On the CPU accelerator DeepSpeed JIT-compiles a shared-memory all-reduce kernel (1-2 min)
        # that only its inference all-reduce uses; training collectives go through gloo. deepspeed.ops
        # caches the compatible-op table in the module precisely so it can be edited: mark it absent.
        ops = deepspeed.ops.__compatible_ops__
        ops["deepspeed_shm_comm"] = False
    return deepspeed


def deepspeed_config(ds: DeepSpeedConfig, train: TrainConfig, optim: OptimConfig, world_size: int,
                     dtype: torch.dtype, load_universal: bool = False) -> dict:
    """The DeepSpeed JSON, generated from the typed config (batch sizes checked against the world).
    ``load_universal``: the engine resumes from a universal checkpoint (checkpoint.py)."""
    accum = train.accumulation_steps(world_size)
    zero: dict[str, Any] = {
        "stage": ds.stage,
        "overlap_comm": ds.overlap_comm,
        "contiguous_gradients": ds.contiguous_gradients,
        "reduce_bucket_size": ds.reduce_bucket_size,
    }
    if ds.stage <= 2:
        zero["allgather_bucket_size"] = ds.allgather_bucket_size
    if ds.stage == 3:
        zero.update({
            "stage3_prefetch_bucket_size": ds.stage3_prefetch_bucket_size,
            "stage3_param_persistence_threshold": ds.stage3_param_persistence_threshold,
            "stage3_max_live_parameters": ds.stage3_max_live_parameters,
        })
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": optim.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        # We pass torch's AdamW: on GPUs DeepSpeed would pick it anyway for a client optimizer, and on
        # the CPU it avoids compiling DeepSpeedCPUAdam for the offload variant.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        # No memory_breakdown: its see_memory_usage resets the CUDA peak counters memory.PhasePeaks reads.
        **({"checkpoint": {"load_universal": True}} if load_universal else {}),
    }


def deepspeed_local_rank(environ: Mapping[str, str], device_count: int, local_rank: int, local_world_size: int) -> int:
    """The LOCAL_RANK to show DeepSpeed: it calls ``set_device(LOCAL_RANK)`` and zero.Init places
    partitions on ``cuda:LOCAL_RANK``, so it must be this rank's device index (rank_device_index),
    which is 0, not the Slurm local id, for a task that sees only its own GPU."""
    visible = visible_devices(environ, device_count)
    return rank_device_index(visible, local_rank, local_world_size, tasks_own_devices(environ, len(visible)))


def _ensure_deepspeed_dist():
    deepspeed = _import_deepspeed()
    if torch.cuda.is_available():
        e = env()
        os.environ["LOCAL_RANK"] = str(deepspeed_local_rank(os.environ, torch.cuda.device_count(), e.local_rank,
                                                            e.local_world_size))
    if torch_dist.is_initialized():
        deepspeed.init_distributed(dist_backend=torch_dist.get_backend())
    else:
        # World size 1: DeepSpeed still wants a process group; a local one-rank group.
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
            os.environ.setdefault(key, value)
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return deepspeed


def to_universal_checkpoint(src, dst) -> None:
    """DeepSpeed's ds_to_universal: a ZeRO 1-3 checkpoint folder (one tag) -> ``dst`` in the
    universal format, which loads at any data-parallel size and ZeRO stage. One process, in this
    one: the script's worker pools would fork a rank that holds a process group. (For a large
    checkpoint, run ``python -m deepspeed.checkpoint.ds_to_universal --inject_missing_state
    --input_folder <tag dir> --output_folder <checkpoint dir>/universal/<tag>`` beforehand with
    more workers; the run then finds the folder.)"""
    import argparse

    _import_deepspeed()
    from deepspeed.checkpoint import ds_to_universal

    # inject_missing_state: the universal-checkpoint info Megatron-DeepSpeed records and we do not.
    ds_to_universal.main(argparse.Namespace(input_folder=str(src), output_folder=str(dst), num_extract_workers=1,
                                            num_merge_workers=1, keep_temp_folder=False, strict=True,
                                            inject_missing_state=True))


def zero3_inference_config(dtype: torch.dtype) -> dict:
    """DeepSpeed config for a forward-only ZeRO-3 model (the reference log-prob pass)."""
    return {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
            "bf16": {"enabled": dtype == torch.bfloat16}, "fp16": {"enabled": dtype == torch.float16},
            "steps_per_print": 1 << 30}


def build_engine(model: torch.nn.Module, optimizer, lr_scheduler, config: dict):
    deepspeed = _ensure_deepspeed_dist()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=lr_scheduler, config=config)
    if torch_dist.get_world_size() == 1 and engine.zero_optimization_stage() == 0:
        # An all-reduce over one rank would only copy every gradient into a flat bucket and back.
        # (ZeRO 1-3 move gradients into their partitions in that same call: left on for them.)
        engine.enable_backward_allreduce = False
    return engine


def release_model(model) -> None:
    """Free the weights of a model (or DeepSpeed engine) this process is done with, so the next model
    (the policy after the reference pass) has the memory; the caller then drops its references and
    calls ``free_memory``.

    An engine is destroyed first (its hooks removed) and lets go of its module. That alone does not
    free a ZeRO-3 model: DeepSpeed 0.19 leaves the top module on a module-level stack, and after a
    traced forward (the second on) something of its parameter coordinator keeps the engine alive
    (measured: tests/test_distributed.py's reference teardown). So every parameter's storage, and
    its ZeRO-3 partition, is emptied here: the memory returns whoever still holds the objects."""
    module = getattr(model, "module", None) if hasattr(model, "destroy") else model
    if module is not model and module is not None:
        model.destroy()
        model.module = None
        offload = sys.modules.get("deepspeed.runtime.zero.parameter_offload")
        stack = getattr(offload, "FWD_MODULE_STACK", None)
        if stack is not None:
            # Every submodule: non-reentrant checkpointing stops each layer's recomputation before
            # DeepSpeed's post-forward hook pops it, so layers pile up there (2 per layer per micro-batch).
            owned = {id(m) for m in module.modules()}
            stack[:] = [m for m in stack if id(m) not in owned]
    if module is None:
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            partition = getattr(tensor, "ds_tensor", None)
            if partition is not None:
                partition.data = torch.empty(0, dtype=partition.dtype, device=partition.device)
            tensor.data = torch.empty(0, dtype=tensor.dtype, device=tensor.device)


def free_memory() -> None:
    """Collect what the caller has dropped and hand the freed memory back: to the device (CUDA's
    cache) or to the kernel (glibc's free heap), so the next model (the policy after the reference
    pass) has it."""
    import gc

    from dpo_dist import memory

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    memory.release_free_heap()


def boundary_grad_norm(engine) -> float | None:
    """The gradient norm before this accumulation boundary's step, where DeepSpeed does not report it:
    at stage 0 without mixed precision it clips with that norm and discards it (ZeRO and the bf16/fp16
    optimizers keep theirs for get_global_grad_norm). Gradients are already averaged across ranks here."""
    if (engine.zero_optimization_stage() != 0 or engine.bfloat16_enabled() or engine.fp16_enabled()
            or not engine.is_gradient_accumulation_boundary()):
        return None
    norms = [torch.linalg.vector_norm(p.grad) for p in engine.module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_HF_DS_CONFIG = None


@contextlib.contextmanager
def zero3_model_loading(ds: DeepSpeedConfig, config: dict):
    """Under ZeRO-3, from_pretrained builds the model already partitioned across ranks (transformers'
    HfDeepSpeedConfig hook runs it under deepspeed.zero.Init), so no rank holds the whole model."""
    global _HF_DS_CONFIG
    if ds.stage != 3:
        yield
        return
    _ensure_deepspeed_dist()
    from transformers.integrations import HfDeepSpeedConfig

    # transformers keeps only a weak reference to this object: it must stay alive while training.
    _HF_DS_CONFIG = HfDeepSpeedConfig(config)
    yield


def end_zero3_model_loading() -> None:
    """Switch transformers' ZeRO-3 hook off again, so models loaded later (evaluation) are plain."""
    global _HF_DS_CONFIG
    _HF_DS_CONFIG = None


def full_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """The whole model's weights on CPU, on rank 0 (None elsewhere). Under ZeRO-3 parameters are
    gathered one at a time, so no rank ever holds more than one full parameter on the device."""
    module = engine.module
    if engine.zero_optimization_stage() != 3:
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()} if is_main() else None
    deepspeed = _import_deepspeed()
    state: dict[str, torch.Tensor] = {}
    for name, param in module.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            if is_main():
                state[name] = param.detach().cpu().clone()
    persistent = set(module.state_dict().keys())  # skips non-persistent buffers (rotary tables)
    for name, buf in module.named_buffers():
        if is_main() and buf is not None and name in persistent:
            state[name] = buf.detach().cpu().clone()
    return state if is_main() else None
