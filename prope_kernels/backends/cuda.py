"""CUDA C++ backend (csrc/): thin Python side of the compiled extension ``prope_kernels._C``.

Provides the backend contract of :mod:`prope_kernels.backends` (attn_fwd, attn_bwd, rope) by
calling ``torch.ops.prope_cuda.*`` (registered when ``_C`` is imported). Imports cleanly without
the extension: :func:`available` is then False.

Packed layout in and out: q (total, q_heads, d), k/v (total, kv_heads, d), int32 cu_seqlens
(num_seqs + 1,), int64 positions (total,), lse (q_heads, total) float32 natural log. The rotation
tables come from :meth:`PRoPESpec.tables` (pair_a, pair_b, pair_freq, identity).
"""

from __future__ import annotations

import functools

import torch

from .. import env
from .common import record_launch, refuse_qk

_LOADED = None
_LOAD_ERROR = None


def _load() -> bool:
    global _LOADED, _LOAD_ERROR
    if _LOADED is None:
        try:
            from .. import _C  # noqa: F401  (registers torch.ops.prope_cuda.*)
        except (ImportError, OSError) as e:  # not built, or built against another torch
            _LOADED, _LOAD_ERROR = False, e
        else:
            _LOADED = True
            _register_fakes()
    return _LOADED


def _register_fakes() -> None:
    """Shape-only implementations so torch.compile / FakeTensor can trace the raw ops."""
    lib = "prope_cuda::"

    def fwd(q, k, v, cu, pos, max_seqlen, pa, pb, pf, ident, causal, scale, family=0,
            sm90_fwd=0, window_left=-1, window_right=-1, softcap=0.0, run_a0=-1, run_b_off=0):
        return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)

    def bwd(dout, q, k, v, out, lse, dlse, cu, pos, max_seqlen, pa, pb, pf, ident, causal, scale,
            family=0, sm90_bwd=0, window_left=-1, window_right=-1, softcap=0.0, run_a0=-1,
            run_b_off=0):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def rope_(x, pos, pa, pb, pf, ident, conjugate):
        return torch.empty_like(x)

    for name, fn in (("attn_fwd", fwd), ("attn_bwd", bwd), ("rope", rope_)):
        try:
            torch.library.register_fake(lib + name)(fn)
        except RuntimeError:  # already registered (module reloaded)
            pass


def available() -> bool:
    """True when the extension is built (and loads) and a CUDA device is present."""
    return _load() and torch.cuda.is_available()


def load_error():
    """Why the extension did not load (None when it did or was not tried)."""
    _load()
    return _LOAD_ERROR


def extension_path():
    """The file of the compiled extension prope_kernels._C, None when this install has none
    (found without importing it)."""
    import importlib.util
    try:
        spec = importlib.util.find_spec("prope_kernels._C")
    except (ImportError, ValueError):
        return None
    return spec.origin if spec is not None else None


def preferred_over_triton(x: torch.Tensor) -> bool:
    """Whether backend='auto' should pick the CUDA kernels for this input. False until the
    kernels have been validated and timed on a GPU against the Triton backend."""
    return False


# Kernel family passed to the ops: 0 auto (the SM90 kernels on an sm_90 device when the build has
# the sm_90a target, else the SM80 ones; csrc/kernels/api.cu resolve_family), 1 SM80, 2 SM90.
FAMILY_AUTO, FAMILY_SM80, FAMILY_SM90 = 0, 1, 2


def sm90_requested() -> bool:
    """PROPE_CUDA_SM90=1 forces the SM90 (wgmma + TMA) forward and backward: a build without the
    sm_90a target or a device other than sm_90 then raises instead of falling back. Unset, the
    SM90 kernels run where they can (validated on an H100, 2026-11-26: all of
    tests/test_cuda_backend.py). PROPE_CUDA_SM90=0 forces the SM80 kernels. Read at each call."""
    return env.cuda_sm90() is True


def _family() -> int:
    want = env.cuda_sm90()
    return FAMILY_AUTO if want is None else FAMILY_SM90 if want else FAMILY_SM80


SM90_FWD_CODES = {"basic": 0, "overlap": 1, "basic+lpt": 2, "overlap+lpt": 3}


def _sm90_fwd() -> int:
    """The SM90 forward's variant (PROPE_CUDA_SM90_FWD, see env.cuda_sm90_fwd): bit 0 the overlap
    mainloop, bit 1 the longest-first launch order; ignored by the SM80 kernels."""
    return SM90_FWD_CODES[env.cuda_sm90_fwd()]


# SM90 backward passed to attn_bwd: 0 fused (one 5-GEMM kernel, dQ summed with float4 atomics),
# 1 split (a dK/dV kernel and a dQ kernel: deterministic). Ignored by the SM80 kernels.
SM90_BWD_FUSED, SM90_BWD_SPLIT = 0, 1
SM90_BWD_NAMES = {SM90_BWD_FUSED: "fused", SM90_BWD_SPLIT: "split"}


def _sm90_bwd(deterministic: bool = False) -> int:
    """The split backward when a repeatable result is asked for (deterministic=True or torch's
    deterministic mode), else PROPE_CUDA_SM90_BWD (default fused)."""
    if deterministic or torch.are_deterministic_algorithms_enabled():
        return SM90_BWD_SPLIT
    return SM90_BWD_SPLIT if env.cuda_sm90_bwd() == "split" else SM90_BWD_FUSED


def resolved_family(device, family: int) -> str:
    """"sm90" or "sm80": the family the extension launches on ``device`` for the requested
    ``family`` code, read back from its own resolution (csrc resolve_family); a build from before
    that op can only say what was requested."""
    major, minor = torch.cuda.get_device_capability(device)
    try:
        fam = int(torch.ops.prope_cuda.resolve_family(major * 10 + minor, int(family)))
    except (AttributeError, RuntimeError):
        return {FAMILY_SM80: "sm80", FAMILY_SM90: "sm90"}.get(family, "unresolved (old build)")
    return "sm90" if fam == FAMILY_SM90 else "sm80"


