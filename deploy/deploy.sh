#!/usr/bin/env bash
# deepseek-serve one-command deploy for a fresh Ubuntu 20.04/22.04/24.04 server: checks the host,
# installs Docker CE + the compose plugin, fetches the code, writes .env with random secrets once,
# opens the firewall, builds, starts the stack, waits until it is ready. Safe to run again.
set -Eeuo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=deploy/lib/common.sh
source "$SCRIPT_DIR/lib/common.sh"
trap 'on_err "$LINENO" "$BASH_COMMAND"' ERR

usage() {
    cat <<'EOF'
Usage: sudo deploy/deploy.sh [options]

Options:
  --repo URL          clone or update the code from URL into --dir (default: deploy the checkout
                      this script is in, without fetching)
  --ref REF           branch or tag to deploy with --repo (default: main)
  --dir DIR           install directory (default: /opt/deepseek-serve with --repo, else this checkout)
  --monitoring        also start Prometheus, Alertmanager, Grafana and the exporters
  --no-firewall       leave ufw alone
  --no-docker-install fail instead of installing Docker when it is missing
  --no-backup-timer   do not install the daily backup timer
  --app-port PORT     published API port written to a new .env (default 8000)
  --timeout SECONDS   readiness wait (default 900)
  --dry-run           check the host and print what would change; change nothing
  -h, --help          this text

Minimums (refused below): 2 CPUs, 4 GiB RAM, 20 GB free disk; 4 CPUs, 8 GiB and 100 GB recommended.
Log: /var/log/deepseek-serve/deploy-<UTC time>.log (dry runs log under $TMPDIR).

For tests, these variables replace what the script reads from the host:
  DEPLOY_ROOT         prefix for /etc/os-release, /proc/meminfo, /etc/systemd/system, /var/log, /var/backups
  DEPLOY_NPROC        CPU count     DEPLOY_DISK_FREE_GB   free disk in GB at the install directory
EOF
}

REPO=""
REF="main"
INSTALL_DIR=""
MONITORING=0
FIREWALL=1
DOCKER_INSTALL=1
BACKUP_TIMER=1
APP_PORT_NEW="8000"
TIMEOUT=900
DRY_RUN=0
MIN_CPUS=2
MIN_RAM_MB=$((4 * 1024 - 256))
MIN_DISK_GB=20

while (($#)); do
    case "$1" in
        --repo) REPO="${2:?--repo needs a URL}"; shift 2 ;;
        --ref) REF="${2:?--ref needs a value}"; shift 2 ;;
        --dir) INSTALL_DIR="${2:?--dir needs a value}"; shift 2 ;;
        --monitoring) MONITORING=1; shift ;;
        --no-firewall) FIREWALL=0; shift ;;
        --no-docker-install) DOCKER_INSTALL=0; shift ;;
        --no-backup-timer) BACKUP_TIMER=0; shift ;;
        --app-port) APP_PORT_NEW="${2:?--app-port needs a value}"; shift 2 ;;
        --timeout) TIMEOUT="${2:?--timeout needs a value}"; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" 2 ;;
    esac
done
if ! [[ "$APP_PORT_NEW" =~ ^[0-9]+$ ]] || ((APP_PORT_NEW < 1 || APP_PORT_NEW > 65535)); then
    die "--app-port must be 1-65535 (got '$APP_PORT_NEW')" 2
fi
[[ "$TIMEOUT" =~ ^[0-9]+$ ]] || die "--timeout must be a whole number of seconds" 2

ROOT_PREFIX="${DEPLOY_ROOT:-}"
if [[ -z "$INSTALL_DIR" ]]; then
    if [[ -n "$REPO" ]]; then INSTALL_DIR="$ROOT_PREFIX/opt/deepseek-serve"; else INSTALL_DIR="$(cd "$SCRIPT_DIR/.." && pwd)"; fi
fi
SYSTEMD_DIR="$ROOT_PREFIX/etc/systemd/system"
BACKUP_DIR="$ROOT_PREFIX/var/backups/deepseek-serve"
if ((DRY_RUN)); then LOG_DIR="${TMPDIR:-/tmp}"; else LOG_DIR="$ROOT_PREFIX/var/log/deepseek-serve"; fi
mkdir -p "$LOG_DIR"
DS_LOG_FILE="$LOG_DIR/deploy-$(utc_stamp).log"
export DS_LOG_FILE
CHANGES=0

# changed WHAT: count and log one change (or, in a dry run, one that would be made)
changed() {
    CHANGES=$((CHANGES + 1))
    if ((DRY_RUN)); then log PLAN "would: $*"; else log CHANGE "$*"; fi
}

