"""``backend="auto"``: which backend runs an input, from measurements where there are any.

The table ``prope_kernels/dispatch.json`` maps a problem key to the backend that was fastest
(forward+backward) in a benchmark run on that GPU architecture. It is written by
``python -m bench --write-dispatch`` from a GPU run, never by hand; each entry records the run it
came from (GPU, date, commit, the ms of every backend it compared).

Key: GPU architecture (``sm_90``), head_dim, GQA group (q_heads // kv_heads), causal, varlen
(sequences of unequal length), and the seqlen bucket: the longest sequence rounded up to a power
of two (at least 128).

Where the table has no entry for a key (including every key today: no GPU run has written the
table yet), the documented default applies. It prefers what has been validated on a GPU:

1. ``cuda`` where the CUDA extension declares itself preferred (never today);
2. ``triton`` (any even head_dim <= 256, and 512; fp16/bf16 on CUDA): the fused kernels, whose
   GPU test suite has passed on an H100 and an H200;
3. else ``sdpa`` (PyTorch's attention kernel with our rotation around it), for inputs the Triton
   kernels cannot take;
4. else ``reference`` (pure PyTorch; also every CPU input).

The ``sdpa`` backend is expected to be the faster one where PyTorch has a cuDNN or FlashAttention
kernel (cuDNN + a compiled user RoPE measured 4.73 ms fwd+bwd against 11.5 ms for the fused Triton
op at the Gemma 2B shape, H100, 2026-11-22), but it has not run on a GPU yet: it becomes auto's
choice through a table entry, which only a GPU benchmark run writes, after its correctness check
(``python -m bench --write-dispatch``), never by guess.

``prope_kernels.explain(q, k, v, ...)`` says which one runs and why.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

from . import env

TABLE = Path(__file__).with_name("dispatch.json")
SCHEMA = 1
_LOWP = (torch.float16, torch.bfloat16)


def arch(device) -> Optional[str]:
    """'sm_90' for a CUDA device, None for anything else."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def seqlen_bucket(max_seqlen: int) -> int:
    n = 128
    while n < max_seqlen:
        n *= 2
    return n


def key(arch_: str, head_dim: int, group: int, causal: bool, varlen: bool,
        max_seqlen: int) -> dict:
    return dict(arch=arch_, head_dim=int(head_dim), group=int(group), causal=bool(causal),
                varlen=bool(varlen), seqlen=seqlen_bucket(int(max_seqlen)))


_KEY_FIELDS = ("arch", "head_dim", "group", "causal", "varlen", "seqlen")


def _key_tuple(d: dict) -> tuple:
    return tuple(d[f] for f in _KEY_FIELDS)


@lru_cache(maxsize=4)
def _load(path: str, mtime: float) -> dict:
    data = json.loads(Path(path).read_text())
    if data.get("schema") != SCHEMA:
        raise ValueError(f"{path}: dispatch table schema {data.get('schema')!r}, expected "
                         f"{SCHEMA}")
    return {_key_tuple(e): e for e in data.get("entries", [])}


def table(path=None) -> dict:
    """key tuple -> entry. PROPE_DISPATCH_TABLE overrides the path (tests, experiments)."""
    p = Path(path or env.dispatch_table() or TABLE)
    if not p.is_file():
        return {}
    return _load(str(p), p.stat().st_mtime)


def lookup(k: dict, path=None) -> Optional[dict]:
    return table(path).get(_key_tuple(k))


@dataclass
class Decision:
    """What ``backend="auto"`` (or a named backend) does with an input, and why."""

    backend: str
    reason: str
    source: str                       # "table", "default", "requested"
    key: Optional[dict] = None
    entry: Optional[dict] = None
    kernel: Optional[str] = None      # the sdpa backend's ATen kernel, when it runs
    notes: list = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"backend: {self.backend} ({self.source})", f"why: {self.reason}"]
        if self.kernel:
            lines.append(f"PyTorch kernel: {self.kernel}")
        if self.key:
            lines.append("dispatch key: " + ", ".join(f"{k}={v}" for k, v in self.key.items()))
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    __repr__ = __str__


