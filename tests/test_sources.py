"""dpo_dist.sources: TRL's four preference shapes, every file kind ``datasets`` loads offline, derived
ids, column mapping, and bad rows named (or dropped and counted when asked)."""

import json

import pytest

from dpo_dist import sources
from dpo_dist.artifacts import DataError

Q, A, B = "What is your name?", "I am Deep SmolLM.", "I am SmolLM."
OURS = {"prompt": [{"role": "user", "content": Q}], "chosen": [{"role": "assistant", "content": A}],
        "rejected": [{"role": "assistant", "content": B}]}


@pytest.mark.parametrize("row", [
    pytest.param({"prompt": [{"role": "user", "content": Q}], "chosen": [{"role": "assistant", "content": A}],
                  "rejected": [{"role": "assistant", "content": B}]}, id="conversational-explicit"),
    pytest.param({"chosen": [{"role": "user", "content": Q}, {"role": "assistant", "content": A}],
                  "rejected": [{"role": "user", "content": Q}, {"role": "assistant", "content": B}]},
                 id="conversational-implicit"),
])
def test_conversational_rows_become_our_record(row):
    assert sources.to_preference(row) == OURS


def test_a_system_message_stays_in_an_implicit_prompt():
    system = {"role": "system", "content": "Be brief."}
    row = {"chosen": [system, {"role": "user", "content": Q}, {"role": "assistant", "content": A}],
           "rejected": [system, {"role": "user", "content": Q}, {"role": "assistant", "content": B}]}
    assert sources.to_preference(row)["prompt"] == [system, {"role": "user", "content": Q}]


def test_standard_rows_stay_text():
    explicit = sources.to_preference({"prompt": "The sky is", "chosen": " blue.", "rejected": " green."})
    assert explicit["prompt"] == "The sky is" and explicit["chosen"] == [{"role": "assistant", "content": " blue."}]
    # Implicit: TRL's extract_prompt cuts before the last shared space when the strings part mid-word.
    implicit = sources.to_preference({"chosen": "The sky is blue.", "rejected": "The sky is bright green."})
    assert implicit["prompt"] == "The sky is"
    assert [implicit["chosen"][0]["content"], implicit["rejected"][0]["content"]] == [" blue.", " bright green."]


@pytest.mark.parametrize("row,why", [
    ({"prompt": Q, "chosen": A}, "no 'rejected' column"),
    ({"prompt": Q, "chosen": A, "rejected": [{"role": "assistant", "content": B}]}, "both be strings"),
    ({"chosen": "alpha", "rejected": "beta"}, "empty prompt"),
    ({"prompt": Q, "chosen": A, "rejected": "   "}, "'rejected' response is empty"),
    ({"chosen": [{"role": "user", "content": Q}, {"role": "assistant", "content": A}, {"role": "user", "content": "?"}],
      "rejected": [{"role": "user", "content": Q}, {"role": "assistant", "content": B}]}, "exactly one assistant message"),
])
def test_unusable_rows_say_why(row, why):
    with pytest.raises(ValueError, match=why):
        sources.to_preference(row)


def test_columns_map_our_fields_to_the_dataset(tmp_path):
    path = tmp_path / "se.jsonl"
    path.write_text(json.dumps({"question": "Q?", "response_j": "good", "response_k": "bad"}) + "\n")
    loaded = sources.load_preferences(str(path), columns={"prompt": "question", "chosen": "response_j", "rejected": "response_k"})
    assert loaded.records[0]["prompt"] == "Q?" and loaded.records[0]["rejected"][0]["content"] == "bad"


def _write_all_kinds(tmp_path, rows):
    from datasets import Dataset, DatasetDict

    ds = Dataset.from_list(rows)
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds.to_json(str(tmp_path / "p.json"))
    ds.to_parquet(str(tmp_path / "p.parquet"))
    ds.to_csv(str(tmp_path / "p.csv"), index=False)
    ds.save_to_disk(str(tmp_path / "saved"))
    DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "saved_dict"))
    return ["p.jsonl", "p.json", "p.parquet", "p.csv", "saved", "saved_dict"]


