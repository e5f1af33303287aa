"""Shared fixtures. Single-process tests use both cores; multi-rank tests set one thread per rank."""

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(int(os.environ.get("DPO_DIST_TEST_THREADS", "2")))
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A randomly initialised 2-layer Llama saved as a HF directory, with SmolLM2's tokenizer and
    chat template, for fast unit tests of the model-facing code."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from dpo_dist import models
    from dpo_dist.config import compose

    tokenizer = models.load_tokenizer(compose().model)
    out = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                      bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need CUDA: they skip without it, and the session stops at once where
    DPO_DIST_REQUIRE_GPU=1 (launch/gpu_smoke.sh on a GPU node), so a node whose GPUs are not visible
    cannot pass by skipping. (At collection, not in a fixture: module-scoped fixtures start runs first.)"""
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items or torch.cuda.is_available():
        return
    if os.environ.get("DPO_DIST_REQUIRE_GPU") == "1":
        raise pytest.UsageError("DPO_DIST_REQUIRE_GPU=1 but torch sees no CUDA device")
    for item in gpu_items:
        item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU (launch/gpu_smoke.sh on a GPU node)"))
