#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for trying the sbatch scripts and for the SLURM test.
#
#   scripts/slurm/local_cluster.sh start DIR   # munged + slurmctld + slurmd, all state under DIR
#   export SLURM_CONF=DIR/slurm.conf           # then sbatch/srun/sinfo/squeue talk to it
#   scripts/slurm/local_cluster.sh stop DIR
#
# Needs root and Debian's `slurm-wlm` + `munge` packages (scripts/slurm/ci_install.sh installs them).
# The controller and the node are both 127.0.0.1 (slurmctld and slurmd take two free ports, picked at
# start), so all traffic stays on this machine. No cgroups are used (proctrack/linuxproc, task/none), so it
# also runs inside containers. Requeued jobs restart after ~10 s (cred_expire=10), not SLURM's 2 minutes.
set -euo pipefail

usage() {
    echo "usage: $0 start|stop DIR" >&2
    exit 2
}
[ $# -eq 2 ] || usage
action=$1
dir=$(mkdir -p "$2" && cd "$2" && pwd)

stop() { # SIGTERM to slurmd, slurmctld and munged together, SIGKILL to any still there after 10 s
    local pids=() pid name alive
    # Cancel the cluster's jobs first, so that no job's processes outlive slurmd.
    if [ -f "$dir/slurm.conf" ] && [ -n "$(SLURM_CONF=$dir/slurm.conf squeue -h -o %A 2>/dev/null)" ]; then
        SLURM_CONF=$dir/slurm.conf squeue -h -o %A | xargs -r env SLURM_CONF="$dir/slurm.conf" scancel
        for _ in $(seq 50); do
            [ -z "$(SLURM_CONF=$dir/slurm.conf squeue -h -t running,completing -o %A 2>/dev/null)" ] && break
            sleep 0.2
        done
    fi
    for name in slurmd slurmctld munged; do
        [ -f "$dir/run/$name.pid" ] || continue
        pid=$(cat "$dir/run/$name.pid")
        rm -f "$dir/run/$name.pid"
        # Only our daemon: a stale pid file may name a process that has since reused the number.
        [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ] || continue
        kill "$pid" 2>/dev/null && pids+=("$pid")
    done
    for _ in $(seq 100); do
        alive=0
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [ $alive -eq 0 ] && return 0
        sleep 0.1
    done
    for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
}

fail() { # fail MESSAGE: print the message and the daemons' logs, stop what was started
    echo "local_cluster: $1" >&2
    for f in "$dir"/log/*.log; do
        [ -f "$f" ] && { echo "--- $f (last 20 lines)" >&2; tail -n 20 "$f" >&2; }
    done
    stop
    exit 1
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start() {
    for bin in munged slurmctld slurmd sinfo; do
        command -v "$bin" >/dev/null || PATH=$PATH:/usr/sbin
        command -v "$bin" >/dev/null ||
            { echo "local_cluster: '$bin' not found; install with scripts/slurm/ci_install.sh" >&2; exit 1; }
    done
    [ "$(id -u)" -eq 0 ] || { echo "local_cluster: must run as root (SlurmUser=root)" >&2; exit 1; }
    stop # a previous cluster in the same DIR

    mkdir -p "$dir"/{munge,state,spool,log,run}
    chmod 700 "$dir/munge"
    rm -f "$dir"/log/*.log

    # munge: a fresh key and a private socket, so the system's munged (if any) is left alone.
    [ -f "$dir/munge/munge.key" ] || dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$dir/munge/munge.key"
    munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
        --pid-file="$dir/run/munged.pid" --log-file="$dir/log/munged.log" \
        --seed-file="$dir/munge/munged.seed" || fail "munged did not start"

    local node cpus mem ctld_port slurmd_port
    node=$(hostname -s)
    cpus=$(nproc)
    overrides="" # a 2-task job needs 2 CPUs: on a 1-core machine, declare 2 and let slurmd accept that
    if [ "$cpus" -lt 2 ]; then cpus=2 overrides="SlurmdParameters=config_overrides"; fi
    mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    ctld_port=$(free_port)
    slurmd_port=$(free_port)
    cat >"$dir/slurm.conf" <<EOF
# Written by scripts/slurm/local_cluster.sh: a one-node cluster on 127.0.0.1.
ClusterName=local
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
SchedulerParameters=sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
NodeName=$node NodeAddr=127.0.0.1 NodeHostname=$node CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
$overrides
EOF
    # cgroup.conf next to slurm.conf is read by slurmd whatever the plugins; keep cgroups out of it.
    rm -f "$dir/cgroup.conf"
    # The Debian package's plugstack.conf lives in /etc/slurm; an empty one keeps this cluster self-contained.
    : >"$dir/plugstack.conf"

    export SLURM_CONF=$dir/slurm.conf
    slurmctld -c -f "$SLURM_CONF" || fail "slurmctld did not start"
    slurmd -f "$SLURM_CONF" -N "$node" || fail "slurmd did not start"

    for _ in $(seq 60); do
        if [ "$(sinfo -h -n "$node" -o %T 2>/dev/null)" = idle ]; then
            echo "local_cluster: node $node idle; export SLURM_CONF=$SLURM_CONF"
            return 0
        fi
        sleep 0.5
    done
    sinfo -N -l >&2 || true
    fail "node $node did not become idle within 30 s"
}

case $action in
start) start ;;
stop) stop ;;
*) usage ;;
esac
