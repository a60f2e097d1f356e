#!/usr/bin/env bash
# The GPU part of the checks, for a machine with a CUDA GPU (CI has none). Logs and results go
# under $OUT (default ./gpu_out). Run from the repository root:
#
#   bash .ci/gpu_check.sh           # = quick: everything a lent GPU can show, in one call
#   bash .ci/gpu_check.sh quick     # < 8 min, <= 8 files under $OUT (see below)
#   bash .ci/gpu_check.sh tests     # GPU test suite, Triton backend (no autotuning: first configs)
#   bash .ci/gpu_check.sh configs   # every tuned Triton config once (tests/test_triton_configs.py)
#   bash .ci/gpu_check.sh cuda      # build prope_kernels._C (sm_90a) and run its GPU tests (the SM80
#                                   # kernels, and the SM90 kernels forced with PROPE_CUDA_SM90=1),
#                                   # then GPU time per kernel at gemma-2b: SM80, SM90 (split
#                                   # backward), SM90 with PROPE_CUDA_SM90_BWD=atomic
#   bash .ci/gpu_check.sh bench     # the standard benchmark report + GPU time per kernel
#   bash .ci/gpu_check.sh breakdown # GPU time per kernel only (PRESET=gemma-2b by default)
#   bash .ci/gpu_check.sh sdpa      # the sdpa backend's tests, then every preset timed for our
#                                   # backends -> $OUT/dispatch_run/ and $OUT/dispatch.json (the
#                                   # table from that run alone: commit the run under bench/results/
#                                   # and write the package's table from it, bench/README.md)
#   bash .ci/gpu_check.sh all       # tests, configs, then bench (a longer machine session)
#
# quick, against one deadline (QUICK_DEADLINE_S, default 470 s from the start): the CUDA extension
# builds for sm_90a in the background from the first second (MAX_JOBS=12) while the GPU tests run
# (-v, pytest-xdist when present: each result is logged as it happens, so the names of failing
# tests survive a timeout); then the CUDA backend's tests (SM80 and SM90 kernels); then the
# benchmark at QUICK_PRESETS (default gemma-2b, then llama-gqa), our backends against cuDNN and
# FlashAttention-2 (each without RoPE and + compiled RoPE), the opt-in kernel sets and auto last;
# then a summary (bench/gpu_summary.py). Each step must end by a fixed share of the deadline
# (QUICK_SHARES, default "50 62 95": build and tests 50%, CUDA tests 62%, bench 95%, summary 100%;
# a step that ends early leaves its time to the next) and is killed at that point, so a slow step
# cannot eat the others. QUICK_TESTS="tests/test_x.py ..." runs those instead of the GPU suite;
# QUICK_PROVIDERS="a,b,..." times those instead of bench/gpu_summary.py's list. Files in
# $OUT: quick.log (every step's output), tests.xml, cuda_tests.xml (junit), bench.json, bench.md
# (the benchmark's results and report), dispatch.json (auto's table from that run), summary.md.
#
# The machine needs torch with CUDA, Triton, pytest; the CUDA build also the CUTLASS headers, and
# pytest-xdist (optional) spreads the tests' many Triton compiles over the CPU cores. A machine
# with no network gets them as wheels in the git-ignored .whl/ folder, installed from there:
#   python3 -m pip download --no-deps -d .whl nvidia-cutlass==4.2.0.0 pytest-xdist execnet
# (with the device tool: name .whl in `carry`). Exits non-zero when a step fails, 2 on a bad stage.
#
# GPU_CHECK_FAKE=1 (tests/test_gpu_check.py, on any machine): every step of quick runs
# $GPU_CHECK_FAKE_<STEP> (STEP: CUDA_BUILD, TESTS, CUDA_TESTS, BENCH) instead of its command
# (default: print a line), nothing is installed or queried; the summary step runs for real.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
STAGE="${1:-quick}"
case "$STAGE" in
  quick|tests|configs|cuda|bench|breakdown|sdpa|all) ;;
  *) echo "unknown stage $STAGE (quick, tests, configs, cuda, bench, breakdown, sdpa, all)" >&2
     exit 2 ;;
