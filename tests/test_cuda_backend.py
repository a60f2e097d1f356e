"""CUDA C++ backend (csrc/, prope_kernels._C) against the float64 reference, and against Triton.

On a GPU with the extension built: the tolerance rule of tolerance.py (kernel error <= 2x the error
of the same math done by PyTorch in the kernel dtype, plus the rounding floor) for the forward and
dq, dk, dv over the shape matrix (the shared harness, harness.py). Without a GPU: backend='cuda'
refuses CPU tensors with a ValueError. The capability checks run at test time.
"""

import pytest
import torch

from harness import HEADS, rand, run_dense, run_varlen, seed
from prope_kernels import apply_prope, prope_attention
from prope_kernels.backends import cuda as cuda_backend
from prope_kernels import reference as ref
from prope_kernels.rotary import PRoPESpec
from tolerance import check


def _need_cuda_ext():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (none present)")
    if not cuda_backend.available():
        pytest.skip(f"CUDA extension prope_kernels._C not built: {cuda_backend.load_error()}")
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("needs compute capability >= 8.0")


def _run_dense(dtype, b, s, hq, hkv, d, parity=False, **kw):
    run_dense("cuda", dtype, b, s, hq, hkv, d, backend="cuda", also="triton" if parity else None,
              **kw)


# --- without a GPU ------------------------------------------------------------------------------

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
    run_varlen("cuda", dtype, [1, 97, 0, 300, 64, 1025, 5], 6, 2, 128, causal=causal,
               backend="cuda")


@pytest.mark.gpu
def test_long_positions_and_scale():
    # positions near 1e6: the float64 angle + 2*pi reduction path
    _need_cuda_ext()
    pos = torch.arange(97, device="cuda") + 1_000_000
    _run_dense(torch.float16, 2, 97, 4, 1, 128, p=1.0, theta=500000.0, positions=pos, scale=0.3)


@pytest.mark.gpu
def test_lse_and_its_gradient():
    _need_cuda_ext()
    _run_dense(torch.bfloat16, 2, 130, 4, 2, 64, lse=True)


@pytest.mark.gpu
@pytest.mark.parametrize("conjugate", [False, True])
@pytest.mark.parametrize("variant,layout", [("prope", "half"), ("reversed", "interleaved"),
                                            ("partial", "half")])
def test_rope_op(variant, layout, conjugate):
    _need_cuda_ext()
    gen = torch.Generator().manual_seed(seed("rope", variant, layout, conjugate))
    x = rand((3, 257, 5, 128), torch.bfloat16, "cuda", gen)
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


@pytest.mark.gpu
def test_misaligned_contiguous_inputs():
    # A contiguous view whose base is not 16-byte aligned (storage offset 1 element): the binding
    # copies it to an aligned tensor (the kernels' cp.async moves 16 bytes) instead of faulting.
    _need_cuda_ext()
    b, s, h, d = 2, 77, 4, 64
    gen = torch.Generator().manual_seed(17)
    bufs = [rand((1 + b * s * h * d,), torch.float16, "cuda", gen) for _ in range(3)]
    q, k, v = (x[1:].view(b, s, h, d) for x in bufs)
    assert q.is_contiguous() and q.data_ptr() % 16 != 0
    got = prope_attention(q, k, v, backend="cuda")
    want = prope_attention(q.clone(), k.clone(), v.clone(), backend="cuda")
    assert torch.equal(got, want)


def _refuses_in_deterministic_mode():
    gen = torch.Generator().manual_seed(23)
    q, k, v = (rand((1, 33, 2, 64), torch.bfloat16, "cuda", gen).requires_grad_()
               for _ in range(3))
    out = prope_attention(q, k, v, backend="cuda")
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(RuntimeError, match="deterministic"):
            out.sum().backward()
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.gpu
def test_deterministic_mode_refuses_atomic_backward(monkeypatch):
    # The SM80 backward sums dQ with float atomics: torch's deterministic mode must refuse it, not
    # let it through silently (the SM90 split backward and the Triton backend are deterministic).
    _need_cuda_ext()
    monkeypatch.setenv("PROPE_CUDA_SM90", "0")
    _refuses_in_deterministic_mode()


