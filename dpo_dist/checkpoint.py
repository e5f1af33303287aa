"""Checkpoints (DeepSpeed's own format, every N steps), resume from the latest, Hugging Face export.

DeepSpeed writes a checkpoint's files into ``checkpoints/<tag>/`` and only then updates the
``latest`` pointer, so a job killed while saving resumes from the previous complete checkpoint.
These are our own files (they are loaded with DeepSpeed's torch.load): never point ``train`` at a
checkpoint directory from an untrusted source. The exported model is safetensors only.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import yaml

from dpo_dist import dist
from dpo_dist.artifacts import atomic_dir

log = logging.getLogger(__name__)
TAG = re.compile(r"^step-(\d+)$")


def tag(step: int) -> str:
    return f"step-{step:07d}"


def latest_step(ckpt_dir: Path) -> int | None:
    pointer = Path(ckpt_dir) / "latest"
    if not pointer.is_file():
        return None
    m = TAG.match(pointer.read_text().strip())
    return int(m.group(1)) if m else None


def save(engine, ckpt_dir: Path, step: int, client_state: dict, keep: int) -> None:
    engine.save_checkpoint(str(ckpt_dir), tag=tag(step), client_state=client_state)
    dist.barrier()
    if dist.is_main():
        _prune(Path(ckpt_dir), keep, protect=tag(step))


def _prune(ckpt_dir: Path, keep: int, protect: str) -> None:
    tags = sorted((p for p in ckpt_dir.iterdir() if p.is_dir() and TAG.match(p.name)), key=lambda p: p.name)
    for old in tags[:-keep] if keep > 0 else []:
        if old.name != protect:
            shutil.rmtree(old, ignore_errors=True)


def resume(engine, ckpt_dir: Path) -> dict | None:
    """Load the latest checkpoint into the engine (weights, optimizer, scheduler); its client state."""
    if latest_step(ckpt_dir) is None:
        return None
    path, client_state = engine.load_checkpoint(str(ckpt_dir))
    if path is None:
        raise RuntimeError(f"{ckpt_dir}/latest points at a checkpoint DeepSpeed could not load")
    log.info("resumed from %s", path)
    return client_state


def export_hf(engine, tokenizer, out_dir: Path, run_config: dict, metrics: dict) -> None:
    """A Hugging Face directory that from_pretrained and vLLM load: consolidated weights (gathered
    from ZeRO-3 partitions) as safetensors, the tokenizer with its chat template, a model card."""
    state = dist.full_state_dict(engine)
    if dist.is_main():
        with atomic_dir(out_dir) as tmp:
            engine.module.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            (tmp / "README.md").write_text(model_card(run_config, metrics))
        log.info("exported Hugging Face model to %s", out_dir)
    dist.barrier()


def model_card(run_config: dict, metrics: dict) -> str:
    model = run_config.get("model", {})
    judge = run_config.get("judge", {})
    lines = [
        "---", "library_name: transformers", "tags: [dpo, dpo_dist]", "---", "",
        f"# {model.get('name', 'model')} after DPO with dpo_dist", "",
        f"Base model: `{model.get('path')}`. Target identity: {judge.get('old_name')} -> {judge.get('new_name')}.", "",
        "## Final training metrics", "", "| metric | value |", "|---|---|",
        *[f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in sorted(metrics.items())],
        "", "## Configuration", "", "```yaml", yaml.safe_dump(run_config, sort_keys=False).rstrip(), "```", "",
    ]
    return "\n".join(lines)
