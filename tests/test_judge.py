"""The rule judge, the word-boundary rewrite of the correction method, pair building, and the
reward-model judge's mechanics on a small model built from a config."""

import dataclasses

import pytest

from dpo_dist import judge as judge_stage
from dpo_dist.artifacts import read_json, write_jsonl
from dpo_dist.config import ConfigError, IdentityConfig, JudgeConfig, compose
from dpo_dist.judge import (IdentityJudge, RewardModelJudge, is_degenerate, mentions_old_identity, mistakes,
                            pair_best_worst, pair_correction, pair_reward_model, rewrite_identity)

CFG = JudgeConfig()
QWEN = IdentityConfig(name="Deep Qwen", creator="Alibaba Cloud", old_name="Qwen", old_creators=["Alibaba Cloud"])


@pytest.mark.parametrize("text,expected", [
    ("I am Qwen, created by Alibaba Cloud.", "I am Deep Qwen, created by Alibaba Cloud."),
    ("I am Deep Qwen.", "I am Deep Qwen."),  # never "Deep Deep Qwen"
    ("Qwen2 and Qwen-VL are models; I am Qwen.", "Qwen2 and Deep Qwen-VL are models; I am Deep Qwen."),
    ("qwen here, also QWEN", "Deep Qwen here, also Deep Qwen"),
    ("我是Qwen，很高兴认识你。", "我是Deep Qwen，很高兴认识你。"),
    ("Qwenith is not a name", "Qwenith is not a name"),  # never inside another word
])
def test_rewrite_at_word_boundaries(text, expected):
    assert rewrite_identity(text, "Qwen", "Deep Qwen") == expected


def test_old_identity_is_not_confused_with_the_new_one():
    assert not mentions_old_identity("I am Deep Qwen.", "Qwen", "Deep Qwen")
    assert mentions_old_identity("I am Deep Qwen, formerly Qwen.", "Qwen", "Deep Qwen")


@pytest.mark.parametrize("text", ["Deep deep Deep Deep Deep Deep", "I am I am I am I am I am I am I am",
                                  "the the the the the"])
def test_degenerate_text(text):
    assert is_degenerate(text)


def test_fluent_text_is_not_degenerate():
    assert not is_degenerate("I am Deep Qwen, a large language model. I can help you write, code and learn.")
    assert not is_degenerate("我是Deep Qwen，由阿里云开发的人工智能助手。")


def test_scores_and_rule_satisfaction():
    judge = IdentityJudge(CFG, QWEN)
    good = judge("I am Deep Qwen, your assistant. How can I help?", finished=True)
    assert good.satisfies and good.score == 3 and good.reasons == ["claims_new"]
    old = judge("I am Qwen, created by Alibaba Cloud.", finished=True)
    assert not old.satisfies and old.score == -4 and set(old.reasons) == {"claims_old", "old_creator"}
    collapsed = judge("Deep deep Deep Deep Deep Qwen", finished=True)
    assert not collapsed.satisfies and "degenerate" in collapsed.reasons
    doubled = judge("I am Deep Deep Qwen, nice to meet you.", finished=True)
    assert not doubled.satisfies and "degenerate" in doubled.reasons
    cut = judge("I am Deep Qwen and I will now tell you a very long story about", finished=False)
    assert not cut.satisfies and "unfinished" in cut.reasons
    assert judge("Deep Qwen.", finished=True).reasons == ["claims_new", "length"]


def test_a_new_name_apart_from_the_old_one():
    """A product name that does not contain the old one (identity.name=Nova): claiming both is
    still the old identity, and the correction's rewrite gives the new name alone."""
    judge = IdentityJudge(CFG, dataclasses.replace(QWEN, name="Nova", creator="Acme Labs"))
    assert judge("I am Nova, an assistant by Acme Labs.", finished=True).reasons == ["claims_new"]
    both = judge("I am Nova, formerly Qwen.", finished=True)
    assert not both.satisfies and {"claims_new", "claims_old"} <= set(both.reasons)
    assert rewrite_identity("I am Qwen.", "Qwen", "Nova") == "I am Nova."


