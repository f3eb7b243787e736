#!/usr/bin/env bash
# bench/gpu.sh: everything bnmem measures on a CUDA machine, with no internet, in one call that
# finishes inside a time budget (default 450 s, under the 8 minutes asked of it on an H200).
#
#   bash bench/gpu.sh OUTDIR [--budget S] [--skip STEP,...] [--bench-args "PYTEST ARGS"] [--pack FILE] [--dry-run]
#   bash bench/gpu.sh --fetch-wheels      # on a machine WITH internet: fill bench/wheels/ first
#                                         # (BNMEM_WHEELS=DIR: another folder, for both uses)
#
# Steps, each with its own time limit taken from what is left of the budget; a step that fails or
# runs out of time is recorded and the next one runs anyway:
#   env     nvidia-smi, python/torch/triton versions, is CUDA visible           -> OUTDIR/env.log
#   wheels  pip install --no-index --no-deps bench/wheels/*.whl (if any)        -> OUTDIR/wheels.log
#   build   pip install --no-build-isolation --no-deps -e . (CUDA forced on when a GPU is visible)
#   info    python -m bnmem_kernels.info                                         -> OUTDIR/info.log
#   tests   pytest tests/ -m "not slow" with TRITON_INTERPRET unset (real Triton, CUDA backend)
#   bench   each bench/test_bench_*.py with --benchmark-only, one JSON per file -> OUTDIR/bench/*.json
#           (a file over its share of the time gets SIGINT: rows done so far are still written)
#   report  python bench/report.py OUTDIR/bench/*.json --out OUTDIR/results     -> <gpu>.json/.md/.png
# OUTDIR/summary.md lists every step's exit status and seconds; the exit status is 0 only when every
# step that ran passed. --skip takes step names (e.g. --skip wheels,build,tests to try the rest on a
# CPU machine); --dry-run prints the plan and runs nothing; --pack FILE also writes OUTDIR as one
# .tar.gz (for transports that return few files). Env: PYTHON (default python3), MAX_JOBS.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)
PYTHON=${PYTHON:-python3}
WHEELS=${BNMEM_WHEELS:-bench/wheels}
# Packages the GPU image may lack (pure-Python wheels; their other needs are in the image).
WHEEL_PINS=(opacus==1.6.0 backpack-for-pytorch==1.7.1 unfoldNd==0.2.3 mlxtend==0.25.0)

usage() { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }

if [ "${1:-}" = "--fetch-wheels" ]; then
  mkdir -p "$WHEELS"
  # for the GPU image's CPython 3.12 on x86-64 (these are pure-Python wheels; the tags keep it so)
  exec "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version "${BNMEM_WHEEL_PY:-3.12}" \
    --implementation cp --platform manylinux2014_x86_64 --platform any -d "$WHEELS" "${WHEEL_PINS[@]}"
fi
[ $# -ge 1 ] || usage
case "$1" in -h|--help) usage 0 ;; -*) usage ;; esac
OUTDIR=$1; shift
BUDGET=450; SKIP=""; BENCH_ARGS=""; PACK=""; DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --budget) BUDGET=$2; shift 2 ;;
    --skip) SKIP=",$2,"; shift 2 ;;
    --bench-args) BENCH_ARGS=$2; shift 2 ;;
    --pack) PACK=$2; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) usage 0 ;;
    *) echo "gpu.sh: unknown argument $1" >&2; usage ;;
  esac
