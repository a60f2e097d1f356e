"""The Hopper kernels (prope_kernels/backends/triton/hopper.py) against the float64 reference,
and the dispatch between them and the portable kernels.

Without a GPU they run under the CPU interpreter (Triton 3.9's interpreter executes the device-side
tensor descriptors, zero-fill and clipped stores included) at small odd shapes, forced by
PROPE_TRITON_KERNELS=hopper; on an H100 the same cases run compiled, and the ``gpu`` cases add
training sizes at every head_dim and GQA group, and every config of the tables once.
"""

import pytest
import torch

from prope_kernels.backends.triton import hopper
from harness import HEADS, run_dense

ON_GPU = torch.cuda.is_available()
SM90 = ON_GPU and torch.cuda.get_device_capability() == (9, 0)


@pytest.fixture
def hopper_kernels(monkeypatch):
    """Force the Hopper kernels and count their launches (a test must not pass on the portable
    path by accident)."""
    if ON_GPU and not SM90:
        pytest.skip("the Hopper kernels run on sm_90 GPUs (or the CPU interpreter)")
    if not hopper.triton_supports():
        pytest.skip(f"Triton {__import__('triton').__version__} has no tensor descriptors")
    monkeypatch.setenv(hopper.KERNELS_ENV, "hopper")
    calls = {"fwd": 0, "bwd": 0, "need_bwd": True}
    fwd, bwd = hopper.attn_fwd, hopper.attn_bwd

    def count(name, f):
        def wrapped(*a, **kw):
            calls[name] += 1
            return f(*a, **kw)
        return wrapped
    monkeypatch.setattr(hopper, "attn_fwd", count("fwd", fwd))
    monkeypatch.setattr(hopper, "attn_bwd", count("bwd", bwd))
    yield calls
    assert calls["fwd"] > 0 and (calls["bwd"] > 0 or not calls["need_bwd"]), \
        f"the Hopper kernels did not run: {calls}"


# --- interpreter-sized (CI) and compiled on an H100: odd shapes, every GQA group ---------------

@pytest.mark.parametrize("s,heads,causal,d,dtype", [
    (1, "mha", True, 32, torch.float16),
    (17, "gqa", True, 32, torch.bfloat16),
    (17, "mqa", False, 64, torch.float16),
    (97, "mha", False, 32, torch.bfloat16),
    (97, "mqa", True, 16, torch.float16),
    (130, "gqa", True, 64, torch.bfloat16),
])
def test_hopper_shapes(device, hopper_kernels, s, heads, causal, d, dtype):
    hq, hkv = HEADS[heads]
    run_dense(device, dtype, 2, s, hq, hkv, d, p=0.75, causal=causal)


@pytest.mark.parametrize("variant,layout,p", [("prope", "half", 0.0), ("prope", "half", 0.25),
                                              ("partial", "interleaved", 1.0),
                                              ("reversed", "interleaved", 0.5)])
def test_hopper_rotation_variants(device, hopper_kernels, variant, layout, p):
    run_dense(device, torch.bfloat16, 2, 41, 4, 2, 32, p=p, variant=variant, layout=layout)


@pytest.mark.parametrize("split", [2, 4])
def test_hopper_gqa_split(device, monkeypatch, hopper_kernels, split):
    # dK/dV of a kv head from its 4 query heads in `split` programs, added by fp32 atomics
    monkeypatch.setenv("PROPE_KV_SPLIT", str(split))
    run_dense(device, torch.float16, 2, 70, 8, 2, 32, p=0.5, causal=split == 2)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("causal", [True, False])
def test_hopper_backward_fused_and_split(device, monkeypatch, hopper_kernels, fused, causal):
    # both backward forms at one head_dim: one kernel with dQ' by fp32 atomics, or dK/dV + dQ
    monkeypatch.setattr(hopper, "fused_dq", lambda d: fused)
    run_dense(device, torch.bfloat16, 2, 53, 6, 2, 64, p=0.75, causal=causal)


