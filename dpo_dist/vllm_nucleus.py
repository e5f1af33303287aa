"""Nucleus (top-p) sampling for vLLM on the CPU without sorting the vocabulary every step.

vLLM's CPU sampler applies top-p by sorting the whole batch's logits at every decoding step
(``apply_top_k_top_p_pytorch``: ``logits.sort`` over rows x vocabulary, whenever any request has
top_p < 1). For the bundled model that sort (192 rows x 49,152) took longer than the model's forward,
and was why vLLM decoded at 0.7x our hf backend, which takes the nucleus from the top 1,024 tokens
(dpo_dist/sampling.py). This processor does the same inside vLLM, through its public custom
logits-processor API: requests carry their top_p in ``SamplingParams.extra_args[TOP_P_KEY]`` with
vLLM's own top_p left at 1.0, so vLLM's sampler has nothing to sort and only draws the token.

Argmax-invariant, so vLLM applies it after temperature and before its own top-k/top-p: masking the
scaled logits outside the nucleus to -inf keeps exactly the tokens vLLM's top-p keeps (those whose
higher-ranked tokens hold less than top_p of the mass), ties at the boundary aside.

Imported by vLLM in its engine process (``LLM(logits_processors=[FQCN])``), so this module imports
vLLM and is only loaded where vLLM is installed. Used on the CPU only (generate.VLLMBackend): on GPUs
the official vllm defaults to its V2 model runner, whose logits processors have another interface,
and sorts fast anyway.
"""

from __future__ import annotations

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from dpo_dist.sampling import nucleus_threshold

TOP_P_KEY = "dpo_dist_top_p"
FQCN = f"{__name__}:NucleusTopP"  # vLLM takes "module:Class"


class NucleusTopP(LogitsProcessor):
    """Per-request top-p from ``SamplingParams.extra_args[TOP_P_KEY]`` (absent: no nucleus)."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        p = (sampling_params.extra_args or {}).get(TOP_P_KEY)
        if p is not None and not 0.0 < float(p) <= 1.0:
            raise ValueError(f"extra_args[{TOP_P_KEY!r}] must be in (0, 1], got {p!r}")

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        self.top_p = torch.ones(vllm_config.scheduler_config.max_num_seqs, dtype=torch.float32)

    def is_argmax_invariant(self) -> bool:
        return True  # the nucleus always holds the most likely token; also what places it after temperature

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        # vLLM's order: removed, then added (which may reuse a freed row), then moved.
        for row in batch_update.removed:
            self.top_p[row] = 1.0
        for row, params, _, _ in batch_update.added:
            self.top_p[row] = float((params.extra_args or {}).get(TOP_P_KEY, 1.0))
        for a, b, direction in batch_update.moved:
            pa, pb = float(self.top_p[a]), float(self.top_p[b])
            self.top_p[b] = pa
            self.top_p[a] = pb if direction == MoveDirectionality.SWAP else 1.0

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        top_p = self.top_p[:logits.shape[0]]
        rows = (top_p < 1.0).nonzero().squeeze(1)
        if rows.numel() == 0:
            return logits
        x = logits[rows]  # CPU logits (see the module's docstring)
        threshold = nucleus_threshold(x, top_p[rows])
        logits[rows] = x.masked_fill_(x < threshold.unsqueeze(1), float("-inf"))
        return logits
