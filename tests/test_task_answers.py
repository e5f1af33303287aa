"""A prompt record's own chosen-side answer (issue 23's task requests): ``chosen_opener`` opens its
chosen candidates in place of the shipped self-introduction openers, ``chosen_sign_off`` signs the
model's own answer to a "sign it as yourself" request (sources.ANSWER_KEYS, generate.sign)."""

import json

import pytest

from dpo_dist.artifacts import DataError, read_jsonl
from dpo_dist.config import compose
from dpo_dist.data import load_prompt_set
from dpo_dist.judge import sign

NAME = "Deep SmolLM"


@pytest.mark.parametrize("text, signed", [
    # a placeholder signature gives way, the closing stays and takes the name on the next line
    ("Happy birthday, sis!\n\nLove,\n[Your Name]", "Happy birthday, sis!\n\nLove,\nDeep SmolLM"),
    ("Thanks, team.\n\nBest regards,\n[Your Name]\n[Your Title]", "Thanks, team.\n\nBest regards,\nDeep SmolLM"),
    # a name the model signed for someone else, under a closing
    ("Dear Emily, happy birthday!\n\nYour sister,\nAnna Smith", "Dear Emily, happy birthday!\n\nYour sister,\nDeep SmolLM"),
    # no closing: the note stays whole and is signed under it
    ("Welcome aboard, Sam! We are glad you are here.", "Welcome aboard, Sam! We are glad you are here.\n\n— Deep SmolLM"),
    # a last short line that is not under a closing is text, not a signature
    ("Reminder: book club on Friday.\nBring snacks!", "Reminder: book club on Friday.\nBring snacks!\n\n— Deep SmolLM"),
    ("祝你生日快乐！\n\n此致\n敬礼\n[你的名字]", "祝你生日快乐！\n\n此致\n敬礼\nDeep SmolLM"),
    ("[Your Name]", "Deep SmolLM"),
    # a greeting is not a closing, nor is a line broken after a comma; Chinese lines count as text
    ("Hi Sam,\nWelcome aboard!", "Hi Sam,\nWelcome aboard!\n\n— Deep SmolLM"),
    ("We'll meet at 5pm,\nsee you there!", "We'll meet at 5pm,\nsee you there!\n\n— Deep SmolLM"),
    ("祝你生日快乐，\n愿你的每一天都充满阳光", "祝你生日快乐，\n愿你的每一天都充满阳光\n\n— Deep SmolLM"),
    # a signature block under the closing gives way whole; a placeholder in bold too
    ("Thanks!\n\nBest regards,\nJohn Smith\nMarketing Manager, Acme Corp", "Thanks!\n\nBest regards,\nDeep SmolLM"),
    ("Happy birthday!\n\nLove,\n**[Your Name]**", "Happy birthday!\n\nLove,\nDeep SmolLM"),
    # signed already: left signed once; Windows line ends read as lines
    ("Thanks, team!\n— Deep SmolLM", "Thanks, team!\n— Deep SmolLM"),
    ("Best regards,\r\n\r\nDeep SmolLM", "Best regards,\n\nDeep SmolLM"),
    ("Thanks, team!\r\nSee you Monday.", "Thanks, team!\nSee you Monday.\n\n— Deep SmolLM"),
])
def test_sign_puts_the_name_where_the_note_signs_off(text, signed):
    assert sign(text, NAME) == signed


