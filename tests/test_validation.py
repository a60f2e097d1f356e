"""Bad input raises a clear ValueError/TypeError naming the argument, before any kernel runs.

The checks run on the machine's device (the ``device`` fixture: CUDA on a GPU machine, the CPU with
the Triton interpreter otherwise), so a backend's dtype/head_dim checks are reached on both; the
tests about a GPU backend given CPU tensors build CPU tensors on purpose.
"""

import pytest
import torch

from prope_kernels import apply_prope, prope_attention, prope_attention_varlen


def _qkv(device, b=2, s=8, hq=4, hkv=2, d=32, dtype=torch.float16):
    return (torch.randn(b, s, hq, d).to(device, dtype), torch.randn(b, s, hkv, d).to(device, dtype),
            torch.randn(b, s, hkv, d).to(device, dtype))


BAD_DENSE = [
    (lambda q, k, v: prope_attention(q[0], k, v), ValueError, "q must have 4 dims"),
    (lambda q, k, v: prope_attention(q, k.float(), v), TypeError, "share a dtype"),
    # k/v may have their own seqlen (seqlen_q != seqlen_k), never their own batch or k != v
    (lambda q, k, v: prope_attention(q, k[:1], v[:1]), ValueError, "agree in batch"),
    (lambda q, k, v: prope_attention(q, k[:, :5], v), ValueError, "k and v must have the same"),
    (lambda q, k, v: prope_attention(q, k, v[..., :16]), ValueError, "same shape"),
    (lambda q, k, v: prope_attention(q[..., :3, :], k, v), ValueError, "multiple of kv_heads"),
    (lambda q, k, v: prope_attention(q, k, v, p=1.5), ValueError, "p must be in [0, 1]"),
    (lambda q, k, v: prope_attention(q, k, v, p=float("nan")), ValueError, "p must be in"),
    (lambda q, k, v: prope_attention(q, k, v, p="0.5"), TypeError, "p must be a float"),
    (lambda q, k, v: prope_attention(q, k, v, theta=0.5), ValueError, "theta"),
    (lambda q, k, v: prope_attention(q, k, v, variant="neox"), ValueError, "variant"),
    (lambda q, k, v: prope_attention(q, k, v, layout="gptj"), ValueError, "layout"),
    (lambda q, k, v: prope_attention(q, k, v, backend="cudnn"), ValueError, "backend"),
    (lambda q, k, v: prope_attention(q, k, v, softmax_scale=-1.0), ValueError, "softmax_scale"),
    (lambda q, k, v: prope_attention(q, k, v, causal=1), TypeError, "causal must be a bool"),
    (lambda q, k, v: prope_attention(q, k, v, positions=torch.arange(8.0, device=q.device)),
     TypeError, "positions must be an integer"),
    (lambda q, k, v: prope_attention(q, k, v, positions=torch.arange(7, device=q.device)),
     ValueError, "positions must have shape"),
    (lambda q, k, v: prope_attention(q.float(), k.float(), v.float(), backend="triton"),
     TypeError, "float16 and bfloat16"),
    (lambda q, k, v: prope_attention(q[..., :31], k[..., :31], v[..., :31]), ValueError,
     "head_dim must be even"),
    (lambda q, k, v: prope_attention(q.int(), k.int(), v.int()), TypeError, "floating-point"),
    (lambda q, k, v: prope_attention([q], k, v), TypeError, "q must be a torch.Tensor"),
]


@pytest.mark.parametrize("call,exc,msg", BAD_DENSE)
def test_bad_dense_input(device, call, exc, msg):
    with pytest.raises(exc, match=msg.replace("[", r"\[").replace("]", r"\]")):
        call(*_qkv(device))


def test_unsupported_head_dim_for_triton(device):
    q = torch.randn(1, 4, 2, 384, dtype=torch.float16, device=device)
    with pytest.raises(ValueError, match="head_dim"):
        prope_attention(q, q, q, backend="triton")


def test_gpu_backend_on_cpu(monkeypatch):
    # CPU tensors on any machine; without the interpreter the Triton backend refuses them
    q, k, v = _qkv("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        prope_attention(q, k, v, backend="triton")
    with pytest.raises(ValueError, match="backend='cuda'"):
        prope_attention(q, k, v, backend="cuda")


@pytest.mark.gpu  # needs a second device to place one tensor on
def test_devices_must_match():
    q, k, v = _qkv("cpu")
    with pytest.raises(ValueError, match="one device"):
        prope_attention(q.cuda(), k, v)


def test_positions_device_is_checked(device):
    q, k, v = _qkv(device)
    pos = torch.arange(8, device="meta")
    with pytest.raises(ValueError, match="positions must be on the same device"):
        prope_attention(q, k, v, positions=pos)


def _packed(device, lens=(3, 5), hq=2, hkv=1, d=16):
    t = sum(lens)
    return tuple(torch.randn(t, h, d).to(device, torch.float16) for h in (hq, hkv, hkv))


@pytest.mark.parametrize("cu,ms,exc,msg", [
    (torch.tensor([0, 5, 3, 8]), 5, ValueError, "non-decreasing"),
    (torch.tensor([0, 3, 9]), 6, ValueError, "exceeds the number of tokens"),
    (torch.tensor([1, 3, 8]), 5, ValueError, "must start at 0"),
    (torch.tensor([0, 3, 8]), 4, ValueError, "max_seqlen"),
    (torch.tensor([0.0, 3.0, 8.0]), 5, TypeError, "int32 or int64"),
    (torch.tensor([[0, 3, 8]]), 5, ValueError, "1-D"),
    ([0, 3, 8], 5, TypeError, "cu_seqlens must be"),
    (torch.tensor([0, 3, 8]), 5.0, TypeError, "max_seqlen"),
])
def test_bad_cu_seqlens(device, cu, ms, exc, msg):
    q, k, v = _packed(device)
    if isinstance(cu, torch.Tensor):
        cu = cu.to(device)
    with pytest.raises(exc, match=msg):
        prope_attention_varlen(q, k, v, cu, ms)


def test_varlen_rank_and_positions(device):
    q, k, v = _packed(device)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="q must have 3 dims"):
        prope_attention_varlen(q[None], k, v, cu, 5)
    with pytest.raises(ValueError, match="positions must have shape"):
        prope_attention_varlen(q, k, v, cu, 5, positions=torch.arange(7, device=device))


