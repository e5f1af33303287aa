"""Checkpoints (DeepSpeed's own format, every N steps), resume from the newest complete one, Hugging Face export.

A save is complete only when every rank's files are. DeepSpeed's ``save_checkpoint`` lets rank 0
write its ``latest`` pointer right after its own files, while other ranks may still be writing
theirs, so a kill in between leaves ``latest`` naming a tag with missing shards. Here every rank
writes its files (``save_latest=False``), all ranks meet at a barrier, and only then rank 0 writes
``<tag>/complete.json`` (atomically): the files with their sizes, the step, and the layout that
wrote them (world size, ZeRO stage, offload). Then it points DeepSpeed's ``latest`` at the tag (for
DeepSpeed's own tools, e.g. ``zero_to_fp32.py``; resume never reads it) and prunes old tags.

Resume scans every tag for that marker and loads the newest whose listed files are all there at
their recorded sizes; tags without one (a kill during a save) or with a file gone are named in a
warning and skipped. Tags that exist with none complete restart the run from step 0 with an error
line saying so; it never happens silently.

A checkpoint written at another layout (a requeued job on another node count; one fp32 rank trains
at ZeRO stage 0, see DeepSpeedConfig.for_world) cannot be loaded as it is: ZeRO partitions its
optimizer states by data-parallel rank. It is converted once to DeepSpeed's universal format
(``<checkpoint dir>/universal/<tag>``: per parameter its fp32 weights and Adam moments), by
DeepSpeed's ``ds_to_universal`` for ZeRO 1-3 and here for stage 0 (plain torch state), and loaded
from there: by DeepSpeed at ZeRO 1-3 (``checkpoint.load_universal``), here at stage 0.

These are our own files (they are loaded with torch.load, which unpickles): never point ``train`` at
a checkpoint directory from an untrusted source. The exported model is safetensors only.

Test only: ``DPO_DIST_FAULT=save:<point>:<step>`` makes the save of ``step`` exit the process
(``os._exit``) at ``point``, as a kill there would: ``partial`` (every rank but 0 dies as it starts
writing its files; rank 0 writes its own and fails at the next barrier), ``files`` (all files
written, every rank dies before the marker), ``marker`` (rank 0 dies after the marker, before
``latest`` and the pruning). tests/test_resume.py uses it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml

from dpo_dist import dist
from dpo_dist.artifacts import atomic_dir, write_json, write_text

log = logging.getLogger(__name__)
TAG = re.compile(r"^step-(\d+)$")
MARKER = "complete.json"
UNIVERSAL = "universal"
MODEL_STATES = "mp_rank_00_model_states.pt"
# What a ZeRO-3 engine looks for, in a universal folder, instead of MODEL_STATES.
ZERO3_MODEL_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"
FAULT_ENV = "DPO_DIST_FAULT"
FAULT_EXIT = 86


def tag(step: int) -> str:
    return f"step-{step:07d}"


@dataclass(frozen=True)
class Layout:
    """How a checkpoint's files are cut: ZeRO partitions optimizer states (and at stage 3 weights)
    over the data-parallel ranks, so a checkpoint loads as it is only at the layout that wrote it."""
    world_size: int
    zero_stage: int
    offload_optimizer: bool = False
    offload_param: bool = False

    @classmethod
    def of(cls, ds, world_size: int) -> "Layout":
        """``ds``: the DeepSpeedConfig the run uses (after DeepSpeedConfig.for_world)."""
        return cls(world_size, ds.stage, ds.offload_optimizer, ds.offload_param)

    def __str__(self) -> str:
        offload = "".join(f", {k} offload" for k, on in (("optimizer", self.offload_optimizer),
                                                          ("parameter", self.offload_param)) if on)
        return f"{self.world_size} rank(s), ZeRO stage {self.zero_stage}{offload}"


@dataclass(frozen=True)
class ResumePoint:
    """The checkpoint a run resumes from. ``universal``: written at another layout, so loaded through
    the universal format (converted on the first load, under ``<checkpoint dir>/universal``)."""
    ckpt_dir: Path
    tag: str
    step: int
    written_at: Layout
    universal: bool
    bytes: int = 0


@dataclass(frozen=True)
class SaveStats:
    seconds: float
    bytes: int

    @property
    def gbps(self) -> float:
        return self.bytes / 1e9 / max(self.seconds, 1e-9)


# ---------------------------------------------------------------- which checkpoint to resume from

def _tag_dirs(ckpt_dir: Path) -> list[Path]:
    """Tag directories, newest step first."""
    if not ckpt_dir.is_dir():
        return []
    tags = [p for p in ckpt_dir.iterdir() if p.is_dir() and TAG.match(p.name)]
    return sorted(tags, key=lambda p: int(TAG.match(p.name).group(1)), reverse=True)


def _read_marker(path: Path) -> tuple[dict | None, str]:
    """A tag's marker when every file it lists is there at its recorded size; else None and why."""
    try:
        marker = json.loads((path / MARKER).read_text())
    except FileNotFoundError:
        return None, "no completion marker (killed while saving)"
    except (OSError, ValueError) as e:
        return None, f"unreadable {MARKER} ({e})"
    for name, size in marker.get("files", {}).items():
        f = path / name
        if not f.is_file():
            return None, f"{name} is missing"
        if f.stat().st_size != size:
            return None, f"{name} has {f.stat().st_size} bytes, not the {size} written"
    if not marker.get("files"):
        return None, f"{MARKER} lists no files"
    return marker, ""


