"""Batched decoding with transformers models, reproducible per prompt.

``model.generate`` draws every row's sample from one RNG stream, so a prompt's answers change with
whatever else is in its batch (and so with the number of ranks). Here every row has its own
generator seeded from (seed, prompt id, candidate index): a prompt's samples do not depend on batch
composition, sharding or world size (up to float rounding of different batch shapes). The generators
are CPU ones on every device: each step's draws are host numbers copied to the logits' device, so a
GPU samples from the same random stream as the CPU. Each prompt is prefilled once and its KV cache
repeated for its k candidates. Prompts are left-padded and batched in length order, so padding
stays small.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finished: bool  # ended with the end-of-turn token (False: cut at max_new_tokens)


def row_seed(seed: int, prompt_id: str, index: int) -> int:
    digest = hashlib.sha256(f"{seed}:{prompt_id}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


_NUCLEUS_CANDIDATES = 1024


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One token per row. logits: (rows, vocab). Greedy when temperature == 0.

    Nucleus sampling needs the probability-sorted prefix that reaches top_p. Sorting the whole
    vocabulary each step was a third of decoding time, so the prefix is taken from the top 1,024
    tokens, which is exact whenever their mass reaches top_p; rows where it does not (very flat
    distributions) fall back to the full sort."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    k = min(_NUCLEUS_CANDIDATES, probs.shape[-1])
    sorted_probs, sorted_idx = probs.topk(k, dim=-1)
    flat = sorted_probs.sum(-1) < top_p
    if bool(flat.any()):
        picks = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
        rows_top, rows_flat = (~flat).nonzero().flatten().tolist(), flat.nonzero().flatten().tolist()
        if rows_top:
            picks[~flat] = _nucleus(sorted_probs[~flat], sorted_idx[~flat], top_p, [generators[r] for r in rows_top])
        full_probs, full_idx = probs[flat].sort(dim=-1, descending=True)
        picks[flat] = _nucleus(full_probs, full_idx, top_p, [generators[r] for r in rows_flat])
        return picks
    return _nucleus(sorted_probs, sorted_idx, top_p, generators)


def nucleus_threshold(logits: torch.Tensor, top_p: torch.Tensor, candidates: int = _NUCLEUS_CANDIDATES) -> torch.Tensor:
    """Per row of (rows, vocab) logits, the smallest logit inside the nucleus (the tokens kept are
    those >= it): the set ``_sample`` draws from, as a threshold for samplers that draw themselves
    (dpo_dist.vllm_nucleus). ``top_p``: (rows,). Taken from the top ``candidates`` tokens, and from
    a full sort only for rows where those hold less than top_p of the mass."""
    p = top_p.unsqueeze(1)
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)

    def last_inside(values: torch.Tensor, lse: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Given descending logits: the nucleus's smallest one, and the mass the values hold."""
        probs = (values - lse).exp()
        above = probs.cumsum(-1) - probs  # the mass of the tokens ranked above each one
        # A token is in the nucleus iff the mass above it is < top_p; the first token always is.
        return values.gather(1, (above < p).sum(-1, keepdim=True).clamp(min=1) - 1), probs.sum(-1)

    top = logits.topk(min(candidates, logits.shape[-1]), dim=-1).values
    threshold, mass = last_inside(top, lse, p)
    short = mass < top_p
    if bool(short.any()):
        full = logits[short].sort(dim=-1, descending=True).values
        threshold[short] = last_inside(full, lse[short], p[short])[0]
    return threshold.squeeze(1)


