"""Fused p-RoPE attention (Triton backend) against the float64 reference: forward and dq, dk, dv.

On the CPU the kernels run under TRITON_INTERPRET=1 (see conftest.py) at small odd shapes; the
``gpu`` cases repeat the rule at training sizes on a GPU.
"""

import itertools
import os

import pytest
import torch

from harness import (HEADS, Reference, check_against_reference, grads, rand, run_dense,
                     run_varlen)
from prope_kernels import prope_attention, prope_attention_varlen
from prope_kernels import reference as ref
from prope_kernels.rotary import PRoPESpec


# --- the CI matrix (interpreter-sized); each case is a fresh random draw --------------------------

@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads", ["mha", "gqa", "mqa"])
@pytest.mark.parametrize("s", [1, 17, 97, 130])
def test_shapes(device, s, heads, causal):
    hq, hkv = HEADS[heads]
    dtype = torch.bfloat16 if (s + len(heads)) % 2 else torch.float16
    run_dense(device, dtype, 3, s, hq, hkv, 32, causal=causal)


@pytest.mark.parametrize("variant,layout", list(itertools.product(
    ["prope", "reversed", "partial"], ["half", "interleaved"])))
@pytest.mark.parametrize("p", [0.0, 0.25, 0.75, 1.0])
def test_rotation_variants(device, p, variant, layout):
    run_dense(device, torch.bfloat16, 2, 41, 4, 2, 64, p=p, variant=variant, layout=layout,
              causal=bool(int(p * 4) % 2))


@pytest.mark.parametrize("d", [16, 48, 80, 128, 256])
def test_head_dims(device, d):
    # 48 and 80 are not powers of two: padded head_dim lanes must stay masked.
    run_dense(device, torch.float16, 2, 33, 2, 1, d, p=0.5, layout="interleaved")


@pytest.fixture
def q_prerotated():
    """Run the forward in its Q_ON_LOAD=0 mode (Q rotated into the output buffer by the config
    pre-hook). On a GPU the autotuner picks the mode; under the interpreter the test chooses."""
    from prope_kernels.backends.triton.tuning import set_interpreter_q_on_load
    if torch.cuda.is_available():
        pytest.skip("the autotuner picks the Q rotation mode on a GPU")
    set_interpreter_q_on_load(False)
    yield
    set_interpreter_q_on_load(True)


@pytest.mark.parametrize("variant,layout,p,causal", [("prope", "half", 0.75, True),
                                                     ("partial", "interleaved", 0.25, False),
                                                     ("reversed", "half", 1.0, True)])
def test_q_prerotated_mode(device, q_prerotated, variant, layout, p, causal):
    run_dense(device, torch.bfloat16, 3, 45, 6, 2, 64, p=p, variant=variant, layout=layout,
              causal=causal)


@pytest.mark.parametrize("split", [1, 2, 4])
def test_gqa_gradient_split(device, monkeypatch, split):
    # dk/dv of a kv head summed over its 4 query heads in 1, 2 or 4 programs (partial sums)
    monkeypatch.setenv("PROPE_KV_SPLIT", str(split))
    run_dense(device, torch.float16, 2, 70, 8, 2, 32, p=0.5, causal=split != 2)


@pytest.fixture
def deterministic():
    # warn_only: the reference's own cuBLAS matmuls on a GPU would otherwise demand
    # CUBLAS_WORKSPACE_CONFIG; the op only asks torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("split", [2, 4])
def test_gqa_gradient_split_deterministic(device, monkeypatch, deterministic, split):
    # torch's deterministic mode: the split programs write fp32 partial sums (no atomics) that are
    # added in a fixed order; the result is within tolerance and bitwise repeatable.
    monkeypatch.setenv("PROPE_KV_SPLIT", str(split))
    run_dense(device, torch.bfloat16, 2, 37, 8, 2, 32, p=0.75, causal=True)
    gen = torch.Generator().manual_seed(split)
    q = rand((1, 37, 8, 32), torch.bfloat16, device, gen)
    k, v = (rand((1, 37, 2, 32), torch.bfloat16, device, gen) for _ in range(2))
    dout = rand((1, 37, 8, 32), torch.bfloat16, device, gen)
    fn = lambda q, k, v: prope_attention(q, k, v, backend="triton")  # noqa: E731
    first, again = grads(fn, (q, k, v), [dout]), grads(fn, (q, k, v), [dout])
    for a, b in zip(first, again):
        assert torch.equal(a, b)


