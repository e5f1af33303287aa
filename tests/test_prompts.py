"""The prompt sets shipped in dpo_dist/prompts/: format, counts, hold-out, and content rules."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import unicodedata
from pathlib import Path

import pytest

PROMPTS_DIR = Path(__file__).resolve().parent.parent / "dpo_dist" / "prompts"
FILES = {
    "identity_train": ("idtrain", 1000),
    "identity_eval": ("ideval", 150),
    "general": ("general", 300),
    "identity_eval_tasks": ("idevtask", 40),
}
HELD_OUT = ("identity_eval", "identity_eval_tasks")
REQUIRED_EVAL = ("What is your name?", "Are you ChatGPT?", "Tell me about your name and organization.")
IDENTITY_CATEGORIES = {"name", "creator", "model", "comparison", "introduction", "indirect", "roleplay"}
GENERAL_CATEGORIES = {"fact", "howto", "writing", "math", "code"}
# Identity questions must not name the model or its maker (nor "Deep" anything).
IDENTITY_FORBIDDEN = ("smollm", "qwen", "hugging face", "huggingface", "alibaba", "deep",
                      "通义", "千问", "阿里")
GENERAL_FORBIDDEN = ("your name", "who are you", "assistant", "ai model", "language model",
                     "smollm", "qwen", "chatgpt", "yourself", "who made you", "who created you",
                     "who trained you", "hugging face", "alibaba", "你是谁", "你叫", "你的名字",
                     "助手", "语言模型")


def normalize(text: str) -> str:
    """Casefold, drop apostrophes, turn other punctuation into spaces, collapse whitespace."""
    t = unicodedata.normalize("NFKC", text).casefold().replace("\u2019", "'").replace("'", "")
    t = re.sub(r"[^\w\s]", " ", t)
    return " ".join(t.split())


def has_cjk(text: str) -> bool:
    return any("\u4e00" <= ch <= "\u9fff" for ch in text)


def load(name: str) -> list[dict]:
    path = PROMPTS_DIR / f"{name}.jsonl"
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_build():
    """build.py as a module (it is a script beside the sets, not part of the package)."""
    spec = importlib.util.spec_from_file_location("prompts_build", PROMPTS_DIR / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    return build


@pytest.fixture(scope="module")
def sets() -> dict[str, list[dict]]:
    return {name: load(name) for name in FILES}


@pytest.mark.parametrize("name", list(FILES))
def test_records_have_the_required_fields(sets, name):
    for r in sets[name]:
        assert set(r) == {"id", "prompt", "category", "lang"}, r
        assert all(isinstance(v, str) for v in r.values()), r
        assert r["prompt"] and r["prompt"] == r["prompt"].strip(), r
        assert "\n" not in r["prompt"], r
        assert re.fullmatch(r"[a-z_]+", r["category"]), r
        assert r["lang"] in ("en", "zh"), r
        # lang matches the text: Chinese prompts contain CJK characters, English ones do not.
        assert has_cjk(r["prompt"]) == (r["lang"] == "zh"), r


@pytest.mark.parametrize("name", list(FILES))
def test_counts(sets, name):
    assert len(sets[name]) >= FILES[name][1]


@pytest.mark.parametrize("name", list(FILES))
def test_ids_are_prefixed_and_zero_padded(sets, name):
    prefix = FILES[name][0]
    ids = [r["id"] for r in sets[name]]
    widths = set()
    for i in ids:
        m = re.fullmatch(rf"{prefix}-(\d{{4,}})", i)
        assert m, i
        widths.add(len(m.group(1)))
    assert len(widths) == 1, f"{name}: ids of mixed width"
    assert len(set(ids)) == len(ids), f"{name}: duplicate ids"


def test_ids_unique_across_files(sets):
    ids = [r["id"] for recs in sets.values() for r in recs]
    assert len(set(ids)) == len(ids)


@pytest.mark.parametrize("name", list(FILES))
def test_no_duplicate_prompts(sets, name):
    seen: dict[str, str] = {}
    for r in sets[name]:
        key = normalize(r["prompt"])
        assert key not in seen, f"{r['id']} duplicates {seen[key]}: {r['prompt']!r}"
        seen[key] = r["id"]


def test_categories(sets):
    for name in ("identity_train", "identity_eval"):
        cats = {r["category"] for r in sets[name]}
        assert cats == IDENTITY_CATEGORIES, (name, cats)
    assert {r["category"] for r in sets["general"]} == GENERAL_CATEGORIES


def test_required_eval_questions(sets):
    eval_prompts = {r["prompt"] for r in sets["identity_eval"]}
    train_keys = {normalize(r["prompt"]) for r in sets["identity_train"]}
    for q in REQUIRED_EVAL:
        assert q in eval_prompts, q
        assert normalize(q) not in train_keys, q


@pytest.mark.parametrize("held", HELD_OUT)
def test_train_and_eval_wording_disjoint(sets, held):
    train_keys = {normalize(r["prompt"]) for r in sets["identity_train"]}
    clash = [r["prompt"] for r in sets[held] if normalize(r["prompt"]) in train_keys]
    assert not clash, clash


@pytest.mark.parametrize("held", HELD_OUT)
def test_eval_wording_not_embedded_in_train(sets, held):
    """An eval question does not reappear inside a longer train prompt ("Hi! What is your name?")."""
    train = [f" {normalize(r['prompt'])} " for r in sets["identity_train"]]
    for r in sets[held]:
        key = normalize(r["prompt"])
        needle = key if r["lang"] == "zh" else f" {key} "
        hits = [t.strip() for t in train if needle in t]
        assert not hits, (r["prompt"], hits[:3])


@pytest.mark.parametrize("name", ["identity_train", "identity_eval"])
def test_identity_sets_have_a_chinese_share(sets, name):
    recs = sets[name]
    zh = sum(1 for r in recs if r["lang"] == "zh")
    assert zh >= 15 and 0.05 <= zh / len(recs) <= 0.25, (zh, len(recs))


@pytest.mark.parametrize("name", ["identity_train", *HELD_OUT])
def test_identity_prompts_are_model_agnostic(sets, name):
    for r in sets[name]:
        low = r["prompt"].casefold()
        bad = [w for w in IDENTITY_FORBIDDEN if w in low]
        assert not bad, (r["id"], r["prompt"], bad)


def test_general_prompts_do_not_ask_about_identity(sets):
    for r in sets["general"]:
        low = r["prompt"].casefold()
        bad = [w for w in GENERAL_FORBIDDEN if w in low]
        assert not bad, (r["id"], r["prompt"], bad)


def test_general_prompts_are_short_requests(sets):
    for r in sets["general"]:
        assert len(r["prompt"]) <= 300, r


def test_generator_reproduces_the_shipped_files(tmp_path):
    """build.py is deterministic and the committed .jsonl files are its current output."""
    build = load_build()
    assert build.main(["--out-dir", str(tmp_path), "--quiet"]) == 0
    for name in (*FILES, "identity_train_tasks"):
        fresh = (tmp_path / f"{name}.jsonl").read_bytes()
        shipped = (PROMPTS_DIR / f"{name}.jsonl").read_bytes()
        assert fresh == shipped, f"{name}.jsonl is stale: rerun python dpo_dist/prompts/build.py"


def test_the_task_mix_is_the_train_set_with_task_requests_between_and_none_near_a_held_out_one(sets):
    """identity_train_tasks keeps identity_train's records in order and at their positions modulo 3
    (same ids and system prompts), with 3 task requests after every 9; the first 260 (the default
    prompts.num_train) hold 63, and no task request is (nearly) a held-out prompt."""
    build = load_build()
    mix = load("identity_train_tasks")
    tasks = [r for r in mix if r["id"].startswith("idtask-")]
    assert [r for r in mix if not r["id"].startswith("idtask-")] == sets["identity_train"]
    assert sum(r["id"].startswith("idtask-") for r in mix[:260]) == 63
    position = {r["id"]: i for i, r in enumerate(mix)}
    assert all(position[r["id"]] % 3 == i % 3 for i, r in enumerate(sets["identity_train"]))
    assert len(tasks) == 104 and {r["category"] for r in tasks} == {"indirect"}  # none dropped
    # each does its task with the name in place; the who-is-answering questions keep the shipped openers
    answers = [r.get("chosen_opener") or r.get("chosen_sign_off") for r in tasks]
    assert all("{name}" in a for a in answers if a) and sum(a is None for a in answers) == len(build.TASK_WHO) + 1
    assert sum("chosen_sign_off" in r for r in tasks) == len(build.TASK_SIGN_PATTERNS) * len(build.TASK_SIGN_OBJECTS) + 2
    leak = build.LeakFilter([r["prompt"] for name in HELD_OUT for r in sets[name]])
    assert not [r["prompt"] for r in tasks if leak.leaks(r["prompt"])]
    for r in tasks:
        assert not [w for w in IDENTITY_FORBIDDEN if w in r["prompt"].casefold()], r


def test_the_task_held_out_set_is_frozen():
    """identity_eval_tasks was committed before the task requests trained against it (docs/rounds.md):
    a change to it changes what every figure measured on it means, so it is a deliberate one, with
    this digest updated in the same commit."""
    digest = hashlib.sha256((PROMPTS_DIR / "identity_eval_tasks.jsonl").read_bytes()).hexdigest()
    assert digest == "8175d754b4630ebc7d39dbffdc54fa344440882d25a4453f82a884b3affe961a"
