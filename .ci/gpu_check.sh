#!/usr/bin/env bash
# The GPU part of the checks, for a machine with a CUDA GPU (CI has none). Each stage fits one
# 10-minute call of a lent GPU machine and writes its logs and results under $OUT (default
# ./gpu_out). Run from the repository root:
#
#   bash .ci/gpu_check.sh tests     # GPU test suite, Triton backend (no autotuning: first configs)
#   bash .ci/gpu_check.sh configs   # every tuned Triton config once (tests/test_triton_configs.py)
#   bash .ci/gpu_check.sh cuda      # build prope_kernels._C (sm_90a) and run its GPU tests (the SM80
#                                   # kernels, and the SM90 forward forced with PROPE_CUDA_SM90=1),
#                                   # then GPU time per kernel, SM80 vs SM90 forward, at gemma-2b
#   bash .ci/gpu_check.sh bench     # the standard benchmark report + GPU time per kernel
#   bash .ci/gpu_check.sh breakdown # GPU time per kernel only (PRESET=gemma-2b by default)
#   bash .ci/gpu_check.sh all       # tests, configs, then bench (a longer machine session)
#
# The machine needs torch with CUDA, Triton, pytest; the cuda stage also the CUTLASS headers, and
# pytest-xdist (optional) spreads the tests' many Triton compiles over the CPU cores. A machine
# with no network gets them as wheels in the git-ignored .whl/ folder, installed from there:
#   python3 -m pip download --no-deps -d .whl nvidia-cutlass==4.2.0.0 pytest-xdist execnet
# Exits non-zero when a stage fails.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
status=0
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/prope_site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/prope_site"
fi
XDIST=()
if "$PY" -c "import xdist" 2>/dev/null; then
  XDIST=(-n "${PYTEST_WORKERS:-8}")
fi

run() {  # run NAME CMD...: tee the output to $OUT/NAME.log, remember a failure
  local name=$1; shift
  echo "=== $name: $*"
  "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc"
  [ "$rc" -eq 0 ] || status=1
}

env_info() {
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__, 'gpu', torch.cuda.get_device_name())"
  git rev-parse --short HEAD 2>/dev/null || true
}

stage() {
  case "$1" in
    tests)
      # every test on the GPU (the CI matrix runs on cuda tensors there, plus the gpu-marked
      # sizes), except the stages below and the CPU-only compile/smoke checks
      run tests "$PY" -m pytest -q -rs "${XDIST[@]}" tests/ --ignore=tests/test_triton_configs.py \
          --ignore=tests/test_cuda_backend.py --ignore=tests/test_triton_gpu_compile.py \
          --ignore=tests/test_bench_smoke.py --junitxml="$OUT/tests.xml" ;;
    configs)
      run configs "$PY" -m pytest -q -rs "${XDIST[@]}" tests/test_triton_configs.py ;;
    cuda)
      export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
      run cuda_build env PROPE_FORCE_CUDA_BUILD=1 PROPE_CUDA_ARCHS="${PROPE_CUDA_ARCHS:-9.0a}" \
          MAX_JOBS="${MAX_JOBS:-16}" "$PY" setup.py -q build_ext --inplace
      run cuda_tests "$PY" -m pytest -q -rs tests/test_cuda_backend.py
      run cuda_breakdown bash -c "'$PY' -m bench.breakdown --preset gemma-2b --backend cuda \
          && PROPE_CUDA_SM90=1 '$PY' -m bench.breakdown --preset gemma-2b --backend cuda \
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
    all)
      stage tests; stage configs; stage bench ;;
    *)
      echo "unknown stage $1 (tests, configs, cuda, bench, breakdown, all)" >&2; exit 2 ;;
  esac
}

env_info | tee "$OUT/env.txt"
stage "${1:-tests}"
exit $status
