"""The entry point every stage shares: Hydra composes ``conf/``, the tree becomes the typed Config
(all validation at start-up), and the process group is torn down on the way out.

Errors the user causes and can fix -- a bad config key or value (``ConfigError``, Hydra's
composition errors), bad or missing input data, a model that is not there (``artifacts.UserError``:
``DataError``, ``MissingFile``, ``ModelNotFound``, ``StaleReference``) -- print one line,
``dpo_dist.<stage>: error: <message>``, and exit 2, without a Python traceback. Anything else is a
bug and keeps its traceback. ``DPO_DIST_TRACEBACK=1`` shows the traceback for user errors too.

Under torchrun or srun most user errors are met by every rank alike (each composes the same config
and reads the same files), and N copies of one line are noise: rank 0 prints its line at once, as
``dpo_dist.<stage> (rank 0): error: ...``, and exits; another rank holds its line for
USER_ERROR_GRACE seconds first. When rank 0 has failed too, the launcher (torchrun, or srun
--kill-on-bad-exit) stops the other ranks within that time, and the user reads one line. When it
has not, the error is that rank's alone (a file missing on one node, a shard of its own damaged),
and the rank prints it with its number before exiting. Saying nothing there is not an option:
torchrun stops every rank as soon as one fails, so "rank 0 alone prints" loses the message
whenever another rank gets there first (seen on this machine: a 2-rank run with a missing
data.pairs printed nothing but torchrun's report).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from typing import Callable, Iterator

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dpo_dist import dist
from dpo_dist.artifacts import UserError
from dpo_dist.config import CONF_DIR, Config, ConfigError, to_config

EXIT_USER_ERROR = 2
USER_ERRORS = (UserError, ConfigError, CompactHydraException)
# Seconds a rank other than 0 waits before printing a user error (module docstring). Ranks reach an
# error a fraction of a second apart, and torchrun polls its workers every 0.1 s.
USER_ERROR_GRACE = 10.0


class ChildFailed(UserError):
    """A stage run in a process of its own failed; it has said why on its own stderr (one line for
    a user error, a traceback for a bug), so this process adds one line, not a second traceback."""


def run_child(command: list[str], what: str) -> None:
    """``subprocess.run(command)``; a failure raises ChildFailed naming ``what`` and the exit status."""
    proc = subprocess.run(command)
    if proc.returncode != 0:
        raise ChildFailed(f"{what} ({' '.join(command[:3])} ...) exited {proc.returncode}; its output above says why")


def sweep_problem(world_size: int, sweep_dir: str, subdir: str, launcher: str, sweeper: str) -> str:
    """Why a Hydra multirun cannot start on ``world_size`` ranks, or "". Under torchrun (or srun, one
    task per rank) every rank runs the whole sweep in its own process, job after job, and the ranks
    of a job must agree on everything. The default sweep directory is dated
    (``multirun/${now:...}``, conf/config.yaml) by each rank's own clock: ranks composing their config
    either side of a second (imports alone differ by more) would run a job in directories of their
    own, and hang waiting for each other's files or write half a checkpoint to each. Another launcher
    would have every rank submit the whole sweep (submitit) or run its jobs in parallel (joblib), and
    another sweeper (Optuna, Nevergrad, Ax) would propose other points on each rank.
    ``sweep_dir`` and ``subdir`` are unresolved; ``launcher`` and ``sweeper`` are ``_target_`` paths."""
    if world_size <= 1:
        return ""
    plugins = [p.rsplit(".", 1)[-1] for p in (launcher, sweeper)]
    if plugins != ["BasicLauncher", "BasicSweeper"]:
        return (f"a sweep on {world_size} ranks runs in every rank's process, so only with Hydra's basic "
                f"launcher and sweeper (not {' and '.join(p for p in plugins if not p.startswith('Basic'))}): "
                "start a sweep that submits or searches from one process, and give its jobs the ranks")
    if "${now:" in sweep_dir + subdir:
        return (f"a sweep on {world_size} ranks needs hydra.sweep.dir=<a directory every rank sees> without "
                "${now:...}: a dated one is dated by each rank's own clock, so ranks could run a job in "
                "different directories")
    return ""


def _multirun_settings(argv: list[str]) -> tuple[str, str, str, str] | None:
    """The sweep directory and subdirectory (unresolved), launcher and sweeper a multirun started
    with ``argv`` would use, read as Hydra reads them (its own argument and override parsers, so
    ``--multi`` counts, and the config composed from this package's conf/ with the hydra.* and group
    overrides); None when ``argv`` starts no multirun, or its settings cannot be composed here
    (``--config-dir``, a malformed override: Hydra then goes on, or reports what is wrong itself)."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args, _ = get_args_parser().parse_known_args(argv)
    try:
        parsed = OverridesParser.create().parse_overrides(args.overrides or [])
    except Exception:  # noqa: BLE001 -- a malformed override: Hydra says what is wrong with it
        return None
    if not (args.multirun or any(o.key_or_group == "hydra.mode" and "MULTIRUN" in o.input_line for o in parsed)):
        return None
    # Only what can set Hydra's own settings: hydra.* keys, and config groups not swept (compose()
    # runs no sweep: `model=a,b` would not compose; a comma inside ${oc.env:X,default} is no sweep).
    keep = [o.input_line for o in parsed
            if (o.key_or_group.startswith("hydra") or "." not in o.key_or_group) and not o.is_sweep_override()]
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            h = compose(args.config_name or "config", overrides=keep, return_hydra_config=True).hydra
            return (str(h.sweep._get_node("dir")._value()), str(h.sweep._get_node("subdir")._value()),
                    h.launcher._target_, h.sweeper._target_)
    except Exception:  # noqa: BLE001 -- this check must never be what stops a run Hydra would start
        return None


