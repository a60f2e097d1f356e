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
def softmax_block(acc, l_i, m_i, m_use, s, v, EMULATE: tl.constexpr):
    """One key block of the forward's online softmax: s (BLOCK_M, BLOCK_N) scores in the log2
    domain, m_use the rows' new running max (or a finite stand-in for rows that have seen no key
    yet). Returns acc (BLOCK_M, d) and the row sums l_i, both rescaled to m_use."""
    p = tl.math.exp2(s - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = dot(lowp(p, v.dtype, EMULATE), v, acc, EMULATE)
    return acc, l_i


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
