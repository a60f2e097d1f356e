"""Test setup shared by every test file.

Without a GPU the Triton kernels run under the CPU interpreter: TRITON_INTERPRET must be set before
triton is first imported, so it is set here, at collection. Outputs are poisoned with NaN
(PROPE_POISON) so anything a kernel fails to write is caught.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("PROPE_POISON", "1")
# GPU runs: no autotuning (the first config of each table) so that the suite stays fast;
# test_triton_configs.py runs every tuned config once.
os.environ.setdefault("PROPE_AUTOTUNE", "0")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none present)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _release_gpu_cache():
    """GPU runs: 8 pytest-xdist processes share one GPU, and torch's caching allocator keeps a
    process's peak reserved after its test ends (one held 27.5 GiB while others ran out of
    memory): hand the cached blocks back after every test."""
    yield
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


@pytest.fixture
def device():
    """The machine's device: "cuda" on a GPU machine, else "cpu" (Triton kernels interpreted).
    Tests that mean "whatever the machine has" take it and pass on both; a test about CPU tensors
    builds them on the CPU explicitly; GPU-only tests carry @pytest.mark.gpu."""
    return DEVICE
