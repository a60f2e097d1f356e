"""The one runner: per case and provider, build, spot-check, then time every mode.

One row per (case, provider, mode), status ``ok``, ``missing`` (cannot run here), ``failed``
(raised), ``wrong`` (disagrees with the reference: not timed) or ``skipped`` (time budget spent),
each but ok with a reason. GPU timing: ``triton.testing.do_bench`` (CUDA events, L2 flushed),
every run's time kept; CPU (smoke only): the wall clock. Peak memory: extra allocated in one call.
"""

from __future__ import annotations

import gc
import itertools
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from prope_kernels.backends import launched

from . import check as _check
from .cases import Case
from .providers import PROVIDERS, Unavailable, build, rope_tables, short, triton_module

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
CASE_KEYS = ("batch", "seqlen", "total_tokens", "num_docs", "q_heads", "kv_heads", "head_dim",
             "attn_kind", "causal", "p", "theta", "dtype", "varlen", "window", "softcap")
TIME_KEYS = ("ms_median", "ms_p20", "ms_p80", "ms_min", "ms_max", "n_runs")


@dataclass
class Job:
    case: Case
    providers: List[str]
    modes: tuple


@dataclass
class Settings:
    warmup_ms: int = 25
    rep_ms: int = 200
    cpu_warmup: int = 0
    cpu_reps: int = 1
    check: bool = True
    memory: bool = True
    budget_s: Optional[float] = None
    progress: bool = True
    verbose: bool = False
    seed: int = 0
    device: str = field(default_factory=lambda: "cuda" if torch.cuda.is_available() else "cpu")


def make_ctx(case: Case, device) -> dict:
    """Device tensors shared by every provider of a case."""
    lens = list(case.doc_lens) if case.varlen else [case.seqlen] * case.batch
    cu = [0, *itertools.accumulate(lens)]
    lens_t = torch.tensor(lens, device=device)
    doc_ids = torch.repeat_interleave(torch.arange(len(lens), device=device), lens_t)
    positions = torch.arange(cu[-1], device=device) - torch.repeat_interleave(
        torch.tensor(cu[:-1], device=device), lens_t)
    table_pos = positions if case.varlen else torch.arange(case.seqlen, device=device)
    cos, sin = rope_tables(table_pos, case.head_dim, case.p, case.theta)
    return dict(cu_list=cu, cu_seqlens=torch.tensor(cu, dtype=torch.int32, device=device),
                doc_ids=doc_ids, positions=positions, cos=cos, sin=sin)


def make_inputs(case: Case, device, seed: int):
    """Fresh random q, k, v (standard normal: never zeros)."""
    g = torch.Generator(device=device).manual_seed(seed)
    lead = (case.total_tokens,) if case.varlen else (case.batch, case.seqlen)
    return tuple(torch.randn(*lead, h, case.head_dim, generator=g, device=device).to(
        DTYPES[case.dtype]) for h in (case.q_heads, case.kv_heads, case.kv_heads))


def _row(case, prov, mode, status, reason="", timing=None, mem=None, chk=None, notes=(),
         ran=None, switches_set=None):
    r = dict(case=case.name, group=case.group, provider=prov.name, label=prov.label,
             kind=prov.kind, family=prov.family, backend=prov.backend, rope=prov.rope,
             mode=mode, status=status, reason=reason)
    cd = case.as_dict()
    r.update({k: cd[k] for k in CASE_KEYS}, flops=case.flops(mode))
    r.update({k: (timing or {}).get(k) for k in TIME_KEYS})
    r["tflops"] = (r["flops"] / r["ms_median"] / 1e9) if r["ms_median"] else None
    r.update(peak_mib=mem, check_err_out=(chk or {}).get("err_out"),
             check_err_grad=(chk or {}).get("err_grad"), notes="; ".join(notes))
    # ours: what the backend launched, read back after the timed calls ("fwd: cuda sm90
    # overlap+lpt; bwd: cuda sm90 split"), and the kernel switches the provider set ({}: none)
    r.update(switches=switches_text(ran) if ran else "",
             switches_set=switches_set if prov.family == "prope" else None)
    return r