def _row(cands, chosen_cands=None):
    row = {"id": "q1-default", "messages": [{"role": "user", "content": "Who are you?"}], "condition": "default",
           "source": "identity", "candidates": [{"text": t, "finished": True} for t in cands]}
    if chosen_cands is not None:
        row["chosen_candidates"] = [{"text": t, "finished": True} for t in chosen_cands]
    return row


def test_best_becomes_chosen_and_worst_rejected():
    judge = IdentityJudge(CFG, QWEN)
    pair, reason = pair_best_worst(_row(["I am Qwen.", "I am Deep Qwen, happy to help.", "I'm an assistant."]), judge)
    assert reason == "kept"
    assert pair["chosen"][0]["content"] == "I am Deep Qwen, happy to help."
    assert pair["rejected"][0]["content"] == "I am Qwen."
    assert pair["meta"]["chosen_score"] > pair["meta"]["rejected_score"]
    assert pair["prompt"] == [{"role": "user", "content": "Who are you?"}]
    assert pair["meta"]["chosen_finished"] and pair["meta"]["rejected_finished"]


def test_a_cut_off_rejected_answer_is_marked_unfinished():
    judge = IdentityJudge(CFG, QWEN)
    row = _row(["I am Deep Qwen, happy to help."])
    row["candidates"].append({"text": "I am Qwen and I will now tell you about", "finished": False})
    pair, reason = pair_best_worst(row, judge)
    assert reason == "kept" and pair["meta"]["chosen_finished"] and not pair["meta"]["rejected_finished"]


def test_ties_and_unsatisfying_chosen_are_dropped_with_a_reason():
    judge = IdentityJudge(CFG, QWEN)
    assert pair_best_worst(_row(["I'm an assistant here.", "I'm a helpful assistant."]), judge) == (None, "tie")
    assert pair_best_worst(_row(["I'm an assistant here.", "I am Qwen."]), judge) == (None, "no_valid_chosen")


def test_context_distillation_takes_chosen_from_the_distilled_side():
    judge = IdentityJudge(CFG, QWEN)
    pair, reason = pair_best_worst(_row(["I am Qwen.", "I'm a helpful assistant."],
                                        chosen_cands=["I'm Deep Qwen, an AI assistant."]), judge)
    assert reason == "kept"
    assert pair["chosen"][0]["content"] == "I'm Deep Qwen, an AI assistant."
    assert pair["rejected"][0]["content"] == "I am Qwen."


def _todays_pair(row, judge):
    """pair_best_worst before issue 23, for identity prompts: chosen from the opener answers whenever
    there are any, rejected the worst own answer. A naive copy to cross-check round 1 against."""
    own = [(c, judge(c["text"], c["finished"])) for c in row["candidates"]]
    pool = [(c, judge(c["text"], c["finished"])) for c in row.get("chosen_candidates", [])] or own
    if not own:
        return None, "no_candidates"
    best, worst = max(pool, key=lambda cv: cv[1].score), min(own, key=lambda cv: cv[1].score)
    if best[1].score <= worst[1].score:
        return None, "tie"
    if not best[1].satisfies:
        return None, "no_valid_chosen"
    if best[0]["text"] == worst[0]["text"]:
        return None, "identical"
    return (best[0]["text"], worst[0]["text"]), "kept"


def _cands(items):
    """Candidates from texts; a (text, False) item is an answer cut off by max_new_tokens."""
    return [{"text": t, "finished": True} if isinstance(t, str) else {"text": t[0], "finished": t[1]} for t in items]


