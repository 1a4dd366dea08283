# Shared by start_local_slurm.sh and stop_local_slurm.sh: where the local cluster keeps its state.
# Everything lives under one directory so that several checkouts (or CI runs) never touch /etc or each other.
LATMIX_SLURM_DIR="${LATMIX_SLURM_DIR:-/tmp/latmix-slurm}"
SLURM_CLUSTER_NAME=latmix
SLURMCTLD_PORT="${LATMIX_SLURMCTLD_PORT:-6817}"
SLURMD_PORT="${LATMIX_SLURMD_PORT:-6818}"
SLURMDBD_PORT="${LATMIX_SLURMDBD_PORT:-6819}"
MARIADB_PORT="${LATMIX_MARIADB_PORT:-3307}"

ETC_DIR="$LATMIX_SLURM_DIR/etc"
RUN_DIR="$LATMIX_SLURM_DIR/run"
LOG_DIR="$LATMIX_SLURM_DIR/log"
MUNGE_DIR="$LATMIX_SLURM_DIR/munge"
MARIADB_DIR="$LATMIX_SLURM_DIR/mariadb"
export SLURM_CONF="$ETC_DIR/slurm.conf"
# The daemons live in /usr/sbin, which a CI runner's PATH may lack.
export PATH="$PATH:/usr/sbin:/sbin"

# The daemons in the order they start; stop walks it backwards.
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)

pid_file() { echo "$RUN_DIR/$1.pid"; }

# A daemon is ours and alive if its pid file names a live process.
is_running() {
    local pid_path
    pid_path="$(pid_file "$1")"
    [[ -f "$pid_path" ]] && kill -0 "$(cat "$pid_path")" 2>/dev/null
}

log() { echo "[latmix-slurm] $*" >&2; }
