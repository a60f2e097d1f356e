"""p-RoPE attention over a KV cache (decode, chunked prefill, prefix caching), and the reference
math of attention with ``seqlen_q != seqlen_k``.

    out = prope_attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lens, p=0.75)

The cache convention is transformers': **the cache holds rotated keys** (as
``apply_rotary_pos_emb`` leaves them before ``cache.update``) **and plain values**. Cache row ``j``
of a sequence holds its key rotated at the position it was written with (by default ``j``).
The new keys are rotated here, once, when they are written; only q is rotated at every call.

Masks align bottom-right, as flash-attn's: with ``L`` keys and ``sq`` queries, query ``i`` sits
on key ``i + L - sq`` (the last query on the last key), and sees key ``j`` iff
``i + L - sq - left <= j <= i + L - sq + right`` (``causal`` caps ``right`` at 0).
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Optional

import torch

from . import env
from . import reference as ref
from .reference import (attention_mask_bottom_right, attention_qk,  # noqa: F401 (re-exported)
                        prope_attention_qk, prope_attention_varlen_qk)
from .rotary import PRoPESpec

__all__ = ["prope_attention_with_kvcache", "kvcache_reference", "attention_mask_bottom_right",
           "attention_qk", "prope_attention_qk", "prope_attention_varlen_qk"]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INT_DTYPES = (torch.int32, torch.int64)


def _default_positions(cache_seqlens, sn, sq, device, leftpad=None):
    """k_positions (b, sn) = cache_seqlens + 0..sn-1; q positions (b, sq) = the last sq of the
    L = cache_seqlens + sn keys. With a leftpad, positions count from the first real key."""
    cs = cache_seqlens.to(device=device, dtype=torch.int64)[:, None]
    if leftpad is not None:
        cs = cs - leftpad.to(device=device, dtype=torch.int64)[:, None]
    kpos = cs + torch.arange(sn, device=device)
    qpos = cs + sn - sq + torch.arange(sq, device=device)
    return qpos, kpos


def kvcache_reference(q, k_cache, v_cache, k, v, cache_seqlens, spec: PRoPESpec, positions=None,
                      k_positions=None, causal=True, softmax_scale=None, window=(-1, -1),
                      softcap=None, cache_leftpad=None):
    """The definition of :func:`prope_attention_with_kvcache`, functional (the caches are not
    modified): returns ``(out, lse, k_cache_after, v_cache_after)``, computed in the inputs'
    dtype (float64 inputs give the "true" answer). cache_seqlens: (b,) integer tensor;
    cache_leftpad: None or (b,): sequence b's keys are rows ``cache_leftpad[b] .. L - 1``."""
    b, sq = q.shape[:2]
    sn = 0 if k is None else k.shape[1]
    cs = torch.as_tensor(cache_seqlens).to(torch.int64).cpu()
    lp = (torch.zeros_like(cs) if cache_leftpad is None
          else torch.as_tensor(cache_leftpad).to(torch.int64).cpu())
    qpos, kpos = _default_positions(cs, sn, sq, q.device, lp)
    qpos = qpos if positions is None else _per_batch(positions, b).to(q.device)
    kpos = kpos if k_positions is None else _per_batch(k_positions, b).to(q.device)
    kc, vc = k_cache.clone(), v_cache.clone()
    if sn:
        kr = ref.apply_prope(k, kpos, spec)
        for i in range(b):
            c = int(cs[i])
            kc[i, c:c + sn] = kr[i]
            vc[i, c:c + sn] = v[i]
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    qr = ref.apply_prope(q, qpos, spec)
    outs, lses = [], []
    for i in range(b):
        n, s0 = int(cs[i]) + sn, int(lp[i])
        o, l = attention_qk(qr[i:i + 1], kc[i:i + 1, s0:n], vc[i:i + 1, s0:n], causal, scale,
                            True, window, softcap)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs), torch.cat(lses), kc, vc


def _per_batch(pos, b):
    pos = pos.to(torch.int64)
    return pos.expand(b, pos.shape[-1]) if pos.dim() == 1 else pos


# ----------------------------------------------------------------------------------------------
# validation: every error before anything is written
# ----------------------------------------------------------------------------------------------

