"""The backends: one leaf module each (reference.py, triton/, cuda.py, sdpa.py), the registry
that lists them (registry.py: what each can run, imported lazily), and what they share
(common.py). The contract every backend implements is in :mod:`prope_kernels.backends.registry`.

``from prope_kernels import backends`` gives the registry's API (``backends.get``,
``backends.names``, ``backends.REGISTRY``, ...) and ``backends.launched``; it imports no
backend module (a backend is imported when it first runs).
"""

from .common import launched, record_launch, refuse_features  # noqa: F401
from .registry import (ALL_DTYPES, AUTO_ORDER, KERNEL_DTYPES, KERNEL_SOURCES,  # noqa: F401
                       REGISTRY, Backend, choices, choose_auto, describe_error, get, import_error,
                       kernel_hash, kernel_hashes, names, register, resolve)