def test_deterministic_keyword_takes_the_repeatable_path(device, monkeypatch):
    # deterministic=True (flash-attn's keyword) without torch's flag: the dK/dV split programs
    # write partial sums instead of atomics, the launch says so, and the result is repeatable.
    from prope_kernels import backends
    from prope_kernels.backends.triton import ops
    monkeypatch.setenv("PROPE_KV_SPLIT", "2")
    real, seen = ops._attn_bwd_dkdv_kernel, []

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                seen.append(kw["ATOMIC"])
                return real[grid](*args, **kw)
            return launch
    monkeypatch.setattr(ops, "_attn_bwd_dkdv_kernel", Spy())
    gen = torch.Generator().manual_seed(5)
    q = rand((1, 37, 8, 32), torch.bfloat16, device, gen)
    k, v = (rand((1, 37, 2, 32), torch.bfloat16, device, gen) for _ in range(2))
    dout = rand((1, 37, 8, 32), torch.bfloat16, device, gen)
    assert not torch.are_deterministic_algorithms_enabled()
    for det, atomic in ((False, True), (True, False)):
        fn = lambda q, k, v: prope_attention(q, k, v, backend="triton", deterministic=det)  # noqa: E731,E501
        seen.clear()
        first, again = grads(fn, (q, k, v), [dout]), grads(fn, (q, k, v), [dout])
        assert seen == [atomic, atomic]
        assert backends.launched()["bwd"].get("mode") == ("deterministic" if det else None)
        if det:
            for a, b in zip(first, again):
                assert torch.equal(a, b)


def test_deterministic_keyword_is_refused_where_no_backend_has_it():
    q = torch.randn(1, 8, 2, 32)
    with pytest.raises(ValueError, match="backend='sdpa' does not implement deterministic"):
        prope_attention(q, q, q, backend="sdpa", deterministic=True)
    with pytest.raises(TypeError, match="deterministic"):
        prope_attention(q, q, q, backend="reference", deterministic="yes")
    out = prope_attention(q, q, q, backend="reference", deterministic=True)  # it has one
    assert torch.isfinite(out).all()


def test_softmax_scale_and_theta(device):
    run_dense(device, torch.bfloat16, 1, 50, 2, 2, 64, p=0.25, theta=1e6, scale=0.3)


def test_long_context_positions(device):
    # positions near 1e6 with theta 1e6: angles must be formed in float64 and reduced before
    # sin/cos, or the fastest pairs are off by ~0.03 rad.
    b, s = 2, 24
    gen = torch.Generator().manual_seed(7)
    pos = torch.randint(990_000, 1_000_000, (b, s), generator=gen).to(device)
    run_dense(device, torch.float16, b, s, 2, 1, 64, p=1.0, theta=1e6, positions=pos)
    run_dense(device, torch.bfloat16, b, s, 2, 2, 64, p=0.75, theta=1e4, causal=False,
              positions=pos[0])


def test_return_lse_and_its_gradient(device):
    run_dense(device, torch.float16, 2, 29, 4, 2, 32, lse=True)


# --- varlen --------------------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lens", [[1, 17, 40, 3], [70, 0, 33], [130]])
def test_varlen(device, lens, causal):
    run_varlen(device, torch.bfloat16, lens, 4, 2, 32, causal=causal)


def test_varlen_explicit_positions_and_mqa(device):
    run_varlen(device, torch.float16, [9, 31, 20], 4, 1, 64, p=0.25, variant="partial",
               layout="interleaved", explicit_positions=True)


def test_varlen_matches_dense_rows(device):
    # A dense batch is the varlen op with equal lengths: same numbers, bit for bit.
    gen = torch.Generator().manual_seed(3)
    b, s, h, d = 3, 19, 2, 32
    q, k, v = (rand((b, s, h, d), torch.float16, device, gen) for _ in range(3))
    dense = prope_attention(q, k, v, backend="triton")
    cu = torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device=device)
    packed = prope_attention_varlen(*(x.reshape(b * s, h, d) for x in (q, k, v)), cu, s,
                                    backend="triton")
    assert torch.equal(dense.reshape(b * s, h, d), packed)


# --- the reference backend of the public API -----------------------------------------------------

def test_reference_backend_matches_definition(device):
    gen = torch.Generator().manual_seed(5)
    q, k, v = (rand((2, 23, 4, 32), torch.float32, device, gen) for _ in range(3))
    spec = PRoPESpec(32, 0.75)
    got = prope_attention(q, k, v, backend="reference")
    want = ref.prope_attention(q.double(), k.double(), v.double(), spec).float()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_p_zero_is_nope_and_p_one_is_rope(device):
    gen = torch.Generator().manual_seed(9)
    q, k, v = (rand((1, 16, 2, 32), torch.float64, device, gen) for _ in range(3))
    nope = ref.attention(q, k, v)
    torch.testing.assert_close(prope_attention(q, k, v, p=0.0, backend="reference"), nope)
    # p=1: every pair rotates with the standard RoPE frequencies theta^(-2k/d)
    pos = torch.arange(16, device=device, dtype=torch.float64)
    inv = 10000.0 ** (-torch.arange(0, 32, 2, dtype=torch.float64, device=device) / 32)
    ang = pos[:, None] * inv
    cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None], torch.cat([ang.sin()] * 2, -1)[:, None]

    def rot(x):
        x1, x2 = x.chunk(2, -1)
        return x * cos + torch.cat([-x2, x1], -1) * sin

    torch.testing.assert_close(prope_attention(q, k, v, p=1.0, backend="reference"),
                               ref.attention(rot(q), rot(k), v))


