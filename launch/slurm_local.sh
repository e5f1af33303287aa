#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine, to run slurm/*.sbatch and the submitit sweeps the
# way a cluster runs them (CI's slurm test tier uses it). Needs root (it is a dev/CI machine helper).
#
#   bash launch/slurm_local.sh start     # install slurm-wlm + munge if missing, start munged, slurmctld, slurmd
#   bash launch/slurm_local.sh status
#   bash launch/slurm_local.sh stop      # cancel this cluster's jobs, stop the daemons it started (by PID)
#
# The node is this host with its real CPUs and memory (from `slurmd -C`). Settings that matter:
# proctrack/linuxproc and task/none (no cgroups needed, so it runs in containers), select/cons_tres
# with cores and memory as consumables, no accounting (no slurmdbd; `sacct` has nothing to say),
# EnforcePartLimits=ALL, DefMemPerCPU = node memory / CPUs. State, spool, logs and PID files live in
# $SLURM_LOCAL_DIR (default /var/lib/dpo_dist-slurm); job ids keep counting across restarts, so
# per-job run directories (runs/slurm-<jobid>) never collide.
#
# Jobs inherit slurmd's nice value: `nice -n 15 bash launch/slurm_local.sh start` runs every job niced.
set -euo pipefail

DIR="${SLURM_LOCAL_DIR:-/var/lib/dpo_dist-slurm}"
CONF=/etc/slurm/slurm.conf
MARK="# written by dpo_dist launch/slurm_local.sh"
PARTITION="${SLURM_LOCAL_PARTITION:-local}"

die() { echo "slurm_local.sh: $*" >&2; exit 1; }
alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_packages() {
    command -v slurmctld >/dev/null && command -v munged >/dev/null && command -v sbatch >/dev/null && return
    [[ $(id -u) == 0 ]] || die "slurm-wlm/munge are missing and installing them needs root"
    echo "installing slurm-wlm and munge (apt-get)"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
}

start_munge() {
    # A munged already answering (a machine's own) is used as is and left alone on stop.
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        return
    fi
    if [[ ! -s /etc/munge/munge.key ]]; then
        mungekey --create --keyfile=/etc/munge/munge.key
    fi
    chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
    # /run/munge is normally made by systemd-tmpfiles; containers have no systemd.
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
    runuser -u munge -- /usr/sbin/munged --force
    for _ in $(seq 50); do
        if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
            cp /run/munge/munged.pid "$DIR/munged.pid"  # ours to stop (munged writes its own as munge)
            return
        fi
        sleep 0.1
    done
    die "munged did not come up (see /var/log/munge/munged.log)"
}

write_conf() {
    if [[ -f "$CONF" ]] && ! grep -qF "$MARK" "$CONF"; then
        die "$CONF exists and was not written by this script (a real cluster's?); not touching it"
    fi
    # `slurmd -C` reports this host as Slurm sees it; configuring more than that would drain the node.
    local node cpus mem
    node="$(slurmd -C | head -n1)"
    cpus="$(sed -E 's/.* CPUs=([0-9]+).*/\1/' <<<"$node")"
    mem="$(sed -E 's/.* RealMemory=([0-9]+).*/\1/' <<<"$node")"
    install -d -m 0755 "$DIR" "$DIR/log" "$DIR/spool"
    install -d -o slurm -g slurm -m 0755 "$DIR/state"
    chown slurm:slurm "$DIR/log"
    cat >"$CONF" <<EOF
$MARK
ClusterName=dpo-dist-local
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits out the job credential's lifetime before it may start again (default 120 s).
AuthInfo=cred_expire=10
CredType=cred/munge
MpiDefault=none
SwitchType=switch/none
# No cgroups: proctrack follows the process tree, tasks are not pinned.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$((mem / cpus))
EnforcePartLimits=ALL
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
# A job is signalled (SIGTERM) this long before SIGKILL when cancelled, requeued or out of time:
# training needs it to reach the next step boundary and checkpoint. Generous, because a step can
# take minutes on a busy 2-core machine; real clusters often allow 30-60 s, which is why
# slurm/pipeline.sbatch asks for SIGUSR1 well before the time limit.
KillWait=300
# Finished jobs stay visible to scontrol this long (there is no accounting to ask afterwards).
MinJobAge=900
ReturnToService=2
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

wait_idle() {
    local node state
    node="$(slurmd -C | head -n1 | sed -E 's/^NodeName=([^ ]+).*/\1/')"
    for _ in $(seq 120); do
        state="$(sinfo -h -n "$node" -o %T 2>/dev/null || true)"
        case "$state" in
            idle|mixed|allocated) echo "slurm: node $node $state, partition $PARTITION"; return ;;
            down*|drain*) scontrol update nodename="$node" state=resume 2>/dev/null || true ;;
        esac
        sleep 0.5
    done
    die "node $node did not become idle (state: ${state:-unknown}); see $DIR/log/"
}

start() {
    install_packages
    install -d -m 0755 "$DIR"
    write_conf
    start_munge
    if ! alive "$DIR/slurmctld.pid"; then
        # slurmctld drops to SlurmUser itself; -i: a state file from an older run that cannot be read
        # is skipped instead of refusing to start.
        /usr/sbin/slurmctld -i
    fi
    for _ in $(seq 60); do scontrol ping >/dev/null 2>&1 && break; sleep 0.5; done
    scontrol ping >/dev/null 2>&1 || die "slurmctld is not answering (see $DIR/log/slurmctld.log)"
    if ! alive "$DIR/slurmd.pid"; then
        /usr/sbin/slurmd
    fi
    wait_idle
}

stop_pid() {  # name, pid file: TERM, then KILL after 15 s
    local pid
    alive "$2" || { rm -f "$2"; return; }
    pid="$(cat "$2")"
    kill -TERM "$pid"
    for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || { rm -f "$2"; return; }; sleep 0.1; done
    echo "$1 ($pid) ignored SIGTERM; SIGKILL" >&2
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$2"
}

stop() {
    if alive "$DIR/slurmctld.pid"; then
        # Cancel what still runs on this cluster, so no job outlives its daemons.
        local jobs
        jobs="$(squeue -h -o %A 2>/dev/null || true)"
        if [[ -n "$jobs" ]]; then
            # shellcheck disable=SC2086
            scancel $jobs || true
            for _ in $(seq 100); do [[ -z "$(squeue -h -o %A 2>/dev/null)" ]] && break; sleep 0.5; done
        fi
    fi
    stop_pid slurmd "$DIR/slurmd.pid"
    stop_pid slurmctld "$DIR/slurmctld.pid"
    stop_pid munged "$DIR/munged.pid"  # only if this script started it
    echo "slurm: stopped"
}

status() {
    local name
    for name in munged slurmctld slurmd; do
        if alive "$DIR/$name.pid"; then echo "$name: running (pid $(cat "$DIR/$name.pid"))"; else echo "$name: not started here"; fi
    done
    sinfo 2>/dev/null || true
    squeue 2>/dev/null || true
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
