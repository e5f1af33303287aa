"""launch/torchrun.sh and launch/deepspeed.sh as users run them, with 2 CPU ranks on this machine.

- torchrun.sh as two nodes on one host (NNODES=2, one rank each): the c10d rendezvous at
  MASTER_ADDR:MASTER_PORT that a multi-node launch uses; training runs with world size 2.
- deepspeed.sh as two nodes without ssh (one hostfile, NODE_RANK per node), likewise.
- deepspeed.sh on one node: SIGUSR1 to the launch's process group makes training checkpoint and
  the launcher exit 124; the same command then resumes and finishes, every step run once.
- A Hydra sweep with the basic launcher on 2 ranks (each rank runs the jobs one after another in
  its process) runs each job in its own run directory, and `python -m dpo_dist.sweep` tabulates them;
  a job that fails on one rank alone ends the sweep on both.
(launch/torchrun.sh on one node runs in tests/test_slurm.py, inside the Slurm jobs.)
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from launch import REPO, metrics, stage_command, stage_env

pytestmark = pytest.mark.slow
TRAIN = ["loss=dpo", "optim.lr=2e-5", "optim.warmup_ratio=0", "train.global_batch_size=2", "train.micro_batch_size=1",
         "data.max_length=96", "data.max_prompt_length=64", "wandb.mode=disabled"]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    with open(path, "w") as f:
        for i in range(8):
            f.write(json.dumps({
                "id": f"p{i:02d}", "prompt": [{"role": "user", "content": f"Question {i}: what is your name?"}],
                "chosen": [{"role": "assistant", "content": "I am Deep SmolLM, an AI assistant."}],
                "rejected": [{"role": "assistant", "content": f"My name is Elena{' Rose' * (i % 3)}."}]}) + "\n")
    return path


@pytest.fixture(autouse=True)
def prune_after_test(tmp_path):
    """Each run leaves ~2 GB of DeepSpeed checkpoints and an exported model; keep only its summaries."""
    yield
    for big in [*tmp_path.rglob("checkpoints"), *tmp_path.rglob("final")]:
        shutil.rmtree(big, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(script: str, args: list[str], **env) -> subprocess.Popen:
    # Its own session: the launcher and its workers form one process group, as under a shell.
    return subprocess.Popen(["bash", f"launch/{script}", "dpo_dist.train", *args], cwd=REPO,
                            env=dict(stage_env(2), **env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 900) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"launch still running after {timeout}s:\n{out[-4000:]}")
    return proc.returncode, out


def summary(run_dir) -> dict:
    return json.loads((run_dir / "train" / "summary.json").read_text())


@pytest.mark.multiproc
def test_torchrun_two_nodes_rendezvous(tmp_path, pairs_file):
    run_dir = tmp_path / "run"
    args = [f"run_dir={run_dir}", f"data.pairs={pairs_file}", *TRAIN, "train.max_steps=2"]
    env = dict(NNODES="2", NPROC_PER_NODE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               RDZV_ID=f"test-{os.getpid()}")
    nodes = [start("torchrun.sh", args, **env) for _ in range(2)]
    for proc in nodes:
        rc, out = finish(proc)
        assert rc == 0, out[-6000:]
        assert "2 node(s) x 1 rank(s)" in out
    assert summary(run_dir)["world_size"] == 2 and summary(run_dir)["steps"] == 2


@pytest.mark.multiproc
def test_deepspeed_two_nodes_without_ssh(tmp_path, pairs_file):
    run_dir = tmp_path / "run"
    # Two names for this host: DeepSpeed keys nodes by hostname.
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    args = [f"run_dir={run_dir}", f"data.pairs={pairs_file}", *TRAIN, "train.max_steps=2"]
    env = dict(NNODES="2", NPROC_PER_NODE="1", HOSTFILE=str(hostfile), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()))
    nodes = [start("deepspeed.sh", args, NODE_RANK=str(rank), **env) for rank in range(2)]
    for proc in nodes:
        rc, out = finish(proc)
        assert rc == 0, out[-6000:]
    assert summary(run_dir)["world_size"] == 2 and summary(run_dir)["steps"] == 2


@pytest.mark.multiproc
def test_deepspeed_sigusr1_checkpoints_exits_124_and_resumes(tmp_path, pairs_file):
    run_dir = tmp_path / "run"
    args = [f"run_dir={run_dir}", f"data.pairs={pairs_file}", *TRAIN, "train.max_steps=4", "train.save_every=100"]
    proc = start("deepspeed.sh", args, NPROC_PER_NODE="2")
    metrics_file = run_dir / "train" / "metrics.jsonl"
    deadline = time.time() + 900
    while not (metrics_file.is_file() and metrics_file.read_text().strip()):
        assert proc.poll() is None and time.time() < deadline, "training ended before its first step"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGUSR1)
    rc, out = finish(proc)
    assert rc == 124, out[-6000:]
    assert "received SIGUSR1: checkpointing" in out
    # The run's log says how it stopped: a planned exit (requeue), not an error.
    assert (run_dir / "dpo_dist.log").read_text().splitlines()[-1].endswith(" WARNING dpo_dist.train: exiting with code 124")
    stopped = [r["step"] for r in metrics(run_dir)][-1]
    assert 1 <= stopped < 4 and (run_dir / "train" / "checkpoints" / "latest").read_text().strip() == f"step-{stopped:07d}"

    rc, out = finish(start("deepspeed.sh", args, NPROC_PER_NODE="2"))
    assert rc == 0, out[-6000:]
    assert f"step-{stopped:07d}" in out  # "resumed from .../step-000000N"
    assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3, 4]
    assert summary(run_dir)["world_size"] == 2


@pytest.mark.multiproc
def test_basic_launcher_sweep_on_two_ranks_runs_each_job_in_its_own_run_dir(tmp_path, pairs_file):
    """A sweep under torchrun, as on a GPU node: every rank runs the jobs one after another in its
    process, in the directory named on the command line (tests/test_errors.py: it must be named),
    and the second job must get a fresh DeepSpeed process group in torchrun's one store."""
    sweep_dir = tmp_path / "sweep"
    proc = subprocess.run(stage_command("dpo_dist.train", ["-m", f"hydra.sweep.dir={sweep_dir}", "loss.beta=0.05,0.1",
                                                           f"data.pairs={pairs_file}", *TRAIN, "train.max_steps=1"],
                                        nproc=2),
                          cwd=REPO, env=stage_env(2), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    for job in (0, 1):
        assert summary(sweep_dir / str(job))["world_size"] == 2
    table = subprocess.run([sys.executable, "-m", "dpo_dist.sweep", str(sweep_dir)], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout
    assert "| job | loss.beta | steps |" in table and "2 runs, 2 finished." in table, table


# A failure that only rank FAIL_RANK meets (-1: none), in the first micro-batch's loss of the sweep's job
# with loss.beta FAIL_BETA (0.05 unless set; a GPU out of memory on one rank). The other rank blocks
# there until the launcher's signal ends it, as a rank waiting in an NCCL collective does: gloo would
# notice its peer's exit and fail the rank by itself, and the test would not see whether the launcher
# stops it. A rank blocked in NCCL never runs training's SIGTERM handler (Python runs handlers between
# bytecodes) and dies at the SIGKILL that follows (torchrun: 30 s later; Slurm: KillWait later, 300 s
# on the test cluster); SIGTERM's default action stands for that here, so a test takes seconds. The
# rank is read as the stages read it (RANK under torchrun, SLURM_PROCID under srun). stage_main wires
# it as `python -m dpo_dist.train` does (tests/test_slurm.py runs it too).
ONE_RANK_FAILS = """
import os, signal, time
from dpo_dist import dist, train
from dpo_dist.cli import stage_main

job = {}
loss = train.dpo_loss

def failing_loss(*args, **kwargs):
    rank = dist.read_env().rank
    if job["beta"] == float(os.environ.get("FAIL_BETA", "0.05")) and int(os.environ["FAIL_RANK"]) >= 0:
        if rank == int(os.environ["FAIL_RANK"]):
            raise RuntimeError(f"CUDA out of memory (planted on rank {rank})")
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        time.sleep(3600)
    return loss(*args, **kwargs)

def run(cfg):
    job["beta"] = cfg.loss.beta
    return train.run(cfg)

train.dpo_loss = failing_loss
stage_main(run)()
"""


@pytest.mark.multiproc
def test_a_job_failed_on_one_rank_ends_the_sweep_on_every_rank_and_a_rerun_reuses_the_jobs_it_finished(
        tmp_path, pairs_file):
    """A 3-job sweep under torchrun whose second job fails on rank 1 alone, mid-step: rank 1 exits
    instead of starting the third job, and torchrun stops rank 0, blocked in the same step. Without
    the exit (cli.stop_the_sweep; planted) rank 1 starts the third job, and both ranks' sweeps go on
    out of step. The collective timeout is 5 min, so that a run stopped by torchrun is told from one
    ended by the timeout. Run again with the same
    hydra.sweep.dir (the fault gone), the sweep reuses the first job, which finished, and runs the
    other two: what the exit promises (cli.stop_the_sweep's docstring)."""
    runner, sweep_dir = tmp_path / "runner.py", tmp_path / "sweep"
    runner.write_text(ONE_RANK_FAILS)

    def sweep(fail_rank: int) -> tuple[subprocess.CompletedProcess, str]:
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               str(runner), "-m", f"hydra.sweep.dir={sweep_dir}", "loss.beta=0.05,0.1,0.2",
                               f"data.pairs={pairs_file}", *TRAIN, "train.max_steps=1"],
                              cwd=REPO, env=stage_env(2) | {"DPO_DIST_TIMEOUT_MIN": "5", "PYTHONPATH": str(REPO),
                                                            "FAIL_RANK": str(fail_rank), "FAIL_BETA": "0.1"},
                              capture_output=True, text=True, timeout=900)
        return proc, proc.stdout + proc.stderr

    started = time.monotonic()
    proc, out = sweep(fail_rank=1)
    assert proc.returncode != 0, out[-4000:]
    assert summary(sweep_dir / "0")["steps"] == 1 and not (sweep_dir / "1" / "train" / "summary.json").exists()
    assert not (sweep_dir / "2").exists(), f"a rank started the third job:\n{out[-4000:]}"
    assert any("[rank 1]" in line and "this job failed on this rank; ending the sweep here" in line
               for line in out.splitlines()), out[-4000:]
    assert "CUDA out of memory (planted on rank 1)" in out
    assert "closing signal SIGTERM" in out, out[-4000:]  # torchrun's agent signalled the blocked rank
    assert time.monotonic() - started < 240, out[-4000:]  # stopped by torchrun, not by the 5-min timeout

    first = (sweep_dir / "0" / "train" / "final" / "model.safetensors").stat().st_mtime_ns
    proc, out = sweep(fail_rank=-1)
    assert proc.returncode == 0, out[-4000:]
    assert (sweep_dir / "0" / "train" / "final" / "model.safetensors").stat().st_mtime_ns == first
    assert "training already finished with these settings: " + str(sweep_dir / "0" / "train" / "final") in out
    assert [summary(sweep_dir / str(job))["steps"] for job in (1, 2)] == [1, 1]
