"""Prompt and preference data from anything ``datasets`` loads offline, in TRL's formats.

    data.pairs=runs/x/judge/pairs.jsonl          # JSONL (ours, or TRL's), read line by line
    data.pairs=prefs.parquet | prefs.csv | prefs.json
    data.pairs=/data/prefs_saved                 # a directory written by Dataset(Dict).save_to_disk
    data.pairs=trl-lib/ultrafeedback_binarized data.split=test    # a hub dataset in the local cache

A preference row may be in any of TRL's four shapes, and trains as it is:

- conversational, explicit prompt: ``prompt`` a list of messages, ``chosen``/``rejected`` lists
  holding the assistant's turn (our own ``pairs.jsonl``);
- conversational, implicit prompt: ``chosen``/``rejected`` whole conversations; the prompt is
  their common leading messages;
- standard, explicit prompt: ``prompt``, ``chosen``, ``rejected`` plain strings;
- standard, implicit prompt: ``chosen``/``rejected`` strings; the prompt is their common prefix
  (up to the last shared space, as TRL's ``extract_prompt`` cuts it).

Standard rows stay text: their prompt is tokenised as it is, without the chat template, as TRL
does for that format. ``data.columns`` maps our field names to the dataset's (for example
``data.columns.chosen=response_j``). A row without an ``id`` gets one
from a hash of its content (stable across runs, machines and row order). A row that cannot be used
stops the run naming the source, the row and the reason; with ``data.skip_invalid=true`` it is
dropped and counted instead.

JSONL goes through our own reader (``artifacts.read_jsonl``), which names the line of a bad record
and needs no schema; every other source through ``datasets``, offline (``HF_DATASETS_OFFLINE``):
nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from dpo_dist.artifacts import DataError, iter_jsonl

log = logging.getLogger(__name__)
FILE_BUILDERS = {".json": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class Loaded:
    records: list[dict]
    dropped: list[str] = field(default_factory=list)  # "where: why" of each row left out (skip_invalid)


def rows(source: str, split: str = "train") -> Iterator[tuple[str, dict]]:
    """(where, row) for each row of ``source``; ``where`` names it in messages: ``file:line`` for
    JSONL, ``source[split] row N`` otherwise."""
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".jsonl":
        for lineno, row in iter_jsonl(path):
            yield f"{path}:{lineno}", row
        return
    dataset = _load_dataset(source, path, split)
    for i, row in enumerate(dataset):
        yield f"{source}[{split}] row {i}", row


def _load_dataset(source: str, path: Path, split: str):
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # a cache miss fails instead of downloading
    import datasets

    datasets.disable_progress_bars()
    if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(f"{source}: no split {split!r} (it has {sorted(loaded)})")
            return loaded[split]
        return loaded
    if path.is_file():
        builder = FILE_BUILDERS.get(path.suffix)
        if builder is None:
            raise DataError(f"{source}: unknown file type {path.suffix!r} (JSONL, JSON, Parquet, CSV, or a "
                            "save_to_disk directory)")
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    if path.exists():
        raise DataError(f"{source}: a directory that save_to_disk did not write (no dataset_info.json)")
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise FileNotFoundError(source)
    try:
        return datasets.load_dataset(source, split=split)
    except Exception as e:  # datasets raises several types for "not in the cache" and "no such split"
        raise DataError(f"{source}: not a file and not a dataset in the local Hugging Face cache "
                        f"(split {split!r}): {str(e).splitlines()[0][:200]}") from None


# ---------------------------------------------------------------- preference rows

def _messages(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)


def _common_prefix(a: str, b: str) -> str:
    """TRL's extract_prompt for strings: the longest common prefix, ending before the last shared
    space when the strings part inside a word."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    if n < min(len(a), len(b)):
        cut = a.rfind(" ", 0, n)
        n = cut if cut >= 0 else 0
    return a[:n]


def _conversation(messages: list, key: str) -> list[dict]:
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m.get("content"), str):
            raise ValueError(f"{key}[{i}].content must be a string")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def to_preference(row: dict, columns: dict[str, str] | None = None) -> dict:
    """One row in any of TRL's preference shapes as our record: ``prompt`` a list of messages (or,
    for the standard format, a string), ``chosen``/``rejected`` one assistant message each, ``id``
    and ``meta`` kept when present. ValueError says why a row cannot be used."""
    columns = columns or {}
    get = lambda k: row.get(columns.get(k, k))  # noqa: E731
    prompt, chosen, rejected = get("prompt"), get("chosen"), get("rejected")
    if chosen is None or rejected is None:
        missing = [columns.get(k, k) for k, v in (("chosen", chosen), ("rejected", rejected)) if v is None]
        raise ValueError(f"no {' or '.join(repr(m) for m in missing)} column (data.columns maps ours to the dataset's)")
    if _messages(chosen) and _messages(rejected):
        chosen, rejected = _conversation(chosen, "chosen"), _conversation(rejected, "rejected")
        if prompt is None:  # implicit: the prompt is the conversations' common leading messages
            n = 0
            while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
                n += 1
            prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        elif not _messages(prompt):
            raise ValueError("'prompt' must be a list of messages when 'chosen' and 'rejected' are")
        else:
            prompt = _conversation(prompt, "prompt")
        for key, side in (("chosen", chosen), ("rejected", rejected)):
            if len(side) != 1 or side[0]["role"] != "assistant":
                raise ValueError(f"{key!r} must end in exactly one assistant message after the prompt "
                                 f"(got roles {[m['role'] for m in side]})")
        chosen_text, rejected_text = chosen[0]["content"], rejected[0]["content"]
    elif isinstance(chosen, str) and isinstance(rejected, str):
        if prompt is None:
            prompt = _common_prefix(chosen, rejected)
            chosen_text, rejected_text = chosen[len(prompt):], rejected[len(prompt):]
        elif isinstance(prompt, str):
            chosen_text, rejected_text = chosen, rejected
        else:
            raise ValueError("'prompt' must be a string when 'chosen' and 'rejected' are")
    else:
        raise ValueError("'chosen' and 'rejected' must both be strings (standard format) or both lists of "
                         f"messages (conversational); got {type(chosen).__name__} and {type(rejected).__name__}")
    if not prompt:
        raise ValueError("empty prompt (an implicit prompt needs chosen and rejected to share a beginning)")
    for key, text in (("chosen", chosen_text), ("rejected", rejected_text)):
        if not text.strip():
            raise ValueError(f"{key!r} response is empty")
    record = {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen_text}],
              "rejected": [{"role": "assistant", "content": rejected_text}]}
    rid = get("id")
    if rid is not None:
        if not isinstance(rid, str) or not rid:
            raise ValueError("field 'id' must be a non-empty string")
        record["id"] = rid
    if isinstance(row.get("meta"), dict):
        record["meta"] = row["meta"]
    return record


