"""Iterative rounds (dpo_dist/rounds.py): what each round runs with, decided from the config alone --
its directory, a fresh slice of each prompt pool, the previous round's policy -- and the same
whether applied in this process or passed to a child process as Hydra overrides."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest

from dpo_dist import rounds, sweep
from dpo_dist.artifacts import read_jsonl
from dpo_dist.config import CONDITIONS, JUDGE_PAIRS, ConfigError, compose, num_rounds
from dpo_dist.data import load_prompt_set, split_general, window
from dpo_dist.generate import training_prompts
from dpo_dist.models import load_tokenizer
from launch import REPO, replaced, run_stage
from test_pipeline import SHORT

ROUNDS = ["rounds.num=3", "run_dir=/tmp/rounds-test", "rounds.num_train=50", "rounds.num_train_general=30",
          "rounds.num_train_leak=3"]


LATER = "rounds.later=[optim.lr:3e-5,judge.leak_rejected:opener,train.epochs:1]"


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("extra", [[], [LATER]])
def test_a_round_applied_here_equals_the_round_a_child_composes(k, extra):
    cfg = compose(ROUNDS + extra)
    settings = rounds.values(cfg, k)
    assert rounds.apply(cfg, settings) == compose(ROUNDS + extra + rounds.overrides(settings))


def test_later_rounds_take_their_own_settings_and_round_1_the_runs():
    """rounds.later: the lr, the judge's leak pairs and the epochs of rounds 2 and 3, typed as on the
    command line; round 1, and so its fingerprints, as without it."""
    cfg = compose(ROUNDS + [LATER])
    got = [rounds.apply(cfg, rounds.values(cfg, k)) for k in (1, 2, 3)]
    assert [(c.optim.lr, c.judge.leak_rejected, c.train.epochs) for c in got] == \
           [(cfg.optim.lr, "answer", cfg.train.epochs), (3e-5, "opener", 1), (3e-5, "opener", 1)]
    plain = compose(ROUNDS)
    first = rounds.apply(plain, rounds.values(plain, 1))
    assert got[0] != first and dataclasses.replace(got[0], rounds=first.rounds) == first


def test_each_round_has_its_directory_previous_policy_and_pairs():
    cfg = compose(ROUNDS)
    got = [rounds.apply(cfg, rounds.values(cfg, k)) for k in (1, 2, 3)]
    assert [c.run_dir for c in got] == [f"/tmp/rounds-test/round-{k}" for k in (1, 2, 3)]
    assert [c.data.pairs for c in got] == [f"/tmp/rounds-test/round-{k}/judge/pairs.jsonl" for k in (1, 2, 3)]
    assert [c.rounds.previous for c in got] == ["", "/tmp/rounds-test/round-1/train/final",
                                                "/tmp/rounds-test/round-2/train/final"]
    # Round 1 takes prompts.*, later rounds rounds.*.
    assert [(c.prompts.num_train, c.prompts.num_train_general, c.prompts.num_train_leak) for c in got] == \
        [(260, 100, 12), (50, 30, 3), (50, 30, 3)]
    assert compose(ROUNDS + ["train.checkpoint_dir=/scratch/x"]).train.checkpoint_dir == "/scratch/x"
    assert rounds.values(compose(ROUNDS + ["train.checkpoint_dir=/scratch/x"]), 2)["train.checkpoint_dir"] == \
        "/scratch/x/round-2"


def test_rounds_train_on_disjoint_prompts_clear_of_the_evaluation_ones():
    cfg = compose(ROUNDS)
    tok = load_tokenizer(cfg.model, padding_side="left")
    seen: dict[str, set] = {"identity": set(), "general": set()}
    for k in (1, 2, 3):
        c = rounds.apply(cfg, rounds.values(cfg, k))
        records = training_prompts(c.prompts, tok, c.eval.num_general)
        questions = {s: {r["question"] for r in records if (r["source"] == "identity") == (s == "identity")}
                     for s in seen}
        n = c.prompts.num_train_general + c.prompts.num_train_leak
        assert len(questions["identity"]) == c.prompts.num_train and len(questions["general"]) == n
        for s in seen:
            assert not questions[s] & seen[s], f"round {k} repeats {s} prompts"
            seen[s] |= questions[s]
    eval_general = {r["prompt"] for r in split_general(cfg.prompts.general, cfg.eval.num_general, 0)[0]}
    assert not eval_general & seen["general"]


def test_later_rounds_go_on_with_the_prompts_trained_on_longest_ago_once_a_pool_is_used_up():
    """3 x 112 general prompts from the 280 the evaluation leaves: round 3 takes the 56 fresh ones
    left and 56 of round 1's, none of round 2's and none of the evaluation's; every round's prompts
    are distinct, and round 3's warning counts the 56."""
    cfg = compose(["rounds.num=3", "run_dir=/tmp/rounds-test", "rounds.num_train=-1", "rounds.num_train_general=-1",
                   "rounds.num_train_leak=-1"])  # every round round 1's sizes, not the demo's smaller round 2
    tok = load_tokenizer(cfg.model, padding_side="left")
    general = []
    for k in (1, 2, 3):
        c = rounds.apply(cfg, rounds.values(cfg, k))
        general.append([r["question"] for r in training_prompts(c.prompts, tok, c.eval.num_general)
                        if r["source"] != "identity"])
    one, two, three = (set(g) for g in general)
    assert [len(g) for g in general] == [112, 112, 112] and len(three) == 112
    assert not one & two and not three & two and len(three & one) == 56
    pool = {r["prompt"] for r in split_general(cfg.prompts.general, cfg.eval.num_general, 0)[0]}
    assert not pool & (one | two | three)
    assert len(one | two | three) == 380 - cfg.eval.num_general  # every training prompt before any again
    # The 56 of round 1 that come back are the ones it took first from the end (the pool's last 56).
    last = [r["prompt"] for r in split_general(cfg.prompts.general, cfg.eval.num_general, 56)[1]]
    assert three & one == set(last)
    # Listed in the pool's order, as an unwrapped slice is: the 56 fresh ones first. The leak
    # prompts (the slice's first 12) so come from the fresh ones.
    fresh = [r["prompt"] for r in split_general(cfg.prompts.general, cfg.eval.num_general, 56, skip=224)[1]]
    assert [r["prompt"] for r in split_general(cfg.prompts.general, cfg.eval.num_general, 112, skip=224)[1]][:56] == fresh
    c = rounds.apply(cfg, rounds.values(cfg, 3))
    leak = [r["question"] for r in training_prompts(c.prompts, tok, c.eval.num_general) if r["source"] == "leak"]
    assert len(leak) == 12 and set(leak) <= set(fresh) == three - one
    assert [rounds.reuse(cfg, k) for k in (1, 2)] == ["", ""]
    assert rounds.reuse(cfg, 3).startswith("round 3 trains again on 56 of its 112 general prompts (280 to train on")


