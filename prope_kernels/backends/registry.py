"""The backend registry: every implementation of the ops, what it can run, and how ``auto`` picks.

A backend is a module with three functions on the packed layout (q (total, q_heads, d), k/v
(total, kv_heads, d), int32 ``cu_seqlens`` (num_seqs + 1,), int64 ``positions`` (total,), lse
(q_heads, total) float32 natural log)::

    attn_fwd(q, k, v, cu_seqlens, positions, max_seqlen, spec, causal, scale, window, softcap)
        -> (out, lse)
    attn_bwd(dout, q, k, v, out, lse, dlse_or_None, cu_seqlens, positions, max_seqlen, spec,
             causal, scale, window, softcap) -> (dq, dk, dv)
    rope(x, positions, spec, conjugate) -> rotated x (x: (total, heads, d))

``spec`` is a :class:`prope_kernels.rotary.PRoPESpec`; inputs are already validated. ``window``
is (left, right) ints, -1 = unbounded, the right side already capped at 0 when causal (query i
sees key j iff i - left <= j <= i + right); ``softcap`` a float, 0.0 = off. A backend without
"window" or "softcap" in its ``features`` is never given them (naming it raises, ``auto``
passes it over). Outputs are
new tensors (never views of the inputs), in the inputs' dtype (lse float32).

Isolation: sequence j's rows of out, lse, dq, dk, dv depend on sequence j's rows of q, k, v,
dout (and lse, dlse) alone, bit for bit, whatever the other rows hold (NaN/Inf included): a
tile that reaches past the sequence (a ragged tail, a TMA box) must zero those operand rows
(masked loads with 0, zero-filled boxes) before they enter a product; a probability of 0 is
not enough (0 * NaN = NaN). The public API gives backends ``cu_seqlens[-1] == total`` and
``max_seqlen`` >= every length (it drops padding rows past ``cu_seqlens[-1]`` before the op),
but q, k, v may be views into larger buffers, so nothing past ``total`` may be read either.
Rows past ``cu_seqlens[-1]``, if a direct caller passes them, are unspecified in the outputs
(tests/test_padding_poison.py checks all of this for every backend).

A backend with a ``check_attention`` (sdpa: which of PyTorch's kernels) also takes ``kernel=``
in attn_fwd / attn_bwd: the kernel of the call's plan (:func:`prope_kernels.dispatch.plan`),
chosen once per call, before the forward, and saved for the backward; None (a direct call of
the backend) lets it choose.

Layering: each backend is a leaf module under ``prope_kernels/backends/`` (reference.py, triton/,
cuda.py, sdpa.py) that imports only :mod:`~prope_kernels.backends.common` (feature refusal, the
launch record) and the package's base modules (env, rotary, reference), never this registry, the
dispatch or the public API; this module imports no backend when it is imported (each is named
by its module path and imported on first use; tests/test_imports.py checks both).

Adding a backend = one module with those functions + one :func:`register` call below (a
:class:`Backend` entry: module path, imported on first use, and its capabilities). The public
API, the Gemma model's ``attn`` choices, the trainer's ``--attn`` and the benchmark's providers
all read this registry. ``auto``: for attention, :mod:`prope_kernels.dispatch` (a measured table,
else its documented default, among the backends that can run the call); for the rotation alone,
the first name in :data:`AUTO_ORDER` whose entry can run the input and whose ``auto`` predicate
accepts it, else ``"reference"``.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from .. import env
from .common import launched, record_launch, refuse_features  # noqa: F401  (re-exported)

KERNEL_DTYPES = (torch.float16, torch.bfloat16)
ALL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Backend:
    """One registered backend and what it can run."""

    name: str
    module: str                      # dotted module path with attn_fwd / attn_bwd / rope
    description: str
    dtypes: tuple = KERNEL_DTYPES    # q/k/v dtypes it takes
    head_dims: str = "any even head_dim"            # for error messages and docs
    head_dim_ok: Callable[[int], bool] = lambda d: d % 2 == 0
    devices: Optional[tuple] = ("cuda",)            # device types; None: any device
    interpreter_cpu: bool = False    # also CPU tensors when TRITON_INTERPRET=1
    # optional attention features: "window" (sliding window), "softcap" (logit softcapping),
    # "qk_lengths" (k/v of their own lengths and positions: cu_seqlens_k, bottom-right masks)
    features: frozenset = frozenset({"varlen", "lse", "rope"})
    # the features it has for q-like x where they depend on the device (a GPU architecture): a
    # subset of ``features``, which lists what it has anywhere; None: ``features`` everywhere
    # (x, needs) -> features; needs lets it refuse a combination (cuda: softcap with the
    # deterministic backward)
    device_features: Optional[Callable[[torch.Tensor, frozenset], frozenset]] = None
    features_note: str = ""          # where the device-dependent features are (error messages)
    # None when usable, else the reason (completes "backend='x' ..."); called lazily
    unavailable: Callable[[], Optional[str]] = lambda: None
    # when ``auto`` should take it for an input it can run (None: never picked by auto)
    auto: Optional[Callable[[torch.Tensor], bool]] = None
    # attention inputs a backend may still refuse (a vendor kernel's limits), and the kernel it
    # picks for them: called with (q, k, num_seqs, max_seqlen, causal); returns its choice (an
    # object with ``kernel`` (str), ``why`` (str) and ``notes`` (tuple of str)) or raises a
    # ValueError naming why not. The kernel goes into the call's plan (prope_kernels.dispatch).
    check_attention: Optional[Callable] = None
    device_hint: str = "use backend='reference' on the CPU"
    _module: list = field(default_factory=list, repr=False, compare=False)

    def load(self):
        """The backend's module (imported on first use)."""
        if not self._module:
            self._module.append(importlib.import_module(self.module))
        return self._module[0]

    def runs_on(self, device: torch.device) -> bool:
        if self.devices is None or device.type in self.devices:
            return True
        return self.interpreter_cpu and device.type == "cpu" and env.interpreting()

    def features_on(self, x: torch.Tensor, needs: frozenset = frozenset()) -> frozenset:
        """The features it has for q-like ``x`` (on x's device) in a call that needs ``needs``."""
        return (self.features if self.device_features is None
                else self.device_features(x, frozenset(needs)))

    def can_run(self, x: torch.Tensor, needs: frozenset = frozenset()) -> bool:
        """Whether it takes q-like ``x`` (device, dtype, head_dim) with the features ``needs``
        and is usable here."""
        return (self.runs_on(x.device) and x.dtype in self.dtypes
                and self.head_dim_ok(x.shape[-1]) and needs <= self.features
                and self.unavailable() is None
                # the device's features are asked only for a call that needs any
                and (not needs or needs <= self.features_on(x, needs)))

    def check(self, x: torch.Tensor, needs: frozenset = frozenset()) -> None:
        """Raise a ValueError/TypeError naming the backend when it cannot run ``x`` or lacks a
        feature of ``needs``."""
        missing = sorted(set(needs) - set(self.features))
        here = "" if missing else " here"
        if not missing and needs:  # the device's features: only for a call that needs any
            missing = sorted(set(needs) - set(self.features_on(x, needs)))
        if missing:
            names = {"window": "window (sliding-window attention)",
                     "softcap": "softcap (logit softcapping)",
                     "qk_lengths": "qk_lengths (seqlen_q != seqlen_k, cu_seqlens_k, "
                                   "k_positions)"}
            others = [b.name for b in REGISTRY.values() if set(needs) <= b.features]
            raise ValueError(f"backend={self.name!r} does not implement "
                             + " or ".join(names.get(m, m) for m in missing) + here
                             + (f" ({self.name}: only {self.features_note})"
                                if here and self.features_note else "") + "; use "
                             + ", ".join(f"backend={b!r}" for b in others + ["auto"]
                                         if b != self.name))
        if not self.runs_on(x.device):
            raise ValueError(f"backend={self.name!r} needs CUDA tensors, got tensors on "
                             f"{x.device} ({self.device_hint})")
        why = self.unavailable()
        if why is not None:
            raise ValueError(f"backend={self.name!r} {why}")
        if x.dtype not in self.dtypes:
            names = " and ".join(str(t).replace("torch.", "") for t in self.dtypes)
            raise TypeError(f"backend={self.name!r} supports {names} q/k/v, got {x.dtype}; "
                            "cast the inputs or use backend='reference'")
        if not self.head_dim_ok(x.shape[-1]):
            raise ValueError(f"backend={self.name!r} supports {self.head_dims}; got "
                             f"head_dim={x.shape[-1]}")


