"""Validation of every public call, in one place: bad input raises a ValueError or TypeError that
names the argument and what was expected, before any kernel runs.

The rotation's arguments (head_dim, p, theta, variant, layout) are checked by constructing a
:class:`prope_kernels.rotary.PRoPESpec`; the backend choice by
:func:`prope_kernels.dispatch.plan` (attention) and :func:`prope_kernels.backends.registry.resolve`
(the rotation alone).
"""

from __future__ import annotations

import weakref

import torch

from .rotary import PRoPESpec


def check_attention(q, k, v, *, packed, p, theta, variant, layout, causal, softmax_scale,
                    return_lse, k_len_free=False):
    """The checks shared by the dense and varlen attention calls. Returns (spec, scale).
    k_len_free: k/v may have their own seqlen (dense) or total (packed, with cu_seqlens_k)."""
    check_qkv(q, k, v, packed=packed, k_len_free=k_len_free)
    spec = PRoPESpec(q.shape[-1], p, theta, variant, layout)
    check_bool("causal", causal)
    check_bool("return_lse", return_lse)
    return spec, check_scale(softmax_scale, q.shape[-1])


def check_deterministic(deterministic, needs: frozenset) -> frozenset:
    """``deterministic=True`` (flash-attn's name): the backward must be bitwise repeatable, so
    only backends with that feature run it (torch.use_deterministic_algorithms(True) asks the
    same of each backend's own kernels)."""
    check_bool("deterministic", deterministic)
    return needs | {"deterministic"} if deterministic else needs


def check_window_softcap(window, softcap, causal):
    """window=(left, right): ints >= -1 (-1 = unbounded); softcap: None/0 (off) or a positive
    finite float. Returns (window with the right side capped at 0 when causal, softcap as a
    float (0.0 = off), the features the call needs from a backend: a subset of
    {"window", "softcap"})."""
    if (not isinstance(window, (tuple, list)) or len(window) != 2
            or not all(isinstance(w, int) and not isinstance(w, bool) for w in window)):
        raise TypeError(f"window must be a (left, right) tuple of two ints (-1 = unbounded), "
                        f"got {window!r}")
    left, right = (int(w) for w in window)
    if left < -1 or right < -1:
        raise ValueError(f"window sides must be >= -1 (-1 = unbounded, 0 = only the query's own "
                         f"position on that side), got window={tuple(window)}")
    if causal:
        right = 0 if right < 0 else min(right, 0)   # flash-attn's convention
    if softcap is None:
        softcap = 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"softcap must be a float or None, got {type(softcap).__name__}")
    if not (softcap >= 0 and softcap != float("inf")):
        raise ValueError(f"softcap must be a positive finite float (0 or None = off), got "
                         f"{softcap}")
    return (left, right), float(softcap), features_needed((left, right), softcap, causal)


def features_needed(window, softcap, causal, deterministic=False) -> frozenset:
    """The optional features a call uses, as backend registry entries name them."""
    needs = {"deterministic"} if deterministic else set()
    if window[0] >= 0 or (window[1] >= 0 and not causal):  # (-1, 0) + causal is plain causal
        needs.add("window")
    if softcap:
        needs.add("softcap")
    return frozenset(needs)