@pytest.mark.gpu
def test_deterministic_keyword_refused_by_the_sm80_kernels(monkeypatch):
    _need_cuda_ext()
    monkeypatch.setenv("PROPE_CUDA_SM90", "0")
    gen = torch.Generator().manual_seed(3)
    q, k, v = (rand((1, 33, 2, 64), torch.bfloat16, "cuda", gen).requires_grad_() for _ in range(3))
    out = prope_attention(q, k, v, backend="cuda", deterministic=True)
    with pytest.raises(ValueError, match="deterministic=True needs its SM90 kernels"):
        out.sum().backward()


# --- the SM90 kernels (wgmma + TMA): the default on sm_90, forced with PROPE_CUDA_SM90=1 ----------
# Each case runs the SM90 forward and the SM90 backward (out, dq, dk, dv vs the float64 reference).

def test_sm90_switch(monkeypatch):
    # unset: the extension picks (SM90 on sm_90 where built); 1 forces SM90; 0 forces SM80
    monkeypatch.delenv("PROPE_CUDA_SM90", raising=False)
    assert cuda_backend.sm90_requested() is False
    assert cuda_backend._family() == cuda_backend.FAMILY_AUTO
    for on in ("1", "true", "on"):
        monkeypatch.setenv("PROPE_CUDA_SM90", on)
        assert cuda_backend.sm90_requested() is True
        assert cuda_backend._family() == cuda_backend.FAMILY_SM90
    for off in ("0", "false", "off"):
        monkeypatch.setenv("PROPE_CUDA_SM90", off)
        assert cuda_backend.sm90_requested() is False
        assert cuda_backend._family() == cuda_backend.FAMILY_SM80
    monkeypatch.setenv("PROPE_CUDA_SM90", "maybe")
    with pytest.raises(ValueError, match="PROPE_CUDA_SM90"):
        cuda_backend._family()


