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


def stage_main(run: Callable[[Config], object]) -> Callable[[], None]:
    # The module's own name even when it runs as __main__ (python -m dpo_dist.train).
    spec = getattr(sys.modules.get(run.__module__), "__spec__", None)
    prog = spec.name if spec is not None else run.__module__

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)
    def hydra_main(raw: DictConfig) -> None:
        logging.basicConfig(level=os.environ.get("DPO_DIST_LOG_LEVEL", "INFO"),
                            format=f"%(asctime)s [rank {dist.read_env().rank}] %(levelname)s %(name)s: %(message)s",
                            force=True)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            # Each sweep job gets its own run directory (Hydra's per-job output dir).
            OmegaConf.update(raw, "run_dir", HydraConfig.get().runtime.output_dir)
        # Inside the job, so a user error exits here: past it Hydra adds a line of its own for a failed job.
        with one_line_user_errors(prog):
            try:
                run(typed_config(raw))
            except BaseException:
                dist.shutdown(clean=False)
                raise
            dist.shutdown()

    def main() -> None:
        # Hydra prints a composition error (a misspelled key) over several lines unless HYDRA_FULL_ERROR
        # is set, and then raises it to here.
        saved = os.environ.get("HYDRA_FULL_ERROR")
        os.environ["HYDRA_FULL_ERROR"] = "1"
        try:
            with one_line_user_errors(prog):
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
    it propagates with its traceback. For any entry point: ``with one_line_user_errors("dpo_dist.plan"): ...``."""
    try:
        yield
    except USER_ERRORS as e:
        if os.environ.get("DPO_DIST_TRACEBACK") == "1":
            raise
        env = dist.read_env()
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
