#!/usr/bin/env bash
# bench/gpu.sh: what bnmem checks and measures on a CUDA machine, with no internet, in one call that
# stops inside a time budget (default 330 s: fits a 15-minute device lease with the machine's start
# and a second, partial rerun).
#
#   bash bench/gpu.sh OUTDIR [--budget S] [--skip STEP,...] [--bench-args "PYTEST ARGS"] [--dry-run]
#   bash bench/gpu.sh --fetch-wheels     # on a machine WITH internet: fill bench/wheels/ first
#
# Stages, in this order; each gets min(its cap, what is left of the budget minus the report's
# reserve); a stage that fails or runs out of time is recorded and the next one runs anyway:
#   env        nvidia-smi, python/torch/triton versions, compute-sanitizer, is CUDA visible
#   wheels     pip install --no-index --no-deps bench/wheels/*.whl (only if there are any)
#   build      pip install --no-build-isolation --no-deps -e . with MAX_JOBS=16 (CUDA forced on)
#   tests      the GPU part of the suite only: pytest tests/ -m "not slow" -k "cuda or triton or gpu",
#              in parallel (pytest-xdist, -n 16), TRITON_INTERPRET unset
#   sweep      bench/gpu_sweep.py: every op x backend x dtype x shape vs fp64 -> OUTDIR/sweep.json
#   e2e        bnmem run --quick --device cuda (end to end)
#   bench:gpu  the GPU rows of every bench file first (-k "cuda or triton or gpu") -> bench JSON
#   sanitizer  compute-sanitizer memcheck and racecheck over the sweep's cuda backend at tiny shapes
#   bench:cpu  the other rows, if time is left
#   report     python bench/report.py over the bench JSON
# --skip takes stage names; "bench" skips both bench stages. --bench-args is split like a shell
# command line (quotes kept: --bench-args "-k 'exact and gpu'"). --dry-run prints the plan with each
# stage's time limit, then runs the sweep (tiny shapes, cpu/reference/Triton-interpreter backends)
# and the bench selection (collected, not run) on this machine's CPU, as a check of the script.
#
# Output: at most 8 files in OUTDIR, written as the run goes (a call killed at its limit still
# returns them): console.log (everything this script prints, teed), summary.md (a row per stage),
# env.txt, sweep.json, tests.xml, sanitizer.txt, bench.tar.gz (the bench JSON and results),
# logs.tar.gz (each stage's full log, re-packed after every stage).
#
# bench/wheels/ (opacus, backpack, unfoldNd, mlxtend for the comparison rows) is git-ignored, so it
# does not travel with the working tree by itself: name it in the device tool's `carry` parameter
# (carry: ["bench/wheels"]); without it those rows skip. Env: PYTHON (default python3), MAX_JOBS (16).
# A second call in the same lease (rerun what failed, or more bench rows) can skip what passed, e.g.
#   --skip tests,sweep,e2e,sanitizer   (a fresh machine rebuilds: keep build).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)
PYTHON=${PYTHON:-python3}
WHEELS=${BNMEM_WHEELS:-bench/wheels}
WHEEL_PINS=(opacus==1.6.0 backpack-for-pytorch==1.7.1 unfoldNd==0.2.3 mlxtend==0.25.0)

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit "${1:-2}"; }

if [ "${1:-}" = "--fetch-wheels" ]; then
  mkdir -p "$WHEELS"
  exec "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version "${BNMEM_WHEEL_PY:-3.12}" \
    --implementation cp --platform manylinux2014_x86_64 --platform any -d "$WHEELS" "${WHEEL_PINS[@]}"
fi
[ $# -ge 1 ] || usage
case "$1" in -h|--help) usage 0 ;; -*) usage ;; esac
OUTDIR=$1; shift
BUDGET=330; SKIP=","; BENCH_ARGS=""; DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --budget) BUDGET=$2; shift 2 ;;
    --skip) SKIP=",$2,"; shift 2 ;;
    --bench-args) BENCH_ARGS=$2; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) usage 0 ;;
    *) echo "gpu.sh: unknown argument $1" >&2; usage ;;
  esac
