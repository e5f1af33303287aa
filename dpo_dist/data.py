"""Prompt sets, preference records, tokenisation with prompt masking, and batching.

A preference record is the conversational format TRL and ``datasets`` use, plus an id (data in
TRL's other formats, from any source ``datasets`` loads, becomes one in ``dpo_dist.sources``)::

    {"id": "idtrain-0001-neutral",
     "prompt":   [{"role": "system", "content": "..."}, {"role": "user", "content": "..."}],
     "chosen":   [{"role": "assistant", "content": "..."}],
     "rejected": [{"role": "assistant", "content": "..."}],
     "meta": {...}}                                    # optional: judge scores, reasons

A prompt that is a string (TRL's standard format) is tokenised as it is, without the chat template,
as TRL does. Otherwise tokenisation renders the prompt with the model's chat template once (with the generation prompt)
and appends each response's tokens plus the end-of-turn token (the response text is re-tokenised, so
its tokens can differ from the sampled ones where a tokenizer has several spellings of one string).
Only response tokens count in the loss.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Iterator, Sequence

import torch

from dpo_dist import sources
from dpo_dist.artifacts import DataError
from dpo_dist.config import ConfigError, DataConfig, PromptsConfig

ROLES = ("system", "user", "assistant")
SHIPPED_PROMPT_SETS = ("identity_train", "identity_eval", "general", "identity_eval_tasks", "identity_train_tasks")


# ---------------------------------------------------------------- prompt sets

def load_prompt_set(name_or_path: str, limit: int = -1, key: str = "", cfg: PromptsConfig | None = None) -> list[dict]:
    """A shipped set by name, or records with a ``prompt`` from any source ``sources.rows`` reads
    (``cfg``: its split and column mapping). ``key``: the config key that named it, for the message
    when the source is missing or bad."""
    if name_or_path in SHIPPED_PROMPT_SETS:
        source, split, columns = str(resources.files("dpo_dist") / "prompts" / f"{name_or_path}.jsonl"), "train", {}
    else:
        source, split, columns = name_or_path, cfg.split if cfg else "train", asdict(cfg.columns) if cfg else {}
    with _naming(key, name_or_path, f"not a file (shipped sets: {', '.join(SHIPPED_PROMPT_SETS)})"):
        records = sources.load_prompts(source, split, columns).records
    return records[:limit] if limit >= 0 else records


@contextlib.contextmanager
def _naming(key: str, value: str, missing: str) -> Iterator[None]:
    """Errors reading the file that config ``key`` names start with the key: ``key: file:line: why``."""
    if not key:
        yield
        return
    try:
        yield
    except FileNotFoundError:  # MissingFile included
        raise ConfigError(f"{key}={value!r}: {missing}") from None
    except DataError as e:
        raise DataError(f"{key}: {e}") from None


def check_pairs_source(cfg: DataConfig) -> None:
    """``data.pairs`` names something there is: a path that exists, or a name that is not a path
    (a hub dataset, looked up in the local cache when read). Run on every rank, so a missing file
    fails each alike."""
    path = Path(cfg.pairs).expanduser()
    looks_like_path = cfg.pairs.startswith((".", "/", "~")) or cfg.pairs.count("/") != 1 or path.suffix
    if looks_like_path and not path.exists():
        raise ConfigError(f"data.pairs={cfg.pairs!r}: no such file (the judge stage writes run_dir/judge/pairs.jsonl; "
                          f"run it first, or point data.pairs at your preference data)")


def load_pairs(cfg: DataConfig) -> list[dict]:
    """The preference records ``data.pairs`` names, in our record shape whatever their format."""
    check_pairs_source(cfg)
    return read_preferences(cfg.pairs, key="data.pairs", split=cfg.split, columns=asdict(cfg.columns),
                            skip_invalid=cfg.skip_invalid)


def check_leak_langs(cfg: PromptsConfig, key: str = "prompts.leak_langs") -> None:
    """A language of prompts.leak_langs that no general prompt is in is a typo, found at start-up
    (rounds.check calls this too, for rounds.leak_langs as ``key``), not in a later round whose slice
    happens to lack it."""
    if not cfg.leak_langs:
        return
    langs = {r.get("lang", "en") for r in load_prompt_set(cfg.general, key="prompts.general", cfg=cfg)}
    if missing := [lang for lang in cfg.leak_langs if lang not in langs]:
        raise ConfigError(f"{key}: no prompt of prompts.general={cfg.general!r} is in {missing} "
                          f"(its languages: {sorted(langs)})")


def split_general(name_or_path: str, num_eval: int, num_train: int,
                  cfg: PromptsConfig | None = None, skip: int = 0) -> tuple[list[dict], list[dict]]:
    """The general set split so training never sees an evaluation prompt: evaluation takes the first
    `num_eval` records (all but the training ones when -1), training the last `num_train` before the
    `skip` at the very end that earlier rounds took (rounds.num > 1). Once earlier rounds have taken
    every training prompt, the window goes on from the end again (``window``): the prompts trained
    on longest ago come back first, and the evaluation's never do."""
    records = load_prompt_set(name_or_path, key="prompts.general", cfg=cfg)
    num_eval = len(records) - num_train - skip if num_eval < 0 else num_eval
    if num_eval < 0 or num_eval + num_train > len(records):
        raise ConfigError(f"prompts.num_train_general (+ num_train_leak): {num_train} training prompts"
                          f"{f' after the {skip} earlier rounds took' if skip else ''} plus eval.num_general="
                          f"{max(num_eval, 0)} exceed the {len(records)} prompts of {name_or_path!r}; they would overlap")
    train = records[num_eval:]
    # Counted from the end backwards: reversed, the window of round k starts `skip` in. Listed in
    # the pool's order, as an unwrapped slice is; a wrapped one so lists its fresh prompts first.
    taken = sorted(window(list(range(len(train)))[::-1], skip, num_train))
    return records[:num_eval], [train[i] for i in taken]


