"""Attention for prefix-shared rows (data.collate_shared_prompt) that skips the masked-out blocks.

A packed row holds several pairs, [prompt chosen rejected] each, under one dense (row x row) mask.
SDPA's kernels compute every score the mask later removes: scores across pairs, rejected against
chosen, and the upper triangle (only ``is_causal`` lets them skip it). On the bundled model with two
pairs per row that was about three quarters of the attention work. Here each pair is attended
separately, in two calls:

- prompt + chosen as one causal sequence (``is_causal``: its upper triangle is never computed);
- the rejected queries against the prompt's and its own keys, with a small (R x (P + R)) mask.

Every token sees exactly the keys the dense mask lets it see, so the result is the same up to float
rounding (tests/test_prefix_sharing.py). The layer calls this through transformers' attention
interface; ``segments`` rides along in the model's keyword arguments, and without it (any other
forward: generation, evaluation) the layer runs transformers' own SDPA attention on SDPA's mask.

So a model is switched once, when it is prepared (``use_pair_blocks``), and keeps the switch for its
life. Switching only around a forward pass breaks gradient checkpointing: the backward re-runs each
layer after the switch is undone, the dense path saves other tensors than the forward did, and
torch raises CheckpointError (tests/test_checkpointing.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from dpo_dist import dist

NAME = "dpo_dist_pair_blocks"


def segments_of(batch: dict) -> list[tuple[int, int, int, int, torch.Tensor | None]]:
    """(start, prompt, chosen, rejected length, rejected-query mask) per pair of a packed row, from
    ``batch["segments"]`` (collate_shared_prompt). The rejected queries' mask is cut from the row's
    dense mask (their rows; the prompt's and their own columns), so both paths apply one mask; it is
    cut once per forward, not per layer."""
    dense = batch["attention_mask"][0, 0]
    out = []
    for start, p, c, r in batch["segments"].tolist():
        mask = None
        if r:
            rows = dense[start + p + c:start + p + c + r]
            mask = torch.cat([rows[:, start:start + p], rows[:, start + p + c:start + p + c + r]], dim=1)
        out.append((start, p, c, r, mask))
    return out


# SDPA shares key/value heads across query heads itself from torch 2.5; with a mask, CUDA's fused
# kernels do not, so the masked call repeats them (as transformers' SDPA path does).
_SDPA_GQA = dist.torch_at_least(2, 5)


def _attend(query, key, value, mask, scaling, groups, dropout):
    gqa = {}
    if groups > 1 and mask is None and _SDPA_GQA:
        gqa = {"enable_gqa": True}
    elif groups > 1:
        # Grouped-query attention: each key/value head serves `groups` query heads.
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, is_causal=mask is None,
                                          scale=scaling, **gqa)


def pair_block_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, segments=None, **kwargs):
    """transformers' attention-function signature: (batch, heads, seq, dim) in, (batch, seq, heads,
    dim) out, and no attention weights."""
    if segments is None:
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, dropout=dropout,
                                               scaling=scaling, **kwargs)
    groups = query.shape[1] // key.shape[1]
    pieces = []
    for start, p, c, r, mask in segments:
        head = slice(start, start + p + c)
        pieces.append(_attend(query[:, :, head], key[:, :, head], value[:, :, head], None, scaling, groups, dropout))
        if r:
            own = slice(start + p + c, start + p + c + r)
            k = torch.cat([key[:, :, start:start + p], key[:, :, own]], dim=2)
            v = torch.cat([value[:, :, start:start + p], value[:, :, own]], dim=2)
            pieces.append(_attend(query[:, :, own], k, v, mask, scaling, groups, dropout))
    return torch.cat(pieces, dim=2).transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, pair_block_attention)
# masking_utils builds no mask for an implementation name it does not know: it hands the 2-D padding
# mask through unchanged, and the SDPA fallback misreads it (left-padded generation gets other
# logits). With SDPA's mask builder the fallback is exactly SDPA; a packed row's 4-D mask passes
# through either way.
AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def use_pair_blocks(model) -> None:
    """Route the model's attention through ``pair_block_attention`` from now on (a DeepSpeed engine or
    the model itself). Forwards without ``segments`` still run SDPA, so this is set once, when the
    model is prepared, and never undone: a checkpointed layer's recomputation in the backward pass
    must take the path its forward took."""
    getattr(model, "module", model).config._attn_implementation = NAME


def uses_pair_blocks(model) -> bool:
    return getattr(model, "module", model).config._attn_implementation == NAME