def test_sm90_bwd_switch(monkeypatch):
    # PROPE_CUDA_SM90_BWD: unset / fused -> the fused backward (0); split -> 1; anything else
    # raises. deterministic=True or torch's deterministic mode: split, whatever the switch says.
    monkeypatch.delenv("PROPE_CUDA_SM90_BWD", raising=False)
    assert cuda_backend._sm90_bwd() == cuda_backend.SM90_BWD_FUSED == 0
    monkeypatch.setenv("PROPE_CUDA_SM90_BWD", "Fused")
    assert cuda_backend._sm90_bwd() == cuda_backend.SM90_BWD_FUSED
    assert cuda_backend._sm90_bwd(deterministic=True) == cuda_backend.SM90_BWD_SPLIT
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        assert cuda_backend._sm90_bwd() == cuda_backend.SM90_BWD_SPLIT
    finally:
        torch.use_deterministic_algorithms(False)
    monkeypatch.setenv("PROPE_CUDA_SM90_BWD", "split")
    assert cuda_backend._sm90_bwd() == cuda_backend.SM90_BWD_SPLIT == 1
    for old in ("atomic", "fast"):
        monkeypatch.setenv("PROPE_CUDA_SM90_BWD", old)
        with pytest.raises(ValueError, match="PROPE_CUDA_SM90_BWD"):
            cuda_backend._sm90_bwd()


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
@pytest.mark.parametrize("d", [64, 128, 256])
def test_sm90_varlen_explicit_positions(sm90, d):
    run_varlen("cuda", torch.bfloat16, [130, 1, 0, 257, 64], 8, 2, d, p=0.5, causal=True,
               explicit_positions=True, backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("how", ["torch", "keyword"])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_sm90_deterministic_backward(sm90, monkeypatch, d, how):
    # torch's deterministic mode, or deterministic=True, runs the split backward (no atomics)
    # even with PROPE_CUDA_SM90_BWD=fused: two backward passes give bitwise equal gradients
    # (MQA, several key and q blocks, ragged tail) and the launch says split.
    from prope_kernels import backends
    monkeypatch.setenv("PROPE_CUDA_SM90_BWD", "fused")
    gen = torch.Generator().manual_seed(29)
    q = rand((2, 1000, 8, d), torch.bfloat16, "cuda", gen).requires_grad_()
    k, v = (rand((2, 1000, 1, d), torch.bfloat16, "cuda", gen).requires_grad_() for _ in range(2))
    do = rand((2, 1000, 8, d), torch.bfloat16, "cuda", gen)
    if how == "torch":
        torch.use_deterministic_algorithms(True)
    try:
        grads = []
        for _ in range(2):
            out = prope_attention(q, k, v, p=0.75, causal=True, backend="cuda",
                                  deterministic=how == "keyword")
            grads.append(torch.autograd.grad(out, (q, k, v), do))
            assert backends.launched()["bwd"]["variant"] == "split"
    finally:
        torch.use_deterministic_algorithms(False)
    for g0, g1 in zip(*grads):
        assert torch.isfinite(g0).all()
        assert torch.equal(g0, g1)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("d,heads", [(64, "mha"), (128, "gqa"), (256, "mqa")])
@pytest.mark.parametrize("bwd", ["fused", "split"])
def test_sm90_backward_designs(sm90, monkeypatch, bwd, d, heads, causal):
    # both SM90 backwards against the reference, named explicitly (the other SM90 tests run the
    # default, fused), with the launch read back
    from prope_kernels import backends
    monkeypatch.setenv("PROPE_CUDA_SM90_BWD", bwd)
    hq, hkv = HEADS[heads]
    _run_dense(torch.bfloat16 if d != 128 else torch.float16, 2, 300, hq, hkv, d, p=0.5,
               causal=causal)
    assert backends.launched()["bwd"]["variant"] == bwd


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


# --- the CUDA kernels' rotation in shared memory (PROPE_CUDA_ROT): the forwards' Q and the
# SM90 fused backward's dK, in 16-byte chunks from the K pass's table, or one pair at a time ---

def test_cuda_rot_switch(monkeypatch):
    from prope_kernels import env
    monkeypatch.delenv("PROPE_CUDA_ROT", raising=False)
    assert env.cuda_rot() == "table"
    assert cuda_backend._run(PRoPESpec(256, 0.75)) == (0, 128)
    assert cuda_backend._run(PRoPESpec(64, 0.75, layout="interleaved")) == (-1, 0)
    monkeypatch.setenv("PROPE_CUDA_ROT", " Pairs ")
    assert env.cuda_rot() == "pairs"
    assert cuda_backend._run(PRoPESpec(256, 0.75)) == (-1, 0)
    monkeypatch.setenv("PROPE_CUDA_ROT", "chunks")
    with pytest.raises(ValueError, match="PROPE_CUDA_ROT"):
        env.cuda_rot()


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["sm90", "sm80"])
@pytest.mark.parametrize("rot", ["table", "pairs"])
def test_cuda_rot(monkeypatch, rot, family):
    # both forwards rotate Q from the table, the SM90 fused backward dK back; out and the
    # gradients against the float64 reference: runs with padded table edges (reversed p = 0.3,
    # d 128: the run starts at dim 45 of the chunk at 40; prope p = 0.3, d 128 / 64: it ends at
    # dim 19 / 9 inside its last chunk; partial p = 0.25, d 128: b 16 dims on), a layout with no
    # run (interleaved: pairs either way), one key block and partial last blocks, then varlen with
    # empty and 1-row sequences, explicit positions
    _need_cuda_ext()
    if family == "sm90" and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the SM90 kernels run on sm_90 (H100/H200) only")
    monkeypatch.setenv("PROPE_CUDA_SM90", "1" if family == "sm90" else "0")
    monkeypatch.setenv("PROPE_CUDA_ROT", rot)
    for i, (s, d, p, variant, layout) in enumerate((
            (1025, 256, 0.75, "prope", "half"), (97, 128, 0.3, "reversed", "half"),
            (300, 128, 0.25, "partial", "half"), (129, 64, 1.0, "prope", "interleaved"),
            (1, 256, 0.25, "prope", "half"), (97, 128, 0.3, "prope", "half"),
            (300, 64, 0.3, "prope", "half"))):
        dtype = torch.bfloat16 if i % 2 else torch.float16
        _run_dense(dtype, 2, s, 4, 2, d, p=p, variant=variant, layout=layout, causal=i != 2)
    run_varlen("cuda", torch.bfloat16, [130, 1, 0, 257, 64], 8, 2, 256, p=0.75, causal=True,
               explicit_positions=True, backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("family", [1, 2])  # SM80, SM90 (FAMILY_* of backends/cuda.py)
def test_rot_table_is_read(family):
    # the ops given a run that is off by one chunk must answer differently from the right one:
    # the kernels read the table (were q_cs / k_cs always null, the per-pair path would hide it)
    _need_cuda_ext()
    if family == 2 and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the SM90 kernels run on sm_90 (H100/H200) only")
    gen = torch.Generator().manual_seed(seed("rot-read", family))
    q, k, v, do = (rand((200, h, 256), torch.bfloat16, "cuda", gen) for h in (4, 2, 2, 4))
    cu = torch.tensor([0, 200], dtype=torch.int32, device="cuda")
    pos = torch.arange(200, device="cuda")
    spec = PRoPESpec(256, 0.5)  # run (0, 128): 64 pairs; (8, 128) passes the binding's check
    tabs = cuda_backend._tables(spec, "cuda")
    args = (cu, pos, 200, *tabs, True, 256 ** -0.5, family)

    def fwd_bwd(run):
        out, lse = torch.ops.prope_cuda.attn_fwd(q, k, v, *args, 3, -1, -1, 0.0, *run)
        grads = torch.ops.prope_cuda.attn_bwd(do, q, k, v, out, lse, None, *args, 0, -1, -1, 0.0,
                                              *run)
        return [out.float()] + [g.float() for g in grads]
    right, pairs, shifted = fwd_bwd((0, 128)), fwd_bwd((-1, 0)), fwd_bwd((8, 128))
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), right, pairs, shifted):
        scale = b.abs().max().item()
        assert (a - b).abs().max().item() <= 2e-2 * scale, name  # table and pairs agree
        if name == "out" or (name == "dk" and family == 2):  # what the table rotates
            assert (a - c).abs().max().item() > 0.02 * scale, name  # never read: 0


