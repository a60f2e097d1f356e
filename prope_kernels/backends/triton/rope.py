"""Triton p-RoPE rotation kernel (and the angle helper shared with the attention kernels).

One program rotates BLOCK_T tokens of one head. The rotated pairs and the identity dims are
handled as two separate tile groups whose sizes are compile-time constants:

* rotated pairs: gather x[a], x[b] (BLOCK_T, R_PAD), one cos/sin per pair, two FMAs each;
* identity dims: a plain copy (BLOCK_T, ID_PAD), or nothing at all when rotating in place.

So the identity part of p-RoPE costs no sin/cos and no multiply; p=0 launches nothing.
"""

import torch
import triton
import triton.language as tl

from ... import env

TWO_PI = tl.constexpr(6.283185307179586)
INV_TWO_PI = tl.constexpr(0.15915494309189535)


@triton.jit
def rope_cos_sin(pos, freq):
    """cos/sin of ``pos * freq`` accurate at long context.

    pos: int tensor (any int dtype), freq: float64, broadcast together. The angle is formed in
    float64 and reduced modulo 2*pi before the float32 sin/cos: an fp32 angle would be off by up
    to ~0.03 rad at position 1e6 (1 rad/token at the fastest frequency).
    """
    ang = pos.to(tl.float64) * freq
    turns = (ang * INV_TWO_PI).to(tl.int64).to(tl.float64)  # trunc: |reduced| < 2*pi either sign
    ang = (ang - turns * TWO_PI).to(tl.float32)
    return tl.cos(ang), tl.sin(ang)


@triton.jit
def lowp(x, dtype, EMULATE: tl.constexpr):
    """Round fp32 ``x`` to ``dtype`` (round to nearest even, as the GPU's cvt.rn does).

    EMULATE is set only under the CPU interpreter with bf16, whose fp32->bf16 cast truncates
    (Triton 3.9): there the rounding is done on the bits first, making the cast exact.
    """
    if EMULATE and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _rope_kernel(
    X, Y, POS,                      # X, Y: (total, heads, d); POS: (total,) int64
    PAIR_A, PAIR_B, PAIR_F, IDS,    # (R,) int32, (R,) int32, (R,) float64, (D - 2R,) int32
    total,
    stride_xt, stride_xh, stride_yt, stride_yh,
    R: tl.constexpr, R_PAD: tl.constexpr,
    N_ID: tl.constexpr, ID_PAD: tl.constexpr,
    CONJUGATE: tl.constexpr,        # rotate by -angle (inverse / gradient)
    COPY_IDENTITY: tl.constexpr,    # False when X is Y (in place): identity dims are untouched
    EMULATE: tl.constexpr,          # see lowp()
    BLOCK_T: tl.constexpr,
):
    pid_t = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = t < total
    t64 = t.to(tl.int64)
    x_row = X + t64[:, None] * stride_xt + h * stride_xh       # (BLOCK_T, 1) row pointers
    y_row = Y + t64[:, None] * stride_yt + h * stride_yh

    if R > 0:
        k = tl.arange(0, R_PAD)
        k_mask = k < R
        a = tl.load(PAIR_A + k, mask=k_mask, other=0)
        b = tl.load(PAIR_B + k, mask=k_mask, other=0)
        f = tl.load(PAIR_F + k, mask=k_mask, other=0.0)
        pos = tl.load(POS + t64, mask=t_mask, other=0)
        cos, sin = rope_cos_sin(pos[:, None], f[None, :])      # (BLOCK_T, R_PAD) fp32
        if CONJUGATE:
            sin = -sin
        m = t_mask[:, None] & k_mask[None, :]
        xa = tl.load(x_row + a[None, :], mask=m, other=0.0).to(tl.float32)
        xb = tl.load(x_row + b[None, :], mask=m, other=0.0).to(tl.float32)
        ya = xa * cos - xb * sin
        yb = xb * cos + xa * sin
        tl.store(y_row + a[None, :], lowp(ya, Y.dtype.element_ty, EMULATE), mask=m)
        tl.store(y_row + b[None, :], lowp(yb, Y.dtype.element_ty, EMULATE), mask=m)

    if COPY_IDENTITY and N_ID > 0:
        j = tl.arange(0, ID_PAD)
        j_mask = j < N_ID
        ids = tl.load(IDS + j, mask=j_mask, other=0)
        m = t_mask[:, None] & j_mask[None, :]
        x = tl.load(x_row + ids[None, :], mask=m, other=0.0)
        if X.dtype.element_ty != Y.dtype.element_ty:   # e.g. fp32 gradient sums -> bf16
            x = lowp(x.to(tl.float32), Y.dtype.element_ty, EMULATE)
        tl.store(y_row + ids[None, :], x, mask=m)


def rope_launch(x, y, positions, tables, num_rotated, conjugate):
    """y <- p-RoPE(x). x, y: (total, heads, d) with stride(-1) == 1 (may be the same tensor; y may
    be of a lower precision than x: the rotation is done in fp32 and rounded once).
    positions: (total,) int64. tables: :class:`prope_kernels.rotary.RotaryTables`."""
    return rope_launch_raw(x, y, positions, tables.pair_a, tables.pair_b, tables.pair_freq,
                           tables.identity, num_rotated, conjugate)


def rope_launch_raw(x, y, positions, pair_a, pair_b, pair_freq, identity, num_rotated,
                    conjugate):
    total, heads, d = x.shape
    n_id = d - 2 * num_rotated
    in_place = x.data_ptr() == y.data_ptr()
    if total == 0 or (num_rotated == 0 and (in_place or n_id == 0)):
        return y
    block_t = 32 if d <= 128 else 16
    grid = (triton.cdiv(total, block_t), heads)
    _rope_kernel[grid](
        x, y, positions, pair_a, pair_b, pair_freq, identity,
        total, x.stride(0), x.stride(1), y.stride(0), y.stride(1),
        R=num_rotated, R_PAD=max(triton.next_power_of_2(num_rotated), 1),
        N_ID=n_id, ID_PAD=max(triton.next_power_of_2(n_id), 1),
        CONJUGATE=conjugate, COPY_IDENTITY=not in_place, BLOCK_T=block_t,
        EMULATE=env.interpreting() and y.dtype == torch.bfloat16,
        num_warps=4,
    )
    return y
