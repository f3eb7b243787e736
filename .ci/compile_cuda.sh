#!/usr/bin/env bash
# Compile-check every CUDA source against the installed (CPU) torch headers with nvcc.
# Usage: bash .ci/compile_cuda.sh [files...]   (default: csrc/cuda/*.cu). Runs 2 at a time.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvcc >/dev/null 2>&1; then echo "compile_cuda: nvcc not found, skipped"; exit 0; fi
mapfile -t files < <(if [ $# -gt 0 ]; then printf '%s\n' "$@"; else ls csrc/cuda/*.cu; fi)
inc=$(python -c "import sysconfig, torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths() + [sysconfig.get_paths()['include']]))")
out=$(mktemp -d)
fail=0
printf '%s\n' "${files[@]}" | xargs -P 2 -I{} sh -c \
  'nvcc -std=c++20 --expt-relaxed-constexpr -c "$1" -o "$2/$(basename "$1").o" $3 2>"$2/$(basename "$1").log" && echo "compile_cuda: ok   $1" || { echo "compile_cuda: FAIL $1"; cat "$2/$(basename "$1").log"; exit 1; }' \
  _ {} "$out" "$inc" || fail=1
rm -rf "$out"
exit $fail
