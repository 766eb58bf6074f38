#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for tests/test_slurm.py.
#
#   tests/slurm/cluster.sh start   install slurm-wlm + munge (Debian, needs root and apt), write the
#                                  config under $TUNELINE_SLURM_DIR, start munged, slurmctld, slurmd
#   tests/slurm/cluster.sh stop    stop what `start` started
#   tests/slurm/cluster.sh env     print the environment a client needs (SLURM_CONF=...)
#
# The cluster's files (slurm.conf, gres.conf, munge socket and key, state, logs) live in
# $TUNELINE_SLURM_DIR. /etc/slurm/slurm.conf and gres.conf become links to them, because the
# executor plugin's job step drops SLURM_CONF from the environment of its inner `srun`; a machine
# that already has an /etc/slurm/slurm.conf of its own is refused, never changed. `stop` removes
# the links. The system's munged, if any, is left alone: this cluster runs its own on its own socket.
# No accounting daemon (slurmdbd): finished jobs are kept in a job-completion log (jobcomp/filetxt),
# which the test reads as the scheduler's record of what ran.
set -euo pipefail

DIR=${TUNELINE_SLURM_DIR:-/tmp/tuneline-slurm}
HOST=$(hostname -s)
CONF=$DIR/slurm.conf

die() { echo "cluster.sh: $*" >&2; exit 1; }

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
        return
    fi
    [ "$(id -u)" = 0 ] || die "slurm-wlm is not installed and installing it needs root"
    command -v apt-get >/dev/null || die "slurm-wlm is not installed and there is no apt-get"
    echo "installing slurm-wlm and munge (Debian packages)..."
    apt-get update -q >"$DIR/apt.log" 2>&1 || die "apt-get update failed, see $DIR/apt.log"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurm-wlm munge \
        >>"$DIR/apt.log" 2>&1 || die "apt-get install slurm-wlm munge failed, see $DIR/apt.log"
}

write_config() {
    local cpus mem
    cpus=$(getconf _NPROCESSORS_ONLN)  # not nproc: it answers OMP_NUM_THREADS (1 under pytest-xdist), and jobs asking for more CPUs than the node has pend forever
    mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 2048 ))
    mkdir -p "$DIR"/{state,spool,munge,log}
    # A GPU rule needs a gres on the node; a CPU-only test node declares one backed by /dev/null.
    cat >"$CONF" <<CONF
ClusterName=tuneline-test
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MinJobAge=600
GresTypes=gpu
NodeName=$HOST CPUs=$cpus RealMemory=$mem Gres=gpu:1 State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF
    echo "NodeName=$HOST Name=gpu File=/dev/null" >"$DIR/gres.conf"
    mkdir -p /etc/slurm
    for f in slurm.conf gres.conf; do
        if [ -e "/etc/slurm/$f" ] && [ "$(readlink "/etc/slurm/$f")" != "$DIR/$f" ]; then
            die "/etc/slurm/$f exists and is not this test cluster's: not touching a real SLURM setup"
        fi
        ln -sfn "$DIR/$f" "/etc/slurm/$f"
    done
}

start() {
    [ "$(id -u)" = 0 ] || die "starting a test cluster needs root (daemons, /etc/slurm links)"
    mkdir -p "$DIR"
    install_packages
    stop quiet
    write_config
    [ -f /etc/munge/munge.key ] || die "/etc/munge/munge.key is missing (the munge package creates it)"
    cp /etc/munge/munge.key "$DIR/munge/munge.key"
    chmod 700 "$DIR/munge"; chmod 400 "$DIR/munge/munge.key"
    munged --force --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge/munge.key" \
        --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/seed"
    export SLURM_CONF=$CONF
    slurmctld
    slurmd
    for _ in $(seq 60); do
        if sinfo -h -N -o '%T' 2>/dev/null | grep -q -E '^idle'; then
            echo "SLURM is up: node $HOST idle (SLURM_CONF=$CONF)"
            return
        fi
        sleep 1
    done
    tail -20 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
    die "the node did not come up within 60 s"
}

stop() {
    for pidfile in "$DIR/slurmd.pid" "$DIR/slurmctld.pid" "$DIR/munge/munged.pid"; do
        if [ -f "$pidfile" ]; then
            kill "$(cat "$pidfile")" 2>/dev/null || true
            rm -f "$pidfile"
        fi
    done
    for f in slurm.conf gres.conf; do
        if [ "$(readlink "/etc/slurm/$f" 2>/dev/null)" = "$DIR/$f" ]; then rm -f "/etc/slurm/$f"; fi
    done
    sleep 1
    [ "${1:-}" = quiet ] || echo "SLURM stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    env) echo "SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 start|stop|env" >&2; exit 2 ;;
esac