def _nucleus(sorted_probs: torch.Tensor, sorted_idx: torch.Tensor, top_p: float,
             generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Sample from each row's nucleus, given its probabilities in descending order."""
    cumulative = sorted_probs.cumsum(-1)
    # Keep the smallest prefix whose mass reaches top_p (the token crossing it included).
    sorted_probs = sorted_probs.masked_fill(cumulative - sorted_probs >= top_p, 0.0)
    cumulative = sorted_probs.cumsum(-1)
    # Each row's uniform is drawn on the host from its own CPU generator and then moved to the
    # probabilities' device: the draw is the same on every device (a GPU run samples what the CPU
    # run samples, to float rounding of the logits), and a CUDA generator would give other streams.
    u = torch.stack([torch.rand((), generator=g) for g in generators]).to(cumulative.device) * cumulative[:, -1]
    pick = torch.searchsorted(cumulative, u.unsqueeze(-1)).clamp(max=sorted_probs.shape[-1] - 1)
    return sorted_idx.gather(-1, pick).squeeze(-1)


@torch.no_grad()
def _decode_batch(model, prompts: list[list[int]], ids: list[str], n: int, seed: int, max_new_tokens: int,
                  temperature: float, top_p: float, pad_id: int, stop_ids: set[int]) -> list[list[list[int]]]:
    dev = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p):] = torch.tensor(p)
        attention[i, width - len(p):] = 1
    input_ids, attention = input_ids.to(dev), attention.to(dev)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True)
    past, logits = out.past_key_values, out.logits[:, -1]
    if n > 1:
        past.batch_repeat_interleave(n)
        logits = logits.repeat_interleave(n, dim=0)
        attention = attention.repeat_interleave(n, dim=0)
        positions = positions.repeat_interleave(n, dim=0)
    rows = len(prompts) * n
    # On the host whatever the model's device: _nucleus moves each step's draws to the logits.
    generators = [torch.Generator(device="cpu").manual_seed(row_seed(seed, ids[r // n], r % n)) for r in range(rows)]
    tokens: list[list[int]] = [[] for _ in range(rows)]
    active = list(range(rows))  # rows still generating; finished rows leave the batch and the cache
    next_pos = positions[:, -1:]
    for _ in range(max_new_tokens):
        nxt = _sample(logits, temperature, top_p, [generators[r] for r in active]).cpu().tolist()
        keep = []
        for slot, (r, t) in enumerate(zip(active, nxt)):
            tokens[r].append(t)
            if t not in stop_ids:
                keep.append(slot)
        if not keep:
            break
        if len(keep) < len(active):
            sel = torch.tensor(keep, device=dev)
            past.batch_select_indices(sel)
            attention, next_pos = attention[sel], next_pos[sel]
            nxt = [nxt[k] for k in keep]
            active = [active[k] for k in keep]
        next_pos = next_pos + 1
        attention = torch.cat([attention, torch.ones((len(active), 1), dtype=attention.dtype, device=dev)], dim=-1)
        out = model(input_ids=torch.tensor(nxt, device=dev).unsqueeze(-1), attention_mask=attention,
                    position_ids=next_pos, past_key_values=past, use_cache=True)
        past, logits = out.past_key_values, out.logits[:, -1]
    return [tokens[i * n:(i + 1) * n] for i in range(len(prompts))]


def generate(model, tokenizer, prompts: list[list[int]], ids: list[str], n: int, *, seed: int, max_new_tokens: int,
             temperature: float, top_p: float, batch_rows: int,
             progress: Callable[[int], None] | None = None) -> list[list[Completion]]:
    """k = n completions for each tokenised prompt, in input order. ``batch_rows`` bounds prompts x n
    per forward pass."""
    stop_ids = {tokenizer.eos_token_id}
    per_batch = max(1, batch_rows // n)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[list[Completion]] = [[] for _ in prompts]
    for start in range(0, len(order), per_batch):
        idx = order[start:start + per_batch]
        decoded = _decode_batch(model, [prompts[i] for i in idx], [ids[i] for i in idx], n, seed, max_new_tokens,
                                temperature, top_p, tokenizer.pad_token_id, stop_ids)
        for i, rows in zip(idx, decoded):
            results[i] = [Completion(text=tokenizer.decode([t for t in r if t not in stop_ids], skip_special_tokens=True).strip(),
                                     token_ids=r, finished=bool(r) and r[-1] in stop_ids) for r in rows]
        if progress:
            progress(len(idx))
    return results
