"""Small JIT helpers shared by the portable kernels (attention.py) and the Hopper ones (hopper.py),
and the allocation of their outputs and scratch (:func:`new`).

EMULATE (constexpr) is set only under the CPU interpreter with bfloat16 inputs, never on a GPU.
Triton 3.9's interpreter mishandles bf16 in tl.dot and casts fp32->bf16 by truncation; ``dot``
here and ``rope.lowp`` make it compute what the GPU computes (exact fp32 dots of bf16 values,
round-to-nearest casts), so the CPU tests hold the kernels to the GPU's accuracy.
"""

import torch
import triton
import triton.language as tl

from ... import env
from .rope import lowp

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


def new(x, *shape, dtype=None):
    """Output/scratch allocation. PROPE_POISON=1 (set by the tests) fills it with NaN so that
    anything a kernel forgets to write shows up as NaN instead of stale memory."""
    shape = shape or x.shape
    if env.poison():
        return torch.full(shape, float("nan"), device=x.device, dtype=dtype or x.dtype)
    return torch.empty(shape, device=x.device, dtype=dtype or x.dtype)


@triton.jit
def dot(a, b, acc, EMULATE: tl.constexpr):
    if EMULATE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc)


@triton.jit
def q_block(CU, n_heads, GROUP: tl.constexpr, BLOCK_M: tl.constexpr):
    """A program over query-row blocks -> (q head, its kv head, first token of its sequence
    (int64), sequence length, first row of the block). Axis 0 = (sequence, q head), axis 1 =
    row block; the heaviest blocks (last, under a causal mask) go first."""
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
    pid_sh = tl.program_id(0)
    seq = pid_sh // n_heads
    seq_start = tl.load(CU + seq).to(tl.int64)
    L = tl.load(CU + seq + 1) - tl.load(CU + seq)
    h = pid_sh % n_heads
    return h, h // GROUP, seq_start, L, pid_m * BLOCK_M


