"""Public API: fused p-RoPE attention, varlen, and the rotation alone.

Path from kernel to user (one per backend)::

    kernel (prope_kernels/triton/*.py, csrc/)         -> backend module: attn_fwd / attn_bwd / rope
    torch.library custom ops  prope_kernels::attn_fwd / attn_bwd / rope   (+ fake impls, autograd)
    prope_attention / prope_attention_varlen / apply_prope   (validation, layout, dispatch)

Every backend sees the packed layout: q (total, q_heads, d), k/v (total, kv_heads, d), int32
``cu_seqlens`` (num_seqs + 1,) and int64 ``positions`` (total,). A dense (batch, seqlen, ...) call is
packed by a free view. ``lse`` is (q_heads, total) float32, natural log.

A backend module provides::

    attn_fwd(q, k, v, cu_seqlens, positions, max_seqlen, spec, causal, scale, window, softcap)
        -> (out, lse)
    attn_bwd(dout, q, k, v, out, lse, dlse_or_None, cu_seqlens, positions, max_seqlen, spec,
             causal, scale, window, softcap) -> (dq, dk, dv)
    rope(x, positions, spec, conjugate) -> rotated x (x: (total, heads, d))

``window`` is a (left, right) pair of ints as normalized by :func:`_check_window` (-1 unbounded;
right already capped at 0 when causal); ``softcap`` a float, 0.0 = off.
"""

from __future__ import annotations

import os
import weakref
from typing import Optional

import torch

from . import reference as ref
from .rotary import PRoPESpec, validate_rotary_args

BACKENDS = ("auto", "triton", "cuda", "reference")
_KERNEL_DTYPES = (torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# backend selection
# ----------------------------------------------------------------------------------------------

def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def cuda_ext_available() -> bool:
    from . import cuda as cuda_backend
    return cuda_backend.available()


def _backend_module(name: str):
    if name == "triton":
        from .triton import ops as m
    elif name == "cuda":
        from . import cuda as m
    else:  # pragma: no cover - guarded by _resolve_backend
        raise ValueError(f"unknown kernel backend {name!r}")
    return m


def supported_head_dim(backend: str, head_dim: int) -> bool:
    if backend == "triton":
        return head_dim % 2 == 0 and (head_dim <= 256 or head_dim == 512)
    if backend == "cuda":
        return head_dim in (64, 128, 256)
    return head_dim % 2 == 0


# Attention features each kernel backend implements (the reference implements all of them).
# "auto" skips a backend that lacks a feature the call uses; naming it explicitly raises.
FEATURES = {"triton": frozenset({"window", "softcap"}), "cuda": frozenset()}


def _features(window=(-1, -1), softcap=0.0, causal=False) -> frozenset:
    """The optional features a call uses (window: normalized by _check_window)."""
    used = set()
    if window[0] >= 0 or (window[1] >= 0 and not causal):  # (-1, 0) with causal is plain causal
        used.add("window")
    if softcap:
        used.add("softcap")
    return frozenset(used)


def _resolve_backend(backend: str, x: torch.Tensor, features: frozenset = frozenset()) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    on_gpu = x.device.type == "cuda"
    if backend == "auto":
        if on_gpu and x.dtype in _KERNEL_DTYPES:
            if cuda_ext_available() and _usable("cuda", x, features):
                from . import cuda as cuda_backend
                if cuda_backend.preferred_over_triton(x):
                    return "cuda"
            if triton_available() and _usable("triton", x, features):
                return "triton"
        return "reference"
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend='triton' needs the triton package; pip install triton, "
                             "or use backend='reference'")
        if not on_gpu and not _interpreting():
            raise ValueError(f"backend='triton' needs CUDA tensors, got tensors on {x.device} "
                             "(set TRITON_INTERPRET=1 to run the kernels on the CPU, slowly, or "
                             "use backend='reference')")
    if backend == "cuda":
        if not on_gpu:
            raise ValueError(f"backend='cuda' needs CUDA tensors, got tensors on {x.device}; "
                             "use backend='reference' on the CPU")
        if not cuda_ext_available():
            raise ValueError("backend='cuda' needs the compiled extension prope_kernels._C, which "
                             "is not built; reinstall with a CUDA toolkit "
                             "(PROPE_FORCE_CUDA_BUILD=1 pip install .) or use backend='triton'")
    if backend in ("triton", "cuda"):
        if x.dtype not in _KERNEL_DTYPES:
            raise TypeError(f"backend={backend!r} supports float16 and bfloat16 q/k/v, got "
                            f"{x.dtype}; cast the inputs or use backend='reference'")
        if not supported_head_dim(backend, x.shape[-1]):
            what = ("an even head_dim <= 256, or 512" if backend == "triton"
                    else "head_dim 64, 128 or 256")
            raise ValueError(f"backend={backend!r} supports {what}; got head_dim={x.shape[-1]}")
        _check_features(backend, features)
    return backend


