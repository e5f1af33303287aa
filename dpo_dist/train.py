"""Stage 4: DPO training with DeepSpeed ZeRO (stage 2, 3, CPU offload).

    python -m dpo_dist.train run_dir=runs/demo
    torchrun --nproc_per_node=2 -m dpo_dist.train run_dir=runs/demo deepspeed=zero3
    python -m dpo_dist.train -m loss.beta=0.05,0.1 optim.lr=5e-7,1e-6      # Hydra sweep

Setup -> loop -> save, top to bottom. The reference log-probs come from the cache written by
``dpo_dist.reference`` (computed first if missing or stale, and the reference model freed before the
policy loads), so only the policy is resident while training. Chosen and rejected of a micro-batch
go through the model in one forward pass. Metrics use TRL's names and are averaged over the global
batch across ranks. A checkpoint is written every ``train.save_every`` steps (to
``train.checkpoint_dir``); a re-run resumes from the newest complete one, also at another world size
(dpo_dist/checkpoint.py). SIGTERM or SIGUSR1 (Slurm's warning before the time limit) make every
rank stop at the next step boundary, after a checkpoint. A finished run keeps its export and drops its checkpoints
(``train.keep_checkpoints_after_export``).
"""

from __future__ import annotations

import logging
import math
import shutil
import signal
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import torch
from omegaconf import OmegaConf

from dpo_dist import attention, checkpoint, dist, fused, memory, reference
from dpo_dist.artifacts import DataError, fingerprint, read_json, write_json
from dpo_dist.cli import stage_main
from dpo_dist.config import Config, ConfigError, OptimConfig
from dpo_dist.data import collate_shared_prompt, global_batches, micro_batches, tokenize_pairs
from dpo_dist.losses import dpo_loss
from dpo_dist.models import load_model, load_tokenizer, model_fingerprint, torch_dtype
from dpo_dist.progress import Progress
from dpo_dist.tracking import Tracker

log = logging.getLogger(__name__)
EXIT_PREEMPTED = 124  # what a preempted run exits with, so a Slurm script knows to requeue


class TrainingDiverged(RuntimeError):
    pass


class Preempted(SystemExit):
    def __init__(self) -> None:
        super().__init__(EXIT_PREEMPTED)


def training_fingerprint(cfg: Config, reference_fp: str) -> str:
    """What the checkpoints depend on. Logging and saving cadence and where checkpoints go are left
    out: changing them and re-running resumes instead of refusing."""
    # Micro-batch and accumulation split the same global batch (tests show they train alike), fused
    # ops change float rounding only (tests/test_fused.py) and bucket sizes only communication. The
    # world size, ZeRO stage and offload cut the checkpoint's files differently, not the training:
    # each checkpoint records them (checkpoint.Layout) and a resume at another converts it.
    train = {k: v for k, v in asdict(cfg.train).items()
             if k not in ("log_every", "save_every", "keep_checkpoints", "keep_checkpoints_after_export",
                          "checkpoint_dir",
                          "logps_chosen_patience", "reference_batch_size", "reference_batch_size_zero3", "micro_batch_size",
                          "gradient_accumulation_steps", "fused_ops", "release_free_heap")}
    # A later round's starting weights (rounds.init), which may differ from its reference's; a
    # round-1 run keeps the fingerprint it had before rounds existed.
    init = [model_fingerprint(cfg.model_for("init"))] if cfg.rounds.previous else []
    return fingerprint(reference_fp, asdict(cfg.loss), asdict(cfg.optim), train, *init)


def lr_lambda(optim: OptimConfig, total_steps: int):
    warmup = int(optim.warmup_ratio * total_steps)

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if optim.scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if optim.scheduler == "cosine" else 1 - progress
        return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * decay

    return f


