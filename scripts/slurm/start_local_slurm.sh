#!/usr/bin/env bash
# Start a one-node Slurm cluster on 127.0.0.1 (munged, MariaDB, slurmdbd, slurmctld, slurmd) for latmix's
# Slurm tests and CI. Idempotent: installs Debian's packages if missing, starts only the daemons that are
# not already running (no systemd needed), and returns once sinfo shows the node up.
# State, configs, logs and pid files: $LATMIX_SLURM_DIR (default /tmp/latmix-slurm).
# Afterwards: export SLURM_CONF=$LATMIX_SLURM_DIR/etc/slurm.conf to use sinfo, sbatch, sacct...
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=common.sh
source "$HERE/common.sh"

PACKAGES=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)
REQUIRED_COMMANDS=(munged mariadbd mariadb-install-db slurmdbd slurmctld slurmd sinfo sacct sacctmgr scontrol)
STARTUP_TIMEOUT_S=60

require_root() {
    if [[ "$(id -u)" != 0 ]]; then
        log "run me as root: the daemons run as SlurmUser=root and packages may need installing"
        exit 1
    fi
}

install_packages() {
    local missing=()
    for command in "${REQUIRED_COMMANDS[@]}"; do
        command -v "$command" >/dev/null || missing+=("$command")
    done
    [[ ${#missing[@]} -eq 0 ]] && return
    log "installing ${PACKAGES[*]} (missing: ${missing[*]})"
    # Package scripts must not start system-wide daemons: we start our own below.
    local own_policy=""
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        own_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >"$LOG_DIR/apt.log" 2>&1 &&
        apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >>"$LOG_DIR/apt.log" 2>&1 ||
        { log "apt-get failed, see $LOG_DIR/apt.log"; tail -20 "$LOG_DIR/apt.log" >&2; exit 1; }
    [[ -n "$own_policy" ]] && rm -f /usr/sbin/policy-rc.d
    return 0
}

render() {  # render TEMPLATE OUTPUT: fill the @NAME@ placeholders of a config template
    sed -e "s|@CLUSTER@|$SLURM_CLUSTER_NAME|g" \
        -e "s|@SLURMCTLD_PORT@|$SLURMCTLD_PORT|g" \
        -e "s|@SLURMD_PORT@|$SLURMD_PORT|g" \
        -e "s|@SLURMDBD_PORT@|$SLURMDBD_PORT|g" \
        -e "s|@MARIADB_PORT@|$MARIADB_PORT|g" \
        -e "s|@STATE_DIR@|$LATMIX_SLURM_DIR/state|g" \
        -e "s|@RUN_DIR@|$RUN_DIR|g" \
        -e "s|@LOG_DIR@|$LOG_DIR|g" \
        -e "s|@MUNGE_DIR@|$MUNGE_DIR|g" \
        -e "s|@NODE_LINE@|$(node_line)|g" \
        "$1" >"$2"
}

# The node as slurmd detects it, renamed to localhost, with RealMemory a bit below the detected value
# (slurmd drains a node that reports less memory than configured).
node_line() {
    slurmd -C | head -1 | tr ' ' '\n' | awk -F= '
        $1 == "NodeName" { printf "NodeName=localhost NodeAddr=127.0.0.1"; next }
        $1 == "RealMemory" { printf " RealMemory=%d", $2 * 0.9; next }
        $1 == "UpTime" || $0 == "" { next }
        { printf " %s", $0 }'
}

write_configs() {
    mkdir -p "$ETC_DIR" "$LATMIX_SLURM_DIR/state/slurmctld" "$LATMIX_SLURM_DIR/state/slurmd"
    render "$HERE/slurm.conf.in" "$ETC_DIR/slurm.conf"
    render "$HERE/slurmdbd.conf.in" "$ETC_DIR/slurmdbd.conf"
    chmod 600 "$ETC_DIR/slurmdbd.conf"  # slurmdbd refuses a readable config
}

wait_until() {  # wait_until WHAT COMMAND...: poll COMMAND until it succeeds or the startup timeout passes
    local what="$1"; shift
    for _ in $(seq $((STARTUP_TIMEOUT_S * 5))); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    log "timed out waiting for $what; last log lines:"
    tail -n 20 "$LOG_DIR"/*.log >&2 || true
    exit 1
}

port_open() { (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

start_munged() {
    if [[ ! -f "$MUNGE_DIR/munge.key" ]]; then
        dd if=/dev/urandom of="$MUNGE_DIR/munge.key" bs=1024 count=1 status=none
        chmod 400 "$MUNGE_DIR/munge.key"
    fi
    munged --socket="$MUNGE_DIR/munge.socket" --key-file="$MUNGE_DIR/munge.key" \
        --pid-file="$(pid_file munged)" --log-file="$LOG_DIR/munged.log" --seed-file="$MUNGE_DIR/munged.seed"
    wait_until "munged" test -S "$MUNGE_DIR/munge.socket"
}

start_mariadbd() {
    if [[ ! -d "$MARIADB_DIR/data/mysql" ]]; then
        mariadb-install-db --no-defaults --datadir="$MARIADB_DIR/data" --user=root \
            --auth-root-authentication-method=normal --skip-test-db >"$LOG_DIR/mariadb-install.log" 2>&1
    fi
    setsid mariadbd --no-defaults --datadir="$MARIADB_DIR/data" --user=root \
        --bind-address=127.0.0.1 --port="$MARIADB_PORT" --socket="$RUN_DIR/mariadbd.sock" \
        --pid-file="$(pid_file mariadbd)" --log-error="$LOG_DIR/mariadb.log" --skip-log-bin \
        </dev/null >/dev/null 2>&1 &
    wait_until "MariaDB on port $MARIADB_PORT" port_open "$MARIADB_PORT"
}

start_slurmdbd() {
    slurmdbd
    wait_until "slurmdbd on port $SLURMDBD_PORT" port_open "$SLURMDBD_PORT"
    if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$SLURM_CLUSTER_NAME"; then
        sacctmgr -i add cluster "$SLURM_CLUSTER_NAME" >/dev/null
    fi
}

start_slurmctld() {
    slurmctld
    wait_until "slurmctld" scontrol ping
}

start_slurmd() {
    slurmd -N localhost
    wait_until "slurmd" test -f "$(pid_file slurmd)"
}

node_is_up() { sinfo -h -N -n localhost -o %t | grep -Eqx 'idle|mix|alloc'; }

main() {
    require_root
    mkdir -p "$LATMIX_SLURM_DIR" "$RUN_DIR" "$LOG_DIR" "$MUNGE_DIR" "$MARIADB_DIR"
    # munged wants its socket directory traversable by all, but writable only by its owner.
    chmod 755 "$LATMIX_SLURM_DIR"
    chmod 711 "$MUNGE_DIR"
    install_packages
    write_configs
    for daemon in "${DAEMONS[@]}"; do
        if is_running "$daemon"; then
            log "$daemon already running"
        else
            log "starting $daemon"
            "start_$daemon"
        fi
    done
    wait_until "the node to be idle (sinfo)" node_is_up
    log "cluster up; export SLURM_CONF=$SLURM_CONF"
}

main "$@"
