#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for tests (and for trying the sbatch script).
#   scripts/slurm/cluster.sh up      # installs slurmctld/slurmd if needed (Debian), starts them
#   scripts/slurm/cluster.sh down    # stops them by the PIDs in their pid files
#   eval "$(scripts/slurm/cluster.sh env)"   # SLURM_CONF for sbatch/srun/sinfo, sacct on PATH
# Needs root. State lives in $SLURM_TEST_DIR (default /tmp/idefics2-ft-slurm). No munge:
# auth/none, as for a throw-away test cluster. No accounting either: $SLURM_TEST_DIR/bin/sacct
# answers submitit's job-state queries from scontrol (scripts/slurm/sacct-standin).
set -euo pipefail
DIR=${SLURM_TEST_DIR:-/tmp/idefics2-ft-slurm}
CONF=$DIR/slurm.conf

install() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null && return
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client
}

write_conf() {
    mkdir -p "$DIR"/{state,spool,log,bin}
    ln -sf "$(cd "$(dirname "$0")" && pwd)/sacct-standin" "$DIR/bin/sacct"
    local host node
    host=$(hostname -s)
    node=$(slurmd -C | head -n 1)
    cat > "$CONF" <<CONF
ClusterName=idefics2ft
SlurmctldHost=${host}(127.0.0.1)
AuthType=auth/none
CredType=cred/none
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
ReturnToService=2
MinJobAge=300
${node} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=${host} Default=YES MaxTime=INFINITE State=UP
CONF
}

up() {
    install
    down 2>/dev/null || true
    write_conf
    SLURM_CONF=$CONF slurmctld -f "$CONF"
    SLURM_CONF=$CONF slurmd -f "$CONF"
    for _ in $(seq 1 30); do
        if SLURM_CONF=$CONF sinfo -h -o %T 2>/dev/null | grep -qE '^idle'; then
            echo "SLURM is up: export SLURM_CONF=$CONF PATH=$DIR/bin:\$PATH"
            return 0
        fi
        sleep 1
    done
    echo "SLURM did not come up; logs in $DIR/log" >&2
    return 1
}

down() {
    if [ -f "$DIR/slurmctld.pid" ]; then  # cancel what still runs, so no job outlives the cluster
        SLURM_CONF=$CONF scancel --quiet --full --user="$(id -un)" 2>/dev/null || true
        sleep 2
    fi
    for pid_file in "$DIR/slurmd.pid" "$DIR/slurmctld.pid"; do
        [ -f "$pid_file" ] && kill "$(cat "$pid_file")" 2>/dev/null || true
        rm -f "$pid_file"
    done
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    env) echo "export SLURM_CONF=$CONF PATH=$DIR/bin:\$PATH" ;;
    *) echo "usage: $0 up|down|env" >&2; exit 2 ;;
esac
