"""flash-attn-shaped entry points: ``flash_attn_func`` and ``flash_attn_varlen_func``.

Code written against flash-attn's functions can call these with the same leading arguments, in
the same order, with the same defaults (``causal=False``!), and add the rotation as keyword-only
arguments::

    from prope_kernels import flash_attn_func
    out = flash_attn_func(q, k, v, causal=True, p=0.75)              # p-RoPE fused in
    out = flash_attn_func(q, k, v, 0.0, None, True, (255, 0), p=1.0)  # positional, as flash-attn

Differences from flash-attn, all explicit:

* ``p`` (the rotated fraction of the frequency pairs) has **no default**: the call rotates q and
  k inside the kernel, so a caller must say how much (``p=0`` is plain attention, no rotation;
  ``p=1`` is RoPE). Code that already rotated q and k itself passes ``p=0``.
* Features the kernels do not have raise a ``ValueError`` naming the argument: ``dropout_p``
  other than 0, ``alibi_slopes``, ``return_attn_probs=True`` (use :func:`prope_attention` with
  ``return_lse=True`` for the log-sum-exp, in flash-attn's lse layout), ``block_table``
  (paged KV cache).
* The varlen call takes keys of their own lengths (``cu_seqlens_k`` != ``cu_seqlens_q``), with
  flash-attn's bottom-right alignment of the masks; the keys' positions are ``k_positions``
  (keyword-only; default 0..Lk-1 in each sequence, q at the last Lq of them).
* ``softcap=0.0`` is off, as in flash-attn; ``window_size=(-1, -1)`` is unbounded, with the
  right side capped at 0 when causal (flash-attn's convention, see :func:`prope_attention`).

Tensor layout: q is ``(batch, seqlen, heads, head_dim)`` and k, v ``(batch, seqlen, kv_heads,
head_dim)``, like flash-attn; **not** PyTorch SDPA's ``(batch, heads, seqlen, head_dim)``. An SDPA
tensor with as many key/value heads as query heads has a valid shape in either reading, so it
cannot be detected: it runs with heads and positions swapped (the mask, the rotation and the
softmax over the wrong axis). Transpose with ``q.transpose(1, 2)`` (and back for the output), or
use :class:`prope_kernels.nn.PRoPEAttention` with ``qkv_layout="bhsd"``. Where the shapes do give
it away (GQA: k's dim 1 differs from q's but its dim 2 matches), the error says so.
"""

from __future__ import annotations

from typing import Optional

import torch

from .interface import prope_attention, prope_attention_varlen

__all__ = ["flash_attn_func", "flash_attn_varlen_func"]


def _refuse_unsupported(dropout_p, alibi_slopes, return_attn_probs, fn):
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"{fn}: dropout_p must be a float, got {type(dropout_p).__name__}")
    if dropout_p != 0:
        raise ValueError(f"{fn}: dropout_p={dropout_p} is not supported (the kernels have no "
                         "attention dropout); pass dropout_p=0.0")
    if alibi_slopes is not None:
        raise ValueError(f"{fn}: alibi_slopes is not supported (the position signal is p-RoPE); "
                         "pass alibi_slopes=None")
    if not isinstance(return_attn_probs, bool):
        raise TypeError(f"{fn}: return_attn_probs must be a bool, got "
                        f"{type(return_attn_probs).__name__}")
    if return_attn_probs:
        raise ValueError(f"{fn}: return_attn_probs=True is not supported (no attention "
                         "probabilities are materialised); for the log-sum-exp call "
                         "prope_attention / prope_attention_varlen with return_lse=True (the same "
                         "lse layout as flash-attn's)")


def _softcap(softcap, fn):
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"{fn}: softcap must be a float (0.0 = off), got "
                        f"{type(softcap).__name__}")
    return softcap


def _window(window_size, fn):
    if isinstance(window_size, list):
        window_size = tuple(window_size)
    if (not isinstance(window_size, tuple) or len(window_size) != 2
            or not all(isinstance(w, int) and not isinstance(w, bool) for w in window_size)):
        raise TypeError(f"{fn}: window_size must be a (left, right) tuple of two ints "
                        f"(-1 = unbounded), got {window_size!r}")
    return window_size


