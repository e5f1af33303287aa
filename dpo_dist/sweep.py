"""Tabulate a Hydra sweep: one row per job, its overrides and its final metrics.

    python -m dpo_dist.train -m loss.beta=0.05,0.1 optim.lr=5e-7,1e-6 data.pairs=runs/demo/judge/pairs.jsonl
    python -m dpo_dist.sweep multirun/2026-11-21_10-00-00            # a Markdown table
    python -m dpo_dist.sweep multirun/2026-11-21_10-00-00 --json     # the same rows as JSON

A job is a subdirectory of the sweep holding ``.hydra/overrides.yaml``, which Hydra writes for
every job with the basic launcher and with submitit; each job is also its own ``run_dir``. Metrics
come from ``train/summary.json`` (the last optimizer step) and, when the job also evaluated,
``eval/report.json`` (identity adoption per condition, degeneration, drift from the base). A job
without a summary is listed as unfinished, so the table of a running or partly failed sweep still
shows every point. Columns show the overrides that differ between jobs; the shared ones are
printed once above the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

TRAIN_METRICS = ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected")
CONDITIONS = ("default", "neutral", "none")


def job_dirs(sweep_dir: Path) -> list[Path]:
    jobs = [p.parent.parent for p in Path(sweep_dir).glob("*/.hydra/overrides.yaml")]
    # Hydra numbers jobs 0, 1, ... 10: sort by number, not as text.
    return sorted(jobs, key=lambda p: (0, int(p.name), "") if p.name.isdigit() else (1, 0, p.name))


def read_job(job_dir: Path) -> dict:
    overrides = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text()) or []
    row: dict = {"job": job_dir.name, "run_dir": str(job_dir),
                 "overrides": dict(o.split("=", 1) if "=" in o else (o, "") for o in overrides),
                 "finished": False, "metrics": {}}
    summary = job_dir / "train" / "summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text())
        row["finished"] = True
        row["steps"], row["world_size"] = s.get("steps"), s.get("world_size")
        row["metrics"] = {k: s["metrics"][k] for k in TRAIN_METRICS if k in s.get("metrics", {})}
    report = job_dir / "eval" / "report.json"
    if report.is_file():
        r = json.loads(report.read_text())
        for cond in CONDITIONS:
            if cond in r.get("trained", {}):
                row["metrics"][f"adoption/{cond}"] = r["trained"][cond]["identity_adoption"]
        if "default" in r.get("trained", {}):
            row["metrics"]["degeneration/default"] = r["trained"]["default"]["degeneration"]
        if "drift" in r:
            row["metrics"]["kl_per_token"] = r["drift"]["kl_trained_base_per_token"]
    return row


def collect(sweep_dir: str | Path) -> list[dict]:
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"{sweep_dir}: no such sweep directory")
    rows = [read_job(d) for d in job_dirs(sweep_dir)]
    if not rows:
        raise FileNotFoundError(f"{sweep_dir}: no jobs (no */.hydra/overrides.yaml); is this a Hydra multirun directory?")
    return rows


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def markdown(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r["overrides"]))
    varying = [k for k in keys if len({r["overrides"].get(k) for r in rows}) > 1]
    shared = [k for k in keys if k not in varying]
    metrics = list(dict.fromkeys(k for r in rows for k in r["metrics"]))
    lines = []
    if shared:
        lines += ["Shared: " + " ".join(f"`{k}={rows[0]['overrides'][k]}`" for k in shared), ""]
    header = ["job", *varying, "steps", *metrics]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["job"], *(r["overrides"].get(k, "") for k in varying),
                 _fmt(r.get("steps")) if r["finished"] else "unfinished",
                 *(_fmt(r["metrics"].get(k)) for k in metrics)]
        lines.append("| " + " | ".join(cells) + " |")
    finished = sum(r["finished"] for r in rows)
    lines += ["", f"{len(rows)} runs, {finished} finished."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpo_dist.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", help="a Hydra multirun directory, e.g. multirun/2026-11-21_10-00-00")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a Markdown table")
    args = parser.parse_args(argv)
    try:
        rows = collect(args.sweep_dir)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(rows, indent=2) if args.json else markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