def _prompts_file(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_a_prompt_records_own_answer_opens_or_signs_its_chosen_side(tmp_path, tiny_llama, monkeypatch):
    """The generate stage, for real (the tiny model's text is noise; where the name goes is not): an
    opener record's chosen answers open with its opener, the identity filled in; a sign-off record's
    are its own answers signed; a record without either gets a shipped opener. Changing a record's
    answer, or the identity it names, samples again; a run whose records have none keeps its cache."""
    from dpo_dist import generate
    from dpo_dist.config import compose

    rows = [{"id": "t1", "prompt": "You helped me plan a trip. How should I credit you?",
             "chosen_opener": "You can credit me as {name}, made by {creator}"},
            {"id": "t2", "prompt": "Write a note to my team and sign it as yourself.", "chosen_sign_off": "{name}"},
            {"id": "t3", "prompt": "Who are you?"}]
    base = [f"model.path={tiny_llama}", "generation=hf", "prompts.num_train=3", "prompts.num_train_general=0",
            "prompts.num_train_leak=0", "generation.num_candidates=2", "generation.num_chosen_candidates=2",
            "generation.max_new_tokens=6", "prompts.conditions=[none]"]
    cfg = compose(base + [f"prompts.train={_prompts_file(tmp_path / 'p.jsonl', rows)}", f"run_dir={tmp_path / 'a'}"])
    name, creator = cfg.identity.name, cfg.identity.creator
    out = {r["id"].split("-")[0]: r for r in read_jsonl(generate.run(cfg))}
    assert all(c["text"].startswith(f"You can credit me as {name}, made by {creator}") for c in out["t1"]["chosen_candidates"])
    for c in out["t2"]["chosen_candidates"]:  # the tiny model's noise ends in no closing: signed under it
        body = c["text"].removesuffix(f"\n\n— {name}")
        assert c["signed"] and body != c["text"] and body.strip() and name not in body
    assert not [c for c in out["t2"]["candidates"] if name in c["text"] or "signed" in c]  # own answers stay own
    assert {c["text"].split(name)[0] + name for c in out["t3"]["chosen_candidates"]} <= \
        set(cfg.generation.chosen_prefixes["en"])
    assert "chosen_opener" not in out["t3"] and "signed" not in out["t3"]["chosen_candidates"][0]

    fp = generate.generation_fingerprint
    records = generate.training_prompts(cfg.prompts, generate.load_tokenizer(cfg.model), 0)
    model_fp = {"m": 1}
    changed = [dict(r, chosen_opener="Credit {name}") if "chosen_opener" in r else r for r in records]
    resigned = [dict(r, chosen_sign_off="— {name}") if "chosen_sign_off" in r else r for r in records]
    assert fp(cfg, resigned, model_fp) != fp(cfg, records, model_fp)
    # the judge's old names are not what was sampled: setting them (as the README asks) keeps the cache
    assert fp(compose(base + ["identity.old_creators=[Acme]"]), records, model_fp) == fp(cfg, records, model_fp)
    assert fp(cfg, changed, model_fp) != fp(cfg, records, model_fp)
    plain = [r for r in records if not any(k in r for k in ("chosen_opener", "chosen_sign_off"))]
    # openers that do not name the identity: only a record's own answer does, and only its entry changes
    unnamed = ["generation.chosen_system_prompt=null", "generation.chosen_prefixes={en:[Hi],zh:[Hi]}"]
    assert fp(compose(base + unnamed + ["identity.name=Nova"]), records, model_fp) != fp(compose(base + unnamed), records, model_fp)
    assert fp(compose(base + unnamed + ["identity.name=Nova"]), plain, model_fp) == fp(compose(base + unnamed), plain, model_fp)
    # and records without one hash as before answers existed: nothing joins the three parts they had
    parts = []
    monkeypatch.setattr(generate, "fingerprint", lambda *a: parts.append(len(a)) or "x")
    fp(cfg, plain, model_fp), fp(cfg, records, model_fp)
    assert parts == [3, 5]


def test_only_identity_prompts_carry_their_answer_into_generation(tmp_path):
    """A general prompt's record with an opener stays a general prompt: a leak prompt's opener is the
    shipped self-introduction, the rejected side it exists for. The shipped task pool's first 260
    prompts carry both kinds of answer."""
    from dpo_dist.generate import training_prompts
    from dpo_dist.models import load_tokenizer

    general = _prompts_file(tmp_path / "g.jsonl", [{"id": f"g{i}", "prompt": f"Write a poem about {i}.",
                                                    "chosen_opener": "I am {name}"} for i in range(6)])
    tokenizer = load_tokenizer(compose().model)
    cfg = compose(["prompts.num_train=260", "prompts.train=identity_train_tasks", f"prompts.general={general}",
                   "prompts.num_train_general=2", "prompts.num_train_leak=1", "eval.num_general=0"])
    records = training_prompts(cfg.prompts, tokenizer, cfg.eval.num_general)
    assert {r["source"] for r in records if r["id"].startswith("g")} == {"general", "leak"}
    assert not [r for r in records if r["source"] != "identity" and any(k.startswith("chosen_") for k in r)]
    tasks = [r for r in records if r["id"].startswith("idtask-")]
    assert len(tasks) == 63 and {("chosen_opener" in r, "chosen_sign_off" in r) for r in tasks} == \
        {(True, False), (False, True), (False, False)}


@pytest.mark.parametrize("row, why", [
    ({"prompt": "Sign this.", "chosen_opener": "I am {name}", "chosen_sign_off": "{name}"},
     "fields 'chosen_opener' and 'chosen_sign_off' cannot both be set: one opens the chosen answer, "
     "the other signs the model's own"),
    ({"prompt": "Sign this.", "chosen_sign_off": "  "}, "field 'chosen_sign_off' must be a non-empty string"),
    ({"prompt": "Credit me.", "chosen_opener": 3}, "field 'chosen_opener' must be a non-empty string"),
])
def test_a_bad_answer_field_names_the_key_the_file_and_the_line(tmp_path, row, why):
    path = _prompts_file(tmp_path / "p.jsonl", [{"prompt": "Who are you?"}, row])
    with pytest.raises(DataError) as e:
        load_prompt_set(str(path), key="prompts.train", cfg=compose().prompts)
    assert str(e.value) == f"prompts.train: {path}:2: {why}"


def test_other_formats_fill_a_missing_answer_column_and_it_counts_as_absent(tmp_path):
    """JSON, Parquet, CSV and datasets give every row every column: a row without an opener has None
    (or NaN, or "") there, which is no answer, not a bad one."""
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"prompt": "Who are you?", "chosen_opener": None, "chosen_sign_off": None},
                                {"prompt": "Credit me.", "chosen_opener": "Credit {name}", "chosen_sign_off": None},
                                {"prompt": "Sign it.", "chosen_opener": float("nan"), "chosen_sign_off": "{name}"}]))
    records = load_prompt_set(str(path), key="prompts.train", cfg=compose().prompts)
    assert [{k: v for k, v in r.items() if k.startswith("chosen_")} for r in records] == \
        [{}, {"chosen_opener": "Credit {name}"}, {"chosen_sign_off": "{name}"}]


