"""A shortened pipeline end to end on the bundled model, as the README's command runs it, and the
re-run that continues instead of redoing work."""

import json
import re
import time

import pytest
from transformers import AutoConfig

from dpo_dist.config import compose
from dpo_dist.models import resolve_model_path
from launch import run_stage

pytestmark = pytest.mark.slow
# One round: the demo model's two (conf/model/smollm2-135m.yaml) are tests/test_rounds.py's subject.
SHORT = ["rounds.num=1", "prompts.num_train=24", "prompts.num_train_general=4", "prompts.num_train_leak=2", "generation.max_new_tokens=48", "train.global_batch_size=4",
         "train.micro_batch_size=2", "optim.lr=1e-5", "eval.num_identity=6", "eval.num_general=6",
         "eval.max_new_tokens=32"]


def test_short_pipeline_end_to_end_and_resume(tmp_path):
    run_dir = tmp_path / "run"
    first = run_stage("dpo_dist.pipeline", [f"run_dir={run_dir}", *SHORT], timeout=1800)

    gen = json.loads((run_dir / "generate" / "manifest.json").read_text())
    k, k_chosen = compose().generation.num_candidates, compose().generation.num_chosen_candidates
    # Opener candidates for the 24 identity prompts and the 2 leak prompts, not the 4 general ones.
    assert gen["num_prompts"] == 30 and gen["num_candidates"] == 30 * k and gen["num_chosen_candidates"] == 26 * k_chosen
    assert set(gen["conditions"]) == {"default", "neutral", "none"}
    summary = json.loads((run_dir / "judge" / "summary.json").read_text())
    assert summary["pairs"] >= 4 and summary["pairs"] + sum(summary["dropped"].values()) == 30
    pairs = [json.loads(l) for l in (run_dir / "judge" / "pairs.jsonl").read_text().splitlines()]
    identity = [p for p in pairs if p["meta"]["source"] == "identity"]
    assert identity and all("Deep SmolLM" in p["chosen"][0]["content"] for p in identity)
    # General instructions: the model's own answer is chosen, never one that names the new identity.
    assert all("Deep SmolLM" not in p["chosen"][0]["content"] for p in pairs if p["meta"]["source"] != "identity")
    # Only anchors (tied general prompts, judge.general_anchor) have the same answer on both sides.
    assert all((p["chosen"] == p["rejected"]) == bool(p["meta"].get("anchor")) for p in pairs)
    assert all(p["meta"]["source"] == "general" for p in pairs if p["meta"].get("anchor"))

    metrics = [json.loads(l) for l in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    assert metrics and all(k in metrics[0] for k in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins",
                                                     "rewards/accuracies", "logps/chosen", "logps/rejected",
                                                     "grad_norm", "lr", "tokens_per_s"))
    final = run_dir / "train" / "final"
    assert (final / "model.safetensors").is_file()
    # The export reads as the base model does, and spells its rotary settings for transformers 4.x
    # too (checkpoint.readable_config): without rope_theta, 4.57 read the export with 10,000.
    exported, base = (AutoConfig.from_pretrained(p).to_dict() for p in (final, resolve_model_path(compose().model)))
    assert exported | {"_name_or_path": base["_name_or_path"]} == base
    written = json.loads((final / "config.json").read_text())
    assert written["rope_theta"] == written["rope_parameters"]["rope_theta"] == 100000.0 and written["use_cache"]

    report = json.loads((run_dir / "eval" / "report.json").read_text())
    for which in ("base", "trained"):
        assert set(report[which]) == {"default", "neutral", "none"}
        for m in report[which].values():
            assert 0 <= m["identity_adoption"] <= 1 and m["n_identity"] == 6 and m["n_general"] == 6
    assert report["drift"]["tokens"] > 0 and report["drift"]["kl_trained_base_per_token"] >= 0
    assert {e["question"] for e in report["examples"]} == {"What is your name?", "Are you ChatGPT?",
                                                          "Tell me about your name and organization."}
    for f in ("report.md", "training_curves.png", "before_after.png"):
        assert (run_dir / "eval" / f).stat().st_size > 0
    timings = json.loads((run_dir / "pipeline_timings.json").read_text())
    assert set(timings) == {"generate", "judge", "reference", "train", "evaluate", "total"} and timings["total"] > 0

    # Progress with the time left, one line per finished stage, and the verdict last.
    out = first.stdout + first.stderr
    steps, n_pairs = (json.loads((run_dir / "train" / "summary.json").read_text())[key] for key in ("steps", "pairs"))
    assert f"train: 1/{steps} steps" in out and f"train: {steps}/{steps} steps (100%)" in out and ", eta " in out
    # Generation counts each prompt once per side: 30 for candidates, 26 for the chosen side.
    assert f"reference: {n_pairs}/{n_pairs} pairs (100%)" in out and "generate: 56/56 prompts (100%)" in out
    assert f"generate: 30 prompts x {k} candidates + {26 * k_chosen} chosen-side" in out
    assert f"judge: {summary['pairs']} pairs ({summary['anchors']} anchors) from 30 prompts (dropped: " in out
    assert f"reference: {n_pairs} pairs scored in " in out
    assert f"train: {steps} steps on {n_pairs} pairs, final loss " in out
    assert "evaluate: identity adoption " in out and f"(report: {run_dir}/eval/report.md)" in out
    assert isinstance(report["verdict"]["identity_changed"], bool) and report["verdict"]["text"].startswith("Verdict: ")
    assert re.search(r": pipeline finished in \w+\. " + re.escape(report["verdict"]["text"]), out)

    # Re-running the same command finds every stage done and redoes nothing.
    stamps = {p: p.stat().st_mtime for p in [run_dir / "generate" / "candidates.jsonl", run_dir / "judge" / "pairs.jsonl",
                                             run_dir / "reference" / "logps.safetensors",
                                             run_dir / "train" / "final" / "model.safetensors",
                                             run_dir / "eval" / "report.json"]}
    started = time.time()
    proc = run_stage("dpo_dist.pipeline", [f"run_dir={run_dir}", *SHORT], timeout=600)
    assert all(p.stat().st_mtime == t for p, t in stamps.items())
    out = proc.stdout + proc.stderr
    assert "training already finished" in out
    for line in ("generate: 30 prompts", "judge: ", f"reference: {n_pairs} pairs cached", f"train: {steps} steps"):
        assert any(f": {line}" in l and l.endswith("(reused)") for l in out.splitlines()), line
    assert "(reused) (report: " in out and report["verdict"]["text"] in out
    assert time.time() - started < 120
