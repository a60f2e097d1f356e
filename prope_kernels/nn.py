"""``torch.nn`` modules: :class:`PRoPEAttention`, the fused p-RoPE attention as a layer.

    from prope_kernels.nn import PRoPEAttention
    attn = PRoPEAttention(p=0.75, theta=10000.0)            # causal by default
    out = attn(q, k, v)                                      # (batch, seqlen, heads, head_dim)
    out = attn(q, k, v, cu_seqlens=cu, max_seqlen=m)         # packed (total, heads, head_dim)

The module holds the configuration only: no parameters, no buffers, an empty ``state_dict``
(the projections around it belong to the model). It works under ``torch.compile(...,
fullgraph=True)``.

Tensor layout. The default ``qkv_layout="bshd"`` means q is **(batch, seqlen, heads, head_dim)**,
as flash-attn; PyTorch's ``scaled_dot_product_attention`` takes (batch, heads, seqlen, head_dim).
A (batch, heads, seqlen, head_dim) tensor whose k/v have as many heads as q has a valid shape in
either reading and would run silently with heads and positions swapped; code holding SDPA-layout
tensors constructs the module with ``qkv_layout="bhsd"`` (inputs and output in that layout).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import backends
from .flash_api import check_bshd
from .interface import prope_attention, prope_attention_varlen
from .rotary import validate_rotary_args
from .validation import check_bool, check_scale, check_window_softcap

__all__ = ["PRoPEAttention"]

QKV_LAYOUTS = ("bshd", "bhsd")


class PRoPEAttention(torch.nn.Module):
    """Attention with p-RoPE applied to q and k inside the kernel, as an ``nn.Module``.

    Args:
        p: rotated fraction of the head_dim/2 frequency pairs, in [0, 1] (0: NoPE, 1: RoPE).
        theta: RoPE base.
        variant: "prope" (fastest pairs rotate), "reversed" (slowest pairs rotate) or "partial"
            (NeoX/Phi rotary_pct: a prefix of the head with frequencies recomputed over it).
        layout: how dims pair up in the rotation: "half" (rotate_half, Llama) or
            "interleaved" (2k, 2k+1). Not the tensor layout: see ``qkv_layout``.
        causal: causal mask (default True, as :func:`prope_kernels.prope_attention`).
        window: (left, right) sliding window, -1 = unbounded (flash-attn's ``window_size``).
        softcap: logit soft-capping (None or 0 = off).
        softmax_scale: default head_dim ** -0.5.
        backend: "auto", "triton", "cuda", "sdpa" or "reference".
        deterministic: a bitwise repeatable backward.
        qkv_layout: "bshd" (default): q (batch, seqlen, heads, head_dim); "bhsd": q (batch,
            heads, seqlen, head_dim), PyTorch SDPA's layout, output likewise. Varlen calls take
            (total, heads, head_dim) whatever this says, and "bhsd" refuses them.

    ``forward(q, k, v, positions=None, cu_seqlens=None, max_seqlen=None)``: without
    ``cu_seqlens`` a dense call (:func:`prope_kernels.prope_attention`; positions (seqlen,) or
    (batch, seqlen)); with it a packed call (:func:`prope_kernels.prope_attention_varlen`;
    positions (total,), default restarting at 0 in each sequence; ``max_seqlen`` at least the
    longest sequence: left None in eager mode it is read from ``cu_seqlens`` at the cost of a
    device->host copy, and inside ``torch.compile`` it is required).
    """

    def __init__(self, p: float = 0.75, theta: float = 10000.0, variant: str = "prope",
                 layout: str = "half", *, causal: bool = True, window: tuple = (-1, -1),
                 softcap: Optional[float] = None, softmax_scale: Optional[float] = None,
                 backend: str = "auto", deterministic: bool = False, qkv_layout: str = "bshd"):
        super().__init__()
        validate_rotary_args(2, p, theta, variant, layout)  # all but head_dim (from q)
        check_bool("causal", causal)
        check_bool("deterministic", deterministic)
        if isinstance(window, list):
            window = tuple(window)
        check_window_softcap(window, softcap, causal)
        if softmax_scale is not None:
            check_scale(softmax_scale, 2)
        if not isinstance(backend, str) or backend not in backends.choices():
            raise ValueError(f"backend must be one of {backends.choices()}, got {backend!r}")
        if qkv_layout not in QKV_LAYOUTS:
            raise ValueError(f"qkv_layout must be 'bshd' (batch, seqlen, heads, head_dim) or "
                             f"'bhsd' (batch, heads, seqlen, head_dim: PyTorch SDPA's), got "
                             f"{qkv_layout!r}")
        self.p = float(p)
        self.theta = float(theta)
        self.variant = variant
        self.layout = layout
        self.causal = causal
        self.window = tuple(window)
        self.softcap = None if not softcap else float(softcap)
        self.softmax_scale = None if softmax_scale is None else float(softmax_scale)
        self.backend = backend
        self.deterministic = deterministic
        self.qkv_layout = qkv_layout

    def _options(self) -> dict:
        return dict(p=self.p, theta=self.theta, variant=self.variant, layout=self.layout,
                    causal=self.causal, softmax_scale=self.softmax_scale, backend=self.backend,
                    window=self.window, softcap=self.softcap, deterministic=self.deterministic)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                positions: Optional[torch.Tensor] = None,
                cu_seqlens: Optional[torch.Tensor] = None,
                max_seqlen: Optional[int] = None) -> torch.Tensor:
        if cu_seqlens is None:
            if max_seqlen is not None:
                raise ValueError("max_seqlen is given without cu_seqlens (a dense call takes "
                                 "neither)")
            if self.qkv_layout == "bhsd":
                q, k, v = (x.transpose(1, 2) if isinstance(x, torch.Tensor) and x.dim() == 4
                           else x for x in (q, k, v))
                return prope_attention(q, k, v, positions=positions,
                                       **self._options()).transpose(1, 2)
            check_bshd(q, k, "PRoPEAttention")
            return prope_attention(q, k, v, positions=positions, **self._options())
        if self.qkv_layout != "bshd":
            raise ValueError("cu_seqlens: a packed call takes (total, heads, head_dim) tensors; "
                             "qkv_layout='bhsd' is for dense (batch, heads, seqlen, head_dim) "
                             "calls only")
        if max_seqlen is None:
            if torch.compiler.is_compiling():
                raise ValueError("max_seqlen is required inside torch.compile (reading it from "
                                 "cu_seqlens needs a device->host copy)")
            if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.numel() < 2:
                raise ValueError("cu_seqlens must be a 1-D tensor of num_seqs + 1 >= 2 offsets")
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        return prope_attention_varlen(q, k, v, cu_seqlens, max_seqlen, positions=positions,
                                      **self._options())

    def extra_repr(self) -> str:
        s = (f"p={self.p}, theta={self.theta}, variant={self.variant!r}, "
             f"layout={self.layout!r}, causal={self.causal}")
        if self.window != (-1, -1):
            s += f", window={self.window}"
        if self.softcap is not None:
            s += f", softcap={self.softcap}"
        if self.softmax_scale is not None:
            s += f", softmax_scale={self.softmax_scale}"
        s += f", backend={self.backend!r}"
        if self.deterministic:
            s += ", deterministic=True"
        if self.qkv_layout != "bshd":
            s += f", qkv_layout={self.qkv_layout!r}"
        return s
