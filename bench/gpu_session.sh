#!/usr/bin/env bash
# The standing GPU measurements, in two parts that each fit one device command (< 10 minutes):
#   bench/gpu_session.sh http      the HTTP path with the default settings (engine process, API workers)
#                                  against the in-process runner, then chunked prefill at 256 / 512
#   bench/gpu_session.sh kernels   one-stream decode on the default GEMV configs (bf16 / int8 / int4),
#                                  then bf16 / int8 / int4 at 1 and 64 streams
# Run from the repository root on a CUDA machine. Server packages the device image lacks can travel
# as wheels in .whl/ (installed into /tmp/site); the DeepSeek coder tokenizer is looked for in
# $TOKENIZER, ../shared/fixtures/deepseek or .gpuwt/fixtures/deepseek. Results go under $OUT/<step>/.
set -uo pipefail
part=${1:?usage: bench/gpu_session.sh http|kernels}
out=${OUT:-bench-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
paths=src:bench
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >"$out/pip.log" 2>&1 || { echo "wheel install failed: $out/pip.log"; exit 3; }
  paths=/tmp/site:$paths
fi
export PYTHONPATH=$paths

step() {  # step NAME SECONDS COMMAND...: one measurement under its own time limit
  local name=$1 limit=$2
  shift 2
  echo "== $name (at most ${limit}s)"
  timeout "$limit" "$@" >"$out/$name.txt" 2>&1
  echo "== $name: exit $?"
  tail -n 25 "$out/$name.txt"
}

case $part in
  http)
    tok=${TOKENIZER:-}
    for dir in ../shared/fixtures/deepseek .gpuwt/fixtures/deepseek; do
      [ -z "$tok" ] && [ -d "$dir/deepseek-coder-1.3b-instruct" ] && tok=$dir/deepseek-coder-1.3b-instruct
    done
    [ -n "$tok" ] || { echo "no tokenizer folder: set TOKENIZER"; exit 2; }
    step http 330 python3 bench/gpu_http.py --tokenizer "$tok" --out "$out/http" --streams 8,64,128 \
      --skip-engine-core --pass-timeout 45
    step chunked 200 python3 bench/gpu_chunked.py --out "$out/chunked" --chunks 256,512 --paths graph
    ;;
  kernels)
    step gemv 280 python3 bench/gpu_gemv.py --out "$out/gemv" --skip-linears --decode-defaults --budget-s 240 \
      --variants bf16,bf16-gemv,int8-gemv,int4-gemv-g32
    step quant 280 python3 bench/gpu_quant.py --out "$out/quant" --skip-linears --variants bf16,int8,int4-triton-g32
    ;;
  *)
    echo "unknown part: $part (http or kernels)"
    exit 2
    ;;
esac
