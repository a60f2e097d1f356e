"""Correctness guard: spot-check a provider against the reference before it is timed.

Cheap at any size: ``dout`` is zero except on a few query rows of the first and last sequence,
so the float32 reference needs only those rows' attention (rows x keys): their output, their dq
and dk, dv of the two sequences; the provider's gradients elsewhere must be zero. Errors are
relative Frobenius norms; above the dtype's tolerance the provider is marked wrong, not timed.
"""

from __future__ import annotations

import torch

from prope_kernels.reference import apply_prope, attention_mask, softcap_scores
from prope_kernels.rotary import PRoPESpec

# relative-norm tolerance: a few times the rounding error of a bf16/fp16 attention (fwd and bwd);
# a wrong rotation, mask or GQA mapping gives errors of order 0.1 to 1.
TOLERANCE = {torch.bfloat16: 5e-2, torch.float16: 2e-2, torch.float32: 1e-3}
ROWS_PER_SEQ = 16


def _rel(x, ref):
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _seqs(ctx):
    """(start, end) of the first and last sequence in the packed token order."""
    cu = ctx["cu_list"]
    spans = [(a, b) for a, b in zip(cu[:-1], cu[1:]) if b > a]
    return [spans[0]] if len(spans) == 1 else [spans[0], spans[-1]]


def _rows(n, gen):
    pick = {0, n - 1, n // 2, min(1, n - 1)}
    extra = torch.randint(0, n, (ROWS_PER_SEQ,), generator=gen).tolist()
    pick.update(extra[: max(0, ROWS_PER_SEQ - len(pick))])
    return sorted(pick)


def spot_check(fn, case, ctx, q, k, v, spec_p: float, with_grad: bool, seed: int = 0):
    """Run ``fn`` once (and its backward when ``with_grad``) on q, k, v (the case's layout) and
    compare with the reference at p ``spec_p`` (0 for "no RoPE" rows). Returns a dict: ok,
    err_out, err_grad, leak, msg."""
    dt = q.dtype
    hq, hkv, d = case.q_heads, case.kv_heads, case.head_dim
    group = hq // hkv
    scale = d ** -0.5
    spec = PRoPESpec(d, float(spec_p), float(case.theta))
    gen = torch.Generator().manual_seed(seed)
    pos = ctx["positions"]

    q, k, v = (x.detach().requires_grad_(with_grad) for x in (q, k, v))
    with torch.set_grad_enabled(with_grad):
        out = fn(q, k, v)
    flat = lambda x: x.reshape(-1, x.shape[-2], x.shape[-1])  # noqa: E731
    qf, kf, vf, of = flat(q), flat(k), flat(v), flat(out)
    if not torch.isfinite(of).all():
        return dict(ok=False, err_out=float("nan"), err_grad=None, leak=None,
                    msg="non-finite values in the output")

    dout = torch.zeros_like(of)
    errs_out, errs_grad, refs = [], [], []
    for a, b in _seqs(ctx):
        rows = torch.tensor(_rows(b - a, gen), device=q.device)
        dout[a + rows] = torch.randn(len(rows), hq, d, generator=gen).to(q.device, dt)
        # reference in float32 from the same (rounded) inputs
        ql = qf[a + rows].detach().float().requires_grad_(with_grad)
        kl = kf[a:b].detach().float().requires_grad_(with_grad)
        vl = vf[a:b].detach().float().requires_grad_(with_grad)
        with torch.set_grad_enabled(with_grad):
            qr = apply_prope(ql, pos[a + rows], spec)           # (R, hq, d)
            kr = apply_prope(kl, pos[a:b], spec)                # (L, hkv, d)
            kr = kr.repeat_interleave(group, dim=1)
            ve = vl.repeat_interleave(group, dim=1)
            s = softcap_scores(torch.einsum("rhd,lhd->hrl", qr, kr) * scale, case.softcap)
            # the checked rows of the sequence's (L, L) mask (positions = indices in it)
            mask = attention_mask(b - a, b - a, case.causal, case.window, q.device)
            if mask is not None:
                s = s.masked_fill(~mask[rows][None], float("-inf"))
            o_ref = torch.einsum("hrl,lhd->rhd", torch.softmax(s, dim=-1), ve)
        errs_out.append(_rel(of[a + rows].detach(), o_ref.detach()))
        refs.append((a, b, rows, ql, kl, vl, o_ref))

    if with_grad:
        out.backward(dout.view_as(out))
        dq, dk, dv = (flat(x.grad if x.grad is not None else torch.zeros_like(x))
                      for x in (q, k, v))
        for a, b, rows, ql, kl, vl, o_ref in refs:
            o_ref.backward(dout[a + rows].float())
            errs_grad += [_rel(dq[a + rows], ql.grad), _rel(dk[a:b], kl.grad),
                          _rel(dv[a:b], vl.grad)]
        # nothing may land outside the checked rows (dq) and sequences (dk, dv)
        mq = torch.ones(dq.shape[0], dtype=torch.bool, device=q.device)
        mkv = torch.ones(dk.shape[0], dtype=torch.bool, device=q.device)
        for a, b, rows, *_ in refs:
            mq[a + rows] = False
            mkv[a:b] = False
        total = sum(x.double().norm().item() for x in (dq, dk, dv)) or 1.0
        leak = sum(x[m].double().norm().item() for x, m in ((dq, mq), (dk, mkv), (dv, mkv))) / total
    else:
        leak = None

    tol = TOLERANCE.get(dt, 5e-2)
    err_out = max(errs_out)
    err_grad = max(errs_grad) if errs_grad else None
    bad = []
    if not err_out <= tol:
        bad.append(f"output rel err {err_out:.3g} > {tol:g}")
    if err_grad is not None and not err_grad <= tol:
        bad.append(f"gradient rel err {err_grad:.3g} > {tol:g}")
    if leak is not None and not leak <= tol:
        bad.append(f"gradient outside the checked rows/sequences ({leak:.3g} of the norm)")
    return dict(ok=not bad, err_out=err_out, err_grad=err_grad, leak=leak,
                msg="; ".join(bad) or "ok")