def test_apply_prope_errors(device):
    x = torch.randn(2, 8, 3, 32, device=device)
    with pytest.raises(ValueError, match="x must be"):
        apply_prope(x[0, 0])
    with pytest.raises(ValueError, match="positions must have shape"):
        apply_prope(x, torch.arange(9, device=device))
    with pytest.raises(ValueError, match="head_dim must be a positive even"):
        apply_prope(x[..., :31])
    with pytest.raises(TypeError, match="conjugate must be a bool"):
        apply_prope(x, conjugate="yes")


def test_cu_seqlens_checked_again_after_in_place_change(device):
    q, k, v = _packed(device)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32, device=device)
    prope_attention_varlen(q, k, v, cu, 5, backend="reference")
    cu[1] = 9  # now decreasing: the cached check must not hide it
    with pytest.raises(ValueError, match="non-decreasing"):
        prope_attention_varlen(q, k, v, cu, 5, backend="reference")


@pytest.mark.parametrize("kw,exc,msg", [
    (dict(window=4), TypeError, "window must be a \\(left, right\\) tuple"),
    (dict(window=(1, 2, 3)), TypeError, "window must be"),
    (dict(window=(1.0, 2)), TypeError, "window must be"),
    (dict(window=(True, 2)), TypeError, "window must be"),
    (dict(window=(-2, 0)), ValueError, "window sides must be >= -1"),
    (dict(window=(3, -5)), ValueError, "window sides must be >= -1"),
    (dict(softcap="50"), TypeError, "softcap must be a float"),
    (dict(softcap=-1.0), ValueError, "softcap must be a positive finite"),
    (dict(softcap=float("inf")), ValueError, "softcap must be a positive finite"),
    (dict(softcap=float("nan")), ValueError, "softcap must be a positive finite"),
])
def test_bad_window_and_softcap(kw, exc, msg):
    q, k, v = _qkv("cpu")
    with pytest.raises(exc, match=msg):
        prope_attention(q, k, v, backend="reference", **kw)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    with pytest.raises(exc, match=msg):
        prope_attention_varlen(*_packed("cpu"), cu, 5, backend="reference", **kw)


def test_backends_without_window_or_softcap(monkeypatch):
    # A backend whose registry entry lacks "window"/"softcap" (CUDA off its SM90 kernels, e.g.
    # for CPU tensors): naming it raises, "auto" passes over it to the next backend that has them.
    import dataclasses

    from prope_kernels.backends import registry as backends
    q, k, v = _qkv("cpu", d=64)
    for feature in ("window", "softcap"):
        assert feature in backends.get("cuda").features           # somewhere (SM90 kernels)
        assert feature not in backends.get("cuda").features_on(q)  # not for CPU tensors
        assert not backends.get("cuda").can_run(q, frozenset({feature}))
        assert feature in backends.get("triton").features
        assert feature in backends.get("reference").features
    with pytest.raises(ValueError, match="backend='cuda' does not implement window"):
        prope_attention(q, k, v, window=(15, 0), backend="cuda")
    with pytest.raises(ValueError, match="backend='cuda' does not implement softcap"):
        prope_attention(q, k, v, softcap=50.0, backend="cuda")
    # auto: a stand-in kernel backend that takes CPU tensors and lacks both features
    fake = dataclasses.replace(backends.get("reference"), name="fake", auto=lambda x: True,
                               features=frozenset({"varlen", "lse", "rope"}))
    monkeypatch.setitem(backends.REGISTRY, "fake", fake)
    monkeypatch.setattr(backends, "AUTO_ORDER", ["fake"] + backends.AUTO_ORDER)
    assert backends.choose_auto(q) == "fake"
    assert backends.choose_auto(q, frozenset({"window"})) == "reference"
    assert backends.choose_auto(q, frozenset({"softcap"})) == "reference"
    # plain causal is not a window: (-1, 0) with causal=True needs nothing
    from prope_kernels.validation import check_window_softcap
    assert check_window_softcap((-1, -1), None, True) == ((-1, 0), 0.0, frozenset())
    assert check_window_softcap((7, 3), 0, True) == ((7, 0), 0.0, frozenset({"window"}))
    assert check_window_softcap((-1, 0), 50, False)[2] == frozenset({"window", "softcap"})


def test_head_dim_512_errors_where_a_backend_lacks_it(monkeypatch):
    # Triton takes head_dim 512; CUDA does not, and says so (checked as if on a GPU)
    import dataclasses

    from prope_kernels import backends
    q = torch.randn(1, 4, 2, 512, dtype=torch.float16)
    assert backends.get("triton").head_dim_ok(512)
    cuda_here = dataclasses.replace(backends.get("cuda"), devices=None,
                                    unavailable=lambda: None)
    monkeypatch.setitem(backends.REGISTRY, "cuda", cuda_here)
    with pytest.raises(ValueError, match="backend='cuda' supports head_dim 64, 128 or 256; "
                                         "got head_dim=512"):
        backends.resolve("cuda", q)
