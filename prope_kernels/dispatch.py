"""``backend="auto"``: which backend runs an input, from measurements where there are any.

The table ``prope_kernels/dispatch.json`` maps a problem key to the backend that was fastest
(forward+backward) in one benchmark run on that GPU architecture. It is written whole by
``python -m bench --write-dispatch`` from that one run (every preset, our backends; or
``--render bench/results/<run>/results.json --write-dispatch`` from a committed run's raw file),
never by hand and never merged from several runs; it names the run (``bench/results/<run>/``),
and a test re-derives the committed table from that run's raw rows (tests/test_sdpa_backend.py).
Only rows that ran a backend's defaults count (its own provider, no kernel switch set): a
provider that forces a kernel variant times something auto does not run.

Key: GPU architecture (``sm_90``), head_dim, GQA group (q_heads // kv_heads), causal, varlen
(sequences of unequal length), and the seqlen bucket: the longest sequence rounded up to a power
of two (at least 128).

Each entry records the version of every compared backend's kernels
(:func:`prope_kernels.backends.kernel_hash`, a hash of their sources). An entry whose versions
differ from the installed package's, or that has none (runs from before they were recorded),
has expired: auto ignores it (``explain()`` says so) until a new run replaces the table. (An
installed package without csrc/ cannot identify its CUDA kernels: there, entries that timed the
cuda backend count as expired.)

Where no current entry applies, the documented default prefers what has been validated on a GPU:

1. ``cuda`` where the CUDA extension declares itself preferred (never today);
2. ``triton`` (any even head_dim <= 256, and 512; fp16/bf16 on CUDA): the fused kernels, whose
   GPU test suite has passed on an H100 and an H200;
3. else ``sdpa`` (PyTorch's attention kernel with our rotation around it), for inputs the Triton
   kernels cannot take;
4. else ``reference`` (pure PyTorch; also every CPU input).

``sdpa`` and ``cuda`` become auto's choice for an input the Triton kernels take only through a
current table entry, which only a GPU benchmark run writes, after its correctness check.

``prope_kernels.explain(q, k, v, ...)`` says which one runs and why.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

from . import env
from .backends import registry

TABLE = Path(__file__).with_name("dispatch.json")
SCHEMA = 2
ABOUT = ("backend='auto' dispatch table: written whole by `python -m bench --write-dispatch` "
         "from the one benchmark run it names; see prope_kernels/dispatch.py")
# the backends auto chooses between by measurement
TIMED = ("triton", "cuda", "sdpa")
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

    @property
    def plan(self) -> str:
        """What the custom ops are given (a string, so that torch.compile traces it): the backend,
        and its kernel where it picks one (``"sdpa:flash"``); the forward saves it for the
        backward, which runs the same plan without deciding again."""
        return f"{self.backend}:{self.kernel}" if self.kernel else self.backend

    def __str__(self) -> str:
        lines = [f"backend: {self.backend} ({self.source})", f"plan: {self.plan}",
                 f"why: {self.reason}"]
        if self.kernel:
            lines.append(f"PyTorch kernel: {self.kernel}")
        if self.key:
            lines.append("dispatch key: " + ", ".join(f"{k}={v}" for k, v in self.key.items()))
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    __repr__ = __str__


def parse_plan(plan: str) -> tuple:
    """(backend, kernel or None) of a :attr:`Decision.plan` string."""
    name, _, kernel = plan.partition(":")
    return name, kernel or None


def plan(backend, q: torch.Tensor, k: torch.Tensor, num_seqs: int, max_seqlen: int,
         causal: bool, needs: frozenset = frozenset()) -> Decision:
    """The one decision of an attention call, made before its forward: ``backend`` ("auto" or a
    name) resolved and checked into a :class:`Decision` whose :attr:`~Decision.plan` the custom
    ops run, forward and backward (nothing downstream checks or chooses again). q (total, hq, d)
    or (batch, seqlen, hq, d); k likewise; needs: the features the call uses. ``explain()``
    returns this same Decision. Raises what the call would raise (ValueError/TypeError naming the
    backend and why it cannot run the input).

    Inside torch.compile the decision cannot be traced (torch's kernel-eligibility checks):
    there "auto" stays "auto", and a named backend its name, and the ops decide on the real
    tensors when they run (the forward and the backward each)."""
    if not isinstance(backend, str) or backend not in registry.choices():
        raise ValueError(f"backend must be one of {registry.choices()}, got {backend!r}")
    compiling = torch.compiler.is_compiling()
    if backend == "auto":
        if compiling:
            return Decision("auto", "inside torch.compile: the op decides on the real tensors",
                            "compile")
        return decide(q, k, num_seqs, max_seqlen, causal, needs=needs)
    be = registry.get(backend)
    be.check(q, needs)
    dec = Decision(backend, f"requested by backend={backend!r}", "requested")
    if be.check_attention is not None and not compiling:
        ch = be.check_attention(q, k, num_seqs, max_seqlen, causal)
        dec.kernel, dec.notes = ch.kernel, list(ch.notes)
        dec.reason += f"; {ch.why}"
    return dec


def decide(q: torch.Tensor, k: torch.Tensor, num_seqs: int, max_seqlen: int,
           causal: bool, needs: frozenset = frozenset()) -> Decision:
    """The auto choice for packed q (total, hq, d), k (total, hkv, d), or (batch, seqlen, ...),
    for a call that uses the features ``needs`` (a backend without one of them cannot run it)."""
    from .backends import sdpa
    d = q.shape[-1]
    if q.device.type != "cuda":
        return Decision("reference", f"tensors on {q.device}: the kernels need CUDA tensors",
                        "default")
    if q.dtype not in _LOWP:
        return Decision("reference", f"{q.dtype}: the kernels take float16/bfloat16",
                        "default")
    notes = []
    runnable = {}
    if "qk_lengths" in needs:
        # keys of their own lengths: sdpa lacks the feature, and its eligibility check reads k
        # as packed like q (a reshape that would raise), so it is not asked
        ch = sdpa.Choice(None, q.dim() == 4, False, "PyTorch's kernels are called without "
                                                    "qk_lengths here")
    else:
        ch = sdpa.choose(q, k, num_seqs, max_seqlen, causal)
    lacks = {n: sorted(set(needs) - set(be.features_on(q, needs))) if needs else []
             for n, be in registry.REGISTRY.items()}
    if ch.kernel and lacks.get("sdpa"):
        ch = sdpa.Choice(None, ch.dense, False, f"PyTorch's kernels are called without "
                                                f"{', '.join(lacks['sdpa'])} here")
    if ch.kernel:
        runnable["sdpa"] = f"PyTorch kernel {ch.kernel}"
        notes += list(ch.notes)
    else:
        notes.append(f"sdpa cannot run: {ch.why}")
    for name in ("triton", "cuda"):
        be = registry.REGISTRY.get(name)
        if be is not None and be.can_run(q) and not lacks.get(name):
            runnable[name] = be.description
        elif name == "triton":
            notes.append("triton cannot run: " + (
                "not available" if be is None or be.unavailable() is not None else
                f"it lacks {', '.join(lacks[name])}" if lacks.get(name) else
                f"it takes {be.head_dims}, got head_dim {d}"))
    k_ = key(arch(q.device), d, q.shape[-2] // k.shape[-2], causal, not ch.dense, max_seqlen)
    cuda_be = registry.REGISTRY.get("cuda")
    cuda_preferred = bool("cuda" in runnable and cuda_be.auto is not None and cuda_be.auto(q))
    return pick(runnable, ch, k_, lookup(k_), cuda_preferred, notes)


def pick(runnable: dict, ch, k_: dict, entry: Optional[dict], cuda_preferred: bool = False,
         notes=None) -> Decision:
    """The policy, on facts alone: runnable backends (name -> what), the sdpa backend's
    :class:`prope_kernels.backends.sdpa.Choice`, the dispatch key and its table entry (or None)."""
    notes = list(notes or [])
    why = expired(entry) if entry is not None else None
    if why:
        notes.append(f"table entry ignored ({entry['backend']}, run "
                     f"{entry.get('source', {}).get('date_utc', '?')}): {why}")
        entry = None
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
        why = "default (no current table entry): the fused Triton kernels, validated on GPUs"
        if ch.kernel in ("cudnn", "flash"):
            notes.append(f"sdpa (PyTorch's {ch.kernel} kernel) could run this input; a GPU "
                         "benchmark run (python -m bench --write-dispatch) decides between them")
        return Decision("triton", why, "default", k_, None, None, notes)
    if "sdpa" in runnable:
        return Decision("sdpa", f"default: the only kernel backend that runs this input "
                                f"(PyTorch's {ch.kernel})", "default", k_, None, ch.kernel, notes)
    return Decision("reference", "default: no kernel backend can run this input", "default",
                    k_, None, None, notes)


@lru_cache(maxsize=1)
def installed_kernels() -> dict:
    """The installed package's kernel versions, {backend: hash} (read once per process)."""
    return registry.kernel_hashes()


def expired(entry: dict) -> Optional[str]:
    """None when every backend the entry compared still has the kernels it was timed with, else
    why the entry no longer holds."""
    rec = entry.get("kernels")
    if not rec:
        return "its run recorded no kernel versions"
    have = installed_kernels()
    changed = sorted(b for b in entry.get("source", {}).get("fwd_bwd_ms", rec)
                     if rec.get(b) is None or rec.get(b) != have.get(b))
    if changed:
        return f"the kernels of {', '.join(changed)} differ from the ones it timed"
    return None


def ran_defaults(row: dict) -> bool:
    """Whether a benchmark row timed its backend as auto runs it: no kernel switch set. Rows of
    runs from before ``switches_set`` was recorded name their switches in ``notes``
    ("PROPE_CUDA_SM90=unset"; that code wrote an unset PROPE_TRITON_KERNELS as "auto")."""
    if "switches_set" in row:
        return not row["switches_set"]
    for var, val in re.findall(r"(PROPE_[A-Z0-9_]+)=([^;\s]+)", row.get("notes") or ""):
        if val != "unset" and (var, val) != ("PROPE_TRITON_KERNELS", "auto"):
            return False
    return True


def entries_from_rows(rows: list, meta: dict) -> list:
    """Table entries from one run's rows: per case, the fastest of our kernel backends in
    forward+backward (``ok`` rows only). Only each backend's own provider counts (``prope-cuda``,
    not ``prope-cuda-sm90-atomic``), and only when it ran with no kernel switch set
    (:func:`ran_defaults`). Cases where fewer than two backends ran give no entry: there was
    nothing to choose between."""
    cap = str(meta.get("capability") or "").replace(".", "")
    arch_ = f"sm_{cap}" if cap else "cpu"
    hashes = meta.get("kernel_hashes") or {}
    by_case = {}
    for r in rows:
        if (r.get("kind") == "ours" and r.get("family") == "prope" and r["status"] == "ok"
                and r["mode"] == "fwd_bwd" and r["backend"] in TIMED
                and r.get("provider", f"prope-{r['backend']}") == f"prope-{r['backend']}"
                and ran_defaults(r)):
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
            fwd_bwd_ms={r["backend"]: round(r["ms_median"], 4) for r in rs}),
            kernels={r["backend"]: hashes.get(r["backend"]) for r in rs} if hashes else None))
    return sorted(out, key=lambda e: tuple(str(x) for x in _key_tuple(e)))


def table_from_rows(rows: list, meta: dict, run: Optional[str]) -> dict:
    """The whole table from one run: its entries, and the run they come from (the folder name
    under bench/results/, and whether the tree it ran from was dirty)."""
    return {"schema": SCHEMA, "about": ABOUT,
            "run": dict(name=run, date_utc=meta.get("date_utc"), gpu=meta.get("gpu"),
                        git_commit=meta.get("git_commit"), git_dirty=meta.get("git_dirty"),
                        git_diff_sha256=meta.get("git_diff_sha256")),
            "entries": entries_from_rows(rows, meta)}


def write(path, table: dict) -> dict:
    """Write a whole table (:func:`table_from_rows`) to ``path``, replacing what was there."""
    Path(path).write_text(json.dumps(table, indent=1) + "\n")
    return table
