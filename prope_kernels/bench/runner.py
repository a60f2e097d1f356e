"""The loop: for each case and provider, build, spot-check, then time every mode.

One row per (case, provider, mode) with a status:
  ok        timed
  missing   the provider cannot run here (not installed, no GPU, ...): reason given
  failed    it raised (no kernel for this shape, out of memory, compile error): reason given
  wrong     its output or gradients disagree with the reference: not timed
  skipped   the run's time budget was spent before it came up
"""

from __future__ import annotations

import gc
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from prope_kernels.backends import launched

from . import check as _check
from .cases import Case
from .providers import PROVIDERS, Unavailable, _short, build
from .timing import bench_cpu, bench_gpu, peak_mib

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


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
    from .user_rope import rope_tables
    if case.varlen:
        lens = list(case.doc_lens)
    else:
        lens = [case.seqlen] * case.batch
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    lens_t = torch.tensor(lens, device=device)
    doc_ids = torch.repeat_interleave(torch.arange(len(lens), device=device), lens_t)
    starts = torch.repeat_interleave(torch.tensor(cu[:-1], device=device), lens_t)
    positions = torch.arange(cu[-1], device=device) - starts
    table_pos = positions if case.varlen else torch.arange(case.seqlen, device=device)
    cos, sin = rope_tables(table_pos, case.head_dim, case.p, case.theta)
    return dict(cu_list=cu, cu_seqlens=torch.tensor(cu, dtype=torch.int32, device=device),
                doc_ids=doc_ids, positions=positions, cos=cos, sin=sin)


def make_inputs(case: Case, device, seed: int):
    """Fresh random q, k, v (standard normal: never zeros)."""
    g = torch.Generator(device=device).manual_seed(seed)
    lead = (case.total_tokens,) if case.varlen else (case.batch, case.seqlen)
    dt = DTYPES[case.dtype]
    mk = lambda h: torch.randn(*lead, h, case.head_dim, generator=g, device=device,  # noqa: E731
                               dtype=torch.float32).to(dt)
    return mk(case.q_heads), mk(case.kv_heads), mk(case.kv_heads)


def _row(case, prov, mode, status, reason="", timing=None, mem=None, chk=None, notes=(),
         ran=None, switches_set=None):
    r = dict(case=case.name, group=case.group, provider=prov.name, label=prov.label,
             kind=prov.kind, family=prov.family, backend=prov.backend, rope=prov.rope,
             mode=mode, status=status, reason=reason)
    cd = case.as_dict()
    for key in ("batch", "seqlen", "total_tokens", "num_docs", "q_heads", "kv_heads",
                "head_dim", "attn_kind", "causal", "p", "theta", "dtype", "varlen", "window",
                "softcap"):
        r[key] = cd[key]
    r["flops"] = case.flops(mode)
    t = timing or {}
    for key in ("ms_median", "ms_p20", "ms_p80", "ms_min", "ms_max", "n_runs"):
        r[key] = t.get(key)
    r["tflops"] = (r["flops"] / r["ms_median"] / 1e9) if r["ms_median"] else None
    r["peak_mib"] = mem
    c = chk or {}
    r["check_err_out"] = c.get("err_out")
    r["check_err_grad"] = c.get("err_grad")
    r["notes"] = "; ".join(notes)
    # ours: what the backend launched, read back after the timed calls ("fwd: cuda sm90
    # overlap+lpt; bwd: cuda sm90 split"), and the kernel switches the provider set ({}: none)
    r["switches"] = switches_text(ran) if ran else ""
    r["switches_set"] = switches_set if prov.family == "prope" else None
    return r


def switches_text(ran: dict) -> str:
    """prope_kernels.backends.launched() as text: "fwd: triton portable; bwd: triton portable"."""
    return "; ".join(f"{p}: " + " ".join(str(v) for v in ran[p].values() if v)
                     for p in ("fwd", "bwd") if p in ran)


def _cleanup(device, full=False):
    if full:  # gc.collect costs ~0.2 s with torch loaded: only after a failure
        gc.collect()
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _measure(impl, case, mode, q, k, v, dout, st: Settings):
    on_gpu = q.device.type == "cuda"

    def timer(fn, gtn):
        if on_gpu:
            return bench_gpu(fn, st.warmup_ms, st.rep_ms, gtn)
        return bench_cpu(fn, st.cpu_warmup, st.cpu_reps, gtn)

    qkv = [q, k, v]
    if mode == "fwd":
        fn = lambda: impl.fn(q, k, v)  # noqa: E731  (grad enabled: saves what bwd needs)
        timing = timer(fn, None)
        mem = peak_mib(fn) if st.memory else None
    elif mode == "fwd_bwd":
        def fn():
            impl.fn(q, k, v).backward(dout)
        timing = timer(fn, qkv)
        mem = peak_mib(fn, qkv) if st.memory else None
    elif mode == "bwd":
        out = impl.fn(q, k, v)

        def fn():
            out.backward(dout, retain_graph=True)
        timing = timer(fn, qkv)
        mem = peak_mib(fn, qkv) if st.memory else None
        del out
    else:
        raise ValueError(f"unknown mode {mode!r}")
    for x in qkv:
        x.grad = None
    return timing, mem


