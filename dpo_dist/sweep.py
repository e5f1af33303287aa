"""Tabulate a Hydra sweep: one row per job, its overrides and its final metrics.

    python -m dpo_dist.train -m loss.beta=0.05,0.1 optim.lr=5e-7,1e-6 data.pairs=runs/smollm2-135m/round-1/judge/pairs.jsonl
    python -m dpo_dist.sweep multirun/2026-11-21_10-00-00            # a Markdown table
    python -m dpo_dist.sweep multirun/2026-11-21_10-00-00 --json     # the same rows as JSON
    python -m dpo_dist.pipeline -m rounds.num=2 generation.seed=0,1,2 'train.seed=${generation.seed}'
    python -m dpo_dist.sweep multirun/...  [--round 1]               # each seed's last (or given) round

A job is a subdirectory of the sweep holding ``.hydra/overrides.yaml``, which Hydra writes for
every job with the basic launcher and with submitit; each job is also its own ``run_dir``. Metrics
come from ``train/summary.json`` (the last optimizer step) and, when the job also evaluated,
``eval/report.json`` (identity adoption and leakage per condition, degeneration, drift from the
base). A job of iterative rounds (``rounds.num`` in its ``.hydra/config.yaml``) is read from
``round-<k>/``: its last round, or ``--round k``; the ``round`` column says which, and for an
unfinished job how many rounds it has finished. A job without a summary is listed as unfinished, so
the table of a running or partly failed sweep still shows every point. Columns show the overrides
that differ between jobs; the shared ones are printed once above the table. Jobs that differ only
in their seeds (keys ending in ``seed``) are one setting: for each setting with two or more evaluated
jobs, a row below the table gives the worst of each evaluation figure over its seeds (the lowest
adoption, the highest leakage, degeneration and drift), naming the jobs it covers. ``--json``
prints the job rows only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from dpo_dist.config import job_rounds

TRAIN_METRICS = ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected")
CONDITIONS = ("default", "neutral", "none")
# The worst of each evaluation figure over the jobs: adoption is better higher, the rest lower.
WORST = {"adoption": min, "leakage": max, "degeneration": max, "kl_per_token": max}


def job_dirs(sweep_dir: Path) -> list[Path]:
    jobs = [p.parent.parent for p in Path(sweep_dir).glob("*/.hydra/overrides.yaml")]
    # Hydra numbers jobs 0, 1, ... 10: sort by number, not as text.
    return sorted(jobs, key=lambda p: (0, int(p.name), "") if p.name.isdigit() else (1, 0, p.name))


def _load(path: Path):
    """A job's YAML or JSON record; a damaged one raises ValueError naming the file."""
    try:
        text = path.read_text()
        return yaml.safe_load(text) if path.suffix == ".yaml" else json.loads(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ValueError) as e:
        first_line = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"{path}: unreadable ({type(e).__name__}: {first_line})") from None


def rounds_of(job_dir: Path) -> tuple[int, int]:
    """The job's number of rounds and its ``rounds.only`` (slurm/pipeline.sbatch runs one round a step
    with it; 0 when unset). One round for a job without ``rounds.num``, one on its own ``data.pairs``
    (dpo_dist.config.num_rounds: a train-only sweep), and one without ``round-1/``: a stage run
    alone (``python -m dpo_dist.evaluate -m ...``) works in the job directory whatever rounds.num
    the model's file sets, and a pipeline job that has not begun round 1 is unfinished either way."""
    config = job_dir / ".hydra" / "config.yaml"
    job = (_load(config) or {}) if config.is_file() else {}
    only = (job.get("rounds") or {}).get("only")
    try:
        # The job directory is the run_dir it ran in (dpo_dist.cli sets it after Hydra saved config.yaml).
        num = job_rounds(job, str(job_dir))
    except ValueError as e:
        raise ValueError(f"{config}: {e}") from None
    if not (job_dir / "round-1").is_dir():
        num = 1
    return num, only if isinstance(only, int) else 0


def _is_seed(key: str) -> bool:
    """generation.seed, train.seed, seed: the keys a sweep over seeds varies within one setting."""
    return key.split(".")[-1].endswith("seed")


def read_job(job_dir: Path, round_k: int | None = None) -> dict:
    """One job's row. With ``rounds.num`` > 1 the metrics are round ``round_k``'s (default: the last).
    A damaged record leaves the job unfinished with ``error`` naming the file; the other jobs still show."""
    row: dict = {"job": job_dir.name, "run_dir": str(job_dir), "overrides": {}, "finished": False, "metrics": {}}
    try:
        overrides = _load(job_dir / ".hydra" / "overrides.yaml") or []
        row["overrides"] = dict(o.split("=", 1) if "=" in o else (o, "") for o in overrides)
        _read_metrics(job_dir, round_k, row)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        row.update(finished=False, metrics={}, error=str(e) if isinstance(e, ValueError) else
                   f"{job_dir}: a record without the expected fields ({type(e).__name__}: {e})")
    return row


