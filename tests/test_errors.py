"""Errors a user causes, met as a new user meets them: a stage prints one line naming the key, the
file (and the line of a bad byte) and exits 2, without a Python traceback; bugs keep theirs, and
DPO_DIST_TRACEBACK=1 shows it for user errors too. Under torchrun one rank reports, not every one."""

import os
import subprocess
import sys
from unittest import mock

import pytest

from dpo_dist import cli, dist
from dpo_dist.artifacts import DataError, read_json, read_jsonl
from dpo_dist.config import ConfigError
from launch import REPO, stage_command, stage_env


def _run(module: str, overrides: list[str], nproc: int = 1, **env) -> subprocess.CompletedProcess:
    return subprocess.run(stage_command(module, overrides, nproc), cwd=REPO, env={**stage_env(nproc), **env},
                          capture_output=True, text=True, timeout=300)


def _one_error_line(proc: subprocess.CompletedProcess, prog: str) -> str:
    """The user-error line, checked to be the only one, with exit status 2 and no traceback."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == cli.EXIT_USER_ERROR, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    lines = [line for line in proc.stderr.splitlines() if ": error: " in line]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), out[-3000:]
    return lines[0]


def test_training_without_its_pairs_file_names_the_key_and_the_file(tmp_path):
    missing = tmp_path / "no-such-pairs.jsonl"
    line = _one_error_line(_run("dpo_dist.train", [f"run_dir={tmp_path / 'run'}", f"data.pairs={missing}"]),
                           "dpo_dist.train")
    assert f"data.pairs='{missing}': no such file" in line


def test_a_prompts_file_that_is_not_utf8_names_the_key_the_file_and_the_line(tmp_path, tiny_llama):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_bytes(b'{"id": "a", "prompt": "Who are you?"}\n{"id": "b", "prompt": "Hi"}\n'
                        b'{"id": "c", "prompt": "Caf\xe9?"}\n')  # Latin-1, not UTF-8
    proc = _run("dpo_dist.generate", [f"run_dir={tmp_path / 'run'}", f"model.path={tiny_llama}", "generation=hf",
                                      f"prompts.train={prompts}"])
    line = _one_error_line(proc, "dpo_dist.generate")
    assert f"prompts.train: {prompts}:3: not UTF-8 text (byte 0xe9 at column 27)" in line


@pytest.mark.parametrize("override,named", [
    ("loss.bta=0.1", "Key 'bta' not in 'LossConfig'"),  # misspelled: Hydra rejects it while composing
    ("loss.beta=0", "loss.beta: must be > 0"),  # a value the schema refuses
    ("model=qwen3", "Could not find 'model/qwen3'; Available options in 'model': qwen-test"),
])
def test_a_bad_config_is_one_line(tmp_path, override, named):
    line = _one_error_line(_run("dpo_dist.judge", [f"run_dir={tmp_path / 'run'}", override]), "dpo_dist.judge")
    assert named in line and override.split("=")[0] in line


def test_a_missing_model_is_one_line(tmp_path):
    line = _one_error_line(_run("dpo_dist.generate", [f"run_dir={tmp_path / 'run'}", f"model.path={tmp_path / 'none'}"]),
                           "dpo_dist.generate")
    assert f"model.path='{tmp_path / 'none'}': no such directory" in line


def test_the_traceback_flag_shows_a_user_errors_traceback(tmp_path):
    proc = _run("dpo_dist.train", [f"run_dir={tmp_path / 'run'}", f"data.pairs={tmp_path / 'none.jsonl'}"],
                DPO_DIST_TRACEBACK="1")
    assert proc.returncode != 0 and "Traceback" in proc.stderr
    assert "dpo_dist.config.ConfigError: data.pairs=" in proc.stderr


STAGE = """
import sys
from dpo_dist.artifacts import DataError
from dpo_dist.cli import stage_main
def run(cfg):
    raise {error}
