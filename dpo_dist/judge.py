"""Stage 2: score candidates and build preference pairs.

    python -m dpo_dist.judge run_dir=runs/demo                    # rule judge, best vs worst
    python -m dpo_dist.judge run_dir=runs/demo judge=correction   # rewrite old name -> new name
    python -m dpo_dist.judge run_dir=runs/demo judge=reward_model judge.reward_model_path=/models/rm

The names (new, old, old creators) are the identity group's (``cfg.identity``), which the generation
openers and the evaluation read too: rename with ``identity=...`` on the pipeline, not per stage.

Rule judge (identity): +3 claims the new name, -3 claims the old one, -4 degenerate text
(repetition, a word repeated in a row, a doubled prefix such as "Deep Deep"), -2 cut off before the
end-of-turn token, -1 outside the length bounds, -1 for naming an old creator
(identity.old_creators). The best candidate becomes chosen and the worst rejected. A prompt is
dropped, and counted by reason, when best and worst tie, or when the best does not satisfy the rule
(claims the new name, not the old, fluent, finished). With context-distillation candidates
(``chosen_candidates``), chosen comes from those and rejected from the model's own answers to the
training prompt, unless an own answer satisfies the rule and scores no lower (a trained policy, issue 23);
for a prompt whose record asks its answer signed (``chosen_sign_off``) only a signed own answer does.

General instructions (``prompts.num_train_general``) keep the rest of the model's behaviour: chosen
is its own best plain answer (no identity named, not degenerate), rejected its worst, or for a few
leak prompts (``prompts.num_train_leak``) an answer sampled with the identity opener, or with
``judge.leak_rejected=opener`` only the words of that answer before the new name. A trained
policy's own leaks are rare: ``generation.leak_search_candidates`` samples more plain answers per
general prompt, and where the prompt's own candidates hold no leak and one of those does, it is the
rejected side (``meta.rejected_from = "leak_search"``); otherwise they are not used. With
``judge.general_anchor`` a general prompt whose plain answers tie is kept as an anchor: its best
answer on both sides, so training applies only the NLL term on it (data.TokenizedPair.anchor).

Correction: the model's own answer naming the old identity, rewritten at word boundaries to the new
name, is chosen and the original rejected (the tutorial's near-duplicate pairs; kept to compare).

Reward model: any AutoModelForSequenceClassification scores (prompt, response); best vs worst.

Output: ``judge/pairs.jsonl`` (preference format, with scores and reasons in ``meta``) and
``judge/summary.json`` (pairs kept, dropped by reason, where chosen came from, the own answers'
mistakes by kind, score distributions, the digest of the pairs file: a damaged one is rebuilt with a warning).
"""

from __future__ import annotations

import logging
import re
import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from dpo_dist import dist
from dpo_dist.artifacts import (MissingFile, expect_ids, file_digest, fingerprint, gather_jsonl_shards, intact,
                                outputs_record, read_jsonl, reusable, shard_path, write_json, write_jsonl)
from dpo_dist.cli import stage_main
from dpo_dist.config import Config, IdentityConfig, JudgeConfig
from dpo_dist.models import model_fingerprint
from dpo_dist.sources import ANSWER_KEYS

log = logging.getLogger(__name__)


# The version of the rules that turn candidates into pairs, in the judge's fingerprint. 2: the policy's
# own answer can be chosen (iterative rounds), every pair records where its chosen side came from.
RULES = 3  # 3: a "sign it as yourself" prompt's own answer is chosen only when signed


# ---------------------------------------------------------------- text checks

def _name_pattern(name: str) -> str:
    # Letters/digits must not touch the name on either side ("SmolLM2" is not "SmolLM"); CJK text may.
    words = r"\s+".join(re.escape(w) for w in name.split())
    return rf"(?<![A-Za-z0-9]){words}(?![A-Za-z0-9])"


def mentions(text: str, name: str) -> bool:
    return bool(name) and re.search(_name_pattern(name), text, flags=re.IGNORECASE) is not None


