"""The package on a machine without a GPU, whichever torch build is installed.

A plain ``pip install`` resolves the CUDA build of torch; on a CPU machine it has no driver, and
any call that asks the device something (torch's SDPA eligibility checks, stream queries) raises.
Every public function on CPU tensors must still work there, and no backend decision may raise a
CUDA error. CI runs this file in exactly that environment (the README's install in a fresh venv).
"""

import pytest
import torch

from prope_kernels import apply_prope, explain, prope_attention, prope_attention_varlen
from prope_kernels.backends import sdpa


def _qkv(shape_q, shape_k, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(*shape_q, generator=g, dtype=torch.float32)
    k = torch.randn(*shape_k, generator=g, dtype=torch.float32)
    v = torch.randn(*shape_k, generator=g, dtype=torch.float32)
    return (t.requires_grad_() for t in (q, k, v))


@pytest.mark.parametrize("backend", ["auto", "reference", "sdpa"])
def test_public_functions_on_cpu_tensors(backend):
    # dense, varlen, the rotation alone and explain(): forward, backward, finite, no CUDA error
    q, k, v = _qkv((2, 12, 4, 32), (2, 12, 2, 32))
    out = prope_attention(q, k, v, p=0.75, backend=backend)
    out.square().sum().backward()
    for t in (out, q.grad, k.grad, v.grad):
        assert torch.isfinite(t).all()
    dec = explain(q, k, v, backend=backend)
    assert dec.backend == ("reference" if backend == "auto" else backend), str(dec)

    q, k, v = _qkv((20, 4, 32), (20, 2, 32), seed=1)
    cu = torch.tensor([0, 7, 20], dtype=torch.int32)
    out = prope_attention_varlen(q, k, v, cu, 13, p=0.5, backend=backend)
    assert explain(q, k, v, cu, 13, backend=backend).backend == dec.backend
    out.square().sum().backward()
    for t in (out, q.grad, k.grad, v.grad):
        assert torch.isfinite(t).all()

    x = torch.randn(2, 12, 4, 32, requires_grad=True)
    y = apply_prope(x, p=0.25, backend="reference" if backend == "sdpa" else backend)
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_gpu_kernel_choice_survives_a_failing_device_query(monkeypatch):
    # A CUDA build of torch without a driver: torch's eligibility checks raise
    # (torch.AcceleratorError, a RuntimeError). The choice refuses each kernel with that reason.
    def broken(params, debug=False):
        raise RuntimeError("CUDA error: CUDA driver version is insufficient for CUDA runtime "
                           "version\nmore detail")
    for name in ("can_use_cudnn_attention", "can_use_flash_attention",
                 "can_use_efficient_attention"):
        monkeypatch.setattr(torch.backends.cuda, name, broken)
    q = torch.empty(2 * 24, 4, 64, dtype=torch.bfloat16)
    k = torch.empty(2 * 24, 2, 64, dtype=torch.bfloat16)
    ch = sdpa._choose_gpu(q, k, 2, 24, True, True, None)
    assert ch.kernel is None
    for kern in sdpa.GPU_KERNELS:
        assert f"{kern}: torch's check could not run (RuntimeError: CUDA error: CUDA driver " \
               "version is insufficient for CUDA runtime version)" in ch.why, ch.why
