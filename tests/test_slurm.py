"""The Slurm scripts on a real Slurm cluster (`bash launch/slurm_local.sh start`: one node, this host).

- The shipped slurm/pipeline.sbatch runs a shortened pipeline on the bundled model with 2 CPU ranks
  (one srun step per stage, torchrun inside), writing everything into the run directory it is given.
- The same script with LAUNCHER=srun trains with one Slurm task per rank: rank and world size come
  from SLURM_PROCID/SLURM_NTASKS, no torchrun.
- A job signalled mid-training checkpoints and comes back: SIGUSR1 to the batch script (Slurm's
  time-limit warning, `--signal=B:USR1@N`) makes the script requeue the job; `scontrol requeue`
  (SIGTERM to every process, as preemption does) makes Slurm requeue it. Each attempt resumes from
  the checkpoint, and the final metrics equal those of the uninterrupted run.
- A 2x2 beta/lr Hydra sweep through hydra-submitit-launcher runs as 4 Slurm jobs, each in its own
  run directory, and `python -m dpo_dist.sweep` tabulates the 4 runs.
- Two rounds run as srun steps, each step deriving its round's settings; a two-seed sweep of two
  rounds runs under `srun -n 2` without torchrun, a process group per round in each task.

Without `sbatch` these tests skip, unless DPO_DIST_REQUIRE_SLURM=1 (CI), where they fail.
"""

import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from dpo_dist.artifacts import read_jsonl
from launch import REPO, metrics, stage_env, write_identity_pairs
from test_pipeline import SHORT as PIPELINE_SHORT

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
SBATCH = REPO / "slurm" / "pipeline.sbatch"
# The shortened pipeline of tests/test_pipeline.py (one definition of "shortened" for both).
SHORT = [*PIPELINE_SHORT, "wandb.mode=disabled"]
# 8 steps of global batch 2 on 2 ranks, a checkpoint every 2 steps; dpo, no warmup, so every step moves.
TRAIN = ["loss=dpo", "optim.lr=2e-5", "optim.warmup_ratio=0", "train.global_batch_size=2", "train.micro_batch_size=1",
         "train.max_steps=8", "train.save_every=2", "data.max_length=96", "data.max_prompt_length=64", "wandb.mode=disabled"]
