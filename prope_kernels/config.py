"""What this install of prope_kernels can run here, and why not.

    python -m prope_kernels             # the same as: prope-kernels config
    prope-kernels config --json         # the same facts as JSON

Reports: the package, Python, torch (and the CUDA it was built with), triton, numpy and
transformers versions; the GPUs and their compute capability; for every registered backend
whether it can run here or the precise reason it cannot (the real import error for triton; for
cuda whether ``prope_kernels._C`` is present and loads, its error if not, and what it was built
for, from the build record ``prope_kernels/_build_info.json`` that setup.py writes); the kernel
switches set in the environment (``PROPE_*``, ``TRITON_INTERPRET``) and what they resolve to;
and the dispatch table ``backend="auto"`` reads.

:func:`collect` returns the facts as a dict (what ``--json`` prints); :func:`render` formats it.
Nothing here launches a kernel or initializes a CUDA context beyond torch's device queries.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import textwrap
from importlib import metadata
from pathlib import Path
from typing import Optional

BUILD_INFO = "_build_info.json"  # written by setup.py (see its _write_build_info)
PACKAGE_DIR = Path(__file__).resolve().parent


def _dist_version(name: str) -> Optional[str]:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _versions() -> dict:
    import torch

    from . import __version__
    return {
        "prope_kernels": __version__,
        "prope_kernels_path": str(PACKAGE_DIR),
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _dist_version("triton"),
        "numpy": _dist_version("numpy"),
        "transformers": _dist_version("transformers"),
        "nvidia-cutlass": _dist_version("nvidia-cutlass"),
    }


def _gpus() -> dict:
    """The GPUs torch sees ({"devices": [...]}), or why there are none ("note")."""
    import torch

    out: dict = {"devices": [], "torch_archs": []}
    if torch.version.cuda is None:
        out["note"] = f"torch {torch.__version__} is a build without CUDA"
        return out
    try:
        out["torch_archs"] = list(torch.cuda.get_arch_list())
    except Exception:  # noqa: BLE001  (a query of a broken install: report, do not fail)
        pass
    try:
        available = torch.cuda.is_available()
    except Exception as e:  # noqa: BLE001
        out["note"] = f"torch.cuda.is_available() raised {type(e).__name__}: {e}"
        return out
    if not available:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        out["note"] = (f"torch {torch.__version__} is built with CUDA {torch.version.cuda}, but "
                       "sees no GPU (no NVIDIA driver or device"
                       + (f"; CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else "")
                       + ")")
        return out
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        out["devices"].append({"index": i, "name": props.name,
                               "capability": f"{props.major}.{props.minor}",
                               "sm": f"sm_{props.major}{props.minor}",
                               "memory_gib": round(props.total_memory / 2**30, 1)})
    return out


# --- the CUDA extension --------------------------------------------------------------------------

def build_record() -> Optional[dict]:
    """setup.py's record of how this install was built (None when there is none: a source
    checkout used without a build, or a build before records were written)."""
    from .backends import cuda

    folders = [PACKAGE_DIR]
    ext = cuda.extension_path()
    if ext is not None and Path(ext).resolve().parent not in folders:
        folders.insert(0, Path(ext).resolve().parent)
    for folder in folders:
        path = folder / BUILD_INFO
        if path.is_file():
            try:
                rec = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                return {"path": str(path), "error": f"unreadable: {e}"}
            return dict(rec, path=str(path))
    return None


def arch_runs_on(arch: str, capability: str) -> bool:
    """Whether code built for ``arch`` (an item of PROPE_CUDA_ARCHS: "8.0", "9.0a", "8.0+PTX")
    runs on a GPU of compute ``capability`` ("9.0"): a cubin runs on its major version at an
    equal or higher minor (an arch-specific "a" target only on its own), PTX on any later GPU
    (compiled by the driver)."""
    m = re.fullmatch(r"(\d+)\.(\d+)([af]?)(\+PTX)?", arch.strip())
    d = re.fullmatch(r"(\d+)\.(\d+)", capability.strip())
    if not m or not d:
        return False
    a_major, a_minor, suffix, ptx = int(m.group(1)), int(m.group(2)), m.group(3), m.group(4)
    g_major, g_minor = int(d.group(1)), int(d.group(2))
    if suffix:
        cubin = (g_major, g_minor) == (a_major, a_minor)
    else:
        cubin = g_major == a_major and g_minor >= a_minor
    return cubin or bool(ptx and (g_major, g_minor) >= (a_major, a_minor))


def _cuda_extension(gpus: dict) -> dict:
    """Is prope_kernels._C here, does it load, what was it built for, does that match the GPUs."""
    import torch

    from .backends import cuda

    ext: dict = {"path": cuda.extension_path(), "loads": False, "error": None,
                 "record": build_record(), "gpus": []}
    if ext["path"] is not None:
        ext["loads"] = cuda._load()
        err = cuda.load_error()
        ext["error"] = None if err is None else f"{type(err).__name__}: {err}"
    rec = ext["record"] or {}
    archs = rec.get("archs") if rec.get("cuda_backend") == "built" else None
    notes = []
    if ext["path"] is None:
        if rec.get("cuda_backend") == "not built":
            notes.append(f"not built: {rec.get('reason', 'no reason recorded')}")
        elif rec.get("cuda_backend") == "built":
            notes.append("the build record says it was built, but the extension file is missing")
        else:
            notes.append("not built (this install has no build record: a source checkout, or "
                         "an install from before records were written)")
    if archs is not None:
        built_with = rec.get("torch")
        if built_with and built_with != torch.__version__:
            notes.append(f"built against torch {built_with}, this is torch {torch.__version__}: "
                         "rebuild it if it does not load")
        for dev in gpus.get("devices", []):
            runs = [a for a in archs if arch_runs_on(a, dev["capability"])]
            sm90 = rec.get("sm90_kernels") and dev["capability"] == "9.0"
            ext["gpus"].append({"index": dev["index"], "sm": dev["sm"], "archs_that_run": runs,
                                "kernels": ("SM90 and SM80" if sm90 else "SM80") if runs
                                else None})
            if not runs:
                notes.append(f"GPU {dev['index']} ({dev['sm']}) runs none of the built archs "
                             f"({', '.join(archs)}): rebuild with PROPE_CUDA_ARCHS="
                             f"\"{dev['capability']}\"")
    ext["notes"] = notes
    return ext


# --- the backends --------------------------------------------------------------------------------

def _backend(be, gpus: dict) -> dict:
    """One registry entry's state here: "available" (and on which devices) or "unavailable"
    with every reason."""
    from . import env

    has_gpu = bool(gpus.get("devices"))
    if be.devices is None:
        where = "any device (CPU and GPU)"
    elif be.interpreter_cpu:
        where = "CUDA GPUs; CPU tensors under TRITON_INTERPRET=1 (slow)"
    else:
        where = "CUDA GPUs"
    out = {"name": be.name, "description": be.description, "runs_on": where,
           "dtypes": [str(t).replace("torch.", "") for t in be.dtypes],
           "head_dims": be.head_dims, "features": sorted(be.features)}
    reasons = []
    why = be.unavailable()
    if why is not None:
        reasons.append(why)
    if be.devices is not None and not has_gpu:
        if be.interpreter_cpu and env.interpreting():
            pass  # the CPU interpreter runs it
        elif be.interpreter_cpu:
            reasons.append(f"needs a CUDA GPU (none here: {gpus.get('note', 'none visible')}); "
                           "TRITON_INTERPRET=1 runs it on the CPU, slowly")
        elif why is None:
            reasons.append(f"needs a CUDA GPU (none here: {gpus.get('note', 'none visible')})")
    if not reasons:  # the module itself must import too
        try:
            be.load()
        except Exception as e:  # noqa: BLE001  (what the user would hit at the first call)
            reasons.append(f"its module {be.module} does not import: {type(e).__name__}: {e}")
    out["state"] = "unavailable" if reasons else "available"
    out["reason"] = "; ".join(reasons) if reasons else None
    if not reasons and be.devices is not None and not has_gpu:
        out["note"] = "on CPU tensors under the Triton interpreter only (TRITON_INTERPRET=1)"
    return out


# --- switches and the dispatch table -------------------------------------------------------------

# each kernel switch and how the package resolves it (prope_kernels.env)
def _resolved() -> dict:
    from . import env

    readers = {
        "TRITON_INTERPRET": lambda: "interpreter (CPU)" if env.interpreting() else "off",
        env.TRITON_KERNELS: env.triton_kernels,
        "PROPE_CUDA_SM90": lambda: {None: "auto (SM90 where built and on sm_90)", True: "SM90",
                                    False: "SM80"}[env.cuda_sm90()],
        "PROPE_CUDA_SM90_FWD": env.cuda_sm90_fwd,
        "PROPE_CUDA_ROT": env.cuda_rot,
        "PROPE_CUDA_SM90_BWD": env.cuda_sm90_bwd,
        "PROPE_SDPA_KERNEL": lambda: env.sdpa_kernel() or "auto (cuDNN, flash, efficient)",
        "PROPE_AUTOTUNE": lambda: "on" if env.autotune() else "off (first config of each table)",
        "PROPE_KV_SPLIT": lambda: env.kv_split() or "chosen by the launcher",
        "PROPE_POISON": lambda: "on" if env.poison() else "off",
    }
    out = {}
    for var, read in readers.items():
        try:
            out[var] = read()
        except Exception as e:  # noqa: BLE001  (an invalid value: the error the kernels raise)
            out[var] = f"invalid: {e}"
    return out


def _switches() -> dict:
    set_ = {k: v for k, v in sorted(os.environ.items())
            if k.startswith("PROPE_") or k == "TRITON_INTERPRET"}
    return {"set": set_, "resolved": _resolved()}


def _dispatch() -> dict:
    from . import dispatch, env

    path = Path(env.dispatch_table() or dispatch.TABLE)
    out = {"path": str(path),
           "source": "PROPE_DISPATCH_TABLE" if env.dispatch_table() else "the package's",
           "exists": path.is_file(), "entries": []}
    if not out["exists"]:
        out["note"] = "no table: auto uses its documented default (prope_kernels/dispatch.py)"
        return out
    try:
        data = json.loads(path.read_text())
        dispatch.table(str(path))  # its schema check
    except Exception as e:  # noqa: BLE001
        out["error"] = f"{type(e).__name__}: {e}"
        return out
    out["run"] = (data.get("run") or {}).get("name")
    for e in data.get("entries", []):
        key = {k: e.get(k) for k in ("arch", "head_dim", "group", "causal", "varlen", "seqlen")}
        try:
            expired = dispatch.expired(e)
        except Exception as err:  # noqa: BLE001
            expired = f"{type(err).__name__}: {err}"
        out["entries"].append({"key": key, "backend": e.get("backend"), "expired": expired})
    current = sum(1 for e in out["entries"] if not e["expired"])
    out["current"] = current
    if not current:
        out["note"] = ("no current entry: auto uses its documented default (triton where it "
                       "runs, else sdpa, else reference; prope_kernels/dispatch.py)")
    return out


def collect() -> dict:
    """Every fact the report shows, as plain data (what ``--json`` prints)."""
    from . import backends

    gpus = _gpus()
    return {
        "versions": _versions(),
        "gpus": gpus,
        "backends": [_backend(backends.get(n), gpus) for n in backends.names()],
        "cuda_extension": _cuda_extension(gpus),
        "switches": _switches(),
        "dispatch": _dispatch(),
    }


# --- the report ----------------------------------------------------------------------------------

def _wrap(text: str, indent: int, width: int = 100) -> list:
    """``text`` wrapped to ``width`` columns, the first line and the rest indented by
    ``indent`` (+2 for the rest)."""
    return textwrap.wrap(text, width, initial_indent=" " * indent,
                         subsequent_indent=" " * (indent + 2), break_on_hyphens=False,
                         break_long_words=False)


def render(info: dict) -> str:
    v, g = info["versions"], info["gpus"]
    lines = ["prope_kernels configuration", ""]
    cuda = f" (CUDA {v['torch_cuda']})" if v["torch_cuda"] else " (CPU build)"
    for label, value in (("prope_kernels", f"{v['prope_kernels']}  {v['prope_kernels_path']}"),
                         ("python", f"{v['python']}  {v['platform']}"),
                         ("torch", v["torch"] + cuda), ("triton", v["triton"]),
                         ("numpy", v["numpy"]), ("transformers", v["transformers"]),
                         ("nvidia-cutlass", v["nvidia-cutlass"])):
        lines.append(f"  {label:<15} {value or 'not installed'}")
    lines += ["", "GPUs"]
    if g["devices"]:
        for d in g["devices"]:
            lines.append(f"  {d['index']}: {d['name']}  compute capability {d['capability']} "
                         f"({d['sm']}), {d['memory_gib']} GiB")
    else:
        lines.append(f"  none: {g.get('note', 'none visible')}")
    lines += ["", "backends (backend=...)"]
    for b in info["backends"]:
        lines.append(f"  {b['name']:<10} {b['state'].upper()}")
        if b["reason"]:
            lines += _wrap(f"why: {b['reason']}", 13)
        if b.get("note"):
            lines += _wrap(f"note: {b['note']}", 13)
        lines += _wrap(f"runs on {b['runs_on']}; {', '.join(b['dtypes'])}; {b['head_dims']}",
                       13)
    e = info["cuda_extension"]
    lines += ["", "CUDA extension prope_kernels._C"]
    if e["path"] is None:
        lines.append("  file: absent")
    else:
        lines.append(f"  file: {e['path']}")
        lines += _wrap("loads: yes" if e["loads"] else f"loads: no: {e['error']}", 2)
    rec = e["record"]
    if rec is None:
        lines.append("  build record: none")
    elif "error" in rec:
        lines.append(f"  build record: {rec['path']}: {rec['error']}")
    else:
        lines.append(f"  build record: {rec['path']}")
        if rec.get("cuda_backend") == "built":
            lines.append(f"    built for: {', '.join(rec.get('archs') or [])}"
                         f"{' (SM90 kernels: 9.0a)' if rec.get('sm90_kernels') else ''}")
            lines.append(f"    against: torch {rec.get('torch')} (CUDA {rec.get('torch_cuda')}),"
                         f" nvcc {rec.get('nvcc')}, nvidia-cutlass {rec.get('cutlass')}")
        else:
            lines += _wrap(f"not built: {rec.get('reason')}", 4)
    for gpu in e["gpus"]:
        runs = ", ".join(gpu["archs_that_run"]) or "none"
        lines.append(f"  GPU {gpu['index']} ({gpu['sm']}): built archs that run: {runs}"
                     + (f"; kernels: {gpu['kernels']}" if gpu["kernels"] else ""))
    for n in e["notes"]:
        lines += _wrap(f"note: {n}", 2)
    s = info["switches"]
    lines += ["", "kernel switches (environment)"]
    if s["set"]:
        lines += [f"  {k}={val}" for k, val in s["set"].items()]
    else:
        lines.append("  none set (the package's defaults)")
    lines.append("  resolved:")
    lines += [f"    {k:<20} {val}" for k, val in s["resolved"].items()]
    d = info["dispatch"]
    lines += ["", 'dispatch table (backend="auto")', f"  {d['path']} ({d['source']})"]
    if d.get("error"):
        lines.append(f"  error: {d['error']}")
    if d.get("run"):
        lines.append(f"  from run: {d['run']}")
    for ent in d["entries"]:
        k = ent["key"]
        state = f"expired: {ent['expired']}" if ent["expired"] else "current"
        lines += _wrap(f"{k['arch']} d{k['head_dim']} group {k['group']} "
                       f"{'causal' if k['causal'] else 'full'} "
                       f"{'varlen' if k['varlen'] else 'dense'} seqlen<={k['seqlen']} -> "
                       f"{ent['backend']} ({state})", 2)
    if d.get("note"):
        lines += _wrap(d["note"], 2)
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="prope-kernels", description="prope_kernels' command line. config (the default): "
        "versions, GPUs, which backends run here and why not, the CUDA extension's build, the "
        "kernel switches, the dispatch table.")
    sub = ap.add_subparsers(dest="command")
    cfg = sub.add_parser("config", aliases=["show-config"],
                         help="what this install can run here (the default command)")
    for p in (ap, cfg):
        p.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                       help="print the facts as JSON")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    info = collect()
    if getattr(args, "json", False):
        print(json.dumps(info, indent=1, default=str))
    else:
        print(render(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
