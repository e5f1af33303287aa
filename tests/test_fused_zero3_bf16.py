"""The fused ops (dpo_dist/fused.py) under ZeRO-3 on 2 CPU ranks in bf16, on the untied Qwen-shaped
test model: its output head is a partitioned parameter of its own (not the input embedding), gathered
by the head's own hooks in forward and backward. tests/test_distributed.py covers the tied, fp32 case.

    python -m pytest -q tests/test_fused_zero3_bf16.py
"""

import json
import shutil

import pytest
from safetensors import safe_open

from launch import metrics, run_stage, write_identity_pairs

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

# 3 optimizer steps of global batch 4 over 12 pairs, micro-batch 1 on each of 2 ranks.
TRAIN = ["model=qwen-test", "model.dtype=bfloat16", "deepspeed=zero3", "loss=dpo", "optim.warmup_ratio=0",
         "train.global_batch_size=4", "train.micro_batch_size=1", "train.epochs=1", "wandb.mode=disabled",
         "data.max_length=96", "data.max_prompt_length=64"]

# Fused against unfused, the largest difference over the 3 steps (2026-12-01; the runs repeat bit for
# bit): loss 4.3e-5 relative, grad_norm 7.1e-6, logps/chosen 2.4e-6, rewards/margins 5.8e-5 absolute
# (they start at 0). The forwards agree exactly; bf16 rounds the two backwards differently (in fp32 the
# runs agree to the metrics' 6 decimals). Tolerances: 3x those. Planted faults, and how far they moved
# the metric that caught them: head logits 1% small, logps/chosen 2.9e-4; head weight gradient 1% large,
# grad_norm 9.6e-3; RMSNorm's input gradient without 1/rms, grad_norm 1.5e-2; SwiGLU's up gradient
# doubled, loss 5.8e-4. A 0.1% scale of a bf16 gradient rounds away (8 bits): nothing to catch.
RTOL = {"loss": 1.3e-4, "grad_norm": 2.2e-5, "logps/chosen": 7.5e-6}
MARGINS_ATOL = 1.8e-4


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("fused-zero3-bf16")
    pairs = write_identity_pairs(base / "pairs.jsonl")
    for name, extra in (("fused", []), ("unfused", ["train.fused_ops=false"])):
        run_stage("dpo_dist.train", [f"run_dir={base / name}", f"data.pairs={pairs}", *TRAIN, *extra], nproc=2)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def test_fused_ops_train_the_same_in_bf16_with_an_untied_head(runs):
    """A fused head reading the input embedding instead of its own weight does not crash here: ZeRO-3
    still holds the embedding gathered when the head runs. Only these figures show it (logps/chosen 30%
    off, 2026-12-01)."""
    fused, plain = metrics(runs / "fused"), metrics(runs / "unfused")
    assert [r["step"] for r in fused] == [r["step"] for r in plain] == [1, 2, 3]
    for key, rtol in RTOL.items():
        assert [r[key] for r in fused] == pytest.approx([r[key] for r in plain], rel=rtol, abs=0), key
    margins = [r["rewards/margins"] for r in fused]
    assert margins == pytest.approx([r["rewards/margins"] for r in plain], rel=0, abs=MARGINS_ATOL)
    assert margins[-1] > 10 * MARGINS_ATOL  # training moved the margins well past the tolerance

    summary = {name: json.loads((runs / name / "train" / "summary.json").read_text()) for name in ("fused", "unfused")}
    assert summary["fused"]["fused_ops"] == {"mlp": 2, "rms_norm": 5} and summary["unfused"]["fused_ops"] == {}
    assert summary["fused"]["zero_stage"] == summary["unfused"]["zero_stage"] == 3
    assert summary["fused"]["world_size"] == summary["unfused"]["world_size"] == 2


@pytest.mark.parametrize("name", ["fused", "unfused"])
def test_the_runs_trained_bf16_weights_with_an_untied_head(runs, name):
    """The exported weights are what the engine trained (gathered from ZeRO-3's partitions): every
    tensor bf16, and the head a tensor of its own (the case the tied SmolLM2 test does not reach)."""
    final = runs / name / "train" / "final"
    with safe_open(str(final / "model.safetensors"), "pt") as f:
        dtypes = {key: f.get_slice(key).get_dtype() for key in f.keys()}
    assert set(dtypes.values()) == {"BF16"}, dtypes
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= dtypes.keys()
    assert json.loads((final / "config.json").read_text())["tie_word_embeddings"] is False
