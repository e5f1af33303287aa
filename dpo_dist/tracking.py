"""Metrics: stdout and ``metrics.jsonl`` on the main rank, W&B when enabled; a no-op elsewhere.

W&B runs offline by default (``wandb.mode=offline``): no key, no network; ``wandb sync`` uploads
later. The API key is only ever read by wandb from its own environment or netrc -- it is never part
of our config, so it never lands in ``.hydra/config.yaml``, the model card or a log line.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from dpo_dist import dist
from dpo_dist.config import WandbConfig

log = logging.getLogger(__name__)


class Tracker:
    def __init__(self, out_dir: Path, cfg: WandbConfig, run_config: dict, name: str, resume_step: int = 0):
        self.enabled = dist.is_main()
        self.path = Path(out_dir) / "metrics.jsonl"
        self._wandb = None
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_step)
        if cfg.mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            # W&B refuses steps below a run's last one, so after a resume the re-logged steps would be
            # dropped: a resumed run logs under its own id (the name stays, plus where it resumed).
            run_id = name.replace("/", "-") + (f"-resumed{resume_step}" if resume_step else "")
            self._wandb = wandb.init(project=cfg.project, entity=cfg.entity, mode=cfg.mode, name=name,
                                     dir=str(out_dir), config=run_config, resume="allow", id=run_id)

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint we resumed from: they will be logged again."""
        if not self.path.is_file():
            return
        kept = [l for l in self.path.read_text().splitlines() if l.strip() and json.loads(l).get("step", 0) <= step]
        from dpo_dist.artifacts import write_text
        write_text(self.path, "".join(l + "\n" for l in kept))

    def log(self, metrics: dict, step: int) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())
        log.info(shown)
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def finish(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def read_metrics(path: str | Path) -> list[dict]:
    p = Path(path)
    return [json.loads(l) for l in p.read_text().splitlines() if l.strip()] if p.is_file() else []