done
# --bench-args as a shell would split it (quotes respected, no globbing)
mapfile -t BENCH_ARR < <("$PYTHON" -c 'import shlex, sys; print("\n".join(shlex.split(sys.argv[1])))' "$BENCH_ARGS")
# a -k in --bench-args narrows each bench stage's own selection (pytest keeps only the last -k)
USER_K=""; REST=()
for ((i = 0; i < ${#BENCH_ARR[@]}; i++)); do
  if [ "${BENCH_ARR[$i]}" = -k ] && [ $((i + 1)) -lt ${#BENCH_ARR[@]} ]; then USER_K=${BENCH_ARR[$((i + 1))]}; i=$((i + 1))
  elif [ -n "${BENCH_ARR[$i]}" ]; then REST+=("${BENCH_ARR[$i]}"); fi   # (no --bench-args: one empty line)
done
BENCH_ARR=("${REST[@]+"${REST[@]}"}")
kexpr() { if [ -n "$USER_K" ]; then echo "($1) and ($USER_K)"; else echo "$1"; fi; }
mkdir -p "$OUTDIR" || exit 2
OUTDIR=$(cd "$OUTDIR" && pwd)
rm -f "$OUTDIR"/{console.log,summary.md,env.txt,sweep.json,tests.xml,sanitizer.txt,bench.tar.gz,logs.tar.gz}
WORK=$(mktemp -d)            # step logs and bench JSON live here; packed into OUTDIR as the run goes
mkdir -p "$WORK/logs" "$WORK/bench" "$WORK/results"
exec > >(tee -a "$OUTDIR/console.log") 2>&1
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
export PYTHONPATH="$ROOT:$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"

START=$(date +%s)
DEADLINE=$((START + BUDGET))
REPORT_RESERVE=20
FAILED=0
SUMMARY="$OUTDIR/summary.md"
printf '# bench/gpu.sh\n\nbudget %ss, started %s UTC%s\n\n| stage | exit | seconds | limit |\n|---|---|---|---|\n' \
  "$BUDGET" "$(date -u +%FT%T)" "$([ $DRY = 1 ] && echo ', DRY RUN on CPU')" > "$SUMMARY"

now() { date +%s; }
pack() {  # re-pack the logs and the bench output (few files come back from the device tool)
  tar czf "$OUTDIR/logs.tar.gz.tmp" -C "$WORK" logs && mv "$OUTDIR/logs.tar.gz.tmp" "$OUTDIR/logs.tar.gz"
  if compgen -G "$WORK/bench/*.json" >/dev/null || compgen -G "$WORK/results/*" >/dev/null; then
    tar czf "$OUTDIR/bench.tar.gz.tmp" -C "$WORK" bench results && mv "$OUTDIR/bench.tar.gz.tmp" "$OUTDIR/bench.tar.gz"
  fi
}
record() {  # stage rc seconds limit
  printf '| %s | %s | %s | %s |\n' "$1" "$2" "$3" "$4" >> "$SUMMARY"
  echo "=== [$(( $(now) - START ))s] $1: exit $2 after ${3}s (limit $4)"
  pack
}
skipped() {  # a stage is skipped by its full name or by the part before ':' ("bench" skips bench:gpu)
  [[ "$SKIP" == *",$1,"* || "$SKIP" == *",${1%%:*},"* ]]
}

# stage NAME CAP -- CMD...: run CMD with limit min(CAP, left - reserve); its output goes to the console
# (prefixed) and to logs/NAME.log. SIGINT at the limit (pytest then writes what it has), SIGKILL 10 s on.
stage() {
  local name=$1 cap=$2; shift 3
  if skipped "$name"; then record "$name" skipped 0 -; return 0; fi
  local left=$(( DEADLINE - $(now) - REPORT_RESERVE ))
  [ "$name" = report ] && left=$(( DEADLINE - $(now) ))
  local limit=$(( cap < left ? cap : left ))
  if [ "$limit" -lt 5 ]; then record "$name" "no time left" 0 "$limit"; FAILED=1; return 0; fi
  echo "=== [$(( $(now) - START ))s] $name (limit ${limit}s): $*"
  local t0 rc log="$WORK/logs/${name//[^A-Za-z0-9_.-]/_}.log"
  t0=$(now)
  timeout -s INT -k 10 "$limit" "$@" > >(tee "$log" | sed -u "s/^/  [$name] /") 2>&1
  rc=$?
  sleep 0.2   # let the tee drain
  [ "$rc" = 124 ] && echo "gpu.sh: $name stopped at its ${limit}s limit" | tee -a "$log"
  record "$name" "$rc" "$(( $(now) - t0 ))" "$limit"
  [ "$rc" = 0 ] || FAILED=1
  return 0
}

env_report() {
  echo "date: $(date -u +%FT%TZ)  host: $(hostname)  nproc: $(nproc)"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
  command -v nvcc >/dev/null && nvcc --version | tail -1
  command -v compute-sanitizer >/dev/null && echo "compute-sanitizer: $(command -v compute-sanitizer)" \
    || echo "compute-sanitizer: not found"
  "$PYTHON" - <<'EOF'
import sys, torch
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, "sm", f"{p.major}{p.minor}", "SMs", p.multi_processor_count, "mem GiB", round(p.total_memory / 2**30))
try:
    import triton; print("triton", triton.__version__)
except Exception as exc:
    print("triton unavailable:", exc)
for name in ("pytest", "xdist", "pytest_benchmark", "opacus", "backpack", "unfoldNd", "mlxtend", "matplotlib"):
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
  if [ ${#whl[@]} -eq 0 ]; then echo "no wheels in $WHEELS (carry it: the device tool's carry: [\"bench/wheels\"])"; return 0; fi
  "$PYTHON" -m pip install -q --no-index --no-deps "${whl[@]}"
}

build() {
  "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" && export BNMEM_FORCE_CUDA=1
  "$PYTHON" -m pip install -q --no-build-isolation --no-deps -e . &&
    "$PYTHON" -c "import bnmem_kernels._C as c; print('built with CUDA:', c.built_with_cuda())"
}

sanitize() {  # one memcheck and one racecheck pass over every CUDA op at tiny shapes
  command -v compute-sanitizer >/dev/null || { echo "compute-sanitizer not found: skipped"; return 0; }
  local rc=0 tool
  for tool in memcheck racecheck; do
    echo "--- compute-sanitizer --tool $tool"
    compute-sanitizer --tool "$tool" --error-exitcode 9 --print-limit 20 "$PYTHON" bench/gpu_sweep.py --device cuda \
      --tiny --backends cuda --dtypes fp32,fp64 --out "${TMPDIR:-/tmp}/bnmem-sanitizer-$tool.json" || rc=$?
  done
  return $rc
}

export PYTHON WHEELS
export -f env_report install_wheels build sanitize
# each stage's cap in seconds, in run order (the sanitizer after the GPU bench rows: least needed)
cap() { case $1 in env) echo 20 ;; wheels) echo 30 ;; build) echo 120 ;; tests) echo 45 ;; sweep) echo 45 ;;
  e2e) echo 30 ;; bench:gpu) echo 90 ;; sanitizer) echo 30 ;; bench:cpu) echo 60 ;; report) echo "$REPORT_RESERVE" ;; esac; }
