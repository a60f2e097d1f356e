"""Triton backend: launchers behind the custom ops of :mod:`prope_kernels.interface` (the
contract is in :mod:`prope_kernels.backends`); the tuning policy they use is in configs.py.

Packed layout in and out: q (total, q_heads, d), k/v (total, kv_heads, d), int32 cu_seqlens,
int64 positions (total,), lse (q_heads, total) float32.
"""

from __future__ import annotations

import torch
import triton

from ... import env
from ..common import record_launch
from . import hopper
from .attention import _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel, _attn_fwd_kernel, \
    _bwd_preprocess_kernel
from .common import new as _new
from .configs import dkdv_max_block_n, kv_split, seq_bucket
from .rope import rope_launch


def _common(q, k, spec):
    total, hq, d = q.shape
    block_d = max(triton.next_power_of_2(d), 16)
    emulate = env.interpreting() and q.dtype == torch.bfloat16
    return dict(GROUP=hq // k.shape[1], HEAD_DIM=d, BLOCK_D=block_d, EVEN_D=block_d == d,
                ROTATE=spec.num_rotated > 0, EMULATE=emulate)


_LOG2E = 1.4426950408889634


def _mask_args(causal, window, softcap, scale, max_seqlen):
    """Kernel arguments of the causal/window/softcap features.

    A side of the window that reaches past the longest sequence is unbounded, so a window wider
    than the sequence runs the plain kernels; (-1, 0) is plain causal. With WINDOW the causal
    cap is in wr (0); an unbounded side is passed as max_seqlen (never reached)."""
    left, right = window
    if causal:
        right = 0 if right < 0 else min(right, 0)
    unbounded = max(int(max_seqlen) - 1, 0)
    left = -1 if left < 0 or left >= unbounded else left
    right = -1 if right < 0 or right >= unbounded else right
    use_window = left >= 0 or right > 0 or (right == 0 and not causal and max_seqlen > 1)
    if left < 0 and right == 0:     # only the causal cap: the plain causal kernel
        causal, use_window = True, False
    wl = left if left >= 0 else int(max_seqlen)
    wr = right if right >= 0 else int(max_seqlen)
    softcap = float(softcap or 0.0)
    cap_in = scale / softcap if softcap else 0.0
    cap_out = softcap * _LOG2E
    return dict(wl=wl, wr=wr, cap_in=cap_in, cap_out=cap_out, CAUSAL=bool(causal),
                WINDOW=use_window, SOFTCAP=softcap > 0)


def _mask_args_qk(causal, window, softcap, scale, max_seqlen, max_seqlen_k):
    """_mask_args for seqlen_q != seqlen_k: always the WINDOW kernels (the masks compare query
    row i + Lk - Lq with key j, and rows that see no key need the WINDOW kernels' empty-row
    handling); an unbounded side is passed as more than any offset reaches."""
    left, right = window
    if causal:
        right = 0 if right < 0 else min(right, 0)
    big = int(max_seqlen) + int(max_seqlen_k) + 1
    softcap = float(softcap or 0.0)
    return dict(wl=left if left >= 0 else big, wr=right if right >= 0 else big,
                cap_in=scale / softcap if softcap else 0.0, cap_out=softcap * _LOG2E,
                CAUSAL=bool(causal), WINDOW=True, SOFTCAP=softcap > 0, SHIFT=True)


def rope(x, positions, spec, conjugate):
    y = _new(x)
    return rope_launch(x, y, positions.contiguous(), spec.tables(x.device), spec.num_rotated,
                       conjugate)


