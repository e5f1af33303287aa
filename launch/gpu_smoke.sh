#!/usr/bin/env bash
# The GPU smoke tier (tests/test_gpu.py) on a GPU node: hf and vLLM generation with one rank / engine
# per GPU, bf16 ZeRO-2 and ZeRO-3 training with gradient checkpointing, SIGUSR1 -> exit 124 -> resume,
# the export loaded by vLLM, and the peak GPU memory per rank next to the planner's estimate.
# It has NOT RUN YET: no GPU node has been available to this project.
#
#   pip install vllm && bash launch/setup.sh               # once, where there is network: vLLM first, since
#                                                          # it pins its torch, which setup.sh then keeps
#   bash launch/gpu_smoke.sh                               # on the GPU node; no network; ~10 minutes
#   sbatch --gpus-per-node=2 --wrap 'bash launch/gpu_smoke.sh'
#
# Uses up to 2 GPUs. Figures: runs/gpu_smoke/report.json (DPO_DIST_GPU_REPORT); log: runs/gpu_smoke/pytest.log.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
out="${DPO_DIST_GPU_REPORT_DIR:-runs/gpu_smoke}"
mkdir -p "$out"
rm -f "$out/report.json"
# Fail, not skip, when the GPUs or vLLM are missing; never reach for the hub.
export DPO_DIST_REQUIRE_GPU=1 DPO_DIST_GPU_REPORT="$PWD/$out/report.json"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled VLLM_WORKER_MULTIPROC_METHOD=spawn
"$PY" -c 'import torch; n = torch.cuda.device_count(); print(f"gpu_smoke: {n} GPU(s):", [torch.cuda.get_device_name(i) for i in range(n)])'
set +e
timeout "${SMOKE_TIMEOUT:-900}" "$PY" -m pytest -m gpu -v -p no:cacheprovider tests 2>&1 | tee "$out/pytest.log"
rc=${PIPESTATUS[0]}
set -e
echo "gpu_smoke: report in $out/report.json"
exit "$rc"
