#!/usr/bin/env bash
# HTTP-level QPS of a running server with wrk (apt-get install wrk):
#   bench/wrk/run.sh [BASE_URL] [DURATION] [CONNECTIONS] [THREADS]
#   bench/wrk/run.sh http://127.0.0.1:8000 15s 32 2
# Runs GET /health/live, then primes and runs the cached chat completion. OPENAI_API_KEY is sent
# when set; WRK_MODEL names the model (default: the first of /v1/models).
set -euo pipefail
base=${1:-http://127.0.0.1:8000}
duration=${2:-15s}
connections=${3:-32}
threads=${4:-2}
here=$(cd "$(dirname "$0")" && pwd)
command -v wrk >/dev/null || { echo "wrk is not installed (apt-get install wrk)" >&2; exit 1; }
auth=()
[[ -n "${OPENAI_API_KEY:-}" ]] && auth=(-H "Authorization: Bearer $OPENAI_API_KEY")
if [[ -z "${WRK_MODEL:-}" ]]; then
  WRK_MODEL=$(curl -fsS "${auth[@]}" "$base/v1/models" | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')
  export WRK_MODEL
fi
echo "== GET /health/live ($duration, $connections connections, $threads threads)"
wrk -t"$threads" -c"$connections" -d"$duration" --latency -s "$here/health.lua" "$base"
echo "== POST /v1/chat/completions, cached ($duration, $connections connections, $threads threads)"
# prime the response cache with the exact body the script sends
curl -fsS -o /dev/null "${auth[@]}" -H 'Content-Type: application/json' "$base/v1/chat/completions" \
  -d "{\"model\": \"$WRK_MODEL\", \"messages\": [{\"role\": \"user\", \"content\": \"Name three colours of the rainbow.\"}], \"max_tokens\": 16, \"temperature\": 0, \"seed\": 7}"
wrk -t"$threads" -c"$connections" -d"$duration" --latency -s "$here/cached_chat.lua" "$base"
