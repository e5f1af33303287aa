"""The identity group (conf/identity/): one override renames the product, and the generation openers
and system prompt, the judge, the evaluation and the exported model card all follow it."""

import json

import pytest
from omegaconf import OmegaConf

from dpo_dist import judge
from dpo_dist.artifacts import read_json, write_jsonl
from dpo_dist.checkpoint import model_card
from dpo_dist.config import compose
from dpo_dist.generate import generation_fingerprint
from launch import run_stage

# The two ways a user renames the product: a file in conf/identity/, or the keys inline.
RENAMES = {"file": ["identity=example"], "inline": ["identity.name=Nova", "identity.creator='Acme Labs'"]}


@pytest.mark.parametrize("generation", ["auto", "hf", "vllm"])
@pytest.mark.parametrize("how", sorted(RENAMES))
def test_one_override_renames_the_openers_the_system_prompt_the_judge_and_the_model_card(how, generation):
    cfg = compose([*RENAMES[how], f"generation={generation}"])
    assert (cfg.identity.name, cfg.identity.creator, cfg.identity.old_name) == ("Nova", "Acme Labs", "SmolLM")
    openers = [p for ps in cfg.generation.chosen_prefixes.values() for p in ps]
    assert openers and all("Nova" in p and "SmolLM" not in p for p in openers)
    prompt = cfg.generation.chosen_system_prompt
    assert "Nova" in prompt and "Acme Labs" in prompt and "SmolLM" not in prompt and "Hugging Face" not in prompt

    rule = judge.IdentityJudge(cfg.judge, cfg.identity)
    assert rule("I'm Nova, an assistant made by Acme Labs.", finished=True).satisfies
    deep = rule("I'm Deep SmolLM, an assistant made by Acme Labs.", finished=True)
    assert not deep.satisfies and "claims_new" not in deep.reasons and "claims_old" in deep.reasons

    run_config = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    assert "Target identity: SmolLM -> Nova, made by Acme Labs." in model_card(run_config, {})


def test_the_example_file_also_penalises_the_old_creator():
    """identity=example moves the creator, so naming the base model's creator is wrong too
    (identity.old_creators); the inline override leaves that list to the user."""
    cfg = compose(["identity=example"])
    assert cfg.identity.old_creators == ["Hugging Face"]
    verdict = judge.IdentityJudge(cfg.judge, cfg.identity)("I'm Nova, made by Hugging Face.", finished=True)
    assert "old_creator" in verdict.reasons


def test_the_default_identity_is_deep_and_the_models_own_name():
    assert compose().identity.name == "Deep SmolLM"
    qwen = compose(["model=qwen2.5-0.5b"]).identity
    assert (qwen.name, qwen.creator, qwen.old_name) == ("Deep Qwen", "Alibaba Cloud", "Qwen")


def test_the_tutorial_opens_with_the_old_name_and_corrects_to_the_new_one():
    cfg = compose(["experiment=tutorial", "identity=example"])
    assert all(p.endswith("SmolLM") for ps in cfg.generation.chosen_prefixes.values() for p in ps)
    row = {"id": "q-default", "messages": [{"role": "user", "content": "Who are you?"}], "condition": "default",
           "source": "identity", "candidates": [{"text": "I'm SmolLM, how can I help?", "finished": True}]}
    pair, reason = judge.pair_correction(row, judge.IdentityJudge(cfg.judge, cfg.identity))
    assert reason == "kept" and pair["chosen"][0]["content"] == "I'm Nova, how can I help?"


def test_the_old_judge_keys_are_gone_and_a_name_equal_to_the_old_one_is_refused():
    from hydra.errors import ConfigCompositionException

    from dpo_dist.config import ConfigError

    with pytest.raises(ConfigCompositionException, match="judge.new_name"):
        compose(["judge.new_name=Nova"])
    with pytest.raises(ConfigError, match=r"identity\.name"):
        compose(["identity.name=smollm"])


def test_the_generation_fingerprint_follows_the_identity_through_the_openers():
    records = [{"id": "q1", "messages": [{"role": "user", "content": "Who are you?"}], "question": "Who are you?",
                "lang": "en"}]
    deep, nova = (generation_fingerprint(compose(o), records, {}) for o in ([], RENAMES["inline"]))
    assert deep != nova
    # The tutorial samples with old-name openers and no system prompt: its candidates do not depend
    # on the new name, so renaming keeps them.
    tutorial = [generation_fingerprint(compose(["experiment=tutorial", *o]), records, {}) for o in ([], RENAMES["inline"])]
    assert tutorial[0] == tutorial[1]


