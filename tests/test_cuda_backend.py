"""CUDA C++ backend (csrc/, prope_kernels._C) against the float64 reference, and against Triton.

On a GPU with the extension built: the tolerance rule of tolerance.py (kernel error <= 2x the error
of the same math done by PyTorch in the kernel dtype, plus the rounding floor) for the forward and
dq, dk, dv over the shape matrix. Without a GPU: the package imports, ``available()`` is False and
backend='cuda' refuses CPU tensors with a ValueError. The capability checks run at test time.
"""

import zlib

import pytest
import torch

import prope_kernels
from prope_kernels import apply_prope, prope_attention, prope_attention_varlen
from prope_kernels import cuda as cuda_backend
from prope_kernels import reference as ref
from prope_kernels.rotary import PRoPESpec
from tolerance import check

HEADS = {"mha": (4, 4), "gqa": (6, 2), "mqa": (3, 1)}


def _need_cuda_ext():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (none present)")
    if not cuda_backend.available():
        pytest.skip(f"CUDA extension prope_kernels._C not built: {cuda_backend.load_error()}")
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("needs compute capability >= 8.0")


def _seed(*key) -> int:
    return zlib.crc32(repr(key).encode())


def _rand(shape, dtype, gen, scale=1.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float32) * scale).to("cuda", dtype)


def _grads(fn, inputs, dout):
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*inputs)
    return (out, *torch.autograd.grad(out, inputs, dout))


def _run_dense(dtype, b, s, hq, hkv, d, p=0.75, variant="prope", layout="half", causal=True,
               theta=10000.0, positions=None, scale=None, parity=False):
    gen = torch.Generator().manual_seed(_seed("cuda", b, s, hq, hkv, d, p, variant, layout, causal,
                                              dtype))
    q, dout = (_rand((b, s, hq, d), dtype, gen) for _ in range(2))
    k, v = (_rand((b, s, hkv, d), dtype, gen) for _ in range(2))
    spec = PRoPESpec(d, p, theta, variant, layout)

    def kern(backend):
        return lambda q, k, v: prope_attention(q, k, v, p=p, theta=theta, variant=variant,
                                               layout=layout, causal=causal, positions=positions,
                                               softmax_scale=scale, backend=backend)

    got = _grads(kern("cuda"), (q, k, v), dout)
    truth = _grads(lambda q, k, v: ref.prope_attention(q, k, v, spec, causal, scale, positions),
                   [x.double() for x in (q, k, v)], dout.double())
    lowp = _grads(lambda q, k, v: ref.prope_attention(q, k, v, spec, causal, scale, positions),
                  (q, k, v), dout)
    for name, g, t, lp in zip(("out", "dq", "dk", "dv"), got, truth, lowp):
        check(name, g, t, lp)
    if parity:
        tri = _grads(kern("triton"), (q, k, v), dout)
        for name, g, t, tr, lp in zip(("out", "dq", "dk", "dv"), got, truth, tri, lowp):
            check(name + " (triton)", tr, t, lp)  # both backends meet the rule on the same draw
            # and agree with each other: each is within 2x of PyTorch's error, so 4x between them
            check(name + " (cuda vs triton)", g, tr.double(), lp.double() - t + tr.double(),
                  factor=4.0)


# --- without a GPU ------------------------------------------------------------------------------

def test_imports_without_extension():
    assert hasattr(prope_kernels, "prope_attention")
    assert isinstance(cuda_backend.available(), bool)
    if not torch.cuda.is_available():
        assert cuda_backend.available() is False
    assert cuda_backend.preferred_over_triton(torch.zeros(1)) is False


def test_cuda_backend_rejects_cpu_tensors():
    q = torch.randn(1, 8, 2, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="backend='cuda'"):
        prope_attention(q, q, q, backend="cuda")
    with pytest.raises(ValueError, match="backend='cuda'"):
        apply_prope(q, backend="cuda")


# --- on a GPU -----------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads", ["mha", "gqa", "mqa"])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("s", [1, 97, 1025, 4096])
def test_shapes(s, d, heads, causal):
    _need_cuda_ext()
    hq, hkv = HEADS[heads]
    dtype = torch.bfloat16 if (s + d + len(heads)) % 2 else torch.float16
    _run_dense(dtype, 1 if s == 4096 else 2, s, hq, hkv, d, causal=causal)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("variant", ["prope", "reversed", "partial"])
@pytest.mark.parametrize("p", [0.0, 0.25, 0.75, 1.0])
def test_rotation_variants(p, variant, layout):
    _need_cuda_ext()
    causal = bool(int(p * 4) % 2)
    for dtype, d in ((torch.bfloat16, 64), (torch.float16, 128)):
        _run_dense(dtype, 2, 97, 4, 2, d, p=p, variant=variant, layout=layout, causal=causal)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