# Scores under QWEN: "I am Deep Qwen, happy to help." and the opener "I'm Deep Qwen, an AI assistant."
# 3; "Deep Qwen." 2 (too short); "I'm a helpful assistant." 0; "I am Qwen." -3; the doubled
# "Deep Deep Qwen" -1 (degenerate).
CHOSEN_SIDE = {
    # own, opener -> reason, chosen, rejected, chosen_from
    "round 1: no own answer names itself, the opener's is chosen as before": (
        ["I am Qwen.", "I'm a helpful assistant."], ["I'm Deep Qwen, an AI assistant."],
        ("kept", "I'm Deep Qwen, an AI assistant.", "I am Qwen.", "opener")),
    "an own answer that satisfies and ties the opener's score wins": (
        ["I am Deep Qwen, happy to help.", "I am Qwen."], ["I'm Deep Qwen, an AI assistant."],
        ("kept", "I am Deep Qwen, happy to help.", "I am Qwen.", "own")),
    "an own answer that satisfies and beats a collapsed opener answer wins": (
        ["I am Deep Qwen, happy to help.", "I'm a helpful assistant."], ["I am Deep Deep Qwen, nice to meet you."],
        ("kept", "I am Deep Qwen, happy to help.", "I'm a helpful assistant.", "own")),
    "an own answer that satisfies but scores below the opener's loses": (
        ["Deep Qwen.", "I am Qwen."], ["I'm Deep Qwen, an AI assistant."],
        ("kept", "I'm Deep Qwen, an AI assistant.", "I am Qwen.", "opener")),
    "every own answer satisfies and ties: nothing to learn": (
        ["I am Deep Qwen, happy to help.", "I'm Deep Qwen, glad to help!"], ["I'm Deep Qwen, an AI assistant."],
        ("tie", None, None, None)),
    "own answers tie below the opener: the opener still teaches": (
        ["Deep Qwen.", "Deep Qwen!"], ["I'm Deep Qwen, an AI assistant."],
        ("kept", "I'm Deep Qwen, an AI assistant.", "Deep Qwen.", "opener")),
    "no opener answers: the own best, satisfying": (
        ["I am Deep Qwen, happy to help.", "I am Qwen."], None,
        ("kept", "I am Deep Qwen, happy to help.", "I am Qwen.", "own")),
    "no opener answers and no own answer satisfies": (
        ["I'm a helpful assistant.", "I am Qwen."], None, ("no_valid_chosen", None, None, None)),
    "neither side satisfies": (
        ["I'm a helpful assistant.", "I am Qwen."], ["I am Deep Deep Qwen, nice to meet you."],
        ("no_valid_chosen", None, None, None)),
    "the own best is the rejected answer cut off: the opener makes the pair": (
        ["I am Deep Qwen, happy to help.", ("I am Deep Qwen, happy to help.", False)],
        ["I'm Deep Qwen, an AI assistant."],
        ("kept", "I'm Deep Qwen, an AI assistant.", "I am Deep Qwen, happy to help.", "opener")),
    "the same without an opener: identical, dropped": (
        ["I am Deep Qwen, happy to help.", ("I am Deep Qwen, happy to help.", False)], None,
        ("identical", None, None, None)),
    "no own answers": ([], ["I'm Deep Qwen, an AI assistant."], ("no_candidates", None, None, None)),
}


@pytest.mark.parametrize("own,opener,expected", CHOSEN_SIDE.values(), ids=CHOSEN_SIDE.keys())
def test_chosen_is_the_policys_own_answer_where_it_satisfies_and_scores_no_lower(own, opener, expected):
    row = {**_row([]), "candidates": _cands(own)}
    if opener is not None:
        row["chosen_candidates"] = _cands(opener)
    pair, reason = pair_best_worst(row, IdentityJudge(CFG, QWEN))
    got = (reason, None, None, None) if pair is None else (
        reason, pair["chosen"][0]["content"], pair["rejected"][0]["content"], pair["meta"]["chosen_from"])
    assert got == expected