esac
START=$(date +%s)
OUT="${OUT:-$PWD/gpu_out}"
export OUT
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
FAKE="${GPU_CHECK_FAKE:-0}"
status=0
if [ "$FAKE" != 1 ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/prope_site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/prope_site"
fi
XDIST=()
if [ "$FAKE" != 1 ] && "$PY" -c "import xdist" 2>/dev/null; then
  XDIST=(-n "${PYTEST_WORKERS:-8}")
fi
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
# quick builds into a folder of its own and copies the library into the package once the tests
# that run alongside are done (none of them sees a half-written prope_kernels/_C)
BUILD_LIB=/tmp/prope_build_lib
BUILD_CMD=(env PROPE_FORCE_CUDA_BUILD=1 PROPE_CUDA_ARCHS="${PROPE_CUDA_ARCHS:-9.0a}"
           MAX_JOBS="${MAX_JOBS:-12}" "$PY" setup.py -q build_ext --build-lib "$BUILD_LIB")
# the GPU suite: everything but the files of other stages and the CPU-only compile/smoke checks
TEST_ARGS=(tests/ --ignore=tests/test_triton_configs.py --ignore=tests/test_cuda_backend.py
           --ignore=tests/test_triton_gpu_compile.py --ignore=tests/test_bench_smoke.py)

run() {  # run NAME CMD...: tee the output to $OUT/NAME.log, remember a failure
  local name=$1; shift
  echo "=== $name: $*"
  "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc"
  [ "$rc" -eq 0 ] || status=1
}

env_info() {
  if [ "$FAKE" = 1 ]; then echo "fake run (GPU_CHECK_FAKE=1): no GPU queried"; return; fi
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__, 'gpu', torch.cuda.get_device_name())"
  git rev-parse --short HEAD 2>/dev/null || true
}

# --- quick ---------------------------------------------------------------------------------------

DEADLINE="${QUICK_DEADLINE_S:-470}"
QUICK_PRESETS="${QUICK_PRESETS:-gemma-2b,llama-gqa}"  # in order: a spent budget cuts the tail
# the deadline's shares (percent) by which build+tests, the CUDA tests and the bench must end
read -r PCT_TESTS PCT_CUDA PCT_BENCH <<<"${QUICK_SHARES:-50 62 95}"
# QUICK_TESTS: the tests step's pytest arguments instead of the whole GPU suite (a re-check of a
# few files after a fix, when the lease has little time left)
if [ -n "${QUICK_TESTS:-}" ]; then read -r -a TEST_ARGS <<<"$QUICK_TESTS"; fi
LOG="$OUT/quick.log"
STEPS=()  # NAME=RC:SECONDS:CAP for the summary

left_until() {  # seconds from now until PCT percent of the deadline
  echo $(( START + DEADLINE * $1 / 100 - $(date +%s) ))
}

step_cmd() {  # step_cmd NAME CMD...: the command, or its fake under GPU_CHECK_FAKE=1
  local name=$1; shift
  if [ "$FAKE" = 1 ]; then
    local var="GPU_CHECK_FAKE_${name^^}"
    set -- bash -c "${!var:-echo fake $name}"
  fi
  printf '%q ' "$@"
}

qstep() {  # qstep NAME PCT CMD...: run CMD, killed when PCT% of the deadline is reached
  local name=$1 pct=$2; shift 2
  local cap t0 rc
  cap=$(left_until "$pct")
  if [ "$cap" -lt 1 ]; then
    echo "=== step $name: not started, no time left (deadline ${DEADLINE} s)" | tee -a "$LOG"
    STEPS+=("$name=skipped:0:$cap"); status=1; return
  fi
  echo "=== step $name: cap ${cap} s: $*" | tee -a "$LOG"
  t0=$(date +%s)
  # SIGINT first (pytest then writes its junit file and summary), SIGKILL 10 s later; timeout
  # signals the command's whole process group (xdist workers, nvcc jobs)
  eval "timeout -s INT -k 10 $cap $(step_cmd "$name" "$@")" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  echo "=== step $name: exit $rc after $(( $(date +%s) - t0 )) s" | tee -a "$LOG"
  STEPS+=("$name=$rc:$(( $(date +%s) - t0 )):$cap")
  [ "$rc" -eq 0 ] || status=1
}

