#!/usr/bin/env bash
# Launch a dpo_dist stage with DeepSpeed's own launcher (`deepspeed`), the alternative to
# launch/torchrun.sh: on one node, or as one node of several without ssh (every node runs this).
#
#   bash launch/deepspeed.sh [dpo_dist.<stage>] [hydra overrides...]      # default stage: dpo_dist.pipeline
#   NPROC_PER_NODE=8 bash launch/deepspeed.sh dpo_dist.train run_dir=runs/demo deepspeed=zero3
#   # several nodes: on every node, with its own NODE_RANK and the same hostfile ("host slots=N" lines)
#   HOSTFILE=hosts NNODES=2 NODE_RANK=0 MASTER_ADDR=node001 MASTER_PORT=29500 bash launch/deepspeed.sh dpo_dist.train ...
#
# Environment:
#   NPROC_PER_NODE   ranks on this node (default: the GPUs visible here, or 1 on a CPU-only node)
#   NNODES           nodes (default 1). With NNODES > 1: HOSTFILE (default: written from
#                    $SLURM_JOB_NODELIST), NODE_RANK (default $SLURM_NODEID), MASTER_ADDR (default the
#                    hostfile's first host) and MASTER_PORT (required on several nodes)
#   MASTER_PORT      on one node: default a free port, so jobs sharing a host never collide
#   OMP_NUM_THREADS  intra-op threads per rank (default: this node's cores / NPROC_PER_NODE)
#   PYTHON           interpreter (default python3)
#
# Signals: a worker that gets SIGUSR1 or SIGTERM checkpoints at the next step boundary and exits 124,
# and the launcher exits 124 with it. The launcher ignores SIGUSR1 (by default it would die of it),
# so send SIGUSR1 to the whole process group (`kill -USR1 -- -PGID`); Slurm signals every process of
# a step anyway. SIGTERM to the launcher reaches the workers (DeepSpeed SIGKILLs them 30 s later).
set -euo pipefail  # no cd: relative paths in the overrides (run_dir=...) stay relative to the caller
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
# On a CPU node DeepSpeed counts NUMA nodes as its devices unless LOCAL_SIZE says how many ranks.
export LOCAL_SIZE="$NPROC_PER_NODE"

free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# --no_local_rank: DeepSpeed would otherwise append --local_rank=N, which is not a Hydra override.
args=(--num_gpus="$NPROC_PER_NODE" --no_local_rank --module)
if [[ $NNODES -eq 1 ]]; then
    args+=(--master_port="${MASTER_PORT:-$(free_port)}")
else
    if [[ -z ${HOSTFILE:-} ]]; then
        : "${SLURM_JOB_NODELIST:?NNODES=$NNODES needs HOSTFILE (lines \"host slots=$NPROC_PER_NODE\") or a Slurm job}"
        HOSTFILE="$(mktemp)"
        scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/\$/ slots=$NPROC_PER_NODE/" >"$HOSTFILE"
    fi
    : "${MASTER_PORT:?NNODES=$NNODES needs MASTER_PORT}"
    # --no_ssh: each node starts its own ranks (as srun or a scheduler does), no pdsh/ssh fan-out.
    args+=(--hostfile="$HOSTFILE" --num_nodes="$NNODES" --no_ssh --node_rank="${NODE_RANK:-${SLURM_NODEID:-0}}"
           --master_addr="${MASTER_ADDR:-$(awk 'NF {print $1; exit}' "$HOSTFILE")}" --master_port="$MASTER_PORT")
fi

trap '' USR1
echo "deepspeed.sh: $module on $(hostname -s): $NNODES node(s) x $NPROC_PER_NODE rank(s), OMP_NUM_THREADS=$OMP_NUM_THREADS" >&2
exec "$PY" -m deepspeed.launcher.runner "${args[@]}" "$module" "$@"