def mentions_old_identity(text: str, old_name: str, new_name: str) -> bool:
    """The old name standing alone, not as part of the new one ("SmolLM" but not "Deep SmolLM")."""
    return mentions(re.sub(_name_pattern(new_name), " ", text, flags=re.IGNORECASE), old_name)


def rewrite_identity(text: str, old_name: str, new_name: str) -> str:
    """Replace the old name with the new one at word boundaries, leaving names that already are the
    new one alone: never inside other words ("SmolLM2"), never "Deep Deep SmolLM"."""
    placeholder = "\x00NEW\x00"
    protected = re.sub(_name_pattern(new_name), placeholder, text, flags=re.IGNORECASE)
    return re.sub(_name_pattern(old_name), new_name, protected, flags=re.IGNORECASE).replace(placeholder, new_name)


def chosen_answer(record: dict) -> dict:
    """A prompt record's own chosen-side answer (sources.ANSWER_KEYS), {} when it has none."""
    return {k: record[k] for k in ANSWER_KEYS if k in record}


def fill_identity(template: str, identity: IdentityConfig) -> str:
    # replace, not str.format: a prompt file's other braces are text.
    return template.replace("{name}", identity.name).replace("{creator}", identity.creator)


# The version of the signing rules below, in the generation fingerprint of prompts with a sign-off:
# signed candidates are stored signed, so changed rules must sample (and sign) them again.
SIGN_RULES = 1
_PLACEHOLDER = re.compile(r"\[[^\]\n]{1,40}\]")  # "[Your Name]": a signature the model left for the user
# Lines a note closes with, above its signature ("Best regards,", "Your sister,", 此致 / 敬礼): only
# under one of these does a short last line count as a name the model signed for someone else.
_CLOSINGS = ("best", "kind regards", "warm regards", "regards", "sincerely", "yours", "your ", "love", "with love",
             "thanks", "thank you", "many thanks", "cheers", "all the best", "take care", "respectfully", "warmly",
             "fondly", "hugs", "xoxo", "with gratitude", "gratefully", "此致", "敬礼", "祝好", "顺祝", "谢谢")
_SENTENCE_END = (".", "!", "?", "。", "！", "？")
# Characters on a line of a signature block (a name, a title, a company, a dash before the name):
# longer lines are text.
_SIGNATURE_LINE = 40


def _bare(line: str) -> str:
    return line.strip().strip("-—–*_ ").strip()


def _is_closing(line: str) -> bool:
    s = _bare(line).rstrip(",，").strip().casefold()
    return bool(s) and len(s) <= 30 and s.startswith(_CLOSINGS)


def is_signed(text: str, sign_off: str) -> bool:
    """The name on a short last line, where a signature goes: a one-line self-introduction that names
    the model is not a signed note."""
    lines = [x.strip() for x in text.replace("\r\n", "\n").split("\n") if x.strip()]
    return bool(lines) and len(lines[-1]) <= max(_SIGNATURE_LINE, len(sign_off) + 10) and sign_off.casefold() in lines[-1].casefold()


def sign(text: str, sign_off: str) -> str:
    """The model's own answer to a "sign it as yourself" request, signed with ``sign_off`` (the
    filled-in name). What the model wrote stays as it was, so the pair teaches where the name goes,
    not new text; only what it left for someone else to sign gives way: placeholders at the end
    ("[Your Name]"), and short lines under a closing within the last three lines ("Best regards,\n
    John Smith\nMarketing Manager"). Under a closing the name takes the next line, otherwise its own
    line after a dash. An answer already signed (``is_signed``) is left signed once."""
    lines = text.replace("\r\n", "\n").rstrip().split("\n")
    while lines and (not lines[-1].strip() or _PLACEHOLDER.fullmatch(_bare(lines[-1]))):
        lines.pop()
    if is_signed("\n".join(lines), sign_off):
        return "\n".join(lines)
    for i in range(len(lines) - 1, max(0, len(lines) - 4), -1):  # never the first line: "Hi Sam," greets
        rest = lines[i + 1:]
        if _is_closing(lines[i]) and all(len(x.strip()) <= _SIGNATURE_LINE and not x.strip().endswith(_SENTENCE_END)
                                         for x in rest):
            return "\n".join(lines[:i + 1]).rstrip() + "\n" + sign_off
    body = "\n".join(lines).rstrip()
    return f"{body}\n\n— {sign_off}" if body else sign_off


