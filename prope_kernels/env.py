"""Every environment switch the package reads, in one place.

Read at call time (not import time), so that tests can change them with ``monkeypatch.setenv``.
``TRITON_INTERPRET`` itself is read by Triton when it is first imported; the package only asks
whether it is set.

  TRITON_INTERPRET=1   Triton kernels run under the CPU interpreter (set by tests/conftest.py
                       on machines without a GPU); the Triton backend then accepts CPU tensors
  PROPE_POISON=1       fill kernel outputs and scratch buffers with NaN before the kernels run,
                       so anything a kernel forgets to write shows up (set by the tests)
  PROPE_AUTOTUNE=0     no autotuning: each Triton kernel runs the first row of its config table
                       (GPU test runs; see prope_kernels/backends/triton/configs.py)
  PROPE_KV_SPLIT=n     force the GQA split of the Triton backward's dK/dV programs (tests)
  PROPE_TRITON_KERNELS which Triton kernels backend="triton" runs: portable (default: always
                       attention.py's, the kernels validated on GPUs), auto (the Hopper kernels
                       of triton/hopper.py on sm_90 where they support the call, else the
                       portable ones; the default once a GPU run has validated them), hopper
                       (the Hopper kernels, an error where they cannot run; also under the CPU
                       interpreter)
  PROPE_CUDA_SM90      which kernels the CUDA backend runs on an sm_90 GPU: unset = the SM90
                       kernels (wgmma, TMA) where the build has the 9.0a target, else the SM80
                       ones; 1 = the SM90 kernels or an error; 0 = the SM80 kernels (validated on
                       an H100 on 2026-11-26, bench/results; csrc/README.md)
  PROPE_CUDA_SM90_FWD  the CUDA backend's SM90 forward variant: overlap+lpt (default; softmax
                       overlapped with the GEMMs inside each consumer warpgroup, pingpong of the
                       two consumers at head_dim <= 128, longest-first launch order over the
                       whole grid: 554 TFLOP/s at gemma-2b on an H100), overlap, basic+lpt,
                       basic (the first mainloop: 480 TFLOP/s there); csrc/README.md
  PROPE_CUDA_ROT       how the CUDA kernels rotate in shared memory (the SM80 and SM90
                       forwards' Q tile, the SM90 fused backward's dK back): table (default: pairs in a run, the "half"
                       layout, in 16-byte chunks with cos/sin from a table the K pass writes;
                       other layouts one pair at a time) or pairs (always one pair at a time
                       with its angle, the kernels as measured on 2026-11-26)
  PROPE_CUDA_SM90_BWD  the SM90 backward: fused (default: one 5-GEMM kernel, dQ summed with
                       float4 atomics, FlashAttention-3's recipe) or split (a dK/dV kernel and a
                       dQ kernel, 7 GEMMs, no atomics: deterministic). deterministic=True or
                       torch.use_deterministic_algorithms(True) always run split
  PROPE_SDPA_KERNEL    cudnn | flash | efficient: the only PyTorch kernel the sdpa backend
                       considers (tests, benchmarks); unset: cuDNN, else flash, else efficient
  PROPE_DISPATCH_TABLE a dispatch table for backend="auto" other than the package's
                       prope_kernels/dispatch.json (tests, experiments)
  WORLD_SIZE, RANK, LOCAL_RANK   set by torchrun: the trainer's data-parallel processes
  PROPE_CACHE          where the trainer caches corpora and tokenizers (default
                       $XDG_CACHE_HOME/prope_kernels, i.e. ~/.cache/prope_kernels)
"""

from __future__ import annotations

import os


def _get(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


def interpreting() -> bool:
    """Triton kernels run under the CPU interpreter."""
    return _get("TRITON_INTERPRET", "0") == "1"


def poison() -> bool:
    """Fill new outputs with NaN before the kernels write them."""
    return _get("PROPE_POISON") == "1"


def autotune() -> bool:
    """Let the GPU autotuner try every row of a config table (False: the first row only)."""
    return _get("PROPE_AUTOTUNE", "1") != "0"


def kv_split() -> int:
    """The forced GQA split of the backward's dK/dV programs; 0: chosen by the launcher."""
    return int(_get("PROPE_KV_SPLIT", "0"))


TRITON_KERNELS = "PROPE_TRITON_KERNELS"


def triton_kernels() -> str:
    """"auto", "portable" or "hopper" (see the module docstring)."""
    mode = _get(TRITON_KERNELS, "portable") or "portable"
    if mode not in ("auto", "portable", "hopper"):
        raise ValueError(f"{TRITON_KERNELS} must be 'auto', 'portable' or 'hopper', got {mode!r}")
    return mode


def cuda_sm90():
    """PROPE_CUDA_SM90: True forces the CUDA backend's SM90 kernels, False its SM80 kernels,
    None (unset or empty) lets it choose (SM90 on sm_90 where built)."""
    v = _get("PROPE_CUDA_SM90", "").strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    if v:
        raise ValueError(f"PROPE_CUDA_SM90 must be 1 or 0 (or unset), got {v!r}")
    return None


CUDA_SM90_FWD_MODES = ("basic", "overlap", "basic+lpt", "overlap+lpt")


def cuda_sm90_fwd() -> str:
    """PROPE_CUDA_SM90_FWD: which SM90 forward mainloop / launch order runs (CUDA_SM90_FWD_MODES);
    unset or empty: "overlap+lpt" (measured on an H100, 2026-11-26: 0.993 ms against 1.145 for
    basic at the gemma-2b shape)."""
    v = _get("PROPE_CUDA_SM90_FWD", "").strip().lower() or "overlap+lpt"
    if v not in CUDA_SM90_FWD_MODES:
        raise ValueError(f"PROPE_CUDA_SM90_FWD must be one of {', '.join(CUDA_SM90_FWD_MODES)}, "
                         f"got {v!r}")
    return v


def cuda_rot() -> str:
    """PROPE_CUDA_ROT: "table" (default, also when unset or empty) or "pairs"."""
    v = _get("PROPE_CUDA_ROT", "").strip().lower() or "table"
    if v not in ("table", "pairs"):
        raise ValueError(f"PROPE_CUDA_ROT must be 'table' or 'pairs' (or unset), got {v!r}")
    return v


def cuda_sm90_bwd() -> str:
    """PROPE_CUDA_SM90_BWD: "fused" (default, also when unset or empty) or "split"."""
    v = _get("PROPE_CUDA_SM90_BWD", "").strip().lower() or "fused"
    if v not in ("fused", "split"):
        raise ValueError(f"PROPE_CUDA_SM90_BWD must be 'fused' or 'split' (or unset), got {v!r}")
    return v


def cache_dir() -> str:
    """Where the trainer caches built corpora and tokenizers."""
    return _get("PROPE_CACHE") or os.path.join(
        _get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "prope_kernels")


def sdpa_kernel() -> str:
    """The PyTorch kernel forced on the sdpa backend; "" when it chooses."""
    return _get("PROPE_SDPA_KERNEL").strip()


def dispatch_table() -> str:
    """Path of the auto dispatch table; "" for the package's own."""
    return _get("PROPE_DISPATCH_TABLE")


def distributed() -> tuple:
    """(world size, rank, local rank) of a torchrun process; (1, 0, 0) otherwise."""
    return int(_get("WORLD_SIZE", "1")), int(_get("RANK", "0")), int(_get("LOCAL_RANK", "0"))