def sm90_runs(device) -> bool:
    """Whether attention on ``device`` runs the SM90 kernels (PROPE_CUDA_SM90 as set now): only
    they implement window and softcap."""
    return resolved_family(device, _family()) == "sm90"


def _window_softcap(device, window, softcap, causal, split=False):
    """(window_left, window_right, softcap) for the ops; a ValueError naming the argument where
    the kernels that would run lack them (the SM80 kernels; softcap in the split backward).
    Plain causal ((-1, 0) or (-1, -1) with causal) is no window."""
    left, right = (int(window[0]), int(window[1]))
    cap = float(softcap or 0.0)
    if left < -1 or right < -1:
        raise ValueError(f"window must be (left, right) with -1 (unbounded) or >= 0 each, got "
                         f"{tuple(window)}")
    if not (cap >= 0.0) or cap == float("inf"):
        raise ValueError(f"softcap must be 0 (off) or a positive finite float, got {softcap}")
    if left >= 0 or (right >= 0 and not causal) or cap:
        if not sm90_runs(device):
            raise ValueError("backend='cuda' implements window and softcap in its SM90 kernels "
                             "only (an sm_90 GPU, a build with the 9.0a target, PROPE_CUDA_SM90 "
                             f"not 0); got window={tuple(window)}, softcap={softcap} on "
                             f"{device}; use backend='triton'")
        if split and cap:
            raise ValueError("backend='cuda': softcap is not implemented by the deterministic "
                             "(SM90 split) backward; use deterministic=False (and torch's "
                             "deterministic mode off) or backend='triton'")
    return left, right, cap


def _record(pass_, device, family, variant) -> None:
    """What this launch ran (prope_kernels.backends.launched): the family, and the SM90 variant."""
    fam = resolved_family(device, family)
    record_launch(pass_, "cuda", family=fam, variant=variant if fam == "sm90" else "")


def _require() -> None:
    if not _load():
        raise RuntimeError(f"the CUDA backend (prope_kernels._C) is not available: {_LOAD_ERROR}")


def _tables(spec, device):
    t = spec.tables(device)
    return t.pair_a, t.pair_b, t.pair_freq, t.identity


@functools.lru_cache(maxsize=64)
def _chunk_run(spec):
    return spec.chunk_run()  # specs are frozen: computed once per spec, not per call


def _run(spec) -> tuple:
    """(run_a0, run_b_off) of the ops: the pairs' run (PRoPESpec.chunk_run), with which the
    forwards rotate Q and the SM90 fused backward dK in 16-byte chunks from the K pass's cos/sin
    table; (-1, 0): none, or PROPE_CUDA_ROT=pairs (one pair at a time, its angle)."""
    run = _chunk_run(spec) if env.cuda_rot() == "table" else None
    return run if run is not None else (-1, 0)


def attn_fwd(q, k, v, cu_seqlens, positions, max_seqlen, spec, causal, scale, window=(-1, -1),
             softcap=0.0, cu_seqlens_k=None, positions_k=None, max_seqlen_k=None):
    refuse_qk("cuda", cu_seqlens_k)   # seqlen_q != seqlen_k: not in the CUDA kernels
    _require()
    wl, wr, cap = _window_softcap(q.device, window, softcap, causal)
    family, fwd = _family(), _sm90_fwd()
    if cap:  # softcap exists in the overlap mainloop only (the kernel runs it in any case)
        fwd |= SM90_FWD_CODES["overlap"]
    out, lse = torch.ops.prope_cuda.attn_fwd(
        q, k, v, cu_seqlens.to(torch.int32), positions.to(torch.int64), int(max_seqlen),
        *_tables(spec, q.device), bool(causal), float(scale), family, fwd, wl, wr, cap, *_run(spec))
    _record("fwd", q.device, family, {c: m for m, c in SM90_FWD_CODES.items()}[fwd])
    return out, lse


def attn_bwd(dout, q, k, v, out, lse, dlse, cu_seqlens, positions, max_seqlen, spec, causal, scale,
             window=(-1, -1), softcap=0.0, deterministic=False, cu_seqlens_k=None,
             positions_k=None, max_seqlen_k=None):
    """dlse may be None; if given, the row term becomes delta = rowsum(dO * O) - dlse.
    deterministic: the SM90 split backward (the SM80 kernels have no deterministic backward)."""
    refuse_qk("cuda", cu_seqlens_k)
    _require()
    family, bwd = _family(), _sm90_bwd(deterministic)
    wl, wr, cap = _window_softcap(q.device, window, softcap, causal, bwd == SM90_BWD_SPLIT)
    if deterministic and resolved_family(q.device, family) != "sm90":
        raise ValueError("backend='cuda' with deterministic=True needs its SM90 kernels (an sm_90 "
                         "GPU and a build with the 9.0a target): the SM80 backward sums dQ with "
                         "atomics; use backend='triton'")
    dq, dk, dv = torch.ops.prope_cuda.attn_bwd(
        dout, q, k, v, out, lse, dlse, cu_seqlens.to(torch.int32), positions.to(torch.int64),
        int(max_seqlen), *_tables(spec, q.device), bool(causal), float(scale), family, bwd,
        wl, wr, cap, *_run(spec))
    _record("bwd", q.device, family, SM90_BWD_NAMES[bwd])
    return dq, dk, dv


def rope(x, positions, spec, conjugate):
    _require()
    return torch.ops.prope_cuda.rope(x, positions.to(torch.int64), *_tables(spec, x.device),
                                     bool(conjugate))
