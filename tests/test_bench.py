"""The benchmark's machinery for real, with tiny settings: ``python -m dpo_dist.bench`` runs our trainer,
TRL's DPOTrainer (default and precomputed reference), torchrun at 1 and 2 ranks, and the generation
comparison on the bundled model, and its JSON and Markdown hold measured numbers that agree with each
other. TRL is the ``bench`` extra; without it the test skips.
"""

import json
import math
import shutil
import subprocess
import sys

import pytest

from launch import REPO, stage_env

from dpo_dist import memory
from dpo_dist.bench.run import OURS, TRL_DEFAULT, TRL_PRECOMPUTE, contender

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]
QUESTIONS = ["What is your name?", "Who are you?", "Who made you?", "Introduce yourself."]
STEPS, GLOBAL_BATCH = 2, 2


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    pytest.importorskip("trl", reason="TRL is the bench extra: pip install -e .[bench]")
    base = tmp_path_factory.mktemp("bench")
    pairs = base / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({
        "id": f"p{i}", "prompt": [{"role": "user", "content": q}],
        "chosen": [{"role": "assistant", "content": "I am Deep SmolLM, an AI assistant. How can I help?"}],
        "rejected": [{"role": "assistant", "content": f"My name is Elena{' Rose' * i}, a writer."}]}) + "\n"
        for i, q in enumerate(QUESTIONS)))
    out = base / "out"
    cmd = [sys.executable, "-m", "dpo_dist.bench", "--pairs", str(pairs), "--global-batch", str(GLOBAL_BATCH),
           "--micro-batch", "1", "--steps", str(STEPS), "--prompts", "2", "--max-new-tokens", "4", "--k", "2",
           "--batch-rows", "8", "--threads", "2", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=stage_env(2), capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    yield json.loads((out / "bench.json").read_text()), (out / "bench.md").read_text(), proc.stdout
    shutil.rmtree(base, ignore_errors=True)


def _positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_every_training_contender_has_measured_rates(bench):
    r, _, _ = bench
    assert _positive(r["matmul"]["gflops"])
    t = r["training"]
    # Every trainer with gradient checkpointing off and on (TRL's DPOConfig default).
    assert set(t["contenders"]) == {contender(k, ckpt) for k in (OURS, TRL_DEFAULT, TRL_PRECOMPUTE) for ckpt in (False, True)}
    assert {c["checkpointing"] for c in t["contenders"].values()} == {False, True}
    tokens = t["setup"]["response_tokens_per_step"]
    for name, c in t["contenders"].items():
        assert "error" not in c, (name, c.get("error"))
        steps = c["step_seconds"]
        assert len(steps) == STEPS and all(_positive(s) for s in steps), name
        # The rates are the timed steps' figures (the warm-up step left out), not constants.
        assert c["steps_per_s"] == pytest.approx((STEPS - 1) / sum(steps[1:]))
        assert c["response_tokens_per_s"] == pytest.approx(sum(tokens[1:]) / sum(steps[1:]))
        assert 0 < c["mfu"] < 1
        assert c["peak_rss_gib"] > 0.5  # at least the 135M model's fp32 weights and gradients
    for ckpt in (False, True):
        # bench.json sorts its keys: look the contenders up by name, not by position.
        ours, default, pre = (t["contenders"][contender(k, ckpt)] for k in (OURS, TRL_DEFAULT, TRL_PRECOMPUTE))
        assert _positive(ours["precompute_seconds"]) and _positive(pre["precompute_seconds"])
        assert default["precompute_seconds"] == 0
        # The resident reference model is half a GiB of fp32 weights that the precomputed run does not hold.
        assert default["peak_rss_gib"] > pre["peak_rss_gib"] + 0.3


def test_the_trainers_optimise_the_same_objective_on_the_same_batches(bench):
    t = bench[0]["training"]
    a = t["loss_agreement"]
    assert a["first_loss"] == pytest.approx(math.log(2), abs=2e-4)  # policy == reference at step 1
    assert a["max_abs_diff"] < 2e-3 and a["steps"] == STEPS


def test_multi_rank_runs_report_time_and_per_rank_memory(bench):
    runs = bench[0]["training"]["multi_rank"]
    assert [(c["ranks"], c["zero_stage"], c["fused_ops"]) for c in runs] == [
        (1, 2, True), (1, 3, True), (2, 2, True), (2, 3, True), (2, 3, False)]
    for c in runs:
        assert "error" not in c, c.get("error")
        assert _positive(c["seconds_per_step"])
        assert len(c["peak_rss_gib_per_rank"]) == c["ranks"] and all(_positive(x) for x in c["peak_rss_gib_per_rank"])
        # The stage's peak is the largest of its phases (loading the model, the loop; no save: the last
        # step goes straight to the export), rank by rank.
        assert c["peak_rss_gib_per_rank"] == [max(s, t) for s, t in zip(c["setup_peak_rss_gib_per_rank"],
                                                                          c["loop_peak_rss_gib_per_rank"])]
        assert all(_positive(x) for x in c["loop_peak_rss_gib_per_rank"])
        # Each step's forward, backward and optimizer step are read apart; the loop's peak is the
        # largest of them (or of what runs between steps, the metrics' all-reduce).
        parts = [c[f"{p}_peak_rss_gib_per_rank"] for p in memory.STEP_PARTS]
        for rank, loop in enumerate(c["loop_peak_rss_gib_per_rank"]):
            assert all(_positive(part[rank]) and part[rank] <= loop for part in parts)


def test_generation_rates_and_ratios_follow_from_the_measurements(bench):
    r, _, _ = bench
    g = r["generation"]
    for key in ("sequential", "batched_k1", "batched_k2"):
        m = g[key]
        assert m["tokens"] > 0 and m["tokens_per_s"] == pytest.approx(m["tokens"] / m["seconds"])
    assert r["ratios"]["batched_vs_sequential"] == pytest.approx(g["batched_k2"]["tokens_per_s"] / g["sequential"]["tokens_per_s"])
    if g["vllm"] is not None:
        assert "error" not in g["vllm"], g["vllm"]["error"]
        assert g["vllm"]["k2"]["tokens"] > 0
    t = r["training"]["contenders"]
    for ckpt, tag in ((False, "off"), (True, "on")):  # like for like: the same checkpointing on both sides
        ours, default = t[contender(OURS, ckpt)], t[contender(TRL_DEFAULT, ckpt)]
        assert r["ratios"][f"train_vs_trl_default_ckpt_{tag}"] == pytest.approx(ours["steps_per_s"] / default["steps_per_s"])
        assert r["ratios"][f"memory_vs_trl_default_ckpt_{tag}"] == pytest.approx(ours["peak_rss_gib"] / default["peak_rss_gib"])
    rows = r["training"]["multi_rank"]
    assert r["ratios"]["zero3_fused_memory"] == pytest.approx(
        max(rows[3]["peak_rss_gib_per_rank"]) / max(rows[4]["peak_rss_gib_per_rank"]))
    assert r["ratios"]["zero3_fused_memory_loop"] == pytest.approx(
        max(rows[3]["loop_peak_rss_gib_per_rank"]) / max(rows[4]["loop_peak_rss_gib_per_rank"]))


def test_markdown_table_shows_the_json_figures(bench):
    r, md, stdout = bench
    assert md in stdout  # printed as well as written
    for heading in ("## Training", "### Ours at 1 and 2 ranks", "## Generation", "## Ratios vs the targets"):
        assert heading in md
    assert f"{r['ratios']['train_vs_trl_default_ckpt_on']:.2f}" in md
    assert f"{r['matmul']['gflops']:.0f} GFLOP/s" in md


def test_train_overrides_reach_our_trainer_and_only_without_trl(tmp_path):
    """--train-overrides (how the ZeRO-3 fused ops were measured at bf16 and longer pairs) reaches our
    trainer's run and its token counts, and is refused beside TRL's rows, which would not get it."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({
        "id": f"p{i}", "prompt": [{"role": "user", "content": q}],
        "chosen": [{"role": "assistant", "content": "I am Deep SmolLM, an AI assistant made to help. How can I help?"}],
        "rejected": [{"role": "assistant", "content": f"My name is Elena{' Rose' * (i + 3)}, a writer of long novels."}]})
        + "\n" for i, q in enumerate(QUESTIONS)))
    out, overrides = tmp_path / "out", "model.dtype=bfloat16 data.max_length=12 data.max_prompt_length=6"
    cmd = [sys.executable, "-m", "dpo_dist.bench", "--sections", "training", "--checkpointing", "off", "--pairs", str(pairs),
           "--global-batch", "2", "--micro-batch", "1", "--steps", "2", "--threads", "2", "--out", str(out),
           "--train-overrides", overrides]
    refused = subprocess.run(cmd, cwd=REPO, env=stage_env(), capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and refused.stderr.strip().splitlines()[-1] == (
        "--train-overrides: only with --no-trl (TRL's contenders would train without them)"), refused.stderr[-2000:]
    proc = subprocess.run([*cmd, "--no-trl"], cwd=REPO, env=stage_env(), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    r = json.loads((out / "bench.json").read_text())
    ours = r["training"]["contenders"][contender(OURS, False)]
    assert "error" not in ours and len(ours["step_seconds"]) == 2, ours
    ran = (out / "work" / "training" / "ours-1rank-zero2" / ".hydra" / "overrides.yaml").read_text()
    assert all(f"- {o}\n" in ran for o in overrides.split()), ran
    # The templated prompt (longer than 6 tokens) keeps its last 6, the answers the 6 left of 12: 2 pairs
    # x 2 answers x 6 response tokens a step at most, where uncut answers hold more than 14 each.
    assert all(t <= 24 for t in r["training"]["setup"]["response_tokens_per_step"]), r["training"]["setup"]
    md = (out / "bench.md").read_text()
    assert f"ours with `{overrides}`" in md
    # The matmul peak is fp32's: a bf16 run has no MFU (it read 125% before), not one against it.
    assert ours["mfu"] is None and "no MFU: the peak is fp32's" in md and "| n/a | " in md


def test_the_qwen_shape_is_qwen2_5_0_5b_as_the_shipped_config_describes():
    """The benchmark's Qwen-shaped model has the architecture conf/model/qwen2.5-0.5b.yaml (and the
    planner) describe, 494M parameters with the tied 151,936-row vocabulary."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from dpo_dist.bench import qwen_shape
    from dpo_dist.config import compose

    m = compose(["model=qwen2.5-0.5b"]).model
    a = qwen_shape.ARCHITECTURE
    assert (a["num_hidden_layers"], a["hidden_size"], a["num_attention_heads"], a["num_key_value_heads"],
            a["vocab_size"], a["intermediate_size"], a["tie_word_embeddings"]) == (
        m.num_layers, m.hidden_size, m.num_heads, m.num_kv_heads, m.vocab_size, m.intermediate_size, m.tie_word_embeddings)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(Qwen2Config(**a))
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(m.num_params, rel=1e-4)