def test_varlen_uneven(dtype, causal):
    _need_cuda_ext()
    lens = [1, 97, 0, 300, 64, 1025, 5]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    total, hq, hkv, d = int(cu[-1]), 6, 2, 128
    gen = torch.Generator().manual_seed(_seed("varlen", dtype, causal))
    q, dout = (_rand((total, hq, d), dtype, gen) for _ in range(2))
    k, v = (_rand((total, hkv, d), dtype, gen) for _ in range(2))
    spec = PRoPESpec(d, 0.75, 10000.0, "prope", "half")
    got = _grads(lambda q, k, v: prope_attention_varlen(q, k, v, cu, max(lens), causal=causal,
                                                        backend="cuda"), (q, k, v), dout)
    truth = _grads(lambda q, k, v: ref.prope_attention_varlen(q, k, v, cu, spec, causal),
                   [x.double() for x in (q, k, v)], dout.double())
    lowp = _grads(lambda q, k, v: ref.prope_attention_varlen(q, k, v, cu, spec, causal),
                  (q, k, v), dout)
    for name, g, t, lp in zip(("out", "dq", "dk", "dv"), got, truth, lowp):
        check(name, g, t, lp)


@pytest.mark.gpu
def test_long_positions_and_scale():
    # positions near 1e6: the float64 angle + 2*pi reduction path
    _need_cuda_ext()
    pos = torch.arange(97, device="cuda") + 1_000_000
    _run_dense(torch.float16, 2, 97, 4, 1, 128, p=1.0, theta=500000.0, positions=pos, scale=0.3)


@pytest.mark.gpu
def test_lse_and_its_gradient():
    _need_cuda_ext()
    gen = torch.Generator().manual_seed(_seed("lse"))
    b, s, hq, hkv, d = 2, 130, 4, 2, 64
    q, dout = (_rand((b, s, hq, d), torch.bfloat16, gen) for _ in range(2))
    k, v = (_rand((b, s, hkv, d), torch.bfloat16, gen) for _ in range(2))
    dlse = torch.randn(b, hq, s, generator=gen).cuda()
    spec = PRoPESpec(d, 0.75)

    def run(fn, inputs):
        inputs = [x.detach().clone().requires_grad_() for x in inputs]
        out, lse = fn(*inputs)
        loss = (out * dout.to(out.dtype)).sum() + (lse * dlse.to(lse.dtype)).sum()
        grads = torch.autograd.grad(loss, inputs)
        return (out, lse, *grads)

    got = run(lambda q, k, v: prope_attention(q, k, v, backend="cuda", return_lse=True), (q, k, v))
    truth = run(lambda q, k, v: ref.prope_attention(q, k, v, spec, return_lse=True),
                [x.double() for x in (q, k, v)])
    lowp = run(lambda q, k, v: ref.prope_attention(q, k, v, spec, return_lse=True), (q, k, v))
    for name, g, t, lp in zip(("out", "lse", "dq", "dk", "dv"), got, truth, lowp):
        check(name, g, t, lp)


@pytest.mark.gpu
@pytest.mark.parametrize("conjugate", [False, True])
@pytest.mark.parametrize("variant,layout", [("prope", "half"), ("reversed", "interleaved"),
                                            ("partial", "half")])
def test_rope_op(variant, layout, conjugate):
    _need_cuda_ext()
    gen = torch.Generator().manual_seed(_seed("rope", variant, layout, conjugate))
    x = _rand((3, 257, 5, 128), torch.bfloat16, gen)
    spec = PRoPESpec(128, 0.75, 10000.0, variant, layout)
    pos = torch.arange(257, device="cuda") * 131
    got = apply_prope(x, pos, variant=variant, layout=layout, conjugate=conjugate, backend="cuda")
    truth = ref.apply_prope(x.double(), pos, spec, conjugate)
    lowp = ref.apply_prope(x, pos, spec, conjugate)
    check("rope", got, truth, lowp)
    ident = spec.identity_dims()
    assert torch.equal(got[..., ident], x[..., ident]), "identity dims must be copied exactly"


@pytest.mark.gpu
@pytest.mark.parametrize("d,heads", [(64, "mha"), (128, "gqa"), (256, "mqa")])
def test_parity_with_triton(d, heads):
    _need_cuda_ext()
    hq, hkv = HEADS[heads]
    _run_dense(torch.bfloat16, 2, 1025, hq, hkv, d, p=0.25, parity=True)


