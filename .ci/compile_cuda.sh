#!/usr/bin/env bash
# CI step: compile every CUDA source of the CUDA backend on a machine WITHOUT a GPU, and fail if
# any does not compile: the torch extension prope_kernels._C (csrc/binding.cpp, csrc/kernels/*.cu,
# through setup.py + ninja) and the CMake targets (kernel library + csrc/tests/test_prope_attn,
# csrc/tests/test_layouts, which it also runs: a host-only check of the forward's register layouts),
# then guards the SM90 kernels' SASS (.ci/check_sm90_sass.py: wgmma, TMA, setmaxnreg present, no
# local memory), so that a change which silently falls back to a slower path fails here. The same
# compile is packed into a binary wheel, which is installed with nvcc hidden and nvidia-cutlass
# uninstalled: its _C must load and the config check must list the CUDA backend as built.
#
# Usage: .ci/compile_cuda.sh            (from anywhere; exit status 0 = everything compiled)
# Environment (all optional):
#   PROPE_CI_CUDA_VENV   venv with a CUDA build of torch + nvidia-cutlass + ninja; created (torch
#                        2.14.1) if missing, completed with what it lacks if it has a CUDA torch
#                        (default ~/.cache/prope_kernels/venv-cu)
#   PROPE_CUDA_ARCHS     archs for the extension build (default "8.0;9.0a", as setup.py; must
#                        contain 9.0a: the SASS guard inspects the SM90 objects)
#   PROPE_CI_CMAKE_ARCHS CMAKE_CUDA_ARCHITECTURES for the CMake build (default "80;90a")
#   PROPE_CI_CMAKE_HEAD_DIMS  head dims compiled by CMake (default "64": the extension build has
#                        already compiled every kernel file; this checks CMake + the C++ test)
#   MAX_JOBS             parallel compile jobs (default 2)
#   CUDA_HOME            default /usr/local/cuda
# Build outputs go to a temporary directory (the checkout gets only setuptools' ignored
# prope_kernels.egg-info/). The wheel is installed into the venv at the end (step 5).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PROPE_CI_CUDA_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/prope_kernels/venv-cu}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export MAX_JOBS="${MAX_JOBS:-2}"
export PROPE_CUDA_ARCHS="${PROPE_CUDA_ARCHS:-8.0;9.0a}"
CMAKE_ARCHS="${PROPE_CI_CMAKE_ARCHS:-80;90a}"
CMAKE_HEAD_DIMS="${PROPE_CI_CMAKE_HEAD_DIMS:-64}"
TORCH_PIN="torch==2.14.1"
CUTLASS_PIN="nvidia-cutlass==4.2.0.0"

t0=$SECONDS
step() { echo "=== [compile_cuda $((SECONDS - t0))s] $*"; }

NVCC="$CUDA_HOME/bin/nvcc"
[[ -x "$NVCC" ]] || { echo "compile_cuda: nvcc not found at $NVCC (set CUDA_HOME)" >&2; exit 1; }
"$NVCC" --version | tail -n 2

# 1. the build venv (torch with CUDA, CUTLASS headers, ninja), reused when already complete; a
# venv that already holds a CUDA build of torch (.ci/run's test venv) gets only what it lacks
# (setuptools >= 77: pyproject.toml's license expression, read when setup.py runs directly)
if "$VENV/bin/python" -c "import torch; assert torch.version.cuda" 2>/dev/null \
   && ! "$VENV/bin/python" -c "import cutlass_library, ninja, setuptools; \
assert int(setuptools.__version__.split('.')[0]) >= 77" 2>/dev/null; then
  step "adding CUTLASS headers and ninja to $VENV"
  "$VENV/bin/pip" install --quiet "$CUTLASS_PIN" ninja "setuptools>=77" wheel
fi
if ! "$VENV/bin/python" -c "import torch, cutlass_library, ninja, setuptools; \
assert torch.version.cuda and int(setuptools.__version__.split('.')[0]) >= 77" 2>/dev/null; then
  step "creating build venv $VENV (torch CUDA wheel, several GB, a few minutes)"
  mkdir -p "$(dirname "$VENV")"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip
  "$VENV/bin/pip" install --quiet "$TORCH_PIN" "$CUTLASS_PIN" ninja "setuptools>=77" wheel numpy
else
  step "reusing build venv $VENV"
fi
PY="$VENV/bin/python"
export PATH="$VENV/bin:$PATH"  # ninja

BUILD="$(mktemp -d "${TMPDIR:-/tmp}/prope_cuda_build.XXXXXX")"
trap 'rm -rf "$BUILD"' EXIT

# 2. the torch extension (binding + every kernel instantiation + rope kernels), compiled once and
# packed into a binary wheel (docs/install.md: the same build as `pip wheel --no-build-isolation`)
step "building prope_kernels._C and a wheel (archs $PROPE_CUDA_ARCHS, MAX_JOBS=$MAX_JOBS)"
(cd "$ROOT" && PROPE_FORCE_CUDA_BUILD=1 "$PY" setup.py -q build --build-base "$BUILD/b" \
    bdist_wheel --bdist-dir "$BUILD/bdist" --dist-dir "$BUILD/dist")
