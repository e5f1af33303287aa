"""The DPO family of objectives, in plain torch. Nothing here knows about ranks or engines.

Notation (Rafailov et al. 2023, "Direct Preference Optimization"): for a prompt x with chosen
response y_w and rejected y_l, log pi(y|x) is the SUM of the response tokens' log-probs (prompt and
padding masked, the end-of-turn/EOS token included, since stopping is part of the behaviour). With

    h = [log pi(y_w|x) - log ref(y_w|x)] - [log pi(y_l|x) - log ref(y_l|x)]

the per-example losses are
    sigmoid (DPO):            -log sigmoid(beta h)
    conservative DPO (eps):   -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
    ipo (Azar et al. 2023):   (h' - 1 / (2 beta))^2, h' from length-AVERAGED log-probs (as TRL and
                              LLaMA-Factory do; summed log-probs make the 1/(2 beta) target
                              length-dependent)
    hinge (SLiC, Zhao 2023):  relu(1 - beta h)
plus, when rpo_alpha > 0, alpha * (mean token NLL of y_w) (Iterative RPO, arXiv 2404.19733), which
keeps the chosen likelihood from falling while the margin grows.

The implicit reward of a response is beta * (log pi(y|x) - log ref(y|x)).
At policy == reference, h = 0 and the sigmoid loss is ln 2 = 0.6931.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dpo_dist.config import LossConfig


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(labels[t] | ...) for each position, without materialising a (batch, seq, vocab) log_softmax.

    logits: (batch, seq, vocab) already aligned with labels (position t predicts labels[t]).
    labels: (batch, seq) token ids; any value is fine where the mask will be 0.
    Returns (batch, seq) in at least float32 (bf16 logits are upcast before the softmax).
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    picked = torch.gather(logits, -1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the response tokens of each sequence.

    logits: (batch, seq, vocab) from the model on input_ids.
    input_ids: (batch, seq).
    loss_mask: (batch, seq), 1 on response tokens (EOS included), 0 on prompt and padding.
    Returns (logps (batch,), num_tokens (batch,)).
    """
    # The logit at position t predicts token t+1: shift so both line up.
    logps = token_logps(logits[:, :-1], input_ids[:, 1:])
    mask = loss_mask[:, 1:].to(logps.dtype)
    return (logps * mask).sum(-1), mask.sum(-1)


def packed_sequence_logps(logits: torch.Tensor, labels: torch.Tensor, sequence_index: torch.Tensor,
                          num_sequences: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``sequence_logps`` for logits computed only where a response token is predicted (the
    prefix-shared layout of ``data.collate_shared_prompt``): prompt and padding positions never
    reach the vocabulary projection.

    logits: (num_tokens, vocab), row k predicting labels[k].
    labels, sequence_index: (num_tokens,); sequence_index[k] says whose token labels[k] is.
    Returns (logps (num_sequences,), num_tokens (num_sequences,)), both float32.
    """
    return sum_by_sequence(token_logps(logits, labels), sequence_index, num_sequences)


def sum_by_sequence(logps: torch.Tensor, sequence_index: torch.Tensor, num_sequences: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs (num_tokens,) summed per sequence, and each sequence's token count."""
    summed = torch.zeros(num_sequences, dtype=logps.dtype, device=logps.device).index_add(0, sequence_index, logps)
    counts = torch.bincount(sequence_index, minlength=num_sequences).to(logps.dtype)
    return summed, counts


@dataclass
class DPOOutput:
    losses: torch.Tensor  # (batch,) per-example loss, including the RPO term
    chosen_rewards: torch.Tensor  # (batch,) beta * (log pi - log ref) of chosen, detached
    rejected_rewards: torch.Tensor  # (batch,)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    cfg: LossConfig,
    anchor: torch.Tensor | None = None,
) -> DPOOutput:
    """All inputs are (batch,): summed response log-probs and response token counts. ``anchor``
    (bool, (batch,)) marks rows whose two sides are the same answer: they carry no preference, so
    only the NLL term counts for them (without it their loss would be a constant such as log 2)."""
    beta = cfg.beta
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps

    if cfg.name == "sigmoid":
        h = chosen_logratios - rejected_logratios
        losses = -(1 - cfg.label_smoothing) * F.logsigmoid(beta * h) - cfg.label_smoothing * F.logsigmoid(-beta * h)
    elif cfg.name == "ipo":
        h = chosen_logratios / chosen_lengths.clamp(min=1) - rejected_logratios / rejected_lengths.clamp(min=1)
        losses = (h - 1 / (2 * beta)) ** 2
    elif cfg.name == "hinge":
        h = chosen_logratios - rejected_logratios
        losses = torch.relu(1 - beta * h)
    else:
        raise ValueError(f"loss.name: unknown loss {cfg.name!r}")

    if anchor is not None:
        losses = torch.where(anchor, torch.zeros_like(losses), losses)
    if cfg.rpo_alpha > 0:
        chosen_nll = -policy_chosen_logps / chosen_lengths.clamp(min=1)
        losses = losses + cfg.rpo_alpha * chosen_nll

    return DPOOutput(
        losses=losses,
        chosen_rewards=(beta * chosen_logratios).detach(),
        rejected_rewards=(beta * rejected_logratios).detach(),
    )