TESTSEL=(tests/ -m "not slow" -k "cuda or triton or gpu" -q -p no:cacheprovider)
BENCHSEL=(-p no:cacheprovider -q --benchmark-only)

if [ "$DRY" = 1 ]; then
  echo "gpu.sh --dry-run: the plan with budget ${BUDGET}s (caps; each stage gets min(cap, left - ${REPORT_RESERVE}s)):"
  t=0
  for s in env wheels build tests sweep e2e bench:gpu sanitizer bench:cpu report; do
    set -- "$s" "$(cap "$s")"; skipped "$1" && { printf '  %-10s skipped\n' "$1"; continue; }
    reserve=$REPORT_RESERVE; [ "$1" = report ] && reserve=0
    left=$(( BUDGET - t - reserve )); [ "$left" -lt 0 ] && left=0
    lim=$(( $2 < left ? $2 : left )); t=$(( t + lim ))
    printf '  %-10s cap %3ss  worst-case end %4ss%s\n' "$1" "$2" "$t" "$([ "$lim" -lt "$2" ] && echo "  (cut to ${lim}s)")"
  done
  echo "  worst case ${t}s of ${BUDGET}s; stages usually end well before their caps"
  echo "now on this CPU: the sweep (tiny shapes) and the bench selection (collected only)"
  export TRITON_INTERPRET=1
  stage env 60 -- bash -c 'env_report; rc=$?; [ $rc = 3 ] && echo "(no CUDA here: expected in a dry run)" && rc=0; exit $rc'
  stage sweep 600 -- "$PYTHON" bench/gpu_sweep.py --device cpu --tiny --budget 150 --out "$OUTDIR/sweep.json"
  stage tests 120 -- "$PYTHON" -m pytest "${TESTSEL[@]}" --collect-only
  stage bench:gpu 120 -- "$PYTHON" -m pytest bench/ "${BENCHSEL[@]}" -k "$(kexpr 'cuda or triton or gpu')" --collect-only "${BENCH_ARR[@]+"${BENCH_ARR[@]}"}"
