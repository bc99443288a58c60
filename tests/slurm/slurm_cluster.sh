#!/usr/bin/env bash
# A throwaway Slurm cluster on this machine, for the Slurm test tier and for trying the sbatch
# templates by hand: munged, slurmctld and slurmd on loopback, all private to one directory.
#
#   tests/slurm/slurm_cluster.sh up       # start (idempotent); prints the SLURM_CONF to export
#   tests/slurm/slurm_cluster.sh down     # cancel our jobs, stop our daemons (only the pids we started)
#   tests/slurm/slurm_cluster.sh status   # sinfo/squeue of the private cluster
#   tests/slurm/slurm_cluster.sh install  # apt-get install slurmctld slurmd slurm-client munge (Debian, root)
#
# Everything lives under $FULLFT_SLURM_DIR (default /tmp/fullft-slurm): slurm.conf, the munge key
# and socket, spool and state directories, daemon logs. Clients find it through
# SLURM_CONF=$FULLFT_SLURM_DIR/slurm.conf, so a system-wide Slurm (and /etc/slurm) is never
# touched; non-default ports keep the two apart. Needs root (slurmd runs jobs as their user).
# Proctrack/task plugins that need no cgroups: this works in containers.
#
# FULLFT_SLURM_NODES=N (N >= 2) makes N "hosts" out of network namespaces: a bridge in this
# namespace carries slurmctld (<subnet>.1); node k is a namespace with a veth `eth0` at
# <subnet>.1k, its own hostname (unshare --uts), its own /etc/hosts naming every node (a bind
# mount in its own mount namespace: this machine's /etc/hosts is not touched; torchrun and gloo
# resolve their own host name) and its own slurmd. The bridge, veths and namespaces are named
# after $FULLFT_SLURM_TAG (default fft), the addresses after $FULLFT_SLURM_SUBNET (default
# 10.77.0); `down` (with the same variables) deletes them.
set -euo pipefail

DIR=${FULLFT_SLURM_DIR:-/tmp/fullft-slurm}
CTLD_PORT=${FULLFT_SLURMCTLD_PORT:-16817}
SLURMD_PORT=${FULLFT_SLURMD_PORT:-16818}
NODES=${FULLFT_SLURM_NODES:-1}
TAG=${FULLFT_SLURM_TAG:-fft}
SUBNET=${FULLFT_SLURM_SUBNET:-10.77.0}
HOST=$(hostname -s)
CONF=$DIR/slurm.conf
MUNGE_SOCKET=$DIR/munge/munge.socket.2
export SLURM_CONF=$CONF

die() { echo "slurm_cluster: $*" >&2; exit 1; }