SO="$(find "$BUILD/b" -name '_C*.so' | head -n 1)"
WHEEL="$(find "$BUILD/dist" -name 'prope_kernels-*.whl' | head -n 1)"
[[ -n "$WHEEL" ]] || { echo "compile_cuda: no wheel was produced" >&2; exit 1; }
[[ -n "$SO" ]] || { echo "compile_cuda: no _C*.so was produced" >&2; exit 1; }
step "loading $SO and checking the op registrations"
"$PY" - "$SO" <<'PYEOF'
import sys, torch
torch.ops.load_library(sys.argv[1])
for op in ("attn_fwd", "attn_bwd", "rope"):
    assert hasattr(torch.ops.prope_cuda, op), f"torch.ops.prope_cuda.{op} is not registered"
print("registered:", ", ".join(f"prope_cuda::{o}" for o in ("attn_fwd", "attn_bwd", "rope")))
PYEOF

# 3. the SM90 kernels' SASS: HGMMA, UTMALDG, USETMAXREG in every kernel, no STL/LDL
step "SASS guard of the SM90 objects"
CUOBJDUMP="$CUDA_HOME/bin/cuobjdump"
[[ -x "$CUOBJDUMP" ]] || CUOBJDUMP="$("$PY" -c "import triton, pathlib; \
print(pathlib.Path(triton.__file__).parent / 'backends/nvidia/bin/cuobjdump')")"
[[ -x "$CUOBJDUMP" ]] || { echo "compile_cuda: no cuobjdump (CUDA_HOME or Triton's wheel)" >&2; exit 1; }
mapfile -t SM90_OBJS < <(find "$BUILD/b" -name 'attn_sm90_*.o' | sort)
[[ ${#SM90_OBJS[@]} -eq 12 ]] || { echo "compile_cuda: expected 12 SM90 objects, found ${#SM90_OBJS[@]}" \
  "(PROPE_CUDA_ARCHS must contain 9.0a)" >&2; exit 1; }
"$PY" "$ROOT/.ci/check_sm90_sass.py" "$CUOBJDUMP" "${SM90_OBJS[@]}"

# 4. CMake: kernel library + standalone C++ test (compile and link only; running needs a GPU)
step "CMake build (archs $CMAKE_ARCHS, head dims $CMAKE_HEAD_DIMS)"
cmake -S "$ROOT" -B "$BUILD/cmake" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_CUDA_COMPILER="$NVCC" -DCMAKE_CUDA_ARCHITECTURES="$CMAKE_ARCHS" \
  -DPROPE_HEAD_DIMS="$CMAKE_HEAD_DIMS" -DPython3_EXECUTABLE="$PY" > "$BUILD/cmake.log" \
  || { cat "$BUILD/cmake.log"; exit 1; }
cmake --build "$BUILD/cmake" -j "$MAX_JOBS"
[[ -x "$BUILD/cmake/test_prope_attn" ]] || { echo "compile_cuda: test_prope_attn missing" >&2; exit 1; }
step "running the host-only layout test (no GPU needed)"
"$BUILD/cmake/test_layouts"

# 5. the wheel as a user without a toolchain gets it: no nvcc, no CUTLASS; its _C must load and
# the config check must report the CUDA backend built for the archs asked for
step "installing $(basename "$WHEEL") with no nvcc and no CUTLASS"
"$PY" -m pip uninstall --quiet --yes nvidia-cutlass
"$PY" -m pip install --quiet --no-deps --force-reinstall "$WHEEL"
(cd "$BUILD" && env -u CUDA_HOME -u CUDA_PATH PATH="$VENV/bin:/usr/bin:/bin" "$PY" - "$PROPE_CUDA_ARCHS" <<'PYEOF'
import importlib.util, json, re, shutil, subprocess, sys
assert shutil.which("nvcc") is None, "nvcc is still on PATH"
assert importlib.util.find_spec("cutlass_library") is None, "nvidia-cutlass is still installed"
out = subprocess.run([sys.executable, "-m", "prope_kernels", "--json"], capture_output=True,
                     text=True, check=True).stdout
ext = json.loads(out)["cuda_extension"]
rec = ext["record"] or {}
assert ext["loads"] and ext["path"] and "site-packages" in ext["path"], ext
want = [a for a in re.split(r"[;,\s]+", sys.argv[1].strip()) if a]  # as setup.py lists them
assert rec.get("cuda_backend") == "built" and rec.get("archs") == want, rec
print(f"wheel: _C loads from {ext['path']}; built for {', '.join(rec['archs'])}")
PYEOF
)
"$PY" -m pip install --quiet "$CUTLASS_PIN"  # the venv as it was (the extension builds again)

step "OK: every CUDA source compiled"