def content_id(record: dict, prefix: str = "h") -> str:
    """A stable id from a record's content (prompt and responses), for rows that carry none."""
    body = {k: record[k] for k in ("prompt", "chosen", "rejected") if k in record}
    return f"{prefix}-{hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]}"


def _collect(source: str, split: str, convert: Callable[[dict], dict], validate: Callable[[dict], None] | None,
             skip_invalid: bool, what: str) -> Loaded:
    out = Loaded([])
    seen: dict[str, str] = {}
    for where, row in rows(source, split):
        try:
            record = convert(row)
            if "id" not in record:
                # Identical rows hash alike: number the repeats, so each keeps an id of its own.
                base = content_id(record)
                rid, k = base, 1
                while rid in seen:
                    rid, k = f"{base}-{k}", k + 1
                record["id"] = rid
            if validate is not None:
                validate(record)
        except ValueError as e:
            if not skip_invalid:
                raise DataError(f"{where}: {e}") from None
            out.dropped.append(f"{where}: {e}")
            continue
        if record["id"] in seen:
            raise DataError(f"{where}: duplicate {what} id {record['id']!r} (first at {seen[record['id']]})")
        seen[record["id"]] = where
        out.records.append(record)
    if out.dropped:
        log.warning("%s: %d rows dropped (skip_invalid), the first: %s", source, len(out.dropped), out.dropped[0])
    return out


def load_preferences(source: str, split: str = "train", columns: dict[str, str] | None = None,
                     skip_invalid: bool = False, validate: Callable[[dict], None] | None = None) -> Loaded:
    """Preference records from ``source``; ``validate`` may refuse a converted record (ValueError)."""
    return _collect(source, split, lambda row: to_preference(row, columns), validate, skip_invalid, "pair")


# ---------------------------------------------------------------- prompt rows

# How a prompt's chosen side answers, when the shipped openers (generation.chosen_prefixes) would not
# do its task (issue 23): ``chosen_opener`` is the opener for this prompt ("You can credit me as
# {name}"), ``chosen_sign_off`` the signature under the model's own plain answer ("{name}"). {name}
# and {creator} are the identity's. Used by generate.chosen_side_prompt, generate._generate_shard
# (judge.sign) and the judge.
ANSWER_KEYS = ("chosen_opener", "chosen_sign_off")


def to_prompt(row: dict, columns: dict[str, str] | None = None) -> dict:
    """A prompt row as our prompt record: ``prompt`` the user's text, from a string or from a
    conversation's last user message (TRL's prompt-only formats); other fields kept."""
    columns = columns or {}
    key = columns.get("prompt", "prompt")
    prompt = row.get(key)
    if _messages(prompt):
        users = [m["content"] for m in prompt if m["role"] == "user"]
        if not users or not isinstance(users[-1], str):
            raise ValueError(f"{key!r} has no user message")
        prompt = users[-1]
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"field {key!r} must be a non-empty string or a conversation")
    record = {k: v for k, v in row.items() if k != key}
    record["prompt"] = prompt
    for k in ANSWER_KEYS:  # a column other rows fill: JSON, Parquet, CSV and datasets give the rest None/NaN/""
        if k in record and (record[k] is None or record[k] == "" or record[k] != record[k]):
            del record[k]
    answer = [k for k in ANSWER_KEYS if k in record]
    for k in answer:
        if not isinstance(record[k], str) or not record[k].strip():
            raise ValueError(f"field {k!r} must be a non-empty string")
    if len(answer) > 1:
        raise ValueError(f"fields {' and '.join(map(repr, answer))} cannot both be set: one opens the chosen answer, "
                         "the other signs the model's own")
    rid = row.get(columns.get("id", "id"))
    if rid is not None and (not isinstance(rid, str) or not rid.strip()):
        raise ValueError("field 'id' must be a non-empty string")
    if rid is not None:
        record["id"] = rid
    return record


def load_prompts(source: str, split: str = "train", columns: dict[str, str] | None = None,
                 skip_invalid: bool = False) -> Loaded:
    return _collect(source, split, lambda row: to_prompt(row, columns), None, skip_invalid, "prompt")