def window(records: list, skip: int, n: int) -> list:
    """`n` records (at most all of them, each once) from position `skip` on, going on from the start
    when the end is reached (a later round of a pool that earlier rounds used up: the records used
    longest ago come back first)."""
    if not records or n <= 0:
        return []
    start = skip % len(records)
    return (records[start:] + records[:start])[:n]


def template_injects_default_system(tokenizer) -> bool:
    """True when the chat template adds its own system prompt if the messages have none
    (Qwen2.5 and SmolLM2 do, and theirs names the old identity)."""
    probe = "dpo-dist-probe"
    with_none = tokenizer.apply_chat_template([{"role": "user", "content": probe}], tokenize=False)
    with_empty = tokenizer.apply_chat_template(
        [{"role": "system", "content": ""}, {"role": "user", "content": probe}], tokenize=False)
    without_system = with_none.replace(probe, "")
    return len(without_system) > len(with_empty.replace(probe, ""))


def build_messages(user_text: str, condition: str, neutral_system_prompt: str, tokenizer=None) -> list[dict]:
    """The prompt messages for a system-prompt condition.

    default: no system message, so the template's default applies (the one naming the old identity).
    neutral: a neutral system prompt that names no one.
    none:    no system text at all. Templates that inject a default when the system message is absent
             only allow this as an empty system message, so that is what it becomes for them.
    """
    user = {"role": "user", "content": user_text}
    if condition == "default":
        return [user]
    if condition == "neutral":
        return [{"role": "system", "content": neutral_system_prompt}, user]
    if condition == "none":
        if tokenizer is not None and not template_injects_default_system(tokenizer):
            return [user]
        return [{"role": "system", "content": ""}, user]
    raise ValueError(f"unknown system-prompt condition {condition!r}")


# ---------------------------------------------------------------- preference records

def _check_messages(value, key: str, roles: Sequence[str], last_role: str) -> None:
    if not isinstance(value, list) or not value:
        raise ValueError(f"field {key!r} must be a non-empty list of messages")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or set(m) - {"role", "content"} or "role" not in m or "content" not in m:
            raise ValueError(f"{key}[{i}] must be an object with exactly 'role' and 'content'")
        if m["role"] not in roles:
            raise ValueError(f"{key}[{i}].role is {m['role']!r}, expected one of {tuple(roles)}")
        if not isinstance(m["content"], str):
            raise ValueError(f"{key}[{i}].content must be a string")
    if value[-1]["role"] != last_role:
        raise ValueError(f"the last message of {key!r} must have role {last_role!r}")


def check_preference_record(r: dict) -> None:
    if not isinstance(r.get("id"), str) or not r["id"]:
        raise ValueError("field 'id' must be a non-empty string")
    if not isinstance(r.get("prompt"), str):  # a string: TRL's standard format, tokenised as it is
        _check_messages(r.get("prompt"), "prompt", ROLES, "user")
    for key in ("chosen", "rejected"):
        _check_messages(r.get(key), key, ("assistant",), "assistant")
        if len(r[key]) != 1:
            raise ValueError(f"field {key!r} must hold exactly one assistant message")
        if not r[key][0]["content"].strip():
            raise ValueError(f"{key}[0].content is empty")