REGISTRY: dict = {}
# the backends ``auto`` considers, in order; "reference" when none of them takes the input
AUTO_ORDER: list = []


# ----------------------------------------------------------------------------------------------
# a version of each backend's kernels (the benchmark records it; the dispatch table keys its
# entries' expiry on the versions)
# ----------------------------------------------------------------------------------------------

_PKG = Path(__file__).resolve().parent.parent
# the files that make each backend's kernels, relative to the repository root (the package's
# parent); csrc/ exists in a source checkout only
KERNEL_SOURCES = {
    "triton": ("prope_kernels/backends/triton/*.py", "prope_kernels/rotary.py"),
    "sdpa": ("prope_kernels/backends/sdpa.py", "prope_kernels/backends/triton/rope.py",
             "prope_kernels/backends/triton/common.py", "prope_kernels/rotary.py"),
    "cuda": ("prope_kernels/backends/cuda.py", "prope_kernels/rotary.py", "csrc/binding.cpp",
             "csrc/kernels/*.cu", "csrc/prope_attn/*.h"),
}


def kernel_hash(name: str, root=None) -> Optional[str]:
    """A version of backend ``name``'s kernels: sha256 (first 16 hex digits) over the path and
    bytes of each of its :data:`KERNEL_SOURCES`; None when a pattern matches no file (csrc/ is
    absent from an installed package: its CUDA kernels cannot be identified)."""
    root = Path(root) if root is not None else _PKG.parent
    h = hashlib.sha256()
    for pattern in KERNEL_SOURCES[name]:
        files = sorted(root.glob(pattern))
        if not files:
            return None
        for f in files:
            h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def kernel_hashes(root=None) -> dict:
    """{backend: kernel_hash} for every backend with kernels to time."""
    return {name: kernel_hash(name, root) for name in KERNEL_SOURCES}


