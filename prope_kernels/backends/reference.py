"""Reference backend: the pure-PyTorch definition (:mod:`prope_kernels.reference`) behind the same
op contract as the kernels (see :mod:`prope_kernels.backends`). Any device and float dtype.

Attention is computed in float32 (float64 for float64 inputs) and returned in the inputs' dtype.
Forward: rotate q and k, attend; consecutive sequences of one length are attended as one batch
(a dense call is a single batch). Backward: the softmax recomputed from the rotated q, k, the
attention gradient written out, then dQ', dK' rotated back by the opposite angle (the gradient of
a rotation is its inverse), as the kernels do. The rotation alone multiplies in x's dtype, as user
code does.
"""

from __future__ import annotations

import torch

from .. import reference as ref
from .common import record_launch


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _runs(cu_seqlens, max_seqlen):
    """(first token, number of sequences n, length L) for each run of consecutive non-empty
    sequences of one length: tokens [first, first + n*L) are an (n, L) batch. This backend reads
    cu_seqlens on the host anyway, so it checks max_seqlen for free (the kernels' contract; an
    understated value is a ValueError here too, not a silently different result)."""
    cu = cu_seqlens.tolist()
    lens = [e - s for s, e in zip(cu[:-1], cu[1:])]
    if lens and max(lens) > max_seqlen:
        raise ValueError(f"max_seqlen ({max_seqlen}) is smaller than the longest sequence in "
                         f"cu_seqlens ({max(lens)})")
    i = 0
    while i < len(lens):
        j = i
        while j < len(lens) and lens[j] == lens[i]:
            j += 1
        if lens[i] > 0:
            yield cu[i], j - i, lens[i]
        i = j


def _scores(q, k, causal, scale, window=(-1, -1), softcap=0.0):
    """q (n, L, hkv, group, d), k (n, L, hkv, d) -> scores (n, hkv, group, L, L): scaled,
    softcapped, masked (-inf); and tanh of the capped argument (None without softcap), whose
    1 - tanh^2 the backward needs."""
    s = torch.einsum("bmhgd,bnhd->bhgmn", q, k) * scale
    t = None
    if softcap:
        t = torch.tanh(s / softcap)
        s = t * softcap
    m, n = s.shape[-2:]
    # m != n (seqlen_q != seqlen_k): flash-attn's bottom-right alignment (the same mask when equal)
    mask = ref.attention_mask if m == n else ref.attention_mask_bottom_right
    keep = mask(m, n, causal, window, s.device)
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    return s, t


def _safe_softmax(s):
    """Softmax over the last dim where a row with every score -inf (no visible key) gives 0,
    not NaN (seqlen_q > seqlen_k under a causal mask)."""
    mx = s.amax(dim=-1, keepdim=True)
    e = torch.exp(s - torch.where(torch.isinf(mx), torch.zeros_like(mx), mx))
    den = e.sum(dim=-1, keepdim=True)
    return e / torch.where(den == 0, torch.ones_like(den), den)


def _qk_seqs(cu_seqlens, cu_seqlens_k, max_seqlen, max_seqlen_k):
    """(q rows, k rows) slices of each sequence of a seqlen_q != seqlen_k call; checks
    max_seqlen / max_seqlen_k for free (the host has the offsets)."""
    cq, ck = cu_seqlens.tolist(), cu_seqlens_k.tolist()
    if len(cq) != len(ck):
        raise ValueError(f"cu_seqlens_k must have as many entries as cu_seqlens, got {len(ck)} "
                         f"and {len(cq)}")
    for name, cu, mx in (("max_seqlen", cq, max_seqlen), ("max_seqlen_k", ck, max_seqlen_k)):
        longest = max((e - s for s, e in zip(cu[:-1], cu[1:])), default=0)
        if longest > mx:
            raise ValueError(f"{name} ({mx}) is smaller than the longest sequence ({longest})")
    for i in range(len(cq) - 1):
        if cq[i + 1] > cq[i]:
            yield slice(cq[i], cq[i + 1]), slice(ck[i], ck[i + 1])