quick() {
  local build_rc_file build_pid cap
  build_rc_file=$(mktemp /tmp/prope_build_rc.XXXXXX)
  # this stage's files only (a stale junit or bench file must not pass for this run's)
  rm -f "$OUT"/{cuda_build.log,tests.xml,cuda_tests.xml,bench.json,bench.md,dispatch.json}
  rm -f "$OUT/summary.md"
  : >"$LOG"
  # 1. the CUDA extension, in the background (own log until merged: no interleaving)
  cap=$(left_until "$PCT_TESTS")
  (
    t0=$(date +%s)
    # TERM: a background job ignores SIGINT
    eval "timeout -k 10 $cap $(step_cmd cuda_build "${BUILD_CMD[@]}")" \
      >"$OUT/cuda_build.log" 2>&1
    echo "$? $(( $(date +%s) - t0 )) $cap" >"$build_rc_file"
  ) &
  build_pid=$!
  echo "=== step cuda_build: started in the background, cap ${cap} s: ${BUILD_CMD[*]}" \
    | tee -a "$LOG"
  env_info 2>&1 | tee -a "$LOG"

  # 2. the GPU tests
  qstep tests "$PCT_TESTS" "$PY" -m pytest -v -rfE -p no:cacheprovider "${XDIST[@]}" "${TEST_ARGS[@]}" \
      --junitxml="$OUT/tests.xml"

  # 3. the CUDA backend's tests, once the build is done
  wait "$build_pid"
  local brc=124 bsec=0 bcap=$cap
  [ -s "$build_rc_file" ] && read -r brc bsec bcap <"$build_rc_file"
  rm -f "$build_rc_file"
  {
    echo "=== step cuda_build: exit $brc after $bsec s (log: last 40 lines)"
    tail -n 40 "$OUT/cuda_build.log"
  } | tee -a "$LOG"
  rm -f "$OUT/cuda_build.log"
  if [ "$brc" -eq 0 ] && [ "$FAKE" != 1 ]; then
    cp "$BUILD_LIB"/prope_kernels/_C*.so prope_kernels/ \
      || { echo "=== step cuda_build: no _C*.so under $BUILD_LIB" | tee -a "$LOG"; brc=1; }
  fi
  STEPS+=("cuda_build=$brc:$bsec:$bcap")
  if [ "$brc" -eq 0 ]; then
    qstep cuda_tests "$PCT_CUDA" "$PY" -m pytest -v -rfE -p no:cacheprovider tests/test_cuda_backend.py \
        --junitxml="$OUT/cuda_tests.xml"
  else
    echo "=== step cuda_tests: not run, the build failed" | tee -a "$LOG"
    STEPS+=("cuda_tests=skipped:0:0"); status=1
  fi

  # 4. the benchmark: QUICK_PRESETS, our backends and the peers; it stops starting new runs 45 s
  #    before its cap (a run in flight, autotuning included, takes up to about 30 s)
  local budget_min providers tmp
  if [ -n "${QUICK_PROVIDERS:-}" ]; then
    providers=$QUICK_PROVIDERS
  elif [ "$FAKE" = 1 ]; then
    providers=fake
  else
    providers=$("$PY" -m bench.gpu_summary --quick-providers) || providers="prope-*"
  fi
  cap=$(left_until "$PCT_BENCH")
  budget_min=$("$PY" -c "print(round(max($cap - 45, 10) / 60, 2))")
  tmp=$(mktemp -d /tmp/prope_bench.XXXXXX)
  qstep bench "$PCT_BENCH" bash -c "'$PY' -m bench --preset '$QUICK_PRESETS' --modes fwd,fwd+bwd \
      --providers '$providers' --out '$tmp' --no-progress --no-plots --budget-min $budget_min \
      --write-dispatch '$OUT/dispatch.json'; \
      rc=\$?; cp '$tmp/results.json' '$OUT/bench.json' && cp '$tmp/report.md' '$OUT/bench.md'; \
      exit \$rc"
  rm -rf "$tmp"

  # 5. the summary (its own 15 s at least, even when the deadline is spent)
  cap=$(left_until 100)
  [ "$cap" -ge 15 ] || cap=15
  local rc
  timeout -k 5 "$cap" "$PY" -m bench.gpu_summary --out "$OUT/summary.md" --log "$LOG" \
      --junit tests="$OUT/tests.xml" --junit cuda_tests="$OUT/cuda_tests.xml" \
      --bench "$OUT/bench.json" --deadline "$DEADLINE" --elapsed "$(( $(date +%s) - START ))" \
      "${STEPS[@]/#/--step=}" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || status=1
  local n
  n=$(find "$OUT" -type f | wc -l)
  echo "files under $OUT: $n (a lent machine returns at most 8)" | tee -a "$LOG"
  [ -f "$OUT/summary.md" ] && { echo; cat "$OUT/summary.md"; }
  echo "quick: exit $status after $(( $(date +%s) - START )) s (deadline $DEADLINE s)" \
    | tee -a "$LOG"
}