def stop_the_sweep(error: BaseException, multirun: bool, world_size: int, launcher: str) -> bool:
    """Whether a job's failure must end the whole sweep rather than only the job. Hydra's basic
    launcher goes on to the next job after an exception. Alone that is what a sweep wants; on several
    ranks a rank that failed alone (one GPU out of memory) would start the next job while its peers
    wait in a collective of the last one until the timeout (DPO_DIST_TIMEOUT_MIN). Exiting lets
    torchrun stop the ranks; the sweep run again with its hydra.sweep.dir reuses the jobs it
    finished. Not for user errors, which one_line_user_errors already turns into an exit (one line,
    from rank 0), nor under another launcher: a submitit job runs one point, and submitit reports an
    exception, not an exit."""
    return (multirun and world_size > 1 and isinstance(error, Exception) and not isinstance(error, USER_ERRORS)
            and launcher.rsplit(".", 1)[-1] == "BasicLauncher")


# The log file Hydra opened for this job (set by stage_main; "" when its job_logging has none).
RUN_LOG = ""


def _log_to_stderr_and_run_dir() -> list[logging.FileHandler]:
    """Every rank's lines, with its rank, on stderr; rank 0's also appended to the log file Hydra
    opened in the run directory (``<run_dir>/dpo_dist.log``, named by hydra.job.name). Hydra's
    console handler and format give way to ours, and its file handler takes our format rather than
    being dropped with them (which left the file empty). One writer: appends from several nodes to
    one file on NFS are not atomic and lose lines. Returns the file handlers kept."""
    global RUN_LOG
    root = logging.getLogger()
    files = [h for h in root.handlers if isinstance(h, logging.FileHandler)]
    for h in files:
        root.removeHandler(h)
    # Hydra's own file handler ("file" in its job_logging), on every rank: a child process of this
    # job (the pipeline's generate child) is pointed at it rather than opening one of its own.
    RUN_LOG = next((h.baseFilename for h in files if h.get_name() == "file"), "")
    rank = dist.read_env().rank
    logging.basicConfig(level=os.environ.get("DPO_DIST_LOG_LEVEL", "INFO"),
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", force=True)
    if rank != 0:
        for h in files:
            h.close()
        return []
    for h in files:
        h.setFormatter(root.handlers[0].formatter)
        root.addHandler(h)
    return files


def _log_the_end(files: list[logging.FileHandler], prog: str, error: BaseException) -> None:
    """The error that ends a run, in the run directory's log too (stderr shows it already, one line
    for a user error): without it the file would not say why the run stopped. Rank 0's only: another
    rank's failure is on stderr (the launcher's output, a Slurm job's .out)."""
    if not files:
        return
    user = isinstance(error, USER_ERRORS)
    if isinstance(error, SystemExit):  # a planned stop too: preempted (124, requeue), a sweep ended
        level, message, exc_info = logging.WARNING, f"exiting with code {error.code}", None
    elif user:
        level, message, exc_info = logging.ERROR, one_line(error), None
    else:
        level, message = logging.ERROR, f"stopped by {type(error).__name__}"
        exc_info = (type(error), error, error.__traceback__) if isinstance(error, Exception) else None
    record = logging.getLogger(prog).makeRecord(prog, level, __file__, 0, message, (), exc_info)
    for h in files:
        h.handle(record)


def stage_main(run: Callable[[Config], object]) -> Callable[[], None]:
    # The module's own name even when it runs as __main__ (python -m dpo_dist.train).
    spec = getattr(sys.modules.get(run.__module__), "__spec__", None)
    prog = spec.name if spec is not None else run.__module__

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)
    def hydra_main(raw: DictConfig) -> None:
        files = _log_to_stderr_and_run_dir()
        multirun = HydraConfig.get().mode == RunMode.MULTIRUN
        if multirun:
            # Each sweep job gets its own run directory (Hydra's per-job output dir).
            OmegaConf.update(raw, "run_dir", HydraConfig.get().runtime.output_dir)
        # Inside the job, so a user error exits here: past it Hydra adds a line of its own for a failed job.
        with one_line_user_errors(prog):
            try:
                cfg = typed_config(raw)
                if cfg.rounds.later:
                    # Every stage, not only the pipeline's rounds: slurm/pipeline.sbatch runs a one-round
                    # job's stages directly, and a sweep over rounds.num=1,2 should fail in its first job.
                    from dpo_dist import rounds
                    rounds.check_later(cfg)
                run(cfg)
            except BaseException as e:
                _log_the_end(files, prog, e)
                dist.shutdown(clean=False)
                if stop_the_sweep(e, multirun, dist.read_env().world_size, HydraConfig.get().launcher._target_):
                    # Logged, not only raised: each rank's line names the rank that failed.
                    logging.getLogger(prog).exception("this job failed on this rank; ending the sweep here, so "
                                                      "that the launcher (torchrun, or srun with --kill-on-bad-exit) "
                                                      "stops the other ranks")
                    raise SystemExit(1) from None
                raise
            dist.shutdown()

    def main() -> None:
        # Hydra prints a composition error (a misspelled key) over several lines unless HYDRA_FULL_ERROR
        # is set, and then raises it to here.
        saved = os.environ.get("HYDRA_FULL_ERROR")
        os.environ["HYDRA_FULL_ERROR"] = "1"
        try:
            with one_line_user_errors(prog):
                world = dist.read_env().world_size
                settings = _multirun_settings(sys.argv[1:]) if world > 1 else None
                problem = sweep_problem(world, *settings) if settings else ""
                if problem:
                    raise ConfigError(problem)
                hydra_main()
        finally:
            if saved is None:
                os.environ.pop("HYDRA_FULL_ERROR", None)
            else:
                os.environ["HYDRA_FULL_ERROR"] = saved

    return main


