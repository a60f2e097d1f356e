"""The backend registry (prope_kernels/backends): every entry provides the op contract, the
model and the trainer offer exactly the registered names, and the ``auto`` policy."""

import types

import pytest
import torch

from prope_kernels import backends
from prope_kernels import cuda as cuda_backend
from prope_kernels.models.gemma import ATTN_BACKENDS


def test_every_backend_has_the_op_contract():
    for name in backends.names():
        entry = backends.get(name)
        if name == "triton" and entry.unavailable() is not None:
            continue
        mod = entry.load()
        for fn in ("attn_fwd", "attn_bwd", "rope"):
            assert callable(getattr(mod, fn, None)), f"backend {name!r} lacks {fn}"


def test_model_choices_are_the_registry():
    assert ATTN_BACKENDS == ("auto",) + backends.names() + ("unfused",)
    assert "unfused" not in backends.names()


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        backends.resolve("cudnn", torch.zeros(1, 2, 8))


def _like(device, dtype=torch.bfloat16, d=128):
    # auto reads only the device, dtype and head_dim of q: a stand-in CUDA "tensor" lets the
    # policy be tested on a machine without a GPU
    return types.SimpleNamespace(device=torch.device(device), dtype=dtype, shape=(2, 8, 4, d))


@pytest.mark.parametrize("cuda_built,cuda_faster,device,dtype,d,want", [
    (False, False, "cuda", torch.bfloat16, 128, "triton"),
    (True, False, "cuda", torch.float16, 128, "triton"),     # built, not (yet) preferred
    (True, True, "cuda", torch.bfloat16, 128, "cuda"),
    (True, True, "cuda", torch.bfloat16, 96, "triton"),      # CUDA: head_dim 64/128/256 only
    (True, True, "cuda", torch.bfloat16, 384, "reference"),  # Triton: <= 256 or 512
    (True, True, "cuda", torch.float32, 128, "reference"),   # kernels: fp16/bf16 only
    (True, True, "cpu", torch.bfloat16, 128, "reference"),   # CPU: even under the interpreter
])
def test_auto_policy(monkeypatch, cuda_built, cuda_faster, device, dtype, d, want):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(cuda_backend, "available", lambda: cuda_built)
    monkeypatch.setattr(cuda_backend, "preferred_over_triton", lambda x: cuda_faster)
    if backends.get("triton").unavailable() is not None:
        pytest.skip("triton is not installed")
    assert backends.choose_auto(_like(device, dtype, d)) == want


def test_cuda_not_built_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(cuda_backend, "available", lambda: False)
    with pytest.raises(ValueError, match="backend='cuda' needs the compiled extension"):
        backends.get("cuda").check(_like("cuda"))
    # the real state of this machine: without a GPU the extension is never usable
    if not torch.cuda.is_available():
        monkeypatch.undo()
        assert cuda_backend.available() is False
        assert backends.get("cuda").unavailable() is not None
