"""The machine and software a run was made on (recorded in every JSON/CSV/markdown output)."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def _run(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20,
                              cwd=REPO).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _version(mod):
    try:
        m = __import__(mod)
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None
    return getattr(m, "__version__", "unknown")


def _dirty():
    """Uncommitted changes in the code being measured; None without a git checkout."""
    if not _run(["git", "rev-parse", "HEAD"]):
        return None
    return bool(_run(["git", "status", "--porcelain", "--", "prope_kernels", "csrc", "bench"]))


def run_kind(smoke: bool) -> str:
    """"gpu" (real figures), "gpu-smoke" (tiny shapes on a GPU) or "cpu-smoke"."""
    if not torch.cuda.is_available():
        return "cpu-smoke"
    return "gpu-smoke" if smoke else "gpu"


def collect(smoke: bool) -> dict:
    now = _dt.datetime.now(_dt.timezone.utc)
    meta = {
        "run_kind": run_kind(smoke),
        "date_utc": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": (torch.backends.cudnn.version() if torch.backends.cudnn.is_available()
                  else None),
        "triton": _version("triton"),
        "flash_attn": _version("flash_attn"),
        "prope_kernels": _version("prope_kernels"),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "git_commit": (_run(["git", "rev-parse", "HEAD"])
                       or os.environ.get("PROPE_BENCH_COMMIT") or None),
        "git_dirty": _dirty(),
        "command": " ".join([Path(sys.executable).name, "-m", "bench"] + sys.argv[1:]),
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(torch.cuda.current_device())
        smi = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        meta.update(gpu=p.name, gpu_count=torch.cuda.device_count(),
                    sm_count=p.multi_processor_count, capability=f"{p.major}.{p.minor}",
                    gpu_memory_gib=round(p.total_memory / 2**30, 1),
                    driver=smi.splitlines()[0] if smi else None)
    else:
        meta.update(gpu=None, gpu_count=0, sm_count=None, capability=None,
                    gpu_memory_gib=None, driver=None,
                    cpu=platform.processor() or platform.machine(), cpu_count=os.cpu_count())
    return meta


def slug(meta: dict) -> str:
    """<date>_<gpu> for the default output folder, e.g. 2026-11-22_nvidia-h100-80gb-hbm3."""
    name = meta["gpu"] or "cpu-smoke"
    if meta["run_kind"] == "gpu-smoke":
        name += "-smoke"
    name = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return f"{meta['date_utc'][:10]}_{name}"