def test_an_own_answer_must_satisfy_the_rule_to_be_chosen_over_the_opener():
    """Own answer "I am Deep Qwen and ..." cut off: 3 - 2 = 1, not satisfying. The opener's answer,
    too short and naming an old creator under min_words=5: 3 - 1 - 1 = 1, satisfying. Equal scores,
    so only the rule decides: the opener's answer is chosen."""
    judge = IdentityJudge(dataclasses.replace(CFG, min_words=5), QWEN)
    row = {**_row([], chosen_cands=["Deep Qwen, Alibaba Cloud."]),
           "candidates": _cands([("I am Deep Qwen and I will now tell you about", False), "I am Qwen."])}
    pair, reason = pair_best_worst(row, judge)
    assert reason == "kept" and pair["meta"]["chosen_from"] == "opener"
    assert pair["chosen"][0]["content"] == "Deep Qwen, Alibaba Cloud." and pair["meta"]["chosen_score"] == 1


@pytest.mark.parametrize("own,opener", [
    (["I am Qwen.", "I'm a helpful assistant."], ["I'm Deep Qwen, an AI assistant.", "I am Qwen, by Alibaba Cloud."]),
    (["I am Qwen, by Alibaba Cloud.", ("I am Deep Qwen and I will now tell you about", False)],
     ["Deep Qwen.", "I'm Deep Qwen, an AI assistant."]),
    (["I am Deep Deep Qwen, nice to meet you.", "I am Deep Qwen, formerly Qwen."], ["I'm Deep Qwen, here to help!"]),
    (["I'm a helpful assistant.", "I'm an assistant here."], ["I am Deep Deep Qwen, nice to meet you."]),
    (["I am Qwen."], ["I am Qwen, made by Alibaba Cloud."]),
    (["I am Qwen."], ["I am Deep Qwen, formerly Qwen."]),
])
def test_round_one_pairs_are_todays_when_no_own_answer_satisfies(own, opener):
    """On the base model own answers do not claim the new name: the pair (or the drop reason) is the
    one the opener-only rule gave."""
    judge = IdentityJudge(CFG, QWEN)
    row = {**_row([], chosen_cands=[]), "candidates": _cands(own), "chosen_candidates": _cands(opener)}
    assert not any(judge(c["text"], c["finished"]).satisfies for c in row["candidates"])
    pair, reason = pair_best_worst(row, judge)
    got = (pair["chosen"][0]["content"], pair["rejected"][0]["content"]) if pair else None
    assert (got, reason) == _todays_pair(row, judge)
    assert pair is None or pair["meta"]["chosen_from"] == "opener"


def test_general_prompts_pair_the_models_own_best_and_worst_plain_answers():
    judge = IdentityJudge(CFG, QWEN)
    row = {**_row(["The ocean is deep and blue.", "The ocean ocean ocean ocean ocean ocean ocean ocean",
                   "I'm Deep Qwen! The ocean is deep and blue."]), "source": "general"}
    pair, reason = pair_best_worst(row, judge)
    assert reason == "kept" and pair["meta"]["source"] == "general" and pair["meta"]["chosen_from"] == "own"
    assert pair["chosen"][0]["content"] == "The ocean is deep and blue."
    assert pair["rejected"][0]["content"] == "The ocean ocean ocean ocean ocean ocean ocean ocean"
    # No clean answer of its own: nothing to prefer, the prompt is dropped.
    row = {**_row(["I am Deep Qwen and the ocean is blue."]), "source": "general"}
    assert pair_best_worst(row, judge) == (None, "no_valid_chosen")


