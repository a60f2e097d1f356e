"""Sliding-window attention (``window``) and logit softcapping (``softcap``).

The reference defines both (prope_kernels/reference.py); here it is checked against a brute-force
reading of the definition and against transformers' Gemma 2 attention, and the Triton kernels are
checked against the float64 reference with the tolerance rule, forward and dq, dk, dv.
"""

import pytest
import torch

from prope_kernels import prope_attention, prope_attention_varlen
from prope_kernels import reference as ref
from prope_kernels.rotary import PRoPESpec


def _rand(shape, dtype=torch.float64, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


# --- the definition ------------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [(-1, -1), (0, 0), (3, -1), (-1, 2), (2, 5), (0, 4), (40, 40)])
def test_mask_is_the_definition(window, causal):
    m = 13
    keep = ref.attention_mask(m, m, causal, window)
    left, right = window
    for i in range(m):
        for j in range(m):
            want = ((left < 0 or j >= i - left) and (right < 0 or j <= i + right)
                    and (not causal or j <= i))
            got = True if keep is None else bool(keep[i, j])
            assert got == want, (i, j)
    # every row sees its own key; the count helper agrees with the mask
    if keep is not None:
        assert keep.diagonal().all()
    n = m * m if keep is None else int(keep.sum())
    assert ref.visible_pairs(m, causal, window) == (n if keep is not None or not causal
                                                     else m * (m + 1) // 2)


def test_window_zero_is_the_diagonal():
    # window (0, 0): each query sees only its own key: out = v, lse = its own score
    q, k, v = (_rand((2, 9, 4, 16), seed=i) for i in range(3))
    out, lse = prope_attention(q, k, v, window=(0, 0), causal=False, backend="reference",
                               return_lse=True)
    torch.testing.assert_close(out, v)
    spec = PRoPESpec(16, 0.75)
    pos = torch.arange(9)
    qr, kr = ref.apply_prope(q, pos, spec), ref.apply_prope(k, pos, spec)
    torch.testing.assert_close(lse, ((qr * kr).sum(-1).transpose(1, 2) * 16 ** -0.5).float())


def test_window_larger_than_sequence_is_full_attention():
    q, k, v = (_rand((1, 11, 2, 16), seed=i) for i in range(3))
    for causal in (False, True):
        full = prope_attention(q, k, v, causal=causal, backend="reference")
        wide = prope_attention(q, k, v, causal=causal, window=(50, 50), backend="reference")
        torch.testing.assert_close(full, wide)


def test_softcap_matches_gemma2():
    # transformers' Gemma 2 eager attention (softcap after the scaling, before the mask)
    gemma2 = pytest.importorskip("transformers.models.gemma2.modeling_gemma2")
    b, s, hq, hkv, d = 2, 10, 4, 2, 16
    q = _rand((b, s, hq, d), seed=1, scale=6.0)
    k = _rand((b, s, hkv, d), seed=2, scale=6.0)
    v = _rand((b, s, hkv, d), seed=3)

    class Module(torch.nn.Module):
        num_key_value_groups = hq // hkv
        head_dim = d

    scale = 0.3
    causal_mask = torch.full((s, s), float("-inf"), dtype=torch.float64).triu(1)
    for window in (None, 4):
        mask = causal_mask
        if window is not None:  # transformers' sliding_window W: key j visible iff i - j < W
            mask = mask.masked_fill(torch.ones(s, s, dtype=torch.bool).tril(-window),
                                    float("-inf"))
        want, _ = gemma2.eager_attention_forward(
            Module().eval(), q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            mask[None, None], scaling=scale, softcap=50.0)
        got = ref.attention(q, k, v, True, scale, window=(-1, 0) if window is None
                            else (window - 1, 0), softcap=50.0)
        # transformers takes the softmax in float32: agreement to fp32 precision
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the logits really are large enough for the cap to matter
    raw = torch.einsum("bmhd,bnhd->bhmn", q, k.repeat_interleave(2, 2)) * scale
    assert raw.abs().max() > 50.0


def test_reference_varlen_window_stays_inside_sequences():
    lens = [5, 9, 1]
    cu = torch.tensor([0, 5, 14, 15], dtype=torch.int32)
    q, k, v = (_rand((15, 2, 16), seed=i) for i in range(3))
    spec = PRoPESpec(16, 0.5)
    got = ref.prope_attention_varlen(q, k, v, cu, spec, False, None, window=(2, 1), softcap=5.0)
    start = 0
    for n in lens:
        sl = slice(start, start + n)
        want = ref.prope_attention(q[None, sl], k[None, sl], v[None, sl], spec, False,
                                   window=(2, 1), softcap=5.0)[0]
        torch.testing.assert_close(got[sl], want)
        start += n


@pytest.mark.parametrize("window", [(3, 0), (2, 3)])
def test_reference_backend_gradients_are_finite(window):
    # the API's reference backend: differentiable through the mask and the cap
    q, k, v = (_rand((1, 7, 2, 16), seed=i, scale=4.0).requires_grad_() for i in range(3))
    out = prope_attention(q, k, v, causal=False, window=window, softcap=2.0, backend="reference")
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)
    assert all(g.abs().sum() > 0 for g in grads)
