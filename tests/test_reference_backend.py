"""The reference backend behind the custom ops (prope_kernels/backends/reference.py): its forward
and its written-out backward against autograd through the definition (prope_kernels/reference.py)
in float64, dense and varlen, with an lse gradient; and the op checks with backend='reference'."""

import itertools

import pytest
import torch

from prope_kernels import apply_prope, prope_attention, prope_attention_varlen
from prope_kernels import reference as ref
from prope_kernels.interface import _attn_bwd_op, _attn_fwd_op, _rope_op
from prope_kernels.rotary import PRoPESpec


def _draw(shapes, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in shapes]


def _grads(fn, xs, dout, dlse):
    xs = [x.detach().clone().requires_grad_() for x in xs]
    out, lse = fn(*xs)
    loss = (out * dout).sum() + (lse * dlse).sum()
    return (out, lse, *torch.autograd.grad(loss, xs))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("hq,hkv,variant,layout,p", [(4, 4, "prope", "half", 0.75),
                                                     (6, 2, "partial", "interleaved", 0.25),
                                                     (3, 1, "reversed", "half", 1.0)])
def test_dense_matches_definition(device, hq, hkv, variant, layout, p, causal):
    b, s, d = 2, 13, 16
    q, k, v, dout, dlse = _draw([(b, s, hq, d), (b, s, hkv, d), (b, s, hkv, d), (b, s, hq, d),
                                 (b, hq, s)], torch.float64, device, hq + 7 * hkv)
    spec = PRoPESpec(d, p, 1000.0, variant, layout)
    pos = torch.randint(0, 500, (b, s), generator=torch.Generator().manual_seed(1)).to(device)
    got = _grads(lambda q, k, v: prope_attention(
        q, k, v, p=p, theta=1000.0, variant=variant, layout=layout, causal=causal,
        positions=pos, softmax_scale=0.3, backend="reference", return_lse=True),
        (q, k, v), dout, dlse)
    want = _grads(lambda q, k, v: ref.prope_attention(q, k, v, spec, causal, 0.3, pos,
                                                      return_lse=True), (q, k, v), dout, dlse)
    assert got[0].dtype == torch.float64
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        # lse comes back in float32 by the op contract
        tol = 1e-6 if name == "lse" else 1e-10
        torch.testing.assert_close(g.double(), w, rtol=tol, atol=tol, msg=name)


def test_varlen_matches_definition(device):
    lens, hq, hkv, d = [5, 0, 5, 9, 1], 4, 2, 32
    total = sum(lens)
    cu = torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32, device=device)
    q, k, v, dout, dlse = _draw([(total, hq, d), (total, hkv, d), (total, hkv, d),
                                 (total, hq, d), (hq, total)], torch.float64, device, 3)
    spec = PRoPESpec(d, 0.5)
    got = _grads(lambda q, k, v: prope_attention_varlen(q, k, v, cu, 9, p=0.5,
                                                        backend="reference", return_lse=True),
                 (q, k, v), dout, dlse)
    want = _grads(lambda q, k, v: ref.prope_attention_varlen(q, k, v, cu, spec,
                                                             return_lse=True),
                  (q, k, v), dout, dlse)
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        tol = 1e-6 if name == "lse" else 1e-10
        torch.testing.assert_close(g.double(), w, rtol=tol, atol=tol, msg=name)


def test_low_precision_inputs_computed_in_float32(device):
    # fp16 in, fp16 out, with the float32 math of the definition (not fp16 math)
    q, k, v = _draw([(2, 21, 4, 32), (2, 21, 2, 32), (2, 21, 2, 32)], torch.float16, device, 5)
    got = prope_attention(q, k, v, backend="reference")
    want = ref.prope_attention(q.float(), k.float(), v.float(), PRoPESpec(32, 0.75))
    assert got.dtype == torch.float16
    torch.testing.assert_close(got, want.half(), rtol=0, atol=0)


def test_apply_prope_gradient_is_inverse_rotation(device):
    x, g = _draw([(2, 9, 3, 16), (2, 9, 3, 16)], torch.float64, device, 9)
    x.requires_grad_()
    y = apply_prope(x, p=0.75, backend="reference")
    (dx,) = torch.autograd.grad(y, x, g)
    pos = torch.arange(9, device=device)
    torch.testing.assert_close(dx, ref.apply_prope(g, pos, PRoPESpec(16, 0.75), conjugate=True))


def _packed(device, requires_grad):
    q, k, v = _draw([(48, 4, 32), (48, 2, 32), (48, 2, 32)], torch.float32, device, 1)
    q, k, v = (x.requires_grad_(requires_grad) for x in (q, k, v))
    cu = torch.tensor([0, 20, 48], dtype=torch.int32, device=device)
    pos = torch.cat([torch.arange(20), torch.arange(28)]).to(device)
    return q, k, v, cu, pos


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(device, requires_grad):
    q, k, v, cu, pos = _packed(device, requires_grad)
    # window (5, 0) and softcap 30: the features' arguments go through the ops as well
    args = (28, 0.75, 10000.0, "prope", "half", True, 32 ** -0.5, 5, 0, 30.0, "reference")
    torch.library.opcheck(_attn_fwd_op, (q, k, v, cu, pos, *args))
    out, lse = _attn_fwd_op(q.detach(), k.detach(), v.detach(), cu, pos, *args)
    torch.library.opcheck(_attn_bwd_op, (torch.randn_like(out), q.detach(), k.detach(),
                                         v.detach(), out, lse, torch.randn_like(lse), cu, pos,
                                         *args))
    torch.library.opcheck(_rope_op, (q, pos, 0.75, 10000.0, "reversed", "interleaved", False,
                                     "reference"))


def test_compile_fullgraph(device):
    q, k, v = _draw([(2, 24, 4, 32), (2, 24, 2, 32), (2, 24, 2, 32)], torch.float32, device, 2)

    def layer(q, k, v):
        return (prope_attention(q, k, v, p=0.25, backend="reference") ** 2).sum()

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (layer, compiled):
        xs = [x.clone().requires_grad_() for x in (q, k, v)]
        loss = fn(*xs)
        results.append((loss.detach(), *torch.autograd.grad(loss, xs)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)