def register(backend: Backend, auto_rank: Optional[int] = None) -> Backend:
    """Add a backend; ``auto_rank``: its place in :data:`AUTO_ORDER` (None: not considered)."""
    REGISTRY[backend.name] = backend
    if auto_rank is not None:
        AUTO_ORDER.insert(auto_rank, backend.name)
    return backend


def names() -> tuple:
    """Registered backend names (without "auto")."""
    return tuple(REGISTRY)


def choices() -> tuple:
    """What ``backend=`` accepts: "auto" and every registered name."""
    return ("auto",) + names()


def get(name: str) -> Backend:
    if name not in REGISTRY:
        raise ValueError(f"backend must be one of {choices()}, got {name!r}")
    return REGISTRY[name]


def choose_auto(x: torch.Tensor, needs: frozenset = frozenset()) -> str:
    """The backend ``auto`` picks for the rotation alone of ``x`` with the features ``needs``.
    (For attention, :func:`prope_kernels.dispatch.plan` decides: a measured table or its
    documented default.)"""
    for name in AUTO_ORDER:
        be = REGISTRY[name]
        if be.auto is not None and be.can_run(x, needs) and be.auto(x):
            return name
    return "reference"


def resolve(backend, x: torch.Tensor, needs: frozenset = frozenset()) -> str:
    """A backend name for the rotation alone of ``x`` (or a backend's checks for any call):
    ``auto`` resolved, an explicit choice checked (ValueError or TypeError naming what it cannot
    run). needs: the features the call uses. Attention calls are planned by
    :func:`prope_kernels.dispatch.plan`, which runs these checks and the backend's own."""
    if not isinstance(backend, str) or backend not in choices():
        raise ValueError(f"backend must be one of {choices()}, got {backend!r}")
    if backend == "auto":
        return choose_auto(x, needs)
    REGISTRY[backend].check(x, needs)
    return backend


# ----------------------------------------------------------------------------------------------
# the registered backends
# ----------------------------------------------------------------------------------------------

# a failed import of an optional dependency, kept: a module whose import failed is not retried
# (its second try can fail differently, on the half-imported modules the first left behind)
_IMPORT_ERRORS: dict = {}


def import_error(module: str) -> Optional[BaseException]:
    """The exception that importing ``module`` raises (None when it imports). The exception is
    the real one (a dependency of the module missing, say), not a guess at what is wrong."""
    if module in _IMPORT_ERRORS:
        return _IMPORT_ERRORS[module]
    try:
        importlib.import_module(module)
    except Exception as e:  # noqa: BLE001  (anything an import can raise is the reason)
        _IMPORT_ERRORS[module] = e
        return e
    return None


def describe_error(e: BaseException) -> str:
    """``ModuleNotFoundError: No module named 'numpy'``: an exception as a reason names it."""
    return f"{type(e).__name__}: {e}"


def _installed(dist: str) -> Optional[str]:
    """The installed version of distribution ``dist``, None when it is not installed."""
    from importlib import metadata
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _triton_unavailable():
    # an import statement, not import_error's importlib: torch.compile traces this call (the
    # backend checks of a compiled function) and cannot trace importlib
    err = _IMPORT_ERRORS.get("triton")
    if err is None:
        try:
            import triton  # noqa: F401
            return None
        except Exception as e:  # noqa: BLE001  (anything an import can raise is the reason)
            err = _IMPORT_ERRORS["triton"] = e
    version = _installed("triton")
    if version is None and importlib.util.find_spec("triton") is None:
        return "needs the triton package; pip install triton, or use backend='reference'"
    hint = ""
    if isinstance(err, ModuleNotFoundError) and err.name == "numpy":
        hint = (" (Triton's CPU interpreter, TRITON_INTERPRET=1, imports numpy: pip install "
                "numpy)" if env.interpreting() else " (pip install numpy)")
    return (f"cannot import triton{' ' + version if version else ''}, which is installed: "
            f"{describe_error(err)}{hint}; or use backend='reference'")


