#!/usr/bin/env bash
# deepseek-serve restore: verify an archive written by backup.sh (its .sha256 file, then every part
# inside), and only then load the MySQL dump and put the Redis snapshot in place.
set -Eeuo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=deploy/lib/common.sh
source "$SCRIPT_DIR/lib/common.sh"
trap 'on_err "$LINENO" "$BASH_COMMAND"' ERR

usage() {
    cat <<'EOF'
Usage: deploy/restore.sh [options] ARCHIVE.tar.gz

Checks ARCHIVE against ARCHIVE.sha256 and the SHA256SUMS inside it; a missing or damaged file is
refused (exit 3) before anything is changed. Then restores MySQL (tables in the dump are dropped
and recreated) and Redis (the RDB replaces the data set; the AOF is rebuilt from it).

Modes:
  --mode compose         (default) through docker compose in the project directory: MySQL is loaded
                         with `docker compose exec`; Redis is stopped, its volume rewritten, started
  --mode direct          MySQL over the network (password from MYSQL_PWD); Redis by files: give
                         --redis-dir, the server must be stopped, start it again afterwards

Options:
  --verify-only          check the archive and exit
  --yes                  do not ask for confirmation
  --project-dir DIR      compose project directory (default: the directory above deploy/)
  --mysql-host H --mysql-port P --mysql-user U   direct mode (default 127.0.0.1 3306 root)
  --mysql-database DB    target database (default: the one recorded in the archive)
  --redis-dir DIR        direct mode: the stopped Redis server's data directory
  --redis-host H --redis-port P   direct mode: used only to check that Redis is stopped
  --no-mysql | --no-redis  skip one part
  -h, --help             this text

Exit status: 0 restored (or verified); 2 bad usage; 3 archive refused; 1 other failure.
EOF
}

MODE="compose"
PROJECT_DIR="$(cd "$SCRIPT_DIR/.." && pwd)"
MYSQL_HOST="127.0.0.1"
MYSQL_PORT="3306"
MYSQL_USER_NAME="root"
MYSQL_DB=""
REDIS_DIR=""
REDIS_HOST="127.0.0.1"
REDIS_PORT="6379"
DO_MYSQL=1
DO_REDIS=1
VERIFY_ONLY=0
ASSUME_YES=0
ARCHIVE=""

while (($#)); do
    # shellcheck disable=SC2034 # PROJECT_DIR is read by lib/common.sh
    case "$1" in
        --mode) MODE="${2:?--mode needs a value}"; shift 2 ;;
        --project-dir) PROJECT_DIR="${2:?}"; shift 2 ;;
        --mysql-host) MYSQL_HOST="${2:?}"; shift 2 ;;
        --mysql-port) MYSQL_PORT="${2:?}"; shift 2 ;;
        --mysql-user) MYSQL_USER_NAME="${2:?}"; shift 2 ;;
        --mysql-database) MYSQL_DB="${2:?}"; shift 2 ;;
        --redis-dir) REDIS_DIR="${2:?}"; shift 2 ;;
        --redis-host) REDIS_HOST="${2:?}"; shift 2 ;;
        --redis-port) REDIS_PORT="${2:?}"; shift 2 ;;
        --no-mysql) DO_MYSQL=0; shift ;;
        --no-redis) DO_REDIS=0; shift ;;
        --verify-only) VERIFY_ONLY=1; shift ;;
        --yes | -y) ASSUME_YES=1; shift ;;
        -h | --help) usage; exit 0 ;;
        -*) usage >&2; die "unknown option: $1" 2 ;;
        *) [[ -z "$ARCHIVE" ]] || die "one archive at a time" 2; ARCHIVE="$1"; shift ;;
    esac
done

[[ -n "$ARCHIVE" ]] || { usage >&2; die "no archive given" 2; }
[[ "$MODE" == compose || "$MODE" == direct ]] || die "--mode must be compose or direct (got '$MODE')" 2

refuse() { die "REFUSED: $1" 3; }

# --- 1. verify: outer checksum, gzip stream, inner checksums, dump trailer ------------------------
[[ -f "$ARCHIVE" ]] || refuse "$ARCHIVE does not exist"
sumfile="$ARCHIVE.sha256"
[[ -f "$sumfile" ]] || refuse "checksum file $sumfile is missing"
expected="$(awk 'NR==1 {print $1}' "$sumfile")"
[[ "$expected" =~ ^[0-9a-f]{64}$ ]] || refuse "checksum file $sumfile is malformed"
actual="$(sha256_of "$ARCHIVE")"
[[ "$actual" == "$expected" ]] || refuse "sha256 mismatch for $ARCHIVE (expected $expected, got $actual)"
info "checksum ok: $actual"

WORK="$(mktemp -d)"
cleanup() { rm -rf "$WORK"; }
trap cleanup EXIT
tar -C "$WORK" -xzf "$ARCHIVE" 2>/dev/null || refuse "$ARCHIVE is not a readable tar.gz"
[[ -f "$WORK/SHA256SUMS" && -f "$WORK/MANIFEST" ]] || refuse "archive lacks SHA256SUMS or MANIFEST"
(cd "$WORK" && sha256sum --quiet --strict -c SHA256SUMS) >&2 || refuse "a part of the archive fails its checksum"
grep -q '^format=deepseek-backup/1$' "$WORK/MANIFEST" || refuse "unknown archive format"

