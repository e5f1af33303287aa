"""TRL's DPOTrainer on the same pairs and settings as our trainer: the benchmark's contender, run by
``dpo_dist.bench`` in a process of its own so its peak resident memory is its own.

    python -m dpo_dist.bench.trl_dpo --out result.json [--precompute] -- <the Hydra overrides our trainer got>

Our config (composed from the same overrides) is the one source of the settings; this maps it onto
``DPOConfig``: sigmoid DPO with the same beta, AdamW (torch's fused one, the optimizer our trainer passes
DeepSpeed) with the same lr, betas, eps and weight decay, constant schedule, the same clipping,
global batch = micro-batch x accumulation, fp32, gradient checkpointing as
``model.gradient_checkpointing`` says (TRL's DPOConfig turns it on by default: the benchmark runs
both trainers with it off and with it on, and compares like with like), dropout off (both). The examples are tokenised
by our tokenizer code and fed in our trainer's order (a sequential sampler over the pairs arranged
as ``data.global_batches`` orders them), so every optimizer step of both trainers sees the same
token sequences; TRL's own collator, forward, loss and optimizer loop do the rest. The loss curves
of the two must then agree, which the benchmark checks.

Writes ``--out``: per-step seconds (TRL's step begin to step end), logged losses, reference
precomputation seconds, setup seconds and the process's peak RSS (VmHWM).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch

from dpo_dist import memory
from dpo_dist.artifacts import write_json

# TRL scores the reference in stacked, padded rows, where larger batches are faster (ours packs 2
# pairs per row, train.reference_batch_size); 8 is TRL's own default (per_device_eval_batch_size).
TRL_REFERENCE_BATCH = 8


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--precompute", action="store_true", help="precompute_ref_log_probs=True")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    started = time.perf_counter()

    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from dpo_dist.config import compose
    from dpo_dist.data import global_batches, load_pairs, tokenize_pairs
    from dpo_dist.models import load_tokenizer, resolve_model_path

    cfg = compose(args.overrides)
    loss = cfg.loss
    if loss.name != "sigmoid" or loss.rpo_alpha or loss.label_smoothing:
        raise SystemExit("loss: the TRL comparison runs plain sigmoid DPO (loss=dpo)")
    tokenizer = load_tokenizer(cfg.model)
    pairs, _ = tokenize_pairs(load_pairs(cfg.data), tokenizer, cfg.data)
    steps = cfg.train.max_steps
    gbs = cfg.train.global_batch_size
    if steps <= 0 or steps > len(pairs) // gbs:
        raise SystemExit(f"train.max_steps: {steps} steps of {gbs} pairs must fit in the {len(pairs)} pairs (one epoch)")
    order = [i for batch in global_batches(len(pairs), gbs, cfg.train.seed, 0)[:steps] for i in batch]
    dataset = Dataset.from_list([{"prompt_ids": pairs[i].prompt_ids, "chosen_ids": pairs[i].chosen_ids,
                                  "rejected_ids": pairs[i].rejected_ids} for i in order])

    timings: dict = {"step_seconds": [], "losses": [], "precompute_seconds": 0.0}

    class StepClock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            timings["step_seconds"].append(time.perf_counter() - self.t)

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                timings["losses"].append(logs["loss"])

    class SameTokensDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # already tokenised by dpo_dist.data, the same token ids our trainer sees

        def _precompute_ref_logps(self, dataset, name, batch_size):
            t = time.perf_counter()
            out = super()._precompute_ref_logps(dataset, name, batch_size)
            timings["precompute_seconds"] += time.perf_counter() - t
            return out

    o = cfg.optim
    with tempfile.TemporaryDirectory() as tmp:
        dpo_args = DPOConfig(
            output_dir=tmp, use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True,
            seed=cfg.train.seed, max_steps=steps, per_device_train_batch_size=cfg.train.micro_batch_size,
            gradient_accumulation_steps=cfg.train.accumulation_steps(1), train_sampling_strategy="sequential",
            dataloader_num_workers=0, dataloader_pin_memory=False,
            learning_rate=o.lr, adam_beta1=o.adam_betas[0], adam_beta2=o.adam_betas[1], adam_epsilon=o.adam_eps,
            weight_decay=o.weight_decay, max_grad_norm=o.max_grad_norm, lr_scheduler_type="constant", warmup_steps=0,
            optim="adamw_torch_fused", bf16=False, fp16=False, gradient_checkpointing=cfg.model.gradient_checkpointing,
            beta=loss.beta, loss_type=["sigmoid"], max_length=cfg.data.max_length, disable_dropout=True,
            precompute_ref_log_probs=args.precompute, precompute_ref_batch_size=TRL_REFERENCE_BATCH,
            model_init_kwargs={"dtype": torch.float32},
        )
        trainer = SameTokensDPOTrainer(model=resolve_model_path(cfg.model), args=dpo_args, train_dataset=dataset,
                                       processing_class=tokenizer, callbacks=[StepClock()])
        setup_seconds = time.perf_counter() - started
        trainer.train()
    write_json(args.out, {**timings, "setup_seconds": setup_seconds, "peak_rss_gib": memory.peak_bytes() / memory.GIB,
                          "threads": torch.get_num_threads(), "trl_version": _version("trl"),
                          "reference_resident": not args.precompute})


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    main(sys.argv[1:])