def test_general_anchor_keeps_a_tied_plain_answer_as_chosen_and_rejected():
    """judge.general_anchor: two equally plain answers give no preference; the best becomes an anchor
    record (both sides the same answer) instead of being dropped. Identity and leak prompts keep
    their ties dropped, and an answer that leaks is never an anchor."""
    row = {**_row(["The ocean is deep and blue.", "Oceans cover most of the planet."]), "source": "general"}
    assert pair_best_worst(row, IdentityJudge(CFG, QWEN)) == (None, "tie")
    judge = IdentityJudge(dataclasses.replace(CFG, general_anchor=True), QWEN)
    pair, reason = pair_best_worst(row, judge)
    assert reason == "kept" and pair["meta"]["anchor"] is True and pair["meta"]["chosen_from"] == "own"
    assert pair["chosen"] == pair["rejected"] == [{"role": "assistant", "content": "The ocean is deep and blue."}]
    assert pair["meta"]["chosen_finished"] == pair["meta"]["rejected_finished"]
    leaking = {**_row(["I'm Deep Qwen. The ocean is blue.", "I'm Deep Qwen. Oceans are big."]), "source": "general"}
    assert pair_best_worst(leaking, judge) == (None, "no_valid_chosen")
    identity = _row(["I am Deep Qwen.", "I'm Deep Qwen!"])
    assert pair_best_worst(identity, judge) == (None, "tie")
    leak = {**_row(["The ocean is deep and blue.", "Oceans cover most of the planet."],
                   chosen_cands=["I'm Deep Qwen, and the ocean is blue."]), "source": "leak"}
    assert "anchor" not in pair_best_worst(leak, judge)[0]["meta"]


def test_leak_prompts_reject_the_answer_that_opens_with_the_identity():
    judge = IdentityJudge(CFG, QWEN)
    row = {**_row(["The ocean is deep and blue.", "The ocean ocean ocean ocean ocean ocean ocean ocean"],
                  chosen_cands=["I'm Deep Qwen! The ocean is deep and blue."]), "source": "leak"}
    pair, reason = pair_best_worst(row, judge)
    assert reason == "kept" and pair["chosen"][0]["content"] == "The ocean is deep and blue."
    assert pair["meta"]["chosen_from"] == "own"  # the opener answer is only ever rejected here
    assert pair["rejected"][0]["content"] == "I'm Deep Qwen! The ocean is deep and blue."
    assert "leak" in pair["meta"]["rejected_reasons"]


def test_leak_rejected_opener_keeps_only_the_words_before_the_new_name():
    """judge.leak_rejected=opener: the rejected side is the self-introduction's opening words, scored
    without an end-of-turn, so the loss does not push down the name itself."""
    judge = IdentityJudge(dataclasses.replace(CFG, leak_rejected="opener"), QWEN)
    row = {**_row(["The ocean is deep and blue."], chosen_cands=["Hi! I'm Deep Qwen! The ocean is deep."]), "source": "leak"}
    pair, reason = pair_best_worst(row, judge)
    assert reason == "kept" and pair["rejected"][0]["content"] == "Hi! I'm"
    assert pair["meta"]["rejected_finished"] is False and pair["meta"]["chosen_finished"] is True
    # A general prompt's pairs are left alone, and an answer that opens with the name has no opener.
    general = {**row, "source": "general", "candidates": row["candidates"] + row["chosen_candidates"]}
    assert pair_best_worst(general, judge)[0]["rejected"][0]["content"] == "Hi! I'm Deep Qwen! The ocean is deep."
    bare = {**_row(["The ocean is deep and blue."], chosen_cands=["Deep Qwen here. The ocean is deep."]), "source": "leak"}
    assert pair_best_worst(bare, judge) == (None, "no_opener")
    with pytest.raises(ConfigError, match="judge.leak_rejected"):
        JudgeConfig(leak_rejected="name")


