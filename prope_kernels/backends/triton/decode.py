"""Triton kernels of :func:`prope_kernels.kvcache.prope_attention_with_kvcache`.

Three launches, all on strided 4-D tensors ``(batch, seq, heads, d)`` with ``stride(-1) == 1``
(so a transformers cache, held ``(batch, heads, seq, d)``, is passed as a transposed view):

* ``_append_kernel``: the new k rotated at its positions (the rotated pairs: one cos/sin per
  pair, two FMAs; the identity dims: plain copies, no sin/cos, no multiply) and written into the
  cache at rows ``cache_seqlens[b] + t``; v copied beside it.
* ``_split_kv_kernel``: one program per (sequence, kv head, block of query rows, KV split).
  The rows of a block are (query token, q head of the GQA group) pairs, so a one-token decode
  of a group of 8 q heads is one 16-row tile that reads each cached key once. q is rotated in
  the kernel at its positions. Each program runs the online softmax over its slice of the keys
  and writes a partial out (fp32) and a partial log2-sum-exp.
* ``_combine_kernel``: merges the splits of each row (a softmax over the partial lse).

Masks use flash-attn's bottom-right alignment: with L keys and sq queries, query i sees key j
iff ``i + L - sq - left <= j <= i + L - sq + right`` (causal caps right at 0; -1 unbounded).
"""

import torch
import triton
import triton.language as tl

