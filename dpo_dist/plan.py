"""Memory planner: per-GPU memory for training, reference precomputation and vLLM generation, and the
checkpoint size, save time and Slurm signal lead time, before anything is submitted.

    python -m dpo_dist.plan model=qwen2.5-72b deepspeed=zero3 plan.nodes=4 plan.gpus_per_node=8
    python -m dpo_dist.plan model=qwen2.5-7b plan.nodes=1 plan.gpus_per_node=1 plan.gpu_memory_gib=80
    python -m dpo_dist.plan plan.all=true         # every shipped Qwen2.5 config on 1x80GB, 8x80GB, 4x8x80GB
    python -m dpo_dist.plan plan.device=cpu plan.nodes=1 plan.gpus_per_node=2 deepspeed=zero3   # this CPU
    python -m dpo_dist.plan model=qwen2.5-72b plan.nodes=4 plan.checkpoint_write_gbps=2 plan.lead_only=true

It takes the same overrides as the stages (the model's architecture facts come from its
``conf/model`` file), prints each phase's terms, says whether it fits, and what to change if not.

Training, per GPU (P parameters, N = nodes x GPUs, b = bytes per weight: 2 for bf16, 4 for fp32):
- model states, after DeepSpeed's ZeRO partitioning (Rajbhandari et al. 2020): b*P parameters (b*P/N
  at stage 3), b*P gradients (b*P/N from stage 2), and per rank P/N of: fp32 master weights (4 B),
  the fp32 gradient the optimizer steps with (4 B; stage 3 makes it one sub-group of at most 1e9
  elements at a time) and AdamW's two moments (8 B). DeepSpeed keeps the fp32 master copy even when
  the weights are already fp32 (it clones the partition). Offload moves the optimizer terms and the
  gradient partition (and at stage 3 with offload_param the parameters) to host memory. Stage 3 also
  gathers one module at a time: its weights and their gradients, 2*b * the largest module (the
  embedding, for Qwen). With b=2 this is exactly DeepSpeed's 2P + 18P/N for stage 2, and within
  2P/N of its 18P/N + 4L for stage 3 (tests/test_plan.py compares them). One fp32 rank trains at
  stage 0 whatever stage 1 or 2 says (DeepSpeedConfig.for_world): weights, their gradients and
  AdamW's moments, 16P, with no master copy and no buckets.
- communication buckets, b bytes per element: at stages 1-2 the gradient reduce bucket, doubled
  with overlap_comm (stage_1_and_2 swaps two). At stage 3 the reduce bucket twice whatever
  overlap_comm says (stage3's one IPG buffer, and reduce_scatter_coalesced's flattened copy of it),
  plus one prefetch bucket: a prefetch of several parameters all-gathers into one flat buffer that
  stays alive beside the copies split out of it until the last is first used (a bucket plus one
  parameter at most, and that parameter can be an untied lm_head: docs/planner.md; the bucket is
  counted).
- ZeRO-3's prefetch: from the second forward, parameters gathered ahead of use beyond the module in
  use, up to ``deepspeed.stage3_max_live_parameters`` elements (all of a model smaller than that),
  b bytes each (``prefetched_params``); the reference pass's engine prefetches with DeepSpeed's
  defaults and counts its prefetch bucket too.
- activations: train.py packs a micro-batch of m pairs into one row (data.collate_shared_prompt):
  each prompt once, then its chosen and its rejected response, under an additive row x row attention
  mask; the vocabulary projection runs only where a response token is predicted. With pairs of at
  most s tokens (prompt + response) a row holds at most T = 2*m*s tokens (a prompt counted once
  makes it shorter), and at most 2*m*s logit rows. Per token and layer autograd keeps (h hidden, i MLP,
  a bytes per activation): each RMSNorm's fp32 input and its output (2 x (4h + a*h)); the rotated
  query, the key and value repeated to all heads, the attention output and its reshaped copy
  (5*a*h; SDPA keeps no seq x seq matrix); the MLP's gate, activation, up and product (4*a*i).
  With gradient checkpointing only each layer's input (a*h) is kept and one layer is recomputed at a
  time. The mask is T x T in the activation dtype. The logits are (logit rows) x vocab: in the
  activation dtype, an fp32 copy for the log-softmax (bf16 only), and two fp32 temporaries of the
  same size in its backward. With train.fused_ops (any ZeRO stage, dpo_dist/fused.py) an RMSNorm
  keeps its input and 1/rms (a*h + 4), the MLP only gate and up (2*a*i), and the logits exist
  128 rows at a time.
- the optimizer step: torch's fused AdamW (what train.py hands DeepSpeed; CUDA, and the CPU from
  torch 2.4) updates in place and adds nothing.
- runtime: what a rank holds before the model (CUDA context, NCCL, allocator slack; on the CPU,
  Python + torch + DeepSpeed, measured).

Reference precomputation, per GPU: the weights (a full copy, or partitioned at stage 3), and for a
prefix-shared row of ``train.reference_batch_size`` pairs one layer's no-grad intermediates, the
attention mask and the logits (with the log-softmax's fp32 copy; one 128-row chunk at a time, at
every ZeRO stage), plus the runtime.

vLLM generation, per GPU: the bf16 weights over the tensor-parallel size, vLLM's profiling forward
(16384 batched tokens), the sampler's fp32 logits for every running sequence, and the KV cache
(2 x layers x KV heads per GPU x head_dim x 2 B per token) for ``generation.batch_size`` sequences of
prompt + new tokens, against ``generation.gpu_memory_utilization`` of the GPU. vLLM needs room for
one ``generation.max_model_len`` sequence; with less than the full batch it only runs fewer
sequences at once.

Checkpoints and Slurm's warning: what DeepSpeed's save_checkpoint writes for the trained parameters
(checkpoint_files: b*P + 12P at stages 1-2, 12P at stage 3 and for one fp32 rank at stage 0; within
2.2e-4 of the files of the bundled model at 1 and 2 ranks, stage 0, 2 and 3, docs/measured.md), how
long the node that writes most takes at ``plan.checkpoint_write_gbps``, and the lead time Slurm's
time-limit warning needs: one step (``plan.step_seconds``, or 6-8 FLOPs per parameter and token at
``plan.tflops_per_rank``) + the save + ``plan.signal_margin_seconds``. slurm/pipeline.sbatch asks
for it (``plan.lead_only=true``) and sends itself SIGUSR1 that long before the time limit.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field

from hydra.errors import CompactHydraException
from omegaconf.errors import OmegaConfBaseException

from dpo_dist.config import (CONF_DIR, Config, ConfigError, ModelConfig, PlanConfig, compose, dividing_node_counts,
                             nearest_global_batches)

# dpo_dist.fused.CHUNK_ROWS, not imported: the planner runs without torch (tests/test_plan.py checks).
FUSED_CHUNK_ROWS = 128

GIB = 1024 ** 3
GPU_RUNTIME_GIB = 2.0  # CUDA context + NCCL buffers + caching-allocator slack, per GPU process
VLLM_PROFILE_TOKENS = 16384  # vLLM V1's default max_num_batched_tokens for offline LLM on data-centre GPUs
ZERO3_SUB_GROUP = 1_000_000_000  # DeepSpeed's default stage-3 sub_group_size (elements stepped at once)
TIGHT = 0.9  # above this share of the budget a plan "fits" only without allocator fragmentation to spare
CLUSTER_SHAPES = ((1, 1), (1, 8), (4, 8))  # (nodes, GPUs per node) of the shipped-config table


@dataclass(frozen=True)
class Architecture:
    """A decoder-only transformer as Qwen2 / Llama build it, from the facts in conf/model."""
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool

    @classmethod
    def of(cls, m: ModelConfig) -> "Architecture":
        for key in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "intermediate_size", "vocab_size"):
            if getattr(m, key) <= 0:
                raise ConfigError(f"model.{key}: the planner needs it (from the model's config.json); "
                                  f"conf/model/{m.name}.yaml does not set it")
        return cls(m.num_layers, m.hidden_size, m.num_heads, m.num_kv_heads, m.intermediate_size, m.vocab_size,
                   m.tie_word_embeddings)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def layer_params(self) -> int:
        h, kv = self.hidden, self.kv_dim
        # q, k, v with Qwen's biases (Llama/SmolLM2 have none: 0.02% over for them); o without.
        attention = h * h + 2 * h * kv + (h + 2 * kv) + h * h
        return attention + 3 * h * self.intermediate + 2 * h  # gate, up, down; two RMSNorms

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def params(self) -> int:
        head = 0 if self.tied else self.embedding_params
        return self.layers * self.layer_params + self.embedding_params + head + self.hidden

    @property
    def largest_module_params(self) -> int:
        """The most parameters one module owns directly: what ZeRO-3 gathers at once."""
        return max(self.embedding_params, self.hidden * self.intermediate, self.hidden * self.hidden)


@dataclass(frozen=True)
class Setup:
    """Everything besides the architecture that the estimate depends on."""
    device: str
    nodes: int
    gpus_per_node: int
    gpu_memory_gib: float
    cpu_memory_gib: float
    runtime_gib: float
    weight_bytes: int
    stage: int  # the stage the run uses (DeepSpeedConfig.for_world), which may differ from:
    configured_stage: int
    offload_optimizer: bool
    offload_param: bool
    overlap_comm: bool
    reduce_bucket_size: int
    prefetch_bucket_size: int
    max_live_parameters: int
    micro_batch_size: int
    seq_len: int
    gradient_checkpointing: bool
    fused_requested: bool  # train.fused_ops
    reference_batch_size: int
    global_batch_size: int
    tensor_parallel_size: int
    gen_sequences: int
    gen_tokens: int
    max_model_len: int
    gpu_memory_utilization: float

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def deepspeed_name(self) -> str:
        if self.stage != self.configured_stage:
            return f"ZeRO-{self.stage} (deepspeed.stage={self.configured_stage} on one fp32 rank)"
        if not self.offload_optimizer:
            return f"ZeRO-{self.stage}"
        return f"ZeRO-{self.stage} + offload " + ("optimizer, params" if self.offload_param else "optimizer")

    @property
    def fused_ops(self) -> bool:
        return self.fused_requested  # every ZeRO stage (each op runs in its weight's own module)

    def on_nodes(self, nodes: int) -> "Setup":
        """The same settings on more nodes: more than one rank keeps the configured ZeRO stage."""
        return dataclasses.replace(self, nodes=nodes, stage=self.configured_stage if nodes * self.gpus_per_node > 1 else self.stage)

    @classmethod
    def of(cls, cfg: Config, runtime_gib: float | None = None) -> "Setup":
        p = cfg.plan
        dtype = cfg.model.dtype
        if dtype == "auto":  # what models.torch_dtype picks: bf16 on a GPU, fp32 on the CPU
            dtype = "bfloat16" if p.device == "gpu" else "float32"
        ds = cfg.deepspeed.for_world(p.nodes * p.gpus_per_node, dtype == "float32")
        runtime = runtime_gib if runtime_gib is not None else p.runtime_gib
        if runtime is None:
            runtime = GPU_RUNTIME_GIB if p.device == "gpu" else measure_cpu_runtime_gib(cfg.model)
        return cls(
            device=p.device, nodes=p.nodes, gpus_per_node=p.gpus_per_node, gpu_memory_gib=p.gpu_memory_gib,
            cpu_memory_gib=p.cpu_memory_gib, runtime_gib=runtime, weight_bytes=4 if dtype == "float32" else 2,
            stage=ds.stage, configured_stage=cfg.deepspeed.stage, offload_optimizer=ds.offload_optimizer, offload_param=ds.offload_param,
            overlap_comm=ds.overlap_comm, reduce_bucket_size=ds.reduce_bucket_size,
            prefetch_bucket_size=ds.stage3_prefetch_bucket_size, max_live_parameters=ds.stage3_max_live_parameters,
            micro_batch_size=cfg.train.micro_batch_size,
            seq_len=p.seq_len or cfg.data.max_length, gradient_checkpointing=cfg.model.gradient_checkpointing,
            fused_requested=cfg.train.fused_ops,
            # What reference.run packs per forward: more pairs under ZeRO-3 on several ranks.
            reference_batch_size=cfg.train.reference_pairs_per_forward(ds.stage == 3 and p.nodes * p.gpus_per_node > 1),
            global_batch_size=cfg.train.global_batch_size,
            tensor_parallel_size=cfg.generation.tensor_parallel_size, gen_sequences=cfg.generation.batch_size,
            gen_tokens=min(cfg.generation.max_model_len, cfg.data.max_prompt_length + cfg.generation.max_new_tokens),
            max_model_len=cfg.generation.max_model_len, gpu_memory_utilization=cfg.generation.gpu_memory_utilization)


@dataclass
class Phase:
    """One phase's memory per GPU (or per node, for host memory), term by term, in bytes."""
    name: str
    unit: str  # "GPU", "rank" or "node"
    budget: float
    terms: list[tuple[str, float]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    fixable: list[str] = field(default_factory=list)  # overrides that would make it fit
    valid: bool = True  # False: the settings cannot run at all (e.g. TP does not divide the heads)

    @property
    def total(self) -> float:
        return sum(b for _, b in self.terms)

    @property
    def fits(self) -> bool:
        return self.valid and self.total <= self.budget

    @property
    def verdict(self) -> str:
        if not self.valid:
            return "invalid"
        if not self.fits:
            return "does not fit"
        return "fits (tight)" if self.total > TIGHT * self.budget else "fits"


# ---------------------------------------------------------------- the estimates

def model_states(arch: Architecture, s: Setup) -> list[tuple[str, float, bool]]:
    """(label, bytes per rank, held in host memory) for weights, gradients and optimizer states."""
    P, b, n = arch.params, s.weight_bytes, s.world
    shard = P / n
    wname = "bf16" if b == 2 else "fp32"
    grads_on_host = s.offload_optimizer and s.stage >= 2
    terms = [
        (f"parameters ({wname}{', 1/N' if s.stage == 3 else ''})", b * (shard if s.stage == 3 else P), s.offload_param),
        (f"gradients ({wname}{', 1/N' if s.stage >= 2 else ''})", b * (shard if s.stage >= 2 else P), grads_on_host),
    ]
    if s.stage == 0 and b == 4:
        # fp32 at stage 0: the optimizer steps the model's own parameters with their own gradients.
        return terms + [("AdamW moments (fp32)", 8 * P, False)]
    opt = shard if s.stage >= 1 else P
    fp32_grad = min(opt, ZERO3_SUB_GROUP) if s.stage == 3 else opt
    terms += [
        (f"fp32 master weights{' (1/N)' if s.stage >= 1 else ''}", 4 * opt, s.offload_optimizer),
        ("fp32 gradients for the step" + (" (one sub-group)" if s.stage == 3 else ""), 4 * fp32_grad,
         s.offload_optimizer),
        (f"AdamW moments (fp32{', 1/N' if s.stage >= 1 else ''})", 8 * opt, s.offload_optimizer),
    ]
    if s.stage == 3:
        terms.append(("gathered module + its gradient (ZeRO-3)", 2 * b * arch.largest_module_params, False))
    return terms


def activation_bytes(arch: Architecture, tokens: int, act_bytes: int, checkpointing: bool, fused: bool = False) -> float:
    """What autograd keeps for the backward pass over `tokens` tokens (see the module docstring)."""
    h, i, a = arch.hidden, arch.intermediate, act_bytes
    # dpo_dist.fused: an RMSNorm keeps its input and 1/rms (4 B), the MLP only gate and up.
    norm = a * h + 4 if fused else 4 * h + a * h
    layer = 2 * norm + 5 * a * h + (2 if fused else 4) * a * i
    final_norm = norm
    kept = arch.layers * a * h + layer if checkpointing else arch.layers * layer
    return tokens * (kept + final_norm)


def logits_bytes(arch: Architecture, tokens: int, act_bytes: int, backward: bool, fused: bool = False) -> float:
    fp32_copy = 4 if act_bytes != 4 else 0  # token_logps upcasts; a no-op when the logits are fp32
    temporaries = 8 if backward else 4  # log-softmax backward: two fp32 tensors; forward only: one
    if fused:  # dpo_dist.fused.TokenLogps: one chunk of rows at a time, nothing kept
        tokens = min(tokens, FUSED_CHUNK_ROWS)
    return tokens * arch.vocab * (act_bytes + fp32_copy + temporaries)


@dataclass(frozen=True)
class MicroBatch:
    """The shape of one training forward in train.py's prefix-shared layout."""
    tokens: int  # the packed row: each prompt once, then both responses
    logit_rows: int  # positions projected to the vocabulary (one per response token)

    @classmethod
    def upper_bound(cls, pairs: int, seq_len: int) -> "MicroBatch":
        """Pairs of at most seq_len tokens each way: at most 2 * seq_len tokens and logit rows per pair."""
        return cls(2 * pairs * seq_len, 2 * pairs * seq_len)

    @classmethod
    def of(cls, batch: dict) -> "MicroBatch":
        """From what data.collate_shared_prompt returns for a real micro-batch."""
        return cls(int(batch["input_ids"].shape[1]), int(batch["labels"].numel()))


def prefetched_params(arch: Architecture, weight_bytes: int, prefetch_bucket: int, max_live: int,
                      reuse_distance: int = 0) -> float:
    """Bytes of full parameters ZeRO-3 holds gathered beyond the module in use. From the second
    forward, once it has recorded the order modules run in, DeepSpeed prefetches at every module's
    hook at least one whole parameter, up to ``prefetch_bucket`` elements, bounded in total only by
    ``max_live`` (stage3_max_live_parameters), and it keeps any gathered parameter whose later use
    its scan passed (partitioned_param_coordinator's fetch_sub_module, __params_to_release). The
    live count can pass max_live by one parameter (it checks, then adds), and the parameter that
    does so can be the largest (the untied lm_head fetched onto a full window, the embedding in the
    backward): so up to max_live beyond the largest module, which is counted already. Measured on
    the Qwen2.5-0.5B shape at 2 CPU ranks: 2.3 GiB per rank gathered before the first layer from the
    second step (docs/benchmark.md). A bucket of 0 turns prefetching off, but
    ``reuse_distance`` (stage3_max_reuse_distance, DeepSpeed's 1e9; training only, where each
    parameter is used again in the backward pass) still keeps a module gathered from its forward to
    its backward when fewer elements run between the two: about reuse_distance / 2 of the model,
    all of it under 0.5B (measured: the bucket at 0 left the 0.5B shape's peak where it was)."""
    beyond = arch.params - arch.largest_module_params
    prefetch = min(max_live, beyond) if prefetch_bucket > 0 else 0
    reused = max(0, min(arch.params, reuse_distance // 2) - arch.largest_module_params)
    return weight_bytes * max(prefetch, reused)


# DeepSpeed's own stage-3 defaults: the reference pass's forward-only engine sets no ZeRO knobs
# (dist.zero3_inference_config), so these are what it prefetches with.
DS_PREFETCH_BUCKET, DS_MAX_LIVE = 50_000_000, 1_000_000_000
DS_MAX_REUSE = 1_000_000_000  # stage3_max_reuse_distance: dist.deepspeed_config leaves DeepSpeed's default


def training(arch: Architecture, s: Setup, batch: MicroBatch | None = None) -> Phase:
    """`batch`: the largest micro-batch, when known; else the upper bound for s.seq_len."""
    unit = "GPU" if s.device == "gpu" else "rank"
    ph = Phase("training", unit, _device_budget(s))
    ph.terms += [(label, b) for label, b, on_host in model_states(arch, s) if not on_host]
    buckets = s.weight_bytes * s.reduce_bucket_size * (2 if s.overlap_comm or s.stage == 3 else 1)
    if s.stage == 0 and s.world == 1:
        buckets = 0  # dist.build_engine skips the all-reduce over one rank
    if s.stage == 3:
        buckets += s.weight_bytes * s.prefetch_bucket_size
    ph.terms.append(("communication buckets", buckets))
    ahead = (prefetched_params(arch, s.weight_bytes, s.prefetch_bucket_size, s.max_live_parameters, DS_MAX_REUSE)
             if s.stage == 3 else 0)
    if ahead:
        ph.terms.append(("parameters prefetched ahead (ZeRO-3, to max_live)", ahead))
    mb = batch or MicroBatch.upper_bound(s.micro_batch_size, s.seq_len)
    ckpt = "checkpointing" if s.gradient_checkpointing else "no checkpointing"
    activations = activation_bytes(arch, mb.tokens, s.weight_bytes, s.gradient_checkpointing, s.fused_ops)
    mask = s.weight_bytes * mb.tokens ** 2
    logits = logits_bytes(arch, mb.logit_rows, s.weight_bytes, True, s.fused_ops)
    pairs = f"{s.micro_batch_size} pair{'s' if s.micro_batch_size > 1 else ''}"
    ph.terms.append((f"activations ({pairs} in a row of {mb.tokens} tokens, {ckpt})", activations))
    ph.terms.append((f"attention mask ({mb.tokens} x {mb.tokens})", mask))
    chunked = f", {FUSED_CHUNK_ROWS} at a time" if s.fused_ops and mb.logit_rows > FUSED_CHUNK_ROWS else ""
    ph.terms.append((f"logits ({mb.logit_rows} response positions x {arch.vocab}{chunked})", logits))
    ph.terms.append(("runtime" + (" (measured)" if s.device == "cpu" else ""), s.runtime_gib * GIB))
    per_step = s.micro_batch_size * s.world
    if s.global_batch_size % per_step:
        # Training refuses to start (TrainConfig.accumulation_steps): say what would.
        ph.valid = False
        nodes = dividing_node_counts(s.global_batch_size, s.micro_batch_size, s.gpus_per_node)
        ph.notes.append(f"train.global_batch_size={s.global_batch_size} does not split into micro-batches of "
                        f"{s.micro_batch_size} on {s.world} ranks; node counts on which it does: "
                        f"{', '.join(map(str, nodes)) or 'none'}")
        # A smaller micro-batch keeps the recipe's global batch (more accumulation, same update), so
        # it comes first; then the nearest global batches that split, then more nodes.
        smaller = [m for m in range(s.micro_batch_size - 1, 0, -1) if s.global_batch_size % (m * s.world) == 0]
        ph.fixable += [f"train.micro_batch_size={m}" for m in smaller[:1]]
        ph.fixable += [f"train.global_batch_size={b}" for b in nearest_global_batches(s.global_batch_size, per_step)]
        above = [n for n in nodes if n > s.nodes]
        if above:
            ph.fixable.append(f"plan.nodes={above[0]}")
    return ph


def reference(arch: Architecture, s: Setup) -> Phase:
    ph = Phase("reference log-probs", "GPU" if s.device == "gpu" else "rank", _device_budget(s))
    b = s.weight_bytes
    if s.stage == 3:  # partitioned with ZeRO-3 (never offloaded): a shard plus what is gathered
        ph.terms.append(("weights (1/N, ZeRO-3)", b * arch.params / s.world))
        ph.terms.append(("gathered module", b * arch.largest_module_params))
        ph.terms.append(("parameters prefetched ahead (DeepSpeed's defaults)",
                         prefetched_params(arch, b, DS_PREFETCH_BUCKET, DS_MAX_LIVE)))
        ph.terms.append(("prefetch all-gather buffer", b * DS_PREFETCH_BUCKET))
    else:
        ph.terms.append((f"weights ({'bf16' if b == 2 else 'fp32'}, a full copy)", b * arch.params))
    # reference.score_pairs: reference_batch_size pairs in one prefix-shared row, as in training;
    # the vocabulary projection a chunk of rows at a time (fused.TokenLogps, at every ZeRO stage).
    mb = MicroBatch.upper_bound(s.reference_batch_size, s.seq_len)
    ph.terms.append((f"no-grad activations ({s.reference_batch_size} pairs x {s.seq_len})",
                     mb.tokens * b * (5 * arch.hidden + 3 * arch.intermediate)))
    ph.terms.append((f"attention mask ({mb.tokens} x {mb.tokens})", b * mb.tokens ** 2))
    rows = min(mb.logit_rows, FUSED_CHUNK_ROWS)
    ph.terms.append((f"logits ({rows} rows x {arch.vocab})", logits_bytes(arch, rows, b, False)))
    ph.terms.append(("runtime" + (" (measured)" if s.device == "cpu" else ""), s.runtime_gib * GIB))
    return ph


def kv_bytes_per_token(arch: Architecture, tp: int) -> float:
    # K and V, bf16; with more GPUs than KV heads each GPU keeps a replica of one head.
    return 2 * arch.layers * math.ceil(arch.kv_heads / tp) * arch.head_dim * 2


def generation(arch: Architecture, s: Setup) -> Phase:
    tp = s.tensor_parallel_size
    ph = Phase(f"vLLM generation (TP {tp})", "GPU", s.gpu_memory_gib * GIB * s.gpu_memory_utilization)
    if arch.heads % tp or tp > s.gpus_per_node:
        ph.valid = False
        ph.notes.append(f"generation.tensor_parallel_size={tp} must divide the {arch.heads} attention heads "
                        f"and be at most plan.gpus_per_node={s.gpus_per_node}")
    ph.terms.append((f"weights (bf16, 1/{tp})", 2 * arch.params / tp))
    ph.terms.append((f"profiling forward ({VLLM_PROFILE_TOKENS} tokens)",
                     VLLM_PROFILE_TOKENS * 2 * (4 * arch.hidden + 3 * arch.intermediate / tp)))
    ph.terms.append((f"sampler logits ({s.gen_sequences} seqs)", s.gen_sequences * arch.vocab * 16))
    ph.terms.append(("runtime + CUDA graphs", (s.runtime_gib + 1.0) * GIB))
    fixed = ph.total
    per_seq = s.gen_tokens * kv_bytes_per_token(arch, tp)
    room = max(0, int((ph.budget - fixed) // per_seq))
    ph.terms.append((f"KV cache ({s.gen_sequences} seqs x {s.gen_tokens} tokens)", s.gen_sequences * per_seq))
    if room < s.gen_sequences and fixed + s.max_model_len * kv_bytes_per_token(arch, tp) <= ph.budget:
        # vLLM runs as many sequences at once as the KV cache holds: slower, but it runs.
        ph.terms[-1] = (f"KV cache ({room} of {s.gen_sequences} seqs at once; the rest wait)", room * per_seq)
        ph.notes.append(f"KV cache holds {room} of {s.gen_sequences} sequences at once: runs, more slowly")
    return ph


def host(arch: Architecture, s: Setup) -> Phase:
    """Host memory per node for what ZeRO offloads (pinned), one share per rank on the node."""
    ph = Phase("host memory (offloaded states)", "node", s.cpu_memory_gib * GIB)
    for label, b, on_host in model_states(arch, s):
        if on_host:
            ph.terms.append((f"{label} x {s.gpus_per_node} ranks", b * s.gpus_per_node))
    return ph


def _device_budget(s: Setup) -> float:
    # On the CPU the ranks of a node share its memory.
    return (s.gpu_memory_gib if s.device == "gpu" else s.cpu_memory_gib / s.gpus_per_node) * GIB


def estimate(arch: Architecture, s: Setup) -> list[Phase]:
    phases = [training(arch, s), reference(arch, s)]
    if s.device == "gpu":
        phases.append(generation(arch, s))
    phases.append(host(arch, s))
    _advise(arch, s, phases)
    return phases


# ---------------------------------------------------------------- checkpoints and Slurm's warning

GB = 1e9  # checkpoint sizes and write rates in decimal GB, as storage is rated
GPU_TFLOPS, CPU_TFLOPS = 150.0, 0.06  # plan.tflops_per_rank's defaults (see conf: PlanConfig)


@dataclass(frozen=True)
class Save:
    """One DeepSpeed checkpoint of the run, how long writing it takes, and the lead time Slurm's
    warning needs: one step to reach the boundary, the save, and a margin."""
    terms: list[tuple[str, float]]  # files of the whole checkpoint, all ranks, bytes
    busiest_node_bytes: float  # what the node writing most writes
    write_gbps: float  # per node
    step_seconds: float
    step_estimated: bool
    margin_seconds: float

    @property
    def total(self) -> float:
        return sum(b for _, b in self.terms)

    @property
    def save_seconds(self) -> float:
        return self.busiest_node_bytes / (self.write_gbps * GB)

    @property
    def lead_seconds(self) -> int:
        return math.ceil(self.step_seconds + self.save_seconds + self.margin_seconds)


def checkpoint_files(arch: Architecture, s: Setup) -> tuple[list[tuple[str, float]], float]:
    """What DeepSpeed's save_checkpoint writes for the trained parameters, and what the busiest node
    writes. Stages 1-2: rank 0 writes the module's weights (mp_rank_00_model_states.pt, in the
    weight dtype) and every rank its 1/N of the fp32 master weights and AdamW's two moments
    (zero_pp_rank_*_optim_states.pt), 12 B per parameter in all, also when the weights are fp32.
    Stage 3 writes no whole weights: the master partitions hold them. fp32 at stage 0 (what one fp32
    rank runs): torch's AdamW state beside the weights in rank 0's one file, no master copy. Offload
    changes where the states live, not what is written."""
    P, b, n, nodes = arch.params, s.weight_bytes, s.world, s.nodes
    wname = "bf16" if b == 2 else "fp32"
    if s.stage == 0 and b == 4:
        return [("weights (fp32), rank 0", 4 * P), ("AdamW moments (fp32), rank 0", 8 * P)], 12 * P
    terms = [] if s.stage == 3 else [(f"weights ({wname}), rank 0 alone", b * P)]
    terms += [(f"fp32 master weights, 1/{n} per rank", 4 * P), (f"AdamW moments (fp32), 1/{n} per rank", 8 * P)]
    return terms, (0 if s.stage == 3 else b * P) + 12 * P / nodes


def step_seconds_estimate(arch: Architecture, s: Setup, tflops_per_rank: float) -> float:
    """One optimizer step at the longest sequences: 6 FLOPs per parameter and token (forward and
    backward; 8 with gradient checkpointing's second forward) over global_batch_size pairs of two
    rows of seq_len tokens, spread over the ranks."""
    tokens = s.global_batch_size * 2 * s.seq_len
    return (8 if s.gradient_checkpointing else 6) * arch.params * tokens / s.world / (tflops_per_rank * 1e12)


def tflops_per_rank(s: Setup, p: PlanConfig) -> float:
    return p.tflops_per_rank or (GPU_TFLOPS if s.device == "gpu" else CPU_TFLOPS)


def checkpoint_save(arch: Architecture, s: Setup, p: PlanConfig) -> Save:
    terms, busiest = checkpoint_files(arch, s)
    estimated = p.step_seconds is None
    step = step_seconds_estimate(arch, s, tflops_per_rank(s, p)) if estimated else p.step_seconds
    return Save(terms, busiest, p.checkpoint_write_gbps, step, estimated, p.signal_margin_seconds)


def describe_save(sv: Save, s: Setup, p: PlanConfig) -> str:
    lines = [f"{f'checkpoint ({s.deepspeed_name}), all ranks':<68}GB"]
    lines += [f"  {label:<66}{b / GB:8.2f}" for label, b in sv.terms]
    lines.append(f"  {'total':<66}{sv.total / GB:8.2f}")
    where = "each node" if s.stage == 3 else "the node of rank 0"
    lines.append(f"  save: {where} writes {sv.busiest_node_bytes / GB:.2f} GB at plan.checkpoint_write_gbps="
                 f"{sv.write_gbps:g} GB/s per node -> {sv.save_seconds:.0f} s")
    how = (f"estimated at plan.tflops_per_rank={tflops_per_rank(s, p):g} and sequences of {s.seq_len} tokens; "
           f"a run's metrics.jsonl has step_seconds: set plan.step_seconds" if sv.step_estimated else "plan.step_seconds")
    lines.append(f"  step: {sv.step_seconds:.0f} s ({how})")
    lines.append(f"  Slurm warning lead: step + save + plan.signal_margin_seconds = {sv.step_seconds:.0f} + "
                 f"{sv.save_seconds:.0f} + {sv.margin_seconds:g} -> {sv.lead_seconds} s")
    lines.append(f"  slurm/pipeline.sbatch sends itself SIGUSR1 {sv.lead_seconds} s before the time limit (another "
                 f"script: sbatch --signal=B:USR1@{sv.lead_seconds}); give --time well above that. SIGTERM "
                 f"(preemption) needs the cluster's KillWait >= {math.ceil(sv.step_seconds + sv.save_seconds)} s.")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- what to change

def _training_fits(arch: Architecture, s: Setup) -> tuple[bool, str]:
    """Whether training fits both the GPU and the node's host memory, and the two totals."""
    t, h = training(arch, s), host(arch, s)
    totals = f"{t.total / GIB:.1f} GiB per {t.unit}" + (f", host {h.total / GIB:.0f} GiB per node" if h.terms else "")
    return t.fits and h.fits, totals


def _advise(arch: Architecture, s: Setup, phases: list[Phase]) -> None:
    """Fill each failing phase's `fixable` with overrides that make it fit, and the new total."""
    by_name = {p.name.split(" (")[0]: p for p in phases}
    train, hostp = by_name["training"], by_name["host memory"]
    if train.valid and not (train.fits and hostp.fits):
        fixes = _training_fixes(arch, s)
        for phase in (train, hostp):
            phase.fixable = [] if phase.fits else fixes
    ref = by_name["reference log-probs"]
    if not ref.fits:
        for rb in _halvings(s.reference_batch_size):
            r = reference(arch, dataclasses.replace(s, reference_batch_size=rb))
            if r.fits:
                key = "reference_batch_size_zero3" if s.stage == 3 and s.world > 1 else "reference_batch_size"
                ref.fixable.append(f"train.{key}={rb} -> {r.total / GIB:.1f} GiB")
                break
        if s.stage < 3:
            r = reference(arch, dataclasses.replace(s, stage=3))
            if r.fits:
                ref.fixable.append(f"deepspeed=zero3 (partitioned reference) -> {r.total / GIB:.1f} GiB")
    gen = by_name.get("vLLM generation")
    if gen is not None and not (gen.fits and not gen.notes):
        # Larger TP first when the current one is valid; any valid TP when it is not (e.g. 1 GPU).
        start = s.tensor_parallel_size + 1 if gen.valid else 1
        for tp in range(start, s.gpus_per_node + 1):
            if arch.heads % tp == 0 and tp != s.tensor_parallel_size:
                g = generation(arch, dataclasses.replace(s, tensor_parallel_size=tp))
                if g.fits and not g.notes:
                    gen.fixable.append(f"generation.tensor_parallel_size={tp} -> {g.total / GIB:.1f} GiB")
                    break


def _halvings(n: int) -> list[int]:
    out = []
    while n > 1:
        n //= 2
        out.append(n)
    return out


def _training_fixes(arch: Architecture, s: Setup) -> list[str]:
    """Single changes that fit, cheapest first; else the first cumulative combination that does."""
    candidates: list[tuple[str, Setup]] = []
    if not s.gradient_checkpointing:
        candidates.append(("model.gradient_checkpointing=true", dataclasses.replace(s, gradient_checkpointing=True)))
    for mb in _halvings(s.micro_batch_size):
        candidates.append((f"train.micro_batch_size={mb}", dataclasses.replace(s, micro_batch_size=mb)))
    if s.stage < 3:
        candidates.append(("deepspeed=zero3",
                           dataclasses.replace(s, stage=3, configured_stage=3, offload_optimizer=False, offload_param=False)))
    if not s.offload_param:
        candidates.append(("deepspeed=zero3_offload",
                           dataclasses.replace(s, stage=3, configured_stage=3, offload_optimizer=True, offload_param=True)))
    fixes = []
    for label, c in candidates:
        ok, totals = _training_fits(arch, c)
        if ok:
            fixes.append(f"{label} -> {totals}")
            if label.startswith("train.micro_batch_size"):
                break  # the largest micro-batch that fits is the one to report
    nodes = _nodes_needed(arch, s)
    if nodes:
        fixes.append(f"plan.nodes={nodes} (more GPUs, same settings) -> "
                     f"{_training_fits(arch, s.on_nodes(nodes))[1]}")
    if fixes:
        return fixes
    combined, labels = s, []
    for label, c in candidates:
        changes = {f.name: getattr(c, f.name) for f in dataclasses.fields(Setup)
                   if getattr(c, f.name) != getattr(s, f.name)}
        combined = dataclasses.replace(combined, **changes)
        labels.append(label)
        ok, totals = _training_fits(arch, combined)
        if ok:
            return [" ".join(labels) + f" -> {totals}"]
    return ["nothing tried fits: more or larger GPUs, or a shorter data.max_length"]


def _nodes_needed(arch: Architecture, s: Setup, limit: int = 64) -> int | None:
    for nodes in range(s.nodes + 1, limit + 1):
        if _training_fits(arch, s.on_nodes(nodes))[0]:
            return nodes
    return None


# ---------------------------------------------------------------- CPU runtime baseline

_RUNTIME_PROBE = """
import json, sys
from dpo_dist import dist, memory
from dpo_dist.config import ModelConfig
from dpo_dist.models import load_tokenizer
import dpo_dist.train  # what a training rank imports: torch, transformers, the package
load_tokenizer(ModelConfig(**json.loads(sys.argv[1])))  # a rank loads it before the model
dist._ensure_deepspeed_dist()  # DeepSpeed imported and a one-rank gloo group, as build_engine does
print(memory.current_bytes())
"""


def measure_cpu_runtime_gib(model: ModelConfig) -> float:
    """Resident memory of a fresh training process before any model: Python, torch, transformers,
    DeepSpeed, a gloo group and the model's tokenizer. Measured in a subprocess so this process's own
    state does not count."""
    out = subprocess.run([sys.executable, "-c", _RUNTIME_PROBE, json.dumps(dataclasses.asdict(model))],
                         capture_output=True, text=True, env=_probe_env(), cwd=str(CONF_DIR.parent))
    if out.returncode != 0:
        # Most often the model is not on this machine (its tokenizer is part of the baseline): the
        # probe's last line is that error, naming model.path. One line, not a CalledProcessError
        # traceback around the probe's script.
        last = (out.stderr.strip().splitlines() or [f"exit status {out.returncode}"])[-1]
        raise ConfigError(f"plan.device=cpu measures a training process's baseline with {model.name}'s "
                          f"tokenizer, and that failed: {re.sub(r'^(?:[A-Za-z_]+[.])+', '', last)}")
    return int(out.stdout.strip().splitlines()[-1]) / GIB


def _probe_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


# ---------------------------------------------------------------- output

def describe(cfg: Config, arch: Architecture, s: Setup, phases: list[Phase]) -> str:
    plural = "s" if s.gpus_per_node > 1 else ""
    per_node = (f"GPU{plural} x {s.gpu_memory_gib:g} GiB" if s.device == "gpu"
                else f"CPU rank{plural}, {s.cpu_memory_gib:g} GiB RAM per node")
    cluster = f"{s.nodes} node{'s' if s.nodes > 1 else ''} x {s.gpus_per_node} {per_node}"
    lines = [f"{cfg.model.name}: {arch.params / 1e9:.2f}B parameters, {arch.layers} layers, hidden {arch.hidden}, "
             f"{arch.heads}/{arch.kv_heads} heads, vocab {arch.vocab}{', tied embeddings' if arch.tied else ''}",
             f"{s.deepspeed_name} on {cluster}; runtime baseline {s.runtime_gib:.2f} GiB per process", ""]
    for ph in phases:
        if ph.name.startswith("host") and not ph.terms:
            lines.append("host memory: nothing offloaded")
            continue
        lines.append(f"{ph.name}, per {ph.unit}" + " " * max(1, 62 - len(ph.name) - len(ph.unit)) + "GiB")
        for label, b in ph.terms:
            lines.append(f"  {label:<66}{b / GIB:8.2f}")
        lines.append(f"  {'total':<66}{ph.total / GIB:8.2f}  of {ph.budget / GIB:.1f} -> {ph.verdict}")
        lines += [f"  note: {n}" for n in ph.notes]
        lines += [f"  {'to fit' if ph.valid else 'to start'}: {f}" for f in ph.fixable]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def shipped_qwen_configs() -> list[str]:
    names = [p.stem for p in sorted((CONF_DIR / "model").glob("qwen2.5-*.yaml"))]
    return sorted(names, key=lambda n: compose([f"model={n}"]).model.num_params)


def all_shipped_table(gpu_memory_gib: float = 80.0, checkpoints: PlanConfig | None = None) -> str:
    """One row per shipped Qwen config and cluster shape, with each config's own defaults; the
    checkpoint write rate, step time and margin from `checkpoints` when given."""
    header = ("| model | cluster | deepspeed | train GiB/GPU | reference GiB/GPU | vLLM GiB/GPU (TP) | host GiB/node "
              "| verdict | to change | checkpoint GB: save s, signal lead s |")
    rows = [header, "|" + "---|" * 10]
    for name in shipped_qwen_configs():
        for nodes, gpus in CLUSTER_SHAPES:
            cfg = compose([f"model={name}", f"plan.nodes={nodes}", f"plan.gpus_per_node={gpus}",
                           f"plan.gpu_memory_gib={gpu_memory_gib}"])
            arch, s = Architecture.of(cfg.model), Setup.of(cfg)
            train, ref, gen, hst = estimate(arch, s)
            failing = [p for p in (train, ref, gen, hst) if not p.fits]
            tight = any(p.verdict == "fits (tight)" for p in (train, ref, gen, hst))
            # A phase whose settings cannot start (a batch that does not split, TP that does not divide
            # the heads) says so, and its GiB get no ✗ unless they are over the budget too: a bare
            # "no: training" beside a ✗ reads as out of memory.
            verdict = ("fits (tight)" if tight else "fits") if not failing else \
                "no: " + ", ".join(p.name.split(" (")[0] + ("" if p.valid else " (invalid settings)") for p in failing)
            change = "; ".join(f for p in failing for f in p.fixable[:1]) or ("" if not failing else "see plan")
            if gen.fits and gen.notes:
                change = (change + "; " if change else "") + gen.notes[0]
            mark = {p.name: " ✗" if p.total > p.budget else "" for p in (train, ref, gen, hst)}
            sv = checkpoint_save(arch, s, checkpoints or cfg.plan)
            rows.append(f"| {name} | {nodes}x{gpus}x{gpu_memory_gib:g}GB | {s.deepspeed_name} "
                        f"| {train.total / GIB:.1f}{mark[train.name]} | {ref.total / GIB:.1f}{mark[ref.name]} "
                        f"| {gen.total / GIB:.1f} ({s.tensor_parallel_size}){mark[gen.name]} "
                        f"| {hst.total / GIB:.0f}{mark[hst.name]} | {verdict} | {change} "
                        f"| {sv.total / GB:.0f}: {sv.save_seconds:.0f}, {sv.lead_seconds} |")
    return "\n".join(rows) + "\n"


def plan(cfg: Config) -> str:
    if cfg.plan.all:
        return all_shipped_table(cfg.plan.gpu_memory_gib, cfg.plan)
    arch = Architecture.of(cfg.model)
    if cfg.plan.lead_only:  # no memory estimate, so no runtime probe: the Slurm script asks this at start
        return f"{checkpoint_save(arch, Setup.of(cfg, runtime_gib=0.0), cfg.plan).lead_seconds}\n"
    s = Setup.of(cfg)
    return describe(cfg, arch, s, estimate(arch, s)) + "\n" + describe_save(checkpoint_save(arch, s, cfg.plan), s, cfg.plan)


def main(argv: list[str] | None = None) -> None:
    # Composed directly rather than through @hydra.main: the planner writes no run directory.
    try:
        print(plan(compose(list(sys.argv[1:] if argv is None else argv))), end="")
    except (ConfigError, CompactHydraException, OmegaConfBaseException) as e:
        # A misspelled key or a bad value: one line, as the stages print it (dpo_dist.cli imports torch).
        print(f"dpo_dist.plan: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
