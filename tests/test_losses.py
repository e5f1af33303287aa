"""The DPO objectives against hand-computed values, a naive re-implementation, and their gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

from dpo_dist.config import LossConfig
from dpo_dist.losses import dpo_loss, sequence_logps


def _loss(name="sigmoid", beta=0.1, ls=0.0, rpo=0.0):
    return LossConfig(name=name, beta=beta, label_smoothing=ls, rpo_alpha=rpo)


def _call(pc, pr, rc, rr, cfg, lc=None, lr=None):
    t = lambda v: torch.tensor(v, dtype=torch.float64)
    lc = t(lc if lc is not None else [1.0] * len(pc))
    lr = t(lr if lr is not None else [1.0] * len(pc))
    return dpo_loss(t(pc), t(pr), t(rc), t(rr), lc, lr, cfg)


def test_sigmoid_is_ln2_when_policy_equals_reference():
    out = _call([-5.0, -12.0], [-7.0, -3.0], [-5.0, -12.0], [-7.0, -3.0], _loss())
    assert torch.allclose(out.losses, torch.full((2,), math.log(2), dtype=torch.float64))
    assert torch.all(out.chosen_rewards == 0) and torch.all(out.rejected_rewards == 0)


def test_sigmoid_hand_computed():
    """chosen log-ratio = -4 - (-5) = 1, rejected = -9 - (-7) = -2, h = 3, beta = 0.5:
    loss = -log sigmoid(1.5) = log(1 + e^-1.5) = 0.201413; rewards 0.5 and -1.0."""
    out = _call([-4.0], [-9.0], [-5.0], [-7.0], _loss(beta=0.5))
    assert out.losses.item() == pytest.approx(math.log1p(math.exp(-1.5)), abs=1e-12)
    assert out.losses.item() == pytest.approx(0.201413, abs=1e-6)
    assert out.chosen_rewards.item() == pytest.approx(0.5)
    assert out.rejected_rewards.item() == pytest.approx(-1.0)


def test_conservative_dpo_hand_computed():
    """h = 3, beta = 0.5, eps = 0.1: 0.9 * log(1 + e^-1.5) + 0.1 * log(1 + e^1.5) = 0.351413."""
    out = _call([-4.0], [-9.0], [-5.0], [-7.0], _loss(beta=0.5, ls=0.1))
    expected = 0.9 * math.log1p(math.exp(-1.5)) + 0.1 * math.log1p(math.exp(1.5))
    assert out.losses.item() == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(0.351413, abs=1e-6)


def test_ipo_uses_length_averaged_logratios():
    """chosen log-ratio 2 over 4 tokens = 0.5, rejected -3 over 3 tokens = -1: h = 1.5;
    beta = 0.25 gives target 1/(2 beta) = 2, loss = (1.5 - 2)^2 = 0.25."""
    out = _call([-8.0], [-9.0], [-10.0], [-6.0], _loss("ipo", beta=0.25), lc=[4.0], lr=[3.0])
    assert out.losses.item() == pytest.approx(0.25)


def test_hinge_hand_computed():
    """h = 3: beta 0.1 gives relu(1 - 0.3) = 0.7; beta 0.5 gives relu(1 - 1.5) = 0."""
    assert _call([-4.0], [-9.0], [-5.0], [-7.0], _loss("hinge", beta=0.1)).losses.item() == pytest.approx(0.7)
    assert _call([-4.0], [-9.0], [-5.0], [-7.0], _loss("hinge", beta=0.5)).losses.item() == 0.0


def test_rpo_adds_length_normalised_chosen_nll():
    """policy chosen log-prob -6 over 3 tokens: NLL per token 2; alpha 0.5 adds 1.0 to ln 2."""
    out = _call([-6.0], [-7.0], [-6.0], [-7.0], _loss(rpo=0.5), lc=[3.0], lr=[2.0])
    assert out.losses.item() == pytest.approx(math.log(2) + 1.0)


def _naive(pc, pr, rc, rr, lc, lr, cfg):
    """Straight from the papers, one example at a time, in Python floats."""
    out = []
    for i in range(len(pc)):
        if cfg.name == "ipo":
            h = (pc[i] - rc[i]) / lc[i] - (pr[i] - rr[i]) / lr[i]
            loss = (h - 1 / (2 * cfg.beta)) ** 2
        else:
            h = (pc[i] - rc[i]) - (pr[i] - rr[i])
            if cfg.name == "hinge":
                loss = max(0.0, 1 - cfg.beta * h)
            else:
                sig = lambda z: 1 / (1 + math.exp(-z))
                eps = cfg.label_smoothing
                loss = -(1 - eps) * math.log(sig(cfg.beta * h)) - eps * math.log(sig(-cfg.beta * h))
        out.append(loss + cfg.rpo_alpha * (-pc[i] / lc[i]))
    return out


@pytest.mark.parametrize("cfg", [_loss(), _loss(beta=0.3, ls=0.2), _loss("ipo", 0.2), _loss("hinge", 0.05),
                                 _loss(beta=0.1, rpo=1.0), _loss("ipo", 0.5, rpo=0.3)])
def test_matches_naive_implementation_on_random_inputs(cfg):
    g = torch.Generator().manual_seed(0)
    n = 64
    pc, pr, rc, rr = (-torch.rand(n, generator=g, dtype=torch.float64) * 50 for _ in range(4))
    lc = torch.randint(1, 40, (n,), generator=g).double()
    lr = torch.randint(1, 40, (n,), generator=g).double()
    out = dpo_loss(pc, pr, rc, rr, lc, lr, cfg)
    expected = torch.tensor(_naive(*(x.tolist() for x in (pc, pr, rc, rr, lc, lr)), cfg), dtype=torch.float64)
    assert torch.allclose(out.losses, expected, atol=1e-9)


@pytest.mark.parametrize("cfg", [_loss(), _loss(ls=0.1), _loss("ipo", 0.1), _loss("hinge", 0.1), _loss(rpo=1.0)])
def test_gradient_raises_chosen_and_lowers_rejected(cfg):
    pc = torch.tensor([-10.0], dtype=torch.float64, requires_grad=True)
    pr = torch.tensor([-10.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-10.0], dtype=torch.float64)
    one = torch.tensor([5.0], dtype=torch.float64)
    dpo_loss(pc, pr, ref, ref, one, one, cfg).losses.sum().backward()
    # Gradient descent moves opposite the gradient: chosen up, rejected down.
    assert pc.grad.item() < 0
    assert pr.grad.item() > 0


@pytest.mark.parametrize("cfg", [_loss(rpo=1.0), _loss("ipo", 0.5, rpo=0.3), _loss("hinge", 0.1, rpo=2.0), _loss()])
def test_an_anchor_row_is_its_nll_term_alone(cfg):
    """A row marked anchor (chosen == rejected) has no preference term: its loss is rpo_alpha times
    the chosen side's mean NLL (zero without an NLL term); the other rows are untouched."""
    pc, rc, lc = [-12.0, -30.0], [-10.0, -28.0], [4.0, 6.0]
    anchor = torch.tensor([False, True])
    plain = _call(pc, [-20.0, -30.0], rc, [-15.0, -28.0], cfg, lc, [5.0, 6.0])
    t = lambda v: torch.tensor(v, dtype=torch.float64)
    out = dpo_loss(t(pc), t([-20.0, -30.0]), t(rc), t([-15.0, -28.0]), t(lc), t([5.0, 6.0]), cfg, anchor)
    assert out.losses[0] == plain.losses[0]
    assert out.losses[1].item() == pytest.approx(cfg.rpo_alpha * 30.0 / 6.0, abs=1e-12)