_WORD = re.compile(r"\w+", re.UNICODE)


def repetition(text: str, n: int = 3) -> tuple[float, int]:
    """(share of repeated word n-grams, longest run of one word repeated in a row). CJK text has no
    spaces, so characters stand in for words there."""
    words = [w.lower() for w in _WORD.findall(text)]
    if len(words) <= 2 and any(ord(ch) > 0x2E80 for ch in text):
        words = [ch for ch in text if not ch.isspace()]
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    share = 1 - len(set(grams)) / len(grams) if grams else 0.0
    run = longest = 1 if words else 0
    for a, b in zip(words, words[1:]):
        run = run + 1 if a == b else 1
        longest = max(longest, run)
    return share, longest


def is_degenerate(text: str, new_name: str = "", max_ngram_repeat: float = 0.3, max_word_run: int = 3) -> bool:
    """Pathological repetition, or the new name's first word doubled ("Deep Deep SmolLM"): the
    collapse the tutorial's run ended in."""
    share, run = repetition(text)
    if share > max_ngram_repeat or run > max_word_run:
        return True
    first = new_name.split()[0] if len(new_name.split()) > 1 else None
    return first is not None and re.search(rf"(?<![A-Za-z]){re.escape(first)}\s+{re.escape(first)}", text,
                                           flags=re.IGNORECASE) is not None


# ---------------------------------------------------------------- judges

@dataclass
class Verdict:
    score: float
    reasons: list[str] = field(default_factory=list)
    satisfies: bool = False  # claims the new identity, not the old, fluent, finished


class IdentityJudge:
    """Scores answers against ``identity`` (the names) by the rules in ``cfg`` (the judge settings)."""

    def __init__(self, cfg: JudgeConfig, identity: IdentityConfig):
        self.cfg = cfg
        self.identity = identity

    def __call__(self, text: str, finished: bool) -> Verdict:
        c, ident = self.cfg, self.identity
        v = Verdict(0.0)
        new, old = mentions(text, ident.name), mentions_old_identity(text, ident.old_name, ident.name)
        degenerate = is_degenerate(text, ident.name)
        words = len(_WORD.findall(text)) if not any(ord(ch) > 0x2E80 for ch in text) else len(text) // 2
        for ok, points, reason in (
            (new, 3, "claims_new"), (old, -3, "claims_old"), (degenerate, -4, "degenerate"),
            (not finished, -2, "unfinished"), (not c.min_words <= words <= c.max_words, -1, "length"),
            (any(mentions(text, oc) for oc in ident.old_creators), -1, "old_creator"),
        ):
            if ok:
                v.score += points
                v.reasons.append(reason)
        v.satisfies = new and not old and not degenerate and finished
        return v

    def general(self, text: str, finished: bool) -> Verdict:
        """An answer to a general instruction, where naming the new identity unprompted is a leak.
        A cut-off answer may still be chosen: it carries no EOS into training (data.response_ids)."""
        name = self.identity.name
        v = Verdict(0.0)
        leak, degenerate = mentions(text, name), is_degenerate(text, name)
        for ok, points, reason in ((leak, -3, "leak"), (degenerate, -4, "degenerate"), (not finished, -2, "unfinished")):
            if ok:
                v.score += points
                v.reasons.append(reason)
        v.satisfies = not leak and not degenerate
        return v