FINAL = ("loss", "rewards/margins", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected")
DONE_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


@pytest.fixture(scope="module", autouse=True)
def cluster():
    problem = None
    if not shutil.which("sbatch"):
        problem = "no sbatch on PATH"
    elif subprocess.run(["scontrol", "ping"], capture_output=True).returncode != 0:
        problem = "slurmctld is not answering (`scontrol ping`)"
    if problem:
        if os.environ.get("DPO_DIST_REQUIRE_SLURM") == "1":
            pytest.fail(f"{problem}: start the local cluster with `bash launch/slurm_local.sh start`")
        pytest.skip(f"{problem} (`bash launch/slurm_local.sh start` runs a one-node cluster here)")


def prune(path) -> None:
    """Drop what a finished run no longer needs here: DeepSpeed checkpoints (~1.6 GB each for the
    bundled model with AdamW state) and the exported model; keep the summaries, metrics and logs."""
    for big in [*path.rglob("checkpoints"), *path.rglob("final")]:
        shutil.rmtree(big, ignore_errors=True)


@pytest.fixture(autouse=True)
def prune_after_test(tmp_path):
    yield
    prune(tmp_path)


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    return write_identity_pairs(tmp_path_factory.mktemp("pairs") / "pairs.jsonl")


def submit(log, sbatch_options, overrides, **env) -> str:
    """`sbatch slurm/pipeline.sbatch` from the repository root, as a user submits it; the job id."""
    proc = subprocess.run(["sbatch", "--parsable", f"--output={log}", *sbatch_options, str(SBATCH), *overrides],
                          cwd=REPO, env=dict(stage_env(2), **env), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def submit_srun_sweep(tmp_path, command: list[str], args: list[str], **env) -> tuple[str, object]:
    """`sbatch -n 2` of a script whose one step is `srun -n 2 --kill-on-bad-exit=1 <command> <args>`
    (one Slurm task per rank, no torchrun); the job id and its log."""
    import shlex

    script, log = tmp_path / "sweep.sh", tmp_path / "sweep.out"
    script.write_text(f"#!/bin/bash\nsrun -n 2 --kill-on-bad-exit=1 {' '.join(command)} "
                      f"{' '.join(shlex.quote(a) for a in args)}\n")
    proc = subprocess.run(["sbatch", "--parsable", "-n", "2", "--cpus-per-task=1", f"--output={log}", str(script)],
                          cwd=REPO, env=stage_env(2) | env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0], log


def job_info(job_id: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_for(job_id: str, log, timeout: float) -> dict:
    deadline = time.time() + timeout
    while (info := job_info(job_id)).get("JobState") not in DONE_STATES:
        if time.time() > deadline:
            subprocess.run(["scancel", job_id])
            pytest.fail(f"job {job_id} still {info.get('JobState')} after {timeout:.0f}s:\n{tail(log)}")
        time.sleep(2)
    return info


def wait_until(condition, job_id: str, log, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not condition():
        state = job_info(job_id).get("JobState")
        assert state not in DONE_STATES, f"job {job_id} ended ({state}) before {what}:\n{tail(log)}"
        assert time.time() < deadline, f"no {what} after {timeout:.0f}s:\n{tail(log)}"
        time.sleep(0.5)


def tail(log, n: int = 6000) -> str:
    return log.read_text()[-n:] if log.is_file() else "(no log)"


def assert_completed(info: dict, log) -> None:
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info.get('JobState')} {info.get('ExitCode')}:\n{tail(log)}"


def latest_checkpoint(run_dir) -> int:
    latest = run_dir / "train" / "checkpoints" / "latest"
    m = re.match(r"step-(\d+)", latest.read_text().strip()) if latest.is_file() else None
    return int(m.group(1)) if m else 0


def test_sbatch_pipeline_two_ranks(tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    job = submit(log, ["--cpus-per-task=2"], SHORT, NPROC_PER_NODE="2", RUN_DIR=str(run_dir))
    assert_completed(wait_for(job, log, timeout=1800), log)
    out = log.read_text()
    assert f"job {job} attempt 1" in out and "1 node(s) x 2 rank(s) via torchrun" in out
    for stage in ("generate", "judge", "train", "evaluate"):
        assert f"stage {stage}" in out
    assert "pipeline.sbatch: done" in out

    gen = json.loads((run_dir / "generate" / "manifest.json").read_text())
    assert gen["num_prompts"] >= 24  # 24 identity prompts, plus the general ones SHORT mixes in
    pairs = (run_dir / "judge" / "pairs.jsonl").read_text().splitlines()
    assert len(pairs) >= 4
    assert (run_dir / "reference" / "logps.safetensors").stat().st_size > 0
    summary = json.loads((run_dir / "train" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] >= 1
    assert all(k in summary["metrics"] for k in FINAL)
    assert (run_dir / "train" / "final" / "model.safetensors").is_file()  # checked before prune_after_test
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    assert set(report["trained"]) == {"default", "neutral", "none"}
    assert all(m["n_identity"] == 6 for m in report["trained"].values())


def test_sbatch_runs_each_round_as_srun_steps(tmp_path):
    """rounds.num=2: each round's stages as steps of their own (pipeline entry, rounds.only=<k>), round 2
    sampling from round 1's exported policy. Each step derives its round's settings itself, round 2's
    own ones (`rounds.later`: one training step, shorter answers) included, and its prompts from a
    general pool round 1 left half used up: round 2 takes the 3 fresh ones, then 3 of round 1's,
    never the evaluation's."""
    from test_rounds import MECHANICS, TWO_ROUNDS

    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    later = "rounds.later=[train.max_steps:1,generation.max_new_tokens:24]"
    # 12 general prompts: the evaluation's 3 (eval.num_general), 6 for round 1 (4 + 2 leak), 3 left.
    pool = tmp_path / "general.jsonl"
    pool.write_text("".join((REPO / "dpo_dist" / "prompts" / "general.jsonl").read_text().splitlines(keepends=True)[:12]))
    job = submit(log, ["--cpus-per-task=2"], [*MECHANICS, *TWO_ROUNDS, later, f"prompts.general={pool}", "wandb.mode=disabled"],
                 NPROC_PER_NODE="1", RUN_DIR=str(run_dir))
    assert_completed(wait_for(job, log, timeout=1800), log)
    out = log.read_text()
    assert "2 rounds" in out and "pipeline.sbatch: done" in out
    steps = re.findall(r"pipeline\.sbatch: (round \d stage \w+)", out)
    assert steps == [f"round {k} stage {s}" for k in (1, 2) for s in ("generate", "judge", "train", "evaluate")], steps
    gen = json.loads((run_dir / "round-2" / "generate" / "manifest.json").read_text())
    assert gen["model"] == str(run_dir / "round-1" / "train" / "final")
    assert [r["round"] for r in json.loads((run_dir / "rounds.json").read_text())["rounds"]] == [1, 2]
    steps = [json.loads((run_dir / f"round-{k}" / "train" / "summary.json").read_text())["steps"] for k in (1, 2)]
    assert steps == [2, 1], steps
    rows = [read_jsonl(run_dir / f"round-{k}" / "generate" / "candidates.jsonl") for k in (1, 2)]
    lengths = [[c["num_tokens"] for r in round_rows for c in r["candidates"]] for round_rows in rows]
    assert max(lengths[0]) > 24 >= max(lengths[1]), lengths
    assert gen["sampling"]["max_new_tokens"] == 24
    general = [{r["question"] for r in round_rows if r["source"] in ("general", "leak")} for round_rows in rows]
    evaluated = {json.loads(line)["prompt"] for line in pool.read_text().splitlines()[:3]}
    assert len(general[0]) == len(general[1]) == 6 and len(general[1] - general[0]) == 3, general
    assert not (general[0] | general[1]) & evaluated
    # the fresh prompts come first in the slice, so round 2's 2 leak prompts are fresh ones
    assert {r["question"] for r in rows[1] if r["source"] == "leak"} <= general[1] - general[0]
    assert "round 2 trains again on 3 of its 6 general prompts" in out, out[-3000:]

STAND_IN = """#!/bin/bash
# The real interpreter for the script's config reads (the planner's lead time, the number of rounds);
# for any stage, a process that records when SIGUSR1 reaches it and exits as a preempted training
# run does (124).
[[ $2 == dpo_dist.plan || $2 == dpo_dist.rounds || " $* " == *" --cfg job "* ]] && exec {python} "$@"
trap 'date +%s.%N >> {marks}; exit 124' USR1
while true; do sleep 0.2; done
"""


def test_time_limit_warning_comes_the_configured_lead_before_the_limit(tmp_path):
    """pipeline.sbatch asks `python -m dpo_dist.plan` for the lead time of this config (one step + one
    save + margin, plan.* keys among the job's overrides) and sends itself SIGUSR1 that long before the
    job's --time, which the running step receives; then the job is requeued. The stage is a stand-in
    (PYTHON is a script running the real planner, and for the stage waiting for SIGUSR1): the cluster's
    time limit is real but no model loads. A training stage's own answer to SIGUSR1 is tested below."""
    from dpo_dist import plan
    from dpo_dist.config import compose

    python, marks, log = tmp_path / "python", tmp_path / "signalled", tmp_path / "job.out"
    python.write_text(STAND_IN.format(python=sys.executable, marks=marks))
    python.chmod(0o755)
    # One round: the stage runs as itself (python -m dpo_dist.train), as a one-round job's stages do.
    overrides = ["plan.step_seconds=20", "plan.signal_margin_seconds=47.5", "rounds.num=1"]
    cfg = compose([*overrides, "plan.nodes=1", "plan.gpus_per_node=1", "plan.device=cpu"])
    lead = plan.checkpoint_save(plan.Architecture.of(cfg.model), plan.Setup.of(cfg, runtime_gib=0.0), cfg.plan).lead_seconds
    assert 60 < lead < 100  # 20 s + the bundled model's 1.6 GB at 0.5 GB/s + 47.5 s: the signal ~45 s into 2 min

    job = submit(log, ["--time=2", "--ntasks-per-node=1", "--cpus-per-task=1"], overrides, LAUNCHER="srun",
                 STAGES="train", RUN_DIR=str(tmp_path / "run"), PYTHON=str(python))
    wait_until(lambda: job_info(job).get("JobState") == "RUNNING", job, log, 300, "the job starting")
    end = datetime.datetime.fromisoformat(job_info(job)["EndTime"]).timestamp()  # start + --time
    try:
        wait_until(lambda: "requeueing job" in tail(log), job, log, 150, "SIGUSR1 and a requeue")
    finally:
        subprocess.run(["scancel", job])
    out = log.read_text()
    assert f"time-limit warning (SIGUSR1) {lead}s before the limit" in out, out
    assert "pipeline.sbatch: stage train (" in out and ", 2 rounds" not in out, out
    signalled = float(marks.read_text().split()[0])
    assert end - signalled == pytest.approx(lead, abs=5), (end - signalled, lead)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, pairs_file):
    """Training alone, one Slurm task per rank (LAUNCHER=srun): no torchrun, rank from SLURM_PROCID."""
    base = tmp_path_factory.mktemp("srun")
    run_dir, log = base / "run", base / "job.out"
    job = submit(log, ["--ntasks-per-node=2", "--cpus-per-task=1"], [f"data.pairs={pairs_file}", *TRAIN],
                 LAUNCHER="srun", STAGES="train", RUN_DIR=str(run_dir))
    info = wait_for(job, log, timeout=1200)
    steps = [r["step"] for r in metrics(run_dir)] if (run_dir / "train" / "metrics.jsonl").is_file() else []
    prune(base)  # its summary and metrics are all the other tests read
    return {"info": info, "log": log, "run_dir": run_dir, "steps": steps}


def test_srun_tasks_take_rank_and_world_from_slurm(uninterrupted):
    assert_completed(uninterrupted["info"], uninterrupted["log"])
    out = uninterrupted["log"].read_text()
    assert "1 node(s) x 2 rank(s) via srun" in out and "torchrun.sh" not in out
    summary = json.loads((uninterrupted["run_dir"] / "train" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 8
    assert uninterrupted["steps"] == list(range(1, 9))


def test_the_batch_shell_is_one_process_and_each_srun_task_a_rank(tmp_path):
    """`sbatch -n 2`: its script's shell has SLURM_PROCID=0 and SLURM_NTASKS=2 but is one process, so
    a stage started there must not wait for a second rank; the tasks of an srun step are the ranks."""
    script, probe, log = tmp_path / "ranks.sh", tmp_path / "probe.py", tmp_path / "ranks.out"
    probe.write_text("import sys\nfrom dpo_dist import dist\ne = dist.read_env()\n"
                     "print(f'{sys.argv[1]}: rank {e.rank} of {e.world_size}')\n")
    script.write_text(f"#!/bin/bash\n{sys.executable} {probe} shell\nsrun -n 2 {sys.executable} {probe} task\n")
    # The probe runs as a script, whose own directory leads sys.path: the package comes from REPO, as
    # for `python -m` in REPO, not from whichever checkout an editable install points at.
    proc = subprocess.run(["sbatch", "--parsable", "-n", "2", "--cpus-per-task=1", f"--output={log}", str(script)],
                          cwd=REPO, env=dict(stage_env(2), PYTHONPATH=str(REPO)), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert_completed(wait_for(proc.stdout.strip().split(";")[0], log, timeout=300), log)
    lines = sorted(line for line in log.read_text().splitlines() if line.startswith(("shell:", "task:")))
    assert lines == ["shell: rank 0 of 1", "task: rank 0 of 2", "task: rank 1 of 2"], log.read_text()[-3000:]


def test_a_pipeline_sweep_under_srun_without_torchrun_gives_each_round_its_own_process_group(tmp_path):
    """`srun -n 2 python -m dpo_dist.pipeline -m ...`, two seeds of two rounds: each task runs the jobs
    one after another, and each round of each job makes its process group anew (four in a task),
    rank 0's TCP store on the same port (from the job id) as the group before it. torch's env://
    rendezvous shares one store server per port within a process, so a later group finds the
    earlier ones' keys: without a namespace of its own per group (dist.init's PrefixStore) its ranks
    read an old group's (planted, training alone: a job hung once, failed once on a gloo read
    error). The collective timeout is cut to 2 min so that a hang fails in minutes, not at the
    test's limit."""
    from test_rounds import MECHANICS, TWO_ROUNDS

    sweep_dir = tmp_path / "sweep"
    job, log = submit_srun_sweep(tmp_path, [sys.executable, "-m", "dpo_dist.pipeline"],
                                 ["-m", f"hydra.sweep.dir={sweep_dir}", *MECHANICS, *TWO_ROUNDS, "generation.seed=0,1",
                                  "train.seed=${generation.seed}", "wandb.mode=disabled"], DPO_DIST_TIMEOUT_MIN="2")
    assert_completed(wait_for(job, log, timeout=2400), log)
    for seed in (0, 1):
        job = sweep_dir / str(seed)
        assert [r["round"] for r in json.loads((job / "rounds.json").read_text())["rounds"]] == [1, 2]
        gen = json.loads((job / "round-2" / "generate" / "manifest.json").read_text())
        assert gen["model"] == str(job / "round-1" / "train" / "final") and gen["world_size"] == 2
        for k in (1, 2):
            summary = json.loads((job / f"round-{k}" / "train" / "summary.json").read_text())
            assert summary["world_size"] == 2 and summary["steps"] == 2, summary
        assert f"- generation.seed={seed}\n" in (job / ".hydra" / "overrides.yaml").read_text()
    table = subprocess.run([sys.executable, "-m", "dpo_dist.sweep", str(sweep_dir)], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout
    assert "2 runs, 2 finished." in table, table


@pytest.mark.parametrize("fail_rank", [0, 1])
def test_a_job_failed_on_one_srun_task_ends_the_sweep_on_every_task(tmp_path, pairs_file, fail_rank):
    """A training sweep under `srun -n 2 --kill-on-bad-exit=1` without torchrun (one Slurm task per
    rank), whose first job fails on one task alone, mid-step (tests/test_launch.py's runner): that
    task exits instead of starting the second job, and srun stops the other, blocked in the same
    step as a rank in an NCCL collective would be. Rank 0 failing is the case torchrun's test does
    not cover: it is the rank that holds the process group's TCP store. Without the exit
    (cli.stop_the_sweep; planted) the failed task starts the second job; without
    --kill-on-bad-exit (planted) the other task blocks on. The collective timeout is 5 min, so
    that a step stopped by srun is told from one ended by the timeout."""
    from test_launch import ONE_RANK_FAILS

    runner, sweep_dir = tmp_path / "runner.py", tmp_path / "sweep"
    runner.write_text(ONE_RANK_FAILS)
    job, log = submit_srun_sweep(tmp_path, [sys.executable, str(runner)],
                                 ["-m", f"hydra.sweep.dir={sweep_dir}", "loss.beta=0.05,0.1", f"data.pairs={pairs_file}",
                                  *TRAIN, "train.max_steps=1"],
                                 DPO_DIST_TIMEOUT_MIN="5", PYTHONPATH=str(REPO), FAIL_RANK=str(fail_rank))
    info = wait_for(job, log, timeout=900)
    out = log.read_text()
    assert info["JobState"] == "FAILED", f"{info.get('JobState')} {info.get('ExitCode')}:\n{out[-4000:]}"
    assert not (sweep_dir / "1").exists(), f"a task started the second job:\n{out[-4000:]}"
    assert any(f"[rank {fail_rank}]" in line and "this job failed on this rank; ending the sweep here" in line
               for line in out.splitlines()), out[-4000:]
    assert f"CUDA out of memory (planted on rank {fail_rank})" in out
    assert re.search(rf"task {1 - fail_rank}: (Terminated|Killed)", out), out[-4000:]  # srun signalled the other task
    # Stopped by srun, not by the 5-min timeout: the job's own run time, its wait in the queue apart.
    ran = (datetime.datetime.fromisoformat(info["EndTime"]) - datetime.datetime.fromisoformat(info["StartTime"]))
    assert ran.total_seconds() < 240, f"ran {ran}:\n{out[-4000:]}"


def test_signalled_job_checkpoints_requeues_and_resumes_to_the_same_metrics(tmp_path, pairs_file, uninterrupted):
    """Attempt 1 gets SIGUSR1 (as from `--signal=B:USR1@N`) after its first checkpoint: the script
    requeues the job. Attempt 2 is requeued by `scontrol requeue` after its next checkpoint: Slurm
    SIGTERMs every process, training checkpoints within KillWait, Slurm requeues. Attempt 3 finishes."""
    assert_completed(uninterrupted["info"], uninterrupted["log"])
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    job = submit(log, ["--cpus-per-task=2"], [f"data.pairs={pairs_file}", *TRAIN],
                 NPROC_PER_NODE="2", STAGES="train", RUN_DIR=str(run_dir))

    wait_until(lambda: latest_checkpoint(run_dir) >= 2, job, log, 900, "first checkpoint")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    wait_until(lambda: "attempt 2" in tail(log, 10**6), job, log, 600, "second attempt after SIGUSR1")
    first_stop = latest_checkpoint(run_dir)
    assert 2 < first_stop < 8, f"SIGUSR1 did not stop training between checkpoints (latest step {first_stop})"

    wait_until(lambda: latest_checkpoint(run_dir) > first_stop, job, log, 900, "a checkpoint in attempt 2")
    before_requeue = latest_checkpoint(run_dir)
    subprocess.run(["scontrol", "requeue", job], check=True)
    info = wait_for(job, log, timeout=1200)
    assert_completed(info, log)
    assert info["Restarts"] == "2"

    out = log.read_text()
    assert "requeueing job" in out  # attempt 1: the script's own requeue after SIGUSR1
    assert "received SIGUSR1: checkpointing" in out and "received SIGTERM: checkpointing" in out
    # Every rank logs where it resumed; one entry per attempt.
    resumed = list(dict.fromkeys(int(s) for s in re.findall(r"resumed from \S*step-(\d+)", out)))
    # Attempt 3 resumes from the checkpoint written on SIGTERM, not from the last periodic one.
    assert len(resumed) == 2 and resumed[0] == first_stop and before_requeue < resumed[1] < 8, (resumed, before_requeue)
    # Every step ran exactly once: neither attempt started over from step 0.
    steps = [r["step"] for r in metrics(run_dir)]
    assert steps == list(range(1, 9)), steps
    final = json.loads((run_dir / "train" / "summary.json").read_text())["metrics"]
    expected = json.loads((uninterrupted["run_dir"] / "train" / "summary.json").read_text())["metrics"]
    for key in FINAL:
        assert final[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-5), key


def test_submitit_sweep_runs_four_jobs_and_tabulates_them(tmp_path, pairs_file):
    if os.environ.get("DPO_DIST_REQUIRE_SLURM") != "1":
        pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install -e .[slurm]")
    sweep_dir = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "dpo_dist.train", "-m", "hydra/launcher=submitit_slurm",
           "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=30", f"hydra.sweep.dir={sweep_dir}",
           "loss.beta=0.05,0.1", "optim.lr=1e-6,2e-6", f"data.pairs={pairs_file}", "loss=dpo",
           "train.global_batch_size=2", "train.micro_batch_size=1", "train.max_steps=2", "data.max_length=96",
           "data.max_prompt_length=64", "wandb.mode=disabled"]
    proc = subprocess.run(cmd, cwd=REPO, env=stage_env(2), capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    # One Slurm array of four tasks (submitit keeps a folder per task: <array id>_<index>), each
    # job in its own run directory.
    tasks = [d.name for d in (sweep_dir / ".submitit").iterdir() if re.fullmatch(r"\d+_\d+", d.name)]
    assert sorted(t.split("_")[1] for t in tasks) == ["0", "1", "2", "3"], tasks
    for job in range(4):
        summary = json.loads((sweep_dir / str(job) / "train" / "summary.json").read_text())
        assert summary["steps"] == 2 and summary["world_size"] == 1

    table = subprocess.run([sys.executable, "-m", "dpo_dist.sweep", str(sweep_dir)], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout
    rows = [line for line in table.splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(rows) == 4 and "4 runs, 4 finished." in table
    assert "| job | loss.beta | optim.lr |" in table
    got = json.loads(subprocess.run([sys.executable, "-m", "dpo_dist.sweep", str(sweep_dir), "--json"], cwd=REPO,
                                    capture_output=True, text=True, check=True).stdout)
    # Hydra writes the swept values back as it parsed them ("1e-06"): compare numbers.
    margin = {(float(r["overrides"]["loss.beta"]), float(r["overrides"]["optim.lr"])): r["metrics"]["rewards/margins"]
              for r in got}
    assert set(margin) == {(0.05, 1e-6), (0.05, 2e-6), (0.1, 1e-6), (0.1, 2e-6)}
    # Each job trained with its own settings (not one run copied four times): after one update the
    # margin grows with the learning rate at either beta.
    assert margin[(0.05, 2e-6)] > margin[(0.05, 1e-6)] and margin[(0.1, 2e-6)] > margin[(0.1, 1e-6)]
