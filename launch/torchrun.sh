#!/usr/bin/env bash
# Launch a dpo_dist stage with torchrun: on one node, or as one node of several.
#
#   bash launch/torchrun.sh [dpo_dist.<stage>] [hydra overrides...]       # default stage: dpo_dist.pipeline
#   NPROC_PER_NODE=8 bash launch/torchrun.sh dpo_dist.train run_dir=runs/demo deepspeed=zero3
#   # several nodes: the same command on every node, all naming the first node as the rendezvous
#   NNODES=4 NPROC_PER_NODE=8 MASTER_ADDR=node001 MASTER_PORT=29500 bash launch/torchrun.sh dpo_dist.train ...
#
# Environment:
#   NPROC_PER_NODE    ranks on this node (default: the GPUs visible here, or 1 on a CPU-only node)
#   NNODES            nodes (default 1: torchrun --standalone, which picks a free local port, so
#                     jobs sharing a host never collide)
#   MASTER_ADDR       with NNODES > 1: the c10d rendezvous host (required), MASTER_PORT its port
#                     (default 29500); RDZV_ID names the run (default $SLURM_JOB_ID, else dpo_dist)
#   OMP_NUM_THREADS   intra-op threads per rank (default: this node's cores / NPROC_PER_NODE; under
#                     Slurm the cores are the job's, $SLURM_CPUS_ON_NODE)
#   SHUTDOWN_TIMEOUT  seconds torchrun gives its workers to stop after SIGTERM/SIGUSR1 before SIGKILL
#                     (default 600: training finishes its step and checkpoints first)
#   PYTHON            interpreter (default python3)
#
# Signals: SIGTERM and SIGUSR1 (Slurm's warning before the time limit) reach every worker, which
# checkpoints at the next step boundary and exits 124; re-running the same command resumes.
set -euo pipefail  # no cd: relative paths in the overrides (run_dir=...) stay relative to the caller
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

args=(--nproc_per_node="$NPROC_PER_NODE" --max_restarts=0)
if [[ $NNODES -eq 1 ]]; then
    args+=(--standalone)
else
    : "${MASTER_ADDR:?NNODES=$NNODES needs MASTER_ADDR (the first node, the rendezvous host)}"
    args+=(--nnodes="$NNODES" --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}"
           --rdzv_id="${RDZV_ID:-${SLURM_JOB_ID:-dpo_dist}}")
fi

# torchrun's agent dies of SIGUSR1 by default (it handles TERM/INT/HUP/QUIT only) and would take the
# workers' checkpoint with it. torch >= 2.9 can be told to handle USR1 too: it forwards the signal
# to its workers and waits SHUTDOWN_TIMEOUT for them. Older torchrun ignores USR1 instead (an
# ignored signal stays ignored across exec); the workers then see it only when it is sent to them
# directly, as Slurm does (it signals every process of a job step).
torch_dir="$("$PY" -c 'import importlib.util; print(importlib.util.find_spec("torch").submodule_search_locations[0])')"
if grep -q -- "--signals-to-handle" "$torch_dir/distributed/run.py"; then
    args+=(--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout="${SHUTDOWN_TIMEOUT:-600}")
else
    trap '' USR1
fi

echo "torchrun.sh: $module on $(hostname -s): $NNODES node(s) x $NPROC_PER_NODE rank(s), OMP_NUM_THREADS=$OMP_NUM_THREADS" >&2
exec "$PY" -m torch.distributed.run "${args[@]}" -m "$module" "$@"