class RewardModelJudge:
    """Scores (prompt messages, response) with a sequence-classification model, in batches, on this
    rank's device (``dist.device()``)."""

    def __init__(self, cfg: JudgeConfig, trust_remote_code: bool = False):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.torch = torch
        self.batch_size = cfg.batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.reward_model_path, trust_remote_code=trust_remote_code)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        self.model = AutoModelForSequenceClassification.from_pretrained(
            cfg.reward_model_path, trust_remote_code=trust_remote_code, use_safetensors=True).to(dist.device()).eval()
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id

    def score(self, items: list[tuple[list[dict], str]]) -> list[float]:
        texts = [self.tokenizer.apply_chat_template(m + [{"role": "assistant", "content": r}], tokenize=False)
                 for m, r in items]
        dev = next(self.model.parameters()).device
        scores: list[float] = []
        with self.torch.no_grad():
            for i in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(texts[i:i + self.batch_size], return_tensors="pt", padding=True,
                                     add_special_tokens=False).to(dev)
                scores += self.model(**enc).logits[:, 0].float().tolist()
        return scores


# ---------------------------------------------------------------- pairs

def _pair(row: dict, chosen: dict, rejected: dict, meta: dict) -> dict:
    """`chosen`/`rejected` are candidates ({"text", "finished"}); an answer cut by max_new_tokens is
    marked unfinished so training does not teach the model to end its turn mid-sentence."""
    return {"id": row["id"], "prompt": row["messages"], "chosen": [{"role": "assistant", "content": chosen["text"]}],
            "rejected": [{"role": "assistant", "content": rejected["text"]}],
            "meta": {"condition": row["condition"], "source": row["source"], **meta,
                     "chosen_finished": chosen["finished"], "rejected_finished": rejected["finished"]}}


def pair_best_worst(row: dict, judge: IdentityJudge) -> tuple[dict | None, str]:
    """A pair (or None) and the reason: 'kept' or why it was dropped.

    Chosen is the model's own best answer when it satisfies the rule and scores at least as well as
    the best opener answer (``chosen_candidates``), else that opener answer: a trained policy that
    names itself unaided gives on-policy pairs, while the base model, whose own answers do not name
    the new identity, gets the opener answer as before. Rejected is the worst own answer.
    ``meta.chosen_from`` says which side chosen came from ("own", "opener", or "sign_off": the
    model's answer signed with the record's ``chosen_sign_off`` by ``sign``)."""
    if row.get("source") in ("general", "leak"):
        return pair_general(row, judge)
    own = [(c, judge(c["text"], c["finished"])) for c in row["candidates"]]
    opened = [(c, judge(c["text"], c["finished"])) for c in row.get("chosen_candidates", [])]
    if not own:
        return None, "no_candidates"
    # A "sign it as yourself" request: an own answer stands in for the signed one only when it is signed
    # too. A self-introduction names the model as well, and is what these pairs exist to replace.
    sign_off = fill_identity(row["chosen_sign_off"], judge.identity) if "chosen_sign_off" in row else None
    eligible = [cv for cv in own if sign_off is None or is_signed(cv[0]["text"], sign_off)]
    best_own = max(eligible or own, key=lambda cv: cv[1].score)
    best_opened = max(opened, key=lambda cv: cv[1].score) if opened else None
    worst = min(own, key=lambda cv: cv[1].score)
    # An own answer whose text is also the rejected one (a copy cut off) makes no pair; the opener's may.
    if best_opened is None or (eligible and best_own[1].satisfies and best_own[1].score >= best_opened[1].score
                               and best_own[0]["text"] != worst[0]["text"]):
        best, chosen_from = best_own, "own"
    else:
        best, chosen_from = best_opened, "sign_off" if best_opened[0].get("signed") else "opener"
    if best[1].score <= worst[1].score:
        return None, "tie"
    if not best[1].satisfies:
        return None, "no_valid_chosen"
    if best[0]["text"] == worst[0]["text"]:
        return None, "identical"
    return _pair(row, best[0], worst[0], {
        "chosen_from": chosen_from, "chosen_score": best[1].score, "rejected_score": worst[1].score,
        "chosen_reasons": best[1].reasons, "rejected_reasons": worst[1].reasons}), "kept"


