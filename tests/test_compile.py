"""torch.compile(fullgraph=True) over the fused op, and torch.library.opcheck of its custom ops."""

import pytest
import torch

from prope_kernels import apply_prope, prope_attention, prope_attention_varlen
from prope_kernels.interface import _attn_bwd_op, _attn_fwd_op, _rope_op

# aot_eager on the CPU: traces forward and backward through the custom ops without needing
# inductor's C++ toolchain; on a GPU the default (inductor) backend is used.
COMPILE_BACKEND = "inductor" if torch.cuda.is_available() else "aot_eager"


def _inputs(device, b=2, s=24, hq=4, hkv=2, d=32, dtype=torch.float16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, s, h, d, generator=gen).to(device=device, dtype=dtype)
            for h in (hq, hkv, hkv)]


BACKENDS = ["triton", "sdpa"]


# "auto" inside torch.compile: the op is traced with "auto" and decides when it runs (torch's
# kernel-eligibility checks are not traceable); same numbers as eager
@pytest.mark.parametrize("backend", BACKENDS + ["auto"])
def test_compile_fullgraph_forward_backward(device, backend):
    q, k, v = _inputs(device)

    def layer(q, k, v):
        o = prope_attention(q, k, v, p=0.75, backend=backend)
        return (o.float() ** 2).sum()

    compiled = torch.compile(layer, fullgraph=True, backend=COMPILE_BACKEND)
    grads = []
    for fn in (layer, compiled):
        xs = [x.clone().requires_grad_() for x in (q, k, v)]
        loss = fn(*xs)
        grads.append((loss.detach(), *torch.autograd.grad(loss, xs)))
    for a, b in zip(*grads):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_varlen_and_rope(device, backend):
    q, k, v = (x.reshape(48, x.shape[2], 32) for x in _inputs(device))
    cu = torch.tensor([0, 11, 48], dtype=torch.int32, device=device)

    def fn(q, k, v):
        o, lse = prope_attention_varlen(q, k, v, cu, 37, p=0.25, backend=backend,
                                        return_lse=True)
        r = apply_prope(q, p=0.25, backend=backend)
        # the sum in fp32 from the start: an fp16 o + r is rounded to fp16 in eager but not in
        # inductor's fused fp32 pointwise kernel (1 fp16 ulp, 2**-9 at |x| in [2, 4))
        return o, r, lse, o.float() + r.float() + lse.t()[..., None]

    eager = fn(q, k, v)
    compiled = torch.compile(fn, fullgraph=True, backend=COMPILE_BACKEND)(q, k, v)
    for a, b in zip(eager, compiled):
        assert a.dtype == b.dtype and torch.isfinite(b).all()
    for a, b in zip(eager[:3], compiled[:3]):  # the custom ops' outputs: the same kernels
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(eager[3], compiled[3])  # fp32 sums (defaults: rtol 1.3e-6)


def _packed_args(device, requires_grad):
    q, k, v = (x.reshape(48, x.shape[2], 32) for x in _inputs(device, seed=1))
    q, k, v = (x.requires_grad_(requires_grad) for x in (q, k, v))
    cu = torch.tensor([0, 20, 48], dtype=torch.int32, device=device)
    pos = torch.cat([torch.arange(20), torch.arange(28)]).to(device)
    return q, k, v, cu, pos


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_attn_fwd(device, requires_grad, backend):
    q, k, v, cu, pos = _packed_args(device, requires_grad)
    torch.library.opcheck(_attn_fwd_op, (q, k, v, cu, pos, 28, 0.75, 10000.0, "prope", "half",
                                         True, 32 ** -0.5, -1, -1, 0.0, backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_dlse", [False, True])
def test_opcheck_attn_bwd(device, backend, with_dlse):
    q, k, v, cu, pos = _packed_args(device, False)
    out, lse = _attn_fwd_op(q, k, v, cu, pos, 28, 0.5, 10000.0, "partial", "interleaved", False,
                            0.2, -1, -1, 0.0, backend)
    dout = torch.randn_like(out)
    dlse = torch.randn_like(lse) if with_dlse else None
    torch.library.opcheck(_attn_bwd_op, (dout, q, k, v, out, lse, dlse, cu, pos, 28, 0.5,
                                         10000.0, "partial", "interleaved", False, 0.2, -1, -1,
                                         0.0, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_rope(device, backend):
    q, _, _, _, pos = _packed_args(device, True)
    torch.library.opcheck(_rope_op, (q, pos, 0.75, 10000.0, "reversed", "half", False, backend))
