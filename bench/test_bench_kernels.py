"""Kernel timings under pytest-benchmark, to save and compare across commits.

    pytest bench/ --benchmark-only --benchmark-save=NAME     # .benchmarks/<machine>/NNNN_NAME.json
    pytest-benchmark compare 0001 0002 --group-by=group      # or: --benchmark-compare=0001
    pytest bench/ --benchmark-only --bench-presets=gemma-2b --bench-providers='prope-*'

One test per (preset, provider, mode). Each provider is spot-checked against the reference first
(a wrong result fails the test for our kernels, skips a peer with the reason); a provider that
cannot run here skips with the reason. Timings are host wall clock around a call followed by
``torch.cuda.synchronize()`` (fine for the millisecond calls here); ``python -m bench`` (CUDA
events, TFLOP/s, memory, peers side by side) is the report to quote.

Without a GPU the GPU tests skip; ``test_cpu_smoke`` runs the reference and the Triton interpreter
at a tiny shape so the pipeline is exercised (those numbers mean nothing).
"""

from __future__ import annotations

import time

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from prope_kernels.bench.cases import PRESETS, SMOKE_PRESETS  # noqa: E402
from prope_kernels.bench.check import spot_check  # noqa: E402
from prope_kernels.bench.providers import (PROVIDERS, PYTEST_SMOKE_PROVIDERS,  # noqa: E402
                                           Unavailable, build, short)
from prope_kernels.bench.runner import make_ctx, make_inputs, mode_fn  # noqa: E402

GPU = torch.cuda.is_available()


def _sync():
    if GPU:
        torch.cuda.synchronize()


def _prepare(case, pname, mode, device):
    prov = PROVIDERS[pname]
    ctx = make_ctx(case, device)
    q, k, v = make_inputs(case, device, seed=0)
    try:
        impl = build(prov, case, ctx, q, k, v)
    except Unavailable as e:
        pytest.skip(f"{pname} unavailable: {e}")
    except Exception as e:  # noqa: BLE001
        if prov.kind == "ours":
            raise
        pytest.skip(f"{pname} failed on {case.name}: {short(e)}")
    claim_p = 0.0 if prov.rope == "none" else case.p
    chk = spot_check(impl.fn, case, ctx, *make_inputs(case, device, seed=1), claim_p,
                     with_grad=mode != "fwd")
    if not chk["ok"]:
        msg = f"{pname} disagrees with the reference on {case.name}: {chk['msg']}"
        if prov.kind == "ours":
            pytest.fail(msg)
        pytest.skip(msg)
    q, k, v = (x.requires_grad_(True) for x in (q, k, v))
    dout = torch.randn_like(q)

    def reset():
        for x in (q, k, v):
            x.grad = None

    call, _ = mode_fn(impl, mode, q, k, v, dout)

    def fn():
        call()
        _sync()
    return fn, reset, chk


def _bench(benchmark, case, pname, mode, device, max_rounds=200, target_s=0.3):
    fn, reset, chk = _prepare(case, pname, mode, device)
    reset()
    fn()  # compile / autotune outside the timed rounds
    reset()
    t0 = time.perf_counter()
    fn()
    one = time.perf_counter() - t0
    rounds = int(min(max_rounds, max(3, target_s / max(one, 1e-6))))
    benchmark.group = f"{case.name} {mode}"
    benchmark.extra_info.update(
        case=case.name, provider=pname, mode=mode, shape=case.describe(),
        flops=case.flops(mode), check_err_out=chk["err_out"], check_err_grad=chk["err_grad"],
        gpu=torch.cuda.get_device_name() if GPU else "cpu-smoke",
        torch=torch.__version__, triton=_triton_version())
    benchmark.pedantic(fn, setup=reset, rounds=rounds, warmup_rounds=min(3, rounds),
                       iterations=1)
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if stats is not None and stats.median:
        benchmark.extra_info["tflops_median"] = case.flops(mode) / stats.median / 1e12


def _triton_version():
    try:
        import triton
        return triton.__version__
    except ImportError:
        return None


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU (kernel timings); on a CPU only "
                    "test_cpu_smoke runs; `python -m bench --smoke` is the CPU pipeline check")
def test_gpu(benchmark, gpu_preset, gpu_provider, mode):
    if gpu_preset not in PRESETS:
        pytest.fail(f"unknown preset {gpu_preset!r}; choose from {', '.join(PRESETS)}")
    _bench(benchmark, PRESETS[gpu_preset], gpu_provider, mode, torch.device("cuda"))


@pytest.mark.skipif(GPU, reason="a GPU is present: test_gpu times the kernels")
@pytest.mark.parametrize("provider", PYTEST_SMOKE_PROVIDERS)
def test_cpu_smoke(benchmark, provider):
    """CPU smoke variant: tiny shape, a few rounds; proves the harness works, measures nothing."""
    _bench(benchmark, SMOKE_PRESETS["smoke-mqa"], provider, "fwd_bwd", torch.device("cpu"),
           max_rounds=3)
