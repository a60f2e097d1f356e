"""p-RoPE the way users apply it today, in front of an unfused attention (the peers' RoPE).

Half-split layout (Llama/Gemma ``rotate_half``), float32 math, result cast back to the input dtype;
identity pairs are handled as Gemma does (their frequency is 0: cos 1, sin 0), so the rotation is
applied to the whole head. Matches ``prope_kernels`` with variant="prope", layout="half".

The cos/sin tables are built once per shape outside the timed region, as a model builds them once
per step and shares them across layers. Angles are formed in float64 (an fp32 angle is off by up
to 0.03 rad at position 1e6).
"""

from __future__ import annotations

import torch

from prope_kernels.rotary import rotated_pairs


def rope_tables(positions: torch.Tensor, head_dim: int, p: float, theta: float):
    """cos, sin: (len(positions), head_dim // 2) float32 on positions' device."""
    half = head_dim // 2
    r = rotated_pairs(head_dim, p)
    k = torch.arange(half, dtype=torch.float64, device=positions.device)
    inv_freq = torch.where(k < r, theta ** (-2.0 * k / head_dim), torch.zeros_like(k))
    ang = positions.to(torch.float64)[:, None] * inv_freq
    return torch.cos(ang).float(), torch.sin(ang).float()


def rope_eager(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (..., seqlen, heads, d); cos/sin (seqlen, d/2), broadcast over batch and heads."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


def rope_qk_eager(q, k, cos, sin):
    """Rotate q and k in one call (HF ``apply_rotary_pos_emb`` style)."""
    return rope_eager(q, cos, sin), rope_eager(k, cos, sin)


_COMPILED = {}


def rope_qk_compiled():
    """``rope_qk_eager`` under torch.compile (one static graph per shape, like a model compiled
    for a fixed training shape). Created on first use so that importing this costs nothing."""
    if "fn" not in _COMPILED:
        import torch._dynamo.config as dcfg
        # a sweep visits many shapes; never fall back to eager silently after N recompiles
        for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                     "accumulated_cache_size_limit"):
            if hasattr(dcfg, name):
                setattr(dcfg, name, max(getattr(dcfg, name), 1024))
        _COMPILED["fn"] = torch.compile(rope_qk_eager, dynamic=False)
    return _COMPILED["fn"]