def _usable(backend: str, x: torch.Tensor, features: frozenset) -> bool:
    """Whether "auto" may pick this kernel backend for x (head_dim) and the features used."""
    return supported_head_dim(backend, x.shape[-1]) and features <= FEATURES[backend]


def _check_features(backend: str, features: frozenset) -> None:
    missing = sorted(features - FEATURES[backend])
    if missing:
        names = {"window": "window (sliding-window attention)",
                 "softcap": "softcap (logit softcapping)"}
        others = [b for b in FEATURES if b != backend and features <= FEATURES[b]]
        raise ValueError(f"backend={backend!r} does not implement "
                         + " or ".join(names[m] for m in missing) + "; use "
                         + ", ".join(f"backend={b!r}" for b in others + ["reference", "auto"]))


# ----------------------------------------------------------------------------------------------
# custom ops (torch.compile sees them as opaque nodes with fake impls; autograd via fwd/bwd ops)
# ----------------------------------------------------------------------------------------------

def _spec(d, p, theta, variant, layout) -> PRoPESpec:
    return PRoPESpec(d, float(p), float(theta), variant, layout)


@torch.library.custom_op("prope_kernels::attn_fwd", mutates_args=())
def _attn_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                 positions: torch.Tensor, max_seqlen: int, p: float, theta: float, variant: str,
                 layout: str, causal: bool, softmax_scale: float, window_left: int,
                 window_right: int, softcap: float, backend: str
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    spec = _spec(q.shape[-1], p, theta, variant, layout)
    return _backend_module(backend).attn_fwd(q, k, v, cu_seqlens, positions, max_seqlen, spec,
                                             causal, softmax_scale, (window_left, window_right),
                                             softcap)


@_attn_fwd_op.register_fake
def _(q, k, v, cu_seqlens, positions, max_seqlen, p, theta, variant, layout, causal,
      softmax_scale, window_left, window_right, softcap, backend):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("prope_kernels::attn_bwd", mutates_args=())
def _attn_bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 out: torch.Tensor, lse: torch.Tensor, dlse: Optional[torch.Tensor],
                 cu_seqlens: torch.Tensor, positions: torch.Tensor, max_seqlen: int, p: float,
                 theta: float, variant: str, layout: str, causal: bool, softmax_scale: float,
                 window_left: int, window_right: int, softcap: float, backend: str
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    spec = _spec(q.shape[-1], p, theta, variant, layout)
    return _backend_module(backend).attn_bwd(dout, q, k, v, out, lse, dlse, cu_seqlens, positions,
                                             max_seqlen, spec, causal, softmax_scale,
                                             (window_left, window_right), softcap)