class StopFlag:
    """Set by SIGTERM / SIGUSR1; acted on at the next optimizer-step boundary by every rank at once,
    or, for a signal during the final save or the export (which it must not cut short), once the
    export is written. ``run`` puts the handlers before it back however training ends: the pipeline
    judges and scores the next round (or the next sweep job) in this process, where SIGTERM
    (torchrun's, scancel's) must end it, not be logged and ignored."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.requested = False
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        log.warning("received %s: checkpointing at the next step boundary", signal.Signals(signum).name)
        self.requested = True


class CollapseWatch:
    """Warn when logps/chosen falls for `patience` logged steps in a row: the chosen answer is getting
    less likely even as the margin grows, the first sign of the likelihood-displacement collapse."""

    def __init__(self, patience: int) -> None:
        self.patience, self.history, self.warned = patience, [], False

    def update(self, logps_chosen: float, step: int) -> None:
        self.history.append(logps_chosen)
        recent = self.history[-(self.patience + 1):]
        falling = len(recent) == self.patience + 1 and all(b < a for a, b in zip(recent, recent[1:]))
        if falling and not self.warned:
            log.warning("logps/chosen has fallen for %d steps in a row (%.3f -> %.3f at step %d): the chosen answers "
                        "are losing likelihood. Consider a lower optim.lr, a larger loss.rpo_alpha, or loss=ipo.",
                        self.patience, recent[0], recent[-1], step)
        self.warned = falling


def run(cfg: Config) -> dict:
    before = {sig: signal.getsignal(sig) for sig in StopFlag.SIGNALS}
    try:
        return _run(cfg)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def _finished(summary_path: Path, final_dir: Path, train_fp: str) -> dict | None:
    """The metrics of a training that finished with these settings (its summary names this
    fingerprint and its export is there), None when it has to run. A summary that cannot be read is
    an error naming it, not a reason to train again over an export that may be finished."""
    if not (summary_path.is_file() and final_dir.is_dir()):
        return None
    try:
        summary = read_json(summary_path)
        if not isinstance(summary, dict):
            raise DataError(f"{summary_path}: not a JSON object")
    except DataError as e:
        raise DataError(f"{e}; remove it to train again (which replaces {final_dir})") from None
    return summary.get("metrics") if summary.get("fingerprint") == train_fp else None


def _run(cfg: Config) -> dict:
    denv = dist.init()
    out_dir = Path(cfg.run_dir) / "train"
    ckpt_dir = Path(cfg.train.checkpoint_dir) if cfg.train.checkpoint_dir else out_dir / "checkpoints"
    final_dir, summary_path = out_dir / "final", out_dir / "summary.json"
    accum = cfg.train.accumulation_steps(denv.world_size)

    cache = reference.ensure(cfg)  # compute or reuse; the reference model is gone when this returns
    ref_fp = cache.fingerprint
    phases = memory.PhasePeaks()  # the training peak is its own, not the reference pass's
    dtype = torch_dtype(cfg.model.dtype)
    ds = cfg.deepspeed.for_world(denv.world_size, dtype == torch.float32)

    def decide() -> tuple[str, dict | None]:
        fp = training_fingerprint(cfg, ref_fp)  # hashes a later round's starting weights: once, not per rank
        return fp, _finished(summary_path, final_dir, fp)

    # Rank 0 decides and every rank follows: on a shared filesystem another node may not see the
    # summary yet (NFS attribute caching), and a rank that trained while the others returned would
    # wait in DeepSpeed's first collective until the timeout.
    train_fp, finished = dist.on_main(decide)
    if finished is not None:
        if denv.is_main:
            log.info("training already finished with these settings: %s", final_dir)
            if not cfg.train.keep_checkpoints_after_export:
                shutil.rmtree(ckpt_dir, ignore_errors=True)  # a run killed right after its summary
        return finished
    _claim_checkpoints(ckpt_dir, train_fp, "train.checkpoint_dir" if cfg.train.checkpoint_dir else "run_dir")

    tokenizer = load_tokenizer(cfg.model)
    records, read = reference.read_pairs_on_every_rank(cfg)
    if read != cache.pairs:  # the same on every rank, so every rank raises
        raise reference.StaleReference(f"{cfg.data.pairs}: changed since its reference log-probs were computed "
                                       f"(records {cache.pairs}, now {read}); run again to score the new version")
    pairs, stats = tokenize_pairs(records, tokenizer, cfg.data)
    ref_chosen, ref_rejected = reference.load(cfg, [p.id for p in pairs], ref_fp)
    steps_per_epoch = len(pairs) // cfg.train.global_batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"train.global_batch_size: {cfg.train.global_batch_size} is larger than the "
                          f"{len(pairs)} usable pairs in {cfg.data.pairs}")
    total_steps = cfg.train.max_steps if cfg.train.max_steps > 0 else cfg.train.epochs * steps_per_epoch
    anchors = sum(p.anchor for p in pairs)
    if denv.is_main:
        log.info("pairs: %d kept (%d anchors), %d truncated, %d dropped; %d steps (%d per epoch), "
                 "global batch %d = %d x %d x %d ranks", stats.kept, anchors, stats.truncated, stats.dropped,
                 total_steps, steps_per_epoch, cfg.train.global_batch_size, cfg.train.micro_batch_size, accum,
                 denv.world_size)
        if anchors and cfg.loss.rpo_alpha == 0:
            log.warning("%d anchor records (chosen == rejected) train nothing with loss.rpo_alpha=0", anchors)

    if ds.stage != cfg.deepspeed.stage and denv.is_main:
        log.info("one rank, fp32: ZeRO stage %d has nothing to partition; training with stage %d", cfg.deepspeed.stage, ds.stage)
    layout = checkpoint.Layout.of(ds, denv.world_size)
    resume_from = checkpoint.resume_point(ckpt_dir, layout)
    ds_config = dist.deepspeed_config(ds, cfg.train, cfg.optim, denv.world_size, dtype,
                                      load_universal=bool(resume_from and resume_from.universal and ds.stage > 0))
    with dist.zero3_model_loading(ds, ds_config):
        model = load_model(cfg.model_for("init"))
    _prepare_for_training(model, cfg.model.gradient_checkpointing)
    if cfg.train.release_free_heap and dist.device().type == "cpu":
        # The input embedding's backward runs last, when the micro-batch's activations are freed.
        model.get_input_embeddings().register_full_backward_pre_hook(_release_free_heap)
    fused_ops = cfg.train.fused_ops
    fused_counts = fused.apply(model) if fused_ops else {}
    if fused_ops and denv.is_main:
        log.info("fused ops: chunked vocabulary log-softmax, %d SwiGLU MLPs, %d RMSNorms",
                 fused_counts["mlp"], fused_counts["rms_norm"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.adam_betas),
                                  eps=cfg.optim.adam_eps, weight_decay=cfg.optim.weight_decay,
                                  # With the optimizer offloaded, its step runs on the host.
                                  fused=dist.fused_adamw(torch.device("cpu") if ds.offload_optimizer else dist.device()))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optim, total_steps))
    engine = dist.build_engine(model, optimizer, scheduler, ds_config)

    client_state = checkpoint.resume(engine, resume_from) or {}
    # Loading and partitioning the model peak on their own (a whole tensor beside its partitions and
    # DeepSpeed's flat copies), and so do checkpoint saves (the states copied to host memory): each
    # read apart, so the loop's own peak -- what the micro-batch, checkpointing and the fused ops
    # change -- shows under them.
    phases.end("setup")
    start_step = int(client_state.get("step", 0))
    metrics: dict = dict(client_state.get("metrics", {}))  # a resume at the last step still has them
    run_config = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    tracker = Tracker(out_dir, cfg.wandb, run_config, name=f"{Path(cfg.run_dir).name}-{train_fp}", resume_step=start_step)
    stop, watch = StopFlag(), CollapseWatch(cfg.train.logps_chosen_patience)
    saved = None
    dev = dist.device()
    bar = Progress(total_steps, "train", unit="step", initial=start_step)

    for step in range(start_step, total_steps):
        epoch, k = divmod(step, steps_per_epoch)
        batch_ids = global_batches(len(pairs), cfg.train.global_batch_size, cfg.train.seed, epoch)[k]
        started = time.perf_counter()
        lr = scheduler.get_last_lr()[0]  # the rate this step uses (the scheduler advances inside engine.step)
        sums: dict[str, float] = defaultdict(float)
        stage0_norm = None
        for mb in micro_batches(batch_ids, denv.rank, denv.world_size, cfg.train.micro_batch_size):
            # Prefix-shared packing: each prompt runs once for both responses, no padding, and the
            # vocabulary projection only where a response token is predicted (see collate_shared_prompt).
            batch = {key: v.to(dev) for key, v in collate_shared_prompt([pairs[i] for i in mb], dtype).items()}
            n = len(mb)
            logps, lengths = reference.packed_logps(engine, batch, 2 * n, fused_ops)
            # An anchor (chosen == rejected) has the same value on both sides here and in the
            # reference cache (score_pairs goes through packed_logps too); dpo_loss drops its
            # preference term.
            anchor = batch["anchor"]
            out = dpo_loss(logps[:n], logps[n:], ref_chosen[mb].to(dev), ref_rejected[mb].to(dev),
                           lengths[:n], lengths[n:], cfg.loss, anchor)
            # Each part's own high-water mark, from what is live when it begins. forward: activations
            # and gathered parameters (and the previous step's metrics); backward: the activations'
            # and layers' gradients and their reduction (every micro-batch at ZeRO 2/3, at the
            # boundary at 0/1); step: the optimizer update, at the accumulation boundary only.
            phases.end("forward", within="loop")
            engine.backward(out.losses.mean())
            stage0_norm = dist.boundary_grad_norm(engine) or stage0_norm
            phases.end("backward", within="loop")
            engine.step()
            phases.end("step", within="loop")
            _accumulate(sums, out, logps.detach(), lengths, ~anchor, batch["input_ids"].numel(), batch["labels"].numel())
        grad_norm = float(engine.get_global_grad_norm() or stage0_norm or 0.0)
        sums["stop"] = float(stop.requested)
        total = dist.all_reduce_sum(sums)
        metrics = _step_metrics(total, grad_norm, lr, epoch, time.perf_counter() - started)

        if not (math.isfinite(metrics["loss"]) and math.isfinite(grad_norm)):
            last = checkpoint.latest_step(ckpt_dir)
            bar.close()
            raise TrainingDiverged(f"step {step + 1}: loss={metrics['loss']} grad_norm={grad_norm} is not finite; "
                                   f"stopped without saving. Last good checkpoint: "
                                   f"{ckpt_dir / checkpoint.tag(last) if last else 'none'}")
        watch.update(metrics["logps/chosen"], step + 1)
        bar.update(1, loss=metrics["loss"])
        if (step + 1) % cfg.train.log_every == 0 or step + 1 == total_steps:
            tracker.log(metrics, step + 1)
        preempted, last = total["stop"] > 0, step + 1 == total_steps
        # The last step goes straight to the export; a checkpoint there only serves to continue training.
        periodic = (step + 1) % cfg.train.save_every == 0 and not last
        if periodic or preempted or (last and cfg.train.keep_checkpoints_after_export):
            phases.end("loop")
            saved = checkpoint.save(engine, ckpt_dir, step + 1, {"step": step + 1, "metrics": metrics},
                                    cfg.train.keep_checkpoints, layout)
            phases.end("save")
            if denv.is_main:
                log.info("checkpoint %s: %.2f GB in %.1f s, %.2f GB/s", checkpoint.tag(step + 1), saved.bytes / 1e9,
                         saved.seconds, saved.gbps)
        if preempted and step + 1 < total_steps:
            log.warning("stopping after step %d on request; re-run the same command to resume", step + 1)
            tracker.finish()
            bar.close()
            raise Preempted()
    bar.close()

    # Read before the export: gathering full weights on rank 0 is not the training loop's memory.
    phases.end("loop")
    peaks = memory.phase_summary(dist.all_gather_object(phases.peaks), ("setup", "loop", *memory.STEP_PARTS, "save"))
    checkpoint.export_hf(engine, tokenizer, final_dir, run_config, metrics)
    dist.end_zero3_model_loading()
    if denv.is_main:
        write_json(summary_path, {"fingerprint": train_fp, "metrics": metrics, "steps": total_steps,
                                  "world_size": denv.world_size, "zero_stage": ds.stage, "pairs": stats.kept,
                                  "init_model": cfg.model_for("init").path,
                                  "fused_ops": fused_counts,
                                  "checkpoint_save_gbps": round(saved.gbps, 3) if saved else None,
                                  **peaks})
        if not cfg.train.keep_checkpoints_after_export:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
    tracker.finish()
    # The pipeline evaluates next in this process: the policy, its gradients and optimizer states must
    # not stay resident on the GPU (DeepSpeed keeps a ZeRO-3 engine alive after it is dropped).
    dist.release_model(engine)
    optimizer.state.clear()
    del engine, model, optimizer, scheduler
    dist.free_memory()
    # A signal after the last step's check (during the final save or the export): training is done and
    # exported, so a re-run goes on from here; stop now (exit 124, requeue) rather than be killed
    # later in the next stage. Every rank agrees, as in the loop (the reduction is also the barrier
    # after which every rank has freed its training memory).
    if dist.all_reduce_sum({"stop": float(stop.requested)})["stop"] > 0:
        log.warning("stopping on request after the export; re-run the same command to continue")
        raise Preempted()
    return metrics


def _claim_checkpoints(ckpt_dir: Path, train_fp: str, key: str) -> None:
    """Checkpoints belong to one set of settings: resuming another run's optimizer state would be a
    silent mix of two experiments. ``key``: the setting that chose ``ckpt_dir``, for the message.
    Rank 0 checks and claims, and every rank raises its error (dist.on_main)."""
    owner = ckpt_dir / "fingerprint.json"

    def claim() -> None:
        if owner.is_file():
            recorded = read_json(owner)
            recorded = recorded.get("fingerprint") if isinstance(recorded, dict) else recorded
            if recorded != train_fp:
                raise ConfigError(f"{key}: {ckpt_dir} holds checkpoints of a run with other settings "
                                  f"({recorded} != {train_fp}); use a new {key} or remove them")
        else:
            write_json(owner, {"fingerprint": train_fp})

    dist.on_main(claim)


def _release_free_heap(module, grad_output) -> None:
    memory.release_free_heap()  # returns None: a backward pre-hook's result would replace the gradient


def _prepare_for_training(model: torch.nn.Module, gradient_checkpointing: bool) -> None:
    # Dropout would make policy != reference at step 0 and add noise DPO's log-ratios do not need.
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    model.config.use_cache = False
    # Set for the model's life, not around each forward: a checkpointed layer's recomputation in the
    # backward pass must take the attention path its forward took.
    attention.use_pair_blocks(model)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()


def _accumulate(sums: dict, out, logps: torch.Tensor, lengths: torch.Tensor, preference: torch.Tensor,
                num_tokens: int, response_tokens: int) -> None:
    """Per-micro-batch sums. Reward and rejected-side figures count preference pairs only: an
    anchor's margin is zero by construction and would read as a wrong ranking."""
    n = len(preference)
    sums["n"] += n
    sums["pairs"] += preference.sum().item()
    sums["loss"] += out.losses.detach().sum().item()
    sums["rewards/chosen"] += out.chosen_rewards[preference].sum().item()
    sums["rewards/rejected"] += out.rejected_rewards[preference].sum().item()
    sums["rewards/accuracies"] += (out.chosen_rewards > out.rejected_rewards)[preference].float().sum().item()
    sums["logps/chosen"] += logps[:n].sum().item()
    sums["logps/rejected"] += logps[n:][preference].sum().item()
    sums["nll/chosen"] += (-logps[:n] / lengths[:n].clamp(min=1)).sum().item()
    sums["tokens"] += num_tokens  # tokens through the model: each prompt counted once
    sums["response_tokens"] += response_tokens


def _step_metrics(total: dict, grad_norm: float, lr: float, epoch: int, seconds: float) -> dict:
    n, pairs = total["n"], total["pairs"]
    m = {k: total[k] / n for k in ("loss", "logps/chosen", "nll/chosen")}
    m.update({k: total[k] / pairs if pairs else float("nan")
              for k in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/rejected")})
    m["rewards/margins"] = m["rewards/chosen"] - m["rewards/rejected"]
    m.update({"grad_norm": grad_norm, "lr": lr, "epoch": epoch, "tokens_per_s": total["tokens"] / seconds,
              "response_tokens_per_s": total["response_tokens"] / seconds, "step_seconds": seconds})
    return m


main = stage_main(run)

if __name__ == "__main__":
    main()
