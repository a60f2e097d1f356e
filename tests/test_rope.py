"""The rotation alone (apply_prope, Triton rope kernel) against the float64 reference."""

import zlib

import pytest
import torch

from prope_kernels import apply_prope
from prope_kernels import reference as ref
from prope_kernels.rotary import PRoPESpec, rotated_pairs
from tolerance import check


def _case(device, dtype, shape, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    g = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    return x, g


@pytest.mark.parametrize("variant", ["prope", "reversed", "partial"])
@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("p", [0.0, 0.25, 0.75, 1.0])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_apply_prope_matches_reference(device, dtype, p, layout, variant):
    x, g = _case(device, dtype, (3, 37, 5, 48), zlib.crc32(repr((p, layout, variant)).encode()))
    pos = torch.arange(37, device=device) * 997  # large positions
    spec = PRoPESpec(48, p, 1e4, variant, layout)
    kw = dict(p=p, variant=variant, layout=layout)
    xr = x.detach().requires_grad_()
    y = apply_prope(xr, pos, backend="triton", **kw)
    (dx,) = torch.autograd.grad(y, xr, g)
    check("y", y, ref.apply_prope(x.double(), pos, spec), ref.apply_prope(x, pos, spec))
    # the gradient of a rotation is the inverse rotation
    check("dx", dx, ref.apply_prope(g.double(), pos, spec, conjugate=True),
          ref.apply_prope(g, pos, spec, conjugate=True))
    ident = spec.identity_dims()
    assert torch.equal(y[..., ident], x[..., ident]), "identity dims must be copied bit for bit"


def test_packed_layout_and_batch_positions(device):
    x, _ = _case(device, torch.float16, (2, 21, 3, 64), 1)
    pos = torch.randint(0, 100_000, (2, 21), device=device)
    spec = PRoPESpec(64, 0.5)
    y = apply_prope(x, pos, p=0.5, backend="triton")
    check("y", y, ref.apply_prope(x.double(), pos, spec), ref.apply_prope(x, pos, spec))
    flat = apply_prope(x.reshape(42, 3, 64), pos.reshape(42), p=0.5, backend="triton")
    assert torch.equal(flat.reshape(y.shape), y)


def test_inverse_undoes_rotation(device):
    x, _ = _case(device, torch.float32, (1, 50, 2, 32), 2)
    x = x.to(torch.float16)
    pos = torch.arange(50, device=device) + 123_456
    y = apply_prope(apply_prope(x, pos, backend="triton"), pos, conjugate=True, backend="triton")
    assert (y.float() - x.float()).abs().max().item() < 4e-3


def test_kernel_angles_at_long_context(device):
    # The fastest pair turns 1 rad per token. Run the rotation kernel in fp32 (no output rounding
    # to hide behind) at positions near 1e6 with theta 1e6 and compare with float64: a float32
    # angle would be off by up to ~0.03 rad here.
    from prope_kernels.backends.triton.rope import rope_launch
    spec = PRoPESpec(64, 1.0, 1e6)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(64, 2, 64, generator=gen).to(device)
    pos = torch.randint(999_000, 1_000_000, (64,), generator=gen).to(device)
    y = rope_launch(x, torch.empty_like(x), pos, spec.tables(device), spec.num_rotated, False)
    want = ref.apply_prope(x.double(), pos, spec)
    assert (y.double() - want).abs().max().item() < 5e-5


@pytest.mark.parametrize("d,p,expect", [(256, 0.75, 96), (512, 0.25, 64), (10, 0.7, 3),
                                        (100, 0.29, 14), (64, 0.0, 0), (64, 1.0, 32)])
def test_rotated_pair_count(d, p, expect):
    assert rotated_pairs(d, p) == expect


def test_variant_tables():
    s = PRoPESpec(8, 0.5, 100.0, "prope", "half")
    assert s.pairs()[:2] == ([0, 1], [4, 5]) and s.identity_dims() == [2, 3, 6, 7]
    s = PRoPESpec(8, 0.5, 100.0, "reversed", "interleaved")
    assert s.pairs()[:2] == ([4, 6], [5, 7]) and s.identity_dims() == [0, 1, 2, 3]
    s = PRoPESpec(8, 0.5, 100.0, "partial", "half")
    a, b, f = s.pairs()
    assert (a, b) == ([0, 1], [2, 3]) and f == [1.0, 100.0 ** -0.5]
    assert PRoPESpec(8, 0.5, 100.0, "prope").pairs()[2] == [1.0, 100.0 ** -0.25]


def _rotate_by_chunks(x, pos, spec):
    """The CUDA SM90 forward's Q rotation for pairs in a run, in float64: the K pass's table holds
    cos/sin of columns [lo, lo + w) (cs_table_lo/_w of csrc/prope_attn/params.h), cos 1 and sin 0
    where no pair is (frequency 0 here); rotate_tile_chunks rotates each 8-dim chunk at lo + 8c
    against the chunk b_off further."""
    a0, off = spec.chunk_run()
    a, _, f = spec.pairs()
    lo = a0 // 8 * 8
    w = -(-(a0 + len(a)) // 8) * 8 - lo
    freq = torch.zeros(w, dtype=torch.float64)
    freq[a0 - lo:a0 - lo + len(a)] = torch.tensor(f, dtype=torch.float64)
    ang = pos[:, None].double() * freq  # (rows, w)
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
    y = x.clone()
    for c in range(w // 8):
        ca = torch.arange(lo + 8 * c, lo + 8 * c + 8)
        xa, xb = x[..., ca], x[..., ca + off]
        y[..., ca] = xa * cos[..., 8 * c:8 * c + 8] - xb * sin[..., 8 * c:8 * c + 8]
        y[..., ca + off] = xb * cos[..., 8 * c:8 * c + 8] + xa * sin[..., 8 * c:8 * c + 8]
    return y


@pytest.mark.parametrize("d", [64, 128, 256, 512])
@pytest.mark.parametrize("variant", ["prope", "reversed", "partial"])
@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_chunk_run(d, variant, layout):
    # chunk_run() is the geometry the CUDA SM90 forward's chunked Q rotation trusts: where it gives
    # one, rotating by chunks from the padded table must be the rotation exactly (the pairs, the
    # identity dims untouched); the default layout must always get one
    gen = torch.Generator().manual_seed(d)
    for p in (0.1, 0.25, 0.3, 0.5, 0.75, 1.0):
        spec = PRoPESpec(d, p, 1e4, variant, layout)
        run = spec.chunk_run()
        if layout == "interleaved" or spec.num_rotated == 0:
            assert run is None
            continue
        r = spec.num_rotated
        if variant != "partial" or r % 8 == 0:
            assert run is not None, (d, p, variant)
        if run is None:
            continue
        a0, off = run
        a, b, _ = spec.pairs()
        assert off % 8 == 0 and (a, b) == (list(range(a0, a0 + r)), list(range(a0 + off, a0 + off + r)))
        x = torch.randn(37, 2, d, generator=gen, dtype=torch.float64)
        pos = torch.randint(0, 100_000, (37,), generator=gen)
        torch.testing.assert_close(_rotate_by_chunks(x, pos, spec), ref.apply_prope(x, pos, spec),
                                   rtol=1e-12, atol=1e-12)