@triton.jit
def kv_block(CU, n_kv_heads, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr):
    """A backward program over key blocks -> (its part of the GQA split, kv head, first token of
    its sequence (int64), sequence length, first key of the block). Axis 0 = (sequence, kv head,
    split part), axis 1 = key block."""
    pid_sh = tl.program_id(0)
    split = pid_sh % SPLIT
    seq = pid_sh // (n_kv_heads * SPLIT)
    hk = (pid_sh // SPLIT) % n_kv_heads
    seq_start = tl.load(CU + seq).to(tl.int64)
    L = tl.load(CU + seq + 1) - tl.load(CU + seq)
    return split, hk, seq_start, L, tl.program_id(1) * BLOCK_N


@triton.jit
def tanh_f32(x):
    # sign(x) (1 - e) / (1 + e) with e = exp(-2|x|) in (0, 1]: never overflows, absolute error
    # ~1e-7 (the hardware tanh.approx.f32 is one op but 2^-11 relative: at softcap 50 that is
    # 0.02 in a score, as much as fp16 PyTorch's own error at large logits)
    e = tl.math.exp2(tl.abs(x) * -2.8853900817779268)          # -2 * log2(e)
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def visible(i, j, wl, wr, WINDOW: tl.constexpr):
    """Query rows i see key columns j (broadcast shapes; sequence bounds not included):
    the window, else the causal mask."""
    if WINDOW:
        return (j >= i - wl) & (j <= i + wr)
    else:
        return i >= j


@triton.jit
def softmax_block(acc, l_i, m_i, x, mult, v, EMPTY_ROWS: tl.constexpr, EMULATE: tl.constexpr):
    """One key block of the forward's online softmax, the scale folded into exp2's argument.

    x (BLOCK_M, BLOCK_N) fp32: unscaled values whose log2-domain scores are x * mult, mult > 0
    (q.k dots with mult = sm_scale * log2(e), or the softcap's tanh with mult = softcap * log2(e));
    -inf where masked. m_i (BLOCK_M,): the rows' running max, log2 domain. The scale reaches the
    row max once (max(x) * mult: mult > 0 keeps the argmax) and each element as one FMA,
    exp2(x * mult - m), instead of a multiply per element before the max and again after.
    EMPTY_ROWS: a row may have seen no key yet (window edges): exp2 kept off -inf - -inf.
    Returns acc (BLOCK_M, d) and the row sums l_i rescaled to the new max, and that max."""
    m_new = tl.maximum(m_i, tl.max(x, 1) * mult)
    m_use = m_new
    if EMPTY_ROWS:
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(x * mult - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = dot(lowp(p, v.dtype, EMULATE), v, acc, EMULATE)
    return acc, l_i, m_new


@triton.jit
def fwd_loop(acc, l_i, m_i, q, K, V, stride_kt, stride_vt, offs_m, offs_d, L, lo, hi, qk_scale,
             wl, wr, cap_in, cap_out, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
             MASKED: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
             SOFTCAP: tl.constexpr, EVEN_D: tl.constexpr, TMA: tl.constexpr,
             EMULATE: tl.constexpr):
    """The forward's key loop over [lo, hi), shared by the portable kernel (K, V: pointers to the
    first key of the sequence and kv head, row strides stride_kt/vt) and the Hopper one (TMA=1:
    K, V tensor descriptors of shape (L, HEAD_DIM)). q (BLOCK_M, BLOCK_D) stays in registers/SRAM.
    MASKED=0: every key in [lo, hi) is inside the sequence and seen by every row (no mask work)."""
    d_ok = offs_d < HEAD_DIM
    for start_n in tl.range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if TMA:
            start_n = tl.multiple_of(start_n, BLOCK_N)      # every bound is a block multiple
            kT = K.load([start_n, 0]).T                                  # (HEAD_DIM, BLOCK_N)
            v = V.load([start_n, 0])                                     # (BLOCK_N, HEAD_DIM)
        else:
            kT_ptrs = K + offs_n.to(tl.int64)[None, :] * stride_kt + offs_d[:, None]   # (BLOCK_D, BLOCK_N)
            v_ptrs = V + offs_n.to(tl.int64)[:, None] * stride_vt + offs_d[None, :]    # (BLOCK_N, BLOCK_D)
            if MASKED:
                n_ok = offs_n < L
                kT = tl.load(kT_ptrs, mask=n_ok[None, :] & d_ok[:, None], other=0.0)
                v = tl.load(v_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            elif EVEN_D:
                kT = tl.load(kT_ptrs)
                v = tl.load(v_ptrs)
            else:
                kT = tl.load(kT_ptrs, mask=d_ok[:, None], other=0.0)
                v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        x = dot(q, kT, None, EMULATE)                                    # (BLOCK_M, BLOCK_N) fp32
        if SOFTCAP:
            # score = softcap * tanh(q.k * sm_scale / softcap): log2 domain t * (softcap log2 e)
            x = tanh_f32(x * cap_in)
            mult = cap_out
        else:
            mult = qk_scale                                              # sm_scale * log2(e)
        if MASKED:
            keep = (offs_n < L)[None, :]
            if CAUSAL or WINDOW:
                keep = keep & visible(offs_m[:, None], offs_n[None, :], wl, wr, WINDOW)
            x = tl.where(keep, x, float("-inf"))
        acc, l_i, m_i = softmax_block(acc, l_i, m_i, x, mult, v, WINDOW and MASKED, EMULATE)
    return acc, l_i, m_i


@triton.jit
def store_dkdv(DK, DV, dk, dv, rows, cols, hk, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
               mask, part_offset, ADD: tl.constexpr, EMULATE: tl.constexpr):
    """Write one key block's dK/dV (BLOCK_N, d) fp32 for kv head hk. rows: (BLOCK_N,) int64
    tokens, cols: (d,) dims. ADD: atomic adds into fp32 buffers that the GQA split programs of a
    key block share; else a store rounded to the buffers' dtype, at part_offset elements (the
    deterministic mode's partial sum of this split program; 0 when there is none)."""
    dk_ptrs = DK + rows[:, None] * stride_dkt + hk * stride_dkh + cols[None, :]
    dv_ptrs = DV + rows[:, None] * stride_dvt + hk * stride_dvh + cols[None, :]
    if ADD:
        tl.atomic_add(dk_ptrs, dk, mask=mask, sem="relaxed")
        tl.atomic_add(dv_ptrs, dv, mask=mask, sem="relaxed")
    else:
        tl.store(dk_ptrs + part_offset, lowp(dk, DK.dtype.element_ty, EMULATE), mask=mask)
        tl.store(dv_ptrs + part_offset, lowp(dv, DV.dtype.element_ty, EMULATE), mask=mask)