# run CMD...: run a command that changes the system; a dry run prints it instead
run() {
    if ((DRY_RUN)); then
        log PLAN "would run: $*"
    else
        log RUN "$*"
        local rc=0
        "$@" 2>&1 | tee -a "$DS_LOG_FILE" || rc=$?
        if ((rc)); then
            log ERROR "${0##*/}: line ${BASH_LINENO[0]}: '$*' exited with status $rc"
            exit "$rc"
        fi
    fi
}

# --- 1. host checks ---------------------------------------------------------------------------
# os_field KEY: a value from os-release, quotes removed (read, never sourced)
os_field() { sed -n "s/^$1=//p" "$ROOT_PREFIX/etc/os-release" | head -n 1 | tr -d '"'"'"; }

check_host() {
    local os_release="$ROOT_PREFIX/etc/os-release" meminfo="$ROOT_PREFIX/proc/meminfo"
    [[ -r "$os_release" ]] || die "cannot read $os_release: unsupported system" 2
    local id version
    id="$(os_field ID)"
    version="$(os_field VERSION_ID)"
    case "$id:$version" in
        ubuntu:20.04 | ubuntu:22.04 | ubuntu:24.04) info "OS: Ubuntu $version" ;;
        *) die "unsupported OS '$id $version': this script supports Ubuntu 20.04, 22.04 and 24.04 (see docs/deployment.md for others)" 2 ;;
    esac
    if ((EUID != 0)) && ((!DRY_RUN)); then
        die "run as root (sudo deploy/deploy.sh ...)" 2
    fi

    local cpus="${DEPLOY_NPROC:-$(nproc)}"
    ((cpus >= MIN_CPUS)) || die "$cpus CPU(s): at least $MIN_CPUS are needed" 2
    ((cpus >= 4)) || warn "$cpus CPUs: 4 or more recommended"
    info "CPUs: $cpus"

    local mem_kb mem_mb
    mem_kb="$(awk '/^MemTotal:/ {print $2}' "$meminfo")"
    [[ "$mem_kb" =~ ^[0-9]+$ ]] || die "cannot read MemTotal from $meminfo" 2
    mem_mb=$((mem_kb / 1024))
    ((mem_mb >= MIN_RAM_MB)) || die "${mem_mb} MiB RAM: at least 4 GiB is needed" 2
    ((mem_mb >= 7 * 1024)) || warn "${mem_mb} MiB RAM: 8 GiB or more recommended"
    info "RAM: ${mem_mb} MiB"

    local probe="$INSTALL_DIR" free_gb
    while [[ ! -d "$probe" ]]; do probe="$(dirname "$probe")"; done
    free_gb="${DEPLOY_DISK_FREE_GB:-$(df -Pk "$probe" | awk 'NR==2 {print int($4 / 1024 / 1024)}')}"
    ((free_gb >= MIN_DISK_GB)) || die "${free_gb} GB free on $probe: at least $MIN_DISK_GB GB is needed" 2
    ((free_gb >= 100)) || warn "${free_gb} GB free on $probe: 100 GB or more recommended"
    info "disk: ${free_gb} GB free on $probe"
}

# --- 2. Docker CE + compose plugin -------------------------------------------------------------
ensure_docker() {
    if command -v docker >/dev/null 2>&1 && docker compose version >/dev/null 2>&1; then
        info "docker: $(docker compose version 2>/dev/null | head -n 1)"
        return
    fi
    ((DOCKER_INSTALL)) || die "Docker with the compose plugin is missing (and --no-docker-install was given)" 2
    changed "install Docker CE and the compose plugin from Docker's apt repository"
    local codename arch
    codename="$(os_field VERSION_CODENAME)"
    arch="$(dpkg --print-architecture 2>/dev/null || echo amd64)"
    run apt-get update
    run apt-get remove -y docker.io docker-doc docker-compose podman-docker containerd runc
    run apt-get install -y ca-certificates curl gnupg
    run install -m 0755 -d /etc/apt/keyrings
    run curl -fsSL https://download.docker.com/linux/ubuntu/gpg -o /etc/apt/keyrings/docker.asc
    run chmod a+r /etc/apt/keyrings/docker.asc
    local source_line="deb [arch=$arch signed-by=/etc/apt/keyrings/docker.asc] https://download.docker.com/linux/ubuntu $codename stable"
    if ((DRY_RUN)); then
        log PLAN "would write /etc/apt/sources.list.d/docker.list: $source_line"
    else
        printf '%s\n' "$source_line" >/etc/apt/sources.list.d/docker.list
    fi
    run apt-get update
    run apt-get install -y docker-ce docker-ce-cli containerd.io docker-buildx-plugin docker-compose-plugin
    run systemctl enable --now docker
}

