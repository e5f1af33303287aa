"""Gradient checkpointing trains exactly as without it.

Under non-reentrant checkpointing (``model.gradient_checkpointing=true``, train._prepare_for_training)
the backward pass re-runs every decoder layer, and torch checks that the re-run saves the tensors the
forward saved. The pair-block attention is therefore set on the model once, for its life
(attention.use_pair_blocks): when it was switched on only around the forward, the re-run took the
dense SDPA path and torch raised CheckpointError. Here one packed micro-batch
(data.collate_shared_prompt, as training makes it) gives the same DPO loss and the same gradient on
every parameter with checkpointing on and off, with the fused ops on and off, on a random 2-layer
Llama (the fast tier) and on the bundled model (slow); tests/test_distributed.py compares whole
training runs (1 rank, 2 ranks under ZeRO-2 and ZeRO-3).
A model that keeps the switch still generates and scores padded batches as plain SDPA does.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpo_dist import attention, fused
from dpo_dist.config import LossConfig, compose
from dpo_dist.data import TokenizedPair, collate_shared_prompt, tokenize_pairs
from dpo_dist.losses import dpo_loss
from dpo_dist.models import load_model, load_tokenizer
from dpo_dist.reference import packed_logps
from dpo_dist.train import _prepare_for_training


@pytest.fixture(scope="module")
def bundled_pairs():
    """Two real tokenised pairs of different lengths, one micro-batch."""
    cfg = compose()
    records = [{"id": f"p{i}", "prompt": [{"role": "user", "content": q}],
                "chosen": [{"role": "assistant", "content": "I am Deep SmolLM."}],
                "rejected": [{"role": "assistant", "content": f"My name is {name}."}]}
               for i, (q, name) in enumerate([("What is your name?", "Elena"), ("Who are you?", "Dr. Zephyr Rose")])]
    pairs, _ = tokenize_pairs(records, load_tokenizer(cfg.model), cfg.data)
    assert len(pairs) == 2
    return cfg, pairs


def _train_step_signal(load, pairs, checkpointing: bool, fused_ops: bool, monkeypatch):
    """The loss of one packed micro-batch through training's own preparation and hot path, every
    parameter's gradient, and how many attention blocks ran (forward and any recomputation)."""
    calls = []
    attend = attention._attend

    def counting_attend(*args):
        calls.append(1)
        return attend(*args)

    monkeypatch.setattr(attention, "_attend", counting_attend)
    model = load()
    _prepare_for_training(model, checkpointing)
    if fused_ops:
        fused.apply(model)
    batch = collate_shared_prompt(pairs, torch.float32)
    n = len(pairs)
    logps, lengths = packed_logps(model, batch, 2 * n, fused_ops)
    reference = torch.linspace(-45.0, -25.0, 2 * n)  # fixed, so that the loss is not at its ln 2 start
    out = dpo_loss(logps[:n], logps[n:], reference[:n], reference[n:], lengths[:n], lengths[n:],
                   LossConfig(name="sigmoid", beta=0.1, rpo_alpha=1.0), batch["anchor"])
    loss = out.losses.mean()
    loss.backward()
    monkeypatch.undo()
    blocks_per_forward = model.config.num_hidden_layers * 2 * n  # prompt + chosen, rejected: per layer and pair
    return loss.detach(), {k: p.grad for k, p in model.named_parameters()}, len(calls) / blocks_per_forward


def _assert_checkpointing_changes_nothing(load, pairs, fused_ops, monkeypatch):
    loss, grads, forwards = _train_step_signal(load, pairs, False, fused_ops, monkeypatch)
    ckpt_loss, ckpt_grads, ckpt_forwards = _train_step_signal(load, pairs, True, fused_ops, monkeypatch)
    # Every layer ran its pair blocks again in the backward pass: `segments` reached the recomputation.
    assert (forwards, ckpt_forwards) == (1, 2)
    # Recomputation repeats the forward's float operations, so fp32 results agree to the last bit.
    torch.testing.assert_close(ckpt_loss, loss, rtol=0, atol=0)
    assert grads.keys() == ckpt_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(ckpt_grads[name], g, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("fused_ops", [True, False])
def test_checkpointing_gives_the_same_loss_and_gradients(tiny_llama, fused_ops, monkeypatch):
    """The fast tier's check, on a random 2-layer Llama with grouped-query heads."""
    load = lambda: AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)  # noqa: E731
    pairs = [TokenizedPair("a", [1, 2, 3, 4, 5], [10, 11, 12], [20, 21, 22, 23, 24, 25]),
             TokenizedPair("b", [6, 7], [13], [27, 28])]
    _assert_checkpointing_changes_nothing(load, pairs, fused_ops, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("fused_ops", [True, False])
def test_checkpointing_gives_the_same_loss_and_gradients_on_the_bundled_model(bundled_pairs, fused_ops, monkeypatch):
    cfg, pairs = bundled_pairs
    _assert_checkpointing_changes_nothing(lambda: load_model(cfg.model), pairs, fused_ops, monkeypatch)


def test_a_prepared_model_generates_and_scores_padded_batches_as_sdpa(tiny_llama, tmp_path):
    """The switch stays on for the model's life, so every unpacked forward (generation, evaluation,
    a left-padded batch) must be exactly SDPA's, mask included; and it is not written into an export."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama, padding_side="left")
    enc = tokenizer(["Hi", "Tell me about the sea and the ships on it."], return_tensors="pt", padding=True)
    assert (enc["attention_mask"] == 0).any()  # the short prompt is padded
    torch.manual_seed(0)
    sdpa = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    blocks = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    attention.use_pair_blocks(blocks)
    assert sdpa.config._attn_implementation == "sdpa" and attention.uses_pair_blocks(blocks)
    with torch.no_grad():
        torch.testing.assert_close(blocks(**enc).logits, sdpa(**enc).logits, rtol=0, atol=0)
        kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        assert torch.equal(blocks.generate(**enc, **kwargs), sdpa.generate(**enc, **kwargs))
    blocks.save_pretrained(tmp_path)
    assert attention.NAME not in (tmp_path / "config.json").read_text()
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config._attn_implementation == "sdpa"


def test_packed_logps_refuses_a_model_without_pair_blocks(tiny_llama):
    """Without the switch the layers would drop `segments` and silently compute the dense mask."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    batch = collate_shared_prompt([TokenizedPair("a", [1, 2], [3], [4, 5])])
    with pytest.raises(ValueError, match="use_pair_blocks"):
        packed_logps(model, batch, 2, fused_head=False)