def test_hopper_d512_forward(device, hopper_kernels):
    # head_dim 512: the Hopper forward (its backward is portable, and an error when forced)
    from prope_kernels import prope_attention
    from prope_kernels import reference as ref
    from prope_kernels.rotary import PRoPESpec
    from tolerance import check
    hopper_kernels["need_bwd"] = False
    gen = torch.Generator().manual_seed(512)
    q, k, v = (torch.randn((1, 19, h, 512), generator=gen).to(device, torch.bfloat16)
               for h in (2, 1, 1))
    spec = PRoPESpec(512, 0.25, 1e6, "prope", "half")
    out = prope_attention(q, k, v, p=0.25, theta=1e6, backend="triton")
    truth = ref.prope_attention(q.double(), k.double(), v.double(), spec, True, None, None)
    check("out", out, truth, ref.prope_attention(q, k, v, spec, True, None, None))
    with pytest.raises(ValueError, match="head_dim 512 backward"):
        qg = q.clone().requires_grad_()
        prope_attention(qg, k, v, p=0.25, theta=1e6, backend="triton").sum().backward()


def test_hopper_varlen(device, hopper_kernels):
    # per-sequence descriptors: rows of the next sequence must be neither read nor written
    from prope_kernels import prope_attention_varlen
    from prope_kernels import reference as ref
    from prope_kernels.rotary import PRoPESpec
    from tolerance import check
    gen = torch.Generator().manual_seed(11)
    lens = [5, 0, 33, 18]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    total, hq, hkv, d = sum(lens), 4, 2, 32
    q, k, v, dout = (torch.randn((total, h, d), generator=gen).to(torch.bfloat16).to(device)
                     for h in (hq, hkv, hkv, hq))
    spec = PRoPESpec(d, 0.75, 1e4, "prope", "half")

    def grads(f, xs, do):
        xs = [x.detach().clone().requires_grad_() for x in xs]
        out = f(*xs)
        return (out, *torch.autograd.grad(out, xs, do))

    def reference(q, k, v):
        outs, start = [], 0
        for n in lens:
            sl = slice(start, start + n)
            outs.append(ref.prope_attention(q[None, sl], k[None, sl], v[None, sl], spec, True,
                                            None, None)[0])
            start += n
        return torch.cat(outs)

    got = grads(lambda q, k, v: prope_attention_varlen(q, k, v, cu.to(device), max(lens), p=0.75,
                                                       backend="triton"), (q, k, v), dout)
    truth = grads(reference, [x.double() for x in (q, k, v)], dout.double())
    lowp = grads(reference, (q, k, v), dout)
    for name, g, t, lp in zip(("out", "dq", "dk", "dv"), got, truth, lowp):
        check(name, g, t, lp)


# --- the dispatch ----------------------------------------------------------------------------