def pair_general(row: dict, judge: IdentityJudge) -> tuple[dict | None, str]:
    """A general instruction keeps the model's own behaviour: chosen is its best plain answer (no
    identity, not degenerate), rejected its worst one. For a leak prompt (``prompts.num_train_leak``)
    rejected is an answer sampled with the identity opener instead: the unprompted self-introduction.
    Those rejected sides share their first tokens with every identity pair's chosen side, so only a
    few such prompts are used (measured: 60 of them pulled identity adoption from 97% to 21%)."""
    own = [(c, judge.general(c["text"], c["finished"])) for c in row["candidates"]]
    opened = [(c, judge.general(c["text"], c["finished"])) for c in row.get("chosen_candidates", [])]
    if not own:
        return None, "no_candidates"
    best = max(own, key=lambda cv: cv[1].score)
    worst = min(opened if row["source"] == "leak" and opened else own, key=lambda cv: cv[1].score)
    if not best[1].satisfies:
        return None, "no_valid_chosen"
    # generation.leak_search_candidates: the extra answers count only as a leak the own ones lack.
    searched = [(c, judge.general(c["text"], c["finished"])) for c in row.get("search_candidates", [])]
    found = [cv for cv in searched if "leak" in cv[1].reasons]
    if found and not any("leak" in v.reasons for _, v in own):
        worst = min(found, key=lambda cv: cv[1].score)
        return _pair(row, best[0], worst[0], {
            "chosen_from": "own", "rejected_from": "leak_search", "chosen_score": best[1].score,
            "rejected_score": worst[1].score, "chosen_reasons": best[1].reasons,
            "rejected_reasons": worst[1].reasons}), "kept"
    if best[1].score <= worst[1].score:
        if row["source"] == "general" and judge.cfg.general_anchor:
            return _pair(row, best[0], best[0], {
                "anchor": True, "chosen_from": "own", "chosen_score": best[1].score, "rejected_score": best[1].score,
                "chosen_reasons": best[1].reasons, "rejected_reasons": best[1].reasons}), "kept"
        return None, "tie"
    rejected = worst[0]
    if row["source"] == "leak" and judge.cfg.leak_rejected == "opener":
        rejected = leak_opener(rejected["text"], judge.identity.name)
        if rejected is None:
            return None, "no_opener"
    return _pair(row, best[0], rejected, {
        "chosen_from": "own", "chosen_score": best[1].score, "rejected_score": worst[1].score,
        "chosen_reasons": best[1].reasons, "rejected_reasons": worst[1].reasons}), "kept"


def leak_opener(text: str, new_name: str) -> dict | None:
    """The words of a self-introduction before the new name ("Hi! I'm" of "Hi! I'm Deep SmolLM, ..."),
    as an unfinished response (no end-of-turn is scored); None when the name opens the text."""
    m = re.search(_name_pattern(new_name), text, flags=re.IGNORECASE)
    opener = text[:m.start()].rstrip() if m else ""
    return {"text": opener, "finished": False} if opener else None


def pair_correction(row: dict, judge: IdentityJudge) -> tuple[dict | None, str]:
    old, new = judge.identity.old_name, judge.identity.name
    # Opener candidates count too: experiment=tutorial samples answers that start with the old name,
    # as Qwen's own answers do, so the rewrite has material on a model that rarely names itself.
    for c in row["candidates"] + row.get("chosen_candidates", []):
        if c["finished"] and mentions_old_identity(c["text"], old, new) and not is_degenerate(c["text"], new):
            fixed = rewrite_identity(c["text"], old, new)
            v_fixed, v_orig = judge(fixed, True), judge(c["text"], True)
            return _pair(row, {"text": fixed, "finished": True}, c, {
                "chosen_from": "rewrite", "chosen_score": v_fixed.score, "rejected_score": v_orig.score,
                "chosen_reasons": v_fixed.reasons, "rejected_reasons": v_orig.reasons}), "kept"
    return None, "no_old_name_to_correct"


