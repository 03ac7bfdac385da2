#!/usr/bin/env bash
# Bring up a single-node Slurm cluster on this machine, for salt's Slurm tests and for trying
# `python -m salt.train -m launcher=slurm ...` without a real cluster.
#
# Usage: scripts/slurm/start_local_cluster.sh        (as root; Debian or Ubuntu)
#
# - Installs Debian's slurmctld, slurmd, slurm-client and munge when they are missing.
# - Writes /etc/slurm/slurm.conf (cgroup-free: proctrack/linuxproc, task/none; select/cons_tres;
#   one node named `hostname -s` with this machine's CPUs and memory; partition `debug`).
#   A slurm.conf that this script did not write is never touched: the script stops instead.
# - Starts munged, slurmctld and slurmd as daemons, records their PIDs in the state directory,
#   and waits until the node is idle. stop_local_cluster.sh stops exactly those.
# - Idempotent: when the cluster is already up, it prints so and exits 0.
#
# Environment:
#   SALT_SLURM_STATE_DIR   state, spool, logs, PIDs (default /var/lib/salt-local-slurm)
#   SALT_SLURM_TIMEOUT     seconds to wait for the node to become idle (default 60)
#
# No sacct: accounting is off (submitit only warns that it cannot read job states).
set -euo pipefail

STATE_DIR=${SALT_SLURM_STATE_DIR:-/var/lib/salt-local-slurm}
TIMEOUT=${SALT_SLURM_TIMEOUT:-60}
CONF=/etc/slurm/slurm.conf
MARKER="# Written by salt's scripts/slurm/start_local_cluster.sh"
HOST=$(hostname -s)

say() { echo "start_local_cluster: $*"; }
die() {
    echo "start_local_cluster: error: $*" >&2
    exit 1
}

[[ $(id -u) -eq 0 ]] || die "run as root (it installs packages and starts system daemons)."