stage() {
  case "$1" in
    quick)
      quick ;;
    tests)
      # every test on the GPU (the CI matrix runs on cuda tensors there, plus the gpu-marked
      # sizes), except the stages below and the CPU-only compile/smoke checks
      run tests "$PY" -m pytest -q -rs "${XDIST[@]}" "${TEST_ARGS[@]}" \
          --junitxml="$OUT/tests.xml" ;;
    configs)
      run configs "$PY" -m pytest -q -rs "${XDIST[@]}" tests/test_triton_configs.py ;;
    cuda)
      run cuda_build env PROPE_FORCE_CUDA_BUILD=1 PROPE_CUDA_ARCHS="${PROPE_CUDA_ARCHS:-9.0a}" \
          MAX_JOBS="${MAX_JOBS:-16}" "$PY" setup.py -q build_ext --inplace
      run cuda_tests "$PY" -m pytest -q -rs tests/test_cuda_backend.py
      # SM80, SM90 (split backward), SM90 with the atomic-dQ backward, at gemma-2b; SM90 at llama-gqa
      run cuda_breakdown bash -c "PROPE_CUDA_SM90=0 '$PY' -m bench.breakdown --preset gemma-2b --backend cuda \
          && PROPE_CUDA_SM90=1 '$PY' -m bench.breakdown --preset gemma-2b --backend cuda \
          && PROPE_CUDA_SM90=1 PROPE_CUDA_SM90_BWD=atomic '$PY' -m bench.breakdown --preset gemma-2b --backend cuda \
          && PROPE_CUDA_SM90=1 '$PY' -m bench.breakdown --preset llama-gqa --backend cuda" ;;
    bench)
      # the standard report (6 files), then the GPU time per kernel at the gemma-2b shape, both
      # in bench.log (a lent machine returns at most 8 files)
      run bench bash -c "'$PY' -m bench --out '$OUT/results' --no-progress \
          && '$PY' -m bench.breakdown --preset gemma-2b \
          && '$PY' -m bench.breakdown --preset gemma-2b --p 0.25 \
          && '$PY' -m bench.breakdown --preset llama-gqa" ;;
    breakdown)
      run breakdown "$PY" -m bench.breakdown --preset "${PRESET:-gemma-2b}" ;;
    sdpa)
      run sdpa_tests "$PY" -m pytest -q -rs tests/test_sdpa_backend.py tests/test_compile.py
      run sdpa_dispatch "$PY" -m bench --write-dispatch "$OUT/dispatch.json" --no-progress \
          --out "$OUT/dispatch_run" ;;
    all)
      stage tests; stage configs; stage bench ;;
  esac
}

if [ "$STAGE" = quick ]; then
  quick
else
  env_info | tee "$OUT/env.txt"
  stage "$STAGE"
fi
exit $status
