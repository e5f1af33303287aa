"""The training hot path's prefix-shared packing scores exactly what the stacked layout scores.

``collate_shared_prompt`` puts a micro-batch in one row with each prompt once; the attention mask
and position ids give every response token the context it has in ``collate_pairs``' stacked,
right-padded rows, and logits are computed only where a response token is predicted. These tests pin
that equivalence on real models: the same sequence log-probs, the same DPO loss and the same gradient
as the stacked forward (to float32 rounding), plus the layout itself on a hand-made batch.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

from dpo_dist import attention
from dpo_dist.config import LossConfig
from dpo_dist.data import TokenizedPair, collate_pairs, collate_shared_prompt, mirror_anchors
from dpo_dist.losses import dpo_loss, sequence_logps
from dpo_dist.reference import packed_logps

# Prompts and responses of different lengths, a one-token response, and a rejected response longer
# than its chosen one, so that padding, shared positions and the first-token logits are all exercised.
PAIRS = [
    TokenizedPair("a", [1, 2, 3, 4, 5], [10, 11, 12], [20, 21, 22, 23, 24, 25, 26]),
    TokenizedPair("b", [6, 7], [13], [27, 28]),
    TokenizedPair("c", [8, 9, 30, 31, 32, 33, 34, 35], [14, 15, 16, 17, 18, 19], [29, 36, 37]),
]


def test_layout_on_a_hand_made_batch():
    """Pair 0: prompt [1 2] chosen [3 4] rejected [5]; pair 1: prompt [6] chosen [7] rejected [8 9]."""
    b = collate_shared_prompt([TokenizedPair("x", [1, 2], [3, 4], [5]), TokenizedPair("y", [6], [7], [8, 9])])
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9]]
    # The rejected response restarts at the prompt's end: positions as in its own stacked row.
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 2, 0, 1, 1, 2]]
    allowed = (b["attention_mask"][0, 0] == 0).int().tolist()
    assert allowed == [
        [1, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0, 0],  # chosen: its prompt and itself
        [1, 1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0, 0, 0],  # rejected: its prompt and itself, not the chosen response
        [0, 0, 0, 0, 0, 1, 0, 0, 0],  # the next pair sees nothing of the first
        [0, 0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 1, 0, 1, 0],
        [0, 0, 0, 0, 0, 1, 0, 1, 1],
    ]
    # The last prompt position (1 for pair 0, 5 for pair 1) predicts both first response tokens.
    assert b["logit_positions"].tolist() == [1, 2, 1, 5, 5, 7]
    assert b["labels"].tolist() == [3, 4, 5, 7, 8, 9]
    assert b["sequence_index"].tolist() == [0, 0, 2, 1, 3, 3]  # chosen i -> i, rejected i -> 2 + i
    assert b["segments"].tolist() == [[0, 2, 2, 1], [5, 1, 1, 2]]  # start, prompt, chosen, rejected


def _stacked(model, pairs):
    b = collate_pairs(pairs, pad_id=0)
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    return sequence_logps(logits, b["input_ids"], b["loss_mask"])


def _packed(model, pairs):
    """The hot path itself: pair-block attention and the full-vocabulary head (the fused head has
    tests of its own in test_fused.py). The switch stays on the model, as in training: the stacked
    forwards after the first packed one run with it, through its SDPA fallback."""
    attention.use_pair_blocks(model)
    return packed_logps(model, collate_shared_prompt(pairs), 2 * len(pairs), fused_head=False)


def test_pair_block_attention_equals_the_dense_mask():
    """Attention per pair (prompt + chosen causal, rejected against prompt and itself) gives the
    outputs and gradients of one SDPA call under the row's dense mask, with grouped-query heads, an
    anchor (no rejected side) and a one-token response."""
    pairs = [TokenizedPair("a", [1, 2, 3], [4, 5], [6, 7, 8, 9]), TokenizedPair("b", [1], [2], [3]),
             TokenizedPair("z", [5, 6], [7, 8, 9], [7, 8, 9], anchor=True), TokenizedPair("c", [4, 5], [6, 7, 8], [9])]
    b = collate_shared_prompt(pairs)
    length = b["input_ids"].shape[1]

    class Layer:  # what transformers' SDPA path reads from the attention module
        num_key_value_groups, is_causal, training = 2, True, True

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, heads, length, 8, requires_grad=True) for heads in (4, 2, 2))
    results = []
    for segments in (None, attention.segments_of(b)):
        out, _ = attention.pair_block_attention(Layer(), q, k, v, b["attention_mask"], scaling=0.3, segments=segments)
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(), (q, k, v))
        results.append((out, grads))
    (dense, dense_grads), (blocks, block_grads) = results
    assert dense.shape == blocks.shape == (1, length, 4, 8)
    torch.testing.assert_close(blocks, dense, rtol=1e-5, atol=1e-6)
    for a, g in zip(dense_grads, block_grads):
        torch.testing.assert_close(g, a, rtol=1e-5, atol=1e-6)


def _loss_and_grads(model, logps_fn, pairs):
    """The DPO loss of a micro-batch (reference log-probs fixed) and its gradient on every parameter."""
    model.zero_grad()
    logps, lengths = logps_fn(model, pairs)
    n = len(pairs)
    reference = torch.linspace(-40.0, -20.0, 2 * n)
    out = dpo_loss(logps[:n], logps[n:], reference[:n], reference[n:], lengths[:n], lengths[n:],
                   LossConfig(name="sigmoid", beta=0.1, rpo_alpha=1.0))
    out.losses.mean().backward()
    return logps.detach(), lengths, out.losses.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


def _assert_same_training_signal(model, pairs):
    logps_a, len_a, loss_a, grads_a = _loss_and_grads(model, _stacked, pairs)
    logps_b, len_b, loss_b, grads_b = _loss_and_grads(model, _packed, pairs)
    assert torch.equal(len_a, len_b)
    assert torch.allclose(logps_a, logps_b, rtol=1e-5, atol=1e-4), (logps_a, logps_b)
    assert torch.allclose(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    for name in grads_a:
        diff = (grads_a[name] - grads_b[name]).norm() / grads_a[name].norm().clamp(min=1e-12)
        assert diff < 1e-4, (name, diff.item())


def test_packed_equals_stacked_on_a_random_llama(tiny_llama):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).train()
    _assert_same_training_signal(model, PAIRS)
    _assert_same_training_signal(model, PAIRS[1:2])  # a micro-batch of one


def test_packed_equals_stacked_on_the_bundled_model():
    """The real 135M model on real tokenised pairs (the chat template's prompts, EOS-terminated answers)."""
    from dpo_dist.config import compose
    from dpo_dist.data import tokenize_pairs
    from dpo_dist.models import load_model, load_tokenizer

    cfg = compose()
    tokenizer = load_tokenizer(cfg.model)
    records = [{"id": f"p{i}", "prompt": [{"role": "user", "content": q}],
                "chosen": [{"role": "assistant", "content": "I am Deep SmolLM, an AI assistant."}],
                "rejected": [{"role": "assistant", "content": f"My name is {name}, and I write poems about the sea."}]}
               for i, (q, name) in enumerate([("What is your name?", "Elena"), ("Who are you, really?", "Dr. Zephyr")])]
    pairs, _ = tokenize_pairs(records, tokenizer, cfg.data)
    model = load_model(cfg.model).train()
    _assert_same_training_signal(model, pairs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mask_is_additive_in_the_model_dtype(dtype):
    mask = collate_shared_prompt(PAIRS[:1], mask_dtype=dtype)["attention_mask"]
    assert mask.dtype == dtype
    assert set(mask.unique().tolist()) == {0.0, torch.finfo(dtype).min}


def test_an_anchor_runs_once_and_trains_only_its_nll_term(tiny_llama):
    """An anchor (chosen == rejected) leaves its rejected copy out of the row; mirroring the chosen
    log-probs into the rejected slot gives the stacked layout's loss and gradient, which for an
    anchor is the NLL term's alone (the two copies' DPO gradients cancel)."""
    anchor = TokenizedPair("z", [1, 2], [3, 4], [3, 4], anchor=True)
    b = collate_shared_prompt([anchor, TokenizedPair("y", [6], [7], [8, 9])])
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 6, 7, 8, 9]]
    assert b["sequence_index"].tolist() == [0, 0, 1, 3, 3]  # sequence 2, the anchor's rejected, is empty
    assert b["anchor"].tolist() == [True, False]

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).train()
    pairs = [PAIRS[0], TokenizedPair("d", [8, 9, 30], [14, 15, 16], [14, 15, 16], anchor=True), PAIRS[1]]
    mask = torch.tensor([p.anchor for p in pairs])
    cfg = LossConfig(name="sigmoid", beta=0.1, rpo_alpha=1.0)
    reference = torch.linspace(-40.0, -20.0, 6)
    reference = mirror_anchors(reference, mask)

    def loss_and_grads(logps_fn, use_mask):
        model.zero_grad()
        logps, lengths = logps_fn(model, pairs)
        if use_mask:
            logps, lengths = mirror_anchors(logps, mask), mirror_anchors(lengths, mask)
        out = dpo_loss(logps[:3], logps[3:], reference[:3], reference[3:], lengths[:3], lengths[3:], cfg,
                       mask if use_mask else None)
        out.losses.mean().backward()
        return logps.detach(), out.losses.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}

    logps_a, loss_a, grads_a = loss_and_grads(_stacked, False)
    logps_b, loss_b, grads_b = loss_and_grads(_packed, True)
    assert torch.allclose(logps_a, logps_b, rtol=1e-5, atol=1e-4)
    # The stacked anchor's loss holds the constant -log sigmoid(0); the masked one is the NLL alone.
    nll = -logps_b[1] / 3
    assert torch.allclose(loss_b[1], nll) and torch.allclose(loss_a[1] - loss_b[1], torch.log(torch.tensor(2.0)), atol=1e-5)
    for name in grads_a:
        diff = (grads_a[name] - grads_b[name]).norm() / grads_a[name].norm().clamp(min=1e-12)
        assert diff < 1e-4, (name, diff.item())


@pytest.mark.parametrize("fused_head", [True, False])
def test_reference_scoring_equals_the_stacked_layout(tiny_llama, fused_head):
    """reference.score_pairs packs pairs as training does; its log-probs are the stacked forward's,
    returned in input order whatever the grouping, with an anchor's rejected side copied from chosen."""
    from dpo_dist.reference import score_pairs

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    pairs = PAIRS + [TokenizedPair("d", [8, 9, 30], [14, 15, 16], [14, 15, 16], anchor=True)]
    with torch.no_grad():
        expected, _ = _stacked(model, pairs)
    n = len(pairs)
    for group in (1, 2, 3):
        chosen, rejected = score_pairs(model, pairs, group, fused_head=fused_head)
        assert torch.allclose(chosen, expected[:n], rtol=1e-5, atol=1e-4), group
        assert torch.allclose(rejected, expected[n:], rtol=1e-5, atol=1e-4), group
        assert rejected[3] == chosen[3]
