# Sourced by torchrun.sh and deepspeed.sh: the module to run, ranks per node, nodes, and per-rank
# threads, from the arguments and the environment the same way for both launchers.
PY="${PYTHON:-python3}"

module=dpo_dist.pipeline
if [[ $# -gt 0 && $1 =~ ^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$ ]]; then
    module=$1
    shift
fi

count_gpus() {
    if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
        tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c .
    elif command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
    else
        echo 0
    fi
}
NPROC_PER_NODE="${NPROC_PER_NODE:-$(count_gpus)}"
[[ $NPROC_PER_NODE -ge 1 ]] || NPROC_PER_NODE=1
NNODES="${NNODES:-1}"

# N ranks each using every core of a CPU node run ~100x slower than N ranks sharing them.
cores="${SLURM_CPUS_ON_NODE:-$(nproc)}"
threads=$((cores / NPROC_PER_NODE))
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$((threads > 0 ? threads : 1))}"
