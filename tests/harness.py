"""The kernel test harness shared by test_attention.py, test_cuda_backend.py,
test_triton_configs.py and the other kernel tests: draw random inputs, run a backend forward and
backward, and hold it to the tolerance rule of tolerance.py against the float64 reference (the
truth, :func:`reference_grads`) with the reference in the kernel's dtype as PyTorch's own error
(the yardstick, :func:`yardstick_grads`), and optionally a second backend on the same draw.
"""

import itertools
import zlib
from dataclasses import dataclass, replace
from typing import Optional

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


# Float64 reference scores (the truth) above this many bytes a matrix are computed one query
# head at a time: the float64 reference keeps several (b, hq, s, s) matrices for its backward
# (1.5 GiB each at b=2, hq=6, s=4096), and the GPU suite runs 8 pytest-xdist processes on one
# GPU. In float64 the order of the dk/dv sums over heads does not matter.
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


@dataclass(frozen=True, eq=False)
class Reference:
    """A reference attention call (:mod:`prope_kernels.reference`), described by its arguments so
    that the low-precision yardstick can be computed by blocks (:func:`yardstick_grads`).
    Called as ``fn(q, k, v)``: dense (b, s, h, d) inputs, or packed (t, h, d) ones when
    ``cu_seqlens`` is given; returns out, or (out, lse) with ``return_lse``."""

    spec: PRoPESpec
    causal: bool = True
    scale: Optional[float] = None
    positions: Optional[torch.Tensor] = None
    window: tuple = (-1, -1)
    softcap: Optional[float] = None
    cu_seqlens: Optional[torch.Tensor] = None
    return_lse: bool = False

    def __call__(self, q, k, v):
        if self.cu_seqlens is None:
            return ref.prope_attention(q, k, v, self.spec, self.causal, self.scale,
                                       self.positions, self.return_lse, self.window, self.softcap)
        return ref.prope_attention_varlen(q, k, v, self.cu_seqlens, self.spec, self.causal,
                                          self.scale, self.positions, self.return_lse,
                                          self.window, self.softcap)


# The yardstick (the reference in the kernel's dtype) is the all-heads call, as the kernels
# compute: q and k rotated once, each kv head's dk and dv summed over its query heads in fp32
# (autograd's sum over the repeated heads) and rounded once, then dk rotated back once. When its
# float32 scores would exceed one float64 score matrix of the truth (one head, what
# reference_grads keeps several of; YARDSTICK_BYTES when that is larger) it is computed by blocks
# that reproduce it: batch entries, else whole kv-head groups, else single query heads with the
# group's dk and dv summed in fp32 and rounded once. (Blocks of query rows would not: each
# block's partial dk and dv is rounded to the dtype; two such blocks gave 1.44x the all-heads
# error on dv in an MQA draw.) Its memory then stays under the truth's.
YARDSTICK_BYTES = 256 * 2**20