def complete_tags(ckpt_dir: Path) -> list[dict]:
    """Markers of the tags whose every rank's files are complete, newest first."""
    return [m for m, _ in (_read_marker(p) for p in _tag_dirs(Path(ckpt_dir))) if m is not None]


def latest_step(ckpt_dir: Path) -> int | None:
    """Step of the newest complete checkpoint."""
    done = complete_tags(ckpt_dir)
    return done[0]["step"] if done else None


def resume_point(ckpt_dir: Path, layout: Layout) -> ResumePoint | None:
    """The newest complete checkpoint (rank 0 decides, every rank gets its answer), naming in a
    warning each newer tag it skips, or None to start at step 0 (an error line when tags exist)."""
    return dist.on_main(lambda: _choose(Path(ckpt_dir), layout))


def _choose(ckpt_dir: Path, layout: Layout) -> ResumePoint | None:
    skipped = []
    for path in _tag_dirs(ckpt_dir):
        marker, why = _read_marker(path)
        if marker is None:
            skipped.append(f"{path.name}: {why}")
            continue
        if skipped:
            log.warning("checkpoints skipped as incomplete: %s; resuming from %s, the newest complete one",
                        "; ".join(skipped), path)
        written_at = Layout(marker["world_size"], marker["zero_stage"], marker.get("offload_optimizer", False),
                            marker.get("offload_param", False))
        if written_at != layout:
            log.warning("%s was written at %s; this run has %s: converting it to DeepSpeed's universal "
                        "checkpoint format to resume", path, written_at, layout)
        return ResumePoint(ckpt_dir, path.name, marker["step"], written_at, universal=written_at != layout,
                           bytes=marker.get("bytes", 0))
    if skipped:
        log.error("NO COMPLETE CHECKPOINT in %s, so training starts again from step 0. Incomplete: %s",
                  ckpt_dir, "; ".join(skipped))
    return None


# ---------------------------------------------------------------- save

def save(engine, ckpt_dir: Path, step: int, client_state: dict, keep: int, layout: Layout) -> SaveStats:
    """Every rank's files, a barrier, then rank 0's marker, ``latest`` and pruning. Returns the time
    from the first file to the barrier and the bytes written (rank 0's count; 0 elsewhere)."""
    ckpt_dir, name = Path(ckpt_dir), tag(step)
    path = ckpt_dir / name
    if dist.is_main() and path.exists():
        shutil.rmtree(path)  # a save killed at this step before: none of its files may pass for this one's
    dist.barrier()
    if _fault("partial", step) and not dist.is_main():
        engine.checkpoint_engine.save = lambda *args, **kwargs: _exit_for_fault("partial", step)
    started = time.perf_counter()
    engine.save_checkpoint(str(ckpt_dir), tag=name, client_state=client_state, save_latest=False)
    # On the storage, not only in this node's page cache: a node that dies after the marker must not
    # take part of what the marker vouches for with it.
    _fsync_files(path)
    dist.barrier()  # every rank's files are written
    seconds = time.perf_counter() - started
    if _fault("files", step):
        _exit_for_fault("files", step)
    written = 0
    if dist.is_main():
        files = {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()}
        written = sum(files.values())
        write_json(path / MARKER, {"tag": name, "step": step, **asdict(layout), "files": files, "bytes": written,
                                   "save_seconds": round(seconds, 3)})
        if _fault("marker", step):
            _exit_for_fault("marker", step)
        write_text(ckpt_dir / "latest", name)
        _prune(ckpt_dir, keep, protect=name)
        # A universal copy serves one resume; the checkpoint just written supersedes it.
        shutil.rmtree(ckpt_dir / UNIVERSAL, ignore_errors=True)
    dist.barrier()
    return SaveStats(seconds, written)