from ... import env
from .rope import lowp, rope_cos_sin

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _dot(a, b, acc, EMULATE: tl.constexpr, IEEE: tl.constexpr):
    # EMULATE: the interpreter's bf16 dot is wrong (see triton/common.py); IEEE: fp32 inputs,
    # no TF32 rounding (the fp32 path is the exact one)
    if EMULATE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _append_kernel(
    KN, VN, KC, VC, KPOS, SEQLENS,          # KN/VN (b, sn, hkv, d); KC/VC (b, S, hkv, d)
    PAIR_A, PAIR_B, PAIR_F, IDS,            # (R,) int32, (R,) int32, (R,) fp64, (D-2R,) int32
    sn,
    stride_knb, stride_knt, stride_knh, stride_vnb, stride_vnt, stride_vnh,
    stride_kcb, stride_kct, stride_kch, stride_vcb, stride_vct, stride_vch,
    stride_pb,                              # KPOS (b, sn) int64
    D: tl.constexpr, BLOCK_D: tl.constexpr,
    R: tl.constexpr, R_PAD: tl.constexpr, N_ID: tl.constexpr, ID_PAD: tl.constexpr,
    EMULATE: tl.constexpr, BLOCK_T: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    t = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = t < sn
    t64 = t.to(tl.int64)
    dest = tl.load(SEQLENS + b).to(tl.int64) + t64                      # cache rows (BLOCK_T,)
    kn = KN + b * stride_knb + t64[:, None] * stride_knt + h * stride_knh
    kc = KC + b * stride_kcb + dest[:, None] * stride_kct + h * stride_kch

    # v: a copy of the whole row
    dd = tl.arange(0, BLOCK_D)
    m = t_mask[:, None] & (dd[None, :] < D)
    vrow = tl.load(VN + b * stride_vnb + t64[:, None] * stride_vnt + h * stride_vnh + dd[None, :],
                   mask=m, other=0.0)
    tl.store(VC + b * stride_vcb + dest[:, None] * stride_vct + h * stride_vch + dd[None, :],
             vrow, mask=m)

    if R > 0:  # rotated pairs of k
        k = tl.arange(0, R_PAD)
        k_mask = k < R
        a = tl.load(PAIR_A + k, mask=k_mask, other=0)
        bb = tl.load(PAIR_B + k, mask=k_mask, other=0)
        f = tl.load(PAIR_F + k, mask=k_mask, other=0.0)
        pos = tl.load(KPOS + b * stride_pb + t64, mask=t_mask, other=0)
        cos, sin = rope_cos_sin(pos[:, None], f[None, :])               # (BLOCK_T, R_PAD) fp32
        mr = t_mask[:, None] & k_mask[None, :]
        xa = tl.load(kn + a[None, :], mask=mr, other=0.0).to(tl.float32)
        xb = tl.load(kn + bb[None, :], mask=mr, other=0.0).to(tl.float32)
        tl.store(kc + a[None, :], lowp(xa * cos - xb * sin, KC.dtype.element_ty, EMULATE), mask=mr)
        tl.store(kc + bb[None, :], lowp(xb * cos + xa * sin, KC.dtype.element_ty, EMULATE),
                 mask=mr)
    if N_ID > 0:  # identity dims of k: plain copies
        j = tl.arange(0, ID_PAD)
        j_mask = j < N_ID
        ids = tl.load(IDS + j, mask=j_mask, other=0)
        mi = t_mask[:, None] & j_mask[None, :]
        tl.store(kc + ids[None, :], tl.load(kn + ids[None, :], mask=mi, other=0.0), mask=mi)


@triton.jit
def _split_kv_kernel(
    Q, KC, VC, QPOS, SEQLENS, LEFTPAD, OP, LP,  # Q (b, sq, hq, d); OP (b*hq*sq, SPLITS, BLOCK_D)
    C_PART, C_SIGN, C_FREQ,                 # (D,) per dim: partner, sign, frequency
    sq, n_kv_heads, chunk, sm_scale, cap_in, cap_out, wl, wr,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt,
    stride_vh, stride_pb,
    GROUP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS: tl.constexpr,
    HAS_LEFTPAD: tl.constexpr,              # LEFTPAD (b,) int32: keys before it are padding
    ROTATE: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    EMULATE: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    b = (pid_bh // n_kv_heads).to(tl.int64)
    hk = pid_bh % n_kv_heads
    pid_m = tl.program_id(1)
    split = tl.program_id(2)
    L = tl.load(SEQLENS + b)                      # keys of this sequence (cache + new)
    off = L - sq                                  # bottom-right alignment: query i ~ key i + off

    # rows (BLOCK_M,): row r = (query token i, head g of the group)
    r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    r_mask = r < sq * GROUP
    i = r // GROUP
    hq = (hk * GROUP + r % GROUP).to(tl.int64)
    i64 = i.to(tl.int64)
    dd = tl.arange(0, BLOCK_D)
    d_mask = dd < D
    q_ptr = Q + b * stride_qb + i64[:, None] * stride_qt + hq[:, None] * stride_qh
    qm = r_mask[:, None] & d_mask[None, :]
    q = tl.load(q_ptr + dd[None, :], mask=qm, other=0.0)
    if ROTATE:  # q' = q cos + sign * q[partner] sin, per dim (identity dims: sign 0, freq 0)
        part = tl.load(C_PART + dd, mask=d_mask, other=0)
        sign = tl.load(C_SIGN + dd, mask=d_mask, other=0.0)
        freq = tl.load(C_FREQ + dd, mask=d_mask, other=0.0)
        qp = tl.load(q_ptr + part[None, :], mask=qm, other=0.0).to(tl.float32)
        pos = tl.load(QPOS + b * stride_pb + i64, mask=r_mask, other=0)
        cos, sin = rope_cos_sin(pos[:, None], freq[None, :])
        q = lowp(q.to(tl.float32) * cos + sign[None, :] * qp * sin, Q.dtype.element_ty, EMULATE)

    # keys this program reads: its split's slice, cut by the mask of its rows
    lo = split * chunk
    hi = tl.minimum(lo + chunk, L)
    i_lo = pid_m * BLOCK_M // GROUP
    i_hi = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // GROUP, sq - 1)
    if CAUSAL:
        hi = tl.minimum(hi, i_hi + off + 1)
    elif WINDOW:
        if wr >= 0:
            hi = tl.minimum(hi, i_hi + off + wr + 1)
    if WINDOW:
        if wl >= 0:
            lo = tl.maximum(lo, i_lo + off - wl)
    if HAS_LEFTPAD:  # the loop starts at the sequence's first key: padding is never read
        lo = tl.maximum(lo, tl.load(LEFTPAD + b))

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    qk_scale = sm_scale * LOG2E
    k_base = KC + b * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = VC + b * stride_vb + hk.to(tl.int64) * stride_vh
    for start in range(lo, hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        j_mask = j < hi
        j64 = j.to(tl.int64)
        if D == BLOCK_D:  # a row mask alone: constant along d, so the loads stay 16-byte vectors
            km = j_mask[:, None]
        else:
            km = j_mask[:, None] & d_mask[None, :]
        kt = tl.load(k_base + j64[:, None] * stride_kt + dd[None, :], mask=km, other=0.0)
        s = _dot(q, tl.trans(kt), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), EMULATE, IEEE)
        if SOFTCAP:  # cap * tanh(s * scale / cap), in the log2 domain
            s = s * cap_in
            e = tl.math.exp2(tl.abs(s) * -2.8853900817779268)  # -2 log2(e)
            t = (1.0 - e) / (1.0 + e)
            s = tl.where(s >= 0, t, -t) * cap_out
        else:
            s = s * qk_scale
        keep = j_mask[None, :] & r_mask[:, None]
        rel = j[None, :] - (i[:, None] + off)     # key index relative to the query's diagonal
        if CAUSAL:
            keep &= rel <= 0
        if WINDOW:
            if wl >= 0:
                keep &= rel >= -wl
            if wr >= 0:
                keep &= rel <= wr
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = tl.load(v_base + j64[:, None] * stride_vt + dd[None, :], mask=km, other=0.0)
        acc = _dot(lowp(p, vt.dtype, EMULATE), vt, acc * alpha[:, None], EMULATE, IEEE)
        m_i = m_new

    # partial results of this split: out (fp32, normalized) and lse in log2 units (-inf: empty)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    lse2 = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe))
    row = (b * (n_kv_heads * GROUP) + hq) * sq + i64           # (b, hq, i) flattened
    tl.store(OP + (row[:, None] * SPLITS + split) * BLOCK_D + dd[None, :], o,
             mask=r_mask[:, None] & d_mask[None, :])
    tl.store(LP + row * SPLITS + split, lse2, mask=r_mask)


@triton.jit
def _combine_kernel(
    OP, LP, O, LSE,                         # OP (rows, SPLITS, BLOCK_D) fp32; O (b, sq, hq, d)
    n_rows, sq, n_heads, stride_ob, stride_ot, stride_oh,
    D: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
    EMULATE: tl.constexpr, BLOCK_R: tl.constexpr,
):
    row = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)     # (b, hq, i) flattened
    r_mask = row < n_rows
    row64 = row.to(tl.int64)
    sp = tl.arange(0, SPLITS_PAD)
    s_mask = sp < SPLITS
    lse = tl.load(LP + row64[:, None] * SPLITS + sp[None, :],
                  mask=r_mask[:, None] & s_mask[None, :], other=float("-inf"))
    mx = tl.max(lse, 1)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    w = tl.math.exp2(lse - mx[:, None])                         # (BLOCK_R, SPLITS_PAD)
    tot = tl.sum(w, 1)
    w = w / tl.where(tot == 0.0, 1.0, tot)[:, None]
    dd = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for s in range(SPLITS):
        ws = tl.sum(tl.where(sp[None, :] == s, w, 0.0), 1)
        o = tl.load(OP + (row64[:, None] * SPLITS + s) * BLOCK_D + dd[None, :],
                    mask=r_mask[:, None], other=0.0)
        acc += ws[:, None] * o
    i = row64 % sq
    h = (row64 // sq) % n_heads
    b = row64 // (sq * n_heads)
    optr = O + b[:, None] * stride_ob + i[:, None] * stride_ot + h[:, None] * stride_oh
    tl.store(optr + dd[None, :], lowp(acc, O.dtype.element_ty, EMULATE),
             mask=r_mask[:, None] & (dd[None, :] < D))
    # a row that sees no key in any split: lse -inf (out 0), as the reference
    lse_row = (mx + tl.math.log2(tl.where(tot == 0.0, 1.0, tot))) * LN2
    tl.store(LSE + row64, tl.where(tot == 0.0, float("-inf"), lse_row), mask=r_mask)


def append_launch(k, v, k_cache, v_cache, k_positions, cache_seqlens, tables, num_rotated):
    """k_cache[b, cache_seqlens[b] + t] <- p-RoPE(k[b, t]) at k_positions[b, t]; v likewise,
    copied. k, v: (b, sn, hkv, d); caches (b, S, hkv, d); k_positions (b, sn) int64;
    cache_seqlens (b,) int32. All on one device, stride(-1) == 1."""
    b, sn, hkv, d = k.shape
    if sn == 0:
        return
    n_id = d - 2 * num_rotated
    block_t = 16
    grid = (b, hkv, triton.cdiv(sn, block_t))
    _append_kernel[grid](
        k, v, k_cache, v_cache, k_positions, cache_seqlens,
        tables.pair_a, tables.pair_b, tables.pair_freq, tables.identity, sn,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), k_positions.stride(0),
        D=d, BLOCK_D=triton.next_power_of_2(d),
        R=num_rotated, R_PAD=max(triton.next_power_of_2(num_rotated), 1),
        N_ID=n_id, ID_PAD=max(triton.next_power_of_2(n_id), 1),
        EMULATE=env.interpreting() and k_cache.dtype == torch.bfloat16, BLOCK_T=block_t,
        num_warps=4,
    )


def block_n_for(head_dim, dtype) -> int:
    """Keys per loop step: 64, fewer for wide fp32 tiles (the sm_90 compile of fp32 d128 at 64
    keys spilled 640 B a thread, at 32 keys 96 B, at 16 none)."""
    block_d = triton.next_power_of_2(head_dim)
    if dtype == torch.float32:
        return 64 if block_d <= 64 else 16
    return 64 if block_d <= 128 else 32


def warps_for(head_dim, dtype) -> int:
    """fp32 at head_dim 256 spills 88 B a thread on sm_80 at 4 warps: 8 warps there (at d128,
    8 warps spilled more on sm_90 than 4 do)."""
    return 8 if dtype == torch.float32 and head_dim > 128 else 4


def num_sms(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def choose_splits(batch, kv_heads, m_blocks, max_keys, block_n, device) -> int:
    """Split-KV factor: enough programs for about four per SM (decode is bound by the K/V
    reads; more programs in flight keep more loads outstanding), each split at least 4 key
    blocks (the partial writes and the combine stay small next to the K/V reads). Unmeasured
    choice: to be tuned on a GPU with bench_decode."""
    programs = batch * kv_heads * m_blocks
    target = 4 * num_sms(device)
    if programs >= target:
        return 1
    most = max(1, triton.cdiv(max_keys, 4 * block_n))
    # a power of two: SPLITS is a constexpr, so a cache growing by a token recompiles only when
    # the count changes (at most 7 values), not every 4 key blocks
    return 1 << (int(max(1, min(triton.cdiv(target, programs), most, 64))).bit_length() - 1)


def attn_launch(q, k_cache, v_cache, q_positions, seqlens, max_keys, tables, num_rotated,
                causal, softmax_scale, window, softcap, num_splits=0, leftpad=None):
    """out (b, sq, hq, d) in q's dtype and lse (b, hq, sq) fp32 (natural log) of q rotated at
    q_positions (b, sq) int64 over keys ``[0, seqlens[b])`` of the caches (already rotated).
    max_keys: max(seqlens) (sizes the splits). leftpad: None or (b,) int32, the first key of
    each sequence (keys before it are never read)."""
    b, sq, hq, d = q.shape
    hkv = k_cache.shape[2]
    group = hq // hkv
    block_d = triton.next_power_of_2(d)
    block_m = max(16, min(64, triton.next_power_of_2(sq * group)))
    block_n = block_n_for(d, q.dtype)
    m_blocks = triton.cdiv(sq * group, block_m)
    splits = num_splits or choose_splits(b, hkv, m_blocks, max_keys, block_n, q.device)
    splits = max(1, min(int(splits), triton.cdiv(max(max_keys, 1), block_n)))
    chunk = triton.cdiv(triton.cdiv(max(max_keys, 1), splits), block_n) * block_n
    op = torch.empty(b * hq * sq, splits, block_d, device=q.device, dtype=torch.float32)
    lp = torch.empty(b * hq * sq, splits, device=q.device, dtype=torch.float32)
    out = torch.empty_like(q)
    lse = torch.empty(b, hq, sq, device=q.device, dtype=torch.float32)
    if env.poison():
        for t in (op, lp, out, lse):
            t.fill_(float("nan"))
    left, right = window
    use_window = left >= 0 or (right >= 0 and not causal)
    if softcap:
        cap_in, cap_out = softmax_scale / softcap, softcap * 1.4426950408889634
    else:
        cap_in = cap_out = 1.0
    emulate = env.interpreting() and q.dtype == torch.bfloat16
    _split_kv_kernel[(b * hkv, m_blocks, splits)](
        q, k_cache, v_cache, q_positions, seqlens, seqlens if leftpad is None else leftpad,
        op, lp,
        tables.col_partner, tables.col_sign, tables.col_freq,
        sq, hkv, chunk, softmax_scale, cap_in, cap_out, left, right,
        q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        q_positions.stride(0),
        GROUP=group, D=d, BLOCK_D=block_d, SPLITS=splits, HAS_LEFTPAD=leftpad is not None,
        ROTATE=num_rotated > 0,
        CAUSAL=causal, WINDOW=use_window, SOFTCAP=bool(softcap), EMULATE=emulate,
        IEEE=q.dtype == torch.float32, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=warps_for(d, q.dtype), num_stages=2,
    )
    n_rows = b * hq * sq
    block_r = 16
    _combine_kernel[(triton.cdiv(n_rows, block_r),)](
        op, lp, out, lse, n_rows, sq, hq, out.stride(0), out.stride(1), out.stride(2),
        D=d, BLOCK_D=block_d, SPLITS=splits, SPLITS_PAD=triton.next_power_of_2(splits),
        EMULATE=emulate, BLOCK_R=block_r, num_warps=4,
    )
    return out, lse
