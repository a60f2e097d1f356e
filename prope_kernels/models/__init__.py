"""Models built on the fused p-RoPE attention: Gemma (gemma.py)."""

from .gemma import PRESETS, Gemma, GemmaConfig, chunked_cross_entropy, preset

__all__ = ["Gemma", "GemmaConfig", "PRESETS", "chunked_cross_entropy", "preset"]