has_mysql=0
has_redis=0
if [[ -f "$WORK/mysql.sql" ]]; then
    has_mysql=1
    tail -n 1 "$WORK/mysql.sql" | grep -q -- '-- Dump completed' || refuse "mysql.sql is truncated"
fi
if [[ -f "$WORK/redis.rdb" ]]; then
    has_redis=1
    [[ "$(head -c 5 "$WORK/redis.rdb")" == "REDIS" ]] || refuse "redis.rdb is not an RDB file"
fi
recorded_db="$(sed -n 's/^mysql_database=//p' "$WORK/MANIFEST")"
MYSQL_DB="${MYSQL_DB:-${recorded_db:-deepseek}}"
[[ "$MYSQL_DB" =~ ^[A-Za-z0-9_]+$ ]] || die "database name must be [A-Za-z0-9_]+ (got '$MYSQL_DB')" 2
info "archive ok: $(sed -n 's/^created_utc=//p' "$WORK/MANIFEST") mysql=$has_mysql redis=$has_redis"
if ((VERIFY_ONLY)); then
    echo "verified: $ARCHIVE"
    exit 0
fi

((DO_MYSQL && !has_mysql)) && { warn "archive has no MySQL dump; skipping MySQL"; DO_MYSQL=0; }
((DO_REDIS && !has_redis)) && { warn "archive has no Redis snapshot; skipping Redis"; DO_REDIS=0; }
if ((DO_REDIS)) && [[ "$MODE" == direct && -z "$REDIS_DIR" ]]; then
    die "direct mode needs --redis-dir to restore Redis (or pass --no-redis)" 2
fi

if ((!ASSUME_YES)); then
    [[ -t 0 ]] || die "not a terminal: pass --yes to restore without confirmation" 2
    read -r -p "Restore $ARCHIVE over the current data (mysql=$DO_MYSQL, redis=$DO_REDIS)? [y/N] " answer
    [[ "$answer" == [yY]* ]] || die "cancelled" 1
fi

# --- 2. MySQL ---------------------------------------------------------------------------------
if ((DO_MYSQL)); then
    info "mysql: loading the dump into $MYSQL_DB"
    if [[ "$MODE" == compose ]]; then
        # shellcheck disable=SC2016  # expanded inside the container
        compose exec -T mysql sh -c 'MYSQL_PWD="$MYSQL_ROOT_PASSWORD" exec mysql -uroot "$1"' sh "$MYSQL_DB" \
            <"$WORK/mysql.sql"
    else
        mysql -h "$MYSQL_HOST" -P "$MYSQL_PORT" -u "$MYSQL_USER_NAME" \
            -e "CREATE DATABASE IF NOT EXISTS \`$MYSQL_DB\` CHARACTER SET utf8mb4"
        mysql -h "$MYSQL_HOST" -P "$MYSQL_PORT" -u "$MYSQL_USER_NAME" "$MYSQL_DB" <"$WORK/mysql.sql"
    fi
    info "mysql: restored"
fi

# --- 3. Redis ---------------------------------------------------------------------------------
# Runs as `sh -c` on the host (direct) or in a one-off redis container (compose): $1 = data dir,
# $2 = RDB. The RDB becomes both dump.rdb and the base of a fresh multi-part AOF, so the server
# loads it whether appendonly is on or off; the previous files are kept aside.
# shellcheck disable=SC2016  # a script for sh -c
PLACE_RDB='set -eu
dir="$1"; rdb="$2"; aside="$dir/pre-restore-$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$aside"
[ ! -e "$dir/dump.rdb" ] || mv "$dir/dump.rdb" "$aside/"
[ ! -e "$dir/appendonlydir" ] || mv "$dir/appendonlydir" "$aside/"
mkdir "$dir/appendonlydir"
cp "$rdb" "$dir/appendonlydir/appendonly.aof.1.base.rdb"
printf "file appendonly.aof.1.base.rdb seq 1 type b\n" >"$dir/appendonlydir/appendonly.aof.manifest"
cp "$rdb" "$dir/dump.rdb.tmp" && mv "$dir/dump.rdb.tmp" "$dir/dump.rdb"
echo "previous Redis files kept in $aside"'

if ((DO_REDIS)); then
    if [[ "$MODE" == compose ]]; then
        info "redis: stopping the redis service"
        compose stop redis
        chmod 755 "$WORK"
        chmod 644 "$WORK/redis.rdb"
        compose run --rm --no-deps -T -v "$WORK:/restore:ro" --entrypoint sh redis \
            -c "$PLACE_RDB" sh /data /restore/redis.rdb
        info "redis: starting the redis service"
        compose up -d redis
    else
        [[ -d "$REDIS_DIR" ]] || die "--redis-dir $REDIS_DIR is not a directory" 2
        reply="$(redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" ping 2>&1)" || true
        if [[ "$reply" != *"Could not connect"* ]]; then
            die "Redis still answers on $REDIS_HOST:$REDIS_PORT: stop it before restoring its files" 1
        fi
        sh -c "$PLACE_RDB" sh "$REDIS_DIR" "$WORK/redis.rdb"
        info "redis: files in place in $REDIS_DIR; start the server now"
    fi
fi

if [[ "$MODE" == compose ]] && ((DO_MYSQL || DO_REDIS)); then
    # in-process caches (API keys) would otherwise serve pre-restore state for up to their TTL
    info "restarting deepseek-app"
    compose restart deepseek-app
fi
info "restore finished"
