"""The seed's own model shape for the benchmark: Qwen2.5-0.5B-Instruct's published architecture
(24 layers, hidden 896, 14 query / 2 key-value heads, MLP 4864, vocabulary 151,936, tied
embeddings) with random weights and Qwen2.5's real tokenizer and chat template
(``dpo_dist.qwen_test_model.build_tokenizer``), so the benchmark's pairs tokenise as they would for
the real model and the vocabulary head is as large as the users'.

Random weights change no cost a trainer pays per step (the same matmuls, the same logits); they only
make step 1's loss ln 2 exactly as a trained model's would be. Built once into
``$DPO_DIST_CACHE/models/qwen2.5-0.5b-shape`` (bf16 safetensors, 1 GB; loaded in fp32 on the CPU).
"""

from __future__ import annotations

from pathlib import Path

import torch

NAME = "qwen2.5-0.5b-shape"
SEED = 0
# config.json of Qwen/Qwen2.5-0.5B-Instruct (conf/model/qwen2.5-0.5b.yaml holds the same figures).
ARCHITECTURE = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                    num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768,
                    rope_theta=1_000_000.0, rms_norm_eps=1e-6, use_sliding_window=False)


def build(out_dir: Path) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from dpo_dist import qwen_test_model as q

    tokenizer = q.build_tokenizer()
    tokenizer.save_pretrained(out_dir)
    config = Qwen2Config(**ARCHITECTURE, bos_token_id=q.ENDOFTEXT, eos_token_id=q.IM_END, pad_token_id=q.ENDOFTEXT)
    torch.manual_seed(SEED)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = [q.IM_END, q.ENDOFTEXT]
    model.generation_config.pad_token_id = q.ENDOFTEXT
    model.to(torch.bfloat16).save_pretrained(out_dir, safe_serialization=True)


def model_dir() -> Path:
    """The built model's directory, built on first use (under a lock: parallel benchmarks build it once)."""
    from dpo_dist.artifacts import atomic_dir, file_lock
    from dpo_dist.models import cache_dir

    target = cache_dir() / "models" / NAME
    if (target / "config.json").is_file():
        return target
    with file_lock(cache_dir() / "models" / f".{NAME}.lock"):
        if not (target / "config.json").is_file():
            with atomic_dir(target) as tmp:
                build(tmp)
    return target


def overrides() -> list[str]:
    """Hydra overrides that train this model with the shipped Qwen2.5-0.5B config (its architecture
    figures feed the planner)."""
    return ["model=qwen2.5-0.5b", f"model.path={model_dir()}"]