def check_bshd(q, k, fn):
    """Dense calls: raise a ValueError that names the layout when q and k look like PyTorch SDPA's
    (batch, heads, seqlen, head_dim) tensors. It only fires on shapes the op would refuse anyway
    (q and k disagree in dim 1, the seqlen of the (batch, seqlen, heads, head_dim) layout), so no
    valid call is rejected; an SDPA tensor with as many kv heads as q heads is not detectable."""
    if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor)
            and q.dim() == 4 and k.dim() == 4):
        return
    if q.shape[0] == k.shape[0] and q.shape[1] != k.shape[1] and q.shape[2] == k.shape[2] \
            and q.shape[3] == k.shape[3] and k.shape[1] > 0 and q.shape[1] % k.shape[1] == 0:
        raise ValueError(
            f"{fn}: q {tuple(q.shape)} and k {tuple(k.shape)} look like (batch, heads, seqlen, "
            f"head_dim) tensors (PyTorch SDPA's layout: dim 1 differs as q_heads/kv_heads would, "
            f"dim 2 agrees); the layout here is (batch, seqlen, heads, head_dim): pass "
            f"q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2) and transpose the output "
            f"back, or use prope_kernels.nn.PRoPEAttention(qkv_layout='bhsd')")


def flash_attn_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                    softmax_scale: Optional[float] = None, causal: bool = False,
                    window_size: tuple = (-1, -1), softcap: float = 0.0, alibi_slopes=None,
                    deterministic: bool = False, return_attn_probs: bool = False, *,
                    p: float, theta: float = 10000.0, variant: str = "prope",
                    layout: str = "half", positions: Optional[torch.Tensor] = None,
                    backend: str = "auto") -> torch.Tensor:
    """Attention with p-RoPE fused in, called like flash-attn's ``flash_attn_func``.

    Args (flash-attn's, same order and defaults):
        q: (batch, seqlen, q_heads, head_dim); k, v: (batch, seqlen, kv_heads, head_dim), with
            q_heads a multiple of kv_heads. NOT (batch, heads, seqlen, head_dim): see the module
            docstring (:mod:`prope_kernels.flash_api`).
        dropout_p: must be 0.0 (ValueError otherwise).
        softmax_scale: default head_dim ** -0.5.
        causal: default **False**, as in flash-attn (:func:`prope_attention` defaults to True).
        window_size: (left, right) sliding window, -1 = unbounded.
        softcap: logit soft-capping, 0.0 = off.
        alibi_slopes: must be None.
        deterministic: a bitwise repeatable backward (backends without one are refused).
        return_attn_probs: must be False; the call returns ``out`` alone.

    Keyword-only (the rotation, as in :func:`prope_attention`):
        p: rotated fraction of the head_dim/2 frequency pairs, in [0, 1]; required (0 = no
            rotation, 1 = RoPE).
        theta, variant, layout: the rotation's base, which pairs rotate ("prope", "reversed",
            "partial") and how dims pair up ("half" or "interleaved").
        positions: (seqlen,) or (batch, seqlen) integers; default 0..seqlen-1.
        backend: "auto", "triton", "cuda", "sdpa" or "reference".

    Returns:
        out: (batch, seqlen, q_heads, head_dim), q's dtype.
    """
    fn = "flash_attn_func"
    _refuse_unsupported(dropout_p, alibi_slopes, return_attn_probs, fn)
    check_bshd(q, k, fn)
    return prope_attention(q, k, v, p=p, theta=theta, variant=variant, layout=layout,
                           causal=causal, softmax_scale=softmax_scale, positions=positions,
                           backend=backend, window=_window(window_size, fn),
                           softcap=_softcap(softcap, fn), deterministic=deterministic)


