#!/usr/bin/env bash
# Stop the daemons that start_local_slurm.sh started (found through their pid files under
# $LATMIX_SLURM_DIR), cancelling the cluster's jobs first. Leaves the state in place, so job ids keep
# increasing across restarts; remove $LATMIX_SLURM_DIR to start from scratch. Idempotent.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=common.sh
source "$HERE/common.sh"
STOP_TIMEOUT_S=20

cancel_jobs() {
    is_running slurmctld || return 0
    local jobs
    jobs="$(squeue -h -o %A 2>/dev/null || true)"
    [[ -z "$jobs" ]] && return 0
    log "cancelling jobs: $(echo $jobs)"
    # shellcheck disable=SC2086
    scancel $jobs || true
    for _ in $(seq $((STOP_TIMEOUT_S * 5))); do
        [[ -z "$(squeue -h -o %A 2>/dev/null)" ]] && return 0
        sleep 0.2
    done
}

stop_daemon() {
    local pid
    pid="$(cat "$(pid_file "$1")")"
    log "stopping $1 (pid $pid)"
    kill -TERM "$pid"
    for _ in $(seq $((STOP_TIMEOUT_S * 5))); do
        kill -0 "$pid" 2>/dev/null || { rm -f "$(pid_file "$1")"; return 0; }
        sleep 0.2
    done
    log "$1 ignored SIGTERM for ${STOP_TIMEOUT_S}s, killing it"
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$(pid_file "$1")"
}

main() {
    cancel_jobs
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
        if is_running "${DAEMONS[i]}"; then
            stop_daemon "${DAEMONS[i]}"
        else
            rm -f "$(pid_file "${DAEMONS[i]}")"
        fi
    done
}

main "$@"