def test_sequence_logps_matches_log_softmax_and_ignores_masked_tokens():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 7, 11, generator=g)
    ids = torch.randint(0, 11, (2, 7), generator=g)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1, 1]])
    logps, n = sequence_logps(logits, ids, mask)
    full = F.log_softmax(logits, -1)
    expected = [sum(full[b, t - 1, ids[b, t]] for t in range(1, 7) if mask[b, t]) for b in range(2)]
    assert torch.allclose(logps, torch.stack(expected), atol=1e-5)
    assert n.tolist() == [3.0, 5.0]


def test_masking_prompt_and_padding_tokens_changes_nothing(tiny_llama):
    """A real model's score of a fixed prompt + response does not depend on the padding token ids,
    and the logits that predict prompt tokens or positions after EOS never enter the sum."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    prompt, response = [5, 6, 7, 8], [9, 10, 11]
    mask = torch.tensor([[0] * 4 + [1] * 3 + [0] * 3])
    scores = []
    for pad in (0, 123, 456):
        ids = torch.tensor([prompt + response + [pad] * 3])
        attn = torch.tensor([[1] * 7 + [0] * 3])
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=attn).logits
        scores.append(sequence_logps(logits, ids, mask)[0])
    assert torch.allclose(scores[0], scores[1]) and torch.allclose(scores[0], scores[2])
    # Logits at masked positions (prompt, padding) do not enter the sum at all.
    with torch.no_grad():
        ids = torch.tensor([prompt + response + [0] * 3])
        logits = model(input_ids=ids, attention_mask=torch.tensor([[1] * 7 + [0] * 3])).logits
    tampered = logits.clone()
    tampered[:, :3] = torch.randn_like(tampered[:, :3])  # predictions of prompt tokens 1..3
    tampered[:, 7:] = torch.randn_like(tampered[:, 7:])  # predictions after the EOS
    assert torch.allclose(sequence_logps(logits, ids, mask)[0], sequence_logps(tampered, ids, mask)[0])
