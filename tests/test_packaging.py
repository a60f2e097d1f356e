"""Packaging: setup.py's CUDA-backend decision (a missing prerequisite skips it with the reason,
recorded for ``python -m prope_kernels``; PROPE_FORCE_CUDA_BUILD=1 makes it an error) and the
metadata in pyproject.toml. No build: setup.py runs with setuptools.setup replaced."""

import importlib.util
import json
import os
import runpy
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import setuptools
import torch

ROOT = Path(__file__).resolve().parents[1]


def _run_setup(monkeypatch, tmp_path, cutlass: bool, **env):
    """setup.py's module code as pip runs it, on a machine that has a CUDA build of torch and
    nvcc (faked: the test machine need not), with or without nvidia-cutlass; returns what it
    passes to setup() and its build record."""
    calls = []
    monkeypatch.setattr(setuptools, "setup", lambda **kw: calls.append(kw))
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    nvcc = tmp_path / "cuda" / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text("#!/bin/sh\necho compute_80 compute_90\n")
    nvcc.chmod(0o755)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "cuda"))
    for var in ("PROPE_FORCE_CUDA_BUILD", "PROPE_SKIP_CUDA_BUILD", "PROPE_CUDA_ARCHS"):
        monkeypatch.delenv(var, raising=False)
    for var, val in env.items():
        monkeypatch.setenv(var, val)
    if not cutlass:
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: None if name == "cutlass_library" else real(name, *a))
    ns = runpy.run_path(str(ROOT / "setup.py"), run_name="__main__")
    assert len(calls) == 1
    return calls[0], ns["build_info"]


def test_missing_cutlass_skips_the_cuda_backend_with_the_reason(monkeypatch, tmp_path, capsys):
    kw, info = _run_setup(monkeypatch, tmp_path, cutlass=False)
    out = capsys.readouterr().out
    assert kw["ext_modules"] == []  # the pure-Python package still installs
    assert "nvidia-cutlass" in out and "installing without the CUDA backend" in out
    assert "PROPE_FORCE_CUDA_BUILD=1" in out
    # the reason travels with the package (build_py writes it) for python -m prope_kernels
    assert info["cuda_backend"] == "not built" and "nvidia-cutlass" in info["reason"]
    assert "build_py" in kw["cmdclass"]


def test_forced_build_without_cutlass_raises(monkeypatch, tmp_path):
    with pytest.raises(RuntimeError, match="PROPE_FORCE_CUDA_BUILD=1 but .*nvidia-cutlass"):
        _run_setup(monkeypatch, tmp_path, cutlass=False, PROPE_FORCE_CUDA_BUILD="1")


def test_skip_switch_is_recorded(monkeypatch, tmp_path, capsys):
    kw, info = _run_setup(monkeypatch, tmp_path, cutlass=False, PROPE_SKIP_CUDA_BUILD="1")
    assert kw["ext_modules"] == [] and "PROPE_SKIP_CUDA_BUILD" in info["reason"]


def test_pyproject_metadata():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    proj = meta["project"]
    assert proj["name"] == "prope_kernels" and proj["license"] == "Apache-2.0"
    assert "Apache License" in (ROOT / "LICENSE").read_text()
    assert proj["dynamic"] == ["version"]
    assert [d.split(";")[0].split(">")[0] for d in proj["dependencies"]] == ["torch", "triton"]
    extras = proj["optional-dependencies"]
    # test = train + bench + what the Hugging Face tests need
    assert set(extras["train"]) | set(extras["bench"]) <= set(extras["test"])
    assert {"transformers", "accelerate", "pytest"} <= set(extras["test"])
    assert proj["scripts"] == {"prope-train": "prope_kernels.train_main:main",
                               "prope-experiment": "prope_kernels.experiments:main",
                               "prope-kernels": "prope_kernels.config:main",
                               "prope-bench": "prope_kernels.bench.cli:main"}
    # the benchmark ships inside the package (no generic top-level `bench` in site-packages)
    assert meta["tool"]["setuptools"]["packages"]["find"]["include"] == ["prope_kernels",
                                                                         "prope_kernels.*"]
    data = meta["tool"]["setuptools"]["package-data"]["prope_kernels"]
    assert {"dispatch.json", "py.typed"} <= set(data)
    assert all((ROOT / "prope_kernels" / f).is_file() for f in data)
    for f in ("CHANGELOG.md", "CITATION.cff"):
        assert (ROOT / f).is_file(), f


@pytest.mark.slow
def test_wheel_without_cuda_carries_the_record_and_metadata(tmp_path):
    """A real wheel build (no build isolation: this environment's setuptools and torch; a CPU
    torch skips the extension, a CUDA one is told to) of a copy of the sources: the build record,
    py.typed, the license and the extras are in it."""
    env = dict(os.environ)
    if torch.version.cuda is not None:  # it could compile the extension (about 40 minutes)
        env["PROPE_SKIP_CUDA_BUILD"] = "1"
        env.pop("PROPE_FORCE_CUDA_BUILD", None)
    src = tmp_path / "src"
    src.mkdir()
    for f in ("setup.py", "pyproject.toml", "README.md", "LICENSE", "MANIFEST.in",
              "CMakeLists.txt"):
        (src / f).write_bytes((ROOT / f).read_bytes())
    pkg = ROOT / "prope_kernels"
    for f in pkg.rglob("*"):
        if f.is_file() and "__pycache__" not in f.parts and f.suffix != ".so" \
                and f.name != "_build_info.json":
            dest = src / "prope_kernels" / f.relative_to(pkg)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(f.read_bytes())
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                        "--no-build-isolation", "--no-index", "-w", str(tmp_path / "out"),
                        str(src)], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    (whl,) = (tmp_path / "out").glob("prope_kernels-*.whl")
    with zipfile.ZipFile(whl) as z:
        names = set(z.namelist())
        record = json.loads(z.read("prope_kernels/_build_info.json"))
        metadata = z.read(next(n for n in names if n.endswith("dist-info/METADATA"))).decode()
        scripts = z.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert record["cuda_backend"] == "not built" and record["reason"]
    assert {"prope_kernels/py.typed", "prope_kernels/dispatch.json"} <= names
    assert any(n.endswith("licenses/LICENSE") for n in names)
    assert "License-Expression: Apache-2.0" in metadata
    for extra in ("train", "bench", "test"):
        assert f"Provides-Extra: {extra}" in metadata
    assert "prope-kernels = prope_kernels.config:main" in scripts
    assert "prope-bench = prope_kernels.bench.cli:main" in scripts
    assert "prope_kernels/bench/cli.py" in names
    assert not [n for n in names if n.startswith("bench/")]