@_attn_bwd_op.register_fake
def _(dout, q, k, v, out, lse, dlse, cu_seqlens, positions, max_seqlen, p, theta, variant, layout,
      causal, softmax_scale, window_left, window_right, softcap, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _attn_setup_context(ctx, inputs, output):
    q, k, v, cu, pos, max_seqlen, *args = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu, pos)  # no rotated copies are kept
    ctx.args = (max_seqlen, *args)  # p, theta, variant, layout, causal, scale, window, softcap,
    #                                 backend


def _attn_backward(ctx, dout, dlse):
    q, k, v, out, lse, cu, pos = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = _attn_bwd_op(dout.contiguous(), q, k, v, out, lse, dlse, cu, pos, *ctx.args)
    return (dq, dk, dv) + (None,) * 13


_attn_fwd_op.register_autograd(_attn_backward, setup_context=_attn_setup_context)


@torch.library.custom_op("prope_kernels::rope", mutates_args=())
def _rope_op(x: torch.Tensor, positions: torch.Tensor, p: float, theta: float, variant: str,
             layout: str, conjugate: bool, backend: str) -> torch.Tensor:
    spec = _spec(x.shape[-1], p, theta, variant, layout)
    return _backend_module(backend).rope(x, positions, spec, conjugate)


@_rope_op.register_fake
def _(x, positions, p, theta, variant, layout, conjugate, backend):
    return torch.empty_like(x)


def _rope_setup_context(ctx, inputs, output):
    x, positions, p, theta, variant, layout, conjugate, backend = inputs
    ctx.save_for_backward(positions)
    ctx.args = (p, theta, variant, layout, not conjugate, backend)


def _rope_backward(ctx, grad):
    (positions,) = ctx.saved_tensors
    # The gradient of a rotation is the opposite rotation.
    return _rope_op(grad.contiguous(), positions, *ctx.args), None, None, None, None, None, None, None


_rope_op.register_autograd(_rope_backward, setup_context=_rope_setup_context)


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------

def _check_tensor(name, x, ndim, what):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims {what}, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")


def _check_qkv(q, k, v, packed: bool):
    what = "(total_tokens, heads, head_dim)" if packed else "(batch, seqlen, heads, head_dim)"
    nd = 3 if packed else 4
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, x, nd, what)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got q={q.dtype}, k={k.dtype}, v={v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got q={q.device}, k={k.device}, "
                         f"v={v.device}")
    lead = q.shape[:-2]
    if k.shape[:-2] != lead or v.shape[:-2] != lead:
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


def _check_scale(softmax_scale, d):
    if softmax_scale is None:
        return d ** -0.5
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"softmax_scale must be a float or None, got "
                        f"{type(softmax_scale).__name__}")
    if not (softmax_scale > 0 and softmax_scale != float("inf")):
        raise ValueError(f"softmax_scale must be a positive finite float, got {softmax_scale}")
    return float(softmax_scale)


def _check_positions(positions, shapes, device, name="positions"):
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


def _check_window(window, causal: bool) -> tuple:
    """window=(left, right): ints >= -1 (-1 = unbounded); returns the pair with the right side
    capped at 0 when causal (flash-attn's convention)."""
    if (not isinstance(window, (tuple, list)) or len(window) != 2
            or not all(isinstance(w, int) and not isinstance(w, bool) for w in window)):
        raise TypeError(f"window must be a (left, right) tuple of two ints (-1 = unbounded), "
                        f"got {window!r}")
    left, right = window
    if left < -1 or right < -1:
        raise ValueError(f"window sides must be >= -1 (-1 = unbounded, 0 = only the query's own "
                         f"position on that side), got window={tuple(window)}")
    if causal:
        right = 0 if right < 0 else min(right, 0)
    return int(left), int(right)


def _check_softcap(softcap) -> float:
    """softcap: None or 0 (off), or a positive finite float."""
    if softcap is None:
        return 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"softcap must be a float or None, got {type(softcap).__name__}")
    if not (softcap >= 0 and softcap != float("inf")):
        raise ValueError(f"softcap must be a positive finite float (0 or None = off), got "
                         f"{softcap}")
    return float(softcap)