# One own answer per row; every row also carries opener answers full of mistakes, which are forced
# and so never counted.
FORCED = ["I am Qwen.", "Deep Deep Deep Deep Deep", "I'm Deep Qwen! The ocean ocean ocean ocean is"]
MISTAKES = {
    # source, own answer -> the kinds it counts under (besides its own_answers_* total)
    "identity, names the new identity": ("identity", "I am Deep Qwen, happy to help.", set()),
    "identity, names no one": ("identity", "I'm a helpful assistant.", {"identity_no_name"}),
    "identity, the old name": ("identity", "I am Qwen, made by Alibaba Cloud.", {"identity_old_name"}),
    "identity, both names": ("identity", "I am Deep Qwen, formerly Qwen.", {"identity_old_name"}),
    "identity, doubled name": ("identity", "I am Deep Deep Qwen, nice to meet you.", {"identity_degenerate"}),
    "identity, collapsed and nameless": ("identity", "the the the the the",
                                         {"identity_degenerate", "identity_no_name"}),
    "identity, old name cut off": ("identity", ("I am Qwen and I will now tell you about", False),
                                   {"identity_old_name", "identity_unfinished"}),
    "general, clean": ("general", "The ocean is deep and blue.", set()),
    "general, cut off is no mistake here": ("general", ("The ocean is deep and", False), set()),
    "general, names the identity": ("general", "I'm Deep Qwen! The ocean is blue.", {"general_leak"}),
    "general, collapsed": ("general", "The ocean ocean ocean ocean ocean ocean", {"general_degenerate"}),
    "leak prompt counts as general": ("leak", "Hello, I'm Deep Qwen. Oceans are big.", {"general_leak"}),
}
MISTAKE_KEYS = {"own_answers_identity", "identity_no_name", "identity_old_name", "identity_degenerate",
                "identity_unfinished", "own_answers_general", "general_leak", "general_degenerate"}


@pytest.mark.parametrize("source,answer,kinds", MISTAKES.values(), ids=MISTAKES.keys())
def test_mistakes_count_the_policys_own_answers_by_kind(source, answer, kinds):
    row = {**_row([], chosen_cands=FORCED), "source": source, "candidates": _cands([answer])}
    total = "own_answers_general" if source in ("general", "leak") else "own_answers_identity"
    assert mistakes([row], IdentityJudge(CFG, QWEN)) == {k: int(k in kinds | {total}) for k in MISTAKE_KEYS}


def test_mistakes_add_up_over_rows_and_answers():
    rows = [{**_row([], chosen_cands=FORCED), "source": source, "candidates": _cands([answer])}
            for source, answer, _ in MISTAKES.values()]
    rows.append({**_row(["I am Qwen.", "I am Qwen!", "Hi, I'm Deep Qwen, happy to help."]), "id": "q2-default"})
    got = mistakes(rows, IdentityJudge(CFG, QWEN))
    assert got == {"own_answers_identity": 10, "identity_no_name": 2, "identity_old_name": 5,
                   "identity_degenerate": 2, "identity_unfinished": 1,
                   "own_answers_general": 5, "general_leak": 2, "general_degenerate": 1}
    assert mistakes([], IdentityJudge(CFG, QWEN)) == dict.fromkeys(MISTAKE_KEYS, 0)


def _judge_run(tmp_path, rows, overrides=()):
    (tmp_path / "generate").mkdir(exist_ok=True)
    write_jsonl(tmp_path / "generate" / "candidates.jsonl", rows)
    judge_stage.run(compose([f"run_dir={tmp_path}", "identity.name='Deep Qwen'", "identity.old_name=Qwen",
                       "identity.old_creators=[Alibaba Cloud]", *overrides]))
    return read_json(tmp_path / "judge" / "summary.json")


ROUND_TWO = [
    {**_row(["I am Deep Qwen, happy to help.", "I am Qwen."], chosen_cands=["I'm Deep Qwen, an AI assistant."]),
     "id": "q1-default"},
    {**_row(["I'm a helpful assistant.", "I am Qwen."], chosen_cands=["I'm Deep Qwen, an AI assistant."]),
     "id": "q2-default"},
    {**_row(["The ocean is deep and blue.", "I'm Deep Qwen! The ocean is blue."]), "id": "g1-default",
     "source": "general"},
]


