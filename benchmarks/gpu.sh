#!/usr/bin/env bash
# The one script a session runs on a lent GPU (device tool): build, CUDA tests, every benchmark.
#
#   bash benchmarks/gpu.sh --prepare   here, with network: wheels the GPU image lacks -> .whl/
#   bash benchmarks/gpu.sh             on the GPU (device run, carry [".whl"]): results -> $OUT
#   bash benchmarks/gpu.sh --cpu       rehearsal on this CPU machine: the same steps, CPU shapes
#
# Budget: finishes within 8 minutes (each step has its own timeout) and writes each result to $OUT
# as soon as it exists, so a run cut off still returns what it finished. $OUT keeps at most 8 files:
# log.txt (environment, test and benchmark output) and one benchmark JSON per chunk. Afterwards, here:
#   cp <files_at>/bench_*.json benchmarks/results/<machine>/ && python -m benchmarks.report
set -uo pipefail
cd "$(dirname "$0")/.."

MODE=gpu
case "${1:-}" in
  --prepare) MODE=prepare ;;
  --cpu) MODE=cpu ;;
  "") ;;
  *) echo "usage: $0 [--prepare|--cpu]" >&2; exit 2 ;;
esac

WHEELS="diffusers==0.42.1 ttach==0.0.3 importlib_metadata==10.2.0"
if [ "$MODE" = prepare ]; then
  PY=${PY:-.venv/bin/python}
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  mkdir -p .whl
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl $WHEELS
  $PY -m pip wheel -q --no-deps grad-cam==1.5.7 -w .whl  # sdist only on PyPI; pure Python
  ls -la .whl
  exit 0
fi

export PYTHONUNBUFFERED=1
OUT=${OUT:-runs/gpu-rehearsal}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
START=$(date +%s)
DEADLINE=${SRDIFF_GPU_DEADLINE:-470}  # seconds: leave the device call's start and transfers room in 8 min
step() { echo "== [$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
# budget CAP: a step's timeout, at most CAP and never past the deadline (0 when it has passed)
budget() { local left=$(( DEADLINE - ($(date +%s) - START) )); (( left < $1 )) && echo $(( left > 0 ? left : 0 )) || echo "$1"; }

if [ "$MODE" = gpu ]; then
  PY=python3
  unset TRITON_INTERPRET
  if ls .whl/*.whl >/dev/null 2>&1; then
    step "install carried wheels"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >>"$LOG" 2>&1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    step "no .whl/ carried: diffusers and grad-cam peers will be reported unavailable"
  fi
  step "build srdiff._C for sm_90"
  export TORCH_CUDA_ARCH_LIST=9.0 FORCE_CUDA=1 MAX_JOBS=16 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
  timeout "$(budget 180)" $PY -m pip install -q --no-index --no-build-isolation --no-deps -e . >>"$LOG" 2>&1 \
    || step "BUILD FAILED (see log)"
  TESTS=(tests -m needs_cuda)
  BENCH_ENV=""
else
  PY=${PY:-.venv/bin/python}
  TESTS=(tests/test_gradcam.py)
  BENCH_ENV="SRDIFF_BENCH_QUICK=1"
  DEADLINE=${SRDIFF_GPU_DEADLINE:-900}
fi

step "environment"
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
  $PY -m srdiff info 2>&1
  $PY -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  git rev-parse HEAD 2>/dev/null; git status --short 2>/dev/null | head -20
} >>"$LOG" 2>&1

step "tests: ${TESTS[*]}"
timeout "$(budget 120)" $PY -m pytest "${TESTS[@]}" -q -p no:cacheprovider >>"$LOG" 2>&1
step "tests exit code $? (124: out of time)"

# One JSON per chunk, straight into $OUT (pytest-benchmark writes at the end of a run, so chunks keep
# what finished if time runs out). Most important first; the ceilings feed the report's "% of peak".
CHUNKS=(
  "ceilings|benchmarks/bench_ceilings.py||30"
  "attention_fwd|benchmarks/bench_attention.py|not bwd|150"
  "noise|benchmarks/bench_noise.py||90"
  "gradcam|benchmarks/bench_gradcam.py||60"
  "attention_fwdbwd|benchmarks/bench_attention.py|bwd|150"
  "fam|benchmarks/bench_fam.py||60"
  "train|benchmarks/bench_train.py||120"
)
for chunk in "${CHUNKS[@]}"; do
  IFS='|' read -r name file kexpr cap <<<"$chunk"
  [ -f "$file" ] || { step "skip $name: $file does not exist"; continue; }
  t=$(budget "$cap")
  (( t > 0 )) || { step "skip $name: out of time"; continue; }
  step "benchmark $name (timeout ${t}s)"
  env $BENCH_ENV timeout "$t" $PY -m pytest "$file" ${kexpr:+-k "$kexpr"} -q -p no:cacheprovider \
    -o python_files='bench_*.py' --benchmark-json="$OUT/bench_$name.json" --benchmark-columns=median,rounds >>"$LOG" 2>&1
  step "benchmark $name exit code $?"
done
step "done"