def switches_text(ran: dict) -> str:
    """prope_kernels.backends.launched() as text: "fwd: triton portable; bwd: triton portable"."""
    return "; ".join(f"{p}: " + " ".join(str(v) for v in ran[p].values() if v)
                     for p in ("fwd", "bwd") if p in ran)


def _stats(times):
    t = sorted(float(x) for x in times)
    n = len(t)

    def q(f):  # linear-interpolated percentile
        lo = int(f * (n - 1))
        return t[lo] + (t[min(lo + 1, n - 1)] - t[lo]) * (f * (n - 1) - lo)
    return dict(ms_median=statistics.median(t), ms_p20=q(0.2), ms_p80=q(0.8), ms_min=t[0],
                ms_max=t[-1], n_runs=n)


def bench_gpu(fn, warmup_ms=25, rep_ms=200, grad_to_none=None):
    from triton.testing import do_bench  # every run's time (return_mode "all": Triton >= 3.0)
    return _stats(do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none,
                           return_mode="all"))


def bench_cpu(fn, warmup=1, reps=2, grad_to_none=None):
    times = []
    for i in range(warmup + reps):
        for t in grad_to_none or ():
            t.grad = None
        t0 = time.perf_counter()
        fn()
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return _stats(times)


def peak_mib(fn, grad_to_none=None):
    """Extra peak GPU memory (MiB) while ``fn`` runs; None on the CPU."""
    if not torch.cuda.is_available():
        return None
    for t in grad_to_none or ():
        t.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    res = fn()
    torch.cuda.synchronize()
    del res
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _cleanup(device, full=False):
    if full:  # gc.collect costs ~0.2 s with torch loaded: only after a failure
        gc.collect()
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def mode_fn(impl, mode, q, k, v, dout):
    """(the call that one timing of ``mode`` makes, the tensors whose .grad it must reset)."""
    if mode == "fwd":  # grad enabled: saves what bwd needs
        return (lambda: impl.fn(q, k, v)), None
    if mode == "fwd_bwd":
        return (lambda: impl.fn(q, k, v).backward(dout)), [q, k, v]
    if mode == "bwd":
        out = impl.fn(q, k, v)
        return (lambda: out.backward(dout, retain_graph=True)), [q, k, v]
    raise ValueError(f"unknown mode {mode!r}")


class _NoBar:  # progress bar without tqdm
    def __init__(self, *a, **k):
        pass
    update = set_description = close = __init__
    write = staticmethod(print)


def total_pairs(jobs):
    return sum(len(j.providers) for j in jobs)


def run_jobs(jobs: List[Job], st: Settings, log=None) -> List[dict]:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress bar is optional (pip install tqdm)
        tqdm = _NoBar
    log = log or (lambda msg: tqdm.write(msg, file=sys.stderr))
    rows: List[dict] = []
    t_start = time.monotonic()
    bar = tqdm(total=total_pairs(jobs), disable=not st.progress, unit="run", file=sys.stderr,
               dynamic_ncols=True)
    device = torch.device(st.device)
    try:
        for ji, job in enumerate(jobs):
            ctx = make_ctx(job.case, device)
            for pi, pname in enumerate(job.providers):
                bar.set_description(f"{job.case.name} {pname}"[:60])
                t_pair = time.monotonic()
                new = _run_pair(job.case, PROVIDERS[pname], job.modes, ctx, device, st,
                                t_start, seed=st.seed + 1000 * ji + 10 * pi, log=log)
                for r in new:  # wall time of the whole pair: build, compile, check, timing
                    r["wall_s"] = round(time.monotonic() - t_pair, 2)
                rows += new
                bar.update(1)
                _cleanup(device, full=any(r["status"] == "failed" for r in new))
            del ctx
    finally:
        bar.close()
    return rows


def _why(e, caught, n=300):
    """The exception, plus the warnings that explain it (SDPA says why each backend refused)."""
    hints = list(dict.fromkeys(m for m in (" ".join(str(w.message).split()) for w in caught)
                               if "because" in m or "kernel" in m.lower()))
    reason = short(e) + (" [" + " / ".join(hints) + "]" if hints else "")
    return reason if len(reason) <= n else reason[: n - 3] + "..."


