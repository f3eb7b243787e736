#!/usr/bin/env bash
# Compile-check every CUDA source with nvcc against the installed (CPU) torch headers, in the
# configuration setup.py builds with a CUDA torch: -DBNMEM_WITH_CUDA -DBNMEM_ATEN_CUDA (the c10/cuda
# stream and guard headers) and setup.py's C++ standard (its CXX_STD line). A CPU torch wheel ships
# c10/cuda/*.h but not the header its CMake build generates (c10/cuda/impl/cuda_cmake_macros.h);
# a one-line stand-in for it is written to a temporary include folder. The light fallback
# (no BNMEM_ATEN_CUDA: legacy default stream) is compiled too, for the first file only.
# Usage: bash .ci/compile_cuda.sh [files...]   (default: csrc/cuda/*.cu). Runs 2 at a time.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvcc >/dev/null 2>&1; then echo "compile_cuda: nvcc not found, skipped"; exit 0; fi
std=$(sed -n 's/^CXX_STD = "\(-std=c++[0-9]*\)".*/\1/p' setup.py)
[ -n "$std" ] || { echo "compile_cuda: no CXX_STD line in setup.py"; exit 1; }
mapfile -t files < <(if [ $# -gt 0 ]; then printf '%s\n' "$@"; else ls csrc/cuda/*.cu; fi)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
mkdir -p "$out/stub/c10/cuda/impl"
[ -f "$(python -c 'import torch, os; print(os.path.dirname(torch.__file__))')/include/c10/cuda/impl/cuda_cmake_macros.h" ] ||
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$out/stub/c10/cuda/impl/cuda_cmake_macros.h"
inc=$(python -c "import sysconfig, torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths() + [sysconfig.get_paths()['include']]))")
inc="$inc -I$out/stub"
echo "compile_cuda: nvcc $std, -DBNMEM_WITH_CUDA -DBNMEM_ATEN_CUDA, ${#files[@]} file(s)"
fail=0
{ printf '%s ATEN\n' "${files[@]}"; printf '%s LIGHT\n' "${files[0]}"; } | xargs -P 2 -L 1 sh -c \
  'out=$1 inc=$2 f=$3 mode=$4; defs=""; [ "$mode" = ATEN ] && defs="-DBNMEM_WITH_CUDA -DBNMEM_ATEN_CUDA"
   o="$out/$(basename "$f").$mode"
   if nvcc '"$std"' --expt-relaxed-constexpr $defs -c "$f" -o "$o.o" $inc 2>"$o.log"; then echo "compile_cuda: ok   $f ($mode)";
   else echo "compile_cuda: FAIL $f ($mode)"; cat "$o.log"; exit 1; fi' \
  _ "$out" "$inc" || fail=1
exit $fail
