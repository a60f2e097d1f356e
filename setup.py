"""Build script for prope_kernels.

``pip install .`` installs the pure-Python package (reference + Triton backends; needs only torch
and triton; extras: ``[train]`` for prope-train, ``[bench]``, ``[test]``). When a
CUDA-enabled torch and nvcc are importable in the build environment, it also builds the CUDA
backend ``prope_kernels._C`` from ``csrc/`` with ninja (pip's isolated build env has no torch, so
use ``pip install --no-build-isolation .`` for the CUDA build).

Environment switches:
  PROPE_FORCE_CUDA_BUILD=1   build the extension or fail with the reason (no silent fallback)
  PROPE_SKIP_CUDA_BUILD=1    never build it
  PROPE_CUDA_ARCHS="8.0;9.0a" compute capabilities (each checked against ``nvcc --list-gpu-arch``;
                             "+PTX" suffix also embeds PTX, e.g. "9.0+PTX"). "9.0a" (the
                             arch-specific Hopper target that wgmma/TMA/setmaxnreg need) also
                             builds the SM90 forward kernels (csrc/kernels/attn_sm90_*.cu); the
                             SM80 kernels are built for every listed target
  MAX_JOBS                   parallel compile jobs (read by torch's ninja build)
  CUDA_HOME                  CUDA root (default /usr/local/cuda when it has nvcc)
CUTLASS/CuTe headers come from the ``nvidia-cutlass`` package (``pip install nvidia-cutlass``);
nothing is downloaded here.
"""

import importlib.util
import os
import re
import subprocess
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent.resolve()


def _version() -> str:
    text = (ROOT / "prope_kernels" / "__init__.py").read_text()
    return re.search(r'^__version__\s*=\s*["\']([^"\']+)["\']', text, re.M).group(1)


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _cuda_home():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if not home and Path("/usr/local/cuda/bin/nvcc").exists():
        home = "/usr/local/cuda"
        os.environ["CUDA_HOME"] = home  # torch's own guess misses /usr/local/cuda on some machines
    return home


def _cutlass_include() -> str:
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("building the CUDA backend needs the CUTLASS/CuTe headers from the "
                           "nvidia-cutlass package: pip install nvidia-cutlass==4.2.0.0 "
                           "(or set PROPE_SKIP_CUDA_BUILD=1)")
    inc = Path(list(spec.submodule_search_locations)[0]) / "source" / "include"
    if not (inc / "cute" / "tensor.hpp").exists():
        raise RuntimeError(f"nvidia-cutlass is installed but {inc}/cute/tensor.hpp is missing; "
                           "reinstall nvidia-cutlass==4.2.0.0")
    return str(inc)


DEFAULT_ARCHS = "8.0;9.0a"


def _arch_flags(nvcc: str) -> list:
    archs = os.environ.get("PROPE_CUDA_ARCHS", DEFAULT_ARCHS)
    listed = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True,
                            check=True).stdout.split()
    flags = []
    for item in re.split(r"[;,\s]+", archs.strip()):
        if not item:
            continue
        m = re.fullmatch(r"(\d+)\.(\d+)([af]?)(\+PTX)?", item)
        if not m:
            raise RuntimeError(f"PROPE_CUDA_ARCHS: cannot parse {item!r} (expected e.g. 8.0;9.0)")
        cc = m.group(1) + m.group(2) + m.group(3)
        if int(m.group(1)) < 8:
            raise RuntimeError(f"PROPE_CUDA_ARCHS: {item} < 8.0; the kernels need sm80+ MMA")
        if f"compute_{m.group(1)}{m.group(2)}" not in listed:  # 9.0a: nvcc lists compute_90
            raise RuntimeError(f"PROPE_CUDA_ARCHS: {item} is not supported by {nvcc} "
                               f"(nvcc --list-gpu-arch: {' '.join(listed)})")
        flags.append(f"-gencode=arch=compute_{cc},code=sm_{cc}")
        if m.group(3) and cc != "90a":
            raise RuntimeError(f"PROPE_CUDA_ARCHS: {item}: the only arch-specific target the "
                               "kernels use is 9.0a")
        if m.group(4):
            flags.append(f"-gencode=arch=compute_{cc},code=compute_{cc}")
    if not flags:
        raise RuntimeError("PROPE_CUDA_ARCHS is empty")
    return flags