class _NoBar:
    def __init__(self, *a, **k):
        pass

    update = set_description = close = __init__

    @staticmethod
    def write(msg, file=None):
        print(msg, file=file)


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
            case = job.case
            ctx = make_ctx(case, device)
            for pi, pname in enumerate(job.providers):
                prov = PROVIDERS[pname]
                bar.set_description(f"{case.name} {pname}"[:60])
                t_pair = time.monotonic()
                new = _run_pair(case, prov, job.modes, ctx, device, st, t_start,
                                seed=st.seed + 1000 * ji + 10 * pi, log=log)
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
    reason = _short(e)
    hints = []
    for w in caught:
        msg = " ".join(str(w.message).split())
        if ("because" in msg or "kernel" in msg.lower()) and msg not in hints:
            hints.append(msg)
    if hints:
        reason += " [" + " / ".join(hints) + "]"
    return reason if len(reason) <= n else reason[: n - 3] + "..."


def _triton_configs(ran, mode) -> list:
    """The configs the Triton kernels launched in this mode ran with (as chosen by the
    autotuner), of the kernel set each pass launched (``ran``: backends.launched())."""
    passes = [p for p in (("fwd",) if mode == "fwd" else ("bwd",) if mode == "bwd" else
                          ("fwd", "bwd")) if ran.get(p, {}).get("backend") == "triton"]
    if not passes:
        return []
    from prope_kernels.backends.triton import hopper
    from prope_kernels.backends.triton.tuning import chosen_configs
    names = {("fwd", "portable"): ("fwd",), ("bwd", "portable"): ("dkdv", "dq"),
             ("fwd", "hopper"): ("hfwd",), ("bwd", "hopper"): ("hbwd", "hdkdv", "hdq")}
    chosen = {**chosen_configs(), **hopper.chosen_configs()}
    names = [n for p in passes for n in names[p, ran[p]["kernels"]] if n in chosen]
    return ["configs " + ", ".join(f"{n} {chosen[n]}" for n in names)] if names else []


def _run_pair(case, prov, modes, ctx, device, st, t_start, seed, log):
    if st.budget_s is not None and time.monotonic() - t_start > st.budget_s:
        return [_row(case, prov, m, "skipped", f"time budget of {st.budget_s:.0f} s spent")
                for m in modes]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            q, k, v = make_inputs(case, device, seed)
            impl = build(prov, case, ctx, q, k, v)
        except Unavailable as e:
            if st.verbose:
                log(f"[missing] {prov.name} on {case.name}: {e}")
            return [_row(case, prov, m, "missing", str(e)) for m in modes]
        except Exception as e:  # noqa: BLE001 - a peer that fails is reported, not fatal
            reason = _why(e, caught)
            log(f"[failed] {prov.name} on {case.name}: {reason}")
            return [_row(case, prov, m, "failed", reason) for m in modes]

        chk = None
        if st.check:
            with_grad = any(m != "fwd" for m in modes)
            claim_p = 0.0 if prov.rope == "none" else case.p
            try:
                cq, ck, cv = make_inputs(case, device, seed + 1)  # a fresh draw for the check
                chk = _check.spot_check(impl.fn, case, ctx, cq, ck, cv, claim_p, with_grad,
                                        seed=seed)
                del cq, ck, cv
            except Exception as e:  # noqa: BLE001
                reason = _why(e, caught)
                log(f"[failed] {prov.name} on {case.name}: {reason}")
                return [_row(case, prov, m, "failed", reason, notes=impl.notes)
                        for m in modes]
        if chk is not None and not chk["ok"]:
            log(f"[wrong] {prov.name} on {case.name}: {chk['msg']}")
            return [_row(case, prov, m, "wrong", "spot check vs reference: " + chk["msg"],
                         chk=chk, notes=impl.notes) for m in modes]

    rows = []
    q, k, v = (x.requires_grad_(True) for x in (q, k, v))
    dout = torch.randn_like(q)  # out has q's shape in every layout
    for mode in modes:
        try:
            launched(clear=True)
            timing, mem = _measure(impl, case, mode, q, k, v, dout, st)
            ran = launched(clear=True)
            rows.append(_row(case, prov, mode, "ok", timing=timing, mem=mem, chk=chk,
                             notes=impl.notes + _triton_configs(ran, mode), ran=ran,
                             switches_set=impl.switches_set))
        except Exception as e:  # noqa: BLE001
            reason = ("out of memory" if isinstance(e, torch.cuda.OutOfMemoryError)
                      else _short(e))
            log(f"[failed] {prov.name} on {case.name} {mode}: {reason}")
            rows.append(_row(case, prov, mode, "failed", reason, chk=chk, notes=impl.notes))
            for x in (q, k, v):
                x.grad = None
            _cleanup(device, full=True)
    return rows