def _attn_fwd_qk(q, k, v, cu_seqlens, positions, max_seqlen, spec, causal, scale, window, softcap,
                 cu_seqlens_k, positions_k, max_seqlen_k):
    total, hq, d = q.shape
    cd = _compute_dtype(q.dtype)
    qr = ref.apply_prope(q.to(cd), positions, spec)
    kr = ref.apply_prope(k.to(cd), positions_k, spec)
    out = q.new_zeros(q.shape)
    lse = q.new_full((hq, total), float("-inf"), dtype=torch.float32)
    for rq, rk in _qk_seqs(cu_seqlens, cu_seqlens_k, max_seqlen, max_seqlen_k):
        o, l = ref.attention_qk(qr[None, rq], kr[None, rk], v[None, rk].to(cd), causal, scale,
                                True, window, softcap)
        out[rq] = o[0].to(q.dtype)
        lse[:, rq] = l[0].float()
    return out, lse


def _attn_bwd_qk(dout, q, k, v, dlse, cu_seqlens, positions, max_seqlen, spec, causal, scale,
                 window, softcap, cu_seqlens_k, positions_k, max_seqlen_k):
    hq, d = q.shape[1:]
    hkv = k.shape[1]
    group = hq // hkv
    cd = _compute_dtype(q.dtype)
    qr = ref.apply_prope(q.to(cd), positions, spec)
    kr = ref.apply_prope(k.to(cd), positions_k, spec)
    dqr = torch.zeros(q.shape, dtype=cd, device=q.device)
    dkr = torch.zeros(k.shape, dtype=cd, device=q.device)
    dv = torch.zeros(v.shape, dtype=cd, device=q.device)
    for rq, rk in _qk_seqs(cu_seqlens, cu_seqlens_k, max_seqlen, max_seqlen_k):
        m, n = rq.stop - rq.start, rk.stop - rk.start
        if n == 0:
            continue                       # no keys: out 0, every gradient 0
        qg = qr[rq].view(1, m, hkv, group, d)
        kg, vg = kr[rk].view(1, n, hkv, d), v[rk].to(cd).view(1, n, hkv, d)
        do = dout[rq].to(cd).view(1, m, hkv, group, d)
        s, t = _scores(qg, kg, causal, scale, window, softcap)          # bottom-right mask
        prob = _safe_softmax(s)                                          # empty rows: 0
        dprob = torch.einsum("bmhgd,bnhd->bhgmn", do, vg)
        row = (prob * dprob).sum(-1, keepdim=True)
        if dlse is not None:
            row = row - dlse[:, rq].to(cd).reshape(hkv, group, 1, m).permute(2, 0, 1, 3)[..., None]
        ds = prob * (dprob - row) * scale
        if softcap:
            ds = ds * (1 - t * t)
        dqr[rq] = torch.einsum("bhgmn,bnhd->bmhgd", ds, kg).reshape(m, hq, d)
        dkr[rk] = torch.einsum("bhgmn,bmhgd->bnhd", ds, qg).reshape(n, hkv, d)
        dv[rk] = torch.einsum("bhgmn,bmhgd->bnhd", prob, do).reshape(n, hkv, d)
    dq = ref.apply_prope(dqr, positions, spec, conjugate=True)
    dk = ref.apply_prope(dkr, positions_k, spec, conjugate=True)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def attn_fwd(q, k, v, cu_seqlens, positions, max_seqlen, spec, causal, scale, window=(-1, -1),
             softcap=0.0, cu_seqlens_k=None, positions_k=None, max_seqlen_k=None):
    record_launch("fwd", "reference")
    if cu_seqlens_k is not None:   # seqlen_q != seqlen_k: per sequence, bottom-right masks
        return _attn_fwd_qk(q, k, v, cu_seqlens, positions, max_seqlen, spec, causal, scale,
                            window, softcap, cu_seqlens_k, positions_k, max_seqlen_k)
    total, hq, d = q.shape
    hkv = k.shape[1]
    cd = _compute_dtype(q.dtype)
    qr = ref.apply_prope(q.to(cd), positions, spec)
    kr = ref.apply_prope(k.to(cd), positions, spec)
    out = q.new_zeros(q.shape)
    lse = q.new_zeros((hq, total), dtype=torch.float32)
    for t0, n, L in _runs(cu_seqlens, max_seqlen):
        rows = slice(t0, t0 + n * L)
        o, l = ref.attention(qr[rows].view(n, L, hq, d), kr[rows].view(n, L, hkv, d),
                             v[rows].to(cd).view(n, L, hkv, d), causal, scale, return_lse=True,
                             window=window, softcap=softcap)
        out[rows] = o.reshape(n * L, hq, d).to(q.dtype)
        lse[:, rows] = l.transpose(0, 1).reshape(hq, n * L).float()
    return out, lse