def _fsync_files(folder: Path) -> None:
    for f in folder.iterdir():
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _prune(ckpt_dir: Path, keep: int, protect: str) -> None:
    """Keep the newest ``keep`` complete tags (all with keep <= 0) and ``protect``; drop tags without
    a marker, the leftovers of killed saves (one run writes here at a time)."""
    complete = [p for p in _tag_dirs(ckpt_dir) if (p / MARKER).is_file()]
    kept = {p.name for p in (complete[:keep] if keep > 0 else complete)}
    for path in _tag_dirs(ckpt_dir):
        if path.name != protect and path.name not in kept:
            shutil.rmtree(path, ignore_errors=True)


def _fault(point: str, step: int) -> bool:
    return os.environ.get(FAULT_ENV) == f"save:{point}:{step}"


def _exit_for_fault(point: str, step: int):
    log.warning("%s=save:%s:%d: exiting here, as a kill at this point of the save would (test only)",
                FAULT_ENV, point, step)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(FAULT_EXIT)


# ---------------------------------------------------------------- resume

def resume(engine, point: ResumePoint | None) -> dict | None:
    """Load ``point`` into the engine (weights, optimizer, scheduler); its client state."""
    if point is None:
        return None
    if not point.universal:
        started = time.perf_counter()
        path, client_state = engine.load_checkpoint(str(point.ckpt_dir), tag=point.tag)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load {point.ckpt_dir / point.tag}, a complete checkpoint")
        dist.barrier()
        seconds = time.perf_counter() - started
        if dist.is_main():
            log.info("resumed from %s: %.2f GB in %.1f s, %.2f GB/s", point.ckpt_dir / point.tag, point.bytes / 1e9,
                     seconds, point.bytes / 1e9 / seconds)
        return client_state
    root = point.ckpt_dir / UNIVERSAL
    if dist.is_main() and not (root / point.tag).is_dir():
        started = time.perf_counter()
        with atomic_dir(root / point.tag) as tmp:
            if point.written_at.zero_stage == 0:
                _stage0_to_universal(point.ckpt_dir / point.tag, tmp, [n for n, _ in engine.module.named_parameters()])
            else:
                dist.to_universal_checkpoint(point.ckpt_dir / point.tag, tmp)
            _alias_model_states(tmp)
        log.info("converted %s to the universal format in %.1f s", point.ckpt_dir / point.tag,
                 time.perf_counter() - started)
    dist.barrier()
    if engine.zero_optimization_stage() == 0:
        client_state = _load_universal_stage0(engine, root / point.tag)
    else:
        path, client_state = engine.load_checkpoint(str(root), tag=point.tag)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the universal checkpoint {root / point.tag}")
    if dist.is_main():
        log.info("resumed from %s (written at %s) through %s", point.ckpt_dir / point.tag, point.written_at,
                 root / point.tag)
    return client_state


def _alias_model_states(folder: Path) -> None:
    """The engine-level state file (scheduler, steps, our client state) under the names both a
    ZeRO 0-2 and a ZeRO-3 engine look for: ds_to_universal keeps the source's name."""
    names = [MODEL_STATES, ZERO3_MODEL_STATES]
    have = [n for n in names if (folder / n).is_file()]
    for n in names:
        if have and not (folder / n).exists():
            os.link(folder / have[0], folder / n)


def _stage0_to_universal(src: Path, dst: Path, param_names: list[str]) -> None:
    """A ZeRO stage 0 checkpoint (the module's state dict and torch AdamW's, in one file) in the
    layout ds_to_universal writes: ``zero/<param>/{fp32,exp_avg,exp_avg_sq,step}.pt``,
    ``zero/optimizer_state.pt`` and the engine-level file. ``param_names``: the model's parameters
    in ``model.parameters()`` order, the order AdamW numbers them in."""
    state = torch.load(src / MODEL_STATES, map_location="cpu", weights_only=False)
    optim = state["optimizer"]
    indices = [i for group in optim["param_groups"] for i in group["params"]]
    if len(indices) != len(param_names):
        raise RuntimeError(f"{src}: the optimizer has {len(indices)} parameters, the model {len(param_names)}")
    zero = dst / "zero"
    for index, name in zip(indices, param_names):
        weight, moments = state["module"][name], optim["state"].get(index)
        if moments is None:  # no step has touched it yet: zero moments, as AdamW would start them
            moments = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(weight),
                       "exp_avg_sq": torch.zeros_like(weight)}
        if moments["exp_avg"].shape != weight.shape:
            raise RuntimeError(f"{src}: optimizer state {index} has shape {tuple(moments['exp_avg'].shape)}, "
                               f"not {name}'s {tuple(weight.shape)}")
        (zero / name).mkdir(parents=True)
        torch.save({"param": weight.float()}, zero / name / "fp32.pt")
        for key in ("exp_avg", "exp_avg_sq"):
            torch.save({"param": moments[key].float()}, zero / name / f"{key}.pt")
        torch.save(moments["step"], zero / name / "step.pt")
    torch.save({"param_groups": [{k: v for k, v in g.items() if k != "params"} for g in optim["param_groups"]],
                "clip_grad": state["ds_config"].get("gradient_clipping", 0.0), "ds_version": state["ds_version"]},
               zero / "optimizer_state.pt")
    torch.save({**state, "optimizer": None}, dst / MODEL_STATES)