def yardstick_grads(reference, inputs, cotangents, block_bytes=None):
    """``grads`` of ``reference`` (a :class:`Reference` or any ``fn(q, k, v)``) in the inputs'
    dtype, over all heads at once: PyTorch's own error. A :class:`Reference` whose float32
    scores exceed ``block_bytes`` (default: see :data:`YARDSTICK_BYTES`) is computed by blocks
    with the same result."""
    q, k = inputs[0], inputs[1]
    hq, hkv = q.shape[-2], k.shape[-2]
    rows = q.numel() // (hq * q.shape[-1])          # b * s (dense) or total (packed)
    s_k = k.shape[-3]
    limit = max(YARDSTICK_BYTES, rows * s_k * 8) if block_bytes is None else block_bytes
    if not isinstance(reference, Reference) or rows * s_k * hq * 4 <= limit:
        return grads(reference, inputs, cotangents)
    group = hq // hkv
    entry = rows * s_k * 4                          # float32 scores of one head
    entries = [slice(None)]
    if reference.cu_seqlens is None:
        b = q.shape[0]
        entry //= b                                 # one head of one batch entry
        n = max(1, limit // (entry * hq))
        entries = [slice(i, i + n) for i in range(0, b, n)]
    if hq * entry <= limit:
        heads = [slice(None)]
    elif group * entry <= limit:                    # whole kv-head groups
        n = limit // (group * entry)
        heads = [slice(c * group, (c + n) * group) for c in range(0, hkv, n)]
    else:                                           # one query head at a time
        heads = [slice(h, h + 1) for h in range(hq)]
    return _by_blocks(reference, inputs, cotangents, entries, heads)


def _by_blocks(r: Reference, inputs, cotangents, entries, heads):
    """The reference ``r`` by blocks (batch entries x query heads, contiguous, each within one
    kv-head group or made of whole groups): q and k rotated once; each block attends (``r``
    without rotation); out, lse and dq per block; dk and dv summed over the blocks in fp32
    (float64 inputs: float64) and rounded once; dk rotated back once."""
    q, k, v = (x.detach().clone().requires_grad_() for x in inputs)
    hq, hkv = q.shape[-2], k.shape[-2]
    group = hq // hkv
    if r.positions is not None:
        positions = r.positions
    elif r.cu_seqlens is not None:
        positions = ref.varlen_positions(r.cu_seqlens, q.shape[0])
    else:
        positions = ref.default_positions(q.shape[1], q.device)
    qr = ref.apply_prope(q, positions, r.spec)
    kr = ref.apply_prope(k, positions, r.spec)
    qr_, kr_ = qr.detach(), kr.detach().requires_grad_()
    attend = replace(r, spec=PRoPESpec(q.shape[-1], 0.0), positions=None)  # no rotation
    acc = torch.float64 if k.dtype == torch.float64 else torch.float32
    dkr = torch.zeros(k.shape, dtype=acc, device=k.device)
    dv = torch.zeros(v.shape, dtype=acc, device=v.device)
    outs, dqr = None, torch.empty_like(q)
    for e, h in itertools.product(entries, heads):
        first, last = range(hq)[h][0], range(hq)[h][-1]
        kv = slice(first // group, last // group + 1)

        def part(x):  # a block of q, an output or a cotangent: batch at dim 0, heads at -2
            return x[e][..., h, :]
        qb = part(qr_).requires_grad_()
        o = attend(qb, kr_[e][..., kv, :], v[e][..., kv, :])
        o = o if isinstance(o, tuple) else (o,)
        g = torch.autograd.grad(o, (qb, kr_, v),
                                [part(c).to(x.dtype) for x, c in zip(o, cotangents)])
        if outs is None:  # shaped as their cotangents
            outs = [c.new_empty(c.shape, dtype=x.dtype) for x, c in zip(o, cotangents)]
        for x, y in zip(o, outs):
            part(y).copy_(x.detach())
        part(dqr).copy_(g[0])
        dkr += g[1]
        dv += g[2]
        del o, g
    dq, dk = torch.autograd.grad((qr, kr), (q, k), (dqr, dkr.to(k.dtype)))
    return (*outs, dq, dk, dv.to(v.dtype))


def check_against_reference(names, got, reference, inputs, cotangents):
    """The tolerance rule for each of ``got`` (outputs, then input gradients): the truth is
    ``reference`` in float64 (:func:`reference_grads`), PyTorch's own error is ``reference`` in
    the inputs' dtype (:func:`yardstick_grads`)."""
    truth = reference_grads(reference, [x.double() for x in inputs],
                            [c.double() for c in cotangents])
    lowp = yardstick_grads(reference, inputs, cotangents)
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

    reference = Reference(spec, causal, scale, positions, return_lse=lse)

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

    reference = Reference(spec, causal, None, positions, cu_seqlens=cu)

    _run(kernel, reference, (q, k, v), [dout], ("out", "dq", "dk", "dv"), also)