def attn_fwd(q, k, v, cu_seqlens, positions, max_seqlen, spec, causal, scale, window=(-1, -1),
             softcap=0.0, cu_seqlens_k=None, positions_k=None, max_seqlen_k=None):
    """cu_seqlens_k, positions_k, max_seqlen_k (all or none): keys of their own lengths and
    positions (seqlen_q != seqlen_k, bottom-right aligned); the portable kernels run them."""
    if not scale > 0:  # the forward takes the row max of raw scores and scales it once
        raise ValueError(f"softmax_scale must be > 0 for backend='triton', got {scale}")
    total, hq, d = q.shape
    qk = cu_seqlens_k is not None
    out = _new(q)
    lse = _new(q, hq, total, dtype=torch.float32)
    if total == 0 or max_seqlen == 0:
        return out, lse
    if qk and (k.shape[0] == 0 or max_seqlen_k == 0):   # no keys: out 0, lse -inf
        return out.zero_(), lse.fill_(float("-inf"))
    positions = positions.contiguous()
    cu_seqlens = cu_seqlens.contiguous()
    cu_k = cu_seqlens_k.contiguous() if qk else cu_seqlens
    pos_k = positions_k.contiguous() if qk else positions
    tables = spec.tables(q.device)
    meta = _common(q, k, spec)
    if qk:
        meta.update(_mask_args_qk(causal, window, softcap, scale, max_seqlen, max_seqlen_k))
    else:
        meta.update(_mask_args(causal, window, softcap, scale, max_seqlen))
    # sm_90: the Hopper kernels where they support the call (no window/softcap/qk there yet)
    use_hopper = not qk and hopper.selected(q, k, v, window=window if meta["WINDOW"] else None,
                                            softcap=softcap if meta["SOFTCAP"] else None)
    record_launch("fwd", "triton", kernels="hopper" if use_hopper else "portable")
    if use_hopper:
        return hopper.attn_fwd(q, k, v, cu_seqlens, positions, max_seqlen, spec, meta["CAUSAL"],
                               scale, seq_bucket=seq_bucket(max_seqlen), rotate=meta["ROTATE"],
                               emulate=meta["EMULATE"])
    if meta["ROTATE"]:
        k_rot = rope_launch(k, _new(k), pos_k, tables, spec.num_rotated, False)
    else:
        k_rot = k
    num_seqs = cu_seqlens.numel() - 1
    grid = lambda m: (num_seqs * hq, triton.cdiv(max_seqlen, m["BLOCK_M"]))  # noqa: E731
    _attn_fwd_kernel[grid](
        q, k_rot, v, out, lse, positions, cu_seqlens, cu_k,
        tables.col_partner, tables.col_sign, tables.col_freq,
        tables.pair_a, tables.pair_b, tables.pair_freq, tables.identity, spec.num_rotated,
        scale, meta.pop("cap_in"), meta.pop("cap_out"), total, hq, seq_bucket(max_seqlen),
        meta.pop("wl"), meta.pop("wr"),
        q.stride(0), q.stride(1), k_rot.stride(0), k_rot.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), **meta,
    )
    return out, lse


