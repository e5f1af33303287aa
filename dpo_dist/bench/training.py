"""The training contenders, each in a process of its own so its peak RSS (VmHWM) is its own.

- ours: ``python -m dpo_dist.reference`` (the precomputation, timed apart), then
  ``python -m dpo_dist.train``; step times from ``train/metrics.jsonl``, peak from ``train/summary.json``.
- TRL's DPOTrainer, reference model resident (its default) and with precompute_ref_log_probs=True
  (``dpo_dist.bench.trl_dpo``).
- ours under torchrun at 1 and 2 ranks with ZeRO-2 and ZeRO-3 (and ZeRO-3 without the fused ops),
  reusing the same reference cache.

Each contender runs with gradient checkpointing off or on (``TrainSetup.checkpointing``): TRL's
``DPOConfig`` turns it on by default, so "TRL as users run it" is the run with it on.

Every contender gets the same Hydra overrides (``train_overrides``): the same pairs, lengths, global
batch, micro-batch, loss, beta and optimizer, and the same number of steps; the first step is a
warm-up left out of the rates.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from dpo_dist.artifacts import read_json
from dpo_dist.memory import STEP_PARTS
from dpo_dist.tracking import read_metrics

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class TrainSetup:
    pairs: Path  # the benchmark's subset: exactly steps x global_batch pairs, one epoch
    global_batch: int
    micro_batch: int
    steps: int  # including the warm-up step
    threads: int  # intra-op threads of the whole machine share; split across ranks
    checkpointing: bool = False  # model.gradient_checkpointing for every contender of this setup
    model: tuple[str, ...] = ()  # Hydra overrides choosing the model (empty: the bundled default)


def train_overrides(s: TrainSetup, run_dir: Path) -> list[str]:
    # Plain sigmoid DPO (TRL's default loss), constant lr, no W&B: nothing differs between contenders.
    return [*s.model, f"run_dir={run_dir}", f"data.pairs={s.pairs}", "loss=dpo", "optim.scheduler=constant",
            "optim.warmup_ratio=0", f"train.global_batch_size={s.global_batch}", f"train.micro_batch_size={s.micro_batch}",
            f"train.max_steps={s.steps}", "train.epochs=1", f"train.save_every={s.steps}", "wandb.mode=disabled",
            f"model.gradient_checkpointing={str(s.checkpointing).lower()}"]


def _ckpt(s: TrainSetup) -> str:
    return "-ckpt" if s.checkpointing else ""


def _env(threads: int) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _run(cmd: list[str], threads: int, log: Path, timeout: float = 3600) -> float:
    """Run a contender to completion; returns wall seconds. Its output goes to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, env=_env(threads), stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {proc.returncode}; see {log}:\n"
                           + log.read_text(errors="replace")[-3000:])
    return time.perf_counter() - t


def _torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m"]


