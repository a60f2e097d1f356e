"""Models built on the fused p-RoPE attention: Gemma 1/2/3 and a Gemma-4-style model
(gemma.py)."""

from .gemma import PRESETS, Gemma, GemmaConfig, LayerAttn, chunked_cross_entropy, preset

__all__ = ["Gemma", "GemmaConfig", "LayerAttn", "PRESETS", "chunked_cross_entropy", "preset"]
