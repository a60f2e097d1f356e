"""Fused p-RoPE attention (Triton backend) against the float64 reference: forward and dq, dk, dv.

On the CPU the kernels run under TRITON_INTERPRET=1 (see conftest.py) at small odd shapes; the
``gpu`` cases repeat the rule at training sizes on a GPU.
"""

import itertools
import zlib

import pytest
import torch

from prope_kernels import prope_attention, prope_attention_varlen
from prope_kernels import reference as ref
from prope_kernels.rotary import PRoPESpec
from tolerance import check

HEADS = {"mha": (4, 4), "gqa": (6, 2), "mqa": (3, 1)}


def _seed(*key) -> int:
    return zlib.crc32(repr(key).encode())


def _rand(shape, dtype, device, gen):
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


def _grads(fn, inputs, dout):
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*inputs)
    return (out, *torch.autograd.grad(out, inputs, dout))


def run_dense(device, dtype, b, s, hq, hkv, d, p=0.75, variant="prope", layout="half",
              causal=True, theta=10000.0, positions=None, backend="triton", scale=None):
    gen = torch.Generator().manual_seed(_seed(b, s, hq, hkv, d, p, variant, layout, causal, dtype))
    q = _rand((b, s, hq, d), dtype, device, gen)
    k = _rand((b, s, hkv, d), dtype, device, gen)
    v = _rand((b, s, hkv, d), dtype, device, gen)
    dout = _rand((b, s, hq, d), dtype, device, gen)
    spec = PRoPESpec(d, p, theta, variant, layout)

    got = _grads(lambda q, k, v: prope_attention(
        q, k, v, p=p, theta=theta, variant=variant, layout=layout, causal=causal,
        positions=positions, backend=backend, softmax_scale=scale), (q, k, v), dout)
    truth = _grads(lambda q, k, v: ref.prope_attention(q, k, v, spec, causal, scale, positions),
                   [x.double() for x in (q, k, v)], dout.double())
    lowp = _grads(lambda q, k, v: ref.prope_attention(q, k, v, spec, causal, scale, positions),
                  (q, k, v), dout)
    for name, g, t, lp in zip(("out", "dq", "dk", "dv"), got, truth, lowp):
        check(name, g, t, lp)


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


@pytest.fixture(params=[0, 1], ids=["q_prerotated", "q_on_load"])
def q_mode(request, device):
    """Run the forward in one Q rotation mode: Q rotated into the output buffer by the config's
    pre-hook (0) or in registers when the program loads it (1). The interpreter has one config whose
    mode the test switches; on a GPU the first head_dim-64 table row is forced in that mode."""
    from prope_kernels.triton import configs as C
    if device == "cpu":
        C.set_interpreter_q_on_load(bool(request.param))
        yield
        C.set_interpreter_q_on_load(True)
    else:
        with C.force_config("fwd", C.TABLES["fwd"][64][0] + (request.param,)):
            yield


@pytest.mark.parametrize("variant,layout,p,causal", [("prope", "half", 0.75, True),
                                                     ("partial", "interleaved", 0.25, False),
                                                     ("reversed", "half", 1.0, True)])
def test_q_rotation_modes(device, q_mode, variant, layout, p, causal):
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
    q = _rand((1, 37, 8, 32), torch.bfloat16, device, gen)
    k, v = (_rand((1, 37, 2, 32), torch.bfloat16, device, gen) for _ in range(2))
    dout = _rand((1, 37, 8, 32), torch.bfloat16, device, gen)
    fn = lambda q, k, v: prope_attention(q, k, v, backend="triton")  # noqa: E731
    first, again = _grads(fn, (q, k, v), dout), _grads(fn, (q, k, v), dout)
    for a, b in zip(first, again):
        assert torch.equal(a, b)


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
    run_lse(device, "triton")


