#!/usr/bin/env bash
# Prints the CFLAGS/CXXFLAGS for building llama.cpp (the llama-cpp-python wheel in .ci/run, and
# llama-server / llama-bench in bench/build_llama_server.sh) for this machine's CPU without llama.cpp's
# AMX kernels. A native build compiles them in when the CPU reports AMX, and on virtual machines
# whose guest CPU reports AMX without the host keeping the tile state, the first batched matrix
# product dies with SIGILL at a tile instruction (seen on an Intel Xeon guest: `tilezero` in
# ggml_backend_amx_mul_mat). GCC and Clang let an explicit -mno-* win over -march=native whatever
# the order, so everything else stays native (AVX-512, VNNI, weight repacking).
set -euo pipefail
case $(uname -m) in
  x86_64|amd64) echo "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" ;;
  *) echo "" ;;
esac
