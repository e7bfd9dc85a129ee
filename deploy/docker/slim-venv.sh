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
find "$sp" \( -name '*.pyx' -o -name '*.pxd' -o -name '*.c' -o -name '*.h' \) -type f -delete
# llama.cpp's own install rules leave a second copy of its libraries, headers and cmake files
# beside the packages; llama_cpp loads only llama_cpp/lib
rm -rf "${sp:?}/llama_cpp/include" "${sp:?}/llama_cpp/bin" "${sp:?}/include" "${sp:?}/bin" \
    "$sp"/lib/libggml* "$sp"/lib/libllama* "$sp"/lib/libmtmd* "$sp/lib/cmake" "$sp/lib/pkgconfig"
rmdir "$sp/lib" 2>/dev/null || true
# wheels cannot hold symlinks, so libX.so, libX.so.0 and libX.so.0.y.z are three copies: link them
for full in "$sp"/llama_cpp/lib/lib*.so.*.*; do
    [ -f "$full" ] || continue
    file="${full##*/}"
    base="${file%%.so.*}.so"
    major="$base.$(echo "${file#"$base".}" | cut -d. -f1)"
    for alias in "$base" "$major"; do
        if [ -f "$sp/llama_cpp/lib/$alias" ] && [ ! -L "$sp/llama_cpp/lib/$alias" ] &&
            cmp -s "$full" "$sp/llama_cpp/lib/$alias"; then
            ln -sf "$file" "$sp/llama_cpp/lib/$alias"
        fi
    done
done
# only llama.cpp's own libraries, built here: stripping auditwheel-repaired libraries from
# PyPI wheels (numpy.libs/, *.libs/) breaks them ("ELF load command address/offset not page-aligned")
find "$sp/llama_cpp" -name '*.so*' -type f -exec strip --strip-unneeded {} + 2>/dev/null || true
"$venv/bin/python3" -m compileall -q -j 0 --invalidation-mode unchecked-hash "$sp" >/dev/null || true