def _check_bool(name, x):
    if not isinstance(x, bool):
        raise TypeError(f"{name} must be a bool, got {type(x).__name__}")


def _check_cu_seqlens(cu_seqlens, total, device, max_seqlen):
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be an int32/int64 torch.Tensor, got "
                        f"{type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with num_seqs + 1 >= 2 entries, got shape "
                         f"{tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens must be on the same device as q ({device}), got "
                         f"{cu_seqlens.device}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise TypeError(f"max_seqlen must be a non-negative int, got {max_seqlen!r}")
    if torch.compiler.is_compiling():
        return  # value checks need a host sync; the eager path has made them
    key = id(cu_seqlens)
    seen = _CU_CHECKED.get(key)
    if (seen is not None and seen[0]() is cu_seqlens
            and seen[1:] == (cu_seqlens._version, total, max_seqlen)):
        return  # same tensor, unmodified, already checked (e.g. by the previous layer)
    cu = cu_seqlens.detach().to("cpu", torch.int64)
    if cu[0].item() != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {cu[0].item()}")
    lens = cu[1:] - cu[:-1]
    if (lens < 0).any():
        raise ValueError(f"cu_seqlens must be non-decreasing, got {cu.tolist()[:16]}...")
    if cu[-1].item() != total:
        raise ValueError(f"cu_seqlens[-1] ({cu[-1].item()}) must equal the number of tokens in "
                         f"q ({total})")
    if lens.max().item() > max_seqlen:
        raise ValueError(f"max_seqlen ({max_seqlen}) is smaller than the longest sequence in "
                         f"cu_seqlens ({lens.max().item()})")
    if len(_CU_CHECKED) > 64:
        _CU_CHECKED.clear()
    _CU_CHECKED[key] = (weakref.ref(cu_seqlens), cu_seqlens._version, total, max_seqlen)


# cu_seqlens tensors whose values were checked: id -> (weakref, version, total, max_seqlen).
# The value checks cost a device->host copy; a model calls the op once per layer with the same
# cu_seqlens, so only the first call pays it.
_CU_CHECKED: dict = {}


# ----------------------------------------------------------------------------------------------
# public functions
# ----------------------------------------------------------------------------------------------