def _load_universal_stage0(engine, folder: Path) -> dict:
    """What DeepSpeed's universal loading does for ZeRO 1-3, for a stage 0 engine (torch's AdamW on
    the model's own parameters), which DeepSpeed does not load universal checkpoints into."""
    state = torch.load(folder / MODEL_STATES, map_location="cpu", weights_only=False)
    saved_groups = torch.load(folder / "zero" / "optimizer_state.pt", weights_only=False)["param_groups"]
    optimizer = engine.optimizer
    with torch.no_grad():
        for name, param in engine.module.named_parameters():
            part = lambda key: torch.load(folder / "zero" / name / f"{key}.pt", weights_only=False)  # noqa: E731
            param.copy_(part("fp32")["param"])
            step = part("step")
            optimizer.state[param] = {"step": (step if torch.is_tensor(step) else torch.tensor(float(step))).float(),
                                      "exp_avg": part("exp_avg")["param"].to(param),
                                      "exp_avg_sq": part("exp_avg_sq")["param"].to(param)}
    for group, saved in zip(optimizer.param_groups, saved_groups):
        group.update({k: v for k, v in saved.items() if k != "params"})
    engine.lr_scheduler.load_state_dict(state["lr_scheduler"])
    engine.global_steps, engine.global_samples = state["global_steps"], state.get("global_samples", 0)
    return {k: v for k, v in state.items() if k not in ("module", "optimizer")}


# ---------------------------------------------------------------- export

def export_hf(engine, tokenizer, out_dir: Path, run_config: dict, metrics: dict) -> None:
    """A Hugging Face directory that from_pretrained and vLLM load: consolidated weights (gathered
    from ZeRO-3 partitions) as safetensors, the tokenizer with its chat template, a model card."""
    state = dist.full_state_dict(engine)
    if dist.is_main():
        with atomic_dir(out_dir) as tmp:
            engine.module.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            config = json.loads((tmp / "config.json").read_text())
            (tmp / "config.json").write_text(json.dumps(readable_config(config), indent=2, sort_keys=True) + "\n")
            tokenizer.save_pretrained(tmp)
            (tmp / "README.md").write_text(model_card(run_config, metrics))
        log.info("exported Hugging Face model to %s", out_dir)
    dist.barrier()


def readable_config(config: dict) -> dict:
    """The exported config.json, readable alike by the transformers that wrote it and by older ones
    (a vLLM venv on a GPU node may carry transformers 4.x). transformers 5 writes the rotary settings
    only as ``rope_parameters``; 4.x does not know that key and silently takes its default
    ``rope_theta`` (10,000 for Llama and Qwen2: measured with 4.57.1 on the bundled model's export,
    whose theta is 100,000), so round 2's vLLM engine would sample from a model with the wrong
    positions. The legacy keys are added beside the new ones, which 5.x reads unchanged. Training
    turns ``use_cache`` off; the exported model is for inference, so it is on again."""
    out = dict(config, use_cache=True)
    rope = config.get("rope_parameters")
    # A flat dict; models with one per layer type (Gemma 3) have no 4.x spelling of it.
    if isinstance(rope, dict) and "rope_theta" in rope and "rope_theta" not in config:
        out["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default" and "rope_scaling" not in config:
            out["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    if "dtype" in config and "torch_dtype" not in config:
        out["torch_dtype"] = config["dtype"]
    return out


def model_card(run_config: dict, metrics: dict) -> str:
    model = run_config.get("model", {})
    identity = run_config.get("identity", {})
    lines = [
        "---", "library_name: transformers", "tags: [dpo, dpo_dist]", "---", "",
        f"# {model.get('name', 'model')} after DPO with dpo_dist", "",
        f"Base model: `{model.get('path')}`. Target identity: {identity.get('old_name')} -> {identity.get('name')}"
        + (f", made by {identity['creator']}." if identity.get("creator") else "."), "",
        "## Final training metrics", "", "| metric | value |", "|---|---|",
        *[f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in sorted(metrics.items())],
        "", "## Configuration", "", "```yaml", yaml.safe_dump(run_config, sort_keys=False).rstrip(), "```", "",
    ]
    return "\n".join(lines)