# --- 3. code ----------------------------------------------------------------------------------
ensure_code() {
    if [[ -z "$REPO" ]]; then
        [[ -f "$INSTALL_DIR/compose.yaml" ]] || die "$INSTALL_DIR has no compose.yaml: pass --repo URL" 2
        info "code: using $INSTALL_DIR as it is"
        return
    fi
    if [[ -d "$INSTALL_DIR/.git" ]]; then
        local before after
        before="$(git -C "$INSTALL_DIR" rev-parse HEAD)"
        run git -C "$INSTALL_DIR" fetch --tags origin "$REF"
        if ((!DRY_RUN)); then
            git -C "$INSTALL_DIR" checkout -q "$REF"
            git -C "$INSTALL_DIR" merge -q --ff-only "origin/$REF" 2>/dev/null || true
        fi
        after="$(git -C "$INSTALL_DIR" rev-parse HEAD)"
        if [[ "$before" != "$after" ]]; then changed "code updated $before -> $after"; else info "code: up to date at $after"; fi
    else
        changed "clone $REPO ($REF) into $INSTALL_DIR"
        run git clone --branch "$REF" "$REPO" "$INSTALL_DIR"
    fi
}

# --- 4. .env with random secrets, written once ----------------------------------------------------
secret() { od -An -N"$1" -tx1 /dev/urandom | tr -d ' \n'; }

ensure_env() {
    local env_file="$INSTALL_DIR/.env"
    local -a required=(MYSQL_ROOT_PASSWORD MYSQL_PASSWORD MYSQL_EXPORTER_PASSWORD REDIS_PASSWORD
        GRAFANA_ADMIN_PASSWORD DS_ADMIN_KEY)
    if [[ ! -f "$env_file" ]]; then
        changed "write $env_file with new random secrets (mode 600)"
        ((DRY_RUN)) && return
        umask 077
        cat >"$env_file" <<EOF
# Written by deploy/deploy.sh on $(date -u +%Y-%m-%dT%H:%M:%SZ). Never overwritten by it: edit freely,
# keep a copy somewhere safe. All variables: .env.example.
APP_PORT=$APP_PORT_NEW
GRAFANA_PORT=3000
MYSQL_DATABASE=deepseek
MYSQL_USER=deepseek
MYSQL_ROOT_PASSWORD=$(secret 24)
MYSQL_PASSWORD=$(secret 24)
MYSQL_EXPORTER_PASSWORD=$(secret 24)
REDIS_PASSWORD=$(secret 24)
GRAFANA_ADMIN_PASSWORD=$(secret 16)
DS_ADMIN_KEY=sk-$(secret 24)
EOF
        chmod 600 "$env_file"
        return
    fi
    local key
    for key in "${required[@]}"; do
        if ! grep -q "^$key=." "$env_file"; then
            changed "add missing $key to $env_file (existing values are never changed)"
            if ((!DRY_RUN)); then
                if [[ "$key" == DS_ADMIN_KEY ]]; then
                    printf '%s=sk-%s\n' "$key" "$(secret 24)" >>"$env_file"
                else
                    printf '%s=%s\n' "$key" "$(secret 24)" >>"$env_file"
                fi
            fi
        fi
    done
    info ".env: $env_file kept"
}

# env_value KEY DEFAULT: a value from .env (last assignment wins, as in compose)
env_value() {
    local value=""
    [[ -f "$INSTALL_DIR/.env" ]] && value="$(sed -n "s/^$1=//p" "$INSTALL_DIR/.env" | tail -n 1)"
    printf '%s' "${value:-$2}"
}

# --- 5. firewall ------------------------------------------------------------------------------
ensure_firewall() {
    if ((!FIREWALL)); then
        info "firewall: left alone (--no-firewall)"
        return
    fi
    if ! command -v ufw >/dev/null 2>&1; then
        changed "install ufw"
        run apt-get install -y ufw
    fi
    local -a ports=("22/tcp" "$(env_value APP_PORT "$APP_PORT_NEW")/tcp")
    ((MONITORING)) && ports+=("$(env_value GRAFANA_PORT 3000)/tcp")
    local status port
    status="$( (ufw status 2>/dev/null || true) | tr -s ' ')"
    for port in "${ports[@]}"; do
        if grep -q "^$port ALLOW" <<<"$status"; then
            info "firewall: $port already allowed"
        else
            changed "ufw allow $port"
            run ufw allow "$port"
        fi
    done
    if ! grep -q "^Status: active" <<<"$status"; then
        changed "enable ufw (default deny incoming)"
        run ufw default deny incoming
        run ufw --force enable
    fi
}

