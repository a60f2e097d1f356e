"""Where the time of one fused call goes: GPU time per kernel, from the torch profiler.

    python -m prope_kernels.bench.breakdown --preset llama-gqa --backend cuda --json out.json

(``python -m bench.breakdown`` from the repository root.) Per mode (fwd, fwd+bwd), a few calls
after warm-up (autotuning and compiles over), every kernel launched with its share of the time.
Without a GPU: a tiny case and CPU time per op (a pipeline check, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

import torch

from prope_kernels import backends

from . import providers as P
from .cases import PRESETS
from .runner import make_ctx, make_inputs


def profile_call(fn, n_iter: int, on_gpu: bool) -> list:
    """[(kernel name, calls per iteration, us per iteration)], largest first."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CUDA] if on_gpu else [ProfilerActivity.CPU]
    with profile(activities=acts) as prof:
        for _ in range(n_iter):
            fn()
        if on_gpu:
            torch.cuda.synchronize()
    rows = defaultdict(lambda: [0, 0.0])
    for evt in prof.key_averages():
        # self time in microseconds (GPU: self_cuda_time_total on older torch)
        t = float((getattr(evt, "self_device_time_total", 0) or getattr(
            evt, "self_cuda_time_total", 0) or 0) if on_gpu else evt.self_cpu_time_total)
        if t <= 0:
            continue
        rows[evt.key][0] += evt.count
        rows[evt.key][1] += t
    out = [(k, c / n_iter, t / n_iter) for k, (c, t) in rows.items()]
    return sorted(out, key=lambda r: -r[2])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m prope_kernels.bench.breakdown",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="gemma-2b", choices=sorted(PRESETS))
    ap.add_argument("--backend", default="triton", choices=backends.names())
    ap.add_argument("--p", type=float, default=None, help="override the preset's p")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="tiny shape (CPU / interpreter check)")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args(argv)

    from dataclasses import replace

    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    case = PRESETS[args.preset]
    if args.p is not None:
        case = replace(case, p=args.p)
    if args.smoke or not on_gpu:
        case = replace(case, batch=1, seqlen=min(case.seqlen, 64), doc_lens=None,
                       q_heads=min(case.q_heads, 4), kv_heads=min(case.kv_heads, 2))
    ctx = make_ctx(case, device)
    q, k, v = make_inputs(case, device, seed=0)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    dout = torch.randn_like(q)
    # the benchmark's own call of this backend (window, softcap, varlen as the case has them)
    impl = P.build(P.PROVIDERS[f"prope-{args.backend}"], case, ctx, q, k, v)

    def call():
        return impl.fn(q, k, v)

    def fwd_bwd():
        call().backward(dout)

    print(f"{case.name}: {case.describe()}, backend {args.backend}, "
          f"{torch.cuda.get_device_name() if on_gpu else 'CPU (not a measurement)'}")
    result = {"case": case.as_dict(), "backend": args.backend, "gpu": on_gpu, "modes": {}}
    for mode, fn in (("fwd", call), ("fwd+bwd", fwd_bwd)):
        for _ in range(2):  # warm-up: autotuning and compiles happen here, not in the profile
            fn()
        rows = profile_call(fn, args.iters, on_gpu)
        total = sum(r[2] for r in rows) or 1.0
        unit = "GPU" if on_gpu else "CPU self"
        print(f"\n{mode}: {total / 1000:.3f} ms of {unit} time per call")
        print(f"| kernel | calls | us | share |\n|---|---|---|---|")
        for name, calls, us in rows:
            print(f"| `{name[:90]}` | {calls:g} | {us:.1f} | {100 * us / total:.1f}% |")
        result["modes"][mode] = [dict(kernel=n, calls=c, us=t) for n, c, t in rows]
        for x in (q, k, v):
            x.grad = None
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