def _check_tensor(name, t, dim):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dim:
        raise ValueError(f"{name} must have {dim} dims, got shape {tuple(t.shape)}")


def _check_positions(name, pos, b, n, device):
    if pos is None:
        return None
    if not isinstance(pos, torch.Tensor) or pos.dtype not in _INT_DTYPES:
        raise ValueError(f"{name} must be an int32/int64 tensor, got "
                         f"{getattr(pos, 'dtype', type(pos).__name__)}")
    if pos.device != device:
        raise ValueError(f"{name} must be on {device}, got {pos.device}")
    if tuple(pos.shape) not in ((n,), (b, n)):
        raise ValueError(f"{name} must have shape ({n},) or ({b}, {n}), got {tuple(pos.shape)}")
    return _per_batch(pos, b).contiguous()


def _validate(q, k_cache, v_cache, k, v, cache_seqlens, causal, softmax_scale, window, softcap,
              backend, check_values=True, cache_leftpad=None):
    """Checks shapes, dtypes, devices and the cache_seqlens values (one host copy when it is a
    device tensor; skipped with ``check_values=False``). Returns (cache_seqlens as a (b,) int32
    tensor on q's device, its host list or None when unchecked, the backend name)."""
    _check_tensor("q", q, 4)
    _check_tensor("k_cache", k_cache, 4)
    _check_tensor("v_cache", v_cache, 4)
    b, sq, hq, d = q.shape
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must have the same shape, got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    bc, S, hkv, dc = k_cache.shape
    if bc != b:
        raise ValueError(f"k_cache must hold q's batch ({b}) sequences, got {bc} (shape "
                         f"{tuple(k_cache.shape)} is (batch, cache_len, kv_heads, head_dim))")
    if dc != d:
        raise ValueError(f"k_cache head_dim {dc} differs from q's {d}")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"q's heads ({hq}) must be a multiple of k_cache's kv heads ({hkv})")
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (the new tokens) or both be None")
    named = [("q", q), ("k_cache", k_cache), ("v_cache", v_cache)]
    if k is not None:
        _check_tensor("k", k, 4)
        _check_tensor("v", v, 4)
        if k.shape != v.shape:
            raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and "
                             f"{tuple(v.shape)}")
        if k.shape[0] != b or k.shape[2] != hkv or k.shape[3] != d:
            raise ValueError(f"k must have shape ({b}, new_tokens, {hkv}, {d}) like the cache, "
                             f"got {tuple(k.shape)}")
        named += [("k", k), ("v", v)]
    for name, t in named:
        if t.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {t.dtype}, q has {q.dtype}: they must agree")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}: they must agree")
    for name, t in named[1:3]:
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have stride(-1) == 1 (it is written in place)")
    if torch.is_grad_enabled() and any(t.requires_grad for _, t in named):
        raise ValueError("prope_attention_with_kvcache is inference-only (no autograd through "
                         "an in-place cache): call it under torch.no_grad() or detach q/k/v")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if softmax_scale is not None and not (isinstance(softmax_scale, Real)
                                          and math.isfinite(softmax_scale)
                                          and softmax_scale > 0):
        raise ValueError(f"softmax_scale must be a positive finite float, got {softmax_scale!r}")
    if (not isinstance(window, (tuple, list)) or len(window) != 2
            or not all(isinstance(w, Integral) and not isinstance(w, bool) and w >= -1
                       for w in window)):
        raise ValueError(f"window must be a pair of ints >= -1 (left, right), got {window!r}")
    if softcap is not None and not (isinstance(softcap, Real) and math.isfinite(softcap)
                                    and softcap >= 0):
        raise ValueError(f"softcap must be None or a finite float >= 0, got {softcap!r}")

    # cache_seqlens: an int or (b,) integer tensor
    if isinstance(cache_seqlens, Integral) and not isinstance(cache_seqlens, bool):
        lens = [int(cache_seqlens)] * b
        cs = torch.full((b,), int(cache_seqlens), dtype=torch.int32, device=q.device)
    elif isinstance(cache_seqlens, torch.Tensor):
        if cache_seqlens.dtype not in _INT_DTYPES or tuple(cache_seqlens.shape) != (b,):
            raise ValueError(f"cache_seqlens must be an int or an int32/int64 tensor of shape "
                             f"({b},), got {cache_seqlens.dtype} {tuple(cache_seqlens.shape)}")
        if cache_seqlens.device != q.device:
            raise ValueError(f"cache_seqlens is on {cache_seqlens.device}, q on {q.device}")
        # one host copy: values checked before anything is written (unless the caller opts out)
        lens = cache_seqlens.tolist() if check_values else None
        cs = cache_seqlens.to(torch.int32)
    else:
        raise TypeError(f"cache_seqlens must be an int or a tensor, got "
                        f"{type(cache_seqlens).__name__}")
    sn = 0 if k is None else k.shape[1]
    lps = [0] * b
    if cache_leftpad is not None:
        if (not isinstance(cache_leftpad, torch.Tensor) or cache_leftpad.dtype not in _INT_DTYPES
                or tuple(cache_leftpad.shape) != (b,)):
            raise ValueError(f"cache_leftpad must be an int32/int64 tensor of shape ({b},), got "
                             f"{getattr(cache_leftpad, 'dtype', type(cache_leftpad).__name__)} "
                             f"{tuple(getattr(cache_leftpad, 'shape', ()))}")
        if cache_leftpad.device != q.device:
            raise ValueError(f"cache_leftpad is on {cache_leftpad.device}, q on {q.device}")
        if check_values:  # one host copy, as for cache_seqlens; skipped when the caller opts out
            lps = cache_leftpad.tolist()
    for i, c in enumerate(lens or ()):
        if c < 0:
            raise ValueError(f"cache_seqlens[{i}] = {c} is negative")
        if not 0 <= lps[i] <= c:
            raise ValueError(f"cache_leftpad[{i}] = {lps[i]} must be in [0, cache_seqlens[{i}] "
                             f"= {c}]")
        c -= lps[i]                                # keys of the sequence before the new ones
        if c + lps[i] + sn > S:
            raise ValueError(f"cache_seqlens[{i}] + new tokens = {c + lps[i]} + {sn} = "
                             f"{c + lps[i] + sn} exceeds the cache length {S} (k_cache.shape[1])")
        if c + sn < max(sq if causal else 1, 1):
            raise ValueError(f"sequence {i} has {c + sn} keys (cache_seqlens[{i}] + new tokens "
                             f"- cache_leftpad[{i}]) for {sq} queries: with causal=True each "
                             f"query needs its own key (at least seqlen_q keys)")

    if backend == "auto":  # the Triton kernels where they run the call, else the reference
        backend = ("triton" if q.is_cuda and q.dtype in _KERNEL_DTYPES and 16 <= d <= 256
                   else "reference")
    if backend not in ("triton", "reference"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'reference' for the KV-cache op, "
                         f"got {backend!r}")
    if backend == "triton":
        if not (q.is_cuda or env.interpreting()):
            raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1)")
        if q.dtype not in _KERNEL_DTYPES:
            raise ValueError(f"backend='triton' takes fp16/bf16/fp32 q, got {q.dtype}")
        if not 16 <= d <= 256:
            raise ValueError(f"backend='triton' takes head_dim 16..256, got {d}")
    return cs.contiguous(), lens, backend


