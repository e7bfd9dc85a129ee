#!/usr/bin/env bash
# deepseek-serve backup: a consistent MySQL dump (--single-transaction) and a Redis RDB snapshot in
# one timestamped, compressed archive with a sha256 checksum beside it; old archives are pruned.
set -Eeuo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=deploy/lib/common.sh
source "$SCRIPT_DIR/lib/common.sh"
trap 'on_err "$LINENO" "$BASH_COMMAND"' ERR

usage() {
    cat <<'EOF'
Usage: deploy/backup.sh [options]

Writes DEST/deepseek-backup-<UTC time>.tar.gz (mysql.sql, redis.rdb, SHA256SUMS, MANIFEST)
and DEST/deepseek-backup-<UTC time>.tar.gz.sha256, then prunes old archives.

Modes:
  --mode compose         (default) dump through `docker compose exec` in the project directory;
                         credentials come from the containers' own environment
  --mode direct          connect to MySQL and Redis over the network with the client tools;
                         passwords from MYSQL_PWD and REDISCLI_AUTH

Options:
  --dest DIR             where archives go (default $BACKUP_DIR or /var/backups/deepseek-serve)
  --keep N               keep the N newest archives (default $BACKUP_KEEP or 14; 0 = no count limit)
  --max-age-days D       also delete archives older than D days (default $BACKUP_MAX_AGE_DAYS or 0 = off)
  --project-dir DIR      compose project directory (default: the directory above deploy/)
  --mysql-host H         direct mode (default 127.0.0.1)
  --mysql-port P         direct mode (default 3306)
  --mysql-user U         direct mode (default root)
  --mysql-database DB    database to dump (default $MYSQL_DATABASE or deepseek)
  --redis-host H         direct mode (default 127.0.0.1)
  --redis-port P         direct mode (default 6379)
  --no-mysql | --no-redis  skip one part
  -h, --help             this text

Exit status: 0 on success; 1 on any failure (the archive is then not written).
EOF
}

MODE="compose"
DEST="${BACKUP_DIR:-/var/backups/deepseek-serve}"
KEEP="${BACKUP_KEEP:-14}"
MAX_AGE_DAYS="${BACKUP_MAX_AGE_DAYS:-0}"
PROJECT_DIR="$(cd "$SCRIPT_DIR/.." && pwd)"
MYSQL_HOST="127.0.0.1"
MYSQL_PORT="3306"
MYSQL_USER_NAME="root"
MYSQL_DB="${MYSQL_DATABASE:-deepseek}"
REDIS_HOST="127.0.0.1"
REDIS_PORT="6379"
DO_MYSQL=1
DO_REDIS=1

while (($#)); do
    # shellcheck disable=SC2034 # PROJECT_DIR is read by lib/common.sh
    case "$1" in
        --mode) MODE="${2:?--mode needs a value}"; shift 2 ;;
        --dest) DEST="${2:?--dest needs a value}"; shift 2 ;;
        --keep) KEEP="${2:?--keep needs a value}"; shift 2 ;;
        --max-age-days) MAX_AGE_DAYS="${2:?--max-age-days needs a value}"; shift 2 ;;
        --project-dir) PROJECT_DIR="${2:?--project-dir needs a value}"; shift 2 ;;
        --mysql-host) MYSQL_HOST="${2:?}"; shift 2 ;;
        --mysql-port) MYSQL_PORT="${2:?}"; shift 2 ;;
        --mysql-user) MYSQL_USER_NAME="${2:?}"; shift 2 ;;
        --mysql-database) MYSQL_DB="${2:?}"; shift 2 ;;
        --redis-host) REDIS_HOST="${2:?}"; shift 2 ;;
        --redis-port) REDIS_PORT="${2:?}"; shift 2 ;;
        --no-mysql) DO_MYSQL=0; shift ;;
        --no-redis) DO_REDIS=0; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" 2 ;;
    esac
done

[[ "$MODE" == compose || "$MODE" == direct ]] || die "--mode must be compose or direct (got '$MODE')" 2
[[ "$KEEP" =~ ^[0-9]+$ ]] || die "--keep must be a whole number (got '$KEEP')" 2
[[ "$MAX_AGE_DAYS" =~ ^[0-9]+$ ]] || die "--max-age-days must be a whole number (got '$MAX_AGE_DAYS')" 2
[[ "$MYSQL_DB" =~ ^[A-Za-z0-9_]+$ ]] || die "database name must be [A-Za-z0-9_]+ (got '$MYSQL_DB')" 2
((DO_MYSQL || DO_REDIS)) || die "nothing to back up (--no-mysql and --no-redis)" 2

mkdir -p "$DEST"
chmod 700 "$DEST"
exec 9>"$DEST/.backup.lock"
flock -n 9 || die "another backup is running (lock $DEST/.backup.lock)"

WORK="$(mktemp -d "$DEST/.work.XXXXXX")"
cleanup() { rm -rf "$WORK"; }
trap cleanup EXIT

