#!/usr/bin/env bash
# The load tests of docs/performance.md ("Load test: baseline vs deepseek-serve", "Tuning").
#   bench/load_report.sh OUT_DIR [baseline|serve|threads1|tuning|overload|wrk|llamacpp]...
#   (default: all but llamacpp). `llamacpp` runs llama.cpp's own C++ server (path in $LLAMA_SERVER; build
#   it from the llama-cpp-python sdist's vendor/llama.cpp with `cmake --build build --target llama-server`)
#   and deepseek-serve with the same threads and 8 slots, each at 1 and 8 concurrent streams.
# Each step starts its server on a free port, runs `deepseek-serve bench` against it, stops it.
# Results: OUT_DIR/<run>/{results.json,report.md,*.png}. Fixed seed 0; 8 streams x 128 tokens.
set -euo pipefail
out=${1:?usage: bench/load_report.sh OUT_DIR [step...]}
shift
steps=("$@")
[[ ${#steps[@]} -gt 0 ]] || steps=(baseline serve threads1 tuning overload wrk)
repo=$(cd "$(dirname "$0")/.." && pwd)
py="$repo/.venv/bin/python"
mkdir -p "$out"
export COLUMNS=160

free_port() { "$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

server_pid=""
start() {  # start NAME URL_PATH COMMAND...: run a server in the background, wait until URL_PATH answers 200
  local name=$1 ready=$2; shift 2
  "$@" >"$out/$name.server.log" 2>&1 &
  server_pid=$!
  for _ in $(seq 1 600); do
    curl -fsS -o /dev/null "http://127.0.0.1:$port$ready" 2>/dev/null && return 0
    kill -0 "$server_pid" 2>/dev/null || { tail -20 "$out/$name.server.log"; return 1; }
    sleep 0.5
  done
  return 1
}
stop() { kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; }
trap stop EXIT

bench() {  # bench NAME ARGS...
  local name=$1; shift
  "$repo/.venv/bin/deepseek-serve" bench --base-url "http://127.0.0.1:$port" --seed 0 --no-progress \
    --server-pid "$server_pid" --label "$name" -o "$out/$name" "$@" | tee "$out/$name.log"
}

serve() {  # serve NAME [DS_X=Y...]: deepseek-serve with the given settings (Redis for limits and cache)
  local name=$1; shift
  port=$(free_port)
  start "$name" /health/ready env DS_DATA_DIR="$out/$name.data" DS_AUTH=off DS_LOG_LEVEL=warning \
    DS_REDIS_URL=redis://127.0.0.1:6379/0 DS_REDIS_KEY_PREFIX="bench-$RANDOM-$name:" "$@" \
    "$repo/.venv/bin/deepseek-serve" serve --host 127.0.0.1 --port "$port"
}

main8=(-c 8 -n 16 --max-tokens 128 --ignore-eos --warmup 1)
# the baseline has no response cache; runs compared with it turn ours off (the `short` workload
# repeats prompts, which our cache would answer without the model).
nocache=(DS_RESPONSE_CACHE=false)

for step in "${steps[@]}"; do
  case $step in
    baseline)
      # torch threads 1: on this shared 2-core machine 1 thread decoded 4x faster than 2 (see the report)
      port=$(free_port)
      start baseline /v1/models "$py" "$repo/bench/baseline_server.py" --port "$port" --threads 1
      bench baseline "${main8[@]}"
      stop ;;
    serve)
      serve serve-default "${nocache[@]}"
      bench serve-default "${main8[@]}"
      stop ;;
    threads1)
      serve tune-threads1 DS_N_THREADS=1 "${nocache[@]}"
      bench tune-threads1 "${main8[@]}"
      stop ;;
    tuning)
      serve tune-batch4 DS_MAX_BATCH_SIZE=4 "${nocache[@]}"
      bench tune-batch4 "${main8[@]}"
      stop
      serve tune-batch16 DS_MAX_BATCH_SIZE=16 "${nocache[@]}"
      bench tune-batch16 -c 16 -n 16 --max-tokens 128 --ignore-eos --warmup 1
      stop
      # prefix cache: multi-turn conversations sharing a long system prompt
      serve tune-prefix-on "${nocache[@]}"
      bench tune-prefix-on -w multi-turn -c 4 -n 16 --max-tokens 32 --warmup 1
      stop
      serve tune-prefix-off "${nocache[@]}" DS_PREFIX_CACHE=false
      bench tune-prefix-off -w multi-turn -c 4 -n 16 --max-tokens 32 --warmup 1
      stop
      # response cache: the same deterministic request again and again
      serve tune-rcache-on
      bench tune-rcache-on -w repeat -c 8 -n 32 --max-tokens 64 --warmup 1
      stop
      serve tune-rcache-off DS_RESPONSE_CACHE=false
      bench tune-rcache-off -w repeat -c 8 -n 32 --max-tokens 64 --warmup 1
      stop ;;
    overload)
      # open loop at 4x the measured capacity (requests/s of the tuned run, tune-threads1, at c=8)
      cap=$("$py" -c 'import json,sys; print(json.load(open(sys.argv[1]))["phases"][0]["metrics"]["request_throughput"])' \
        "$out/tune-threads1/results.json")
      rate=$("$py" -c "print(round(4 * $cap, 3))")
      for queue in 64 8; do
        serve "overload-q$queue" "${nocache[@]}" DS_N_THREADS=1 DS_MAX_QUEUE_SIZE=$queue DS_REQUEST_TIMEOUT_S=120
        bench "overload-q$queue" -r "$rate" -d 60 --max-tokens 128 --ignore-eos --warmup 1 --timeout 180
        stop
      done ;;
    llamacpp)
      : "${LLAMA_SERVER:?set LLAMA_SERVER to a llama-server binary}"
      model=$("$py" -c 'from deepseek_serve.models.resolve import default_model_path; print(default_model_path())')
      threads=$("$py" -c 'from deepseek_serve.engine.runners.llamacpp.backend import physical_cores; print(physical_cores())')
      # the same model file, threads, 8 slots and 8192 KV cells (llama-server splits them per slot);
      # its flash attention is "auto" as ours, continuous batching on, no prompt cache reuse across slots.
      port=$(free_port)
      start llama-server /health "$LLAMA_SERVER" -m "$model" -t "$threads" -tb "$threads" -np 8 -c 8192 \
        --host 127.0.0.1 --port "$port" --no-webui
      bench llama-server-c1 -c 1 -n 4 --max-tokens 128 --ignore-eos --warmup 1
      bench llama-server-c8 "${main8[@]}"
      stop
      serve serve-c1 "${nocache[@]}"
      bench serve-c1 -c 1 -n 4 --max-tokens 128 --ignore-eos --warmup 1
      bench serve-c8 "${main8[@]}"
      stop ;;
    wrk)
      serve wrk
      "$repo/bench/wrk/run.sh" "http://127.0.0.1:$port" 10s 32 2 | tee "$out/wrk.log"
      stop ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done
