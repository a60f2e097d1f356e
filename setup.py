"""Build script for prope_kernels: the CUDA extension only (the package's metadata, dependencies
and extras are in pyproject.toml).

``pip install .`` installs the pure-Python package (reference + Triton backends; needs only torch
and triton; extras: ``[train]`` for prope-train, ``[bench]`` for prope-bench, ``[test]``). When a
CUDA-enabled torch, nvcc and the nvidia-cutlass headers are importable in the build environment,
it also builds the CUDA backend ``prope_kernels._C`` from ``csrc/`` with ninja (pip's isolated
build env has no torch, so use ``pip install --no-build-isolation .`` for the CUDA build). A
missing prerequisite skips the CUDA backend with the reason printed (``pip install -v`` shows
it), unless PROPE_FORCE_CUDA_BUILD=1.

What was built is recorded in ``prope_kernels/_build_info.json`` (beside the extension, or in the
installed package when it was skipped: the reason), which ``python -m prope_kernels`` reports:
built or not and why, the archs, the torch and CUDA it was built against.

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
import json
import os
import platform
import re
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py as _build_py

ROOT = Path(__file__).parent.resolve()
BUILD_INFO = "_build_info.json"  # written into the package: see _write_build_info


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


class MissingPrerequisite(Exception):
    """Something the CUDA build needs is absent: skip the CUDA backend (or fail when forced)."""


def _cutlass_include() -> str:
    """The CUTLASS/CuTe include folder of the nvidia-cutlass package (MissingPrerequisite when
    it is not installed or lacks the headers)."""
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.submodule_search_locations:
        raise MissingPrerequisite("the CUTLASS/CuTe headers (package nvidia-cutlass) are not "
                                  "installed in the build environment: pip install "
                                  "nvidia-cutlass==4.2.0.0")
    inc = Path(list(spec.submodule_search_locations)[0]) / "source" / "include"
    if not (inc / "cute" / "tensor.hpp").exists():
        raise MissingPrerequisite(f"nvidia-cutlass is installed but {inc}/cute/tensor.hpp is "
                                  "missing; reinstall nvidia-cutlass==4.2.0.0")
    return str(inc)


DEFAULT_ARCHS = "8.0;9.0a"


def _arch_flags(nvcc: str) -> tuple:
    """(nvcc -gencode flags, the archs as listed) for PROPE_CUDA_ARCHS."""
    archs = os.environ.get("PROPE_CUDA_ARCHS", DEFAULT_ARCHS)
    listed = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True,
                            check=True).stdout.split()
    flags, items = [], []
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
        items.append(item)
    if not flags:
        raise RuntimeError("PROPE_CUDA_ARCHS is empty")
    return flags, items


def _nvcc_version(nvcc: str):
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    except OSError:
        return None
    m = re.search(r"release (\S+), V(\S+)", out)
    return m.group(2) if m else None


def _dist_version(name: str):
    from importlib import metadata
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _write_build_info(folder: Path, info: dict) -> None:
    """The build record the package reads back (prope_kernels.config)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / BUILD_INFO).write_text(json.dumps(info, indent=1) + "\n")


def _base_info() -> dict:
    return {"package_version": _version(), "python": platform.python_version(),
            "platform": f"{platform.system()} {platform.machine()}"}


def _with_build_py(info: dict) -> type:
    """build_py that also writes the build record into the built package (the record of a
    build without the extension: why; an editable install reads the source folder)."""

    class build_py(_build_py):
        def run(self):
            super().run()
            if self.dry_run:
                return
            if getattr(self, "editable_mode", False):
                _write_build_info(ROOT / "prope_kernels", info)
            else:
                _write_build_info(Path(self.build_lib) / "prope_kernels", info)

    return build_py


def _cuda_extension():
    """(ext_modules, cmdclass, build record) for the CUDA backend; ([], {}, record with the
    reason) when it is skipped, the reason printed."""
    force = _flag("PROPE_FORCE_CUDA_BUILD")
    info = dict(_base_info(), cuda_backend="not built", forced=force)
    if _flag("PROPE_SKIP_CUDA_BUILD"):
        reason = "PROPE_SKIP_CUDA_BUILD was set"
        print(f"prope_kernels: {reason}, installing without the CUDA backend")
        return [], {}, dict(info, reason=reason)

    def skip(reason):
        if force:
            raise RuntimeError(f"PROPE_FORCE_CUDA_BUILD=1 but {reason}")
        print(f"prope_kernels: {reason}; installing without the CUDA backend "
              "(set PROPE_FORCE_CUDA_BUILD=1 to make this an error)")
        return [], {}, dict(info, reason=reason)

    home = _cuda_home()
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError:
        return skip("torch is not importable in the build environment "
                    "(use pip install --no-build-isolation . for the CUDA build)")
    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda)
    if torch.version.cuda is None:
        return skip(f"torch {torch.__version__} has no CUDA support")
    nvcc = str(Path(home) / "bin" / "nvcc") if home else None
    if not nvcc or not Path(nvcc).exists():
        return skip("nvcc was not found (set CUDA_HOME)")
    try:
        cutlass_inc = _cutlass_include()
    except MissingPrerequisite as e:
        return skip(str(e))

    csrc = ROOT / "csrc"
    sources = [str((csrc / "binding.cpp").relative_to(ROOT))]
    sources += [str((csrc / "kernels" / f).relative_to(ROOT)) for f in ("api.cu", "rope.cu")]
    arch_flags, archs = _arch_flags(nvcc)
    sm90 = any("sm_90a" in f for f in arch_flags)
    sources += sorted(str(p.relative_to(ROOT)) for p in (csrc / "kernels").glob("attn_*.cu")
                      if sm90 or not p.name.startswith("attn_sm90_"))
    defines = ["-DPROPE_HAS_SM90"] if sm90 else []
    std = ["-std=c++20"]  # torch >= 2.10 headers need C++20
    ext = CUDAExtension(
        name="prope_kernels._C",
        sources=sources,
        include_dirs=[str(csrc), cutlass_inc],
        extra_compile_args={
            "cxx": ["-O3"] + std + defines,
            "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo",
                     "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                     "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
                     "-U__CUDA_NO_HALF2_OPERATORS__"] + std + defines + arch_flags,
        },
    )
    info.update(cuda_backend="built", archs=archs, gencode=arch_flags, sm90_kernels=sm90,
                nvcc=_nvcc_version(nvcc), cutlass=_dist_version("nvidia-cutlass"))
    base = BuildExtension.with_options(use_ninja=True)

    class BuildExt(base):
        """torch's ninja build, then the build record beside the extension (--inplace and
        --build-lib builds included)."""

        def run(self):
            super().run()
            if not self.dry_run:
                _write_build_info(Path(self.get_ext_fullpath("prope_kernels._C")).parent, info)

    return [ext], {"build_ext": BuildExt}, info


ext_modules, cmdclass, build_info = _cuda_extension()
if not ext_modules:  # a built extension's record is written by its build_ext, once it is built
    cmdclass["build_py"] = _with_build_py(build_info)

# name, version, dependencies, extras, scripts, package data: pyproject.toml
setup(ext_modules=ext_modules, cmdclass=cmdclass)
