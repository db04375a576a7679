#!/usr/bin/env bash
# A throwaway single-node Slurm cluster on this machine, for tests: munge, slurmctld and slurmd
# with every file (config, state, spool, logs, pid files, munge key and socket) under DIR.
#   eval "$(scripts/slurm/cluster.sh start DIR)"   # installs the Debian packages if missing,
#                                                  # prints `export SLURM_CONF=DIR/slurm.conf`
#   scripts/slurm/cluster.sh stop DIR              # stops what start started, by pid
# Runs as root, without systemd. A requeued job waits ~2 minutes before it may start again;
# `scontrol update jobid=J starttime=now+1` makes it eligible at once.
set -euo pipefail

log() { echo "cluster: $*" >&2; }

stop() {
    local dir=$1 pid
    for name in slurmd slurmctld munged; do
        [ -f "$dir/pids/$name.pid" ] || continue
        pid=$(cat "$dir/pids/$name.pid")
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null || true
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -KILL "$pid" 2>/dev/null || true
        fi
        rm -f "$dir/pids/$name.pid"
    done
}

free_port() {
    python3 - 2>/dev/null <<'PY' || echo $((20000 + RANDOM % 20000))
import socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])
PY
}

fail() {
    local dir=$1; shift
    log "$*"
    for f in "$dir"/log/*.log; do [ -f "$f" ] && { log "--- $f"; tail -20 "$f" >&2; }; done
    stop "$dir"
    exit 1
}

start() {
    local dir=$1
    if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
        || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
        log "installing slurmctld slurmd slurm-client munge"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge >&2 \
            || { apt-get update >&2 && apt-get install -y --no-install-recommends \
                 slurmctld slurmd slurm-client munge >&2; }
    fi
    mkdir -p "$dir"/{state,spool,log,pids,munge}
    dir=$(cd "$dir" && pwd)
    chmod 700 "$dir/munge"
    local host cpus ctld_port d_port
    host=$(hostname -s)
    cpus=$(nproc)
    ctld_port=$(free_port)
    d_port=$(free_port)
    [ "$ctld_port" != "$d_port" ] || d_port=$((ctld_port + 1))

    dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
    chmod 600 "$dir/munge/munge.key"
    munged --force --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
        --pid-file="$dir/pids/munged.pid" --log-file="$dir/log/munged.log" \
        --seed-file="$dir/munge/seed" || fail "$dir" "munged did not start"

    cat > "$dir/slurm.conf" <<CONF
ClusterName=prolora-test
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmctldPort=$ctld_port
SlurmdPort=$d_port
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/pids/slurmctld.pid
SlurmdPidFile=$dir/pids/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
ReturnToService=2
JobRequeue=1
KillWait=60
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
    export SLURM_CONF="$dir/slurm.conf"
    slurmctld -i -f "$SLURM_CONF" || fail "$dir" "slurmctld did not start"
    slurmd -f "$SLURM_CONF" || fail "$dir" "slurmd did not start"
    for _ in $(seq 120); do
        if sinfo -h -o %T 2>/dev/null | grep -qx idle; then
            log "node $host idle (ports $ctld_port, $d_port)"
            echo "export SLURM_CONF=$dir/slurm.conf"
            return 0
        fi
        sleep 0.5
    done
    fail "$dir" "the node did not become idle within 60 s: $(sinfo 2>&1 | tail -2)"
}

case "${1:-}" in
    start) start "${2:?usage: $0 start DIR}" ;;
    stop) stop "${2:?usage: $0 stop DIR}" ;;
    *) echo "usage: $0 start|stop DIR" >&2; exit 2 ;;
esac
