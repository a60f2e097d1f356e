"""``python -m prope_kernels`` (prope-kernels config): every backend listed with its state or the
precise reason it cannot run (the real import error for triton), the CUDA extension's build
record and archs, the kernel switches, the dispatch table; text and JSON."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prope_kernels import config
from prope_kernels.backends import registry as backends

ROOT = Path(__file__).resolve().parents[1]


def test_every_backend_is_listed_with_a_state_or_a_reason():
    info = config.collect()
    listed = [b["name"] for b in info["backends"]]
    assert listed == list(backends.names())
    for b in info["backends"]:
        assert b["state"] in ("available", "unavailable"), b
        if b["state"] == "unavailable":
            assert isinstance(b["reason"], str) and b["reason"], b
        else:
            assert b["reason"] is None
    state = {b["name"]: b for b in info["backends"]}
    assert state["reference"]["state"] == "available"  # pure PyTorch, any device
    if not torch.cuda.is_available():
        assert state["cuda"]["state"] == "unavailable"
    text = config.render(info)
    for b in info["backends"]:
        assert f"  {b['name']:<10} {b['state'].upper()}" in text
    for heading in ("GPUs", "backends", "CUDA extension prope_kernels._C", "kernel switches",
                    "dispatch table"):
        assert heading in text
    v = info["versions"]
    assert v["torch"] == torch.__version__ and v["python"] and v["prope_kernels"]


def test_triton_reason_carries_the_real_import_error(monkeypatch):
    # triton installed, but its import fails (Triton's interpreter imports numpy): the reason is
    # that exception, not "pip install triton"
    err = ModuleNotFoundError("No module named 'numpy'", name="numpy")
    monkeypatch.setattr(backends, "_IMPORT_ERRORS", {"triton": err})
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    info = {b["name"]: b for b in config.collect()["backends"]}
    why = info["triton"]["reason"]
    assert info["triton"]["state"] == "unavailable"
    assert "ModuleNotFoundError: No module named 'numpy'" in why, why
    assert "pip install numpy" in why and "pip install triton" not in why
    # the same reason where the user meets it: naming the backend
    q = torch.randn(1, 8, 2, 16, dtype=torch.bfloat16)
    from prope_kernels import prope_attention
    with pytest.raises(ValueError, match="No module named 'numpy'"):
        prope_attention(q, q, q, backend="triton")


def test_triton_not_installed_says_so(monkeypatch):
    monkeypatch.setattr(backends, "_IMPORT_ERRORS",
                        {"triton": ModuleNotFoundError("No module named 'triton'", name="triton")})
    monkeypatch.setattr(backends, "_installed", lambda dist: None)
    real = backends.importlib.util.find_spec
    monkeypatch.setattr(backends.importlib.util, "find_spec",
                        lambda name, *a: None if name == "triton" else real(name, *a))
    assert "pip install triton" in backends.get("triton").unavailable()


def test_real_interpreter_without_numpy_end_to_end(tmp_path):
    """The real failure, in a fresh process: numpy made unimportable, TRITON_INTERPRET=1 (the
    interpreter imports numpy when triton is imported); the JSON report carries the error."""
    if backends.get("triton").unavailable() is not None:
        pytest.skip("triton does not import here at all")
    fake = tmp_path / "nonumpy"
    fake.mkdir()
    (fake / "numpy.py").write_text("raise ModuleNotFoundError(\"No module named 'numpy'\", "
                                   "name='numpy')\n")
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(fake), str(ROOT)]))
    r = subprocess.run([sys.executable, "-m", "prope_kernels", "--json"], capture_output=True,
                       text=True, env=env, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    info = {b["name"]: b for b in json.loads(r.stdout)["backends"]}
    assert info["triton"]["state"] == "unavailable"
    assert "cannot import triton" in info["triton"]["reason"]
    assert "No module named 'numpy'" in info["triton"]["reason"], info["triton"]


def test_cuda_reason_and_build_record(monkeypatch, tmp_path):
    from prope_kernels.backends import cuda

    monkeypatch.setattr(cuda, "extension_path", lambda: None)
    monkeypatch.setattr(cuda, "available", lambda: False)
    monkeypatch.setattr(cuda, "_load", lambda: False)
    monkeypatch.setattr(config, "PACKAGE_DIR", tmp_path)
    # an install whose build skipped the extension: the recorded reason is reported
    (tmp_path / config.BUILD_INFO).write_text(json.dumps(
        {"cuda_backend": "not built", "reason": "the CUTLASS/CuTe headers (package "
         "nvidia-cutlass) are not installed in the build environment"}))
    ext = config._cuda_extension({"devices": []})
    assert ext["path"] is None and ext["record"]["cuda_backend"] == "not built"
    assert any("not built: the CUTLASS/CuTe headers" in n for n in ext["notes"])
    assert "needs the compiled extension prope_kernels._C, which this install does not have" \
        in backends.get("cuda").unavailable()
    # a build for 8.0 and 9.0a: which of its archs run on which GPU
    (tmp_path / config.BUILD_INFO).write_text(json.dumps(
        {"cuda_backend": "built", "archs": ["8.0", "9.0a"], "sm90_kernels": True,
         "torch": torch.__version__}))
    gpus = {"devices": [{"index": 0, "capability": "9.0", "sm": "sm_90"},
                        {"index": 1, "capability": "12.0", "sm": "sm_120"}]}
    ext = config._cuda_extension(gpus)
    assert ext["gpus"][0]["archs_that_run"] == ["9.0a"]  # an sm_80 cubin does not run on 9.0
    assert ext["gpus"][0]["kernels"] == "SM90 and SM80"
    assert ext["gpus"][1]["archs_that_run"] == [] and ext["gpus"][1]["kernels"] is None
    assert any('PROPE_CUDA_ARCHS="12.0"' in n for n in ext["notes"])
    assert any("extension file is missing" in n for n in ext["notes"])
    text = config.render(dict(config.collect(), cuda_extension=ext))
    assert "built for: 8.0, 9.0a (SM90 kernels: 9.0a)" in text


@pytest.mark.parametrize("arch,cap,runs", [
    ("8.0", "8.0", True), ("8.0", "8.9", True), ("8.0", "9.0", False),
    ("8.6", "8.0", False), ("9.0a", "9.0", True), ("9.0a", "10.0", False),
    ("9.0", "9.0", True), ("8.0+PTX", "12.0", True), ("9.0+PTX", "8.9", False),
])
def test_arch_runs_on(arch, cap, runs):
    assert config.arch_runs_on(arch, cap) is runs


def test_switches_and_dispatch_table(monkeypatch):
    monkeypatch.setenv("PROPE_CUDA_SM90_BWD", "split")
    monkeypatch.setenv("PROPE_CUDA_SM90_FWD", "bogus")
    info = config.collect()
    s = info["switches"]
    assert s["set"]["PROPE_CUDA_SM90_BWD"] == "split"
    assert s["resolved"]["PROPE_CUDA_SM90_BWD"] == "split"
    assert s["resolved"]["PROPE_CUDA_SM90_FWD"].startswith("invalid: PROPE_CUDA_SM90_FWD")
    d = info["dispatch"]
    assert Path(d["path"]).name == "dispatch.json" or d["source"] == "PROPE_DISPATCH_TABLE"
    for e in d["entries"]:
        assert e["backend"] in backends.names() and "arch" in e["key"]


def test_cli_text_and_json(capsys):
    assert config.main([]) == 0
    assert "backends (backend=...)" in capsys.readouterr().out
    assert config.main(["config", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {"versions", "gpus", "backends", "cuda_extension", "switches", "dispatch"} <= set(info)
    assert config.main(["show-config"]) == 0 and "GPUs" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        config.main(["nonsense"])