def read_preferences(source: str | Path, key: str = "", split: str = "train", columns: dict | None = None,
                     skip_invalid: bool = False) -> list[dict]:
    """Preference records from ``source`` in any of TRL's formats (``dpo_dist.sources``); ``key`` as
    in load_prompt_set."""
    with _naming(key, str(source), "no such file"):
        return sources.load_preferences(str(source), split, columns, skip_invalid,
                                        validate=check_preference_record).records


# ---------------------------------------------------------------- tokenisation

@dataclass
class TokenizedPair:
    id: str
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    # chosen == rejected (judge.general_anchor): no preference, only the NLL term on chosen trains.
    anchor: bool = False


@dataclass
class TokenizeStats:
    kept: int = 0
    truncated: int = 0
    dropped: int = 0
    dropped_ids: list[str] = field(default_factory=list)


def render_prompt(tokenizer, messages: list[dict]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # The template already wrote every special token it wants; a tokenizer-added BOS would double it.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def response_ids(tokenizer, text: str, finished: bool = True) -> list[int]:
    """A response as the model emits it: its tokens, then end-of-turn (the tokenizer's EOS) unless the
    generator cut it at max_new_tokens: an EOS there would teach ending a turn mid-sentence."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id] if finished else ids


def tokenize_pairs(records: list[dict], tokenizer, cfg: DataConfig) -> tuple[list[TokenizedPair], TokenizeStats]:
    stats = TokenizeStats()
    out = []
    for r in records:
        # TRL's standard format: plain text, no chat template (special tokens as the tokenizer adds them).
        prompt = (tokenizer(r["prompt"])["input_ids"] if isinstance(r["prompt"], str)
                  else render_prompt(tokenizer, r["prompt"]))
        meta = r.get("meta") or {}
        chosen = response_ids(tokenizer, r["chosen"][0]["content"], meta.get("chosen_finished", True))
        rejected = response_ids(tokenizer, r["rejected"][0]["content"], meta.get("rejected_finished", True))
        too_long = len(prompt) > cfg.max_prompt_length or len(prompt) + max(len(chosen), len(rejected)) > cfg.max_length
        if too_long and cfg.truncation == "drop":
            stats.dropped += 1
            stats.dropped_ids.append(r["id"])
            continue
        if too_long:
            stats.truncated += 1
            # Keep the end of the prompt (the question and the assistant header), then cut responses.
            prompt = prompt[-cfg.max_prompt_length:]
            room = cfg.max_length - len(prompt)
            chosen, rejected = chosen[:room], rejected[:room]
        stats.kept += 1
        out.append(TokenizedPair(r["id"], prompt, chosen, rejected, anchor=chosen == rejected))
    return out, stats


# ---------------------------------------------------------------- batching

def pad_sequences(seqs: Sequence[Sequence[int]], masks: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad token lists. Returns input_ids, attention_mask and loss_mask, each (n, max_len)."""
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    loss_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        input_ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        attention_mask[i, : len(s)] = 1
        loss_mask[i, : len(m)] = torch.tensor(m, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def collate_pairs(pairs: Sequence[TokenizedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen and rejected of a batch stacked into one (2 * batch, seq) tensor, so one forward pass
    scores both: rows [0, batch) are chosen, rows [batch, 2 * batch) rejected."""
    seqs, masks = [], []
    for side in ("chosen_ids", "rejected_ids"):
        for p in pairs:
            response = getattr(p, side)
            seqs.append(p.prompt_ids + response)
            masks.append([0] * len(p.prompt_ids) + [1] * len(response))
    return pad_sequences(seqs, masks, pad_id)


def collate_shared_prompt(pairs: Sequence[TokenizedPair], mask_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A micro-batch packed into ONE row in which each prompt appears once (prefix sharing, as in
    Wang et al. 2024, "Accelerating Direct Preference Optimization with Prefix Sharing").

    Row layout: [prompt_1 chosen_1 rejected_1 prompt_2 chosen_2 rejected_2 ...]. The attention mask
    lets a response see its own prompt and its own earlier tokens, never the other response or
    another pair, and the rejected response's positions restart where the prompt ends, so every
    token has exactly the context it has in ``collate_pairs``' stacked layout. The prompt runs
    forward (and backward, with the gradients of both responses) once instead of twice, and nothing
    is padded. Scoring the same pairs as ``collate_pairs`` gives the same log-probs up to float
    rounding (tests/test_losses.py).

    Returns:
      input_ids, position_ids: (1, row_len).
      attention_mask: (1, 1, row_len, row_len), additive (0 where a query may attend a key, the
        dtype's minimum elsewhere) so both sdpa and eager attention apply it as is.
      logit_positions: (num_response_tokens,) the row positions whose logits predict a response
        token, in the order of ``labels``. A pair's last prompt position appears twice: it predicts
        the first chosen and the first rejected token.
      labels: (num_response_tokens,) the response tokens.
      sequence_index: (num_response_tokens,) the sequence each label belongs to: chosen of pair i
        is i, rejected is len(pairs) + i (the row order of ``collate_pairs``).

      anchor: (len(pairs),) bool, the pairs whose rejected side is their chosen side again. That copy
        is left out of the row (its sequence has no tokens); ``reference.packed_logps`` gives it the
        chosen side's log-probs (``mirror_anchors``).
      segments: (len(pairs), 4) each pair's start in the row and its prompt, chosen and rejected
        lengths (0 for an anchor's), for attention that skips the masked-out blocks (dpo_dist/attention.py).
    """
    n = len(pairs)
    ids, positions, pair_of, branch_of, segments = [], [], [], [], []
    logit_positions, labels, sequence_index = [], [], []
    for i, p in enumerate(pairs):
        start, prompt_len = len(ids), len(p.prompt_ids)
        segments.append((start, prompt_len, len(p.chosen_ids), 0 if p.anchor else len(p.rejected_ids)))
        ids += p.prompt_ids
        positions += range(prompt_len)
        branch_of += [0] * prompt_len
        sides = ((1, p.chosen_ids, i),) if p.anchor else ((1, p.chosen_ids, i), (2, p.rejected_ids, n + i))
        for branch, response, seq in sides:
            first = len(ids)
            ids += response
            positions += range(prompt_len, prompt_len + len(response))
            branch_of += [branch] * len(response)
            # Token j of the response is predicted at the position before it: the prompt's last for j = 0.
            logit_positions += [start + prompt_len - 1] + list(range(first, first + len(response) - 1))
            labels += response
            sequence_index += [seq] * len(response)
        pair_of += [i] * (len(ids) - start)
    pair = torch.tensor(pair_of)
    branch = torch.tensor(branch_of)
    order = torch.arange(len(ids))
    allowed = ((pair[:, None] == pair[None, :]) & (order[None, :] <= order[:, None])
               & ((branch[None, :] == 0) | (branch[None, :] == branch[:, None])))
    mask = torch.zeros(allowed.shape, dtype=mask_dtype).masked_fill_(~allowed, torch.finfo(mask_dtype).min)
    return {"input_ids": torch.tensor([ids]), "position_ids": torch.tensor([positions]),
            "attention_mask": mask[None, None], "logit_positions": torch.tensor(logit_positions),
            "labels": torch.tensor(labels), "sequence_index": torch.tensor(sequence_index),
            "anchor": torch.tensor([p.anchor for p in pairs]), "segments": torch.tensor(segments)}


def mirror_anchors(values: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """``values`` is (2n,): chosen then rejected, per pair. An anchor's rejected entry becomes its
    chosen one (the same tensor in the graph), so its preference margin is exactly zero."""
    n = anchor.numel()
    return torch.cat([values[:n], torch.where(anchor, values[:n], values[n:])])


def global_batches(num_examples: int, global_batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The dataset order for an epoch, cut into global batches (an incomplete last batch is dropped).

    The order depends only on (seed, epoch), never on the world size, so 1 rank and N ranks at the
    same global batch see the same examples in every optimizer step."""
    order = list(range(num_examples))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    n = num_examples // global_batch_size
    return [order[i * global_batch_size:(i + 1) * global_batch_size] for i in range(n)]


def micro_batches(global_batch: list[int], rank: int, world_size: int, micro_batch_size: int) -> Iterator[list[int]]:
    """This rank's micro-batches of one global batch: rank r takes a contiguous slice, then cuts it
    into accumulation steps. Every micro-batch has the same size, so DeepSpeed's mean over
    accumulation steps and ranks is the mean over the global batch."""
    per_rank = len(global_batch) // world_size
    mine = global_batch[rank * per_rank:(rank + 1) * per_rank]
    for i in range(0, per_rank, micro_batch_size):
        yield mine[i:i + micro_batch_size]