# ---- packages ----------------------------------------------------------------------------
install_packages() {
    local missing=()
    for bin in /usr/sbin/slurmctld /usr/sbin/slurmd /usr/bin/sbatch /usr/sbin/munged; do
        [[ -x $bin ]] || missing+=("$bin")
    done
    ((${#missing[@]} == 0)) && return 0
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them."
    say "installing slurmctld slurmd slurm-client munge"
    # Daemons must not be started by the packages' scripts: this script starts (and owns) them.
    local policy=/usr/sbin/policy-rc.d added_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && added_policy=1
    fi
    local rc=0
    {
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q &&
            apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge
    } || rc=$?
    ((added_policy)) && rm -f "$policy"
    ((rc == 0)) || die "apt-get install failed (exit $rc)."
}

# ---- PIDs of the daemons this script started ---------------------------------------------
# alive NAME: the PID recorded for NAME when it is still that program, else nothing.
alive() {
    local file=$STATE_DIR/$1.pid pid
    [[ -s $file ]] || return 1
    pid=$(<"$file")
    [[ $pid =~ ^[0-9]+$ && -r /proc/$pid/comm && $(</proc/"$pid"/comm) == "$1" ]] || return 1
    echo "$pid"
}

# foreign NAME: fail when NAME runs but was not started by this script.
foreign() {
    local ours others
    ours=$(alive "$1" || true)
    others=$(pgrep -x "$1" | grep -vx "${ours:-none}" || true)
    [[ -z $others ]] || die "$1 already runs (pid $(echo "$others" | tr '\n' ' ')) and was not" \
        "started by this script; stop it, or use that cluster."
}

# wait_pidfile FILE: the PID a daemonizing program wrote to FILE (up to 10 s).
wait_pidfile() {
    local i
    for ((i = 0; i < 100; i++)); do
        if [[ -s $1 ]]; then
            cat "$1"
            return 0
        fi
        sleep 0.1
    done
    return 1
}

node_state() { sinfo -h -n "$HOST" -o %t 2>/dev/null | head -n1 || true; }

cluster_up() {
    alive munged >/dev/null && alive slurmctld >/dev/null && alive slurmd >/dev/null &&
        [[ $(node_state) =~ ^(idle|mix|alloc|comp)$ ]]
}

# ---- configuration -----------------------------------------------------------------------
write_config() {
    mkdir -p /etc/slurm
    if [[ -e $CONF ]] && ! grep -qxF "$MARKER" "$CONF"; then
        die "$CONF exists and was not written by this script; not touching a real cluster's" \
            "configuration."
    fi
    local hw
    # this machine's CPUs, sockets, cores, threads and memory, as slurmd itself sees them
    hw=$(slurmd -C | head -n1 | sed -E 's/^NodeName=[^ ]+ //')
    [[ $hw == *CPUs=* ]] || die "slurmd -C did not report the node's hardware: $hw"
    local tmp=$CONF.tmp.$$
    cat >"$tmp" <<EOF
$MARKER
# A single-node cluster for tests: no cgroups, no accounting, root runs everything.
ClusterName=salt-local
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# a requeued job waits cred_expire seconds before it may start again (default 120)
AuthInfo=cred_expire=10
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
SchedulerType=sched/backfill
# react within seconds: jobs (and requeued jobs) start quickly
SchedulerParameters=sched_interval=2,bf_interval=2
StateSaveLocation=$STATE_DIR/slurmctld
SlurmdSpoolDir=$STATE_DIR/slurmd
SlurmctldPidFile=$STATE_DIR/slurmctld.pidfile
SlurmdPidFile=$STATE_DIR/slurmd.pidfile
SlurmctldLogFile=$STATE_DIR/slurmctld.log
SlurmdLogFile=$STATE_DIR/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
SlurmdParameters=config_overrides
ReturnToService=2
# jobs may be requeued (submitit requeues on the pre-timeout signal)
JobRequeue=1
SlurmctldTimeout=30
SlurmdTimeout=30
MessageTimeout=10
InactiveLimit=0
KillWait=5
OverTimeLimit=0
MinJobAge=300
NodeName=$HOST NodeAddr=127.0.0.1 NodeHostname=$HOST $hw State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
    # DefMemPerCPU: jobs that ask for no memory get a share, so several run side by side
    local cpus mem
    cpus=$(sed -nE 's/.*CPUs=([0-9]+).*/\1/p' <<<"$hw")
    mem=$(sed -nE 's/.*RealMemory=([0-9]+).*/\1/p' <<<"$hw")
    echo "DefMemPerCPU=$((mem / cpus))" >>"$tmp"
    mv -f "$tmp" "$CONF"
}

# ---- daemons -----------------------------------------------------------------------------
start_munged() {
    if alive munged >/dev/null; then return 0; fi
    foreign munged
    if [[ ! -s /etc/munge/munge.key ]]; then
        say "creating /etc/munge/munge.key"
        install -d -o munge -g munge -m 700 /etc/munge
        runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key
    fi
    install -d -o munge -g munge -m 755 /run/munge
    install -d -o munge -g munge -m 700 /var/lib/munge /var/log/munge
    rm -f /run/munge/munged.pid
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
    wait_pidfile /run/munge/munged.pid >"$STATE_DIR/munged.pid" || die "munged did not start."
    munge -n | unmunge >/dev/null || die "munged runs but does not answer (see /var/log/munge)."
}

start_slurmctld() {
    if alive slurmctld >/dev/null; then return 0; fi
    foreign slurmctld
    rm -f "$STATE_DIR/slurmctld.pidfile"
    /usr/sbin/slurmctld || die "slurmctld failed; see $STATE_DIR/slurmctld.log"
    wait_pidfile "$STATE_DIR/slurmctld.pidfile" >"$STATE_DIR/slurmctld.pid" ||
        die "slurmctld did not start; see $STATE_DIR/slurmctld.log"
}

start_slurmd() {
    if alive slurmd >/dev/null; then return 0; fi
    foreign slurmd
    rm -f "$STATE_DIR/slurmd.pidfile"
    /usr/sbin/slurmd || die "slurmd failed; see $STATE_DIR/slurmd.log"
    wait_pidfile "$STATE_DIR/slurmd.pidfile" >"$STATE_DIR/slurmd.pid" ||
        die "slurmd did not start; see $STATE_DIR/slurmd.log"
}

wait_idle() {
    local deadline=$((SECONDS + TIMEOUT)) state resumed=0
    while ((SECONDS < deadline)); do
        state=$(node_state)
        case $state in
        idle | mix | alloc | comp) return 0 ;;
        down* | drain* | drng* | fail*)
            # e.g. left down by a previous incarnation that was stopped with jobs running
            if ((!resumed)); then
                scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true
                resumed=1
            fi
            ;;
        esac
        sleep 0.5
    done
    die "node $HOST is '${state:-not reported}' after ${TIMEOUT}s; see $STATE_DIR/*.log"
}

# ---- main --------------------------------------------------------------------------------
install_packages
mkdir -p "$STATE_DIR/slurmctld" "$STATE_DIR/slurmd"
if cluster_up; then
    say "already running (node $HOST $(node_state)); nothing to do."
    exit 0
fi
if ! alive slurmctld >/dev/null && ! alive slurmd >/dev/null; then
    write_config
fi
start_munged
start_slurmctld
start_slurmd
wait_idle
say "up: node $HOST $(node_state), partition debug; state and logs in $STATE_DIR"
