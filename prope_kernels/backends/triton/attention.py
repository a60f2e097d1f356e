"""Triton FlashAttention-2 style forward and backward with p-RoPE fused.

All kernels take the packed layout: tokens (total, heads, d) with int32 ``CU`` (num_seqs + 1)
sequence offsets; a dense batch is ``CU = [0, s, 2s, ...]``. Program ids: axis 0 = sequence * heads
(CUDA allows 2^31 - 1 there), axis 1 = block of rows inside the sequence. All token offsets are
64-bit (positions times strides overflow int32 in long sequences).

Where the rotation happens (each element is rotated about once per pass):

* forward: K arrives pre-rotated from a short-lived buffer (``rope.py``), so the inner loop is
  plain FlashAttention with no sin/cos. The stationary Q tile is rotated one of two ways, and the
  autotuner times both on the GPU (the rotation's cost included) and keeps the faster:
  - Q_ON_LOAD=1: rotated in registers once per program (angles in float64). Fused, but a full
    (BLOCK_M, d) tile of cos/sin raises register pressure in the prologue;
  - Q_ON_LOAD=0: a config pre-hook rotates Q into the output buffer (rotated pairs rotated,
    identity dims copied), and each program reads its own Q' rows from there before
    overwriting them with its output: no extra memory, one extra pass over q.
* backward: short-lived rotated Q', K' buffers feed a plain FA2 backward; dK' and dQ' (the
  gradients w.r.t. the rotated tensors) are rotated back with the conjugate rotation in place.
  dQ' is written over Q' (each dq program reads its own Q' rows once, first), so the rotated
  copy of Q costs no memory beyond dq itself.

Nothing rotated outlives the op call: forward saves only q, k, v, out and lse.

Optional features, compile-time switches (no cost when off):

* WINDOW: sliding window, query i sees key j iff i - wl <= j <= i + wr (runtime ints; a causal
  call has wr = 0, an unbounded side is passed as max_seqlen). The loop bounds shrink to the
  window: key (query) blocks wholly outside it are never visited, so the work scales with the
  window; only the blocks it cuts get a mask (``_key_blocks``, ``_query_blocks``).
* SHIFT: seqlen_q != seqlen_k (``CU_K``: the keys' offsets, their own lengths Lk). Query row i
  of a sequence sits at key index i + Lk - Lq (flash-attn's bottom-right alignment): the masks
  and the block ranges are computed on the shifted rows (``rows``, ``start_m + off``; the dK/dV
  kernel shifts its key block into query coordinates), always with the WINDOW masks (a causal
  call is the window (unbounded, 0)), whose empty-row handling gives a row that sees no key
  out 0 and lse -inf (as flash-attn does). Off, the kernels are the ones without it.
* SOFTCAP: scores s = softcap * tanh(q.k * sm_scale / softcap) (runtime cap_in = sm_scale /
  softcap, cap_out = softcap * log2(e)); the backward multiplies dS by the tanh's derivative
  1 - tanh^2 (the tanh is recomputed, not stored).
"""

import triton
import triton.language as tl

from .common import (LN2, LOG2E, dot, fwd_loop, kv_block, q_block, store_dkdv, tanh_f32,
                     visible)
from .configs import autotune_args
from .rope import lowp, rope_cos_sin


@triton.jit
def _scores(x, qk_scale, cap_in, cap_out, SOFTCAP: tl.constexpr):
    """Raw q.k dots (fp32) -> scores in the log2 domain, and tanh of the capped argument (the
    backward's 1 - t^2; x itself when SOFTCAP is off, unused)."""
    if SOFTCAP:
        t = tanh_f32(x * cap_in)                        # cap_in = sm_scale / softcap
        return t * cap_out, t                           # cap_out = softcap * log2(e)
    else:
        return x * qk_scale, x