# ----------------------------------------------------------------------------------------------
# the public op
# ----------------------------------------------------------------------------------------------

def prope_attention_with_kvcache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                 k: Optional[torch.Tensor] = None,
                                 v: Optional[torch.Tensor] = None, *, cache_seqlens,
                                 p: float = 0.75, theta: float = 10000.0,
                                 variant: str = "prope", layout: str = "half",
                                 causal: bool = True, softmax_scale: Optional[float] = None,
                                 positions: Optional[torch.Tensor] = None,
                                 k_positions: Optional[torch.Tensor] = None,
                                 window=(-1, -1), softcap: Optional[float] = None,
                                 return_lse: bool = False, num_splits: int = 0,
                                 backend: str = "auto", check_cache_seqlens: bool = True,
                                 cache_leftpad: Optional[torch.Tensor] = None):
    """Fused p-RoPE attention over a KV cache, with the new tokens appended in place.

    Args:
        q: (batch, seqlen_q, q_heads, head_dim), not rotated. One token for decode, a chunk
            for chunked prefill.
        k_cache, v_cache: (batch, cache_len, kv_heads, head_dim), ``stride(-1) == 1`` (any other
            strides: a transformers cache ``(batch, heads, seq, d)`` passes as
            ``.transpose(1, 2)``). **k_cache holds rotated keys** (transformers' convention),
            v_cache plain values. Rows ``[cache_seqlens[b], cache_seqlens[b] + new)`` are
            written in place; no other row is read beyond ``cache_seqlens[b] + new``.
        k, v: (batch, new_tokens, kv_heads, head_dim) new keys (not rotated) and values, or both
            None (attend over the cache as it is). k is rotated at ``k_positions`` (the
            identity dims copied) and written at rows ``cache_seqlens[b] + t``; v copied.
        cache_seqlens: int or (batch,) int32/int64 tensor on q's device: tokens already in each
            sequence's cache. Its values are read on the host (one copy) so that a bad value
            raises before anything is written.
        positions: q's rotation positions, (seqlen_q,) or (batch, seqlen_q); default: the last
            seqlen_q of the ``L = cache_seqlens + new_tokens`` keys, ``L - seqlen_q .. L - 1``.
        k_positions: the new keys' positions, (new_tokens,) or (batch, new_tokens); default
            ``cache_seqlens .. cache_seqlens + new_tokens - 1`` (cache row = position).
        causal, window, softcap, softmax_scale: as in :func:`prope_kernels.prope_attention`,
            with the mask aligned bottom-right (query i sits on key ``i + L - seqlen_q``).
        p, theta, variant, layout: the rotation (:class:`prope_kernels.rotary.PRoPESpec`).
        return_lse: also return lse (batch, q_heads, seqlen_q) fp32, natural log.
        num_splits: split-KV factor of the Triton kernel (0: chosen from the GPU's SM count so
            that a one-token decode over a long cache fills the GPU). Results do not depend on
            it beyond rounding.
        backend: "auto" (Triton for CUDA tensors, else the reference), "triton", "reference".
        cache_leftpad: None or (batch,) int32/int64 on q's device (flash-attn's name): sequence
            b's keys start at cache row ``cache_leftpad[b]`` (left padding of a batch); rows
            before it are never read. Default positions then count from it. Its values are
            checked with cache_seqlens' (``0 <= cache_leftpad <= cache_seqlens``).
        check_cache_seqlens: False skips the host copies of a ``cache_seqlens`` tensor and of
            ``cache_leftpad`` (no device sync, as flash-attn, e.g. for CUDA graphs): their
            values (and ``cache_leftpad <= cache_seqlens``) are then the caller's
            contract (``0 <= cache_seqlens``, ``cache_seqlens + new <= cache_len``, at least
            seqlen_q keys under ``causal``), unchecked; the splits are sized by ``cache_len``.

    Returns out (batch, seqlen_q, q_heads, head_dim) in q's dtype (and lse). Inference only
    (no autograd). Under ``torch.compile`` it is the custom op ``prope_kernels::attn_with_kvcache``
    (no graph break with ``check_cache_seqlens=False``, or an int ``cache_seqlens`` and no
    ``cache_leftpad``). Bad input
    (shapes, dtypes, devices, a cache too short for ``cache_seqlens + new_tokens``, fewer keys
    than causal queries, a ``cache_leftpad`` outside ``[0, cache_seqlens]``) raises a
    ``ValueError`` / ``TypeError`` naming the argument before any kernel runs; the cache is then unchanged.
    """
    spec = PRoPESpec(q.shape[-1] if isinstance(q, torch.Tensor) and q.dim() == 4 else 2,
                     p, theta, variant, layout)
    if not isinstance(check_cache_seqlens, bool):
        raise TypeError(f"check_cache_seqlens must be a bool, got "
                        f"{type(check_cache_seqlens).__name__}")
    cs, lens, backend = _validate(q, k_cache, v_cache, k, v, cache_seqlens, causal,
                                  softmax_scale, window, softcap, backend, check_cache_seqlens,
                                  cache_leftpad)
    lpad = None if cache_leftpad is None else cache_leftpad.to(torch.int32).contiguous()
    b, sq = q.shape[:2]
    sn = 0 if k is None else k.shape[1]
    # the kernels read q, k, v with any strides but a unit last one (small tensors: copy)
    q = q if q.stride(-1) == 1 else q.contiguous()
    if sn:
        k = k if k.stride(-1) == 1 else k.contiguous()
        v = v if v.stride(-1) == 1 else v.contiguous()
    qpos = _check_positions("positions", positions, b, sq, q.device)
    kpos = _check_positions("k_positions", k_positions, b, sn, q.device)
    if isinstance(num_splits, bool) or not isinstance(num_splits, Integral) or num_splits < 0:
        raise ValueError(f"num_splits must be an int >= 0, got {num_splits!r}")
    dq, dk = _default_positions(cs, sn, sq, q.device, lpad)
    qpos = dq if qpos is None else qpos
    kpos = dk if kpos is None else kpos
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    window = (int(window[0]), int(window[1]))
    softcap = float(softcap) if softcap else 0.0

    max_keys = max(lens) + sn if lens is not None else k_cache.shape[1]
    with torch.no_grad():
        out, lse = _kvcache_op(q, k_cache, v_cache, k, v, cs, qpos, kpos, max_keys, spec.p,
                               spec.theta, spec.variant, spec.layout, causal, scale, window[0],
                               window[1], softcap, int(num_splits), backend, lpad)
    return (out, lse) if return_lse else out