# mysql_dump OUT: consistent InnoDB snapshot without locking the tables
mysql_dump() {
    local out="$1"
    local -a opts=(--single-transaction --quick --routines --triggers --hex-blob --no-tablespaces
        --default-character-set=utf8mb4)
    if [[ "$MODE" == compose ]]; then
        # shellcheck disable=SC2016  # expanded inside the container
        compose exec -T mysql sh -c 'MYSQL_PWD="$MYSQL_ROOT_PASSWORD" exec mysqldump -uroot "$@"' sh \
            "${opts[@]}" --set-gtid-purged=OFF "$MYSQL_DB" >"$out"
    else
        if mysqldump --help 2>/dev/null | grep -q -- '--set-gtid-purged'; then
            opts+=(--set-gtid-purged=OFF)
        fi
        mysqldump -h "$MYSQL_HOST" -P "$MYSQL_PORT" -u "$MYSQL_USER_NAME" "${opts[@]}" "$MYSQL_DB" >"$out"
    fi
    # mysqldump writes this trailer only when it finished
    tail -n 1 "$out" | grep -q -- '-- Dump completed' || die "mysqldump output is incomplete"
}

# redis_snapshot OUT: a fresh RDB fetched from the server (the replication protocol, no file access).
# to a file, not `--rdb -`: on stdout redis-cli leaves the diskless-sync EOF mark after the RDB,
# which Redis then rejects as the base of an AOF.
redis_snapshot() {
    local out="$1"
    if [[ "$MODE" == compose ]]; then
        # shellcheck disable=SC2016  # expanded inside the container
        compose exec -T redis sh -c 'f=/data/.backup-$$.rdb; trap "rm -f $f" EXIT
            REDISCLI_AUTH="$REDIS_PASSWORD" redis-cli --rdb "$f" >/dev/null && cat "$f"' >"$out"
    else
        local err
        err="$(redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" --rdb "$out" 2>&1 >/dev/null)" ||
            die "redis-cli --rdb failed: $err"
    fi
    [[ "$(head -c 5 "$out")" == "REDIS" ]] || die "Redis snapshot is not an RDB file"
}

info "backup to $DEST (mode $MODE)"
manifest="$WORK/MANIFEST"
{
    echo "format=deepseek-backup/1"
    echo "created_utc=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host=$(hostname)"
    echo "mode=$MODE"
} >"$manifest"

if ((DO_MYSQL)); then
    info "mysql: dumping database $MYSQL_DB"
    mysql_dump "$WORK/mysql.sql"
    echo "mysql_database=$MYSQL_DB" >>"$manifest"
    info "mysql: $(wc -c <"$WORK/mysql.sql") bytes"
fi
if ((DO_REDIS)); then
    info "redis: fetching an RDB snapshot"
    redis_snapshot "$WORK/redis.rdb"
    info "redis: $(wc -c <"$WORK/redis.rdb") bytes"
fi

mapfile -t parts < <(cd "$WORK" && find . -maxdepth 1 -type f -printf '%P\n' | sort)
(cd "$WORK" && sha256sum -- "${parts[@]}" >SHA256SUMS)

# one archive per second: names sort in time order
name="deepseek-backup-$(utc_stamp)"
while [[ -e "$DEST/$name.tar.gz" ]]; do
    sleep 1
    name="deepseek-backup-$(utc_stamp)"
done
archive="$DEST/$name.tar.gz"
trap 'rm -rf "$WORK" "$archive.tmp"' EXIT
tar -C "$WORK" -czf "$archive.tmp" "${parts[@]}" SHA256SUMS
mv "$archive.tmp" "$archive"
(cd "$DEST" && sha256sum "$name.tar.gz" >"$name.tar.gz.sha256")
chmod 600 "$archive" "$archive.sha256"
info "wrote $archive ($(wc -c <"$archive") bytes) and $name.tar.gz.sha256"

# retention: by count (newest first by the time in the name), then by age; never the new archive
mapfile -t archives < <(find "$DEST" -maxdepth 1 -type f -name 'deepseek-backup-*.tar.gz' -printf '%f\n' | sort -r)
if ((KEEP > 0)) && ((${#archives[@]} > KEEP)); then
    for old in "${archives[@]:KEEP}"; do
        [[ "$old" == "$name.tar.gz" ]] && continue
        info "retention: removing $old (keep $KEEP)"
        rm -f -- "$DEST/$old" "$DEST/$old.sha256"
    done
fi
if ((MAX_AGE_DAYS > 0)); then
    while IFS= read -r old; do
        [[ "$old" == "$name.tar.gz" ]] && continue
        info "retention: removing $old (older than $MAX_AGE_DAYS days)"
        rm -f -- "$DEST/$old" "$DEST/$old.sha256"
    done < <(find "$DEST" -maxdepth 1 -type f -name 'deepseek-backup-*.tar.gz' -mtime "+$((MAX_AGE_DAYS - 1))" -printf '%f\n')
fi

printf '%s\n' "$archive"