def ours(s: TrainSetup, work: Path, nproc: int = 1, stage: int = 2, reference_from: Path | None = None,
         fused_ops: bool = True) -> dict:
    """Our trainer: the reference stage (unless ``reference_from`` already has the cache), then the train stage."""
    name = f"ours-{nproc}rank-zero{stage}{_ckpt(s)}{'' if fused_ops else '-unfused'}"
    run_dir = work / name
    shutil.rmtree(run_dir, ignore_errors=True)
    args = [*train_overrides(s, run_dir), f"deepspeed.stage={stage}", f"train.fused_ops={str(fused_ops).lower()}"]
    threads = max(1, s.threads // nproc)
    launch = [sys.executable, "-m"] if nproc == 1 else _torchrun(nproc)
    out: dict = {"ranks": nproc, "zero_stage": stage, "threads_per_rank": threads, "fused_ops": fused_ops,
                 "checkpointing": s.checkpointing}
    if reference_from is None:
        out["reference_wall_seconds"] = _run([*launch, "dpo_dist.reference", *args], threads, work / f"{name}.reference.log")
        out["precompute_seconds"] = read_json(run_dir / "reference" / "manifest.json")["seconds"]
    else:
        shutil.copytree(reference_from / "reference", run_dir / "reference")
        out["precompute_seconds"] = None
    out["wall_seconds"] = _run([*launch, "dpo_dist.train", *args], threads, work / f"{name}.train.log")
    metrics = read_metrics(run_dir / "train" / "metrics.jsonl")
    summary = read_json(run_dir / "train" / "summary.json")
    out["zero_stage_used"] = summary["zero_stage"]  # one fp32 rank trains at stage 0 (DeepSpeedConfig.for_world)
    out.update(step_seconds=[m["step_seconds"] for m in metrics], losses=[m["loss"] for m in metrics],
               peak_rss_gib_per_rank=summary["peak_rss_gib_per_rank"], peak_rss_gib=max(summary["peak_rss_gib_per_rank"]),
               setup_peak_rss_gib_per_rank=summary["setup_peak_rss_gib_per_rank"],
               **{f"{part}_peak_rss_gib_per_rank": summary.get(f"{part}_peak_rss_gib_per_rank")
                  for part in ("loop", *STEP_PARTS)})
    # The checkpoint and exported model are GBs the benchmark does not need.
    shutil.rmtree(run_dir / "train" / "checkpoints", ignore_errors=True)
    shutil.rmtree(run_dir / "train" / "final", ignore_errors=True)
    return out


def trl(s: TrainSetup, work: Path, precompute: bool) -> dict:
    name = ("trl-precompute" if precompute else "trl-default") + _ckpt(s)
    result = work / f"{name}.json"
    cmd = [sys.executable, "-m", "dpo_dist.bench.trl_dpo", "--out", str(result), *(["--precompute"] if precompute else []),
           "--", *train_overrides(s, work / name)]
    wall = _run(cmd, s.threads, work / f"{name}.log")
    out = read_json(result)
    out["wall_seconds"] = wall
    out["checkpointing"] = s.checkpointing
    if not precompute:
        out["precompute_seconds"] = 0.0
    return out


def summarise(run: dict, tokens_per_step: list[int]) -> dict:
    """Rates over the steps after the warm-up; end-to-end = precomputation + every step."""
    steps = run["step_seconds"]
    if len(steps) != len(tokens_per_step) or len(steps) < 2:
        raise RuntimeError(f"expected {len(tokens_per_step)} timed steps, got {len(steps)}")
    timed = sum(steps[1:])
    return {"steps_per_s": (len(steps) - 1) / timed, "response_tokens_per_s": sum(tokens_per_step[1:]) / timed,
            "seconds_per_step": timed / (len(steps) - 1),
            "end_to_end_seconds": (run.get("precompute_seconds") or 0.0) + sum(steps)}


@dataclass(frozen=True)
class FlopModel:
    """Parameters that take part in matmuls, split into the body and the vocabulary projection."""
    body_params: int
    head_params: int
    layers: int
    hidden: int

    @classmethod
    def of(cls, model_path: str) -> "FlopModel":
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(model_path)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        head = model.get_output_embeddings().weight
        embed = model.get_input_embeddings().weight
        total = sum(p.numel() for p in model.parameters())  # a tied matrix is counted once
        # The input embedding is a lookup, not a matmul; a tied one is the head's matmul.
        matmul = total - (0 if head is embed else embed.numel())
        return cls(matmul - head.numel(), head.numel(), config.num_hidden_layers, config.hidden_size)

    def sequence(self, length: int) -> float:
        """Training FLOPs of one sequence, forward and backward (PaLM's accounting: 6N per token plus
        12 * layers * hidden * length per token for attention)."""
        return 6 * (self.body_params + self.head_params) * length + 12 * self.layers * self.hidden * length ** 2

    def pair(self, prompt: int, chosen: int, rejected: int) -> float:
        """Model FLOPs of a preference pair: its two sequences, prompt + response each, unpadded. This is
        the same numerator for every trainer, whatever it executes."""
        return self.sequence(prompt + chosen) + self.sequence(prompt + rejected)

    def pair_prefix_shared(self, prompt: int, chosen: int, rejected: int) -> float:
        """What our trainer executes for the pair: the prompt once, the vocabulary projection only where
        a response token is predicted, attention over each response's own context."""
        tokens = prompt + chosen + rejected
        attention = 12 * self.layers * self.hidden * ((prompt + chosen) ** 2 + (prompt + rejected) ** 2 - prompt ** 2)
        return 6 * self.body_params * tokens + 6 * self.head_params * (chosen + rejected) + attention
