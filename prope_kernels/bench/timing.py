"""Timing and peak memory of one call.

GPU: ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs), every run's time kept
(``return_mode="all"``; older Triton: quantiles), reported as median with the 20th/80th
percentiles. CPU (smoke only): wall clock over a few runs; such figures say nothing about speed.
Peak memory: ``torch.cuda.max_memory_allocated`` during one call minus what was allocated before.
"""

from __future__ import annotations

import statistics
import time

import torch


def _stats(times):
    times = sorted(float(t) for t in times)
    n = len(times)

    def q(f):
        if n == 1:
            return times[0]
        x = f * (n - 1)
        lo = int(x)
        hi = min(lo + 1, n - 1)
        return times[lo] + (times[hi] - times[lo]) * (x - lo)
    return dict(ms_median=statistics.median(times), ms_p20=q(0.2), ms_p80=q(0.8),
                ms_min=times[0], ms_max=times[-1], n_runs=n)


def bench_gpu(fn, warmup_ms=25, rep_ms=200, grad_to_none=None):
    from triton.testing import do_bench
    try:
        times = do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none,
                         return_mode="all")
        if isinstance(times, (list, tuple)) and len(times) > 0:
            return _stats(times)
    except (AssertionError, TypeError, ValueError):
        pass  # a Triton without return_mode="all": fall back to quantiles
    qs = do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none,
                  quantiles=[0.5, 0.2, 0.8, 0.0, 1.0])
    med, p20, p80, mn, mx = (float(x) for x in qs)
    return dict(ms_median=med, ms_p20=p20, ms_p80=p80, ms_min=mn, ms_max=mx, n_runs=None)


def bench_cpu(fn, warmup=1, reps=2, grad_to_none=None):
    times = []
    for i in range(warmup + reps):
        for t in grad_to_none or ():
            t.grad = None
        t0 = time.perf_counter()
        fn()
        dt = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            times.append(dt)
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
    peak = torch.cuda.max_memory_allocated()
    del res
    return (peak - base) / 2**20