stage_main(run)()
"""


def test_a_bug_keeps_its_traceback_and_a_user_error_does_not(tmp_path):
    """The same entry point raising a bug's exception and a user's."""
    bug = subprocess.run([sys.executable, "-c", STAGE.format(error="KeyError('candidates')"), f"run_dir={tmp_path}"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bug.returncode == 1 and "Traceback" in bug.stderr and "KeyError: 'candidates'" in bug.stderr
    user = subprocess.run([sys.executable, "-c", STAGE.format(error="DataError('x.jsonl:3: invalid JSON')"),
                           f"run_dir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert user.returncode == 2 and user.stderr.strip().splitlines()[-1] == "__main__: error: x.jsonl:3: invalid JSON"
    assert "Traceback" not in user.stderr


def test_other_ranks_hold_their_line_for_rank_0_and_print_it_if_still_running(monkeypatch, capsys):
    """Rank 0 prints at once. Rank 1 waits USER_ERROR_GRACE seconds (torchrun stops it meanwhile when
    rank 0 has failed too), then prints its line with its rank: an error of its own is not lost."""
    slept = []
    monkeypatch.setattr(cli.time, "sleep", slept.append)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, waits in (("0", []), ("1", [cli.USER_ERROR_GRACE])):
        monkeypatch.setenv("RANK", rank)
        slept.clear()
        with pytest.raises(SystemExit) as e, cli.one_line_user_errors("dpo_dist.train"):
            raise ConfigError("loss.beta: must be > 0")
        assert e.value.code == 2 and slept == waits
        assert capsys.readouterr().err == f"dpo_dist.train (rank {rank}): error: loss.beta: must be > 0\n"


def test_a_vllm_process_names_the_rank_it_started_as(monkeypatch, capsys):
    """A vLLM process drops torchrun's RANK and WORLD_SIZE before its engine starts; an error raised
    after that (the engine's GPU without room) is still rank 1's: it waits, then names its rank."""
    slept = []
    monkeypatch.setattr(cli.time, "sleep", slept.append)
    for key, value in {"RANK": "1", "WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "none"}.items():
        monkeypatch.setenv(key, value)
    with mock.patch.dict(os.environ), pytest.raises(SystemExit), cli.one_line_user_errors("dpo_dist.generate"):
        dist.apply_environment(dist.engine_environment(os.environ, ["1"]))
        raise ConfigError("generation.gpu_memory_utilization=0.85: vLLM needs 68.0 GiB free on GPU 0")
    assert slept == [cli.USER_ERROR_GRACE]
    assert capsys.readouterr().err.startswith("dpo_dist.generate (rank 1): error: generation.gpu_memory_utilization")


@pytest.mark.multiproc
def test_under_torchrun_one_rank_reports_and_the_process_group_is_torn_down(tmp_path):
    """Two ranks meet the same missing file: one line (rank 0's), no traceback from dpo_dist (torchrun
    prints its own report), and no rank left behind (the run ends well within the grace period)."""
    proc = _run("dpo_dist.reference", [f"run_dir={tmp_path / 'run'}", f"data.pairs={tmp_path / 'none.jsonl'}"], nproc=2)
    out = proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if ": error: " in line]
    assert proc.returncode != 0 and len(lines) == 1, out[-4000:]
    assert lines[0].startswith("dpo_dist.reference (rank 0): error: data.pairs=")
    # The run directory's log says why the run stopped, once (rank 0 writes it).
    logged = (tmp_path / "run" / "dpo_dist.log").read_text().splitlines()
    errors = [line for line in logged if " ERROR " in line]
    assert errors == logged[-1:] and errors[0].endswith("dpo_dist.reference: " + lines[0].split(": error: ", 1)[1]), logged
    assert 'dpo_dist/' not in "".join(line for line in out.splitlines() if line.lstrip().startswith("File "))
    assert "terminate called" not in out


BASIC = ("hydra._internal.core_plugins.basic_launcher.BasicLauncher",
         "hydra._internal.core_plugins.basic_sweeper.BasicSweeper")
DATED = "multirun/${now:%Y-%m-%d_%H-%M-%S}"


@pytest.mark.parametrize("world,sweep_dir,subdir,plugins,refused", [
    (2, DATED, "${hydra.job.num}", BASIC, "needs hydra.sweep.dir="),   # the default, dated per rank
    (8, "/shared/sweep", "${now:%H-%M-%S}", BASIC, "needs hydra.sweep.dir="),
    (1, DATED, "${hydra.job.num}", BASIC, ""),                        # one process dates it once
    (2, "/shared/sweep", "${hydra.job.num}", BASIC, ""),
    (2, "/scratch/${oc.env:USER}/sweep", "${hydra.job.num}", BASIC, ""),
    # Every rank would submit the whole array; Optuna would propose other points on each rank.
    (2, "/shared/sweep", "${hydra.job.num}",
     ("hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher", BASIC[1]), "not SlurmLauncher"),
    (2, "/shared/sweep", "${hydra.job.num}",
     (BASIC[0], "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"), "not OptunaSweeper"),
    (1, "/shared/sweep", "${hydra.job.num}",
     ("hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher", BASIC[1]), ""),
])
def test_a_sweep_on_several_ranks_needs_a_shared_directory_and_the_basic_plugins(world, sweep_dir, subdir, plugins,
                                                                                  refused):
    problem = cli.sweep_problem(world, sweep_dir, subdir, *plugins)
    assert (refused in problem and problem.startswith(f"a sweep on {world} ranks ")) if refused else problem == ""


@pytest.mark.parametrize("argv,settings", [
    (["loss.beta=0.1"], None),                                           # not a sweep
    (["-m", "loss.beta=0.05,0.1"], (DATED, *BASIC)),
    (["--multi", "loss.beta=0.05,0.1"], (DATED, *BASIC)),                # Hydra's parser takes abbreviations
    (["hydra.mode=MULTIRUN", "hydra.sweep.dir=/s", "model=qwen2.5-0.5b,qwen2.5-7b"], ("/s", *BASIC)),
    (["-m", "++hydra.sweep.dir=/s", "experiment=tutorial"], ("/s", *BASIC)),
    (["-m", "hydra.sweep.dir=/s/${oc.env:SLURM_JOB_ID,local}", "loss.beta=0.05,0.1"],  # a comma, not a sweep
     ("/s/${oc.env:SLURM_JOB_ID,local}", *BASIC)),
    (["-m", "hydra/launcher=submitit_slurm", "hydra.sweep.dir=/s"],
     ("/s", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher", BASIC[1])),
])
def test_the_sweep_settings_are_read_as_hydra_composes_them(argv, settings):
    if "hydra/launcher=submitit_slurm" in argv:
        pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    got = cli._multirun_settings(argv)
    assert got == (None if settings is None else (settings[0], "${hydra.job.num}", *settings[1:]))


SUBMITIT = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"


@pytest.mark.parametrize("error,multirun,world,launcher,stop", [
    (RuntimeError("CUDA out of memory"), True, 8, BASIC[0], True),    # one rank failed alone: stop every rank
    (RuntimeError("CUDA out of memory"), True, 1, BASIC[0], False),   # alone: Hydra goes on to the next point
    (RuntimeError("CUDA out of memory"), False, 8, BASIC[0], False),  # not a sweep: the error ends the run anyway
    (RuntimeError("CUDA out of memory"), True, 8, SUBMITIT, False),   # a submitit job is one point
    (ConfigError("data.pairs=x: no such file"), True, 8, BASIC[0], False),  # already one line and an exit
    (SystemExit(124), True, 8, BASIC[0], False),                      # preemption: already ends the sweep
    (KeyboardInterrupt(), True, 8, BASIC[0], False),
])
def test_a_failed_job_stops_a_sweep_on_several_ranks(error, multirun, world, launcher, stop):
    assert cli.stop_the_sweep(error, multirun, world, launcher) is stop


def test_a_failed_job_on_several_ranks_ends_the_sweep_in_that_rank(tmp_path, monkeypatch):
    """The rule above wired into stage_main: rank 0 of 2 fails its first job and exits 1, where
    Hydra's basic launcher would have started the second job (the table's other cases)."""
    started = []

    def run(cfg):
        started.append(cfg.loss.beta)
        raise RuntimeError("CUDA out of memory")

    for key, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(sys, "argv", ["dpo_dist.train", "-m", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                                      "loss.beta=0.05,0.1"])
    with pytest.raises(SystemExit) as e:
        cli.stage_main(run)()
    assert e.value.code == 1 and started == [0.05]


@pytest.mark.multiproc
def test_under_torchrun_a_sweep_without_its_directory_is_one_line(tmp_path):
    proc = _run("dpo_dist.train", ["-m", "loss.beta=0.05,0.1", f"data.pairs={tmp_path / 'none.jsonl'}"], nproc=2)
    lines = [line for line in proc.stderr.splitlines() if ": error: " in line]
    assert proc.returncode != 0 and len(lines) == 1, (proc.stdout + proc.stderr)[-4000:]
    assert lines[0].startswith("dpo_dist.train (rank 0): error: a sweep on 2 ranks needs hydra.sweep.dir=")
    # Named, the same sweep starts, and its first job's user error is still one line from rank 0.
    named = _run("dpo_dist.train", ["-m", f"hydra.sweep.dir={tmp_path / 'sweep'}", "loss.beta=0.05,0.1",
                                    "train.global_batch_size=4", f"data.pairs={tmp_path / 'none.jsonl'}"], nproc=2)
    lines = [line for line in named.stderr.splitlines() if ": error: " in line]
    assert len(lines) == 1 and lines[0].startswith("dpo_dist.train (rank 0): error: data.pairs="), named.stderr[-3000:]
    out = named.stdout + named.stderr  # torchrun prints a traceback of its own; none may be dpo_dist's
    assert "dpo_dist/" not in "".join(line for line in out.splitlines() if line.lstrip().startswith("File "))


def test_reading_names_the_line_of_a_bad_byte(tmp_path):
    jsonl = tmp_path / "x.jsonl"
    jsonl.write_bytes(b'{"a": 1}\n\n{"b": "\xff"}\n')
    with pytest.raises(DataError, match=r"x\.jsonl:3: not UTF-8 text \(byte 0xff at column 8\)"):
        read_jsonl(jsonl)
    manifest = tmp_path / "m.json"
    manifest.write_bytes(b'{\n  "a": 1,\n  "b": "\x80"\n}\n')
    with pytest.raises(DataError, match=r"m\.json:3: not UTF-8 text \(byte 0x80 at column 9\)"):
        read_json(manifest)


@pytest.mark.parametrize("override", ["run_dir=runs/mine", "+run_dir=runs/mine", "++run_dir=runs/mine"])
def test_the_slurm_script_refuses_a_run_dir_override_before_it_starts_anything(tmp_path, override):
    """slurm/pipeline.sbatch counts rounds, resumes and reports in RUN_DIR, and the stages' last
    override wins: a run_dir= argument would split the job in two directories. It is refused in one
    line before any step, or scontrol, runs (so no Slurm is needed here: a later check would fail on
    the missing scontrol or print the job's banner instead); RUN_DIR is the way."""
    env = {"PATH": "/usr/bin:/bin", "SLURM_SUBMIT_DIR": str(REPO), "SLURM_JOB_ID": "7", "RUN_DIR": str(tmp_path / "run")}
    proc = subprocess.run(["bash", "slurm/pipeline.sbatch", "prompts.num_train=3", override], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.splitlines() == [f"pipeline.sbatch: {override}: set the run directory as RUN_DIR=... in the "
                                        "environment (the job resumes and reports there), not as an override"]
    assert proc.stdout == ""