def attn_bwd(dout, q, k, v, out, lse, dlse, cu_seqlens, positions, max_seqlen, spec, causal,
             scale, window=(-1, -1), softcap=0.0, deterministic=False, cu_seqlens_k=None,
             positions_k=None, max_seqlen_k=None):
    record_launch("bwd", "reference")  # deterministic whatever is asked (no atomics)
    if cu_seqlens_k is not None:
        return _attn_bwd_qk(dout, q, k, v, dlse, cu_seqlens, positions, max_seqlen, spec, causal,
                            scale, window, softcap, cu_seqlens_k, positions_k, max_seqlen_k)
    total, hq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    cd = _compute_dtype(q.dtype)
    qr = ref.apply_prope(q.to(cd), positions, spec)
    kr = ref.apply_prope(k.to(cd), positions, spec)
    dqr = torch.zeros(q.shape, dtype=cd, device=q.device)
    dkr = torch.zeros(k.shape, dtype=cd, device=q.device)
    dv = torch.zeros(v.shape, dtype=cd, device=q.device)
    for t0, n, L in _runs(cu_seqlens, max_seqlen):
        rows = slice(t0, t0 + n * L)
        qg = qr[rows].view(n, L, hkv, group, d)      # q head h reads kv head h // group
        kg, vg = kr[rows].view(n, L, hkv, d), v[rows].to(cd).view(n, L, hkv, d)
        do = dout[rows].to(cd).view(n, L, hkv, group, d)
        s, t = _scores(qg, kg, causal, scale, window, softcap)
        prob = torch.softmax(s, dim=-1)                                  # (n, hkv, group, L, L)
        dprob = torch.einsum("bmhgd,bnhd->bhgmn", do, vg)
        # row term: rowsum(dO * O) = rowsum(P * dP); an lse gradient enters as -dlse
        row = (prob * dprob).sum(-1, keepdim=True)
        if dlse is not None:
            dl = dlse[:, rows].to(cd).reshape(hkv, group, n, L).permute(2, 0, 1, 3)
            row = row - dl[..., None]
        ds = prob * (dprob - row) * scale
        if softcap:
            ds = ds * (1 - t * t)          # d softcap * tanh(s / softcap) / ds = 1 - tanh^2
        dqr[rows] = torch.einsum("bhgmn,bnhd->bmhgd", ds, kg).reshape(n * L, hq, d)
        dkr[rows] = torch.einsum("bhgmn,bmhgd->bnhd", ds, qg).reshape(n * L, hkv, d)
        dv[rows] = torch.einsum("bhgmn,bmhgd->bnhd", prob, do).reshape(n * L, hkv, d)
    dq = ref.apply_prope(dqr, positions, spec, conjugate=True)
    dk = ref.apply_prope(dkr, positions, spec, conjugate=True)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def rope(x, positions, spec, conjugate):
    return ref.apply_prope(x, positions, spec, conjugate)
