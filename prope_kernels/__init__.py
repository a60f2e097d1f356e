"""prope_kernels: attention with p-RoPE fused into FlashAttention-style kernels.

    from prope_kernels import prope_attention, prope_attention_varlen, apply_prope

See :mod:`prope_kernels.interface` for the API, :mod:`prope_kernels.backends` for the backends,
:mod:`prope_kernels.reference` for the math.
"""

from .interface import apply_prope, explain, prope_attention, prope_attention_varlen
from .rotary import PRoPESpec, rotated_pairs

__version__ = "0.1.0"

__all__ = ["prope_attention", "prope_attention_varlen", "apply_prope", "explain", "PRoPESpec",
           "rotated_pairs", "__version__"]
