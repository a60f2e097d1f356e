"""The backend registry (prope_kernels/backends): every entry provides the op contract, the
model and the trainer offer exactly the registered names, and the ``auto`` policy."""

import types

import pytest
import torch

from prope_kernels import backends
from prope_kernels.backends import cuda as cuda_backend
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


def test_launches_are_recorded_as_resolved(monkeypatch):
    # what ran, read back from the backend: the reference here, and the CUDA backend's family as
    # the extension resolves it (faked: no GPU) with the SM90 variant the call passed
    from prope_kernels import prope_attention
    q, k, v = (torch.randn(1, 8, h, 16) for h in (2, 1, 1))
    backends.launched(clear=True)
    prope_attention(q.requires_grad_(), k, v, backend="reference").sum().backward()
    assert backends.launched() == {"fwd": {"backend": "reference"},
                                   "bwd": {"backend": "reference"}}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda dev=None: (9, 0))
    fake = types.SimpleNamespace(resolve_family=lambda sm, fam: fam or (2 if sm == 90 else 1))
    monkeypatch.setattr(torch.ops, "prope_cuda", fake, raising=False)
    cuda_backend._record("fwd", "cuda", cuda_backend.FAMILY_AUTO, "overlap+lpt")
    cuda_backend._record("bwd", "cuda", cuda_backend.FAMILY_SM80, "split")
    assert backends.launched(clear=True) == {
        "fwd": {"backend": "cuda", "family": "sm90", "variant": "overlap+lpt"},
        "bwd": {"backend": "cuda", "family": "sm80", "variant": ""}}
    assert backends.launched() == {}
    # an extension built before resolve_family: only what was requested is known
    monkeypatch.setattr(torch.ops, "prope_cuda", types.SimpleNamespace(), raising=False)
    assert cuda_backend.resolved_family("cuda", cuda_backend.FAMILY_AUTO).startswith("unresolved")
    assert cuda_backend.resolved_family("cuda", cuda_backend.FAMILY_SM90) == "sm90"