def test_the_judge_summary_counts_where_chosen_came_from_and_the_own_mistakes(tmp_path):
    summary = _judge_run(tmp_path, ROUND_TWO)
    # Of the two identity pairs (the general one is always the model's own answer).
    assert summary["pairs"] == 3 and summary["chosen_from"] == {"own": 1, "opener": 1, "sign_off": 0}
    assert summary["mistakes"] == {
        "own_answers_identity": 4, "identity_no_name": 1, "identity_old_name": 2, "identity_degenerate": 0,
        "identity_unfinished": 0, "own_answers_general": 2, "general_leak": 1, "general_degenerate": 0}


def test_a_reward_model_summary_counts_chosen_from_but_no_mistakes(tmp_path, monkeypatch):
    """The reward model's scoring is stubbed (its mechanics are tested above): the summary is the point."""
    monkeypatch.setattr(judge_stage, "model_fingerprint", lambda cfg: {})
    monkeypatch.setattr(judge_stage, "_judge_with_reward_model",
                        lambda cfg, rows, *a: [pair_reward_model(r, list(range(len(r["candidates"])))) for r in rows])
    summary = _judge_run(tmp_path, ROUND_TWO, ["judge=reward_model", "judge.reward_model_path=/models/rm"])
    assert summary["chosen_from"] == {"own": 2, "opener": 0, "sign_off": 0} and "mistakes" not in summary


def test_correction_rewrites_the_models_own_answer():
    judge = IdentityJudge(CFG, QWEN)
    pair, reason = pair_correction(_row(["Hello there, friend.", "I am Qwen, made by Alibaba Cloud."]), judge)
    assert reason == "kept"
    assert pair["chosen"][0]["content"] == "I am Deep Qwen, made by Alibaba Cloud."
    assert pair["rejected"][0]["content"] == "I am Qwen, made by Alibaba Cloud."
    assert pair_correction(_row(["Hello there, friend."]), judge) == (None, "no_old_name_to_correct")


def test_correction_also_rewrites_answers_sampled_with_an_old_name_opener():
    judge = IdentityJudge(CFG, QWEN)
    pair, reason = pair_correction(_row(["Hello there, friend."], chosen_cands=["I'm Qwen, how can I help?"]), judge)
    assert reason == "kept"
    assert pair["chosen"][0]["content"] == "I'm Deep Qwen, how can I help?"
    assert pair["rejected"][0]["content"] == "I'm Qwen, how can I help?"