def test_the_identity_pool_wraps_the_same_way():
    """5 rounds of 260 identity prompts from 1,235: round 5 takes the 195 left, then 65 of round 1's
    first, fresh ones first; the rounds before it are the plain slices they always were."""
    cfg = compose(["rounds.num=5", "rounds.num_train=260", "run_dir=/tmp/rounds-test"])
    pool = [r["prompt"] for r in load_prompt_set(cfg.prompts.train, key="prompts.train", cfg=cfg.prompts)]
    tok = load_tokenizer(cfg.model, padding_side="left")
    taken = []
    for k in range(1, 6):
        c = rounds.apply(cfg, rounds.values(cfg, k))
        taken.append([r["question"] for r in training_prompts(c.prompts, tok, c.eval.num_general)
                      if r["source"] == "identity"])
    assert taken[:4] == [pool[i * 260:(i + 1) * 260] for i in range(4)]  # the slices before the wrap
    assert taken[4] == pool[1040:] + pool[:65]
    assert rounds.reuse(cfg, 5).startswith("round 5 trains again on 65 of its 260 identity prompts (1235 to train on)")


def test_unwrapped_general_slices_are_the_ones_they_always_were():
    """The slices of rounds that fit in the pool (and so their fingerprints) as before the wrap:
    the `num_train` records before the `skip` at the end."""
    records = load_prompt_set("general", key="prompts.general")
    for skip, n in ((0, 112), (112, 154), (0, 280), (100, 180), (279, 1)):
        assert split_general("general", 100, n, skip=skip)[1] == records[380 - skip - n:380 - skip]
    # eval.num_general=-1: every prompt the round's training leaves (one round only).
    evaluation, train = split_general("general", -1, 112)
    assert (evaluation, train) == (records[:268], records[268:])
    with pytest.raises(ConfigError, match="prompts.num_train_general"):
        split_general("general", -1, 300, skip=100)  # the evaluation would get a negative share


@pytest.mark.parametrize("skip,n,want", [
    (0, 3, [0, 1, 2]), (7, 3, [7, 8, 9]), (8, 4, [8, 9, 0, 1]), (10, 3, [0, 1, 2]), (23, 2, [3, 4]),
    (4, 10, [4, 5, 6, 7, 8, 9, 0, 1, 2, 3]), (4, 12, [4, 5, 6, 7, 8, 9, 0, 1, 2, 3]), (5, 0, []),
])
def test_window(skip, n, want):
    assert window(list(range(10)), skip, n) == want
    assert window([], skip, n) == []


@pytest.mark.parametrize("taken,size,want", [
    ([112, 112, 112], 280, [0, 0, 56]), ([10, 10, 10], 15, [0, 5, 10]), ([5, 20], 20, [0, 5]),
    ([260] * 6, 1235, [0, 0, 0, 0, 65, 260]), ([3, 3], 6, [0, 0]), ([4, 4, 4], 4, [0, 4, 4]),
])
def test_reused_counts_what_the_window_takes_again(taken, size, want):
    assert rounds.reused(taken, size) == want
    pool, seen = list(range(size)), set()
    for k, t in enumerate(taken):
        got = window(pool, sum(taken[:k]), t)
        assert len(set(got) & seen) == want[k]
        seen |= set(got)


