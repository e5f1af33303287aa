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
  little to show in a measured A/B (docs/benchmark.md).
- ``SwiGLUDown``: down(silu(gate) * up) keeping only gate and up for backward. Autograd also keeps
  silu(gate) and the product (the down projection's input); both are recomputed, elementwise.
- ``RMSNorm``: keeps its input and 1/rms, not the normalised input as well (17% of the activations).

Each runs inside the forward of the module that owns its weight (the head for ``TokenLogps``, the
MLP's ``down_proj`` for ``SwiGLUDown``, the norm for ``RMSNorm``). Under ZeRO-3 a weight is whole only
while its own module runs: DeepSpeed's hooks gather it before that module's forward and again before
its backward, and release it after each. Reading ``down_proj.weight`` from the MLP's forward, or the
head's weight after the model's forward, may meet an empty partition there, so nothing here does.
It may also not: a weight DeepSpeed still holds gathered (the tied input embedding, kept for reuse)
reads fine from the wrong place, so only the numbers catch a mix-up
(tests/test_fused_zero3_bf16.py).
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
        rows, vocab = hidden.shape[0], weight.shape[0]
        g = grad.to(ctx.compute_dtype)
        # By blocks of the vocabulary, every row at once (the forward's logsumexp gives each block's
        # softmax): a block's weight gradient is then one matmul over all rows, rounded once as
        # autograd's is. Summing row chunks into a bf16 weight gradient instead rounds once per
        # chunk, and its error grew with the rows (1.8% at 16k rows against autograd's 0.2%). The
        # block is as large as the forward's chunk: chunk x vocab logits.
        block = max(1, ctx.chunk * vocab // max(rows, 1))
        grad_hidden = hidden.new_zeros(hidden.shape, dtype=ctx.compute_dtype) if ctx.needs_input_grad[0] else None
        grad_weight = torch.empty_like(weight) if ctx.needs_input_grad[1] else None
        for s in range(0, vocab, block):
            w = weight[s:s + block]
            # d logp / d logits = onehot(label) - softmax, so grad_logits = g * (onehot - p), in place.
            grad_logits = (hidden @ w.t()).to(ctx.compute_dtype).sub_(lse[:, None]).exp_().mul_(-g[:, None])
            hit = ((labels >= s) & (labels < s + w.shape[0])).nonzero().squeeze(1)
            grad_logits[hit, labels[hit] - s] += g[hit]
            grad_logits = grad_logits.to(weight.dtype)
            if grad_hidden is not None:
                grad_hidden += grad_logits @ w  # each block's share rounded once, the sum kept in fp32
            if grad_weight is not None:
                torch.mm(grad_logits.t(), hidden, out=grad_weight[s:s + block])
        return None if grad_hidden is None else grad_hidden.to(hidden.dtype), grad_weight, None, None


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
        # All three projections run as modules (their hooks; x saved once, for gate and up). down_proj
        # takes (gate, up) and forms silu(gate) * up itself (``_down_of_gate_and_up``).
        return mlp.down_proj(mlp.gate_proj(x), mlp.up_proj(x))
    return forward


def _down_of_gate_and_up(down_proj: torch.nn.Module):
    return lambda gate, up: SwiGLUDown.apply(gate, up, down_proj.weight)


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
            module.down_proj.forward = _down_of_gate_and_up(module.down_proj)
            n["mlp"] += 1
        elif kind in RMS_NORMS:
            module.forward = _rms_norm_forward(module)
            n["rms_norm"] += 1
    return n


# Causal LMs whose logits are the head's bias-free output and nothing more: TokenLogps reproduces
# them. Others scale or cap the logits after the head (Gemma's softcapping, Cohere's logit_scale).
PLAIN_HEADS = {"LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM"}


def head_supported(model: torch.nn.Module) -> bool:
    """Whether ``head_returns_token_logps`` computes exactly what ``model``'s own logits give (a
    DeepSpeed engine is judged by the module it wraps)."""
    module = getattr(model, "module", model)
    return type(module).__name__ in PLAIN_HEADS and getattr(module.get_output_embeddings(), "bias", None) is None


@contextlib.contextmanager
def head_returns_token_logps(model: torch.nn.Module, labels: torch.Tensor, chunk: int = CHUNK_ROWS):
    """Within the block, the causal LM's output projection returns log p(label) of each kept position
    (``TokenLogps``) instead of logits: ``model(..., logits_to_keep=positions).logits`` is then a
    (1, rows) tensor, with ``labels`` (rows,) the token each kept position predicts. The projection
    runs inside the head's own forward, hooks included, so ZeRO-3 gathers its weight (tied to the
    input embedding or not) for the forward and again for the backward."""
    head = model.get_output_embeddings()
    head.forward = lambda hidden: TokenLogps.apply(hidden.reshape(-1, hidden.shape[-1]), head.weight, labels,
                                                   chunk).reshape(hidden.shape[:-1])
    try:
        yield
    finally:
        del head.forward  # back to the class's forward; the backward needs only the autograd graph


def token_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int = CHUNK_ROWS) -> torch.Tensor:
    return TokenLogps.apply(hidden, weight, labels, chunk)