def _cuda_extension():
    """(ext_modules, cmdclass) for the CUDA backend, or ([], {}) with the reason printed."""
    force = _flag("PROPE_FORCE_CUDA_BUILD")
    if _flag("PROPE_SKIP_CUDA_BUILD"):
        print("prope_kernels: PROPE_SKIP_CUDA_BUILD set, installing without the CUDA backend")
        return [], {}

    def skip(reason):
        if force:
            raise RuntimeError(f"PROPE_FORCE_CUDA_BUILD=1 but {reason}")
        print(f"prope_kernels: {reason}; installing without the CUDA backend "
              "(set PROPE_FORCE_CUDA_BUILD=1 to make this an error)")
        return [], {}

    home = _cuda_home()
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError:
        return skip("torch is not importable in the build environment "
                    "(use pip install --no-build-isolation . for the CUDA build)")
    if torch.version.cuda is None:
        return skip(f"torch {torch.__version__} has no CUDA support")
    nvcc = str(Path(home) / "bin" / "nvcc") if home else None
    if not nvcc or not Path(nvcc).exists():
        return skip("nvcc was not found (set CUDA_HOME)")

    csrc = ROOT / "csrc"
    sources = [str((csrc / "binding.cpp").relative_to(ROOT))]
    sources += [str((csrc / "kernels" / f).relative_to(ROOT)) for f in ("api.cu", "rope.cu")]
    arch_flags = _arch_flags(nvcc)
    sm90 = any("sm_90a" in f for f in arch_flags)
    sources += sorted(str(p.relative_to(ROOT)) for p in (csrc / "kernels").glob("attn_*.cu")
                      if sm90 or not p.name.startswith("attn_sm90_"))
    defines = ["-DPROPE_HAS_SM90"] if sm90 else []
    std = ["-std=c++20"]  # torch >= 2.10 headers need C++20
    ext = CUDAExtension(
        name="prope_kernels._C",
        sources=sources,
        include_dirs=[str(csrc), _cutlass_include()],
        extra_compile_args={
            "cxx": ["-O3"] + std + defines,
            "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo",
                     "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                     "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
                     "-U__CUDA_NO_HALF2_OPERATORS__"] + std + defines + arch_flags,
        },
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _cuda_extension()

# prope-train (prope_kernels.train, .data): packing, tokenizer, checkpoints, progress, loss plot
TRAIN = ["numpy", "safetensors", "sentencepiece", "tqdm", "matplotlib"]
# python -m bench: pytest-benchmark runs bench/test_bench_kernels.py; plots; progress
BENCH = ["pytest", "pytest-benchmark", "matplotlib", "tqdm"]

setup(
    name="prope_kernels",
    version=_version(),
    description="p-RoPE fused into FlashAttention-style attention kernels (Triton and CUDA)",
    packages=find_packages(include=["prope_kernels", "prope_kernels.*"]),
    package_data={"prope_kernels": ["dispatch.json"]},  # backend="auto" table
    python_requires=">=3.10",
    # the kernels alone: torch and triton; the trainer, the benchmark and the tests are extras
    install_requires=[
        "torch>=2.4",
        'triton>=3.0; platform_system=="Linux"',
    ],
    extras_require={
        "train": TRAIN,
        "bench": BENCH,
        "test": sorted(set(TRAIN + BENCH + ["pytest", "transformers", "accelerate"])),
    },
    entry_points={"console_scripts": ["prope-train = prope_kernels.train:main",
                                      "prope-experiment = prope_kernels.experiments:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