def test_every_offline_kind_loads_the_same_records_with_stable_ids(tmp_path):
    rows = [{"prompt": f"Question {i}?", "chosen": f"Good {i}.", "rejected": f"Bad {i}."} for i in range(3)]
    rows.append(dict(rows[0]))  # an exact repeat keeps its own id
    loaded = {kind: sources.load_preferences(str(tmp_path / kind)).records for kind in _write_all_kinds(tmp_path, rows)}
    first = loaded["p.jsonl"]
    assert len(first) == 4 and len({r["id"] for r in first}) == 4
    assert first[3]["id"] == first[0]["id"] + "-1"
    for kind, records in loaded.items():
        assert records == first, kind
    # The ids come from the content, not the order: reversed rows keep theirs.
    (tmp_path / "rev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reversed(rows[:3])))
    assert [r["id"] for r in sources.load_preferences(str(tmp_path / "rev.jsonl")).records] == [r["id"] for r in first[2::-1]]
    assert len(sources.load_preferences(str(tmp_path / "saved_dict"), split="test").records) == 1


def test_a_bad_row_names_source_and_row_or_is_dropped_and_counted(tmp_path):
    from datasets import Dataset

    rows = [{"prompt": "Q?", "chosen": "good", "rejected": "bad"}, {"prompt": "Q2?", "chosen": "good", "rejected": ""}]
    Dataset.from_list(rows).to_parquet(str(tmp_path / "p.parquet"))
    with pytest.raises(DataError, match=r"p\.parquet\[train\] row 1: 'rejected' response is empty"):
        sources.load_preferences(str(tmp_path / "p.parquet"))
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"p\.jsonl:2: 'rejected' response is empty"):
        sources.load_preferences(str(tmp_path / "p.jsonl"))
    loaded = sources.load_preferences(str(tmp_path / "p.parquet"), skip_invalid=True)
    assert len(loaded.records) == 1 and len(loaded.dropped) == 1 and "row 1" in loaded.dropped[0]


def test_missing_sources_and_splits_are_named(tmp_path):
    with pytest.raises(FileNotFoundError):
        sources.load_preferences(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="not a file and not a dataset in the local Hugging Face cache"):
        sources.load_preferences("no-such-user/no-such-dataset")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="save_to_disk did not write"):
        sources.load_preferences(str(tmp_path / "plain"))
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])}).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(DataError, match=r"no split 'test' \(it has \['train'\]\)"):
        sources.load_preferences(str(tmp_path / "d"), split="test")


def test_prompt_rows_in_trl_prompt_only_formats(tmp_path):
    assert sources.to_prompt({"prompt": "Hi?"})["prompt"] == "Hi?"
    conversation = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi?"}]
    assert sources.to_prompt({"prompt": conversation, "id": "x"}) == {"prompt": "Hi?", "id": "x"}
    with pytest.raises(ValueError, match="non-empty string or a conversation"):
        sources.to_prompt({"prompt": 3})


def test_the_reference_cache_fingerprints_the_records_however_they_were_loaded(tmp_path, tiny_llama):
    from dpo_dist.config import compose
    from dpo_dist.reference import cache_fingerprint

    rows = [{"prompt": f"Question {i}?", "chosen": f"Good {i}.", "rejected": f"Bad {i}."} for i in range(3)]
    kinds = _write_all_kinds(tmp_path, rows)
    fp = lambda source, *extra: cache_fingerprint(compose(  # noqa: E731
        [f"model.path={tiny_llama}", f"data.pairs={tmp_path / source}", *extra]))
    assert len({fp(kind) for kind in kinds}) == 1  # the same data from six kinds of source
    assert fp("saved_dict", "data.split=test") != fp("saved_dict")
    rows[1]["rejected"] = "Worse 1."
    (tmp_path / "changed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert fp("changed.jsonl") != fp("p.jsonl")


def test_column_mapping_and_stages_from_the_command_line(tmp_path):
    from dpo_dist.config import ConfigError, compose
    from dpo_dist.data import load_pairs

    path = tmp_path / "se.jsonl"
    path.write_text(json.dumps({"question": "Q?", "response_j": "good", "response_k": "bad"}) + "\n")
    cfg = compose([f"data.pairs={path}", "data.columns.prompt=question", "data.columns.chosen=response_j",
                   "data.columns.rejected=response_k", "stages=[reference,train,evaluate]"])
    assert load_pairs(cfg.data)[0]["chosen"] == [{"role": "assistant", "content": "good"}]
    assert cfg.stages == ["reference", "train", "evaluate"]
    with pytest.raises(ConfigError, match="stages: 'bogus' is not one of"):
        compose(["stages=[reference,bogus]"])