def test_misaligned_contiguous_inputs():
    # A contiguous view whose base is not 16-byte aligned (storage offset 1 element): the binding
    # copies it to an aligned tensor (the kernels' cp.async moves 16 bytes) instead of faulting.
    _need_cuda_ext()
    b, s, h, d = 2, 77, 4, 64
    gen = torch.Generator().manual_seed(17)
    bufs = [_rand((1 + b * s * h * d,), torch.float16, gen) for _ in range(3)]
    q, k, v = (x[1:].view(b, s, h, d) for x in bufs)
    assert q.is_contiguous() and q.data_ptr() % 16 != 0
    got = prope_attention(q, k, v, backend="cuda")
    want = prope_attention(q.clone(), k.clone(), v.clone(), backend="cuda")
    assert torch.equal(got, want)


def test_deterministic_mode_refuses_atomic_backward():
    # dQ is summed with float atomics: torch's deterministic mode must refuse it, not let it
    # through silently (the Triton backend is the deterministic choice there).
    _need_cuda_ext()
    gen = torch.Generator().manual_seed(23)
    q, k, v = (_rand((1, 33, 2, 64), torch.bfloat16, gen).requires_grad_() for _ in range(3))
    out = prope_attention(q, k, v, backend="cuda")
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(RuntimeError, match="deterministic"):
            out.sum().backward()
    finally:
        torch.use_deterministic_algorithms(False)


# --- the SM90 kernels (wgmma + TMA), opt-in with PROPE_CUDA_SM90=1 ------------------------------
# Each case runs the SM90 forward and the SM90 backward (out, dq, dk, dv vs the float64 reference).

def test_sm90_is_opt_in(monkeypatch):
    # Until a GPU has validated them, the SM90 kernels never replace the SM80 ones by default.
    monkeypatch.delenv("PROPE_CUDA_SM90", raising=False)
    assert cuda_backend.sm90_requested() is False
    assert cuda_backend._family() == cuda_backend.FAMILY_AUTO
    for on in ("1", "true", "on"):
        monkeypatch.setenv("PROPE_CUDA_SM90", on)
        assert cuda_backend._family() == cuda_backend.FAMILY_SM90
    monkeypatch.setenv("PROPE_CUDA_SM90", "0")
    assert cuda_backend.sm90_requested() is False


@pytest.fixture
def sm90(monkeypatch):
    """Force the SM90 kernels. Skips only off Hopper (the kernels are sm_90a code); on an sm_90
    device a build without the sm_90a target makes the op raise, so the test fails."""
    _need_cuda_ext()
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the SM90 kernels run on sm_90 (H100/H200) only")
    monkeypatch.setenv("PROPE_CUDA_SM90", "1")


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads", ["mha", "gqa", "mqa"])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("s", [1, 97, 1025])
def test_sm90_shapes(sm90, s, d, heads, causal):
    hq, hkv = HEADS[heads]
    dtype = torch.bfloat16 if (s + d + len(heads)) % 2 else torch.float16
    _run_dense(dtype, 2, s, hq, hkv, d, causal=causal)


@pytest.mark.gpu
@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_sm90_gqa_groups(sm90, d, group):
    _run_dense(torch.bfloat16, 1, 300, 8, 8 // group, d, p=0.25, causal=True)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("variant", ["prope", "reversed", "partial"])
@pytest.mark.parametrize("p", [0.0, 0.25, 0.75, 1.0])
def test_sm90_rotation_variants(sm90, p, variant, layout):
    causal = bool(int(p * 4) % 2)
    for dtype, d in ((torch.bfloat16, 64), (torch.float16, 128), (torch.bfloat16, 256)):
        _run_dense(dtype, 2, 97, 4, 2, d, p=p, variant=variant, layout=layout, causal=causal)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
def test_sm90_varlen_uneven(sm90, dtype, causal):
    test_varlen_uneven(dtype, causal)


@pytest.mark.gpu
def test_sm90_long_positions_and_scale(sm90):
    pos = torch.arange(1025, device="cuda") + 1_000_000
    _run_dense(torch.float16, 2, 1025, 4, 1, 128, p=1.0, theta=500000.0, positions=pos, scale=0.3)


@pytest.mark.gpu
def test_sm90_lse_and_its_gradient(sm90):
    test_lse_and_its_gradient()


@pytest.mark.gpu
@pytest.mark.parametrize("d,heads", [(64, "mha"), (128, "gqa"), (256, "mqa")])
def test_sm90_parity_with_triton(sm90, d, heads):
    hq, hkv = HEADS[heads]
    _run_dense(torch.bfloat16, 2, 4096, hq, hkv, d, p=0.75, parity=True)


@pytest.mark.gpu
def test_sm90_misaligned_contiguous_inputs(sm90):
    test_misaligned_contiguous_inputs()