def decide(q: torch.Tensor, k: torch.Tensor, num_seqs: int, max_seqlen: int,
           causal: bool, needs: frozenset = frozenset()) -> Decision:
    """The auto choice for packed q (total, hq, d), k (total, hkv, d), or (batch, seqlen, ...),
    for a call that uses the features ``needs`` (a backend without one of them cannot run it)."""
    from . import backends, sdpa
    d = q.shape[-1]
    if q.device.type != "cuda":
        return Decision("reference", f"tensors on {q.device}: the kernels need CUDA tensors",
                        "default")
    if q.dtype not in _LOWP:
        return Decision("reference", f"{q.dtype}: the kernels take float16/bfloat16",
                        "default")
    notes = []
    runnable = {}
    ch = sdpa.choose(q, k, num_seqs, max_seqlen, causal)
    lacks = {n: sorted(set(needs) - set(be.features)) for n, be in backends.REGISTRY.items()}
    if ch.kernel and lacks.get("sdpa"):
        ch = sdpa.Choice(None, ch.dense, False, f"PyTorch's kernels are called without "
                                                f"{', '.join(lacks['sdpa'])} here")
    if ch.kernel:
        runnable["sdpa"] = f"PyTorch kernel {ch.kernel}"
        notes += list(ch.notes)
    else:
        notes.append(f"sdpa cannot run: {ch.why}")
    for name in ("triton", "cuda"):
        be = backends.REGISTRY.get(name)
        if be is not None and be.can_run(q) and not lacks.get(name):
            runnable[name] = be.description
        elif name == "triton":
            notes.append("triton cannot run: " + (
                "not available" if be is None or be.unavailable() is not None else
                f"it lacks {', '.join(lacks[name])}" if lacks.get(name) else
                f"it takes {be.head_dims}, got head_dim {d}"))
    k_ = key(arch(q.device), d, q.shape[-2] // k.shape[-2], causal, not ch.dense, max_seqlen)
    cuda_be = backends.REGISTRY.get("cuda")
    cuda_preferred = bool("cuda" in runnable and cuda_be.auto is not None and cuda_be.auto(q))
    return pick(runnable, ch, k_, lookup(k_), cuda_preferred, notes)


def pick(runnable: dict, ch, k_: dict, entry: Optional[dict], cuda_preferred: bool = False,
         notes=None) -> Decision:
    """The policy, on facts alone: runnable backends (name -> what), the sdpa backend's
    :class:`prope_kernels.sdpa.Choice`, the dispatch key and its table entry (or None)."""
    notes = list(notes or [])
    if entry is not None:
        be = entry["backend"]
        if be in runnable:
            src = entry.get("source", {})
            return Decision(be, f"dispatch table entry: fastest fwd+bwd in the benchmark run of "
                                f"{src.get('date_utc', '?')} on {src.get('gpu', '?')} "
                                f"(commit {str(src.get('git_commit', '?'))[:12]})", "table",
                            k_, entry, ch.kernel if be == "sdpa" else None, notes)
        notes.append(f"the table names {be!r}, which cannot run here")
    if "cuda" in runnable and cuda_preferred:
        return Decision("cuda", "default: the CUDA extension is preferred here", "default",
                        k_, None, None, notes)
    if "triton" in runnable:
        why = "default (no table entry): the fused Triton kernels, validated on GPUs"
        if ch.kernel in ("cudnn", "flash"):
            notes.append(f"sdpa (PyTorch's {ch.kernel} kernel) could run this input; a GPU "
                         "benchmark run (python -m bench --write-dispatch) decides between them")
        return Decision("triton", why, "default", k_, None, None, notes)
    if "sdpa" in runnable:
        return Decision("sdpa", f"default: the only kernel backend that runs this input "
                                f"(PyTorch's {ch.kernel})", "default", k_, None, ch.kernel, notes)
    return Decision("reference", "default: no kernel backend can run this input", "default",
                    k_, None, None, notes)


def entries_from_rows(rows: list, meta: dict) -> list:
    """Table entries from benchmark rows: per case, the fastest of our kernel backends in
    forward+backward (``ok`` rows only). Only each backend's own provider counts (``prope-cuda``,
    not ``prope-cuda-sm90-atomic``): a provider that forces a kernel variant times something auto
    does not run. Cases where fewer than two backends ran give no entry: there was nothing to
    choose between."""
    cap = str(meta.get("capability") or "").replace(".", "")
    arch_ = f"sm_{cap}" if cap else "cpu"
    by_case = {}
    for r in rows:
        if (r.get("kind") == "ours" and r.get("family") == "prope" and r["status"] == "ok"
                and r["mode"] == "fwd_bwd" and r["backend"] in ("triton", "cuda", "sdpa")
                and r.get("provider", f"prope-{r['backend']}") == f"prope-{r['backend']}"):
            by_case.setdefault(r["case"], []).append(r)
    out = []
    for case, rs in by_case.items():
        if len(rs) < 2:
            continue
        best = min(rs, key=lambda r: r["ms_median"])
        k_ = key(arch_, best["head_dim"], best["q_heads"] // best["kv_heads"], best["causal"],
                 bool(best["varlen"]), best["seqlen"])
        out.append(dict(k_, backend=best["backend"], source=dict(
            case=case, gpu=meta.get("gpu"), run_kind=meta.get("run_kind"),
            date_utc=meta.get("date_utc"), git_commit=meta.get("git_commit"),
            torch=meta.get("torch"), cudnn=meta.get("cudnn"), triton=meta.get("triton"),
            fwd_bwd_ms={r["backend"]: round(r["ms_median"], 4) for r in rs})))
    return out


def write(path, new_entries: list) -> dict:
    """Merge entries into the table at ``path`` (same key: replaced), keeping the others."""
    p = Path(path)
    data = json.loads(p.read_text()) if p.is_file() else {"schema": SCHEMA}
    data.setdefault("about", "backend='auto' dispatch table: written by `python -m bench "
                             "--write-dispatch` from GPU benchmark runs; see "
                             "prope_kernels/dispatch.py")
    merged = {_key_tuple(e): e for e in data.get("entries", [])}
    for e in new_entries:
        merged[_key_tuple(e)] = e
    data["schema"] = SCHEMA
    data["entries"] = sorted(merged.values(), key=lambda e: tuple(str(x) for x in
                                                                   _key_tuple(e)))
    p.write_text(json.dumps(data, indent=1) + "\n")
    return data