alive() {  # alive PIDFILE: the process in PIDFILE is running
    [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

nodes() {  # one line per slurmd: NAME ADDRESS NETNS ("-": this namespace)
    if (( NODES == 1 )); then
        echo "$HOST 127.0.0.1 -"
    else
        local k
        for k in $(seq "$NODES"); do echo "$TAG-n$k $SUBNET.1$k $TAG-n$k"; done
    fi
}

write_conf() {
    local cpus mem ctld_addr=127.0.0.1 name addr ns names=()
    cpus=$(nproc)
    mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
    if (( NODES > 1 )); then ctld_addr=$SUBNET.1; fi
    cat > "$CONF" <<EOF
# Written by tests/slurm/slurm_cluster.sh: a throwaway cluster for tests ($NODES node(s) on this machine).
ClusterName=fullft
SlurmctldHost=$HOST($ctld_addr)
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
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
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
EOF
    while read -r name addr ns; do
        echo "NodeName=$name NodeAddr=$addr CPUs=$cpus RealMemory=$mem State=UNKNOWN" >> "$CONF"
        names+=("$name")
    done < <(nodes)
    local IFS=,
    echo "PartitionName=debug Nodes=${names[*]} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO" >> "$CONF"
}

network_up() {  # the bridge, a namespace with a veth per node, and the nodes' /etc/hosts
    local name addr ns k=0
    { echo "127.0.0.1 localhost"; echo "$SUBNET.1 $HOST"; nodes | awk '{print $2, $1}'; } > "$DIR/hosts"
    if ! ip link show "${TAG}br0" >/dev/null 2>&1; then
        ip link add "${TAG}br0" type bridge
        ip addr add "$SUBNET.1/24" dev "${TAG}br0"
        ip link set "${TAG}br0" up
    fi
    while read -r name addr ns; do
        k=$((k + 1))
        if [[ -e /var/run/netns/$ns ]]; then continue; fi
        ip netns add "$ns"
        ip link add "${TAG}v$k" type veth peer name eth0 netns "$ns"
        ip link set "${TAG}v$k" master "${TAG}br0" up
        ip -n "$ns" addr add "$addr/24" dev eth0
        ip -n "$ns" link set eth0 up
        ip -n "$ns" link set lo up
    done < <(nodes)
}

network_down() {
    local name addr ns k=0
    while read -r name addr ns; do
        k=$((k + 1))
        if [[ -e /var/run/netns/$ns ]]; then ip netns del "$ns"; fi
        if ip link show "${TAG}v$k" >/dev/null 2>&1; then ip link del "${TAG}v$k"; fi
    done < <(nodes)
    if ip link show "${TAG}br0" >/dev/null 2>&1; then ip link del "${TAG}br0"; fi
}

start_slurmd() {  # start_slurmd NAME NETNS
    if alive "$DIR/slurmd-$1.pid"; then return; fi
    if [[ $2 == - ]]; then
        slurmd -f "$CONF" -N "$1"
    else
        # Not `ip netns exec`: it remounts /sys, hides /sys/fs/cgroup, and slurmd refuses to start.
        nsenter --net="/var/run/netns/$2" unshare --uts --mount sh -c \
            "mount --bind '$DIR/hosts' /etc/hosts && hostname '$1' && exec slurmd -f '$CONF' -N '$1'"
    fi
}

up() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        || die "slurmctld/slurmd/munged not installed (Debian: $0 install)"
    [[ $(id -u) == 0 ]] || die "needs root (slurmd launches jobs as their submitting user)"
    mkdir -p "$DIR"/{munge,ctld,spool,log}
    chmod 711 "$DIR/munge"  # clients reach the socket inside; the key stays 0600
    if ! alive "$DIR/munged.pid"; then
        if [[ ! -s $DIR/munge/munge.key ]]; then
            dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
            chmod 600 "$DIR/munge/munge.key"
        fi
        munged --force --socket="$MUNGE_SOCKET" --key-file="$DIR/munge/munge.key" \
               --pid-file="$DIR/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/seed"
    fi
    write_conf
    if (( NODES > 1 )); then network_up; fi
    if ! alive "$DIR/slurmctld.pid"; then
        slurmctld -c -f "$CONF"      # -c: forget jobs of an earlier cluster in this directory
    fi
    local name addr ns
    while read -r name addr ns; do start_slurmd "$name" "$ns"; done < <(nodes)
    local deadline=$((SECONDS + 60))
    until [[ $(sinfo -h -N -o '%T' 2>/dev/null | grep -Ec '^(idle|mixed|allocated)') == "$NODES" ]]; do
        (( SECONDS < deadline )) || { tail -n 20 "$DIR"/log/*.log >&2; die "nodes did not come up within 60 s"; }
        sleep 0.5
    done
    echo "slurm_cluster: up ($NODES node(s)); export SLURM_CONF=$CONF"
}

down() {
    if alive "$DIR/slurmctld.pid"; then
        scancel --full --signal=KILL --quiet -u "$(id -un)" 2>/dev/null || true
        scancel --quiet -u "$(id -un)" 2>/dev/null || true
    fi
    local f pid
    for f in "$DIR"/slurmd-*.pid "$DIR/slurmctld.pid" "$DIR/munged.pid"; do
        if alive "$f"; then
            pid=$(cat "$f")
            kill "$pid"
            for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid"; fi
        fi
        rm -f "$f"
    done
    if (( NODES > 1 )); then network_down; fi
    echo "slurm_cluster: down"
}

status() {
    sinfo -N
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