# --- GPU sizes (skipped without a GPU) -----------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("s", [1025, 4096])
@pytest.mark.parametrize("heads", ["mha", "gqa", "mqa"])
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_sizes(s, d, heads, causal):
    hq, hkv = {"mha": (8, 8), "gqa": (8, 2), "mqa": (8, 1)}[heads]
    run_dense("cuda", torch.bfloat16, 2, s, hq, hkv, d, causal=causal)


@pytest.mark.gpu
@pytest.mark.parametrize("p", [0.0, 0.25, 1.0])
@pytest.mark.parametrize("variant", ["prope", "reversed", "partial"])
def test_gpu_variants(p, variant):
    run_dense("cuda", torch.float16, 2, 2048, 8, 1, 256, p=p, variant=variant,
              layout="interleaved" if variant == "reversed" else "half")


@pytest.mark.gpu
def test_gpu_varlen_and_long_positions():
    run_varlen("cuda", torch.bfloat16, [1, 3000, 517, 2048, 7], 16, 4, 128)
    pos = torch.arange(1_000_000 - 8192, 1_000_000, device="cuda")
    run_dense("cuda", torch.bfloat16, 1, 8192, 8, 1, 256, p=0.25, theta=1e6, positions=pos)


@pytest.mark.gpu
def test_gpu_head_dim_512():
    run_dense("cuda", torch.bfloat16, 1, 1024, 4, 1, 512, p=0.25, theta=1e6)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_64bit_offsets(backend):
    # One sequence of s * heads * d > 2^31 elements in every tensor (q, k, v, out, dout and the
    # gradients: MHA, 4.3 GB each in bf16): rows >= 4096 start past 2^31 elements, so any int32
    # offset in the rotation, forward, backward or preprocessing kernels wraps. Checked on the
    # first and last heads (the last rows of the last head are the largest offsets).
    # It needs about 50 GiB of GPU memory to itself, so it runs alone (.ci/gpu_check.sh gives it
    # a step of its own, without pytest-xdist). Under xdist the other workers share the GPU and
    # allocate while this one does: the free memory read below says nothing about the next
    # second, and either this test or a neighbour would fail out of memory. That, and only that,
    # is why it skips there.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        pytest.skip("needs about 50 GiB of GPU memory alone; pytest-xdist workers share the GPU "
                    "(run it in its own process: .ci/gpu_check.sh's offsets64 step)")
    from prope_kernels import backends
    if not backends.get(backend).can_run(torch.empty(0, 128, device="cuda",
                                                     dtype=torch.bfloat16)):
        pytest.skip(f"backend={backend!r} {backends.get(backend).unavailable()}")
    if torch.cuda.mem_get_info()[0] < 56 * 2**30:
        pytest.skip("needs about 50 GiB of free GPU memory")
    s, h, d = 4096 + 37, 4096, 128
    assert s * h * d > 2**31 and 4096 * h * d == 2**31
    gen = torch.Generator(device="cuda").manual_seed(31)
    q, k, v, dout = (torch.randn((1, s, h, d), device="cuda", dtype=torch.bfloat16,
                                 generator=gen) for _ in range(4))
    heads = [0, h - 1]
    small = [x[:, :, heads].clone() for x in (q, k, v, dout)]
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = prope_attention(q, k, v, p=0.75, backend=backend)
    got = [out[:, :, heads].clone()]
    got += [g[:, :, heads].clone() for g in torch.autograd.grad(out, (q, k, v), dout)]
    del q, k, v, dout, out
    spec = PRoPESpec(d, 0.75)
    check_against_reference(("out", "dq", "dk", "dv"), got, Reference(spec), small[:3],
                            small[3:])


def test_64bit_offsets_skips_under_xdist_with_its_reason(monkeypatch):
    # the skip comes first, before any CUDA call: a worker of pytest-xdist never allocates the
    # 50 GiB (the check runs on a CPU too); alone, the test goes on to its memory check
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw3")
    with pytest.raises(pytest.skip.Exception, match="needs about 50 GiB of GPU memory alone"):
        test_gpu_64bit_offsets("triton")