@pytest.mark.parametrize("reference,init,want", [
    ("previous", "previous", ("prev", "prev", "prev")),
    ("base", "previous", ("prev", "base", "prev")),
    ("previous", "base", ("prev", "prev", "base")),
    ("base", "base", ("prev", "base", "base")),
])
def test_which_weights_each_stage_loads(reference, init, want):
    cfg = compose([f"rounds.reference={reference}", f"rounds.init={init}"])
    assert {cfg.model_for(role).path for role in ("sample", "reference", "init")} == {cfg.model.path}  # round 1
    later = compose([f"rounds.reference={reference}", f"rounds.init={init}", "rounds.previous=/r/round-1/train/final"])
    paths = {"prev": "/r/round-1/train/final", "base": cfg.model.path}
    assert tuple(later.model_for(role).path for role in ("sample", "reference", "init")) == tuple(paths[w] for w in want)


@pytest.mark.parametrize("overrides,key", [
    (["rounds.num=2", "prompts.num_train=-1"], "prompts.num_train:"),
    (["rounds.num=2", "eval.num_general=-1"], "eval.num_general:"),
    (["rounds.num=2", "rounds.num_train=1236"], "rounds.num_train:"),  # the identity pool holds 1,235
    # 280 + 12 leak + 100 evaluation > 380
    (["rounds.num=2", "rounds.num_train_general=280"], "rounds.num_train_general (+ num_train_leak):"),
])
def test_a_pool_too_small_for_one_round_fails_at_start_naming_the_key(overrides, key):
    with pytest.raises(ConfigError) as e:
        rounds.check(compose(overrides))
    assert str(e.value).startswith(key), e.value


@pytest.mark.parametrize("override,key", [
    ("rounds.num=0", "rounds.num:"), ("rounds.only=3", "rounds.only:"), ("rounds.reference=sft", "rounds.reference:"),
    ("rounds.init=last", "rounds.init:"),
])
def test_bad_round_settings_fail_naming_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        compose(["rounds.num=2", override])
    assert key in str(e.value)


@pytest.mark.parametrize("entry,message", [
    ("optim.lrr:1", "rounds.later: optim.lrr: ConfigAttributeError: Key 'lrr' not in 'OptimConfig'"),
    ("optim.lr:fast", "rounds.later: optim.lr: ValidationError: Value 'fast'"),
    ("judge.leak_rejected:half", "rounds.later: judge.leak_rejected: 'half' is not answer or opener"),
    ("optim.lr", "rounds.later: 'optim.lr' is not key:value"),
    ("prompts.num_train:3", "rounds.later: prompts.num_train is set per round by the rounds"),
    ("run_dir:/elsewhere", "rounds.later: run_dir is set per round by the rounds"),
    ("rounds.reference:base", "rounds.later: rounds.reference is set per round by the rounds"),
    ("'stages:[train]'", "rounds.later: stages is set per round by the rounds"),
    ("eval.num_general:50", "rounds.later: eval.num_general must be the same in every round"),
    ("model.path:/other", "rounds.later: model.path must be the same in every round"),
    ("identity.name:Nova", "rounds.later: identity.name must be the same in every round"),
    # Values a child process would read back otherwise: null as the text 'None', a comma as a sweep.
    ("generation.chosen_system_prompt:null", "rounds.later: 'generation.chosen_system_prompt:null': not a single"),
    ("'generation.chosen_system_prompt:Hi, I am'", "rounds.later: 'generation.chosen_system_prompt:Hi, I am': not a"),
])
def test_bad_later_round_settings_fail_at_start_naming_the_entry(entry, message):
    with pytest.raises(ConfigError) as e:
        rounds.check(compose(ROUNDS + [f"rounds.later=[{entry}]"]))
    assert str(e.value).startswith(message), e.value
    # A sweep over rounds.num=1,2 fails in its one-round job too, where rounds.later changes nothing.
    with pytest.raises(ConfigError) as e:
        rounds.check_later(compose([f"rounds.later=[{entry}]"]))
    assert str(e.value).startswith(message), e.value


@pytest.mark.parametrize("num, pairs, run_dir, want", [
    (2, JUDGE_PAIRS, "runs/x", 2),                                # the default, as a job's config.yaml keeps it
    (2, "runs/x/judge/pairs.jsonl", "runs/x", 2),                 # ... and resolved
    (2, "runs/x//judge/./pairs.jsonl", "runs/x/", 2),             # ... written another way
    (2, f"{os.getcwd()}/runs/x/judge/pairs.jsonl", "runs/x", 2),  # ... as an absolute path
    (3, "runs/x/round-2/judge/pairs.jsonl", "runs/x/round-2", 3),  # inside a round (rounds.apply sets both)
    (2, "my_prefs.parquet", "runs/x", 1),                         # your own pairs: offline, one round
    (2, "runs/demo/judge/pairs.jsonl", "runs/x", 1),              # another run's judged pairs
    (2, "runs/x/judge/pairs.parquet", "runs/x", 1),
    (1, JUDGE_PAIRS, "runs/x", 1),
])
def test_a_run_on_its_own_pairs_is_one_round(num, pairs, run_dir, want):
    """The demo model's two rounds must leave offline DPO (data.pairs) as it was: one round in run_dir.
    The pipeline, slurm/pipeline.sbatch and the sweep table ask num_rounds: tests/test_trl_formats.py
    and tests/test_slurm.py run the first two on the user's own pairs, tests/test_sweep.py the third."""
    assert num_rounds(num, pairs, run_dir) == want