done
mkdir -p "$OUTDIR/bench" "$OUTDIR/results" || exit 2
OUTDIR=$(cd "$OUTDIR" && pwd)
[ "$DRY" = 1 ] || rm -f "$OUTDIR"/bench/*.json  # a reused OUTDIR must not report an earlier run's rows
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PYTHONUNBUFFERED=1
export MAX_JOBS=${MAX_JOBS:-$(nproc 2>/dev/null || echo 4)}

START=$(date +%s)
DEADLINE=$((START + BUDGET))
REPORT_RESERVE=40          # seconds kept back for the report step
FAILED=0
SUMMARY="$OUTDIR/summary.md"
printf '# bench/gpu.sh %s\n\nbudget %ss, started %s UTC\n\n| step | exit | seconds | limit |\n|---|---|---|---|\n' \
  "$OUTDIR" "$BUDGET" "$(date -u +%FT%T)" > "$SUMMARY"

now() { date +%s; }
record() {  # step rc seconds limit
  printf '| %s | %s | %s | %s |\n' "$1" "$2" "$3" "$4" >> "$SUMMARY"
  echo "=== [$(( $(now) - START ))s] $1: exit $2 after ${3}s (limit $4)"
}

# step NAME CAP [RESERVE] -- CMD...: run CMD with a limit of min(CAP, time left - RESERVE), output to
# OUTDIR/NAME.log; SIGINT at the limit (pytest then writes what it has), SIGKILL 15 s later.
step() {
  local name=$1 cap=$2 reserve=$3; shift 4
  if [[ "$SKIP" == *",${name%%:*},"* ]]; then record "$name" skipped 0 -; return 0; fi
  local left=$(( DEADLINE - $(now) - reserve ))
  local limit=$(( cap < left ? cap : left ))
  if [ "$limit" -lt 5 ]; then record "$name" "no time left" 0 "$limit"; FAILED=1; return 0; fi
  if [ "$DRY" = 1 ]; then printf 'would run (limit %ss): %s\n' "$limit" "$*"; record "$name" dry-run 0 "$limit"; return 0; fi
  echo "=== [$(( $(now) - START ))s] $name (limit ${limit}s): $*"
  local t0 rc log="$OUTDIR/${name//[^A-Za-z0-9_.-]/_}.log"
  t0=$(now)
  timeout -s INT -k 15 "$limit" "$@" > "$log" 2>&1
  rc=$?
  [ "$rc" = 124 ] && echo "gpu.sh: $name stopped at its ${limit}s limit" >> "$log"
  tail -n 5 "$log" | sed 's/^/    /'
  record "$name" "$rc" "$(( $(now) - t0 ))" "$limit"
  [ "$rc" = 0 ] || FAILED=1
  return 0
}

env_report() {
  echo "date: $(date -u +%FT%TZ)  host: $(hostname)  nproc: $(nproc)"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PYTHON" - <<'EOF'
import sys, torch
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0))
try:
    import triton; print("triton", triton.__version__)
except Exception as exc:
    print("triton unavailable:", exc)
for name in ("pytest", "pytest_benchmark", "opacus", "backpack", "unfoldNd", "mlxtend", "matplotlib"):
    try:
        m = __import__(name); print(name, getattr(m, "__version__", "?"))
    except Exception as exc:
        print(name, "MISSING:", type(exc).__name__)
sys.exit(0 if torch.cuda.is_available() else 3)  # 3: no CUDA device (the rest still runs)
EOF
}

install_wheels() {
  shopt -s nullglob
  local whl=("$WHEELS"/*.whl)
  if [ ${#whl[@]} -eq 0 ]; then echo "no wheels in $WHEELS (bash bench/gpu.sh --fetch-wheels fills it)"; return 0; fi
  "$PYTHON" -m pip install --no-index --no-deps "${whl[@]}"
}

build() {
  if "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    export BNMEM_FORCE_CUDA=1  # a GPU is here: a build without the CUDA kernels is a failure
  fi
  "$PYTHON" -m pip install --no-build-isolation --no-deps -e . && "$PYTHON" -c "import bnmem_kernels._C"
}

export PYTHON WHEELS
export -f env_report install_wheels build  # `timeout` runs programs: the functions run in a child bash
step env 30 "$REPORT_RESERVE" -- bash -c env_report
step wheels 60 "$REPORT_RESERVE" -- bash -c install_wheels
step build 210 "$REPORT_RESERVE" -- bash -c build
step info 30 "$REPORT_RESERVE" -- "$PYTHON" -m bnmem_kernels.info
step tests 120 "$REPORT_RESERVE" -- env -u TRITON_INTERPRET "$PYTHON" -m pytest tests/ -m "not slow" -q \
  -p no:cacheprovider --durations=15 --junitxml="$OUTDIR/tests.xml"

shopt -s nullglob
files=(bench/test_bench_*.py)
for i in "${!files[@]}"; do
  f=${files[$i]}; base=$(basename "$f" .py)
  share=$(( (DEADLINE - $(now) - REPORT_RESERVE) / (${#files[@]} - i) ))  # fair share of what is left
  # shellcheck disable=SC2086  # BENCH_ARGS is split into pytest arguments on purpose
  step "bench:$base" "$share" "$REPORT_RESERVE" -- env -u TRITON_INTERPRET "$PYTHON" -m pytest "$f" --benchmark-only \
    -p no:cacheprovider -q --benchmark-json="$OUTDIR/bench/$base.json" $BENCH_ARGS
done
[ ${#files[@]} -gt 0 ] || { record bench "no bench/test_bench_*.py" 0 -; FAILED=1; }

jsons=("$OUTDIR"/bench/*.json)
if [ ${#jsons[@]} -gt 0 ] || [ "$DRY" = 1 ]; then
  step report 60 0 -- "$PYTHON" bench/report.py "${jsons[@]:-$OUTDIR/bench/*.json}" --out "$OUTDIR/results"
else
  record report "no benchmark JSON" 0 -; FAILED=1
fi

printf '\ntotal %ss; %s\n' "$(( $(now) - START ))" "$([ $FAILED = 0 ] && echo 'every step passed' || echo 'SOME STEPS FAILED: see the logs')" >> "$SUMMARY"
for md in "$OUTDIR"/results/*.md; do printf '\n---\n' >> "$SUMMARY"; cat "$md" >> "$SUMMARY"; done
if [ -n "$PACK" ] && [ "$DRY" = 0 ]; then
  tar czf "$PACK" -C "$(dirname "$OUTDIR")" "$(basename "$OUTDIR")" && echo "packed $PACK"
fi
cat "$SUMMARY"
cd "$ROOT" && exit $FAILED
