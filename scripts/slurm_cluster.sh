#!/usr/bin/env bash
# A single-node SLURM cluster on loopback, for testing `lm-saes train -m hydra/launcher=slurm ...` for real.
#
#   bash scripts/slurm_cluster.sh up       install (Debian packages) if needed, start munged, slurmctld, slurmd
#   bash scripts/slurm_cluster.sh down     cancel every job and stop the daemons
#   bash scripts/slurm_cluster.sh status   sinfo and squeue
#
# Everything lives in one state folder ($LM_SAES_SLURM_DIR, default /tmp/lm_saes-slurm): its own munge key and
# socket, slurm.conf, spool folders, logs. Nothing under /etc is changed. Clients find the cluster through
#   export SLURM_CONF=$LM_SAES_SLURM_DIR/slurm.conf
# which `up` prints last. tests/test_slurm.py calls `up` once per test session and `down` at its end.
# Choices that make it run in a container without systemd or cgroups: proctrack/linuxproc, task/none, no
# accounting, daemons as root.
set -euo pipefail
STATE=${LM_SAES_SLURM_DIR:-/tmp/lm_saes-slurm}
CONF=$STATE/slurm.conf
CTLD_PORT=${LM_SAES_SLURMCTLD_PORT:-6817}
SLURMD_PORT=${LM_SAES_SLURMD_PORT:-6818}
sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"

install_packages() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null && return
    echo "installing Debian's slurmctld slurmd slurm-client munge" >&2
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null 2>&1 \
        || { $sudo apt-get update -qq && $sudo apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null; }
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

write_config() {
    local host cpus mem_mb
    host=$(hostname -s)
    cpus=$(nproc)
    # Leave the node some memory of its own; jobs ask for --mem within this.
    mem_mb=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) * 9 / 10 ))
    mkdir -p "$STATE/ctld" "$STATE/slurmd"
    : > "$STATE/plugstack.conf"
    cat > "$CONF" <<EOF
ClusterName=lmsaes
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
AuthInfo=socket=$STATE/munge.socket
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
PlugStackConfig=$STATE/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
ReturnToService=2
JobRequeue=1
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
    pid_alive "$STATE/munged.pid" && return
    if [ ! -f "$STATE/munge.key" ]; then
        dd if=/dev/urandom of="$STATE/munge.key" bs=1024 count=1 status=none
        chmod 400 "$STATE/munge.key"
    fi
    # --force: munged refuses to run as root, and /tmp's permissions, without it.
    munged --force --key-file="$STATE/munge.key" --socket="$STATE/munge.socket" --pid-file="$STATE/munged.pid" \
        --log-file="$STATE/munged.log" --seed-file="$STATE/munged.seed"
}

wait_for_node() {
    local host state
    host=$(hostname -s)
    for _ in $(seq 1 180); do
        state=$(SLURM_CONF=$CONF sinfo -h -n "$host" -o %T 2>/dev/null || true)
        case "$state" in
            idle*|mixed*|allocated*) return 0 ;;
            down*|drain*) SLURM_CONF=$CONF scontrol update nodename="$host" state=resume 2>/dev/null || true ;;
        esac
        sleep 0.5
    done
    echo "slurm_cluster: the node did not become idle (state: ${state:-none}); logs in $STATE" >&2
    tail -5 "$STATE/slurmctld.log" "$STATE/slurmd.log" >&2 || true
    return 1
}

up() {
    install_packages
    mkdir -p "$STATE"
    chmod 700 "$STATE"
    if ! pid_alive "$STATE/slurmctld.pid"; then
        # A fresh start forgets the jobs of an earlier cluster: a recovered job still "completing" would keep the
        # node busy until slurmctld gives up on it (minutes).
        rm -rf "$STATE/ctld" "$STATE/slurmd"
    fi
    write_config
    start_munge
    pid_alive "$STATE/slurmctld.pid" || slurmctld -f "$CONF"
    pid_alive "$STATE/slurmd.pid" || slurmd -f "$CONF" -N "$(hostname -s)"
    wait_for_node
    echo "export SLURM_CONF=$CONF"
}

down() {
    [ -f "$CONF" ] || return 0
    SLURM_CONF=$CONF scancel --quiet --user="$(id -un)" 2>/dev/null || true
    # Let every job finish completing first: a job step whose daemons (or munged) vanish under it lingers for
    # minutes, retrying its exit message.
    for _ in $(seq 1 60); do
        [ -z "$(SLURM_CONF=$CONF squeue -h -o %i 2>/dev/null)" ] && break
        sleep 0.5
    done
    for daemon in slurmd slurmctld munged; do
        if pid_alive "$STATE/$daemon.pid"; then
            kill "$(cat "$STATE/$daemon.pid")" 2>/dev/null || true
        fi
    done
    for daemon in slurmd slurmctld munged; do
        for _ in $(seq 1 20); do pid_alive "$STATE/$daemon.pid" || break; sleep 0.25; done
    done
    # A daemon whose pid file is gone (a start that raced another) still names this cluster's files.
    pkill -f -- "-f $CONF" 2>/dev/null || true
    pkill -f -- "--key-file=$STATE/munge.key" 2>/dev/null || true
    sleep 0.5
    pkill -9 -f -- "-f $CONF" 2>/dev/null || true
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) SLURM_CONF=$CONF sinfo; SLURM_CONF=$CONF squeue ;;
    *) echo "usage: $0 up|down|status   (state folder: $STATE)" >&2; exit 2 ;;
esac
