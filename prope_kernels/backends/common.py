"""What every backend module shares, below the registry and the backends: the refusal of the
features a backend lacks, and the record of what each attention launch ran."""

from __future__ import annotations


def refuse_features(name: str, window, softcap, causal) -> None:
    """For backends without "window"/"softcap": the API never passes them (registry features);
    this guards a direct call of the op with them. ((-1, 0) with causal is plain causal.)"""
    if window[0] >= 0 or (window[1] >= 0 and not causal) or softcap:
        raise ValueError(f"backend={name!r} implements neither window nor softcap, got "
                         f"window={tuple(window)}, softcap={softcap}; use backend='triton'")


def refuse_qk(name: str, cu_seqlens_k) -> None:
    """For backends without "qk_lengths": the API never passes keys of their own lengths to them
    (registry features); this guards a direct call of the op with them."""
    if cu_seqlens_k is not None:
        raise ValueError(f"backend={name!r} does not implement qk_lengths (seqlen_q != seqlen_k, "
                         f"cu_seqlens_k, k_positions); use backend='triton' or 'reference'")


# ----------------------------------------------------------------------------------------------
# what ran: the settings each backend resolved at its latest attention launch (the benchmark
# records them)
# ----------------------------------------------------------------------------------------------

# "fwd" / "bwd" -> {"backend": name, ...the settings that backend resolved for the launch}
LAUNCHES: dict = {}


def record_launch(pass_: str, backend: str, **settings) -> None:
    """Called by a backend when it launches its attention forward ("fwd") or backward ("bwd"),
    with what it resolved for that call (kernel set, family, variant, vendor kernel)."""
    LAUNCHES[pass_] = dict(backend=backend, **settings)


def launched(clear: bool = False) -> dict:
    """{"fwd": {...}, "bwd": {...}}: the settings of the latest attention launches (a pass that
    did not run since the last ``clear`` is absent)."""
    out = {k: dict(v) for k, v in LAUNCHES.items()}
    if clear:
        LAUNCHES.clear()
    return out