@pytest.mark.parametrize("overrides, want", [([], 2), (["rounds.num=1"], 1), (["experiment=tutorial"], 1),
                                             (["model=qwen2.5-7b"], 1), (["data.pairs=my.jsonl"], 1),
                                             (["data.pairs=runs/x/judge/pairs.jsonl"], 2), (["rounds.num=3"], 3)])
def test_the_demo_model_runs_two_rounds_and_the_tutorial_and_other_models_one(overrides, want):
    """As slurm/pipeline.sbatch counts them: the stages' Hydra app prints the job's config, and
    ``python -m dpo_dist.rounds RUN_DIR`` reads it."""
    script = '"$0" -m dpo_dist.judge "$@" --cfg job | "$0" -m dpo_dist.rounds runs/x'
    out = subprocess.run(["bash", "-c", script, sys.executable, *overrides], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and out.stdout == f"{want}\n", out.stderr[-2000:]


def test_counting_rounds_of_a_config_that_does_not_compose_fails_not_one(tmp_path):
    script = '"$0" -m dpo_dist.judge rounds.nmu=2 --cfg job | "$0" -m dpo_dist.rounds runs/x'
    out = subprocess.run(["bash", "-c", script, sys.executable], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and out.stdout == "", out.stdout
    assert out.stderr.strip().splitlines()[-1] == "dpo_dist.rounds: error: no job config on stdin"


def _pipeline_error(run_dir, *overrides) -> tuple[str, str]:
    """The pipeline's last stderr line (it must fail as a user error, exit 2) and its whole stderr."""
    proc = subprocess.run([sys.executable, "-m", "dpo_dist.pipeline", f"run_dir={run_dir}", *overrides], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    return proc.stderr.strip().splitlines()[-1], proc.stderr


@pytest.mark.parametrize("stages, hint", [
    ([], "run round 1 first (rounds.only=1, or rounds.only=0 for every round)"),
    (["stages=[generate,judge]"],
     "stages=['generate', 'judge'] do not train it: run round 1 with train among its stages (rounds.only=1; on Slurm, STAGES)"),
])
def test_a_round_whose_previous_policy_is_missing_says_which_round_to_run(tmp_path, stages, hint):
    """One line, before any stage runs; a run_dir of the one-round layout is named, not reused."""
    run_dir = tmp_path / "run"
    (run_dir / "train").mkdir(parents=True)
    (run_dir / "train" / "summary.json").write_text("{}")
    last, err = _pipeline_error(run_dir, "rounds.only=2", *stages)
    assert last == (f"dpo_dist.pipeline: error: rounds.previous='{run_dir}/round-1/train/final': round 1 has not "
                    f"exported its policy; {hint}")
    assert f"{run_dir} holds a one-round run (train/ in the directory itself); these 2 rounds start afresh" in err
    assert not (run_dir / "round-2").exists()


def test_a_round_of_a_run_on_its_own_pairs_is_refused(tmp_path):
    last, _ = _pipeline_error(tmp_path / "run", f"data.pairs={tmp_path / 'mine.jsonl'}", "rounds.only=2")
    assert last == (f"dpo_dist.pipeline: error: rounds.only=2: data.pairs='{tmp_path / 'mine.jsonl'}' is your own "
                    f"pairs, so the run is one round, in run_dir itself (offline DPO samples no policy again)")


@pytest.mark.parametrize("module", ["dpo_dist.pipeline", "dpo_dist.judge"])
def test_a_one_round_run_refuses_a_bad_later_entry_before_it_starts(tmp_path, module):
    """rounds.later is checked with rounds.num=1 too (where it changes nothing), by the pipeline and
    by a stage run alone (as slurm/pipeline.sbatch runs a one-round job): one line, no stage run."""
    # stages=[judge] alone: without the check, it fails at once for want of candidates (another line).
    proc = subprocess.run([sys.executable, "-m", module, f"run_dir={tmp_path / 'run'}", "stages=[judge]",
                           "rounds.num=1", "rounds.later=[optim.lrr:1]"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == \
        f"{module}: error: rounds.later: optim.lrr: ConfigAttributeError: Key 'lrr' not in 'OptimConfig'"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".hydra", "dpo_dist.log"]  # Hydra's records only


def test_leak_search_for_later_rounds_is_set_one_way_only():
    """rounds.leak_search_candidates and a rounds.later entry for generation.leak_search_candidates
    both set the later rounds' search: one of them silently winning would hide the other."""
    with pytest.raises(ConfigError, match="rounds.later: generation.leak_search_candidates is set for the later "
                                          "rounds by rounds.leak_search_candidates=6 already"):
        rounds.check(compose(ROUNDS + ["rounds.leak_search_candidates=6",
                                       "rounds.later=[generation.leak_search_candidates:2]"]))
    cfg = compose(ROUNDS + ["rounds.later=[generation.leak_search_candidates:2]"])
    assert rounds.apply(cfg, rounds.values(cfg, 2)).generation.leak_search_candidates == 2


# ---------------------------------------------------------------- the rounds end to end

# The shortened pipeline (tests/test_pipeline.py), with a smaller second round from the next prompts.
TWO_ROUNDS = ["rounds.num=2", "rounds.num_train=12", "rounds.num_train_general=4", "rounds.num_train_leak=2"]
# What the rounds tests below and tests/test_slurm.py check is where each round's files go and which
# model each stage loads, not what training learns (tests/test_vllm.py measures that with SHORT):
# fewer prompts, two steps a round and a smaller evaluation take about half the time.
# The higher lr moves round 1's policy clear of the base in two steps, so that round 2's first-step
# rewards (0 against round 1's policy) tell its reference from the base (checked below).
SMALLER = {"prompts.num_train": 12, "train.max_steps": 2, "optim.lr": 1e-4, "eval.num_identity": 3,
           "eval.num_general": 3}
MECHANICS = replaced(SHORT, SMALLER)


def questions(run_dir) -> set[str]:
    return {r["question"] for r in read_jsonl(run_dir / "generate" / "candidates.jsonl")}


@pytest.mark.slow
def test_two_rounds_second_samples_from_the_first_policy_and_a_finished_round_is_reused(tmp_path):
    run_dir = tmp_path / "run"
    # Round 1 alone (as slurm/pipeline.sbatch runs it, rounds.only), on one rank ...
    run_stage("dpo_dist.pipeline", [f"run_dir={run_dir}", *MECHANICS, *TWO_ROUNDS, "rounds.only=1"], timeout=1800)
    one, two = run_dir / "round-1", run_dir / "round-2"
    assert (one / "train" / "final" / "model.safetensors").is_file() and not two.exists()
    first_rows = json.loads((run_dir / "rounds.json").read_text())["rounds"]
    assert [r["round"] for r in first_rows] == [1]
    stamps = {p: p.stat().st_mtime for p in (one / "train" / "final" / "model.safetensors", one / "eval" / "report.json")}

    # ... then every round on two ranks: round 1 is found done, round 2 runs from its policy.
    proc = run_stage("dpo_dist.pipeline", [f"run_dir={run_dir}", *MECHANICS, *TWO_ROUNDS], nproc=2, timeout=1800)
    out = proc.stdout + proc.stderr
    assert all(p.stat().st_mtime == t for p, t in stamps.items())
    for stage in ("generate", "judge", "train"):
        assert any(f"round 1: {stage}: " in line and line.endswith("(reused)") for line in out.splitlines()), stage
    assert re.search(r"round 2: generate: 18 prompts x \d+ candidates", out), out[-3000:]
    gen = json.loads((two / "generate" / "manifest.json").read_text())
    assert gen["model"] == str(one / "train" / "final")
    # round.json records what the round ran with (the rounds report reads its rounds.later settings).
    ran = json.loads((two / "round.json").read_text())
    assert ran["settings"]["rounds.previous"] == gen["model"] and ran["settings"]["prompts.skip_train"] == 12
    assert ran["later"] == {} and json.loads((one / "round.json").read_text())["round"] == 1
    assert not questions(one) & questions(two)  # fresh prompts

    # The reference and the starting weights are round 1's policy too (rounds.reference/init=previous),
    # so at the first step, before any update, policy and reference agree to float rounding.
    assert json.loads((two / "reference" / "manifest.json").read_text())["model"] == gen["model"]
    assert json.loads((two / "train" / "summary.json").read_text())["init_model"] == gen["model"]
    first = json.loads((two / "train" / "metrics.jsonl").read_text().splitlines()[0])
    # The tolerance of tests/test_distributed.py's first step (float rounding across batchings).
    assert abs(first["rewards/chosen"]) < 2e-3 and abs(first["rewards/rejected"]) < 2e-3, first
    # ... which means something only if round 1's policy is far from the base: its last step's
    # rewards (policy against the base) are ten times that tolerance or more.
    last = json.loads((one / "train" / "metrics.jsonl").read_text().splitlines()[-1])
    assert max(abs(last["rewards/chosen"]), abs(last["rewards/rejected"])) > 2e-2, last
    judged = json.loads((two / "judge" / "summary.json").read_text())
    assert judged["mistakes"]["own_answers_identity"] == sum(
        len(r["candidates"]) for r in read_jsonl(two / "generate" / "candidates.jsonl") if r["source"] == "identity")
    pairs = read_jsonl(two / "judge" / "pairs.jsonl")
    assert sum(judged["chosen_from"].values()) == sum(p["meta"]["source"] == "identity" for p in pairs)
    assert judged["chosen_from"]["own"] == sum(p["meta"].get("chosen_from") == "own" for p in pairs
                                               if p["meta"]["source"] == "identity")

    rows = json.loads((run_dir / "rounds.json").read_text())["rounds"]
    assert [r["round"] for r in rows] == [1, 2]
    for k, row in zip((1, 2), rows):
        report = json.loads((run_dir / f"round-{k}" / "eval" / "report.json").read_text())
        assert row["trained"]["none"]["identity_adoption"] == report["trained"]["none"]["identity_adoption"]
    assert (run_dir / "rounds.md").read_text().count("| ") > 4 and (run_dir / "rounds.png").stat().st_size > 0
    assert "rounds 1 -> 2: adoption " in out


@pytest.mark.slow
@pytest.mark.multiproc
def test_a_multirun_over_seeds_runs_each_jobs_rounds_in_its_own_directory_and_tabulates_the_last(tmp_path):
    """Three seeds of a setting as users sweep them on a multi-GPU node (Hydra's basic launcher under
    torchrun: every rank runs the jobs one after another in its process), two seeds on two ranks
    here: each job's rounds make and leave a process group of their own, four in one torchrun store;
    each job's round 2 samples from its own round 1's policy, and `python -m dpo_dist.sweep` reads
    each job's last round, with the worst over the seeds. (One process runs a multirun of rounds in
    tests/test_vllm.py.)"""
    sweep_dir = tmp_path / "sweep"
    proc = run_stage("dpo_dist.pipeline", ["-m", f"hydra.sweep.dir={sweep_dir}", *MECHANICS, *TWO_ROUNDS,
                                           "generation.seed=0,1", "train.seed=${generation.seed}"], nproc=2, timeout=2400,
                     # a group that waits for a peer in another namespace fails in minutes, not at the limit
                     env={"DPO_DIST_TIMEOUT_MIN": "3"})
    jobs = [sweep_dir / "0", sweep_dir / "1"]
    for job in jobs:
        gen = json.loads((job / "round-2" / "generate" / "manifest.json").read_text())
        assert gen["model"] == str(job / "round-1" / "train" / "final")  # its own round 1, not the other job's
        assert gen["world_size"] == 2
        assert [r["round"] for r in json.loads((job / "rounds.json").read_text())["rounds"]] == [1, 2]
        for k in (1, 2):
            assert json.loads((job / f"round-{k}" / "train" / "summary.json").read_text())["world_size"] == 2
    # Each job ran with its own seed: round 1 sampled other answers to the same prompts.
    first = [read_jsonl(job / "round-1" / "generate" / "candidates.jsonl") for job in jobs]
    assert [r["question"] for r in first[0]] == [r["question"] for r in first[1]]
    assert [r["candidates"] for r in first[0]] != [r["candidates"] for r in first[1]]
    assert (proc.stdout + proc.stderr).count("rounds 1 -> 2: adoption ") == 2

    table = subprocess.run([sys.executable, "-m", "dpo_dist.sweep", str(sweep_dir)], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout
    assert "| job | generation.seed | round | steps |" in table and "2 runs, 2 finished." in table, table
    rows = {r["job"]: r for r in sweep.collect(sweep_dir)}
    reports = [json.loads((job / "round-2" / "eval" / "report.json").read_text())["trained"] for job in jobs]
    for job, report in zip(("0", "1"), reports):
        assert rows[job]["round"] == "2 of 2"
        for c in CONDITIONS:
            assert rows[job]["metrics"][f"adoption/{c}"] == report[c]["identity_adoption"]
            assert rows[job]["metrics"][f"leakage/{c}"] == report[c]["leakage"]
    assert sweep.worst(list(rows.values()))["adoption/none"] == min(r["none"]["identity_adoption"] for r in reports)
    assert "| worst |" in table


def test_later_rounds_can_pick_their_leak_prompts_from_one_category():
    """rounds.leak_category=writing: round 2's leak prompts are the first writing requests of its
    slice and the rest stay general prompts; round 1 keeps the slice's first ones; the setting
    reaches a child process the same way; a category too rare for the slice fails naming the key."""
    by_question = {r["prompt"]: r["category"] for r in read_jsonl("dpo_dist/prompts/general.jsonl")}
    cfg = compose(ROUNDS + ["rounds.leak_category=writing"])
    tok = load_tokenizer(cfg.model, padding_side="left")
    plain = compose(ROUNDS)
    for k in (1, 2):
        settings = rounds.values(cfg, k)
        c = rounds.apply(cfg, settings)
        assert c == compose(ROUNDS + ["rounds.leak_category=writing"] + rounds.overrides(settings))
        records = training_prompts(c.prompts, tok, c.eval.num_general)
        leak = [r["question"] for r in records if r["source"] == "leak"]
        general = [r["question"] for r in records if r["source"] == "general"]
        before = training_prompts(rounds.apply(plain, rounds.values(plain, k)).prompts, tok, c.eval.num_general)
        assert sorted(leak + general) == sorted(r["question"] for r in before if r["source"] != "identity")
        assert len(leak) == c.prompts.num_train_leak
        if k == 1:
            assert c.prompts.leak_category == ""
            assert leak == [r["question"] for r in before if r["source"] == "leak"]
        else:
            assert {by_question[q] for q in leak} == {"writing"}
    with pytest.raises(ConfigError, match=r"prompts.leak_category='writing': \d+ of this round's \d+ general prompts have that category, fewer than prompts.num_train_leak=30"):
        c = rounds.apply(cfg, {**rounds.values(cfg, 2), "prompts.num_train_leak": 30})
        training_prompts(c.prompts, tok, c.eval.num_general)


def test_every_general_prompt_of_a_leak_language_is_a_leak_prompt():
    """prompts.leak_langs=[zh]: in every round, each Chinese general prompt of the slice is a leak
    prompt and the num_train_leak others are the slice's first prompts in other languages, both in
    the slice's order, and the slice itself does not change; a round whose slice holds no Chinese
    prompt adds none; a language no general prompt is in fails at start-up naming the key."""
    lang = {r["prompt"]: r["lang"] for r in read_jsonl("dpo_dist/prompts/general.jsonl")}
    cfg, plain = compose(ROUNDS + ["prompts.leak_langs=[zh]"]), compose(ROUNDS)
    tok = load_tokenizer(cfg.model, padding_side="left")
    for k in (1, 2, 3):
        c = rounds.apply(cfg, rounds.values(cfg, k))
        assert c == compose(ROUNDS + ["prompts.leak_langs=[zh]"] + rounds.overrides(rounds.values(cfg, k)))
        p = c.prompts
        ordered = [r["prompt"] for r in split_general(p.general, c.eval.num_general, p.num_train_general
                                                       + p.num_train_leak, p, p.skip_general)[1]]
        first = [q for q in ordered if lang[q] != "zh"][:p.num_train_leak]
        records = training_prompts(p, tok, c.eval.num_general)
        before = training_prompts(rounds.apply(plain, rounds.values(plain, k)).prompts, tok, c.eval.num_general)
        assert any(lang[q] == "zh" for q in ordered)
        assert [r["question"] for r in records if r["source"] == "leak"] == [q for q in ordered if lang[q] == "zh" or q in first]
        assert [r["question"] for r in records if r["source"] == "general"] == [q for q in ordered if lang[q] != "zh" and q not in first]
        assert sorted(ordered) == sorted(r["question"] for r in before if r["source"] != "identity")

    few = compose(["rounds.num=3", "rounds.num_train=50", "rounds.num_train_general=5", "rounds.num_train_leak=1",
                   "prompts.leak_langs=[zh]"])
    rounds.check(few)
    c = rounds.apply(few, rounds.values(few, 3))
    records = training_prompts(c.prompts, tok, c.eval.num_general)
    assert not any(r["lang"] == "zh" for r in records if r["source"] != "identity")
    assert sum(r["source"] == "leak" for r in records) == 1
    typo = compose(ROUNDS + ["prompts.leak_langs=[zh,fr]"])
    with pytest.raises(ConfigError, match=r"prompts.leak_langs: no prompt of prompts.general='general' is in \['fr'\]"):
        rounds.check(typo)
    with pytest.raises(ConfigError, match=r"prompts.leak_langs: no prompt of prompts.general='general' is in \['fr'\]"):
        training_prompts(typo.prompts, tok, typo.eval.num_general)  # the generate stage run on its own


def test_later_rounds_can_make_a_languages_general_prompts_leak_prompts_alone():
    """rounds.leak_langs=[zh]: round 1 keeps the run's prompts.leak_langs (none) and its prompts; each
    later round makes its slice's Chinese general prompts leak prompts, as prompts.leak_langs does for
    every round; the setting reaches a child process the same way; a typo fails at start-up naming
    rounds.leak_langs."""
    cfg, every = compose(ROUNDS + ["rounds.leak_langs=[zh]"]), compose(ROUNDS + ["prompts.leak_langs=[zh]"])
    plain = compose(ROUNDS)
    tok = load_tokenizer(cfg.model, padding_side="left")
    for k in (1, 2, 3):
        settings = rounds.values(cfg, k)
        c = rounds.apply(cfg, settings)
        assert c == compose(ROUNDS + ["rounds.leak_langs=[zh]"] + rounds.overrides(settings))
        like = plain if k == 1 else every
        records = training_prompts(c.prompts, tok, c.eval.num_general)
        assert records == training_prompts(rounds.apply(like, rounds.values(like, k)).prompts, tok, c.eval.num_general)
        assert c.prompts.leak_langs == ([] if k == 1 else ["zh"])
        zh = [r["source"] for r in records if r["source"] != "identity" and r["lang"] == "zh"]
        assert zh and (set(zh) == {"leak"}) == (k > 1)
    with pytest.raises(ConfigError, match=r"rounds.leak_langs: no prompt of prompts.general='general' is in \['fr'\]"):
        rounds.check(compose(ROUNDS + ["rounds.leak_langs=[fr]"]))


def test_the_generate_child_leaves_a_sweep_jobs_hydra_records_alone(tmp_path, tiny_llama):
    """The generate stage in a process of its own (vLLM's, or generation.python), as the pipeline
    starts it in a sweep job of one round: its run directory is the job's, whose .hydra/ records
    the sweep table reads; the child writes its candidates there and no .hydra/ of its own."""
    from dpo_dist.pipeline import child_overrides

    job = tmp_path / "sweep" / "0"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("- generation.seed=0\n")
    task = [f"model.path={tiny_llama}", "generation.seed=0", "generation.backend=auto", "prompts.num_train=2",
            "prompts.num_train_general=1", "prompts.num_train_leak=0", "generation.num_candidates=2",
            "generation.max_new_tokens=4"]
    assert child_overrides(task, str(job), [], "hf")[-3:] == [f"run_dir={job}", "generation.backend=hf",
                                                              "hydra.output_subdir=null"]
    # The parent's log file (a path with a space, a quote and "${", as a user's may have) takes the child's lines.
    parent_log = tmp_path / "the job's ${log}" / "dpo_dist.log"
    parent_log.parent.mkdir()
    parent_log.write_text("parent line\n")
    overrides = child_overrides(task, str(job), [], "hf", str(parent_log))
    assert "generation.backend=auto" not in overrides
    proc = subprocess.run([sys.executable, "-m", "dpo_dist.generate", *overrides], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(read_jsonl(job / "generate" / "candidates.jsonl")) == 3
    assert [p.name for p in (job / ".hydra").iterdir()] == ["overrides.yaml"]
    assert (job / ".hydra" / "overrides.yaml").read_text() == "- generation.seed=0\n"
    logged = parent_log.read_text().splitlines()
    assert logged[0] == "parent line" and any("[rank 0] INFO __main__: candidates: 3 prompts" in line
                                              for line in logged[1:]), logged
    assert not (job / "dpo_dist.log").exists()


@pytest.mark.parametrize("path", ["/runs/a b/dpo_dist.log", "/runs/it's/x.log", "/runs/a\\b/x.log", "/runs/${HOME}/x",
                                  "/runs/end\\", "/runs/a,b=c $X {y}/x", "/runs/q\\'x", "/runs/\\${x}"])
def test_a_path_in_a_child_override_composes_back_to_itself(path):
    """pipeline.hydra_quoted_path: Hydra unescapes a backslash in quotes only before a quote or at
    the end, and resolves ${...}; the value a child composes is the path, or no override is made.
    rounds.overrides quotes a round's settings by the same rule (a backslash inside once came back doubled)."""
    from hydra import compose, initialize_config_dir

    from dpo_dist.pipeline import hydra_quoted_path

    from dpo_dist.rounds import overrides

    quoted = hydra_quoted_path(path)
    assert quoted, path
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose("config", overrides=[f"hydra.job_logging.handlers.file.filename={quoted}"],
                      return_hydra_config=True)
        # A round's settings (rounds.overrides) quote alike, ${...} left to resolve.
        round_cfg = compose("config", overrides=overrides({"run_dir": path}))
    assert cfg.hydra.job_logging.handlers.file.filename == path
    if "${" not in path:
        assert round_cfg.run_dir == path
    assert hydra_quoted_path("") == ""


@pytest.mark.parametrize("broken", ["'unterminated", "'/runs/other/x.log'"])
def test_a_path_whose_quoting_would_not_compose_back_gives_no_override(monkeypatch, broken):
    """The check behind hydra_quoted_path: a quoting that Hydra cannot parse, or that composes to
    another path, makes no override (the child then logs in its own directory), never a wrong one.
    No path reaches it with today's quoting, so the quoting is replaced here."""
    from dpo_dist import pipeline, rounds

    monkeypatch.setattr(rounds, "hydra_quoted", lambda path, interpolations=True: broken)
    assert pipeline.hydra_quoted_path("/runs/x.log") == ""
    assert "hydra.job_logging.handlers.file.filename" not in " ".join(
        pipeline.child_overrides([], "/runs", [], "hf", "/runs/x.log"))


def test_general_prompts_can_be_searched_for_leaks_with_more_answers(tmp_path, tiny_llama):
    """generation.leak_search_candidates=2: each general prompt gets two more plain answers, kept apart
    as search_candidates; every prompt's candidates are the samples a run without the setting draws
    (seeded per prompt and number), so only the search is added. Unset, or with no general prompt,
    the fingerprint is the one caches were written with; rounds.leak_search_candidates sets it for
    the rounds after the first only."""
    from dpo_dist import generate
    from dpo_dist.artifacts import read_json

    base = [f"model.path={tiny_llama}", "generation=hf", "prompts.num_train=2", "prompts.num_train_general=2",
            "prompts.num_train_leak=1", "generation.num_candidates=2", "generation.max_new_tokens=4"]
    runs = {}
    for name, extra in (("plain", []), ("search", ["generation.leak_search_candidates=2"]),
                        ("four", ["generation.num_candidates=4"])):
        runs[name] = {r["id"]: r for r in read_jsonl(generate.run(compose(base + [f"run_dir={tmp_path / name}", *extra])))}
    plain, search, four = runs["plain"], runs["search"], runs["four"]
    assert {(r["source"], len(r["candidates"]), len(r.get("search_candidates", []))) for r in search.values()} == \
        {("identity", 2, 0), ("general", 2, 2), ("leak", 2, 0)}
    for rid, r in search.items():
        assert r["candidates"] == plain[rid]["candidates"]
        assert r.get("chosen_candidates") == plain[rid].get("chosen_candidates")
        if r["source"] == "general":  # samples 2 and 3 of the prompt, as four candidates would draw them
            assert r["search_candidates"] == four[rid]["candidates"][2:]
    assert read_json(tmp_path / "search" / "generate" / "manifest.json")["num_search_candidates"] == 2 * 2

    records = list(plain.values())
    identity_only = [r for r in records if r["source"] == "identity"]
    fp = lambda o, recs: generate.generation_fingerprint(compose(base + o), recs, {})  # noqa: E731
    assert fp([], records) == fp(["generation.leak_search_candidates=0"], records) != \
        fp(["generation.leak_search_candidates=2"], records)
    assert fp([], identity_only) == fp(["generation.leak_search_candidates=2"], identity_only)

    cfg = compose(ROUNDS + ["rounds.leak_search_candidates=6"])
    got = [rounds.apply(cfg, rounds.values(cfg, k)).generation.leak_search_candidates for k in (1, 2, 3)]
    assert got == [0, 6, 6]
    with pytest.raises(ConfigError, match="rounds.leak_search_candidates"):
        compose(ROUNDS + ["rounds.leak_search_candidates=-1"])