# --- 6. systemd units ---------------------------------------------------------------------------
# install_unit NAME: render deploy/systemd/NAME into $SYSTEMD_DIR when it differs; 0 = changed
install_unit() {
    local rendered target="$SYSTEMD_DIR/$1"
    local profiles="" template="$INSTALL_DIR/deploy/systemd/$1"
    if [[ ! -f "$template" ]] && ((DRY_RUN)); then
        changed "install $target (from the code still to be fetched)"
        return 0
    fi
    ((MONITORING)) && profiles="monitoring"
    rendered="$(sed -e "s#@INSTALL_DIR@#$INSTALL_DIR#g" -e "s#@BACKUP_DIR@#$BACKUP_DIR#g" \
        -e "s#@COMPOSE_PROFILES@#$profiles#g" "$template")"
    if [[ -f "$target" ]] && [[ "$(cat "$target")" == "$rendered" ]]; then
        info "systemd: $target up to date"
        return 1
    fi
    changed "install $target"
    if ((!DRY_RUN)); then
        mkdir -p "$SYSTEMD_DIR"
        printf '%s\n' "$rendered" >"$target"
    fi
    return 0
}

ensure_units() {
    local any=0
    install_unit deepseek-serve.service && any=1
    if ((BACKUP_TIMER)); then
        install_unit deepseek-serve-backup.service && any=1
        install_unit deepseek-serve-backup.timer && any=1
    fi
    if ((any)); then
        run systemctl daemon-reload
        run systemctl enable deepseek-serve.service
        ((BACKUP_TIMER)) && run systemctl enable --now deepseek-serve-backup.timer
    fi
    return 0
}

# --- 7. build, start, wait ----------------------------------------------------------------------
start_stack() {
    # shellcheck disable=SC2034 # read by lib/common.sh
    PROJECT_DIR="$INSTALL_DIR"
    local -a profile=()
    ((MONITORING)) && profile=(--profile monitoring)
    if ((DRY_RUN)); then
        log PLAN "would run: docker compose ${profile[*]} build && docker compose ${profile[*]} up -d"
        return
    fi
    run compose "${profile[@]}" build
    run compose "${profile[@]}" up -d --remove-orphans
}

wait_ready() {
    local port url deadline
    port="$(env_value APP_PORT "$APP_PORT_NEW")"
    url="http://127.0.0.1:$port/health/ready"
    if ((DRY_RUN)); then
        log PLAN "would wait up to ${TIMEOUT}s for $url"
        return
    fi
    info "waiting up to ${TIMEOUT}s for $url"
    deadline=$((SECONDS + TIMEOUT))
    until curl -fsS -o /dev/null --max-time 5 "$url" 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            compose ps >&2 || true
            compose logs --tail 50 deepseek-app >&2 || true
            die "not ready after ${TIMEOUT}s: see 'docker compose logs deepseek-app' and docs/deployment.md#troubleshooting"
        fi
        sleep 5
    done
    info "ready: $url"
}

summary() {
    local host port
    host="$(hostname -I 2>/dev/null | awk '{print $1}')"
    host="${host:-127.0.0.1}"
    port="$(env_value APP_PORT "$APP_PORT_NEW")"
    if ((DRY_RUN)); then
        info "dry run: $CHANGES change(s) would be made; nothing was changed. Log: $DS_LOG_FILE"
        return
    fi
    cat <<EOF

deepseek-serve is running.
  API (OpenAI-compatible): http://$host:$port/v1
  health:                  http://$host:$port/health/ready
  web chat:                http://$host:$port/
EOF
    ((MONITORING)) && echo "  Grafana:                 http://$host:$(env_value GRAFANA_PORT 3000)/ (user $(env_value GRAFANA_ADMIN_USER admin), password GRAFANA_ADMIN_PASSWORD in $INSTALL_DIR/.env)"
    cat <<EOF
  admin API key:           $(env_value DS_ADMIN_KEY "")
  secrets:                 $INSTALL_DIR/.env (mode 600)
  backups:                 $BACKUP_DIR (daily timer: systemctl list-timers deepseek-serve-backup.timer)
  log of this run:         $DS_LOG_FILE
  changes made:            $CHANGES
EOF
}

info "deepseek-serve deploy (dry run: $DRY_RUN) into $INSTALL_DIR"
check_host
ensure_docker
ensure_code
ensure_env
ensure_firewall
ensure_units
start_stack
wait_ready
summary