else
  stage env "$(cap env)" -- bash -c 'env_report > "'"$OUTDIR"'/env.txt" 2>&1; rc=$?; cat "'"$OUTDIR"'/env.txt"; exit $rc'
  if compgen -G "$WHEELS/*.whl" >/dev/null; then stage wheels "$(cap wheels)" -- bash -c install_wheels
  else record wheels "no wheels ($WHEELS not carried)" 0 -; fi
  stage build "$(cap build)" -- bash -c build
  stage tests "$(cap tests)" -- env -u TRITON_INTERPRET "$PYTHON" -m pytest "${TESTSEL[@]}" -n "$(nproc)" \
    --junitxml="$OUTDIR/tests.xml"
  stage sweep "$(cap sweep)" -- env -u TRITON_INTERPRET "$PYTHON" bench/gpu_sweep.py --device cuda --budget 35 \
    --out "$OUTDIR/sweep.json"
  stage e2e "$(cap e2e)" -- bnmem run --quick --device cuda --out "$WORK/e2e-run" --no-progress
  stage bench:gpu "$(cap bench:gpu)" -- env -u TRITON_INTERPRET "$PYTHON" -m pytest bench/ "${BENCHSEL[@]}" \
    -k "$(kexpr 'cuda or triton or gpu')" --benchmark-json="$WORK/bench/gpu_rows.json" "${BENCH_ARR[@]+"${BENCH_ARR[@]}"}"
  stage sanitizer "$(cap sanitizer)" -- bash -c 'sanitize > "'"$OUTDIR"'/sanitizer.txt" 2>&1; rc=$?; tail -40 "'"$OUTDIR"'/sanitizer.txt"; exit $rc'
  stage bench:cpu "$(cap bench:cpu)" -- env -u TRITON_INTERPRET "$PYTHON" -m pytest bench/ "${BENCHSEL[@]}" \
    -k "$(kexpr 'not (cuda or triton or gpu)')" --benchmark-json="$WORK/bench/cpu_rows.json" "${BENCH_ARR[@]+"${BENCH_ARR[@]}"}"
  if compgen -G "$WORK/bench/*.json" >/dev/null; then
    stage report "$REPORT_RESERVE" -- "$PYTHON" bench/report.py "$WORK"/bench/*.json --out "$WORK/results"
  else
    record report "no benchmark JSON" 0 -; FAILED=1
  fi
fi

printf '\ntotal %ss of %ss; %s\n' "$(( $(now) - START ))" "$BUDGET" \
  "$([ $FAILED = 0 ] && echo 'every stage passed' || echo 'SOME STAGES FAILED: see console.log and logs.tar.gz')" >> "$SUMMARY"
for md in "$WORK"/results/*.md; do [ -f "$md" ] && { printf '\n---\n' >> "$SUMMARY"; cat "$md" >> "$SUMMARY"; }; done
pack
cat "$SUMMARY"
echo "files in $OUTDIR: $(ls "$OUTDIR" | tr '\n' ' ')"
rm -rf "$WORK"
cd "$ROOT" && exit $FAILED