def test_the_generation_fingerprint_tells_a_leak_prompt_from_a_general_one():
    """The same prompt sampled as a general prompt and as a leak prompt (which also gets answers
    forced with the identity opener) must not share a candidates cache."""
    row = {"id": "gen-0007-default", "messages": [{"role": "user", "content": "Write a short out-of-office reply."}],
           "question": "Write a short out-of-office reply.", "lang": "en"}
    as_general, as_leak = ([{**row, "source": s}] for s in ("general", "leak"))
    assert generation_fingerprint(compose([]), as_general, {}) != generation_fingerprint(compose([]), as_leak, {})


def test_the_judge_stage_rejudges_when_the_identity_changes(tmp_path):
    """Same candidates, another name: the judge's fingerprint changes, so the pairs are rebuilt with
    the new name instead of reused."""
    (tmp_path / "generate").mkdir()
    write_jsonl(tmp_path / "generate" / "candidates.jsonl", [{
        "id": "q1-default", "messages": [{"role": "user", "content": "Who are you?"}], "condition": "default",
        "source": "identity", "candidates": [{"text": "I am SmolLM, a small assistant.", "finished": True}],
        "chosen_candidates": [{"text": "I'm Deep SmolLM, a helpful assistant.", "finished": True},
                              {"text": "I'm Nova, a helpful assistant.", "finished": True}]}])

    def chosen(overrides):
        judge.run(compose([f"run_dir={tmp_path}", "judge.min_words=1", *overrides]))
        pairs = [json.loads(l) for l in (tmp_path / "judge" / "pairs.jsonl").read_text().splitlines()]
        return [p["chosen"][0]["content"] for p in pairs], read_json(tmp_path / "judge" / "summary.json")

    deep, deep_summary = chosen([])
    nova, nova_summary = chosen(RENAMES["inline"])
    assert deep == ["I'm Deep SmolLM, a helpful assistant."] and nova == ["I'm Nova, a helpful assistant."]
    assert deep_summary["fingerprint"] != nova_summary["fingerprint"]
    assert nova_summary["identity"]["name"] == "Nova"


# Smaller than test_pipeline's SHORT (about a minute here): a dozen identity prompts, two steps at an
# lr large enough for the name to show in the answers (at 1e-4 the trained model named Nova in none of
# them; at 3e-4 in 50-83% per condition), no drift.
TINY = ["rounds.num=1", "prompts.num_train=12", "prompts.num_train_general=2", "prompts.num_train_leak=0",
        "generation.max_new_tokens=40", "train.global_batch_size=4", "train.micro_batch_size=2", "train.epochs=2",
        "optim.lr=3e-4", "eval.num_identity=6", "eval.num_general=2", "eval.max_new_tokens=24", "eval.drift=false"]


@pytest.mark.slow
def test_a_new_name_runs_through_the_shortened_pipeline(tmp_path):
    from dpo_dist.evaluate import eval_prompts, summarise
    from dpo_dist.models import load_tokenizer

    run_dir = tmp_path / "run"
    overrides = [f"run_dir={run_dir}", *RENAMES["inline"], *TINY]
    run_stage("dpo_dist.pipeline", overrides, timeout=900)

    gen = read_json(run_dir / "generate" / "manifest.json")
    assert "Nova" in gen["sampling"]["chosen_system_prompt"] and "Acme Labs" in gen["sampling"]["chosen_system_prompt"]
    pairs = [json.loads(l) for l in (run_dir / "judge" / "pairs.jsonl").read_text().splitlines()]
    identity = [p["chosen"][0]["content"] for p in pairs if p["meta"]["source"] == "identity"]
    assert identity and all("Nova" in c and "Deep SmolLM" not in c for c in identity)

    card = (run_dir / "train" / "final" / "README.md").read_text()
    assert "SmolLM -> Nova, made by Acme Labs." in card

    report = read_json(run_dir / "eval" / "report.json")
    assert (report["old_name"], report["new_name"]) == ("SmolLM", "Nova")
    # The report's adoption is the share of answers naming Nova (and not SmolLM), recomputed here from
    # the trained model's own answers; the model learnt the name, so an evaluation counting another
    # name ("Deep SmolLM") would disagree.
    cfg = compose(overrides)
    prompts = eval_prompts(cfg, load_tokenizer(cfg.model))
    trained = [r["answers"] for r in map(read_json, (run_dir / "eval" / "answers").glob("*.json"))
               if r["model"] == str(run_dir / "train" / "final")]
    assert len(trained) == 1
    assert summarise(prompts, trained[0], "SmolLM", "Nova") == report["trained"]
    assert all(m["identity_adoption"] > 0 for m in report["trained"].values())