def prope_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, p: float = 0.75,
                    theta: float = 10000.0, variant: str = "prope", layout: str = "half",
                    causal: bool = True, softmax_scale: Optional[float] = None,
                    positions: Optional[torch.Tensor] = None, backend: str = "auto",
                    return_lse: bool = False, window: tuple = (-1, -1),
                    softcap: Optional[float] = None):
    """Attention with p-RoPE applied to q and k inside the kernel.

    Args:
        q: (batch, seqlen, q_heads, head_dim), float16/bfloat16 for the kernels.
        k, v: (batch, seqlen, kv_heads, head_dim); q_heads % kv_heads == 0 (MHA, GQA, MQA:
            k/v are never expanded in memory).
        p: fraction of the d/2 frequency pairs that rotate, in [0, 1] (0: NoPE, 1: RoPE).
        theta: RoPE base.
        variant: "prope" (fastest pairs rotate), "reversed" (slowest pairs rotate) or
            "partial" (NeoX rotary_pct: a prefix of 2r dims with frequencies recomputed over it).
        layout: "half" (pair k = dims (k, k + d/2), Llama/Gemma) or "interleaved" (2k, 2k+1).
        causal: causal mask (query i attends to keys j <= i).
        softmax_scale: defaults to head_dim ** -0.5.
        positions: integer (seqlen,) or (batch, seqlen); default 0..seqlen-1.
        backend: "auto", "triton", "cuda" or "reference" (pure PyTorch, any device).
        return_lse: also return the log-sum-exp (batch, q_heads, seqlen), float32.
        window: (left, right) sliding window, flash-attn's ``window_size`` convention: query i
            sees key j iff ``i - left <= j <= i + right`` (i, j: indices in the sequence, not
            ``positions``); -1 = unbounded on that side; with ``causal`` the right side is
            capped at 0. (-1, -1) = full attention. Every query sees at least its own key.
            A transformers ``sliding_window=W`` (Gemma 2/3: key j visible iff i - j < W) is
            ``window=(W - 1, 0)`` with causal. The kernels skip key blocks outside the window.
        softcap: Gemma 2's logit softcapping: the scaled scores s = q.k * softmax_scale become
            ``softcap * tanh(s / softcap)`` before the mask and softmax (Gemma 2: 50.0);
            None or 0 = off. The returned lse is over the capped scores.

    Returns:
        out (batch, seqlen, q_heads, head_dim) like q, and lse when ``return_lse``.
    """
    _check_qkv(q, k, v, packed=False)
    validate_rotary_args(q.shape[-1], p, theta, variant, layout)
    _check_bool("causal", causal)
    _check_bool("return_lse", return_lse)
    scale = _check_scale(softmax_scale, q.shape[-1])
    window = _check_window(window, causal)
    softcap = _check_softcap(softcap)
    b, s = q.shape[:2]
    if positions is not None:
        _check_positions(positions, [(s,), (b, s)], q.device)
    backend = _resolve_backend(backend, q, _features(window, softcap, causal))
    spec = PRoPESpec(q.shape[-1], float(p), float(theta), variant, layout)

    if backend == "reference":
        out, lse = _reference_dense(q, k, v, spec, causal, scale, positions, window, softcap)
        return (out, lse) if return_lse else out

    if positions is None:
        pos = torch.arange(s, device=q.device, dtype=torch.int64).repeat(b)
    else:
        pos = positions.to(torch.int64).expand(b, s).reshape(b * s)
    cu = torch.arange(0, (b + 1) * s, s, device=q.device, dtype=torch.int32)
    qf, kf, vf = (x.reshape(b * s, x.shape[2], x.shape[3]) for x in (q, k, v))
    out, lse = _attn_fwd_op(qf, kf, vf, cu, pos, s, float(p), float(theta), variant, layout,
                            causal, scale, *window, softcap, backend)
    out = out.view(b, s, q.shape[2], q.shape[3])
    if return_lse:
        return out, lse.view(q.shape[2], b, s).transpose(0, 1)
    return out


def prope_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           cu_seqlens: torch.Tensor, max_seqlen: int, *, p: float = 0.75,
                           theta: float = 10000.0, variant: str = "prope", layout: str = "half",
                           causal: bool = True, softmax_scale: Optional[float] = None,
                           positions: Optional[torch.Tensor] = None, backend: str = "auto",
                           return_lse: bool = False, window: tuple = (-1, -1),
                           softcap: Optional[float] = None):
    """Packed sequences: q (total, q_heads, d), k/v (total, kv_heads, d).

    Sequence i is tokens ``cu_seqlens[i]:cu_seqlens[i+1]`` (int32/int64, starts at 0, non-decreasing,
    ends at total) and attends only within itself. ``max_seqlen`` bounds the longest sequence
    (the kernels size their grids by it). Eager calls check these values (once per unmodified
    ``cu_seqlens`` tensor); inside ``torch.compile`` the check would need a host sync and is
    skipped, so there they are the caller's contract, as in flash-attn's varlen API.
    positions: (total,) integers; default restarts at 0 in each sequence.
    window, softcap: as in :func:`prope_attention`; the window is over indices inside each
    sequence (it never crosses a sequence boundary).
    Returns out (total, q_heads, d), and lse (q_heads, total) when ``return_lse``.
    """
    _check_qkv(q, k, v, packed=True)
    validate_rotary_args(q.shape[-1], p, theta, variant, layout)
    _check_bool("causal", causal)
    _check_bool("return_lse", return_lse)
    scale = _check_scale(softmax_scale, q.shape[-1])
    window = _check_window(window, causal)
    softcap = _check_softcap(softcap)
    total = q.shape[0]
    _check_cu_seqlens(cu_seqlens, total, q.device, max_seqlen)
    if positions is not None:
        _check_positions(positions, [(total,)], q.device)
    backend = _resolve_backend(backend, q, _features(window, softcap, causal))
    spec = PRoPESpec(q.shape[-1], float(p), float(theta), variant, layout)

    if backend == "reference":
        out, lse = _reference_varlen(q, k, v, cu_seqlens, spec, causal, scale, positions, window,
                                     softcap)
        return (out, lse) if return_lse else out

    if positions is None:
        pos = ref.varlen_positions(cu_seqlens, total)
    else:
        pos = positions.to(torch.int64)
    out, lse = _attn_fwd_op(q, k, v, cu_seqlens.to(torch.int32), pos, int(max_seqlen), float(p),
                            float(theta), variant, layout, causal, scale, *window, softcap,
                            backend)
    return (out, lse) if return_lse else out


