"""The machine and software a run was made on (recorded in every JSON/CSV/markdown output)."""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import torch

from prope_kernels.backends import kernel_hashes


def _source_tree():
    """The prope_kernels checkout this package runs from (pyproject.toml and bench/ beside
    prope_kernels/), else None (installed: no git command runs, the folder above site-packages
    may be another repository; the commit then comes from PROPE_BENCH_COMMIT only)."""
    root = Path(__file__).resolve().parent.parent.parent
    try:
        project = (root / "pyproject.toml").read_text()
    except OSError:
        return None
    if re.search(r'^name\s*=\s*"prope_kernels"', project, re.M) and (root / "bench").is_dir():
        return root
    return None


REPO = _source_tree()


def results_root() -> Path:
    """Default home of runs: bench/results/ from the root of a checkout, else
    prope-bench-results/ in the current folder."""
    here = Path.cwd()
    if REPO is not None and here.resolve() == REPO:
        return REPO / "bench" / "results"
    return here / "prope-bench-results"


def command() -> str:
    """This run's command line: ``prope-bench ...`` or ``python -m <module> ...``."""
    argv0 = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    if argv0.startswith("prope-bench"):
        head = [argv0]
    else:
        main = sys.modules.get("__main__")
        spec = getattr(main, "__spec__", None)
        mod = spec.name.removesuffix(".__main__") if spec is not None and spec.name else "bench"
        head = [Path(sys.executable).name, "-m", mod]
    return " ".join(head + sys.argv[1:])


def _git_bytes(cmd, anywhere=False):
    """stdout of a command in the checkout (anywhere: in this folder when there is none); None
    without one, or when it fails."""
    if REPO is None and not anywhere:
        return None
    try:
        p = subprocess.run(cmd, capture_output=True, timeout=60, cwd=REPO)
    except (OSError, subprocess.SubprocessError):
        return None
    return p.stdout if p.returncode == 0 else None


def _run(cmd, anywhere=False):
    return (_git_bytes(cmd, anywhere) or b"").decode(errors="replace").strip()


def _version(mod):
    try:
        m = __import__(mod)
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None
    return getattr(m, "__version__", "unknown")


CODE = ("prope_kernels", "csrc", "bench")  # the code a run measures
_EXCLUDE = ("bench/results/",)
_PATHS = ["--", *CODE, *(f":!{x}" for x in _EXCLUDE)]


def _git_state():
    """(HEAD, measured code changed?, sha256 of `git diff HEAD` over it and the untracked files,
    "" when clean); (None, None, None) without git."""
    head = _run(["git", "rev-parse", "HEAD"])
    if not head:
        return None, None, None
    dirty = bool(_run(["git", "status", "--porcelain", *_PATHS]))
    diff = _git_bytes(["git", "diff", "HEAD", "--binary", *_PATHS])
    new = _git_bytes(["git", "ls-files", "--others", "--exclude-standard", "-z", *_PATHS])
    if diff is None or new is None:
        return head, dirty, None
    if not diff and not new:
        return head, dirty, ""
    h = hashlib.sha256(diff)
    for name in sorted(n for n in new.split(b"\0") if n):
        h.update(b"\0" + name + b"\0" + (REPO / name.decode()).read_bytes())
    return head, dirty, h.hexdigest()


_SUFFIXES = (".py", ".json", ".cu", ".h", ".cpp")


def _measured(path: str) -> bool:
    return path.endswith(_SUFFIXES) and not path.startswith(_EXCLUDE) and "__pycache__" not in path


def tree_sha256(commit=None):
    """sha256 over path and bytes of the measured source files (CODE by suffix, bench/results
    aside): on disk (commit None; no git needed), or as committed at ``commit`` (None when git
    cannot read it). Equal hashes: the run ran that commit's code exactly."""
    files = {}
    if REPO is None:  # an installed package: not the checkout's file set, nothing to compare
        return None
    if commit is None:
        for top in CODE:
            for f in (REPO / top).rglob("*"):
                rel = f.relative_to(REPO).as_posix()
                if f.is_file() and _measured(rel):
                    files[rel] = f
    else:
        names = _git_bytes(["git", "ls-tree", "-r", "-z", "--name-only", commit, "--", *CODE])
        if names is None:
            return None
        files = {n: n for n in names.decode().split("\0") if n and _measured(n)}
    h = hashlib.sha256()
    for rel in sorted(files):
        data = (files[rel].read_bytes() if commit is None
                else _git_bytes(["git", "show", f"{commit}:{rel}"]))
        if data is None:
            return None
        h.update(rel.encode() + b"\0" + data + b"\0")
    return h.hexdigest()


def clean(meta: dict) -> bool:
    """Whether a run ran committed code: an empty `git diff HEAD`, or its source hash equals
    that of its commit (runs without .git record only the latter)."""
    if meta.get("git_diff_sha256") == "":
        return True
    src, commit = meta.get("source_sha256"), meta.get("git_commit")
    return bool(src and commit and tree_sha256(commit) == src)


def run_kind(smoke: bool) -> str:
    """"gpu" (real figures), "gpu-smoke" (tiny shapes on a GPU) or "cpu-smoke"."""
    return ("gpu-smoke" if smoke else "gpu") if torch.cuda.is_available() else "cpu-smoke"


def collect(smoke: bool) -> dict:
    now = _dt.datetime.now(_dt.timezone.utc)
    head, dirty, diff = _git_state()
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
        "git_commit": head or os.environ.get("PROPE_BENCH_COMMIT") or None,
        "git_dirty": dirty,
        "git_diff_sha256": diff,
        "source_sha256": tree_sha256(),
        # each backend's kernels as they ran (prope_kernels.backends.kernel_hash)
        "kernel_hashes": kernel_hashes(),
        "command": command(),
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(torch.cuda.current_device())
        smi = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                   anywhere=True)  # an installed package has no checkout; the driver is there
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
    name = (meta["gpu"] or "cpu-smoke") + ("-smoke" if meta["run_kind"] == "gpu-smoke" else "")
    name = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return f"{meta['date_utc'][:10]}_{name}"
