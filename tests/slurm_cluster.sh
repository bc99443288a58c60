#!/usr/bin/env bash
# A throwaway Slurm cluster on this machine, for the Slurm test tier and for trying the sbatch
# templates by hand: munged, slurmctld and one slurmd on loopback, all private to one directory.
#
#   tests/slurm_cluster.sh up       # start (idempotent); prints the SLURM_CONF to export
#   tests/slurm_cluster.sh down     # cancel our jobs, stop our daemons (only the pids we started)
#   tests/slurm_cluster.sh status   # sinfo/squeue of the private cluster
#   tests/slurm_cluster.sh install  # apt-get install slurmctld slurmd slurm-client munge (Debian, root)
#
# Everything lives under $FULLFT_SLURM_DIR (default /tmp/fullft-slurm): slurm.conf, the munge key
# and socket, spool and state directories, daemon logs. Clients find it through
# SLURM_CONF=$FULLFT_SLURM_DIR/slurm.conf, so a system-wide Slurm (and /etc/slurm) is never
# touched; non-default ports keep the two apart. Needs root (slurmd runs jobs as their user).
# Proctrack/task plugins that need no cgroups: this works in containers.
set -euo pipefail

DIR=${FULLFT_SLURM_DIR:-/tmp/fullft-slurm}
CTLD_PORT=${FULLFT_SLURMCTLD_PORT:-16817}
SLURMD_PORT=${FULLFT_SLURMD_PORT:-16818}
NODE=$(hostname -s)
CONF=$DIR/slurm.conf
MUNGE_SOCKET=$DIR/munge/munge.socket.2
export SLURM_CONF=$CONF

die() { echo "slurm_cluster: $*" >&2; exit 1; }

alive() {  # alive PIDFILE: the process in PIDFILE is running
    [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

write_conf() {
    local cpus mem
    cpus=$(nproc)
    mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
    cat > "$CONF" <<EOF
# Written by tests/slurm_cluster.sh: a one-node loopback cluster for tests.
ClusterName=fullft
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire also delays a requeued job's restart (default 120 s); 10 s keeps tests quick.
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
CredType=cred/munge
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
# No cgroups needed (containers, CI): processes tracked by parentage, no binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# Schedule promptly (a requeued job starts again within seconds, not after the 60 s default).
SchedulerParameters=sched_interval=2,bf_interval=2
AccountingStorageType=accounting_storage/none
# Finished jobs stay visible to 'scontrol show job' for 10 minutes; every end state is also
# appended to jobcomp.txt (a job's whole history: requeues included).
MinJobAge=600
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/jobcomp.txt
JobRequeue=1
ReturnToService=2
KillWait=15
InactiveLimit=0
SlurmdTimeout=60
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}

up() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        || die "slurmctld/slurmd/munged not installed (Debian: $0 install)"
    [[ $(id -u) == 0 ]] || die "needs root (slurmd launches jobs as their submitting user)"
    mkdir -p "$DIR"/{munge,ctld,spool,log}
    chmod 711 "$DIR/munge"  # clients reach the socket inside; the key stays 0600
    if ! alive "$DIR/munged.pid"; then
        [[ -s $DIR/munge/munge.key ]] || { dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none;
                                            chmod 600 "$DIR/munge/munge.key"; }
        munged --force --socket="$MUNGE_SOCKET" --key-file="$DIR/munge/munge.key" \
               --pid-file="$DIR/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/seed"
    fi
    write_conf
    if ! alive "$DIR/slurmctld.pid"; then
        slurmctld -c -f "$CONF"      # -c: forget jobs of an earlier cluster in this directory
    fi
    if ! alive "$DIR/slurmd.pid"; then
        slurmd -f "$CONF" -N "$NODE"
    fi
    local deadline=$((SECONDS + 60))
    until sinfo -h -N -o '%T' 2>/dev/null | grep -Eq '^(idle|mixed|allocated)'; do
        (( SECONDS < deadline )) || { tail -n 20 "$DIR"/log/*.log >&2; die "node did not come up within 60 s"; }
        sleep 0.5
    done
    echo "slurm_cluster: up; export SLURM_CONF=$CONF"
}

down() {
    if alive "$DIR/slurmctld.pid"; then
        scancel --full --signal=KILL --quiet -u "$(id -un)" 2>/dev/null || true
        scancel --quiet -u "$(id -un)" 2>/dev/null || true
    fi
    local f pid
    for f in slurmd slurmctld munged; do
        if alive "$DIR/$f.pid"; then
            pid=$(cat "$DIR/$f.pid")
            kill "$pid"
            for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
        fi
        rm -f "$DIR/$f.pid"
    done
    echo "slurm_cluster: down"
}

status() {
    sinfo
    squeue
}

install() {
    [[ $(id -u) == 0 ]] || die "apt-get needs root"
    command -v apt-get >/dev/null || die "no apt-get: install slurmctld, slurmd, the Slurm client tools and munge yourself"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    install) install ;;
    *) die "usage: $0 up|down|status|install" ;;
esac
