"""Pure-PyTorch reference: the definition every kernel is tested against.

Readable on purpose: rotate q and k with p-RoPE, then softmax attention, with GQA by repeating
k/v heads. Runs on any device and dtype; tests call it in float64 for the "true" answer and in the
kernel's dtype for the error PyTorch itself makes.

Layout everywhere: ``(batch, seqlen, heads, head_dim)``, or ``(total_tokens, heads, head_dim)``
for packed (varlen) sequences described by ``cu_seqlens``.
"""

from __future__ import annotations

from typing import Optional

import torch

from .rotary import PRoPESpec


def rotation_angles(positions: torch.Tensor, spec: PRoPESpec):
    """cos, sin of the angles ``positions * g_k`` for the rotated pairs.

    positions: integer tensor of any shape P. Returns two float64 tensors (*P, r).
    Angles are formed in float64 (an fp32 angle is off by ~0.03 rad at position 1e6).
    """
    _, _, freqs = spec.pairs()
    inv_freq = torch.tensor(freqs, dtype=torch.float64, device=positions.device)
    ang = positions.to(torch.float64)[..., None] * inv_freq
    return torch.cos(ang), torch.sin(ang)


def apply_prope(x: torch.Tensor, positions: torch.Tensor, spec: PRoPESpec,
                conjugate: bool = False) -> torch.Tensor:
    """Rotate ``x`` (..., seqlen, heads, head_dim) by p-RoPE.

    positions: integer (..., seqlen), broadcastable against x's leading dims.
    conjugate: rotate by ``-phi`` (the inverse, i.e. the gradient of the rotation).
    The multiply happens in x's dtype (cos/sin are rounded to it), as user code does it.
    """
    a, b, _ = spec.pairs()
    if not a:
        return x.clone()
    cos, sin = rotation_angles(positions, spec)          # (..., seqlen, r)
    cos = cos[..., None, :].to(x.dtype)                    # (..., seqlen, 1, r): broadcast heads
    sin = sin[..., None, :].to(x.dtype)
    if conjugate:
        sin = -sin
    ia = torch.tensor(a, device=x.device)
    ib = torch.tensor(b, device=x.device)
    xa, xb = x[..., ia], x[..., ib]
    out = x.clone()
    out[..., ia] = xa * cos - xb * sin
    out[..., ib] = xb * cos + xa * sin
    return out


def attention_mask(m: int, n: int, causal: bool = True, window=(-1, -1), device=None):
    """Boolean (m, n) mask of the keys each query sees (True = visible), or None for "all".

    Query i sees key j iff ``i - left <= j <= i + right`` (flash-attn's ``window_size``
    convention), a side of -1 being unbounded; ``causal`` caps the right side at 0. i and j
    are indices inside the sequence (not ``positions``). With left, right >= 0 every query sees
    at least its own key, so no row is empty.
    """
    left, right = window
    if causal:
        right = 0 if right < 0 else min(right, 0)
    if left < 0 and right < 0:
        return None
    i = torch.arange(m, device=device)[:, None]
    j = torch.arange(n, device=device)[None, :]
    keep = torch.ones(m, n, dtype=torch.bool, device=device)
    if left >= 0:
        keep &= j >= i - left
    if right >= 0:
        keep &= j <= i + right
    return keep


def softcap_scores(s: torch.Tensor, softcap: Optional[float]) -> torch.Tensor:
    """Gemma 2's attention-logit softcapping of the scaled scores s = q.k * softmax_scale:
    ``softcap * tanh(s / softcap)`` (off for None or 0)."""
    if not softcap:
        return s
    return torch.tanh(s / softcap) * softcap


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
              softmax_scale: Optional[float] = None, return_lse: bool = False,
              window=(-1, -1), softcap: Optional[float] = None):
    """Softmax attention on (batch, seqlen, heads, d) tensors in their own dtype.

    k/v heads are repeated to q's head count (q head h reads kv head ``h // (hq // hkv)``).
    Scores: ``s = q.k * softmax_scale``, then softcapped (:func:`softcap_scores`), then masked by
    ``causal`` and ``window`` (:func:`attention_mask`), then the softmax over keys.
    lse: (batch, q_heads, seqlen) natural-log sum of exp of the (capped) scores.
    """
    d = q.shape[-1]
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    group = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    s = torch.einsum("bmhd,bnhd->bhmn", q, k) * scale
    s = softcap_scores(s, softcap)
    keep = attention_mask(s.shape[-2], s.shape[-1], causal, window, q.device)
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s.float() if s.dtype in (torch.float16, torch.bfloat16) else s, dim=-1)
    prob = torch.softmax(s, dim=-1)
    out = torch.einsum("bhmn,bnhd->bmhd", prob, v)
    return (out, lse) if return_lse else out