def test_dispatch_rules(monkeypatch):
    q = torch.zeros(8, 4, 64, dtype=torch.bfloat16)
    k = v = torch.zeros(8, 2, 64, dtype=torch.bfloat16)
    monkeypatch.setenv(hopper.KERNELS_ENV, "portable")
    assert not hopper.selected(q, k, v)
    monkeypatch.setenv(hopper.KERNELS_ENV, "auto")
    assert not hopper.selected(q, k, v)          # auto never picks them for CPU tensors
    monkeypatch.delenv(hopper.KERNELS_ENV)
    assert hopper.requested() == "portable"    # until a GPU run has validated the Hopper kernels
    monkeypatch.setenv(hopper.KERNELS_ENV, "fast")
    with pytest.raises(ValueError, match="PROPE_TRITON_KERNELS must be"):
        hopper.selected(q, k, v)
    if not hopper.triton_supports():
        assert "tensor descriptors" in hopper.unsupported_reason(q, k, v)
        return
    if ON_GPU:
        # compiled kernels: CPU tensors are refused first, then the rules below need CUDA tensors
        # on an sm_90 GPU (the CPU interpreter is for CI machines only)
        assert hopper.unsupported_reason(q, k, v) == "not a CUDA tensor"
        q, k, v = (x.cuda() for x in (q, k, v))
        if not SM90:
            assert hopper.unsupported_reason(q, k, v) == "not an sm_90 GPU"
            return
    else:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    # what the new kernels lack falls back to the portable ones (explicitly named)
    assert hopper.unsupported_reason(q, k, v) is None
    assert "head_dim 48" in hopper.unsupported_reason(q[..., :48], k[..., :48], v[..., :48])
    big = torch.zeros(8, 2, 512, dtype=torch.bfloat16, device=q.device)
    assert hopper.unsupported_reason(big, big, big) is None        # forward: Hopper
    assert "head_dim 512 backward" in hopper.unsupported_reason(big, big, big, backward=True)
    assert hopper.unsupported_reason(q, k, v, window=(8, 0)) == "sliding window"
    assert hopper.unsupported_reason(q, k, v, softcap=30.0) == "softcap"
    off = torch.zeros(8, 4, 72, dtype=torch.bfloat16, device=q.device)[..., 4:68]  # base +8 B
    assert "16-byte aligned" in hopper.unsupported_reason(off, k, v)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        assert "deterministic" in hopper.unsupported_reason(q, k, v, backward=True)
    finally:
        torch.use_deterministic_algorithms(False)
    # forced: an unsupported call is an error, never a silent portable run
    monkeypatch.setenv(hopper.KERNELS_ENV, "hopper")
    assert hopper.selected(q, k, v)
    with pytest.raises(ValueError, match="head_dim 48"):
        hopper.selected(q[..., :48], k[..., :48], v[..., :48])


def test_backward_form_choice(monkeypatch):
    # which backward form runs: a forced config's, else the default (no tuning here)
    seen = []
    monkeypatch.setattr(hopper, "_attn_bwd_form", lambda *a, fused, **kw: seen.append(fused))
    q = torch.zeros(4, 2, 128)
    args = (None, q, q, q, None, None, None, None, 4, None, True, 1.0)
    kw = dict(seq_bucket=16, rotate=True, emulate=False, split=1)
    monkeypatch.setenv("PROPE_AUTOTUNE", "0")
    hopper.attn_bwd(*args, **kw)
    with hopper.force_config("hbwd", hopper.TABLES["hbwd"][128][0]):
        hopper.attn_bwd(*args, **kw)
    with hopper.force_config("hdq", hopper.TABLES["hdq"][128][0]):
        hopper.attn_bwd(*args, **kw)
    assert seen == [hopper.fused_dq(128), True, False]
    assert hopper._forms(128) == [True, False] and hopper._forms(64)[0] is True
    assert hopper.fused_dq(64) and not hopper.fused_dq(256)


@pytest.mark.parametrize("feature", ["window", "softcap"])
def test_window_softcap_not_on_hopper_kernels(device, monkeypatch, feature):
    # forced: a clear error naming the feature; auto (on an sm_90 GPU): the portable kernels run
    # the call, checked against the reference
    from prope_kernels import prope_attention
    kw = {"window": (5, 0)} if feature == "window" else {"softcap": 20.0}
    q = torch.randn(1, 33, 2, 32, device=device, dtype=torch.float16)
    if hopper.triton_supports() and (SM90 or not ON_GPU):
        monkeypatch.setenv(hopper.KERNELS_ENV, "hopper")
        with pytest.raises(ValueError, match="sliding window" if feature == "window"
                           else "softcap"):
            prope_attention(q, q[:, :, :1], q[:, :, :1], backend="triton", **kw)
    if not SM90:
        return
    from test_window_softcap import run_dense as run_features
    monkeypatch.setenv(hopper.KERNELS_ENV, "auto")

    def fail(*a, **k):
        raise AssertionError("Hopper kernels called for a window/softcap call")
    monkeypatch.setattr(hopper, "attn_fwd", fail)
    monkeypatch.setattr(hopper, "attn_bwd", fail)
    run_features("cuda", torch.bfloat16, 2, 300, "gqa", 128, True, **kw)


