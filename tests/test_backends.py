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


def test_cuda_softcap_not_with_the_deterministic_backward(monkeypatch):
    # on an sm_90 GPU the CUDA backend has window and softcap, but its deterministic (split)
    # backward has no softcap: the combination is refused before the forward runs, and auto
    # passes cuda over for it (a stand-in sm_90 "tensor": no GPU needed)
    monkeypatch.setattr(cuda_backend, "available", lambda: True)
    monkeypatch.setattr(cuda_backend, "sm90_runs", lambda device: True)
    monkeypatch.setattr(cuda_backend, "preferred_over_triton", lambda x: True)
    cuda = backends.get("cuda")
    x = _like("cuda")
    assert cuda.can_run(x, frozenset({"softcap"}))
    assert cuda.can_run(x, frozenset({"window", "deterministic"}))
    assert not cuda.can_run(x, frozenset({"softcap", "deterministic"}))
    with pytest.raises(ValueError, match="backend='cuda' does not implement softcap"):
        cuda.check(x, frozenset({"softcap", "deterministic"}))


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


# --- one decision per call: the plan ----------------------------------------------------------

class _Count:
    """Wraps ``fn`` and counts its calls (reset by ``take``)."""

    def __init__(self, fn):
        self.fn, self.n = fn, 0

    def __call__(self, *a, **kw):
        self.n += 1
        return self.fn(*a, **kw)

    def take(self):
        n, self.n = self.n, 0
        return n


def _qkv(b=2, s=24, hq=4, hkv=2, d=32, grad=True):
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(b, s, h, d, generator=g) * 0.5).half().requires_grad_(grad)
            for h in (hq, hkv, hkv)]


def test_named_sdpa_chooses_its_kernel_once_per_call(monkeypatch):
    # backend="sdpa": PyTorch's kernel is chosen once (the plan), before the forward; the
    # op's forward and backward run that plan without asking torch again (they chose it
    # twice more before)
    from prope_kernels import explain, prope_attention, prope_attention_varlen
    from prope_kernels.backends import sdpa
    choose = _Count(sdpa.choose)
    monkeypatch.setattr(sdpa, "choose", choose)
    q, k, v = _qkv()
    out = prope_attention(q, k, v, backend="sdpa")
    assert choose.take() == 1
    assert backends.launched(clear=True)["fwd"] == {"backend": "sdpa", "kernel": "cpu_flash"}
    out.float().sum().backward()
    assert choose.take() == 0
    assert backends.launched(clear=True)["bwd"] == {"backend": "sdpa", "kernel": "cpu_flash"}
    dec = explain(q, k, v, backend="sdpa")
    assert choose.take() == 1 and dec.plan == "sdpa:cpu_flash"
    assert "plan: sdpa:cpu_flash" in str(dec)
    # varlen (a per-sequence loop on the CPU): the same
    qp, kp, vp = (x.detach().flatten(0, 1).requires_grad_() for x in (q, k, v))
    cu = torch.tensor([0, 5, 24, 48], dtype=torch.int32)
    prope_attention_varlen(qp, kp, vp, cu, 24, backend="sdpa").float().sum().backward()
    assert choose.take() == 1


def test_auto_decides_once_and_the_backward_runs_its_plan(monkeypatch):
    # auto: dispatch.decide runs once per call, in the public function, and its plan (here a
    # stand-in decision for the sdpa backend with a named kernel) reaches forward and backward
    # unchanged: no second decision, no kernel choice downstream
    from prope_kernels import dispatch, explain, prope_attention
    from prope_kernels.backends import sdpa
    decided = dispatch.Decision("sdpa", "test", "default", kernel="cpu_flash")
    decide = _Count(lambda *a, **kw: decided)
    choose = _Count(sdpa.choose)
    monkeypatch.setattr(dispatch, "decide", decide)
    monkeypatch.setattr(sdpa, "choose", choose)
    q, k, v = _qkv()
    out = prope_attention(q, k, v)
    assert (decide.take(), choose.take()) == (1, 0)
    assert backends.launched()["fwd"] == {"backend": "sdpa", "kernel": "cpu_flash"}
    out.float().sum().backward()
    assert (decide.take(), choose.take()) == (0, 0)
    assert backends.launched(clear=True)["bwd"] == {"backend": "sdpa", "kernel": "cpu_flash"}
    # explain() returns the very decision the call runs
    assert explain(q, k, v) is decided and decide.take() == 1


def test_auto_on_the_cpu_decides_once(monkeypatch):
    from prope_kernels import dispatch, prope_attention
    decide = _Count(dispatch.decide)
    monkeypatch.setattr(dispatch, "decide", decide)
    q, k, v = (x.detach().float().requires_grad_() for x in _qkv(grad=False))
    prope_attention(q, k, v).sum().backward()
    assert decide.take() == 1
    assert backends.launched(clear=True)["bwd"]["backend"] == "reference"


def test_plan_strings():
    from prope_kernels import dispatch
    assert dispatch.parse_plan("sdpa:flash") == ("sdpa", "flash")
    assert dispatch.parse_plan("triton") == ("triton", None)
    assert dispatch.Decision("sdpa", "", "requested", kernel="cudnn").plan == "sdpa:cudnn"
    assert dispatch.Decision("cuda", "", "default").plan == "cuda"


def test_sdpa_plan_is_checked(monkeypatch):
    # a plan the shapes cannot run (a direct op call with a wrong kernel) is a clear error
    from prope_kernels.backends import sdpa
    q, k, v = (x.detach().flatten(0, 1) for x in _qkv(grad=False))
    with pytest.raises(ValueError, match="kernel must be one of"):
        sdpa.planned("math", q, k, 2, 24)
    with pytest.raises(ValueError, match="dense batches only"):
        sdpa.planned("cudnn", q, k, 3, 24)
    ch = sdpa.planned("efficient", q, k, 2, 24)
    assert ch.dense and ch.expand_kv


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["sdpa", "auto"])
def test_gpu_one_decision_per_call(monkeypatch, backend):
    # on a GPU: torch's kernel checks run once per call (named sdpa) and auto decides once; the
    # backward runs the kernel the forward ran, which is the one explain() names
    from prope_kernels import dispatch, explain, prope_attention
    from prope_kernels.backends import sdpa
    choose, decide = _Count(sdpa.choose), _Count(dispatch.decide)
    monkeypatch.setattr(sdpa, "choose", choose)
    monkeypatch.setattr(dispatch, "decide", decide)
    g = torch.Generator(device="cuda").manual_seed(3)
    q, k, v = (torch.randn(2, 200, h, 64, device="cuda", generator=g, dtype=torch.bfloat16)
               .requires_grad_() for h in (8, 2, 2))
    dec = explain(q, k, v, backend=backend)
    choose.take(), decide.take()
    backends.launched(clear=True)
    out = prope_attention(q, k, v, backend=backend)
    assert choose.take() <= 1 and decide.take() == (backend == "auto")
    out.float().sum().backward()
    torch.cuda.synchronize()
    assert (choose.take(), decide.take()) == (0, 0)
    ran = backends.launched(clear=True)
    assert ran["fwd"]["backend"] == ran["bwd"]["backend"] == dec.backend, (ran, str(dec))
    if dec.backend == "sdpa":
        assert ran["fwd"]["kernel"] == ran["bwd"]["kernel"] == dec.kernel, (ran, str(dec))