def flash_attn_varlen_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                           max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0,
                           softmax_scale: Optional[float] = None, causal: bool = False,
                           window_size: tuple = (-1, -1), softcap: float = 0.0,
                           alibi_slopes=None, deterministic: bool = False,
                           return_attn_probs: bool = False, block_table=None, *, p: float,
                           theta: float = 10000.0, variant: str = "prope", layout: str = "half",
                           positions: Optional[torch.Tensor] = None,
                           backend: str = "auto",
                           k_positions: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Packed sequences with p-RoPE fused in, called like flash-attn's
    ``flash_attn_varlen_func``.

    q: (total_q, q_heads, head_dim); k, v: (total_k, kv_heads, head_dim). Sequence i is q rows
    ``cu_seqlens_q[i]:cu_seqlens_q[i+1]`` over k rows ``cu_seqlens_k[i]:cu_seqlens_k[i+1]``;
    when the lengths differ the masks align bottom-right (flash-attn's convention; see
    :func:`prope_attention_varlen`, ``cu_seqlens_k``), and only the triton and reference
    backends run the call. With ``cu_seqlens_k`` equal to ``cu_seqlens_q`` (the same tensor, or
    an equal one) and ``max_seqlen_k == max_seqlen_q`` it is self-attention over the same tokens,
    as before. ``block_table`` (a paged KV cache), ``dropout_p != 0``, ``alibi_slopes`` and
    ``return_attn_probs=True`` raise a ValueError. The other arguments and the keyword-only rotation (``p``
    required, ``positions`` (total,), default restarting at 0 in each sequence) are those of
    :func:`flash_attn_func`; see :func:`prope_attention_varlen` for cu_seqlens' contract
    (eager calls check its values; rows past ``cu_seqlens[-1]`` are padding).

    Returns out: (total, q_heads, head_dim).
    """
    fn = "flash_attn_varlen_func"
    _refuse_unsupported(dropout_p, alibi_slopes, return_attn_probs, fn)
    if block_table is not None:
        raise ValueError(f"{fn}: block_table (a paged KV cache) is not supported; pass "
                         "block_table=None")
    if isinstance(max_seqlen_q, bool) or not isinstance(max_seqlen_q, int):
        raise TypeError(f"{fn}: max_seqlen_q must be an int, got {max_seqlen_q!r}")
    if isinstance(max_seqlen_k, bool) or not isinstance(max_seqlen_k, int):
        raise TypeError(f"{fn}: max_seqlen_k must be an int, got {max_seqlen_k!r}")
    same = cu_seqlens_k is cu_seqlens_q
    if not same and max_seqlen_k == max_seqlen_q:
        same = (isinstance(cu_seqlens_k, torch.Tensor) and isinstance(cu_seqlens_q, torch.Tensor)
                and cu_seqlens_k.shape == cu_seqlens_q.shape
                and cu_seqlens_k.device == cu_seqlens_q.device)
        if same and not torch.compiler.is_compiling():
            # eager: compare the values (a device->host sync on CUDA; pass the same tensor twice
            # to skip it). Inside torch.compile equal shapes are the caller's contract.
            same = bool(torch.equal(cu_seqlens_k, cu_seqlens_q))
    if not same or max_seqlen_k != max_seqlen_q or k_positions is not None:
        # keys of their own lengths (or positions): bottom-right aligned masks
        return prope_attention_varlen(
            q, k, v, cu_seqlens_q, max_seqlen_q, p=p, theta=theta, variant=variant,
            layout=layout, causal=causal, softmax_scale=softmax_scale, positions=positions,
            backend=backend, window=_window(window_size, fn), softcap=_softcap(softcap, fn),
            deterministic=deterministic, cu_seqlens_k=cu_seqlens_k, max_seqlen_k=max_seqlen_k,
            k_positions=k_positions)
    return prope_attention_varlen(q, k, v, cu_seqlens_q, max_seqlen_q, p=p, theta=theta,
                                  variant=variant, layout=layout, causal=causal,
                                  softmax_scale=softmax_scale, positions=positions,
                                  backend=backend, window=_window(window_size, fn),
                                  softcap=_softcap(softcap, fn), deterministic=deterministic)