def _cuda_unavailable():
    from . import cuda
    if cuda.available():
        return None
    if not cuda._load():
        err = cuda.load_error()
        if cuda.extension_path() is None:
            return ("needs the compiled extension prope_kernels._C, which this install does not "
                    "have (`python -m prope_kernels` shows why it was not built); reinstall "
                    "with a CUDA toolkit (PROPE_FORCE_CUDA_BUILD=1 pip install "
                    "--no-build-isolation .) or use backend='triton'")
        return (f"needs the compiled extension prope_kernels._C, which does not load: "
                f"{describe_error(err)} (built against another torch? rebuild it: "
                "PROPE_FORCE_CUDA_BUILD=1 pip install --no-build-isolation .); or use "
                "backend='triton'")
    if not torch.cuda.is_available():
        return "needs a CUDA device (prope_kernels._C loads, but torch sees no GPU)"
    return ("needs the compiled extension prope_kernels._C and a CUDA device, which "
            "prope_kernels.backends.cuda.available() says are not usable here; use "
            "backend='triton'")


_CUDA_BASE = frozenset({"varlen", "lse", "rope", "deterministic"})


def _cuda_features(x, needs=frozenset()):
    # window and softcap: the SM90 kernels only (an sm_90 GPU and a build with 9.0a); softcap
    # not with the deterministic (split) backward, which has no softcap: refused up front, not
    # after the forward has run
    from . import cuda
    if x.device.type == "cuda" and cuda.available() and cuda.sm90_runs(x.device):
        return _CUDA_BASE | ({"window"} if "deterministic" in needs else {"window", "softcap"})
    return _CUDA_BASE


def _cuda_preferred(x):
    from . import cuda
    return cuda.preferred_over_triton(x)


register(Backend(
    name="triton", module="prope_kernels.backends.triton.ops",
    description="fused Triton kernels (p-RoPE inside FlashAttention-2 forward and backward)",
    head_dims="an even head_dim <= 256, or 512",
    head_dim_ok=lambda d: d % 2 == 0 and (d <= 256 or d == 512),
    interpreter_cpu=True,
    features=frozenset({"varlen", "lse", "rope", "deterministic", "window", "softcap",
                        "qk_lengths"}),
    unavailable=_triton_unavailable, auto=lambda x: x.device.type == "cuda",
    device_hint="set TRITON_INTERPRET=1 to run the kernels on the CPU, slowly, or use "
                "backend='reference'",
))

# Not picked by auto until its kernels have been validated and timed on a GPU against Triton
# (prope_kernels.backends.cuda.preferred_over_triton). Its SM80 backward and its SM90 fused one (the
# default) sum dQ with float atomics; deterministic=True or torch's deterministic mode run the
# SM90 split backward (the SM80 kernels then raise).
register(Backend(
    name="cuda", module="prope_kernels.backends.cuda",
    description="CUDA C++ kernels (csrc/, CUTLASS/CuTe), built into prope_kernels._C",
    head_dims="head_dim 64, 128 or 256", head_dim_ok=lambda d: d in (64, 128, 256),
    features=_CUDA_BASE | {"window", "softcap"}, device_features=_cuda_features,
    features_note="its SM90 kernels, on an sm_90 GPU (softcap: not with deterministic=True)",
    unavailable=_cuda_unavailable, auto=_cuda_preferred,
))

def _sdpa_check(q, k, num_seqs, max_seqlen, causal):
    from . import sdpa
    return sdpa.check(q, k, num_seqs, max_seqlen, causal)


# PyTorch's fused attention (cuDNN, else flash, else memory-efficient; CPU: the CPU flash op)
# with our rotation around it. Which inputs it takes is torch's own eligibility check on the
# shape (prope_kernels.backends.sdpa.choose); auto picks it through prope_kernels.dispatch.
register(Backend(
    name="sdpa", module="prope_kernels.backends.sdpa",
    description="PyTorch's cuDNN / FlashAttention-2 / memory-efficient attention (ATen ops) with "
                "the p-RoPE rotation kernel around it",
    dtypes=ALL_DTYPES, devices=None,
    head_dims="what torch's cuDNN/flash/memory-efficient kernels take (float16/bfloat16 on CUDA)",
    check_attention=_sdpa_check,
))

register(Backend(
    name="reference", module="prope_kernels.backends.reference",
    description="pure PyTorch (the definition), float32 math (float64 for float64 inputs), any "
                "device",
    dtypes=ALL_DTYPES, devices=None,
    features=frozenset({"varlen", "lse", "rope", "deterministic", "window", "softcap",
                        "qk_lengths"}),
))

AUTO_ORDER[:] = ["cuda", "triton"]
