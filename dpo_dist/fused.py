"""Memory-lean replacements for three pieces of the policy's forward pass, in plain torch (any device).

The profile of a training micro-batch (tensors saved for backward per module, a 428-token row,
SmolLM2-135M: 658 MiB) put 45% of them in the MLPs, 17% in the RMSNorms and 11% in the vocabulary
projection:

- ``TokenLogps``: log p(label) of each response token straight from the final hidden states.
  The (tokens, vocab) logits are made a chunk of rows at a time and not kept: backward makes
  each chunk again from the hidden states and the per-row logsumexp. Autograd's version keeps the
  whole logits for backward and, at its start, holds the logits' gradient and the softmax
  besides: three (tokens, vocab) fp32 tensors, 71 MiB each for 377 tokens of a 49k vocabulary.
  The price is the projection run once more in backward: about 4% of a step's FLOPs here, too
  little to show in a measured A/B (docs/measured.md).
- ``SwiGLUDown``: down(silu(gate) * up) keeping only gate and up for backward. Autograd also keeps
  silu(gate) and the product (the down projection's input); both are recomputed, elementwise.
- ``RMSNorm``: keeps its input and 1/rms, not the normalised input as well (17% of the activations).

All three read weights directly, so they need whole weights on every rank: ZeRO stages 0-2, not 3, whose
per-module hooks gather a weight only for its own module's forward (``apply`` is not called there).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

# Rows of logits made at once: 128 x 49k vocab x 4 B = 25 MiB; 128 x 152k (Qwen) = 78 MiB.
CHUNK_ROWS = 128


class TokenLogps(torch.autograd.Function):
    """log softmax(hidden @ weight.T)[row, labels[row]] for each row, chunked over rows.

    hidden: (rows, d) in the weight's dtype; weight: (vocab, d); labels: (rows,) int64.
    Returns (rows,) in at least fp32: the logits are upcast before the softmax, as
    ``losses.token_logps`` does, so bf16 weights give the same figures as the unfused path.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
        ctx.compute_dtype = torch.promote_types(weight.dtype, torch.float32)
        out = torch.empty(hidden.shape[0], dtype=ctx.compute_dtype, device=hidden.device)
        lse = torch.empty_like(out)
        for s in range(0, hidden.shape[0], chunk):
            logits = (hidden[s:s + chunk] @ weight.t()).to(ctx.compute_dtype)
            lse[s:s + chunk] = torch.logsumexp(logits, dim=-1)
            out[s:s + chunk] = logits.gather(1, labels[s:s + chunk, None]).squeeze(1) - lse[s:s + chunk]
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        hidden, weight, labels, lse = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        for s in range(0, hidden.shape[0], ctx.chunk):
            h, g = hidden[s:s + ctx.chunk], grad[s:s + ctx.chunk].to(ctx.compute_dtype)
            # d logp / d logits = onehot(label) - softmax, so grad_logits = g * (onehot - p), in place.
            grad_logits = (h @ weight.t()).to(ctx.compute_dtype).sub_(lse[s:s + ctx.chunk, None]).exp_().mul_(-g[:, None])
            grad_logits[torch.arange(h.shape[0], device=h.device), labels[s:s + ctx.chunk]] += g
            grad_logits = grad_logits.to(weight.dtype)
            if grad_hidden is not None:
                torch.mm(grad_logits, weight, out=grad_hidden[s:s + ctx.chunk])
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.t(), h)
        return grad_hidden, grad_weight, None, None


class SwiGLUDown(torch.autograd.Function):
    """down_proj(silu(gate) * up) for the Llama/Qwen2 MLP, keeping only gate and up for backward."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up, weight)
        return F.linear(F.silu(gate) * up, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up, weight = ctx.saved_tensors
        # The elementwise work in fp32 at least, as torch's own silu backward does for bf16.
        dtype = torch.promote_types(gate.dtype, torch.float32)
        g, u = gate.to(dtype), up.to(dtype)
        sig = torch.sigmoid(g)
        act = g * sig
        grad_weight = None
        if ctx.needs_input_grad[2]:
            prod = (act * u).to(gate.dtype)
            grad_weight = grad.reshape(-1, grad.shape[-1]).t() @ prod.reshape(-1, prod.shape[-1])
        grad_prod = (grad @ weight).to(dtype)
        grad_up = (grad_prod * act).to(up.dtype)
        # silu'(g) = sigmoid(g) * (1 + g * (1 - sigmoid(g)))
        grad_gate = grad_prod.mul_(u).mul_(sig * (1 + g * (1 - sig))).to(gate.dtype)
        return grad_gate, grad_up, grad_weight


class RMSNorm(torch.autograd.Function):
    """weight * (x / rms(x)) computed in fp32 as Llama's and Qwen2's RMSNorm do, keeping x and
    1 / rms(x) for backward; autograd also keeps the normalised x."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.to(torch.float32)
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (xf * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        normed = x.to(torch.float32) * rstd
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * normed.to(x.dtype)).reshape(-1, weight.shape[0]).sum(0).to(weight.dtype)
        # d/dx of x * rstd(x): rstd * (g - normed * mean(g * normed)), g the gradient at normed.
        g = (grad * weight).to(torch.float32)
        grad_x = (g - normed * (g * normed).mean(-1, keepdim=True)).mul_(rstd).to(x.dtype)
        return grad_x, grad_weight, None


# The model classes whose forward these functions reproduce exactly (transformers' source).
SWIGLU_MLPS = {"LlamaMLP", "Qwen2MLP", "Qwen3MLP", "MistralMLP"}
RMS_NORMS = {"LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm"}


def _swiglu_forward(mlp: torch.nn.Module):
    def forward(x: torch.Tensor) -> torch.Tensor:
        # gate_proj and up_proj run as modules (their hooks, their saved input: x, once).
        return SwiGLUDown.apply(mlp.gate_proj(x), mlp.up_proj(x), mlp.down_proj.weight)
    return forward


def _rms_norm_forward(norm: torch.nn.Module):
    return lambda x: RMSNorm.apply(x, norm.weight, norm.variance_epsilon)


def apply(model: torch.nn.Module) -> dict[str, int]:
    """Route ``model``'s SwiGLU MLPs and RMSNorms through the functions above; returns how many of
    each. The modules and their parameters stay as they are (state dict, checkpoints and export
    unchanged): only the instances' ``forward`` is replaced. Other architectures are left alone."""
    n = {"mlp": 0, "rms_norm": 0}
    for module in model.modules():
        kind = type(module).__name__
        # silu: the activation SwiGLUDown hard-codes; a config could name another.
        if kind in SWIGLU_MLPS and type(module.act_fn).__name__ in ("SiLU", "SiLUActivation") and module.down_proj.bias is None:
            module.forward = _swiglu_forward(module)
            n["mlp"] += 1
        elif kind in RMS_NORMS:
            module.forward = _rms_norm_forward(module)
            n["rms_norm"] += 1
    return n


@contextlib.contextmanager
def head_returns_hidden(model: torch.nn.Module):
    """Within the block, the causal LM's output projection returns its input: ``model(...).logits``
    are the final hidden states at the kept positions, for ``TokenLogps`` to project chunk by chunk.
    The model still runs through its own (and DeepSpeed's) forward, hooks included."""
    head = model.get_output_embeddings()
    head.forward = lambda hidden: hidden
    try:
        yield head.weight
    finally:
        del head.forward  # back to the class's forward


def token_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int = CHUNK_ROWS) -> torch.Tensor:
    return TokenLogps.apply(hidden, weight, labels, chunk)