def run_lse(device, backend, b=2, s=29, hq=4, hkv=2, d=32, causal=True):
    """out and lse against the reference, and the gradients of a loss that uses both."""
    gen = torch.Generator().manual_seed(11)
    q, k, v = (_rand((b, s, h, d), torch.float16, device, gen) for h in (hq, hkv, hkv))
    dout = _rand((b, s, hq, d), torch.float16, device, gen)
    dlse = _rand((b, hq, s), torch.float32, device, gen)
    spec = PRoPESpec(d, 0.75)

    def fused(q, k, v):
        o, lse = prope_attention(q, k, v, backend=backend, causal=causal, return_lse=True)
        return o, lse

    def reference(q, k, v):
        return ref.prope_attention(q, k, v, spec, causal, None, None, return_lse=True)

    results = []
    for fn, xs in ((fused, (q, k, v)), (reference, [x.double() for x in (q, k, v)]),
                   (reference, (q, k, v))):
        xs = [x.detach().clone().requires_grad_() for x in xs]
        o, lse = fn(*xs)
        loss = (o * dout.to(o.dtype)).sum() + (lse * dlse.to(lse.dtype)).sum()
        results.append((o, lse, *torch.autograd.grad(loss, xs)))
    got, truth, lowp = results
    for name, g, t, lp in zip(("out", "lse", "dq", "dk", "dv"), got, truth, lowp):
        check(name, g, t, lp)


# --- varlen --------------------------------------------------------------------------------------

def run_varlen(device, dtype, lens, hq, hkv, d, p=0.75, variant="prope", layout="half",
               causal=True, explicit_positions=False, backend="triton"):
    gen = torch.Generator().manual_seed(_seed(tuple(lens), hq, hkv, d, p, causal))
    total = sum(lens)
    cu = torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32, device=device)
    q = _rand((total, hq, d), dtype, device, gen)
    k = _rand((total, hkv, d), dtype, device, gen)
    v = _rand((total, hkv, d), dtype, device, gen)
    dout = _rand((total, hq, d), dtype, device, gen)
    positions = (torch.randint(0, 5000, (total,), generator=gen).to(device)
                 if explicit_positions else None)
    spec = PRoPESpec(d, p, 10000.0, variant, layout)
    ms = max(lens)

    got = _grads(lambda q, k, v: prope_attention_varlen(
        q, k, v, cu, ms, p=p, variant=variant, layout=layout, causal=causal,
        positions=positions, backend=backend), (q, k, v), dout)
    fn = lambda q, k, v: ref.prope_attention_varlen(q, k, v, cu, spec, causal, None, positions)  # noqa: E731,E501
    truth = _grads(fn, [x.double() for x in (q, k, v)], dout.double())
    lowp = _grads(fn, (q, k, v), dout)
    for name, g, t, lp in zip(("out", "dq", "dk", "dv"), got, truth, lowp):
        check(name, g, t, lp)


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
    q, k, v = (_rand((b, s, h, d), torch.float16, device, gen) for _ in range(3))
    dense = prope_attention(q, k, v, backend="triton")
    cu = torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device=device)
    packed = prope_attention_varlen(*(x.reshape(b * s, h, d) for x in (q, k, v)), cu, s,
                                    backend="triton")
    assert torch.equal(dense.reshape(b * s, h, d), packed)


# --- the reference backend of the public API -----------------------------------------------------

def test_reference_backend_matches_definition(device):
    gen = torch.Generator().manual_seed(5)
    q, k, v = (_rand((2, 23, 4, 32), torch.float32, device, gen) for _ in range(3))
    spec = PRoPESpec(32, 0.75)
    got = prope_attention(q, k, v, backend="reference")
    want = ref.prope_attention(q.double(), k.double(), v.double(), spec).float()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_p_zero_is_nope_and_p_one_is_rope(device):
    gen = torch.Generator().manual_seed(9)
    q, k, v = (_rand((1, 16, 2, 32), torch.float64, device, gen) for _ in range(3))
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
