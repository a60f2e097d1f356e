"""prope_kernels: attention with p-RoPE fused into FlashAttention-style kernels.

    from prope_kernels import prope_attention, prope_attention_varlen, apply_prope
    from prope_kernels import flash_attn_func, flash_attn_varlen_func   # flash-attn's arguments
    from prope_kernels import prope_attention_with_kvcache             # decode over a KV cache
    from prope_kernels.nn import PRoPEAttention                          # as an nn.Module

See :mod:`prope_kernels.interface` for the API, :mod:`prope_kernels.backends` for the backends,
:mod:`prope_kernels.reference` for the math.
"""

from .interface import apply_prope, explain, prope_attention, prope_attention_varlen
from .rotary import PRoPESpec, rotated_pairs
from .flash_api import flash_attn_func, flash_attn_varlen_func
from .kvcache import prope_attention_with_kvcache
from . import nn
from .nn import PRoPEAttention

__version__ = "0.1.0"

__all__ = ["prope_attention", "prope_attention_varlen", "apply_prope", "explain", "PRoPESpec",
           "rotated_pairs", "flash_attn_func", "flash_attn_varlen_func", "PRoPEAttention", "nn",
           "prope_attention_with_kvcache", "__version__"]
