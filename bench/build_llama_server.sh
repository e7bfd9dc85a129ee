#!/usr/bin/env bash
# Builds llama.cpp's own C++ `llama-server` from the llama.cpp sources vendored in the
# llama-cpp-python sdist that the project pins, so that benchmarks and multi-process tests can run
# it side by side with deepseek-serve on the same GGUF file and the same llama.cpp revision.
#
# Usage: bench/build_llama_server.sh            prints the path of the binary (built once, then cached)
#        bench/build_llama_server.sh llama-bench  the same for llama.cpp's `llama-bench` (one build makes both)
# Cache: $DS_LLAMA_SERVER_CACHE (default ~/.cache/deepseek-serve/llama-server/<version>-noamx)
# Compiler flags: bench/llama_build_flags.sh (no AMX kernels), as for the llama-cpp-python wheel in .ci/run.
set -Eeuo pipefail
trap 'echo "build_llama_server.sh: failed at line $LINENO: $BASH_COMMAND" >&2' ERR

here=$(cd "$(dirname "$0")/.." && pwd)
version=$(sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' "$here/pyproject.toml" | head -n 1)
[ -n "$version" ] || { echo "build_llama_server.sh: no llama-cpp-python pin in pyproject.toml" >&2; exit 1; }
cache=${DS_LLAMA_SERVER_CACHE:-$HOME/.cache/deepseek-serve/llama-server/$version-noamx}
tool=${1:-llama-server}
case $tool in
  llama-server|llama-bench) ;;
  *) echo "build_llama_server.sh: unknown tool $tool (llama-server or llama-bench)" >&2; exit 2 ;;
esac
binary="$cache/bin/$tool"
if [ -x "$binary" ]; then
  echo "$binary"
  exit 0
fi

command -v cmake >/dev/null || { echo "build_llama_server.sh: cmake is needed (apt-get install cmake)" >&2; exit 1; }
python=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "build_llama_server.sh: fetching the llama-cpp-python $version sdist" >&2
"$python" -m pip download -q --no-deps --no-binary :all: -d "$work" "llama-cpp-python==$version" >&2
tar -C "$work" -xzf "$work"/llama_cpp_python-"$version".tar.gz
src="$work/llama_cpp_python-$version/vendor/llama.cpp"
[ -f "$src/CMakeLists.txt" ] || { echo "build_llama_server.sh: no vendored llama.cpp in the sdist" >&2; exit 1; }

echo "build_llama_server.sh: building llama-server and llama-bench (a few minutes)" >&2
flags=$("$here/bench/llama_build_flags.sh")
CFLAGS="$flags" CXXFLAGS="$flags" cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=ON \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF >&2
cmake --build "$work/build" --target llama-server llama-bench -j "$(nproc)" >&2
mkdir -p "$cache/bin"
for built in llama-server llama-bench; do
  install -m 0755 "$work/build/bin/$built" "$cache/bin/$built.tmp"
  mv "$cache/bin/$built.tmp" "$cache/bin/$built"
done
echo "$binary"