def test_portable_forced_runs_portable(device, monkeypatch):
    # PROPE_TRITON_KERNELS=portable: the Hopper launchers are never called
    monkeypatch.setenv(hopper.KERNELS_ENV, "portable")

    def fail(*a, **kw):
        raise AssertionError("Hopper kernels called under PROPE_TRITON_KERNELS=portable")
    monkeypatch.setattr(hopper, "attn_fwd", fail)
    monkeypatch.setattr(hopper, "attn_bwd", fail)
    run_dense(device, torch.float16, 1, 19, 2, 1, 32, p=0.5)


# --- GPU: training sizes at every head_dim and GQA group; every config once -------------------

@pytest.mark.gpu
@pytest.mark.parametrize("heads", ["mha", "gqa", "mqa"])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_hopper_gpu_head_dims(hopper_kernels, d, heads):
    hq, hkv = HEADS[heads]
    s = 1025
    run_dense("cuda", torch.bfloat16, 2, s, hq, hkv, d, p=0.75, causal=True)


@pytest.mark.gpu
def test_hopper_gpu_d512_forward_portable_backward(monkeypatch):
    # auto: head_dim 512 runs the Hopper forward and the portable backward (no spill-free config)
    if not SM90:
        pytest.skip("sm_90 only")
    monkeypatch.setenv(hopper.KERNELS_ENV, "auto")
    calls = []
    fwd, bwd = hopper.attn_fwd, hopper.attn_bwd
    monkeypatch.setattr(hopper, "attn_fwd", lambda *a, **kw: calls.append("fwd") or fwd(*a, **kw))
    monkeypatch.setattr(hopper, "attn_bwd", lambda *a, **kw: calls.append("bwd") or bwd(*a, **kw))
    run_dense("cuda", torch.bfloat16, 1, 333, 4, 1, 512, p=0.25, causal=True)
    assert calls == ["fwd"], calls


@pytest.mark.gpu
def test_hopper_gpu_noncausal_long(hopper_kernels):
    run_dense("cuda", torch.float16, 1, 4096, 8, 1, 256, p=0.25, causal=False)


def _config_cases():
    for kernel, table in hopper.TABLES.items():
        for d, rows in table.items():
            for row in rows:
                yield kernel, d, row


def _run_config(kernel, d):
    s = 1000 if d <= 256 else 333
    if d in hopper.BWD_HEAD_DIMS:
        run_dense("cuda", torch.bfloat16, 2, s, 8, 2, d, p=0.75, causal=True)
        return
    # forward only (head_dim 512): the output and lse against the reference
    from prope_kernels import prope_attention
    from prope_kernels import reference as ref
    from prope_kernels.rotary import PRoPESpec
    from tolerance import check
    gen = torch.Generator().manual_seed(d)
    q, k, v = (torch.randn((2, s, h, d), generator=gen).to("cuda", torch.bfloat16)
               for h in (8, 2, 2))
    spec = PRoPESpec(d, 0.75, 1e4, "prope", "half")
    out = prope_attention(q, k, v, p=0.75, backend="triton")
    truth = ref.prope_attention(q.double(), k.double(), v.double(), spec, True, None, None)
    check("out", out, truth, ref.prope_attention(q, k, v, spec, True, None, None))


@pytest.mark.gpu
@pytest.mark.parametrize("kernel,d,row", list(_config_cases()),
                         ids=lambda x: "x".join(map(str, x)) if isinstance(x, tuple) else str(x))
def test_hopper_every_config(hopper_kernels, kernel, d, row):
    hopper_kernels["need_bwd"] = d in hopper.BWD_HEAD_DIMS   # d512: a forward-only check
    with hopper.force_config(kernel, row):
        _run_config(kernel, d)