def pair_reward_model(row: dict, scores: list[float]) -> tuple[dict | None, str]:
    cands = row["candidates"]
    if not cands:
        return None, "no_candidates"
    best = max(range(len(cands)), key=lambda i: scores[i])
    worst = min(range(len(cands)), key=lambda i: scores[i])
    if scores[best] <= scores[worst] or cands[best]["text"] == cands[worst]["text"]:
        return None, "tie"
    return _pair(row, cands[best], cands[worst], {
        "chosen_from": "own", "chosen_score": scores[best], "rejected_score": scores[worst],
        "chosen_reasons": [], "rejected_reasons": []}), "kept"


def _distribution(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    return {"n": len(values), "mean": round(statistics.fmean(values), 4), "min": min(values), "max": max(values),
            "histogram": dict(sorted(Counter(round(v, 1) for v in values).items()))}


def mistakes(rows: list[dict], judge: IdentityJudge) -> dict:
    """Counts of the mistakes in the model's own answers (``candidates``; the opener-forced
    ``chosen_candidates`` are not the policy's doing), by kind, with the number of own answers per
    prompt kind so shares can be taken. One answer may count under several kinds (an old name cut
    off mid-sentence is both ``identity_old_name`` and ``identity_unfinished``).

    Identity prompts: ``identity_no_name`` (neither the new nor the old name), ``identity_old_name``,
    ``identity_degenerate``, ``identity_unfinished``. General and leak prompts: ``general_leak`` (the
    new name, unprompted), ``general_degenerate``. Answers sampled to search for leaks, when there are
    any (``search_candidates``): ``search_answers_general``, ``search_general_leak``."""
    counts = Counter({k: 0 for k in ("own_answers_identity", "identity_no_name", "identity_old_name",
                                     "identity_degenerate", "identity_unfinished",
                                     "own_answers_general", "general_leak", "general_degenerate")})
    searched = [c for row in rows for c in row.get("search_candidates", [])]
    if searched:  # apart: they would change the shares of the own answers
        counts["search_answers_general"] = len(searched)
        counts["search_general_leak"] = sum("leak" in judge.general(c["text"], c["finished"]).reasons for c in searched)
    for row in rows:
        for c in row["candidates"]:
            if row.get("source") in ("general", "leak"):
                reasons = judge.general(c["text"], c["finished"]).reasons
                kinds = {"own_answers_general": True, "general_leak": "leak" in reasons,
                         "general_degenerate": "degenerate" in reasons}
            else:
                reasons = judge(c["text"], c["finished"]).reasons
                kinds = {"own_answers_identity": True,
                         "identity_no_name": "claims_new" not in reasons and "claims_old" not in reasons,
                         "identity_old_name": "claims_old" in reasons, "identity_degenerate": "degenerate" in reasons,
                         "identity_unfinished": "unfinished" in reasons}
            counts.update(k for k, hit in kinds.items() if hit)
    return dict(counts)


def run(cfg: Config) -> Path:
    e = dist.init(process_group=False)
    if cfg.judge.kind != "reward_model" and not e.is_main:
        return Path(cfg.run_dir) / "judge" / "pairs.jsonl"  # rule judging is cheap: rank 0 does all of it
    candidates = Path(cfg.run_dir) / "generate" / "candidates.jsonl"
    out_dir = Path(cfg.run_dir) / "judge"
    pairs_path, summary_path = out_dir / "pairs.jsonl", out_dir / "summary.json"
    settings = {k: v for k, v in asdict(cfg.judge).items() if k != "batch_size"}
    settings["rules"] = RULES  # pairs judged by older rules are judged again
    if cfg.judge.kind == "identity":
        settings["identity"] = asdict(cfg.identity)  # the rule judge's names; a reward model reads none
    weights = None
    if cfg.judge.kind == "reward_model":
        weights = model_fingerprint(replace(cfg.model, path=cfg.judge.reward_model_path))
    if not candidates.is_file():
        raise MissingFile(f"{candidates}: no such file; run the generate stage first (python -m dpo_dist.generate "
                          f"run_dir={cfg.run_dir})")
    fp = fingerprint(file_digest(candidates), settings, weights)
    if reusable(summary_path, fp, [pairs_path], quiet=not e.is_main):
        log.info("pairs: reusing %s (fingerprint %s)", pairs_path, fp)
        return pairs_path
    rows = read_jsonl(candidates)

    found = {}  # a reward model gives scores, not kinds of mistakes
    if cfg.judge.kind == "reward_model":
        results = _judge_with_reward_model(cfg, rows, out_dir, fp, e)
        if results is None:
            return pairs_path  # not rank 0: its shard is written, rank 0 merges
    else:
        judge = IdentityJudge(cfg.judge, cfg.identity)
        pick = pair_correction if cfg.judge.method == "correction" else pair_best_worst
        results = [pick(r, judge) for r in rows]
        found = {"mistakes": mistakes(rows, judge)}

    pairs = [p for p, _ in results if p is not None]
    reasons = Counter(reason for _, reason in results)
    write_jsonl(pairs_path, pairs)
    summary = {
        "fingerprint": fp, "prompts": len(rows), "pairs": len(pairs),
        "dropped": {k: v for k, v in sorted(reasons.items()) if k != "kept"},
        "by_condition": dict(Counter(p["meta"]["condition"] for p in pairs)),
        "by_source": dict(Counter(p["meta"]["source"] for p in pairs)),
        "anchors": sum(1 for p in pairs if p["meta"].get("anchor")),
        # General pairs whose rejected side is a leak found among generation.leak_search_candidates.
        "leak_search_pairs": sum(1 for p in pairs if p["meta"].get("rejected_from") == "leak_search"),
        # Of the identity pairs: the less of the data the opener forces, the more on-policy it is. A
        # general pair's chosen is always the model's own plain answer.
        "chosen_from": {"own": 0, "opener": 0, "sign_off": 0,
                        **Counter(p["meta"]["chosen_from"] for p in pairs if p["meta"]["source"] == "identity")},
        **found,
        "chosen_scores": _distribution([p["meta"]["chosen_score"] for p in pairs]),
        "rejected_scores": _distribution([p["meta"]["rejected_score"] for p in pairs]),
        "judge": asdict(cfg.judge), "identity": asdict(cfg.identity), **outputs_record(pairs_path),
    }
    write_json(summary_path, summary)
    log.info("pairs: %d kept of %d prompts; dropped %s -> %s", len(pairs), len(rows), summary["dropped"], pairs_path)
    return pairs_path


def _judge_with_reward_model(cfg: Config, rows: list[dict], out_dir: Path, fp: str, e) -> list | None:
    """Each rank scores its shard of the candidates on its device; rank 0 waits for all shards and
    pairs them."""
    mine = shard_path(out_dir, fp, e.rank, e.world_size)
    shard = [rows[i] for i in dist.shard_range(len(rows), e.rank, e.world_size)]
    if not intact(mine, lambda p: expect_ids(read_jsonl(p), [r["id"] for r in shard])):
        judge = RewardModelJudge(cfg.judge, cfg.model.trust_remote_code)
        flat = [(r["messages"], c["text"]) for r in shard for c in r["candidates"]]
        scores = iter(judge.score(flat))
        write_jsonl(mine, [{"id": r["id"], "scores": [next(scores) for _ in r["candidates"]]} for r in shard])
        del judge
        dist.free_memory()  # the reward model's device memory, before the reference model and policy load
    if not e.is_main:
        return None
    scores = {s["id"]: s["scores"] for s in gather_jsonl_shards(out_dir, fp, e.world_size)}
    return [pair_reward_model(r, scores[r["id"]]) for r in rows]


main = stage_main(run)

if __name__ == "__main__":
    main()