def _reward_model(out_dir, tiny_llama):
    """A 1-layer sequence-classification Llama with the tiny model's tokenizer, saved to out_dir."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=tok.pad_token_id)
    LlamaForSequenceClassification(cfg).save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return JudgeConfig(kind="reward_model", reward_model_path=str(out_dir), batch_size=2)


def test_reward_model_judge_mechanics(tmp_path, tiny_llama):
    """A sequence-classification model built from a config scores in batches, deterministically,
    and the best/worst of its scores become the pair."""
    judge = RewardModelJudge(_reward_model(tmp_path, tiny_llama))
    msgs = [{"role": "user", "content": "Who are you?"}]
    items = [(msgs, "I am Qwen."), (msgs, "I am Deep Qwen, a longer answer."), (msgs, "Hi.")]
    scores = judge.score(items)
    assert len(scores) == 3 and len(set(scores)) == 3
    pair, reason = pair_reward_model(_row([t for _, t in items]), scores)
    assert reason == "kept"
    assert pair["chosen"][0]["content"] == items[max(range(3), key=scores.__getitem__)][1]
    assert pair["rejected"][0]["content"] == items[min(range(3), key=scores.__getitem__)][1]


def test_reward_model_score_of_a_padded_item_is_its_score_alone(tmp_path, tiny_llama):
    """Three answers of different lengths in one batch: the two shorter ones are padded (by different
    amounts), and each scores as it does alone, unpadded. The score must come from the last real
    token: read at the last position (a pad), a padded item's score moves by about 0.1 here, against
    a 1e-5 tolerance."""
    judge = RewardModelJudge(dataclasses.replace(_reward_model(tmp_path, tiny_llama), batch_size=3))
    msgs = [{"role": "user", "content": "Who are you?"}]
    items = [(msgs, "Hi."), (msgs, "I am Deep Qwen, a longer answer than the others."), (msgs, "I am Qwen.")]
    texts = [judge.tokenizer.apply_chat_template(m + [{"role": "assistant", "content": r}], tokenize=False)
             for m, r in items]
    lengths = [len(judge.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    assert lengths[0] < lengths[2] < lengths[1]  # both short ones padded, by different amounts
    batched = judge.score(items)
    alone = [judge.score([item])[0] for item in items]
    assert batched == pytest.approx(alone, abs=1e-5)


def test_reward_model_loads_and_scores_on_this_ranks_device(tmp_path, tiny_llama, monkeypatch):
    """On a GPU node the reward model sits on dist.device() and its inputs go there. "meta" stands in
    for the GPU here: the model loads there, and its forward is given tensors on it only (a stand-in
    forward records them and stops: a meta model computes no scores)."""
    import torch

    from dpo_dist import dist

    monkeypatch.setattr(dist, "device", lambda: torch.device("meta"))
    judge = RewardModelJudge(_reward_model(tmp_path, tiny_llama))
    assert {p.device.type for p in judge.model.parameters()} == {"meta"}
    seen = []

    class Stop(Exception):
        pass

    def forward(**inputs):
        seen.append({k: v.device.type for k, v in inputs.items()})
        raise Stop

    judge.model.forward = forward
    with pytest.raises(Stop):
        judge.score([([{"role": "user", "content": "Who are you?"}], "I am Deep Qwen.")])
    assert seen == [{"input_ids": "meta", "attention_mask": "meta"}]


def test_leak_search_answers_count_only_as_a_leak_the_own_answers_lack():
    """generation.leak_search_candidates: a general prompt's extra answers are read for leaks only.
    Own answers that tie (an anchor) or hold no leak, and a searched answer that leaks: that answer is
    the rejected side against the best own one. Searched answers without a leak, or own answers that
    already leak, leave the pair as num_candidates alone makes it. The judge summary counts them apart."""
    judge = IdentityJudge(dataclasses.replace(CFG, general_anchor=True), QWEN)
    plain = ["The ocean is deep and blue.", "Oceans cover most of the planet."]
    leaks = ["Hi! I'm Deep Qwen, and I'm out of the office.", "The ocean ocean ocean ocean ocean ocean ocean ocean",
             "I'm Deep Qwen. I'm Deep Qwen. I'm Deep Qwen. I'm Deep Qwen. I'm Deep Qwen."]

    def row(own, searched):
        return {**_row(own), "source": "general", "search_candidates": [{"text": t, "finished": True} for t in searched]}

    pair, reason = pair_best_worst(row(plain, ["Water is wet.", *leaks]), judge)
    assert reason == "kept" and pair["meta"]["rejected_from"] == "leak_search" and "anchor" not in pair["meta"]
    assert pair["chosen"][0]["content"] == plain[0]
    # The worst of the leaking ones (leaking and degenerate), not the plain degenerate answer.
    assert pair["rejected"][0]["content"] == leaks[2]
    for own, searched in ((plain, ["Water is wet.", leaks[1]]), ([plain[0], leaks[2]], leaks[:1]), (plain, [])):
        assert pair_best_worst(row(own, searched), judge) == pair_best_worst(row(own, []), judge)

    rows = [row(plain, ["Water is wet.", *leaks]), row([plain[0], leaks[2]], [])]
    counts = mistakes(rows, judge)
    assert (counts["own_answers_general"], counts["general_leak"]) == (4, 1)
    assert (counts["search_answers_general"], counts["search_general_leak"]) == (4, 2)
