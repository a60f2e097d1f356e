"""p-RoPE: which dims rotate, with which frequency, paired with which dim.

Every backend (reference, Triton, CUDA) derives its rotation from :class:`PRoPESpec`, so the
variants and layouts are defined in exactly one place.

Definitions (head_dim ``d`` even, ``d/2`` pairs, ``r = floor(p * d/2)`` rotated pairs):

* ``variant="prope"``    the r fastest pairs k < r rotate with ``g_k = theta^(-2k/d)``; the rest are
  the identity (the paper's p-RoPE; Gemma's ``rope_proportion``).
* ``variant="reversed"`` the r slowest pairs rotate (k >= d/2 - r), same ``g_k``; the fastest are the
  identity (the paper's "reversed" control).
* ``variant="partial"``  NeoX ``rotary_pct``: dims ``0..2r-1`` form a rotary block with frequencies
  recomputed over it, ``theta^(-2k/(2r))``; dims ``2r..d-1`` are the identity.
* ``layout="half"``: pair k is dims ``(k, k + h)`` with ``h = d/2`` (``h = r`` for "partial").
  ``layout="interleaved"``: pair k is dims ``(2k, 2k+1)``.

A pair ``(a, b)`` at position m rotates by ``phi = m * g``::

    x_a' = x_a cos(phi) - x_b sin(phi)
    x_b' = x_b cos(phi) + x_a sin(phi)

The inverse (the gradient of the rotation) flips the sign of ``sin``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

VARIANTS = ("prope", "reversed", "partial")
LAYOUTS = ("half", "interleaved")


def rotated_pairs(head_dim: int, p: float) -> int:
    """Number of rotated pairs ``r = floor(p * head_dim / 2)`` (a tiny epsilon absorbs float error,
    e.g. ``0.7 * 10 = 7.000000000000001`` and ``0.29 * 100 = 28.999999999999996``)."""
    return int(math.floor(p * (head_dim // 2) + 1e-9))


@dataclass(frozen=True)
class PRoPESpec:
    """The rotation applied to one head of size ``head_dim``."""

    head_dim: int
    p: float = 0.75
    theta: float = 10000.0
    variant: str = "prope"
    layout: str = "half"

    def __post_init__(self):
        validate_rotary_args(self.head_dim, self.p, self.theta, self.variant, self.layout)
        object.__setattr__(self, "p", float(self.p))          # 1 -> 1.0: one hash per spec
        object.__setattr__(self, "theta", float(self.theta))

    @property
    def num_rotated(self) -> int:
        return rotated_pairs(self.head_dim, self.p)

    def pairs(self) -> tuple[list[int], list[int], list[float]]:
        """Rotated pairs as three lists ``(a, b, inv_freq)`` of length ``num_rotated``;
        ``inv_freq`` is exact in float64 (Python floats)."""
        d, r = self.head_dim, self.num_rotated
        h = d // 2
        if self.variant == "partial":
            ks = list(range(r))
            freqs = [self.theta ** (-2.0 * k / (2 * r)) for k in ks]
            a = ks if self.layout == "half" else [2 * k for k in ks]
            b = [k + r for k in ks] if self.layout == "half" else [2 * k + 1 for k in ks]
            return a, b, freqs
        ks = list(range(r)) if self.variant == "prope" else list(range(h - r, h))
        freqs = [self.theta ** (-2.0 * k / d) for k in ks]
        a = ks if self.layout == "half" else [2 * k for k in ks]
        b = [k + h for k in ks] if self.layout == "half" else [2 * k + 1 for k in ks]
        return a, b, freqs

    def chunk_run(self) -> tuple[int, int] | None:
        """``(a0, b_off)`` when pair i is dims ``(a0 + i, a0 + i + b_off)`` with ``b_off % 8 == 0``
        and the 8-aligned chunks covering the a dims apart from those of the b dims (the "half"
        layout, except "partial" with r % 8 != 0); else None. The CUDA SM90 forward then rotates Q
        in 16-byte chunks from a cos/sin table (RotTables::run_a0 in csrc/prope_attn/params.h)."""
        a, b, _ = self.pairs()
        if not a:
            return None
        a0, off = a[0], b[0] - a[0]
        lo, hi = a0 // 8 * 8, -(-(a0 + len(a)) // 8) * 8
        if (off % 8 or off < hi - lo or hi + off > self.head_dim
                or a != list(range(a0, a0 + len(a))) or b != [x + off for x in a]):
            return None
        return a0, off

    def identity_dims(self) -> list[int]:
        a, b, _ = self.pairs()
        rot = set(a) | set(b)
        return [j for j in range(self.head_dim) if j not in rot]

    def tables(self, device) -> "RotaryTables":
        return _tables(self, torch.device(device))


@dataclass(frozen=True)
class RotaryTables:
    """Device tensors describing a :class:`PRoPESpec` for the kernels.

    pair_a, pair_b: (r,) int32   the two dims of each rotated pair
    pair_freq:      (r,) float64 its frequency
    identity:       (d - 2r,) int32  dims that are not rotated (copied, never multiplied)
    col_partner:    (d,) int32   per dim: the other dim of its pair (itself when identity)
    col_sign:       (d,) float32 per dim: -1 for a pair's first dim, +1 for its second, 0 identity
    col_freq:       (d,) float64 per dim: the pair's frequency (0 for identity)
    """

    pair_a: torch.Tensor
    pair_b: torch.Tensor
    pair_freq: torch.Tensor
    identity: torch.Tensor
    col_partner: torch.Tensor
    col_sign: torch.Tensor
    col_freq: torch.Tensor


@lru_cache(maxsize=64)
def _tables(spec: PRoPESpec, device: torch.device) -> RotaryTables:
    a, b, f = spec.pairs()
    d = spec.head_dim
    partner = list(range(d))
    sign = [0.0] * d
    cfreq = [0.0] * d
    for ai, bi, fi in zip(a, b, f):
        partner[ai], partner[bi] = bi, ai
        sign[ai], sign[bi] = -1.0, 1.0
        cfreq[ai] = cfreq[bi] = fi
    i32 = dict(dtype=torch.int32, device=device)
    return RotaryTables(
        pair_a=torch.tensor(a, **i32),
        pair_b=torch.tensor(b, **i32),
        pair_freq=torch.tensor(f, dtype=torch.float64, device=device),
        identity=torch.tensor(spec.identity_dims(), **i32),
        col_partner=torch.tensor(partner, **i32),
        col_sign=torch.tensor(sign, dtype=torch.float32, device=device),
        col_freq=torch.tensor(cfreq, dtype=torch.float64, device=device),
    )


def validate_rotary_args(head_dim, p, theta, variant, layout) -> None:
    """Raise a ValueError/TypeError naming the bad argument."""
    if isinstance(head_dim, bool) or not isinstance(head_dim, int):
        raise TypeError(f"head_dim must be an int, got {type(head_dim).__name__}")
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even number, got {head_dim}")
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"p must be a float in [0, 1], got {type(p).__name__}")
    if not (0.0 <= float(p) <= 1.0):  # also rejects NaN
        raise ValueError(f"p must be in [0, 1], got {p}")
    if isinstance(theta, bool) or not isinstance(theta, (int, float)):
        raise TypeError(f"theta must be a positive float, got {type(theta).__name__}")
    if not (float(theta) > 1.0 and math.isfinite(theta)):
        raise ValueError(f"theta must be a finite number > 1, got {theta}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