def _read_metrics(job_dir: Path, round_k: int | None, row: dict) -> None:
    here, (total, only) = job_dir, rounds_of(job_dir)
    k = round_k or only or total
    if k > total:
        row["round"] = f"none ({total} rounds)"
        return
    if total > 1:  # one round lives in the job directory itself, more in round-<k>/
        here = job_dir / f"round-{k}"
        done = sum((job_dir / f"round-{j}" / "train" / "summary.json").is_file() for j in range(1, total + 1))
        row["round"] = f"{k} of {total}" if (here / "train" / "summary.json").is_file() else f"{done} of {total} done"
    summary = here / "train" / "summary.json"
    if summary.is_file():
        s = _load(summary)
        row["finished"] = True
        row["steps"], row["world_size"] = s.get("steps"), s.get("world_size")
        row["metrics"] = {k: s["metrics"][k] for k in TRAIN_METRICS if k in s.get("metrics", {})}
    report = here / "eval" / "report.json"
    if report.is_file():
        r = _load(report)
        trained = r.get("trained", {})
        for key, name in (("identity_adoption", "adoption"), ("leakage", "leakage")):
            for cond in CONDITIONS:
                if key in trained.get(cond, {}):
                    row["metrics"][f"{name}/{cond}"] = trained[cond][key]
        if "default" in trained:
            row["metrics"]["degeneration/default"] = trained["default"]["degeneration"]
        if r.get("drift"):
            row["metrics"]["kl_per_token"] = r["drift"]["kl_trained_base_per_token"]


def worst(rows: list[dict]) -> dict:
    """Each evaluation figure's worst over the jobs that have it (only a trained round has figures);
    {} with fewer than two."""
    out = {}
    for key in dict.fromkeys(k for r in rows for k in r["metrics"]):
        pick = WORST.get(key.split("/")[0])
        values = [r["metrics"][key] for r in rows if key in r["metrics"]]
        if pick and len(values) >= 2:
            out[key] = pick(values)
    return out


def seed_groups(rows: list[dict]) -> list[list[dict]]:
    """The jobs grouped by setting: their overrides without the seeds (any key ending in ``seed``),
    in order of first appearance. A sweep over beta x seed gives one group per beta, so a worst row
    compares seeds of one setting, never one setting against another."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        setting = tuple(sorted((k, v) for k, v in r["overrides"].items() if not _is_seed(k)))
        groups.setdefault(setting, []).append(r)
    return list(groups.values())


def collect(sweep_dir: str | Path, round_k: int | None = None) -> list[dict]:
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"{sweep_dir}: no such sweep directory")
    rows = [read_job(d, round_k) for d in job_dirs(sweep_dir)]
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
    rounds = ["round"] if any("round" in r for r in rows) else []
    header = ["job", *varying, *rounds, "steps", *metrics]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["job"], *(r["overrides"].get(k, "") for k in varying), *(r.get("round", "") for _ in rounds),
                 "unreadable" if "error" in r else _fmt(r.get("steps")) if r["finished"] else "unfinished",
                 *(_fmt(r["metrics"].get(k)) for k in metrics)]
        lines.append("| " + " | ".join(cells) + " |")
    for group in seed_groups(rows):
        bad = worst(group)
        if bad:
            # "worst" when it covers every job; else which jobs, and how many of the setting's are evaluated.
            judged = [r["job"] for r in group if any(k in bad for k in r["metrics"])]
            label = "worst" if len(judged) == len(rows) else f"worst of {', '.join(judged)}" + (
                f" ({len(judged)} of {len(group)} evaluated)" if len(judged) < len(group) else "")
            setting = ["" if _is_seed(k) else group[0]["overrides"].get(k, "") for k in varying]
            cells = [label, *setting, *[""] * (len(rounds) + 1), *(_fmt(bad.get(k)) for k in metrics)]
            lines.append("| " + " | ".join(cells) + " |")
    finished = sum(r["finished"] for r in rows)
    lines += ["", f"{len(rows)} runs, {finished} finished."]
    lines += [f"job {r['job']}: {r['error']}" for r in rows if "error" in r]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpo_dist.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", help="a Hydra multirun directory, e.g. multirun/2026-11-21_10-00-00")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a Markdown table")
    parser.add_argument("--round", type=int, default=None, metavar="K",
                        help="for jobs of iterative rounds, round K's metrics instead of the last round's")
    args = parser.parse_args(argv)
    if args.round is not None and args.round < 1:
        print(f"error: --round {args.round}: rounds count from 1", file=sys.stderr)
        return 2
    try:
        rows = collect(args.sweep_dir, args.round)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(rows, indent=2) if args.json else markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
