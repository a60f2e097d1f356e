"""The kernel test harness shared by test_attention.py, test_cuda_backend.py and
test_triton_configs.py: draw random inputs, run a backend forward and backward, and hold it to
the tolerance rule of tolerance.py against the float64 reference (and, optionally, a second
backend on the same draw).
"""

import itertools
import zlib

import torch

from prope_kernels import prope_attention, prope_attention_varlen
from prope_kernels import reference as ref
from prope_kernels.rotary import PRoPESpec
from tolerance import check

HEADS = {"mha": (4, 4), "gqa": (6, 2), "mqa": (3, 1)}


def seed(*key) -> int:
    """A fixed seed per case: each case is its own random draw, the same on every run."""
    return zlib.crc32(repr(key).encode())


def rand(shape, dtype, device, gen, scale=1.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float32) * scale).to(device=device,
                                                                               dtype=dtype)


def grads(fn, inputs, cotangents):
    """fn's outputs (a tensor or a tuple) and the gradients of sum(output * cotangent) w.r.t.
    ``inputs`` (fresh leaves): (*outputs, *grads)."""
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gs = torch.autograd.grad(outs, inputs, [c.to(o.dtype) for o, c in zip(outs, cotangents)])
    return (*outs, *gs)


# Reference scores above this many bytes a matrix are computed one query head at a time: the
# float64 reference keeps several (b, hq, s, s) matrices for its backward (1.5 GiB each at b=2,
# hq=6, s=4096), and the GPU suite runs 8 pytest-xdist processes on one GPU.
HEADWISE_BYTES = 256 * 2**20


def reference_grads(fn, inputs, cotangents, headwise_bytes=None):
    """``grads`` of a reference attention ``fn(q, k, v)``, one query head at a time when its
    float64 score matrix is large: q, k, v, the outputs (out, lse) and their cotangents all have
    the head axis at dim -2 (dense (b, s, h, d), packed (t, h, d), lse (b, h, s)); head h uses kv
    head h // (hq // hkv), so dk and dv sum over the heads of a group. Heads are independent in
    the math, so the results equal the all-heads call up to the order of the dk/dv sums."""
    q, k, v = inputs
    hq, hkv = q.shape[-2], k.shape[-2]
    rows = q.numel() // (hq * q.shape[-1])          # b * s (dense) or total (packed)
    s_k = k.shape[-3]
    limit = HEADWISE_BYTES if headwise_bytes is None else headwise_bytes
    if hq == 1 or rows * s_k * hq * 8 <= limit:
        return grads(fn, inputs, cotangents)
    group = hq // hkv
    outs = None
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for h in range(hq):
        kh = slice(h // group, h // group + 1)
        part = grads(fn, (q[..., h:h + 1, :], k[..., kh, :], v[..., kh, :]),
                     [c[..., h:h + 1, :] for c in cotangents])
        n = len(part) - 3
        if outs is None:
            outs = [o.new_empty(o.shape[:-2] + (hq,) + o.shape[-1:]) for o in part[:n]]
        for o, po in zip(outs, part[:n]):
            o[..., h:h + 1, :] = po
        dq[..., h:h + 1, :] = part[n]
        dk[..., kh, :] += part[n + 1]
        dv[..., kh, :] += part[n + 2]
        del part
    return (*outs, dq, dk, dv)


def check_against_reference(names, got, reference, inputs, cotangents):
    """The tolerance rule for each of ``got`` (outputs, then input gradients): the truth is
    ``reference`` in float64, PyTorch's own error is ``reference`` in the inputs' dtype."""
    truth = reference_grads(reference, [x.double() for x in inputs],
                            [c.double() for c in cotangents])
    lowp = reference_grads(reference, inputs, cotangents)
    for name, g, t, lp in zip(names, got, truth, lowp):
        check(name, g, t, lp)
    return truth, lowp


def _run(kernel, reference, inputs, cotangents, names, also):
    got = grads(kernel("primary"), inputs, cotangents)
    truth, lowp = check_against_reference(names, got, reference, inputs, cotangents)
    if also is not None:
        other = grads(kernel(also), inputs, cotangents)
        for name, g, t, o, lp in zip(names, got, truth, other, lowp):
            check(f"{name} ({also})", o, t, lp)  # both backends meet the rule on the same draw
            # and agree with each other: each is within 2x of PyTorch's error, so 4x between them
            check(f"{name} (vs {also})", g, o.double(), lp.double() - t + o.double(), factor=4.0)


def run_dense(device, dtype, b, s, hq, hkv, d, p=0.75, variant="prope", layout="half",
              causal=True, theta=10000.0, positions=None, backend="triton", scale=None,
              lse=False, also=None):
    """prope_attention with ``backend`` (and ``also``, a second backend) vs the reference:
    out (and lse, with an lse gradient, when ``lse``), dq, dk, dv."""
    gen = torch.Generator().manual_seed(seed(b, s, hq, hkv, d, p, variant, layout, causal, dtype,
                                             backend, lse))
    q = rand((b, s, hq, d), dtype, device, gen)
    k = rand((b, s, hkv, d), dtype, device, gen)
    v = rand((b, s, hkv, d), dtype, device, gen)
    cot = [rand((b, s, hq, d), dtype, device, gen)]
    if lse:
        cot.append(rand((b, hq, s), torch.float32, device, gen))
    spec = PRoPESpec(d, p, theta, variant, layout)

    def kernel(name):
        be = backend if name == "primary" else name
        return lambda q, k, v: prope_attention(
            q, k, v, p=p, theta=theta, variant=variant, layout=layout, causal=causal,
            positions=positions, backend=be, softmax_scale=scale, return_lse=lse)

    def reference(q, k, v):
        return ref.prope_attention(q, k, v, spec, causal, scale, positions, return_lse=lse)

    names = ("out", "lse", "dq", "dk", "dv") if lse else ("out", "dq", "dk", "dv")
    _run(kernel, reference, (q, k, v), cot, names, also)


def run_varlen(device, dtype, lens, hq, hkv, d, p=0.75, variant="prope", layout="half",
               causal=True, explicit_positions=False, backend="triton", also=None):
    """prope_attention_varlen with ``backend`` vs the reference: out, dq, dk, dv."""
    gen = torch.Generator().manual_seed(seed(tuple(lens), hq, hkv, d, p, causal, backend))
    total = sum(lens)
    cu = torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32, device=device)
    q = rand((total, hq, d), dtype, device, gen)
    k = rand((total, hkv, d), dtype, device, gen)
    v = rand((total, hkv, d), dtype, device, gen)
    dout = rand((total, hq, d), dtype, device, gen)
    positions = (torch.randint(0, 5000, (total,), generator=gen).to(device)
                 if explicit_positions else None)
    spec = PRoPESpec(d, p, 10000.0, variant, layout)
    ms = max(lens)

    def kernel(name):
        be = backend if name == "primary" else name
        return lambda q, k, v: prope_attention_varlen(
            q, k, v, cu, ms, p=p, variant=variant, layout=layout, causal=causal,
            positions=positions, backend=be)

    def reference(q, k, v):
        return ref.prope_attention_varlen(q, k, v, cu, spec, causal, None, positions)

    _run(kernel, reference, (q, k, v), [dout], ("out", "dq", "dk", "dv"), also)
