"""The portable Triton kernels' configs in use (above attention.py and configs.py): force one row
of a config table (tests on a GPU), choose the forward's Q rotation mode under the interpreter
(tests), and read back the config each kernel ran with last (the benchmark records it)."""

from __future__ import annotations

import contextlib

from . import configs
from .attention import KERNELS


def set_interpreter_q_on_load(on_load: bool) -> None:
    """Tests only (CPU interpreter, single config): choose the forward's Q rotation mode."""
    c = KERNELS["fwd"].configs[0]
    c.kwargs["Q_ON_LOAD"] = int(on_load)
    c.pre_hook = None if on_load else configs.rotate_q_into_out


@contextlib.contextmanager
def force_config(kernel: str, row: tuple):
    """Tests on a GPU: run ``kernel`` ("fwd", "dkdv" or "dq") with exactly the config ``row`` =
    (BLOCK_M, BLOCK_N, warps, stages) of its table (fwd: plus Q_ON_LOAD), no tuning."""
    kern = KERNELS[kernel]
    configs.FORCED[kernel] = tuple(row)
    kern.cache.clear()
    try:
        yield
    finally:
        del configs.FORCED[kernel]
        kern.cache.clear()


def chosen_configs() -> dict:
    """The config each kernel ran with last (autotuned or not): {"fwd": "128x64 w8 s2 q0", ...}.
    The benchmark records it next to each Triton timing, to show which table rows win."""
    out = {}
    for name, kern in KERNELS.items():
        c = getattr(kern, "best_config", None)
        if c is not None:
            kw = c.kwargs
            q = f" q{kw['Q_ON_LOAD']}" if "Q_ON_LOAD" in kw else ""
            out[name] = f"{kw['BLOCK_M']}x{kw['BLOCK_N']} w{c.num_warps} s{c.num_stages}{q}"
    return out