def default_positions(seqlen: int, device) -> torch.Tensor:
    return torch.arange(seqlen, device=device)


def prope_attention(q, k, v, spec: PRoPESpec, causal=True, softmax_scale=None, positions=None,
                    return_lse=False, window=(-1, -1), softcap=None):
    """Reference fused op: rotate q and k with p-RoPE, then attend. Shapes as in
    :func:`prope_kernels.prope_attention`."""
    if positions is None:
        positions = default_positions(q.shape[1], q.device)
    qr = apply_prope(q, positions, spec)
    kr = apply_prope(k, positions, spec)
    return attention(qr, kr, v, causal, softmax_scale, return_lse, window, softcap)


def varlen_positions(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Positions restarting at 0 in each packed sequence: (total,) int64."""
    cu = cu_seqlens.to(torch.int64)
    lens = cu[1:] - cu[:-1]
    starts = torch.repeat_interleave(cu[:-1], lens, output_size=total)  # no host sync
    return torch.arange(total, device=cu.device) - starts


def prope_attention_varlen(q, k, v, cu_seqlens, spec: PRoPESpec, causal=True,
                           softmax_scale=None, positions=None, return_lse=False, window=(-1, -1),
                           softcap=None):
    """Reference varlen op: q (total, hq, d), k/v (total, hkv, d); each sequence
    ``cu_seqlens[i]:cu_seqlens[i+1]`` attends only to itself. lse: (hq, total)."""
    total = q.shape[0]
    if positions is None:
        positions = varlen_positions(cu_seqlens, total)
    qr = apply_prope(q, positions, spec)
    kr = apply_prope(k, positions, spec)
    outs, lses = [], []
    cu = cu_seqlens.tolist()
    for s, e in zip(cu[:-1], cu[1:]):
        if e == s:
            continue
        o, l = attention(qr[None, s:e], kr[None, s:e], v[None, s:e], causal, softmax_scale, True,
                         window, softcap)
        outs.append(o[0])
        lses.append(l[0])
    out = torch.cat(outs) if outs else torch.empty_like(q)
    lse = torch.cat(lses, dim=-1) if lses else q.new_empty(q.shape[1], 0, dtype=torch.float32)
    return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------------------------
# reference math: q and k of different lengths (bottom-right alignment), separate positions
# ----------------------------------------------------------------------------------------------

def attention_mask_bottom_right(m: int, n: int, causal: bool = True, window=(-1, -1),
                                device=None):
    """Boolean (m, n) mask (True = visible) of m queries over n keys, or None for "all": query
    i sees key j iff ``i + n - m - left <= j <= i + n - m + right`` (flash-attn's alignment;
    m == n is :func:`prope_kernels.reference.attention_mask`). A row can be empty when
    m > n under a causal mask (its output is 0, its lse -inf)."""
    left, right = window
    if causal:
        right = 0 if right < 0 else min(right, 0)
    if left < 0 and right < 0:
        return None
    rel = (torch.arange(n, device=device)[None, :]
           - torch.arange(m, device=device)[:, None] - (n - m))     # j - (i + n - m)
    keep = torch.ones(m, n, dtype=torch.bool, device=device)
    if left >= 0:
        keep &= rel >= -left
    if right >= 0:
        keep &= rel <= right
    return keep


def attention_qk(q, k, v, causal=True, softmax_scale=None, return_lse=False, window=(-1, -1),
                 softcap=None):
    """Softmax attention of q (batch, sq, hq, d) over k, v (batch, sk, hkv, d) in their own
    dtype, masks aligned bottom-right. Fully masked rows give out 0 and lse -inf (no NaN).
    lse: (batch, hq, sq)."""
    d = q.shape[-1]
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    group = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    s = torch.einsum("bmhd,bnhd->bhmn", q, k) * scale
    s = softcap_scores(s, softcap)
    keep = attention_mask_bottom_right(s.shape[-2], s.shape[-1], causal, window, q.device)
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s.float() if s.dtype in (torch.float16, torch.bfloat16) else s, dim=-1)
    if s.shape[-1] == 0:   # no keys at all: every row is empty
        out = torch.einsum("bhmn,bnhd->bmhd", s, v)
        return (out, lse) if return_lse else out
    mx = s.amax(dim=-1, keepdim=True)
    e = torch.exp(s - torch.where(torch.isinf(mx), torch.zeros_like(mx), mx))
    den = e.sum(dim=-1, keepdim=True)
    prob = e / torch.where(den == 0, torch.ones_like(den), den)
    out = torch.einsum("bhmn,bnhd->bmhd", prob, v)
    return (out, lse) if return_lse else out


def prope_attention_qk(q, k, v, spec: PRoPESpec, q_positions=None, k_positions=None,
                       causal=True, softmax_scale=None, return_lse=False, window=(-1, -1),
                       softcap=None):
    """Reference of the dense op with ``seqlen_q != seqlen_k``: q (b, sq, hq, d) rotated at
    ``q_positions`` ((sq,) or (b, sq); default ``sk - sq .. sk - 1``: q at the end of k), k
    (b, sk, hkv, d) at ``k_positions`` (default ``0 .. sk - 1``), then :func:`attention_qk`.
    Differentiable (autograd through the rotation and the softmax)."""
    sq, sk = q.shape[1], k.shape[1]
    if k_positions is None:
        k_positions = torch.arange(sk, device=q.device)
    if q_positions is None:
        q_positions = torch.arange(sk - sq, sk, device=q.device)
    qr = apply_prope(q, q_positions, spec)
    kr = apply_prope(k, k_positions, spec)
    return attention_qk(qr, kr, v, causal, softmax_scale, return_lse, window, softcap)


def prope_attention_varlen_qk(q, k, v, cu_seqlens_q, cu_seqlens_k, spec: PRoPESpec,
                              q_positions=None, k_positions=None, causal=True,
                              softmax_scale=None, return_lse=False, window=(-1, -1),
                              softcap=None):
    """Reference of the varlen op with separate q and k packings: q (total_q, hq, d), k/v
    (total_k, hkv, d); sequence i is q rows ``cu_seqlens_q[i]:cu_seqlens_q[i+1]`` over k rows
    ``cu_seqlens_k[i]:cu_seqlens_k[i+1]``. Default positions per sequence: k ``0..Lk-1``,
    q ``Lk-Lq..Lk-1``. lse: (hq, total_q)."""
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    if len(cq) != len(ck):
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length, got "
                         f"{len(cq)} and {len(ck)}")
    outs, lses = [], []
    for (qs, qe), (ks, ke) in zip(zip(cq[:-1], cq[1:]), zip(ck[:-1], ck[1:])):
        qp = None if q_positions is None else q_positions[qs:qe]
        kp = None if k_positions is None else k_positions[ks:ke]
        o, l = prope_attention_qk(q[None, qs:qe], k[None, ks:ke], v[None, ks:ke], spec, qp, kp,
                                  causal, softmax_scale, True, window, softcap)
        outs.append(o[0])
        lses.append(l[0])
    out = torch.cat(outs) if outs else q[:0].clone()
    lse = torch.cat(lses, dim=-1) if lses else q.new_empty(q.shape[1], 0, dtype=torch.float32)
    return (out, lse) if return_lse else out


def visible_pairs(seqlen: int, causal: bool, window=(-1, -1)) -> int:
    """Number of (query, key) pairs that :func:`attention_mask` keeps in one sequence."""
    left, right = window
    if causal:
        right = 0 if right < 0 else min(right, 0)
    s = seqlen
    left = s - 1 if left < 0 else min(left, s - 1)
    right = s - 1 if right < 0 else min(right, s - 1)

    def below(w):  # pairs with 1 <= i - j <= w
        return w * s - w * (w + 1) // 2
    return s + below(left) + below(right)


def attention_flops(batch: int, seqlen: int, q_heads: int, head_dim: int, causal: bool,
                    mode: str = "fwd", window=(-1, -1)) -> float:
    """Standard count: forward 4*b*h*s^2*d (halved if causal); bwd 2.5x; fwd+bwd 3.5x.
    With a sliding ``window``, s^2 (or s^2 / 2) becomes the number of visible pairs."""
    if window[0] < 0 and window[1] < 0:
        pairs = seqlen * seqlen * (0.5 if causal else 1.0)
    else:
        pairs = visible_pairs(seqlen, causal, window)
    f = 4.0 * batch * q_heads * pairs * head_dim
    return f * {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}[mode]


__all__ = [
    "rotation_angles", "apply_prope", "attention", "attention_mask", "softcap_scores",
    "prope_attention", "prope_attention_varlen", "varlen_positions", "default_positions",
    "visible_pairs", "attention_flops", "attention_mask_bottom_right", "attention_qk",
    "prope_attention_qk", "prope_attention_varlen_qk",
]