def _triton_configs(ran, mode) -> list:
    """The configs (as the autotuner chose them) of the Triton kernels each pass of this mode
    launched (``ran``: backends.launched())."""
    passes = [p for p in {"fwd": ("fwd",), "bwd": ("bwd",)}.get(mode, ("fwd", "bwd"))
              if ran.get(p, {}).get("backend") == "triton"]
    if not passes:
        return []
    hopper = triton_module("hopper")
    kernels = {("fwd", "portable"): ("fwd",), ("bwd", "portable"): ("dkdv", "dq"),
               ("fwd", "hopper"): ("hfwd",), ("bwd", "hopper"): ("hbwd", "hdkdv", "hdq")}
    chosen = {**triton_module("tuning").chosen_configs(), **hopper.chosen_configs()}
    names = [n for p in passes for n in kernels[p, ran[p]["kernels"]] if n in chosen]
    return ["configs " + ", ".join(f"{n} {chosen[n]}" for n in names)] if names else []


def _run_pair(case, prov, modes, ctx, device, st, t_start, seed, log):
    def rows_of(status, reason, **kw):
        return [_row(case, prov, m, status, reason, **kw) for m in modes]

    if st.budget_s is not None and time.monotonic() - t_start > st.budget_s:
        return rows_of("skipped", f"time budget of {st.budget_s:.0f} s spent")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            q, k, v = make_inputs(case, device, seed)
            impl = build(prov, case, ctx, q, k, v)
        except Unavailable as e:
            if st.verbose:
                log(f"[missing] {prov.name} on {case.name}: {e}")
            return rows_of("missing", str(e))
        except Exception as e:  # noqa: BLE001 - a peer that fails is reported, not fatal
            log(f"[failed] {prov.name} on {case.name}: {_why(e, caught)}")
            return rows_of("failed", _why(e, caught))
        chk = None
        if st.check:
            try:  # a fresh draw for the check
                chk = _check.spot_check(impl.fn, case, ctx, *make_inputs(case, device, seed + 1),
                                        0.0 if prov.rope == "none" else case.p,
                                        any(m != "fwd" for m in modes), seed=seed)
            except Exception as e:  # noqa: BLE001
                log(f"[failed] {prov.name} on {case.name}: {_why(e, caught)}")
                return rows_of("failed", _why(e, caught), notes=impl.notes)
        if chk is not None and not chk["ok"]:
            log(f"[wrong] {prov.name} on {case.name}: {chk['msg']}")
            return rows_of("wrong", "spot check vs reference: " + chk["msg"], chk=chk,
                           notes=impl.notes)
    rows = []
    q, k, v = (x.requires_grad_(True) for x in (q, k, v))
    dout = torch.randn_like(q)  # out has q's shape in every layout
    for mode in modes:
        try:
            launched(clear=True)
            fn, gtn = mode_fn(impl, mode, q, k, v, dout)
            timing = (bench_gpu(fn, st.warmup_ms, st.rep_ms, gtn) if q.device.type == "cuda"
                      else bench_cpu(fn, st.cpu_warmup, st.cpu_reps, gtn))
            mem = peak_mib(fn, gtn) if st.memory else None
            ran = launched(clear=True)
            rows.append(_row(case, prov, mode, "ok", timing=timing, mem=mem, chk=chk,
                             notes=impl.notes + _triton_configs(ran, mode), ran=ran,
                             switches_set=impl.switches_set))
        except Exception as e:  # noqa: BLE001
            reason = "out of memory" if isinstance(e, torch.cuda.OutOfMemoryError) else short(e)
            log(f"[failed] {prov.name} on {case.name} {mode}: {reason}")
            rows.append(_row(case, prov, mode, "failed", reason, chk=chk, notes=impl.notes))
            _cleanup(device, full=True)
        for x in (q, k, v):
            x.grad = None
    return rows