# the op torch.compile sees (an opaque node that writes the caches; a fake impl gives shapes)
@torch.library.custom_op("prope_kernels::attn_with_kvcache", mutates_args=("k_cache", "v_cache"))
def _kvcache_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                k: Optional[torch.Tensor], v: Optional[torch.Tensor],
                cache_seqlens: torch.Tensor, positions: torch.Tensor,
                k_positions: torch.Tensor, max_keys: int, p: float, theta: float, variant: str,
                layout: str, causal: bool, softmax_scale: float, window_left: int,
                window_right: int, softcap: float, num_splits: int, backend: str,
                cache_leftpad: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    spec = PRoPESpec(q.shape[-1], p, theta, variant, layout)
    window = (window_left, window_right)
    sn = 0 if k is None else k.shape[1]
    if backend == "reference":
        lens = cache_seqlens.tolist()          # the reference slices on the host anyway
        starts = [0] * len(lens) if cache_leftpad is None else cache_leftpad.tolist()
        return _reference_inplace(q, k_cache, v_cache, k, v, lens, positions, k_positions, spec,
                                  causal, softmax_scale, window, softcap, starts)
    from .backends.triton import decode
    tables = spec.tables(q.device)
    if sn:
        decode.append_launch(k, v, k_cache, v_cache, k_positions, cache_seqlens, tables,
                             spec.num_rotated)
    seqlens = (cache_seqlens + sn).to(torch.int32)
    return decode.attn_launch(q, k_cache, v_cache, positions, seqlens, max_keys, tables,
                              spec.num_rotated, causal, softmax_scale, window, softcap,
                              num_splits, cache_leftpad)


@_kvcache_op.register_fake
def _(q, k_cache, v_cache, k, v, cache_seqlens, positions, k_positions, max_keys, p, theta,
      variant, layout, causal, softmax_scale, window_left, window_right, softcap, num_splits,
      backend, cache_leftpad=None):
    b, sq, hq, _ = q.shape
    return torch.empty_like(q), q.new_empty((b, hq, sq), dtype=torch.float32)


def _reference_inplace(q, k_cache, v_cache, k, v, lens, qpos, kpos, spec, causal, scale, window,
                       softcap, starts):
    b, sq = q.shape[:2]
    sn = 0 if k is None else k.shape[1]
    if sn:
        kr = ref.apply_prope(k, kpos, spec)
        for i, c in enumerate(lens):
            k_cache[i, c:c + sn] = kr[i]
            v_cache[i, c:c + sn] = v[i]
    qr = ref.apply_prope(q, qpos, spec)
    outs, lses = [], []
    for i, (c, s0) in enumerate(zip(lens, starts)):
        o, l = attention_qk(qr[i:i + 1], k_cache[i:i + 1, s0:c + sn], v_cache[i:i + 1, s0:c + sn],
                            causal, scale, True, window, softcap)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs), torch.cat(lses)