def check_rope_input(x, positions, p, theta, variant, layout, conjugate):
    """apply_prope's checks. Returns the spec."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in (3, 4):
        raise ValueError("x must be (batch, seqlen, heads, head_dim) or (total, heads, head_dim), "
                         f"got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    spec = PRoPESpec(x.shape[-1], p, theta, variant, layout)
    check_bool("conjugate", conjugate)
    if positions is not None:
        lead = x.shape[:-2]
        check_positions(positions, [lead, lead[-1:]] if x.dim() == 4 else [lead], x.device)
    return spec


def check_tensor(name, x, ndim, what):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims {what}, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")


def check_qkv(q, k, v, packed: bool, k_len_free: bool = False):
    what = "(total_tokens, heads, head_dim)" if packed else "(batch, seqlen, heads, head_dim)"
    nd = 3 if packed else 4
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, x, nd, what)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got q={q.dtype}, k={k.dtype}, v={v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got q={q.device}, k={k.device}, "
                         f"v={v.device}")
    lead = q.shape[:-2]
    if k_len_free:   # seqlen_q != seqlen_k: dense calls still share the batch
        if not packed and (k.shape[0] != q.shape[0] or v.shape[0] != q.shape[0]):
            raise ValueError(f"q, k, v must agree in batch: q {tuple(q.shape)}, k "
                             f"{tuple(k.shape)}, v {tuple(v.shape)}")
    elif k.shape[:-2] != lead or v.shape[:-2] != lead:
        dims = "total_tokens" if packed else "(batch, seqlen)"
        raise ValueError(f"q, k, v must agree in {dims}: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    d = q.shape[-1]
    if k.shape[-1] != d:
        raise ValueError(f"q and k must have the same head_dim, got {d} and {k.shape[-1]}")
    if d % 2:
        raise ValueError(f"head_dim must be even for RoPE pairs, got head_dim={d}")
    hq, hkv = q.shape[-2], k.shape[-2]
    if hkv == 0 or hq % hkv:
        raise ValueError(f"q_heads ({hq}) must be a multiple of kv_heads ({hkv}) "
                         "(MHA, GQA or MQA)")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in head_dim (stride(-1) == 1), got "
                             f"strides {x.stride()}")


def check_scale(softmax_scale, d):
    if softmax_scale is None:
        return d ** -0.5
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"softmax_scale must be a float or None, got "
                        f"{type(softmax_scale).__name__}")
    if not (softmax_scale > 0 and softmax_scale != float("inf")):
        raise ValueError(f"softmax_scale must be a positive finite float, got {softmax_scale}")
    return float(softmax_scale)


def check_positions(positions, shapes, device, name="positions"):
    if not isinstance(positions, torch.Tensor):
        raise TypeError(f"{name} must be an integer torch.Tensor or None, got "
                        f"{type(positions).__name__}")
    if positions.dtype.is_floating_point or positions.dtype == torch.bool or positions.is_complex():
        raise TypeError(f"{name} must be an integer tensor, got {positions.dtype}")
    if positions.device != device:
        raise ValueError(f"{name} must be on the same device as q ({device}), got "
                         f"{positions.device}")
    if tuple(positions.shape) not in [tuple(s) for s in shapes]:
        raise ValueError(f"{name} must have shape " + " or ".join(str(tuple(s)) for s in shapes)
                         + f", got {tuple(positions.shape)}")


def check_bool(name, x):
    if not isinstance(x, bool):
        raise TypeError(f"{name} must be a bool, got {type(x).__name__}")


def check_cu_seqlens(cu_seqlens, total, device, max_seqlen, name="cu_seqlens",
                     max_name="max_seqlen", rows="q"):
    """The varlen call's ``cu_seqlens`` and ``max_seqlen``. Returns ``cu_seqlens[-1]`` (the rows
    inside sequences; rows past it, up to ``total``, are padding) as a host int, or None inside
    ``torch.compile``, where the value checks are skipped (they need a device->host copy)."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"{name} must be an int32/int64 torch.Tensor, got "
                        f"{type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{name} must be 1-D with num_seqs + 1 >= 2 entries, got shape "
                         f"{tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"{name} must be on the same device as q ({device}), got "
                         f"{cu_seqlens.device}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise TypeError(f"{max_name} must be a non-negative int, got {max_seqlen!r}")
    if torch.compiler.is_compiling():
        return None  # value checks need a host sync; the op checks CPU tensors when it runs
    return check_cu_values(cu_seqlens, total, max_seqlen, padding=True, name=name,
                           max_name=max_name, rows=rows)


def check_cu_values(cu_seqlens, total, max_seqlen, padding, name="cu_seqlens",
                    max_name="max_seqlen", rows="q"):
    """The value checks of ``cu_seqlens`` (int tensor, any device) against ``total`` rows and
    ``max_seqlen``: starts at 0, non-decreasing, ``cu_seqlens[-1] <= total`` (``== total`` when
    not ``padding``), every length <= ``max_seqlen``. Returns ``cu_seqlens[-1]``.

    Costs a device->host copy of ``cu_seqlens`` (a sync for a CUDA tensor), once per unmodified
    tensor: the result is cached (a model calls the op once per layer with one cu_seqlens)."""
    key = id(cu_seqlens)
    seen = CU_CHECKED.get(key)
    if (seen is not None and seen[0]() is cu_seqlens
            and seen[1:4] == (cu_seqlens._version, total, max_seqlen)
            and (padding or seen[4] == total)):
        return seen[4]  # same tensor, unmodified, already checked (e.g. by the previous layer)
    cu = cu_seqlens.detach().to("cpu", torch.int64)
    if cu[0].item() != 0:
        raise ValueError(f"{name} must start at 0, got {cu[0].item()}")
    lens = cu[1:] - cu[:-1]
    if (lens < 0).any():
        raise ValueError(f"{name} must be non-decreasing, got {cu.tolist()[:16]}...")
    end = cu[-1].item()
    if end > total:
        raise ValueError(f"{name}[-1] ({end}) exceeds the number of tokens in {rows} ({total})")
    if end != total and not padding:
        raise ValueError(
            f"{name}[-1] ({end}) must equal the number of tokens in {rows} ({total}) here: rows "
            f"past cu_seqlens[-1] (padding) are taken by eager prope_attention_varlen calls only; "
            f"inside torch.compile pass q[:cu_seqlens[-1]] (and k, v, positions likewise)")
    longest = lens.max().item()
    if longest > max_seqlen:
        raise ValueError(f"{max_name} ({max_seqlen}) is smaller than the longest sequence in "
                         f"{name} ({longest}); the kernels size their grids by max_seqlen "
                         f"and would leave the rows past it unwritten")
    if len(CU_CHECKED) > 64:
        CU_CHECKED.clear()
    CU_CHECKED[key] = (weakref.ref(cu_seqlens), cu_seqlens._version, total, max_seqlen, end)
    return end


# cu_seqlens tensors whose values were checked: id -> (weakref, version, total, max_seqlen,
# cu_seqlens[-1]). The value checks cost a device->host copy; a model calls the op once per layer
# with the same cu_seqlens, so only the first call pays it.
CU_CHECKED: dict = {}
