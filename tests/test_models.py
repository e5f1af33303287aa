"""The bundled model resolves, converts once (atomically), answers a chat prompt, and is reused."""

import os
import time

import pytest
import torch

from dpo_dist import models
from dpo_dist.config import compose


def test_bundled_model_converts_once_answers_and_is_reused():
    cfg = compose().model
    path = models.resolve_model_path(cfg)
    assert os.path.isfile(os.path.join(path, "model.safetensors"))
    assert os.path.isfile(os.path.join(path, "chat_template.jinja")) or "chat_template" in open(
        os.path.join(path, "tokenizer_config.json")).read()
    stamp = os.path.getmtime(os.path.join(path, "model.safetensors"))
    t = time.time()
    assert models.resolve_model_path(cfg) == path  # second resolution reuses the converted copy
    assert time.time() - t < 1.0
    assert os.path.getmtime(os.path.join(path, "model.safetensors")) == stamp

    tokenizer = models.load_tokenizer(cfg, padding_side="left")
    model = models.load_model(cfg).eval()
    assert getattr(model, "hf_quantizer", None) is None
    assert getattr(model.config, "quantization_config", None) is None
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=24, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_conversion_is_atomic(tmp_path, monkeypatch):
    """A conversion that dies half-way leaves no model directory behind."""
    monkeypatch.setenv("DPO_DIST_CACHE", str(tmp_path))

    def explode(gguf, out_dir):
        (out_dir / "config.json").write_text("{}")  # half a model
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "convert_gguf", explode)
    with pytest.raises(KeyboardInterrupt):
        models.resolve_model_path(compose().model)
    assert not (tmp_path / "models" / "smollm2-135m").exists()
    assert not [p for p in (tmp_path / "models").iterdir() if p.name.endswith(".tmp")]


def test_missing_models_fail_fast_with_a_clear_message(tmp_path):
    cfg = compose(["model=qwen2.5-0.5b"]).model
    t = time.time()
    with pytest.raises(models.ModelNotFound, match="model.path='Qwen/Qwen2.5-0.5B-Instruct'.*allow_download"):
        models.resolve_model_path(cfg)
    assert time.time() - t < 10
    cfg.path = str(tmp_path / "nowhere")
    with pytest.raises(models.ModelNotFound, match="no such directory"):
        models.resolve_model_path(cfg)


def test_zero3_loading_makes_no_device_move(monkeypatch, tiny_llama):
    """Under ZeRO-3 loading the model is built partitioned (deepspeed.zero.Init) and DeepSpeed owns
    placement: on a GPU a `.to()` would move every partition to the host for good. No move here, and a
    device asked for is refused. (Run in a 1-rank gloo group, torn down after.)"""
    from dataclasses import replace

    from dpo_dist import dist
    from dpo_dist.config import DeepSpeedConfig

    moves = []
    real_to = torch.nn.Module.to

    def spy(self, *args, **kwargs):
        if hasattr(self, "config"):  # the whole model, not a module transformers moves while loading
            moves.append((type(self).__name__, args, kwargs))
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", spy)
    cfg = replace(compose().model, path=str(tiny_llama))
    # The 1-rank group exports RANK, WORLD_SIZE and MASTER_PORT into this process's environment, which
    # every later test's subprocess would inherit (a srun job of world size 1, one fixed port for all).
    saved = dict(os.environ)
    try:
        with dist.zero3_model_loading(DeepSpeedConfig(stage=3), dist.zero3_inference_config(torch.float32)):
            model = models.load_model(cfg)
            with pytest.raises(ValueError, match="ZeRO-3"):
                models.load_model(cfg, device="cpu")
        dist.end_zero3_model_loading()
        assert hasattr(next(model.parameters()), "ds_id"), "not built partitioned"
        assert moves == []
        plain = models.load_model(cfg, device="cpu")  # outside the window: moved as asked
        assert not hasattr(next(plain.parameters()), "ds_id") and len(moves) == 1
    finally:
        dist.end_zero3_model_loading()
        dist.shutdown(clean=False)
        os.environ.clear()
        os.environ.update(saved)


@pytest.mark.parametrize("written,added", [
    # transformers 5's spelling of a plain rotary embedding: 4.x needs rope_theta, or it takes 10,000.
    ({"rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}, "dtype": "bfloat16", "use_cache": False},
     {"rope_theta": 1e6, "torch_dtype": "bfloat16", "use_cache": True}),
    # A scaled one (Llama 3.1): 4.x reads the scaling as rope_scaling.
    ({"rope_parameters": {"rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0}},
     {"rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}, "use_cache": True}),
    # Written by 4.x already, or one set per layer type (no 4.x spelling): nothing to add.
    ({"rope_theta": 1e4, "torch_dtype": "float32", "use_cache": True}, {}),
    ({"rope_parameters": {"full_attention": {"rope_theta": 1e6}, "sliding_attention": {"rope_theta": 1e4}}},
     {"use_cache": True}),
])
def test_an_exported_config_keeps_the_keys_older_transformers_read(written, added):
    from dpo_dist.checkpoint import readable_config

    assert readable_config(written) == {**written, **added}