@triton.jit
def _key_blocks(start_m, L, wl, wr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SHIFT: tl.constexpr = False):
    """Keys seen by query rows [start_m, start_m + BLOCK_M) -> (lo, free_lo, free_hi, hi):
    blocks in [free_lo, free_hi) are seen whole by every row and inside the sequence (no mask
    at all); [lo, free_lo) (WINDOW only) and [free_hi, hi) need the mask. Blocks outside
    [lo, hi) are never visited: with a window the work is ~ (BLOCK_M + wl + wr) keys a row
    block, not the sequence length."""
    n_even = (L // BLOCK_N) * BLOCK_N
    if WINDOW:
        lo = (tl.maximum(start_m - wl, 0) // BLOCK_N) * BLOCK_N
        hi = tl.minimum(L, start_m + BLOCK_M + wr)
        if SHIFT:
            # seqlen_q != seqlen_k: start_m (rows in key coordinates) may be negative and the
            # block may see no key at all: an empty range, never one below 0
            hi = tl.maximum(hi, lo)
        # whole block [n, n + BLOCK_N) seen by all rows: n >= last row - wl, n + BLOCK_N - 1 <=
        # first row + wr
        free_lo = tl.maximum(tl.cdiv(tl.maximum(start_m + BLOCK_M - 1 - wl, 0), BLOCK_N)
                             * BLOCK_N, lo)
        free_lo = tl.minimum(free_lo, hi)  # == hi: no full block, [lo, hi) all masked
        free_hi = tl.maximum(tl.minimum(((start_m + wr + 1) // BLOCK_N) * BLOCK_N, n_even),
                             free_lo)
    elif CAUSAL:
        lo = 0
        free_lo = 0
        free_hi = tl.minimum((start_m // BLOCK_N) * BLOCK_N, n_even)
        hi = tl.minimum(L, start_m + BLOCK_M)
    else:
        lo = 0
        free_lo = 0
        free_hi = n_even
        hi = L
    return lo, free_lo, free_hi, hi


@triton.jit
def _query_blocks(start_n, L, wl, wr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SHIFT: tl.constexpr = False):
    """Query rows that see keys [start_n, start_n + BLOCK_N) -> (lo, free_lo, free_hi, hi), as
    in _key_blocks: [free_lo, free_hi) unmasked, [lo, free_lo) and [free_hi, hi) masked."""
    m_even = (L // BLOCK_M) * BLOCK_M
    if WINDOW:
        lo = (tl.maximum(start_n - wr, 0) // BLOCK_M) * BLOCK_M
        hi = tl.minimum(L, start_n + BLOCK_N + wl)
        # whole block [m, m + BLOCK_M) sees all keys: m >= last key - wr, m + BLOCK_M - 1 <=
        # first key + wl
        free_lo = tl.maximum(tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - wr, 0), BLOCK_M)
                             * BLOCK_M, lo)
        free_lo = tl.minimum(free_lo, hi)
        free_hi = tl.maximum(tl.minimum(((start_n + wl + 1) // BLOCK_M) * BLOCK_M, m_even),
                             free_lo)
        if SHIFT:
            # start_n in query coordinates may be negative and no query may see the block
            # (hi < lo): then free_lo = hi, and this makes all three ranges empty (a no-op
            # otherwise: free_hi <= hi). Clamping hi to lo instead is as correct, but made the
            # sm_80 compile of the dK/dV kernel spill ~3 KB a thread (cuobjdump, d128 32x128)
            free_hi = tl.minimum(free_hi, hi)
    elif CAUSAL:
        lo = (start_n // BLOCK_M) * BLOCK_M                  # first query block that sees us
        free_lo = tl.maximum(tl.minimum(tl.cdiv(start_n + BLOCK_N, BLOCK_M) * BLOCK_M, m_even),
                             lo)
        free_hi = tl.maximum(free_lo, m_even)
        hi = L
    else:
        lo = 0
        free_lo = 0
        free_hi = m_even
        hi = L
    return lo, free_lo, free_hi, hi


@triton.jit
def _k_range(CU_K, L, seq):
    """seqlen_q != seqlen_k: the key rows of sequence ``seq`` -> (first key token (int64), key
    count Lk, Lk - L: the key index of query row 0)."""
    k_start = tl.load(CU_K + seq).to(tl.int64)
    Lk = tl.load(CU_K + seq + 1) - tl.load(CU_K + seq)
    return k_start, Lk, Lk - L


# ------------------------------------------------------------------------------------------------
# forward
# ------------------------------------------------------------------------------------------------

@triton.autotune(**autotune_args("fwd"))
@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, POS, CU, CU_K, C_PART, C_SIGN, C_FREQ,
    PAIR_A, PAIR_B, PAIR_F, IDS, N_ROT,     # read by the Q_ON_LOAD=0 pre-hook only
    sm_scale, cap_in, cap_out, total, n_heads, seq_bucket, wl, wr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    ROTATE: tl.constexpr, EVEN_D: tl.constexpr, EMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, Q_ON_LOAD: tl.constexpr,
    SHIFT: tl.constexpr = False,
):
    h, hk, seq_start, L, start_m = q_block(CU, n_heads, GROUP, BLOCK_M)
    if start_m >= L:
        return
    # SHIFT (seqlen_q != seqlen_k): keys from CU_K; query row i sits at key index i + Lk - L
    # (bottom-right alignment), the masks compare in key coordinates (WINDOW is always on)
    if SHIFT:
        k_start, Lk, off = _k_range(CU_K, L, tl.program_id(0) // n_heads)
    else:                                    # keys are the query rows: nothing shifts
        k_start = seq_start
        Lk = L
        off = 0
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < L
    d_ok = offs_d < HEAD_DIM

    # q (BLOCK_M, BLOCK_D): loaded once, rotated once, stays in SRAM/registers.
    q_mask = m_ok[:, None] & d_ok[None, :]
    o_ptrs = O + (seq_start + offs_m)[:, None] * stride_ot + h * stride_oh + offs_d[None, :]
    if ROTATE and not Q_ON_LOAD:
        q = tl.load(o_ptrs, mask=q_mask, other=0.0)      # Q' rows written by the pre-hook
    else:
        q_rows = Q + (seq_start + offs_m)[:, None] * stride_qt + h * stride_qh
        q = tl.load(q_rows + offs_d[None, :], mask=q_mask, other=0.0)
    if ROTATE and Q_ON_LOAD:
        # q'[j] = q[j] cos + sign[j] q[partner[j]] sin; identity dims have freq 0, sign 0.
        part = tl.load(C_PART + offs_d, mask=d_ok, other=0)
        sign = tl.load(C_SIGN + offs_d, mask=d_ok, other=0.0)
        freq = tl.load(C_FREQ + offs_d, mask=d_ok, other=0.0)
        q_partner = tl.load(q_rows + part[None, :], mask=q_mask, other=0.0)
        pos = tl.load(POS + seq_start + offs_m, mask=m_ok, other=0)
        cos, sin = rope_cos_sin(pos[:, None], freq[None, :])
        q = (q.to(tl.float32) * cos + q_partner.to(tl.float32) * (sin * sign[None, :]))
        q = lowp(q, Q.dtype.element_ty, EMULATE)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    qk_scale = sm_scale * LOG2E
    k_base = K + k_start * stride_kt + hk * stride_kh
    v_base = V + k_start * stride_vt + hk * stride_vh
    lo, free_lo, free_hi, hi = _key_blocks(start_m + off, Lk, wl, wr, BLOCK_M, BLOCK_N, CAUSAL,
                                           WINDOW, SHIFT)
    rows = offs_m + off                                 # query rows in key coordinates
    # the key loop in up to three parts: the blocks the window's left edge cuts (masked), blocks
    # every row sees whole (no mask), the diagonal / ragged tail / right edge (masked)
    if WINDOW:
        acc, l_i, m_i = fwd_loop(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, rows,
                                 offs_d, Lk, lo, free_lo, qk_scale, wl, wr, cap_in, cap_out,
                                 BLOCK_N, HEAD_DIM, True, CAUSAL, WINDOW, SOFTCAP, EVEN_D, False,
                                 EMULATE)
    acc, l_i, m_i = fwd_loop(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, rows,
                             offs_d, Lk, free_lo, free_hi, qk_scale, wl, wr, cap_in, cap_out,
                             BLOCK_N, HEAD_DIM, False, CAUSAL, WINDOW, SOFTCAP, EVEN_D, False,
                             EMULATE)
    acc, l_i, m_i = fwd_loop(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, rows,
                             offs_d, Lk, free_hi, hi, qk_scale, wl, wr, cap_in, cap_out,
                             BLOCK_N, HEAD_DIM, True, CAUSAL, WINDOW, SOFTCAP, EVEN_D, False,
                             EMULATE)

    if WINDOW:
        # every row of the sequence sees its own key; padding rows past its end may see none:
        # keep them finite (out 0, lse -inf; they are not stored). SHIFT: a row that sees no
        # key (seqlen_q > seqlen_k under a causal mask, or no key at all) gets out 0, lse -inf,
        # as flash-attn gives
        l_i = tl.where(l_i == 0.0, 1.0, l_i)
    acc = acc / l_i[:, None]
    lse = (m_i + tl.math.log2(l_i)) * LN2                 # natural log, (BLOCK_M,)
    tl.store(o_ptrs, lowp(acc, O.dtype.element_ty, EMULATE), mask=q_mask)
    tl.store(LSE + h.to(tl.int64) * total + seq_start + offs_m, lse, mask=m_ok)


# ------------------------------------------------------------------------------------------------
# backward
# ------------------------------------------------------------------------------------------------

@triton.jit
def _bwd_preprocess_kernel(O, DO, DLSE, DELTA, total, stride_ot, stride_oh, stride_dot,
                           stride_doh, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                           BLOCK_T: tl.constexpr, HAS_DLSE: tl.constexpr):
    # delta[h, t] = sum_d o * do  (minus dlse when the lse output also has a gradient)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    t_ok = t < total
    t64 = t.to(tl.int64)
    mask = t_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O + t64[:, None] * stride_ot + h * stride_oh + offs_d[None, :], mask=mask,
                other=0.0).to(tl.float32)
    do = tl.load(DO + t64[:, None] * stride_dot + h * stride_doh + offs_d[None, :], mask=mask,
                 other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + h * total + t64, mask=t_ok, other=0.0)
    tl.store(DELTA + h * total + t64, delta, mask=t_ok)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                    offs_n, offs_d, L, lo, hi, qk_scale, wl, wr, cap_in, cap_out,
                    BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,
                    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
                    EVEN_D: tl.constexpr, EMULATE: tl.constexpr):
    d_ok = offs_d < HEAD_DIM
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        qT_ptrs = q_base + offs_m.to(tl.int64)[None, :] * stride_qt + offs_d[:, None]      # (BLOCK_D, BLOCK_M)
        do_ptrs = do_base + offs_m.to(tl.int64)[:, None] * stride_dot + offs_d[None, :]    # (BLOCK_M, BLOCK_D)
        if MASKED:
            m_ok = offs_m < L
            qT = tl.load(qT_ptrs, mask=m_ok[None, :] & d_ok[:, None], other=0.0)
            do = tl.load(do_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
            lse = tl.load(lse_base + offs_m, mask=m_ok, other=0.0)
            delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0)
        else:
            if EVEN_D:
                qT = tl.load(qT_ptrs)
                do = tl.load(do_ptrs)
            else:
                qT = tl.load(qT_ptrs, mask=d_ok[:, None], other=0.0)
                do = tl.load(do_ptrs, mask=d_ok[None, :], other=0.0)
            lse = tl.load(lse_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        # pT (BLOCK_N, BLOCK_M): probabilities recomputed from the saved lse
        sT, tT = _scores(dot(k, qT, None, EMULATE), qk_scale, cap_in, cap_out, SOFTCAP)
        pT = tl.math.exp2(sT - (lse * LOG2E)[None, :])
        if MASKED:
            keep = m_ok[None, :]
            if CAUSAL or WINDOW:
                keep = keep & visible(offs_m[None, :], offs_n[:, None], wl, wr, WINDOW)
            pT = tl.where(keep, pT, 0.0)
        dv = dot(lowp(pT, do.dtype, EMULATE), do, dv, EMULATE)
        dpT = dot(v, tl.trans(do), None, EMULATE)
        dsT = pT * (dpT - delta[None, :])
        if SOFTCAP:
            dsT = dsT * (1.0 - tT * tT)                 # d(capped score) / d(scaled score)
        dk = dot(lowp(dsT, qT.dtype, EMULATE), tl.trans(qT), dk, EMULATE)
    return dk, dv


@triton.autotune(**autotune_args("dkdv"),
                 reset_to_zero=["DK", "DV"])  # ATOMIC accumulates: zero before every trial
@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, CU, CU_K,
    sm_scale, cap_in, cap_out, total, n_kv_heads, seq_bucket, wl, wr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dks, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    GROUP: tl.constexpr, SPLIT: tl.constexpr, ATOMIC: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    ROTATE: tl.constexpr, EVEN_D: tl.constexpr,
    EMULATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SHIFT: tl.constexpr = False,
):
    # One program: BLOCK_N keys of kv head hk and GROUP // SPLIT of the query heads that read it.
    # GQA/MQA gradients are reduced over those heads in registers (no expanded k/v).
    # SPLIT > 1 (few kv heads: too few programs to fill the GPU) reduces over the SPLIT programs
    # of a key block in fp32 DK/DV (total, kv_heads, d):
    #   ATOMIC=1: atomic adds into one zeroed fp32 buffer (the default: 1x the fp32 size of k);
    #   ATOMIC=0: fp32 partial sums DK/DV[split] (split stride stride_dks; dv shares the strides)
    #             that the launcher adds up in a fixed order (torch's deterministic mode).
    if SHIFT:
        # seqlen_q != seqlen_k: key blocks over CU_K, query rows over CU; query row i sits at key
        # index i + off
        split, hk, k_start, Lk, start_n = kv_block(CU_K, n_kv_heads, SPLIT, BLOCK_N)
        seq = tl.program_id(0) // (n_kv_heads * SPLIT)
        seq_start = tl.load(CU + seq).to(tl.int64)
        L = tl.load(CU + seq + 1) - tl.load(CU + seq)
        off = Lk - L
        # the query-side masks: visible(i + off, j, wl, wr) == visible(i, j, wl - off, wr + off)
        wl_q = wl - off
        wr_q = wr + off
    else:
        split, hk, seq_start, L, start_n = kv_block(CU, n_kv_heads, SPLIT, BLOCK_N)
        k_start = seq_start
        Lk = L
        off = 0
        wl_q = wl
        wr_q = wr
    if start_n >= Lk:
        return
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_n < Lk)[:, None] & (offs_d < HEAD_DIM)[None, :]
    k = tl.load(K + (k_start + offs_n)[:, None] * stride_kt + hk * stride_kh + offs_d[None, :],
                mask=kv_mask, other=0.0)                                     # (BLOCK_N, BLOCK_D)
    v = tl.load(V + (k_start + offs_n)[:, None] * stride_vt + hk * stride_vh + offs_d[None, :],
                mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    qk_scale = sm_scale * LOG2E
    lo, free_lo, free_hi, hi = _query_blocks(start_n - off, L, wl, wr, BLOCK_M, BLOCK_N, CAUSAL,
                                             WINDOW, SHIFT)
    for g in range(split * (GROUP // SPLIT), (split + 1) * (GROUP // SPLIT)):
        h = (hk * GROUP + g).to(tl.int64)
        q_base = Q + seq_start * stride_qt + h * stride_qh
        do_base = DO + seq_start * stride_dot + h * stride_doh
        lse_base = LSE + h * total + seq_start
        delta_base = DELTA + h * total + seq_start
        # diagonal / window-edge blocks (masked), blocks every row sees whole (no mask), the
        # ragged tail and the window's far edge (masked)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt,
                                 stride_dot, offs_n, offs_d, L, lo, free_lo, qk_scale, wl_q, wr_q,
                                 cap_in, cap_out, BLOCK_M, HEAD_DIM, True, CAUSAL, WINDOW,
                                 SOFTCAP, EVEN_D, EMULATE)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt,
                                 stride_dot, offs_n, offs_d, L, free_lo, free_hi, qk_scale, wl_q,
                                 wr_q, cap_in, cap_out, BLOCK_M, HEAD_DIM, False, CAUSAL, WINDOW,
                                 SOFTCAP, EVEN_D, EMULATE)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt,
                                 stride_dot, offs_n, offs_d, L, free_hi, hi, qk_scale, wl_q, wr_q,
                                 cap_in, cap_out, BLOCK_M, HEAD_DIM, True, CAUSAL, WINDOW,
                                 SOFTCAP, EVEN_D, EMULATE)
    dk = dk * sm_scale
    store_dkdv(DK, DV, dk, dv, k_start + offs_n, offs_d, hk, stride_dkt, stride_dkh, stride_dvt,
               stride_dvh, kv_mask, split.to(tl.int64) * stride_dks, SPLIT > 1 and ATOMIC,
               EMULATE)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, L,
                  lo, hi, qk_scale, wl, wr, cap_in, cap_out, BLOCK_N: tl.constexpr,
                  HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                  WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, EVEN_D: tl.constexpr,
                  EMULATE: tl.constexpr):
    d_ok = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kT_ptrs = k_base + offs_n.to(tl.int64)[None, :] * stride_kt + offs_d[:, None]      # (BLOCK_D, BLOCK_N)
        vT_ptrs = v_base + offs_n.to(tl.int64)[None, :] * stride_vt + offs_d[:, None]
        if MASKED:
            n_ok = offs_n < L
            kT = tl.load(kT_ptrs, mask=n_ok[None, :] & d_ok[:, None], other=0.0)
            vT = tl.load(vT_ptrs, mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        elif EVEN_D:
            kT = tl.load(kT_ptrs)
            vT = tl.load(vT_ptrs)
        else:
            kT = tl.load(kT_ptrs, mask=d_ok[:, None], other=0.0)
            vT = tl.load(vT_ptrs, mask=d_ok[:, None], other=0.0)
        # p (BLOCK_M, BLOCK_N): probabilities recomputed from the saved lse
        s, t = _scores(dot(q, kT, None, EMULATE), qk_scale, cap_in, cap_out, SOFTCAP)
        p = tl.math.exp2(s - (lse * LOG2E)[:, None])
        if MASKED:
            keep = n_ok[None, :]
            if CAUSAL or WINDOW:
                keep = keep & visible(offs_m[:, None], offs_n[None, :], wl, wr, WINDOW)
            p = tl.where(keep, p, 0.0)
        dp = dot(do, vT, None, EMULATE)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = dot(lowp(ds, kT.dtype, EMULATE), tl.trans(kT), dq, EMULATE)
    return dq


@triton.autotune(**autotune_args("dq"),
                 restore_value=["DQ"])  # DQ may alias Q (in-place dQ' over Q'): restore per trial
@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU, CU_K,
    sm_scale, cap_in, cap_out, total, n_heads, seq_bucket, wl, wr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, ROTATE: tl.constexpr, EVEN_D: tl.constexpr,
    EMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SHIFT: tl.constexpr = False,
):
    h, hk, seq_start, L, start_m = q_block(CU, n_heads, GROUP, BLOCK_M)
    if start_m >= L:
        return
    if SHIFT:
        k_start, Lk, off = _k_range(CU_K, L, tl.program_id(0) // n_heads)
    else:                                    # keys are the query rows: nothing shifts
        k_start = seq_start
        Lk = L
        off = 0
    h64 = h.to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < L
    mask = m_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(Q + (seq_start + offs_m)[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                mask=mask, other=0.0)
    do = tl.load(DO + (seq_start + offs_m)[:, None] * stride_dot + h * stride_doh
                 + offs_d[None, :], mask=mask, other=0.0)
    lse = tl.load(LSE + h64 * total + seq_start + offs_m, mask=m_ok, other=0.0)
    delta = tl.load(DELTA + h64 * total + seq_start + offs_m, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    qk_scale = sm_scale * LOG2E
    k_base = K + k_start * stride_kt + hk * stride_kh
    v_base = V + k_start * stride_vt + hk * stride_vh
    lo, free_lo, free_hi, hi = _key_blocks(start_m + off, Lk, wl, wr, BLOCK_M, BLOCK_N, CAUSAL,
                                           WINDOW, SHIFT)
    rows = offs_m + off                                 # query rows in key coordinates
    if WINDOW:
        dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, rows,
                           offs_d, Lk, lo, free_lo, qk_scale, wl, wr, cap_in, cap_out, BLOCK_N,
                           HEAD_DIM, True, CAUSAL, WINDOW, SOFTCAP, EVEN_D, EMULATE)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, rows,
                       offs_d, Lk, free_lo, free_hi, qk_scale, wl, wr, cap_in, cap_out, BLOCK_N,
                       HEAD_DIM, False, CAUSAL, WINDOW, SOFTCAP, EVEN_D, EMULATE)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, rows,
                       offs_d, Lk, free_hi, hi, qk_scale, wl, wr, cap_in, cap_out, BLOCK_N,
                       HEAD_DIM, True, CAUSAL, WINDOW, SOFTCAP, EVEN_D, EMULATE)
    dq = dq * sm_scale
    tl.store(DQ + (seq_start + offs_m)[:, None] * stride_dqt + h * stride_dqh + offs_d[None, :],
             lowp(dq, DQ.dtype.element_ty, EMULATE), mask=mask)


# the kernels the config policy (configs.py) forces and reports on, by table name
KERNELS = {"fwd": _attn_fwd_kernel, "dkdv": _attn_bwd_dkdv_kernel, "dq": _attn_bwd_dq_kernel}
