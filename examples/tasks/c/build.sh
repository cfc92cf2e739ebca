#!/usr/bin/env bash
# Builds the C example tasks with Debian's clang, lld and wasi-libc. Installs nothing: if a tool
# is missing it says which package provides it and exits 1.
#   apt-get install clang lld wasi-libc libclang-rt-14-dev-wasm32
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here}
# Debian's clang finds wasi-libc under /usr (lib/wasm32-wasi); WASI_SYSROOT overrides that.
sysroot_flag=()
[ -n "${WASI_SYSROOT:-}" ] && sysroot_flag=(--sysroot="$WASI_SYSROOT")
command -v clang >/dev/null || { echo "clang not found: apt-get install clang" >&2; exit 1; }
command -v wasm-ld >/dev/null || { echo "wasm-ld not found: apt-get install lld" >&2; exit 1; }
if [ -z "${WASI_SYSROOT:-}" ] && [ ! -f /usr/lib/wasm32-wasi/libc.a ]; then
    echo "wasi-libc not found (/usr/lib/wasm32-wasi/libc.a): apt-get install wasi-libc" >&2; exit 1
fi
mkdir -p "$out"
for src in "$here"/*.c; do
    name=$(basename "$src" .c)
    clang --target=wasm32-wasi "${sysroot_flag[@]}" -O2 -mexec-model=reactor \
        -Wall -Wextra -Werror -o "$out/$name.wasm" "$src"
    echo "built $out/$name.wasm"
done
