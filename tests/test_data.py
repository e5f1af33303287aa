"""Preference records, tokenisation with prompt masking, truncation accounting, batching."""

import json

import pytest

from dpo_dist.artifacts import DataError, write_jsonl
from dpo_dist.config import DataConfig
from dpo_dist.config import ConfigError
from dpo_dist.data import (build_messages, collate_pairs, global_batches, micro_batches, read_preferences,
                           split_general, template_injects_default_system, tokenize_pairs)


def _pair(i, chosen="I am Deep SmolLM.", rejected="I am SmolLM."):
    return {"id": f"p{i}", "prompt": [{"role": "user", "content": f"Who are you? ({i})"}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_llama)


def test_jsonl_round_trip_and_datasets_can_load_it(tmp_path):
    from datasets import load_dataset
    path = tmp_path / "pairs.jsonl"
    write_jsonl(path, [_pair(i) for i in range(3)])
    assert [r["id"] for r in read_preferences(path)] == ["p0", "p1", "p2"]
    ds = load_dataset("json", data_files=str(path), split="train")
    assert ds[1]["chosen"][0]["content"] == "I am Deep SmolLM."


@pytest.mark.parametrize("line,reason", [
    ('{"id": "x", "prompt": [{"role": "user", "content": "hi"}], "chosen": []', "invalid JSON"),
    ('[1, 2]', "expected a JSON object"),
    ('{"prompt": [{"role": "user", "content": "hi"}]}', "no 'chosen' or 'rejected' column"),
    (json.dumps({**_pair(9), "id": ""}), "'id' must be a non-empty string"),
    (json.dumps({**_pair(9), "chosen": [{"role": "user", "content": "x"}]}), "'chosen' must end in exactly one assistant message"),
    (json.dumps({**_pair(9), "rejected": [{"role": "assistant", "content": "  "}]}), "'rejected' response is empty"),
    (json.dumps({**_pair(9), "prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}), "last message"),
])
def test_malformed_line_names_file_line_and_reason(tmp_path, line, reason):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(_pair(0)) + "\n\n" + line + "\n")
    with pytest.raises(DataError) as e:
        read_preferences(path)
    assert f"{path}:3:" in str(e.value) and reason in str(e.value)


def test_tokenisation_masks_prompt_and_keeps_eos(tokenizer):
    pairs, stats = tokenize_pairs([_pair(0)], tokenizer, DataConfig())
    p = pairs[0]
    assert stats.kept == 1 and stats.truncated == 0 and stats.dropped == 0
    text = tokenizer.decode(p.prompt_ids)
    assert text.endswith("<|im_start|>assistant\n") and "Who are you? (0)" in text
    assert p.chosen_ids[-1] == tokenizer.eos_token_id and p.rejected_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(p.chosen_ids[:-1]) == "I am Deep SmolLM."
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 2
    chosen_mask = batch["loss_mask"][0]
    assert chosen_mask[: len(p.prompt_ids)].sum() == 0
    assert chosen_mask.sum() == len(p.chosen_ids)  # every response token, EOS included
    # Rejected is shorter: its padding is masked and unattended.
    n = len(p.prompt_ids) + len(p.rejected_ids)
    assert batch["loss_mask"][1, n:].sum() == 0 and batch["attention_mask"][1, n:].sum() == 0


def test_an_answer_cut_at_max_new_tokens_gets_no_eos(tokenizer):
    # The generator stopped it, not the model: an EOS would teach ending a turn mid-sentence.
    record = {**_pair(0, rejected="I am SmolLM and I can help with"), "meta": {"rejected_finished": False}}
    pairs, _ = tokenize_pairs([record], tokenizer, DataConfig())
    assert pairs[0].chosen_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(pairs[0].rejected_ids) == "I am SmolLM and I can help with"


def test_a_record_with_the_same_answer_on_both_sides_is_an_anchor(tokenizer):
    same = _pair(1, rejected="I am Deep SmolLM.")
    cut = {**same, "meta": {"rejected_finished": False}}  # same text, but only one side ends its turn
    pairs, _ = tokenize_pairs([_pair(0), same, cut], tokenizer, DataConfig())
    assert [p.anchor for p in pairs] == [False, True, False]


def test_over_long_pairs_are_truncated_or_dropped_and_counted(tokenizer):
    long = " ".join(["word"] * 300)
    records = [_pair(0), _pair(1, chosen=long), _pair(2)]
    cfg = DataConfig(max_prompt_length=64, max_length=128, truncation="truncate")
    pairs, stats = tokenize_pairs(records, tokenizer, cfg)
    assert (stats.kept, stats.truncated, stats.dropped) == (3, 1, 0)
    assert max(len(p.prompt_ids) + len(p.chosen_ids) for p in pairs) <= 128
    pairs, stats = tokenize_pairs(records, tokenizer, DataConfig(max_prompt_length=64, max_length=128, truncation="drop"))
    assert (stats.kept, stats.dropped, stats.dropped_ids) == (2, 1, ["p1"])


def test_system_prompt_conditions(tokenizer):
    assert template_injects_default_system(tokenizer)  # SmolLM2's template names "SmolLM" by default
    render = lambda c: tokenizer.apply_chat_template(build_messages("Hi", c, "You are a helpful assistant.", tokenizer), tokenize=False)
    assert "SmolLM" in render("default")
    assert "SmolLM" not in render("neutral") and "You are a helpful assistant." in render("neutral")
    assert "SmolLM" not in render("none") and "helpful" not in render("none")


def test_batches_do_not_depend_on_world_size():
    batches = global_batches(37, 8, seed=3, epoch=0)
    assert len(batches) == 4 and all(len(b) == 8 for b in batches)
    assert batches != global_batches(37, 8, seed=3, epoch=1)
    one_rank = [i for mb in micro_batches(batches[0], 0, 1, 2) for i in mb]
    two_ranks = [i for r in range(2) for mb in micro_batches(batches[0], r, 2, 2) for i in mb]
    assert one_rank == two_ranks == batches[0]


def test_general_prompts_for_training_never_include_evaluation_ones():
    evaluation, training = split_general("general", 100, 60)
    assert len(evaluation) == 100 and len(training) == 60
    assert not {r["id"] for r in evaluation} & {r["id"] for r in training}
    assert split_general("general", 100, 0)[1] == []
    with pytest.raises(ConfigError, match="prompts.num_train_general"):
        split_general("general", 350, 60)


@pytest.mark.parametrize("num_eval", [100, -1])
def test_the_evaluation_never_answers_a_prompt_training_used_leak_prompts_included(tokenizer, num_eval):
    """eval.num_general=-1 (every general prompt training leaves): training's leak prompts count too,
    as generate counts them; the evaluation once left them out of the training share and answered 12
    prompts the model was trained on."""
    from dpo_dist.config import compose
    from dpo_dist.evaluate import eval_prompts
    from dpo_dist.generate import training_prompts

    cfg = compose([f"eval.num_general={num_eval}", "prompts.num_train_general=100", "prompts.num_train_leak=12"])
    trained = {r["question"] for r in training_prompts(cfg.prompts, tokenizer, cfg.eval.num_general)
               if r["source"] != "identity"}
    prompts = eval_prompts(cfg, tokenizer)
    evaluated = {p["question"] for p in prompts if p["kind"] == "general"}
    assert len(trained) == 112 and len(evaluated) == (100 if num_eval == 100 else 380 - 112)
    assert not trained & evaluated
    # each evaluated prompt carries its set's category, which the report counts failures by
    cats = {p["kind"]: set() for p in prompts}
    for p in prompts:
        cats[p["kind"]].add(p["category"])
    assert cats["general"] == {"fact", "howto", "writing", "math", "code"} and "indirect" in cats["identity"]
    assert cats["example"] == {""}


def test_a_string_prompt_is_tokenised_as_text_without_the_chat_template(tokenizer):
    """TRL's standard format: prompt and answers are plain text; no chat template is applied to them."""
    record = {"id": "s0", "prompt": "Question: who are you?\nAnswer:", "chosen": [{"role": "assistant", "content": " Deep SmolLM."}],
              "rejected": [{"role": "assistant", "content": " SmolLM."}]}
    pairs, _ = tokenize_pairs([record], tokenizer, DataConfig())
    assert pairs[0].prompt_ids == tokenizer("Question: who are you?\nAnswer:")["input_ids"]
    assert "<|im_start|>" not in tokenizer.decode(pairs[0].prompt_ids)
    assert pairs[0].chosen_ids == tokenizer(" Deep SmolLM.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
