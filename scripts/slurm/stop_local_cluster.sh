#!/usr/bin/env bash
# Stop the single-node Slurm cluster started by start_local_cluster.sh.
#
# Usage: scripts/slurm/stop_local_cluster.sh
#
# Cancels the jobs still on that cluster, then stops exactly the daemons the start script
# started (slurmd, slurmctld, munged: the PIDs it recorded); other processes of the same names
# are left alone. Idempotent: nothing recorded, nothing to do. The configuration, the state
# (job ids keep counting up across restarts) and the logs stay in the state directory.
#
# Environment:
#   SALT_SLURM_STATE_DIR   as for the start script (default /var/lib/salt-local-slurm)
set -euo pipefail

STATE_DIR=${SALT_SLURM_STATE_DIR:-/var/lib/salt-local-slurm}

say() { echo "stop_local_cluster: $*"; }

# alive NAME: the PID recorded for NAME when it is still that program, else nothing.
alive() {
    local file=$STATE_DIR/$1.pid pid
    [[ -s $file ]] || return 1
    pid=$(<"$file")
    [[ $pid =~ ^[0-9]+$ && -r /proc/$pid/comm && $(</proc/"$pid"/comm) == "$1" ]] || return 1
    echo "$pid"
}

stop() {
    local name=$1 pid i
    if ! pid=$(alive "$name"); then
        rm -f "$STATE_DIR/$name.pid"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        [[ -d /proc/$pid ]] || break
        sleep 0.1
    done
    if [[ -d /proc/$pid ]]; then
        say "$name (pid $pid) ignored SIGTERM for 10 s; killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$STATE_DIR/$name.pid"
    say "stopped $name (pid $pid)"
}

if [[ ! -d $STATE_DIR ]] || ! compgen -G "$STATE_DIR/*.pid" >/dev/null; then
    say "nothing started by start_local_cluster.sh is running."
    exit 0
fi

# Jobs first, so that no job step (slurmstepd) outlives the daemons.
if alive slurmctld >/dev/null && command -v squeue >/dev/null; then
    jobs=$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ' || true)
    if [[ -n ${jobs// /} ]]; then
        say "cancelling jobs $jobs"
        # shellcheck disable=SC2086  # one argument per job id
        scancel $jobs 2>/dev/null || true
        for ((i = 0; i < 100; i++)); do
            [[ -z $(squeue -h -t running,completing -o %A 2>/dev/null || true) ]] && break
            sleep 0.1
        done
    fi
fi

stop slurmd
stop slurmctld
stop munged
