#!/bin/sh
# Slim a virtual environment for the runtime image: no pip/setuptools, tests, headers, stubs or
# caches; llama.cpp's shared objects stripped; bytecode compiled once (the root filesystem is read-only at run time).
# Usage: slim-venv.sh /opt/venv
set -eu
venv="${1:?usage: slim-venv.sh VENV}"
sp="$(echo "$venv"/lib/python3*/site-packages)"
"$venv/bin/python3" -m pip uninstall -y pip setuptools wheel >/dev/null 2>&1 || true
rm -rf "$venv/share" "$venv/include"
find "$sp" -depth -type d \( -name tests -o -name __pycache__ \) -prune -exec rm -rf {} +
find "$sp" -name '*.pyi' -delete
rm -rf "$sp/llama_cpp/include" "$sp/llama_cpp/bin"
# NOTE: only llama.cpp's own libraries, built here: stripping auditwheel-repaired libraries from
# PyPI wheels (numpy.libs/, *.libs/) breaks them ("ELF load command address/offset not page-aligned")
find "$sp/llama_cpp" -name '*.so*' -type f -exec strip --strip-unneeded {} + 2>/dev/null || true
"$venv/bin/python3" -m compileall -q -j 0 --invalidation-mode unchecked-hash "$sp" >/dev/null || true
