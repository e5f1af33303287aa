"""The rule judge, the word-boundary rewrite of the correction method, pair building, and the
reward-model judge's mechanics on a small model built from a config."""

import dataclasses

import pytest

from dpo_dist.config import ConfigError, IdentityConfig, JudgeConfig
from dpo_dist.judge import (IdentityJudge, RewardModelJudge, is_degenerate, mentions_old_identity, pair_best_worst,
                            pair_correction, pair_reward_model, rewrite_identity)

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


def test_general_prompts_pair_the_models_own_best_and_worst_plain_answers():
    judge = IdentityJudge(CFG, QWEN)
    row = {**_row(["The ocean is deep and blue.", "The ocean ocean ocean ocean ocean ocean ocean ocean",
                   "I'm Deep Qwen! The ocean is deep and blue."]), "source": "general"}
    pair, reason = pair_best_worst(row, judge)
    assert reason == "kept" and pair["meta"]["source"] == "general"
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
    assert reason == "kept" and pair["meta"]["anchor"] is True
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