@pytest.mark.gpu
def test_sm90_rot_table_equals_pairs(sm90, monkeypatch):
    # the two rotations compute the same angles (the table's in float64 with sincosf, the pairs'
    # through sincospif): out and the gradients may differ by roundings, never more
    gen = torch.Generator().manual_seed(seed("rot", 1025, 256))
    q, k, v, do = (rand((2, 1025, h, 256), torch.bfloat16, "cuda", gen) for h in (8, 1, 1, 8))
    res = []
    for mode in ("table", "pairs"):
        monkeypatch.setenv("PROPE_CUDA_ROT", mode)
        qkv = [t.clone().requires_grad_() for t in (q, k, v)]
        out = prope_attention(*qkv, p=0.75, causal=True, backend="cuda")
        out.backward(do)
        res.append([out.float()] + [t.grad.float() for t in qkv])
    for a, b in zip(*res):
        assert torch.isfinite(a).all()
        assert (a - b).abs().max().item() <= 2e-2 * max(1.0, b.abs().max().item())


# --- the SM90 forward's variants (PROPE_CUDA_SM90_FWD): overlap mainloop, longest-first order ---

def test_sm90_fwd_switch(monkeypatch):
    # unset or empty: overlap+lpt (3); bit 0 = overlap, bit 1 = longest-first launch order
    monkeypatch.delenv("PROPE_CUDA_SM90_FWD", raising=False)
    assert cuda_backend._sm90_fwd() == 3
    monkeypatch.setenv("PROPE_CUDA_SM90_FWD", "")
    assert cuda_backend._sm90_fwd() == 3
    for mode, bits in (("basic", 0), ("overlap", 1), ("basic+lpt", 2), ("Overlap+LPT", 3)):
        monkeypatch.setenv("PROPE_CUDA_SM90_FWD", mode)
        assert cuda_backend._sm90_fwd() == bits
    monkeypatch.setenv("PROPE_CUDA_SM90_FWD", "pingpong")
    with pytest.raises(ValueError, match="PROPE_CUDA_SM90_FWD"):
        cuda_backend._sm90_fwd()


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["basic", "overlap", "basic+lpt", "overlap+lpt"])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_sm90_fwd_variants(sm90, monkeypatch, mode, d):
    # one key block (s = 1, 97: the overlap loop's prologue and tail only), many (1025: masked
    # and unmasked blocks, a partial last q block), MHA/GQA/MQA, both dtypes, causal and not,
    # no rotation (p = 0) and partial rotation, then varlen with explicit positions
    monkeypatch.setenv("PROPE_CUDA_SM90_FWD", mode)
    for i, (s, heads, causal, p) in enumerate(((1, "mha", True, 0.75), (97, "gqa", False, 0.0),
                                                (1025, "mqa", True, 0.5),
                                                (1025, "gqa", False, 1.0))):
        hq, hkv = HEADS[heads]
        dtype = torch.bfloat16 if i % 2 else torch.float16
        _run_dense(dtype, 2, s, hq, hkv, d, p=p, causal=causal)
    run_varlen("cuda", torch.bfloat16, [130, 1, 0, 257, 64], 8, 2, d, p=0.5, causal=True,
               explicit_positions=True, backend="cuda")