def apply_prope(x: torch.Tensor, positions: Optional[torch.Tensor] = None, *, p: float = 0.75,
                theta: float = 10000.0, variant: str = "prope", layout: str = "half",
                conjugate: bool = False, backend: str = "auto") -> torch.Tensor:
    """The p-RoPE rotation alone (differentiable).

    x: (batch, seqlen, heads, d) with positions (seqlen,) or (batch, seqlen), or packed
    (total, heads, d) with positions (total,); default positions 0..seqlen-1 (0..total-1 packed).
    conjugate: rotate by -angle (the inverse rotation).
    Only the rotated dims are multiplied; identity dims are copied.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in (3, 4):
        raise ValueError("x must be (batch, seqlen, heads, head_dim) or (total, heads, head_dim), "
                         f"got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    validate_rotary_args(x.shape[-1], p, theta, variant, layout)
    _check_bool("conjugate", conjugate)
    lead = x.shape[:-2]
    if positions is not None:
        shapes = [lead, lead[-1:]] if x.dim() == 4 else [lead]
        _check_positions(positions, shapes, x.device)
    else:
        positions = torch.arange(lead[-1], device=x.device)
    if x.stride(-1) != 1:
        x = x.contiguous()
    backend = _resolve_backend(backend, x)
    spec = PRoPESpec(x.shape[-1], float(p), float(theta), variant, layout)
    if backend == "reference":
        return ref.apply_prope(x, positions, spec, conjugate)
    pos = positions.to(torch.int64).expand(lead).reshape(-1)
    xf = x.reshape(-1, x.shape[-2], x.shape[-1])
    y = _rope_op(xf, pos, float(p), float(theta), variant, layout, conjugate, backend)
    return y.view(x.shape)


# ----------------------------------------------------------------------------------------------
# reference backend: fp32 (or fp64) math, output cast back to the input dtype
# ----------------------------------------------------------------------------------------------

def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _reference_dense(q, k, v, spec, causal, scale, positions, window=(-1, -1), softcap=0.0):
    cd = _compute_dtype(q.dtype)
    out, lse = ref.prope_attention(q.to(cd), k.to(cd), v.to(cd), spec, causal, scale, positions,
                                   return_lse=True, window=window, softcap=softcap)
    return out.to(q.dtype), lse.float()


def _reference_varlen(q, k, v, cu_seqlens, spec, causal, scale, positions, window=(-1, -1),
                      softcap=0.0):
    cd = _compute_dtype(q.dtype)
    out, lse = ref.prope_attention_varlen(q.to(cd), k.to(cd), v.to(cd), cu_seqlens, spec, causal,
                                          scale, positions, return_lse=True, window=window,
                                          softcap=softcap)
    return out.to(q.dtype), lse.float()
