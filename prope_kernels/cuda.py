"""CUDA C++ backend (csrc/): thin Python side of the compiled extension ``prope_kernels._C``.

Provides the backend contract of :mod:`prope_kernels.interface` (attn_fwd, attn_bwd, rope).
"""

from __future__ import annotations

import torch


def _load():
    try:
        from . import _C  # noqa: F401  (registers torch.ops.prope_cuda.*)
    except ImportError:
        return False
    return True


_AVAILABLE = None


def available() -> bool:
    """True when the extension is built and a CUDA device is present."""
    global _AVAILABLE
    if _AVAILABLE is None:
        _AVAILABLE = _load()
    return _AVAILABLE and torch.cuda.is_available()


def preferred_over_triton(x: torch.Tensor) -> bool:
    """Whether backend='auto' should pick the CUDA kernels for this input."""
    return False


def attn_fwd(q, k, v, cu_seqlens, positions, max_seqlen, spec, causal, scale):
    raise NotImplementedError("the CUDA backend is not built in this version")


def attn_bwd(dout, q, k, v, out, lse, dlse, cu_seqlens, positions, max_seqlen, spec, causal, scale):
    raise NotImplementedError("the CUDA backend is not built in this version")


def rope(x, positions, spec, conjugate):
    raise NotImplementedError("the CUDA backend is not built in this version")
