"""Vendor-core backend ("sdpa"): PyTorch's fused attention kernels with our p-RoPE around them.

Same contract as :mod:`prope_kernels.backends.triton.ops` (packed layout: q (total, q_heads, d), k/v
(total, kv_heads, d), int32 cu_seqlens, int64 positions, lse (q_heads, total) fp32 natural log):

* forward: q and k are rotated into short-lived buffers (the Triton rotation kernel on CUDA:
  identity dims copied, p=0 launches nothing; the reference rotation in fp32 elsewhere), then the
  ATen attention op runs on them. Nothing rotated is returned or saved: the autograd saves q, k,
  v, out, lse as for every backend.
* backward: q and k are rotated again, the matching ATen backward op runs, and dq', dk' are
  rotated back by the opposite angle (the gradient of a rotation is its inverse).

Which ATen kernel (:func:`choose`; the public API chooses once per call, into the call's plan,
and passes it as ``kernel=`` to the forward and the backward: :func:`planned`), in order:

* ``cudnn``: ``aten._scaled_dot_product_cudnn_attention`` (+ ``_backward``), dense batches only
  (every sequence has ``max_seqlen`` tokens), where ``torch.backends.cuda.can_use_cudnn_attention``
  accepts the shape. GQA/MQA native (k/v keep their kv heads).
* ``flash``: ``aten._flash_attention_forward`` / ``_flash_attention_backward``, dense (batch,
  seqlen, heads, d) or varlen with cu_seqlens (its lse is already (q_heads, total)). GQA native.
* ``efficient``: ``aten._efficient_attention_forward`` / ``_backward``, dense only; it has no
  GQA (torch's can_use_efficient_attention refuses unequal head counts), so for GQA/MQA k/v are
  expanded to q's heads and dk/dv summed back per group: in backward that is four (b, s, hq, d)
  tensors (expanded k, v and their gradients), in forward two short-lived ones. It is the only
  torch kernel for head_dim > 256 (e.g. 512); :func:`choose` asks torch about the expanded
  shapes (the kernel it really runs) and records the expansion in ``notes``.
* ``cpu_flash``: ``aten._scaled_dot_product_flash_attention_for_cpu`` (+ ``_backward``) on the
  CPU (GQA native); varlen runs one call per sequence. It exists so that the CPU tests check this
  backend's plumbing (rotation, layouts, lse, gradients) against the float64 reference.

Dropout is always 0, so the kernels' RNG outputs (philox seed/offset, rng_state) are never read
by their backward ops; empty tensors stand in for them and the op contract needs no extra saved
tensor. ``PROPE_SDPA_KERNEL=cudnn|flash|efficient`` forces one kernel (tests, benchmarks).

The gradient of lse (``return_lse``): the ATen backward ops take no dlse, so its part is added
separately (exact): d lse_i / d s_ij = P_ij, so dq'_i += scale * dlse_i * sum_j P_ij k'_j (one
forward call with v := k') and dk'_j += scale * sum_i P_ij dlse_i q'_i (the dv of one backward
call with v := k' and dout := dlse * q'). It costs one extra forward and backward, only when lse
carries a gradient (dlse is None otherwise: the autograd does not materialise zero gradients,
see interface.py).

Layouts the ATen backward ops are given: every tensor (dout included) is contiguous in the packed
layout, i.e. the (b, s, h, d) layout the forward returned out in. cuDNN needs it: torch caches
its backward graph under a key made of q/k/v shapes and strides only, while the graph bakes in
the strides of out and dout seen on the first call; a later call with another dout layout (the
lse term's dout was head-major) reuses that graph and reads dout with the wrong strides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .. import env
from .. import reference as ref

KERNELS = ("cudnn", "flash", "efficient", "cpu_flash")
GPU_KERNELS = ("cudnn", "flash", "efficient")
_LOWP = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Choice:
    """The ATen kernel this backend would run for an input, or None and why not.

    dense: every sequence has max_seqlen tokens (batch = total // max_seqlen), so the batched
    (batch, seqlen, heads, d) kernels apply; expand_kv: k/v heads are repeated for a kernel
    without GQA; notes: what a user should know (expansions, per-sequence loops)."""

    kernel: Optional[str]
    dense: bool
    expand_kv: bool
    why: str
    notes: tuple = ()


def _forced() -> Optional[str]:
    k = env.sdpa_kernel()
    if k and k not in GPU_KERNELS:
        raise ValueError(f"PROPE_SDPA_KERNEL must be one of {GPU_KERNELS}, got {k!r}")
    return k or None


def choose(q: torch.Tensor, k: torch.Tensor, num_seqs: int, max_seqlen: int,
           causal: bool) -> Choice:
    """Pick the ATen kernel for packed q (total, hq, d), k (total, hkv, d) holding ``num_seqs``
    sequences of at most ``max_seqlen`` tokens (or q, k in (batch, seqlen, heads, d)). Shapes
    and dtypes only (no host sync)."""
    if q.dim() == 4:
        q, k = q.flatten(0, 1), k.flatten(0, 1)
    total = q.shape[0]
    # Every length <= max_seqlen and their sum is total: all equal max_seqlen iff total fills it.
    dense = max_seqlen > 0 and num_seqs * max_seqlen == total
    if q.device.type != "cuda":
        notes = () if dense or num_seqs <= 1 else (
            "varlen on the CPU: one cpu_flash call per sequence",)
        return Choice("cpu_flash", dense, False, "CPU tensors: PyTorch's CPU flash attention",
                      notes)
    if q.dtype not in _LOWP:
        return Choice(None, dense, False, f"the fused GPU kernels take float16/bfloat16, got "
                                          f"{q.dtype}")
    forced = _forced()
    cb = torch.backends.cuda
    key = (q.device, q.dtype, tuple(q.shape), tuple(k.shape), num_seqs, max_seqlen,
           bool(causal), forced, torch.are_deterministic_algorithms_enabled(),
           torch.is_deterministic_algorithms_warn_only_enabled(), cb.cudnn_sdp_enabled(),
           cb.flash_sdp_enabled(), cb.mem_efficient_sdp_enabled())
    hit = _CHOICES.get(key)
    if hit is None:  # the checks below cost tens of microseconds: once per shape and setting
        if len(_CHOICES) > 256:
            _CHOICES.clear()
        hit = _CHOICES[key] = _choose_gpu(q, k, num_seqs, max_seqlen, causal, dense, forced)
    return hit


_CHOICES: dict = {}


def _choose_gpu(q, k, num_seqs, max_seqlen, causal, dense, forced) -> Choice:
    total, hq, d = q.shape
    hkv = k.shape[1]
    # torch's own eligibility checks on (batch, heads, seqlen, d) views (varlen: one row)
    b = num_seqs if dense else 1
    q4 = q.reshape(b, total // b, hq, d).transpose(1, 2)
    k4 = k.reshape(b, total // b, hkv, d).transpose(1, 2)
    from torch.backends.cuda import (SDPAParams, can_use_cudnn_attention,
                                     can_use_efficient_attention, can_use_flash_attention)
    params = SDPAParams(q4, k4, k4, None, 0.0, bool(causal), hq != hkv)
    # the efficient kernel runs on k/v expanded to q's heads: ask torch about that call (q4
    # stands in for the expanded k/v: same shape, dtype, device and layout)
    params_expanded = SDPAParams(q4, q4, q4, None, 0.0, bool(causal), False)
    refused = []

    def accepts(kern, check, prm, refusal):
        # torch's checks also query the device (cuDNN's version, the GPU's arch): where that
        # query fails (a CUDA build of torch on a machine without a driver) the kernel is
        # refused with torch's error as the reason, instead of a shape question raising
        try:
            if check(prm, False):
                return True
        except RuntimeError as e:
            refusal = (f"torch's check could not run ({type(e).__name__}: "
                       f"{(str(e).splitlines() or [''])[0]})")
        refused.append(f"{kern}: {refusal}")
        return False

    order = (forced,) if forced else GPU_KERNELS
    for kern in order:
        if kern == "cudnn":
            if not dense:
                refused.append("cudnn: varlen (its packed path is experimental in torch)")
            elif accepts(kern, can_use_cudnn_attention, params,
                         "torch.backends.cuda.can_use_cudnn_attention refuses this shape"):
                return Choice("cudnn", True, False, "cuDNN attention accepts this shape")
        elif kern == "flash":
            if accepts(kern, can_use_flash_attention, params,
                       "torch.backends.cuda.can_use_flash_attention refuses this shape "
                       f"(head_dim {d}, {q.dtype})"):
                why = "FlashAttention-2 (torch) accepts this shape"
                return Choice("flash", dense, False, why + ("" if dense else ", varlen"))
        elif kern == "efficient":
            if not dense:
                refused.append("efficient: varlen not wired (its lse is padded per sequence)")
            elif accepts(kern, can_use_efficient_attention, params_expanded,
                         "torch.backends.cuda.can_use_efficient_attention refuses this shape"):
                mib = 4 * total * hq * d * q.element_size() / 2**20
                notes = ((f"efficient kernel has no GQA: k/v expanded from {hkv} to {hq} heads "
                          f"and dk/dv summed back (backward holds 4 expanded (tokens, {hq}, {d}) "
                          f"tensors, {mib:.0f} MiB)",) if hq != hkv else ())
                return Choice("efficient", True, hq != hkv,
                              "memory-efficient attention accepts this shape", notes)
    return Choice(None, dense, False, "; ".join(refused))


def check(q, k, num_seqs, max_seqlen, causal) -> Choice:
    """:func:`choose`, raising a ValueError that names the reason when no kernel fits."""
    ch = choose(q, k, num_seqs, max_seqlen, causal)
    if ch.kernel is None:
        raise ValueError(f"backend='sdpa' has no PyTorch attention kernel for this input "
                         f"(head_dim={q.shape[-1]}, {q.dtype}, {q.shape[-2]} q heads, "
                         f"{k.shape[-2]} kv heads): {ch.why}; use backend='triton' or 'auto'")
    return ch


def planned(kernel: str, q, k, num_seqs, max_seqlen) -> Choice:
    """The :class:`Choice` of a call whose plan names ``kernel`` (chosen once per call, by
    :func:`check` before the forward; the backward reuses it): what the kernel needs (dense,
    k/v expansion) follows from the shapes, without asking torch again."""
    if kernel not in KERNELS:
        raise ValueError(f"backend='sdpa': kernel must be one of {KERNELS}, got {kernel!r}")
    total, hq = q.shape[0], q.shape[-2]
    dense = max_seqlen > 0 and num_seqs * max_seqlen == total
    if kernel in ("cudnn", "efficient") and not dense:
        raise ValueError(f"backend='sdpa': the {kernel} kernel takes dense batches only (every "
                         f"sequence of max_seqlen={max_seqlen} tokens), got {num_seqs} sequences "
                         f"in {total} tokens")
    expand = kernel == "efficient" and hq != k.shape[-2]
    return Choice(kernel, dense, expand, f"planned: {kernel}")


def _choice(kernel, q, k, cu_seqlens, max_seqlen, causal) -> Choice:
    # the plan's kernel when the call has one (the public API), else chosen here (a direct call)
    n = cu_seqlens.numel() - 1
    return (check(q, k, n, max_seqlen, causal) if kernel is None
            else planned(kernel, q, k, n, max_seqlen))


# ----------------------------------------------------------------------------------------------
# rotation
# ----------------------------------------------------------------------------------------------

# Tests set this under TRITON_INTERPRET=1 to run the Triton rotation kernel on CPU tensors (the
# launch sequence of the GPU path: in-place inverse rotation of dq', dk').
_TRITON_ON_CPU = False


def _rotate(x, positions, spec, conjugate, out=None):
    """Rotated copy of x (total, heads, d) (or into ``out``, which may be x itself); x itself
    when nothing rotates (p=0)."""
    if spec.num_rotated == 0:
        return x if out is None else out.copy_(x)
    if x.device.type == "cuda" or _TRITON_ON_CPU:
        from .triton.rope import rope_launch
        y = torch.empty_like(x) if out is None else out
        return rope_launch(x, y, positions.contiguous(), spec.tables(x.device),
                           spec.num_rotated, conjugate)
    # CPU: the reference rotation with fp32 math (as the kernel does), one rounding
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = ref.apply_prope(x.to(cd), positions, spec, conjugate).to(x.dtype)
    return y if out is None else out.copy_(y)


def rope(x, positions, spec, conjugate):
    y = _rotate(x, positions, spec, conjugate)
    return y.clone() if y is x else y


# ----------------------------------------------------------------------------------------------
# kernels in the packed layout: fwd(q, k, v) -> (out, lse (hq, total)); bwd -> (dq, dk, dv)
# ----------------------------------------------------------------------------------------------

def _bshd(x, b):
    return x.view(b, x.shape[0] // b, x.shape[1], x.shape[2])


def _packed(x4):
    """(b, s, h, d) -> (b*s, h, d) contiguous (a view when x4 is contiguous)."""
    return x4.reshape(-1, x4.shape[2], x4.shape[3]).contiguous()


def _lse_packed(lse3):
    """(b, h, s) -> (h, b*s) contiguous."""
    return lse3.transpose(0, 1).reshape(lse3.shape[1], -1).contiguous()


def _lse_batched(lse, b):
    """(h, b*s) -> (b, h, s) contiguous."""
    h = lse.shape[0]
    return lse.view(h, b, -1).transpose(0, 1).contiguous()


def _empty_rng(device, kernel):
    if kernel == "flash":  # rng_state (2,) and an unused () tensor, uint64 as torch allocates
        return (torch.empty(2, dtype=torch.uint64, device=device),
                torch.empty((), dtype=torch.uint64, device=device))
    return (torch.empty((), dtype=torch.int64, device=device),
            torch.empty((), dtype=torch.int64, device=device))


# The namespace the GPU kernels are called from (torch.ops.aten); tests put CPU emulations of
# the GPU ops here (e.g. the cuDNN backward's graph cache) to check this module's calls.
ATEN = torch.ops.aten


def _fwd(ch, q, k, v, cu_seqlens, max_seqlen, causal, scale):
    total, hq, d = q.shape
    aten = ATEN
    if ch.kernel == "cpu_flash":
        if ch.dense:
            return _cpu_fwd(q, k, v, total // max_seqlen, causal, scale)
        outs, lses = [], []
        cu = cu_seqlens.tolist()
        for a, e in zip(cu[:-1], cu[1:]):
            if e > a:
                o, l = _cpu_fwd(q[a:e], k[a:e], v[a:e], 1, causal, scale)
                outs.append(o)
                lses.append(l)
        if not outs:
            return torch.zeros_like(q), q.new_zeros((hq, total), dtype=torch.float32)
        return torch.cat(outs), torch.cat(lses, dim=1)
    if ch.kernel == "flash" and not ch.dense:
        cu = cu_seqlens.to(torch.int32)
        out, lse = aten._flash_attention_forward(q, k, v, cu, cu, max_seqlen, max_seqlen, 0.0,
                                                 causal, False, scale=scale)[:2]
        return out, lse
    b = total // max_seqlen
    q4, k4, v4 = _bshd(q, b), _bshd(k, b), _bshd(v, b)
    if ch.kernel == "flash":
        out4, lse3 = aten._flash_attention_forward(q4, k4, v4, None, None, max_seqlen,
                                                   max_seqlen, 0.0, causal, False,
                                                   scale=scale)[:2]
        return _packed(out4), _lse_packed(lse3)
    if ch.kernel == "cudnn":
        res = aten._scaled_dot_product_cudnn_attention(
            q4.transpose(1, 2), k4.transpose(1, 2), v4.transpose(1, 2), None, True, 0.0,
            causal, False, scale=scale)
        out_bhsd, lse4 = res[0], res[1]  # lse4: (b, h, s, 1)
        return _packed(out_bhsd.transpose(1, 2)), _lse_packed(lse4.reshape(b, hq, max_seqlen))
    if ch.kernel == "efficient":
        if ch.expand_kv:
            g = hq // k.shape[1]
            k4, v4 = k4.repeat_interleave(g, dim=2), v4.repeat_interleave(g, dim=2)
        out4, lse_pad = aten._efficient_attention_forward(
            q4, k4, v4, None, None, None, None, None, 0.0, 1 if causal else 0, True,
            scale=scale)[:2]
        return _packed(out4), _lse_packed(lse_pad[:, :, :max_seqlen])
    raise AssertionError(ch.kernel)  # pragma: no cover


def _cpu_fwd(q, k, v, b, causal, scale):
    q4, k4, v4 = (_bshd(x, b).transpose(1, 2) for x in (q, k, v))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q4, k4, v4, 0.0, causal, scale=scale)
    return _packed(out.transpose(1, 2)), _lse_packed(lse.float())


def _bwd(ch, dout, q, k, v, out, lse, cu_seqlens, max_seqlen, causal, scale):
    total, hq, d = q.shape
    hkv = k.shape[1]
    aten = ATEN
    # the layout out has (packed, contiguous): cuDNN's cached backward graph reads dout with the
    # strides of the first call's dout (see the module docstring); no copy when already so
    dout, out = dout.contiguous(), out.contiguous()
    if ch.kernel == "cpu_flash":
        if ch.dense:
            return _cpu_bwd(dout, q, k, v, out, lse, total // max_seqlen, causal, scale)
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        cu = cu_seqlens.tolist()
        for a, e in zip(cu[:-1], cu[1:]):
            if e > a:
                g = _cpu_bwd(dout[a:e], q[a:e], k[a:e], v[a:e], out[a:e], lse[:, a:e], 1,
                             causal, scale)
                dq[a:e], dk[a:e], dv[a:e] = g
        return dq, dk, dv
    seed, offset = _empty_rng(q.device, ch.kernel)
    if ch.kernel == "flash" and not ch.dense:
        cu = cu_seqlens.to(torch.int32)
        dq, dk, dv = aten._flash_attention_backward(
            dout, q, k, v, out, lse.contiguous(), cu, cu, max_seqlen, max_seqlen, 0.0, causal,
            seed, offset, scale=scale)
        return dq, dk, dv
    b = total // max_seqlen
    q4, k4, v4, o4, do4 = (_bshd(x, b) for x in (q, k, v, out, dout))
    if ch.kernel == "flash":
        dq4, dk4, dv4 = aten._flash_attention_backward(
            do4, q4, k4, v4, o4, _lse_batched(lse, b), None, None, max_seqlen, max_seqlen, 0.0,
            causal, seed, offset, scale=scale)
        return _packed(dq4), _packed(dk4), _packed(dv4)
    if ch.kernel == "cudnn":
        t = lambda x: x.transpose(1, 2)  # noqa: E731  (b, s, h, d) -> (b, h, s, d) view
        lse4 = _lse_batched(lse, b).unsqueeze(-1)  # (b, h, s, 1) as the forward returns it
        dq, dk, dv = aten._scaled_dot_product_cudnn_attention_backward(
            t(do4), t(q4), t(k4), t(v4), t(o4), lse4, seed, offset, None, None, None,
            max_seqlen, max_seqlen, 0.0, causal, scale=scale)
        return _packed(t(dq)), _packed(t(dk)), _packed(t(dv))
    if ch.kernel == "efficient":
        g = hq // hkv
        if ch.expand_kv:
            k4, v4 = k4.repeat_interleave(g, dim=2), v4.repeat_interleave(g, dim=2)
        s32 = -(-max_seqlen // 32) * 32  # the forward's lse is padded to a multiple of 32 rows
        lse_pad = lse.new_zeros((b, hq, s32))
        lse_pad[:, :, :max_seqlen] = _lse_batched(lse, b)
        dq4, dk4, dv4 = aten._efficient_attention_backward(
            do4, q4, k4, v4, None, o4, None, None, max_seqlen, max_seqlen, lse_pad, 0.0, seed,
            offset, 1 if causal else 0, False, scale=scale)[:3]
        if ch.expand_kv:  # sum the gradients of each kv head's query-head group
            dk4 = dk4.view(b, max_seqlen, hkv, g, d).sum(3)
            dv4 = dv4.view(b, max_seqlen, hkv, g, d).sum(3)
        return _packed(dq4), _packed(dk4.to(k.dtype)), _packed(dv4.to(v.dtype))
    raise AssertionError(ch.kernel)  # pragma: no cover


def _cpu_bwd(dout, q, k, v, out, lse, b, causal, scale):
    t = lambda x: _bshd(x, b).transpose(1, 2)  # noqa: E731
    lse3 = _lse_batched(lse, b)
    if q.dtype == torch.float64:
        lse3 = lse3.double()
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        t(dout), t(q), t(k), t(v), t(out), lse3, 0.0, causal, scale=scale)
    return (_packed(dq.transpose(1, 2)), _packed(dk.transpose(1, 2)),
            _packed(dv.transpose(1, 2)))


# ----------------------------------------------------------------------------------------------
# the backend contract
# ----------------------------------------------------------------------------------------------

def attn_fwd(q, k, v, cu_seqlens, positions, max_seqlen, spec, causal, scale, window=(-1, -1),
             softcap=0.0, kernel=None, cu_seqlens_k=None, positions_k=None, max_seqlen_k=None):
    from .common import record_launch, refuse_features, refuse_qk
    refuse_features("sdpa", window, softcap, causal)
    refuse_qk("sdpa", cu_seqlens_k)
    total, hq, d = q.shape
    if total == 0 or max_seqlen == 0:
        return torch.zeros_like(q), q.new_zeros((hq, total), dtype=torch.float32)
    ch = _choice(kernel, q, k, cu_seqlens, max_seqlen, causal)
    record_launch("fwd", "sdpa", kernel=ch.kernel)
    qr = _rotate(q, positions, spec, False)  # short-lived: freed when this function returns
    kr = _rotate(k, positions, spec, False)
    out, lse = _fwd(ch, qr, kr, v, cu_seqlens, max_seqlen, causal, scale)
    return out, lse.float()


def attn_bwd(dout, q, k, v, out, lse, dlse, cu_seqlens, positions, max_seqlen, spec, causal,
             scale, window=(-1, -1), softcap=0.0, deterministic=False, kernel=None,
             cu_seqlens_k=None, positions_k=None, max_seqlen_k=None):
    from .common import record_launch, refuse_features, refuse_qk
    refuse_features("sdpa", window, softcap, causal)
    refuse_qk("sdpa", cu_seqlens_k)
    if deterministic:  # its kernels follow torch's own setting (the registry refuses it first)
        raise ValueError("backend='sdpa' has no deterministic=True mode (torch's kernels follow "
                         "torch.use_deterministic_algorithms); use backend='triton'")
    total = q.shape[0]
    if total == 0 or max_seqlen == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    ch = _choice(kernel, q, k, cu_seqlens, max_seqlen, causal)
    record_launch("bwd", "sdpa", kernel=ch.kernel)
    dout = dout.contiguous()
    qr = _rotate(q, positions, spec, False)
    kr = _rotate(k, positions, spec, False)
    dq, dk, dv = _bwd(ch, dout, qr, kr, v, out, lse, cu_seqlens, max_seqlen, causal, scale)
    if dlse is not None:
        dq, dk = _add_dlse(ch, dq, dk, dlse, qr, kr, lse, cu_seqlens, max_seqlen, causal, scale)
    del qr, kr
    # gradients w.r.t. the rotated tensors -> w.r.t. q and k: the inverse rotation
    if spec.num_rotated:
        in_place = dq.device.type == "cuda" or _TRITON_ON_CPU
        dq = _rotate(dq, positions, spec, True, out=dq if in_place else None)
        dk = _rotate(dk, positions, spec, True, out=dk if in_place else None)
    return dq, dk, dv


def _add_dlse(ch, dq, dk, dlse, qr, kr, lse, cu_seqlens, max_seqlen, causal, scale):
    """Add the lse gradient's part to dq', dk' (see the module docstring). lse/dlse: (hq, total).
    """
    cd = torch.float64 if qr.dtype == torch.float64 else torch.float32
    w = dlse.to(cd).t().unsqueeze(-1)                                  # (total, hq, 1)
    pk, _ = _fwd(ch, qr, kr, kr, cu_seqlens, max_seqlen, causal, scale)  # sum_j P_ij k'_j
    dq = (dq.to(cd) + scale * w * pk.to(cd)).to(dq.dtype)
    # dk'_j = scale * sum_i P_ij dlse_i q'_i: the dv of a backward with v := k', dout := dlse*q'
    do2 = (qr.to(cd) * w).to(qr.dtype).contiguous()  # (total, hq, d) like out, not head-major
    _, _, dk2 = _bwd(ch, do2, qr, kr, kr, pk, lse, cu_seqlens, max_seqlen, causal, scale)
    dk = (dk.to(cd) + scale * dk2.to(cd)).to(dk.dtype)
    return dq, dk
