# shellcheck shell=bash
# Shared helpers for deploy.sh, backup.sh and restore.sh: timestamped logging, failing loudly
# with the line number, and running docker compose from the project directory.

# log LEVEL MESSAGE...: one timestamped line on stderr (and in $DS_LOG_FILE when set)
log() {
    local level="$1"
    shift
    local line
    line="$(date -u +%Y-%m-%dT%H:%M:%SZ) [$level] $*"
    printf '%s\n' "$line" >&2
    if [[ -n "${DS_LOG_FILE:-}" ]]; then
        printf '%s\n' "$line" >>"$DS_LOG_FILE" 2>/dev/null || true
    fi
}
info() { log INFO "$@"; }
warn() { log WARN "$@"; }

# die MESSAGE [EXIT_CODE]
die() {
    log ERROR "$1"
    exit "${2:-1}"
}

# on_err: ERR trap naming the script, line and command that failed
on_err() {
    local rc=$? line="$1" cmd="$2"
    log ERROR "${0##*/}: line $line: '$cmd' exited with status $rc"
    exit "$rc"
}

# utc_stamp: sortable UTC timestamp for file names
utc_stamp() { date -u +%Y%m%dT%H%M%SZ; }

# sha256_of FILE: the hex digest only
sha256_of() { sha256sum -- "$1" | awk '{print $1}'; }

# compose ARGS...: docker compose run from $PROJECT_DIR (set by the caller), so that its .env is
# read, including COMPOSE_FILE (e.g. compose.yaml:deploy/compose.gpu.yaml on a GPU host)
compose() { (cd "$PROJECT_DIR" && docker compose "$@"); }