def attn_bwd(dout, q, k, v, out, lse, dlse, cu_seqlens, positions, max_seqlen, spec, causal,
             scale, window=(-1, -1), softcap=0.0, deterministic=False, cu_seqlens_k=None,
             positions_k=None, max_seqlen_k=None):
    deterministic = deterministic or torch.are_deterministic_algorithms_enabled()
    total, hq, d = q.shape
    hkv = k.shape[1]
    qk = cu_seqlens_k is not None
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    if (total == 0 or max_seqlen == 0 or k.shape[0] == 0
            or (qk and max_seqlen_k == 0)):
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    positions = positions.contiguous()
    cu_seqlens = cu_seqlens.contiguous()
    cu_k = cu_seqlens_k.contiguous() if qk else cu_seqlens
    pos_k = positions_k.contiguous() if qk else positions
    max_k = int(max_seqlen_k) if qk else max_seqlen
    lse = lse.contiguous()
    tables = spec.tables(q.device)
    meta = _common(q, k, spec)
    if qk:
        feat = _mask_args_qk(causal, window, softcap, scale, max_seqlen, max_k)
    else:
        feat = _mask_args(causal, window, softcap, scale, max_seqlen)
    runtime = (feat.pop("cap_in"), feat.pop("cap_out"))   # after sm_scale
    wl, wr = feat.pop("wl"), feat.pop("wr")                # after seq_bucket
    meta.update(feat)                                      # CAUSAL, WINDOW, SOFTCAP (SHIFT)
    num_seqs = cu_seqlens.numel() - 1

    delta = _new(q, hq, total, dtype=torch.float32)
    block_t = 32
    _bwd_preprocess_kernel[(triton.cdiv(total, block_t), hq)](
        out, dout, dlse.contiguous() if dlse is not None else delta, delta, total,
        out.stride(0), out.stride(1), dout.stride(0), dout.stride(1),
        HEAD_DIM=d, BLOCK_D=meta["BLOCK_D"], BLOCK_T=block_t, HAS_DLSE=dlse is not None,
    )

    use_hopper = not qk and hopper.selected(q, k, v, backward=True,
                                 window=window if meta["WINDOW"] else None,
                                 softcap=softcap if meta["SOFTCAP"] else None,
                                 deterministic=deterministic)
    record_launch("bwd", "triton", kernels="hopper" if use_hopper else "portable",
                  **({"mode": "deterministic"} if deterministic else {}))
    if use_hopper:
        kv_programs = triton.cdiv(max_seqlen, hopper.bwd_max_block_n(d)) * num_seqs * hkv
        return hopper.attn_bwd(dout, q, k, v, delta, lse, cu_seqlens, positions, max_seqlen,
                               spec, meta["CAUSAL"], scale, seq_bucket=seq_bucket(max_seqlen),
                               rotate=meta["ROTATE"], emulate=meta["EMULATE"],
                               split=kv_split(meta["GROUP"], kv_programs, q.device))

    if meta["ROTATE"]:
        # Short-lived rotated copies; dq is computed over q_rot in place (see attention.py).
        q_rot = rope_launch(q, _new(q), positions, tables, spec.num_rotated, False)
        k_rot = rope_launch(k, _new(k), pos_k, tables, spec.num_rotated, False)
        dq = q_rot
    else:
        q_rot, k_rot = q, k
        dq = _new(q)
    bucket = seq_bucket(max_seqlen)
    kv_programs = triton.cdiv(max_k, dkdv_max_block_n(d)) * num_seqs * hkv
    split = kv_split(meta["GROUP"], kv_programs, q.device)
    # split > 1: the split programs of a key block reduce into fp32 dk/dv. By default with atomic
    # adds into one zeroed buffer; deterministic (the keyword or torch's setting): as partial sums
    # added in a fixed order (split x the fp32 size of k and v: more memory, bitwise repeatable).
    atomic = split > 1 and not deterministic
    if split == 1:
        dk, dv = _new(k), _new(v)
    elif atomic:
        dk = torch.zeros(k.shape, device=k.device, dtype=torch.float32)
        dv = torch.zeros(v.shape, device=v.device, dtype=torch.float32)
    else:
        dk = _new(k, split, *k.shape, dtype=torch.float32)
        dv = _new(v, split, *v.shape, dtype=torch.float32)

    grid_kv = lambda m: (num_seqs * hkv * split, triton.cdiv(max_k, m["BLOCK_N"]))  # noqa: E731,E501
    _attn_bwd_dkdv_kernel[grid_kv](
        q_rot, k_rot, v, dout, lse, delta, dk, dv, cu_seqlens, cu_k,
        scale, *runtime, total, hkv, bucket, wl, wr,
        q_rot.stride(0), q_rot.stride(1), k_rot.stride(0), k_rot.stride(1),
        v.stride(0), v.stride(1), dout.stride(0), dout.stride(1),
        dk.stride(0) if split > 1 and not atomic else 0, dk.stride(-3), dk.stride(-2),
        dv.stride(-3), dv.stride(-2),
        SPLIT=split, ATOMIC=atomic, **meta,
    )
    if split > 1 and not atomic:
        dk, dv = dk.sum(0), dv.sum(0)
    dv = dv.to(v.dtype)
    grid_q = lambda m: (num_seqs * hq, triton.cdiv(max_seqlen, m["BLOCK_M"]))  # noqa: E731
    _attn_bwd_dq_kernel[grid_q](
        q_rot, k_rot, v, dout, lse, delta, dq, cu_seqlens, cu_k,
        scale, *runtime, total, hq, bucket, wl, wr,
        q_rot.stride(0), q_rot.stride(1), k_rot.stride(0), k_rot.stride(1),
        v.stride(0), v.stride(1), dout.stride(0), dout.stride(1), dq.stride(0), dq.stride(1),
        **meta,
    )
    if meta["ROTATE"]:
        # gradients w.r.t. the rotated tensors -> w.r.t. q and k: the opposite rotation, in place
        rope_launch(dq, dq, positions, tables, spec.num_rotated, True)
        # dK' in fp32 (split sums) is rotated back in fp32 and rounded once, into a new tensor
        dk = rope_launch(dk, dk if dk.dtype == k.dtype else _new(k), pos_k, tables,
                         spec.num_rotated, True)
    return dq, dk.to(k.dtype), dv