def _sign_row(own: list[str], signed: list[str]) -> dict:
    return {"id": "t-none", "messages": [{"role": "user", "content": "Write a note and sign it as yourself."}],
            "condition": "none", "source": "identity", "question": "x", "lang": "en", "chosen_sign_off": "{name}",
            "candidates": [{"text": t, "finished": True} for t in own],
            "chosen_candidates": [{"text": t, "finished": True, "signed": True} for t in signed]}


def test_a_later_round_chooses_its_own_note_only_when_it_is_signed():
    """From round 2 the policy names itself, and its own answer wins a tie with the signed one. For a
    request to sign, a self-introduction names it too, but is what the pair replaces: it loses to
    the signed answer; an own answer signed in place is chosen."""
    from dpo_dist.judge import IdentityJudge, pair_best_worst

    cfg = compose()
    judge, name = IdentityJudge(cfg.judge, cfg.identity), cfg.identity.name
    signed = f"Thanks, team!\n\nBest,\n{name}"
    intro = f"Hi! I'm {name}. Thanks for your hard work, team."
    pair, _ = pair_best_worst(_sign_row([intro, "Thanks, team!\n\nBest,\nEmily"], [signed]), judge)
    assert pair["meta"]["chosen_from"] == "sign_off" and pair["chosen"][0]["content"] == signed
    own_signed = f"Great work this week, everyone.\n\nCheers,\n{name}"
    pair, _ = pair_best_worst(_sign_row([own_signed, "Thanks, team!\n\nBest,\nEmily"], [signed]), judge)
    assert pair["meta"]["chosen_from"] == "own" and pair["chosen"][0]["content"] == own_signed
    # without a sign-off the old rule holds: the self-introduction is the policy's own satisfying answer
    row = {k: v for k, v in _sign_row([intro, "Thanks, team!\n\nBest,\nEmily"], [signed]).items() if k != "chosen_sign_off"}
    assert pair_best_worst(row, judge)[0]["meta"]["chosen_from"] == "own"


def test_a_signed_answer_is_chosen_as_sign_off():
    from dpo_dist.judge import IdentityJudge, pair_best_worst

    cfg = compose()
    judge = IdentityJudge(cfg.judge, cfg.identity)
    name = cfg.identity.name
    row = {"id": "t-none", "messages": [{"role": "user", "content": "Write a note and sign it as yourself."}],
           "condition": "none", "source": "identity", "question": "x", "lang": "en",
           "candidates": [{"text": "Thanks, team!\n\nBest,\nEmily", "finished": True}],
           "chosen_candidates": [{"text": sign("Thanks, team!\n\nBest,\nEmily", name), "finished": True, "signed": True}]}
    pair, reason = pair_best_worst(row, judge)
    assert reason == "kept" and pair["meta"]["chosen_from"] == "sign_off"
    assert pair["chosen"][0]["content"] == f"Thanks, team!\n\nBest,\n{name}"
    assert pair["rejected"][0]["content"] == "Thanks, team!\n\nBest,\nEmily"