def typed_config(raw: DictConfig) -> Config:
    """``to_config``, with OmegaConf's own errors there (a ``???`` left unset, a value of the wrong
    type) as a ConfigError naming the key."""
    try:
        return to_config(raw)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        raise ConfigError(f"{key}: {e}" if key else str(e)) from e


@contextlib.contextmanager
def one_line_user_errors(prog: str) -> Iterator[None]:
    """A user error raised in the block prints one line on stderr and exits with EXIT_USER_ERROR
    (other ranks than 0 after USER_ERROR_GRACE, see the module docstring); with DPO_DIST_TRACEBACK=1
    it propagates with its traceback. For any entry point: ``with one_line_user_errors("dpo_dist.plan"): ...``.
    The rank is the one the block started as: a vLLM process drops the launcher's variables before its
    engine starts (dist.engine_environment), and its errors must still name their rank and wait."""
    env = dist.read_env()
    try:
        yield
    except USER_ERRORS as e:
        if os.environ.get("DPO_DIST_TRACEBACK") == "1":
            raise
        if env.rank != 0:
            # The launcher's SIGTERM must end the wait (training installs a handler that only sets a flag).
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            time.sleep(USER_ERROR_GRACE)
        where = f" (rank {env.rank})" if env.world_size > 1 else ""
        print(f"{prog}{where}: error: {one_line(e)}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USER_ERROR) from None


def one_line(e: BaseException) -> str:
    """An error's message on one line. Hydra's composition errors span several, with their cause
    (OmegaConf's error) apart and lists indented; OmegaConf's context lines (full_key: ...) and
    Hydra's config search path go."""
    text = str(e).split("\nConfig search path:")[0]
    if isinstance(e, CompactHydraException) and isinstance(e.__cause__, OmegaConfBaseException):
        text += "\n" + str(e.__cause__)
    out, listing = "", False
    for line in text.splitlines():
        item = line.strip()
        if not item or item.startswith(("full_key:", "reference_type=", "object_type=")):
            continue
        if not out:
            out = item
        elif out.endswith(":"):
            out, listing = f"{out} {item}", line.startswith(("\t", " "))
        elif listing and line.startswith(("\t", " ")):
            out = f"{out}, {item}"
        else:
            out, listing = f"{out.rstrip('.')}; {item}", False
    return out
