"""Sliding window and softcap in the CUDA backend's SM90 kernels (forward, fused backward; the
split backward: window only) against the float64 reference with the tolerance rule, forward and
dq, dk, dv: head_dim 64/128/256, odd lengths, varlen, GQA/MQA, windows that cut tiles on both
edges and skip whole ones, and the refusals (SM80 kernels; softcap with the split backward).

On the CPU: the refusals that need no GPU, and proof that the comparison used here fails on the
kinds of mistake the kernels could make (a window edge off by one, softcap's derivative dropped).
"""

import itertools

import pytest
import torch

from harness import Reference
from prope_kernels.backends import cuda as cuda_backend
from prope_kernels import prope_attention, prope_attention_varlen
from prope_kernels.rotary import PRoPESpec
from test_window_softcap import HEADS, _compare, _inputs


def _dense(backend, device, dtype, b, s, heads, d, causal, window=(-1, -1), softcap=None,
           in_scale=1.0, p=0.75, poison=None, select=slice(None), kernel=None):
    hq, hkv = HEADS[heads]
    q, k, v, dout = _inputs(("cuda-ws", b, s, heads, d, causal, window, softcap, str(dtype)),
                            [(b, s, hq, d), (b, s, hkv, d), (b, s, hkv, d), (b, s, hq, d)],
                            dtype, device)
    q, k = q * in_scale, k * in_scale        # large logits (softcap): scale q and k
    spec = PRoPESpec(d, p)

    def fused(q, k, v):
        if poison is not None:  # tokens [0, poison) NaN in q, k and v
            nan = torch.zeros(1, s, 1, 1, device=q.device, dtype=q.dtype)
            nan[:, :poison] = float("nan")
            q, k, v = q + nan, k + nan, v + nan
        return prope_attention(q, k, v, p=p, causal=causal, window=window, softcap=softcap,
                               backend=backend)
    return _compare(kernel or fused, Reference(spec, causal, window=window, softcap=softcap),
                    (q, k, v), dout, select=select)


def _varlen(device, dtype, lens, heads, d, causal, window=(-1, -1), softcap=None, in_scale=1.0):
    hq, hkv = HEADS[heads]
    total = sum(lens)
    cu = torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32, device=device)
    q, k, v, dout = _inputs(("cuda-ws", tuple(lens), heads, d, causal, window, softcap,
                             str(dtype)),
                            [(total, hq, d), (total, hkv, d), (total, hkv, d), (total, hq, d)],
                            dtype, device)
    q, k = q * in_scale, k * in_scale
    spec = PRoPESpec(d, 0.75)
    _compare(lambda q, k, v: prope_attention_varlen(q, k, v, cu, max(lens), causal=causal,
                                                    window=window, softcap=softcap,
                                                    backend="cuda"),
             Reference(spec, causal, window=window, softcap=softcap, cu_seqlens=cu), (q, k, v),
             dout)


# --- without a GPU ------------------------------------------------------------------------------

def test_cpu_tensors_refused_with_the_feature_named():
    q = torch.randn(1, 8, 2, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="backend='cuda' does not implement window"):
        prope_attention(q, q, q, window=(4, 0), backend="cuda")
    with pytest.raises(ValueError, match="backend='cuda' does not implement softcap"):
        prope_attention(q, q, q, softcap=30.0, backend="cuda")


@pytest.mark.parametrize("window,softcap,match", [((-2, 0), 0.0, "window"),
                                                  ((3, -5), 0.0, "window"),
                                                  ((-1, -1), -1.0, "softcap"),
                                                  ((-1, -1), float("inf"), "softcap"),
                                                  ((-1, -1), float("nan"), "softcap")])
def test_bad_window_or_softcap_named(window, softcap, match):
    # argument checks come before any device query (they run without a GPU)
    with pytest.raises(ValueError, match=match):
        cuda_backend._window_softcap(torch.device("cpu"), window, softcap, True)


def test_plain_causal_is_no_window():
    # (-1, 0) / (-1, -1) with causal and softcap 0 need nothing (no device query either)
    for window in ((-1, 0), (-1, -1), (-1, 5)):
        assert cuda_backend._window_softcap(torch.device("cpu"), window, 0.0, True) == (
            window[0], window[1], 0.0)


def _wrong_window(window):
    left, right = window
    return (left + 1, right)


@pytest.mark.parametrize("mistake", ["window edge", "softcap derivative"])
def test_the_comparison_catches_kernel_mistakes(mistake):
    # The CPU stand-in for a wrong kernel: the reference backend with a window edge one key too
    # wide, or with softcap in the forward but its derivative dropped in the backward. The
    # comparison the GPU tests use must reject both (tolerance.check raises AssertionError).
    dtype, s, d = torch.float32, 70, 32
    if mistake == "window edge":
        window, softcap = (9, 0), None

        def kernel(q, k, v):
            return prope_attention(q, k, v, causal=True, window=_wrong_window(window),
                                   backend="reference")
    else:
        window, softcap = (-1, 0), 5.0

        def kernel(q, k, v):
            capped = prope_attention(q, k, v, causal=True, softcap=softcap, backend="reference")
            plain = prope_attention(q, k, v, causal=True, backend="reference")
            return plain + (capped - plain).detach()  # capped values, uncapped gradient
    with pytest.raises(AssertionError):
        _dense("reference", "cpu", dtype, 1, s, "gqa", d, True, window, softcap,
               in_scale=3.0, kernel=kernel)
    # and the same comparison passes the reference itself (the check is not vacuous)
    _dense("reference", "cpu", dtype, 1, s, "gqa", d, True, window, softcap, in_scale=3.0)


# --- on an sm_90 GPU ----------------------------------------------------------------------------

@pytest.fixture
def sm90(monkeypatch):
    """The SM90 kernels (where window and softcap live). Skips only where there is no sm_90 GPU
    or no built extension; a build without the sm_90a target makes the op raise (a failure)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (none present)")
    if not cuda_backend.available():
        pytest.skip(f"CUDA extension prope_kernels._C not built: {cuda_backend.load_error()}")
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the SM90 kernels run on sm_90 (H100/H200) only")
    monkeypatch.setenv("PROPE_CUDA_SM90", "1")
    monkeypatch.delenv("PROPE_CUDA_SM90_BWD", raising=False)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("s,window,causal,heads", [
    (1025, (200, 0), True, "gqa"),      # local causal layer: tiles skipped left, cut on both edges
    (301, (37, 21), False, "mha"),      # two-sided, narrower than a tile
    (300, (70, -1), False, "mqa"),      # left side only
    (257, (-1, 9), False, "gqa"),       # right side only
    (190, (5, 40), True, "mqa"),        # causal caps the right side at 0
    (97, (1000, 1000), False, "gqa"),   # wider than the sequence: full attention
    (1, (3, 0), True, "mha"),           # a single token
    (129, (0, 0), False, "gqa"),        # the diagonal alone
])
def test_sm90_window(sm90, d, s, window, causal, heads):
    dtype = torch.bfloat16 if (s + d) % 2 else torch.float16
    _dense("cuda", "cuda", dtype, 2, s, heads, d, causal, window)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("causal,dtype,heads,cap,in_scale", [
    (True, torch.float16, "gqa", 50.0, 6.0),     # raw scores past the cap: tanh saturates
    (False, torch.bfloat16, "mqa", 50.0, 6.0),
    (True, torch.bfloat16, "mha", 2.0, 2.0),     # cap inside the score range: curvature matters
])
def test_sm90_softcap(sm90, d, causal, dtype, heads, cap, in_scale):
    _dense("cuda", "cuda", dtype, 2, 333, heads, d, causal, softcap=cap, in_scale=in_scale)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128, 256])
def test_sm90_softcap_and_window(sm90, d):
    # a Gemma 2 local layer: causal, window, softcap together
    _dense("cuda", "cuda", torch.bfloat16, 1, 1111, "gqa4", d, True, (255, 0), softcap=50.0,
           in_scale=4.0)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 256])
@pytest.mark.parametrize("lens,window,causal,softcap", [
    ([1, 300, 129, 0, 77], (40, 0), True, None),
    ([200, 3, 64, 130], (17, 33), False, 20.0),
    ([513, 2], (-1, 0), True, 30.0),
])
def test_sm90_varlen_window_softcap(sm90, d, lens, window, causal, softcap):
    _varlen("cuda", torch.float16, lens, "gqa", d, causal, window, softcap,
            in_scale=3.0 if softcap else 1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128, 256])
def test_sm90_blocks_outside_the_window_are_not_read(sm90, d):
    # Tokens [0, 256) are NaN. With window (64, 0), rows >= 512 (and their keys) never see them:
    # a kernel that loaded those tiles and only masked them would turn 0 * NaN into NaN.
    got = _dense("cuda", "cuda", torch.float16, 1, 1024, "gqa", d, True, (64, 0), poison=256,
                 select=slice(512, None))
    assert torch.isnan(got[0][:, :256]).all()    # the poison did reach the rows that see it


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128, 256])
def test_sm90_split_backward_window(sm90, monkeypatch, d):
    # the deterministic (split) backward has the window; softcap is refused there by name
    monkeypatch.setenv("PROPE_CUDA_SM90_BWD", "split")
    _dense("cuda", "cuda", torch.bfloat16, 1, 399, "gqa", d, False, (50, 20))
    q = torch.randn(1, 64, 2, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = prope_attention(q, q, q, softcap=30.0, backend="cuda")
    with pytest.raises(ValueError, match="softcap is not implemented by the deterministic"):
        out.sum().backward()


@pytest.mark.gpu
def test_sm80_kernels_refuse_window_and_softcap(monkeypatch):
    if not torch.cuda.is_available() or not cuda_backend.available():
        pytest.skip("needs a CUDA GPU and the built extension")
    monkeypatch.setenv("PROPE_CUDA_SM90", "0")
    q = torch.randn(1, 64, 2, 64, device="cuda", dtype=torch.float16)
    for kw in (dict(window=(8, 0)), dict(softcap=30.0)):
        with pytest.raises(ValueError, match="backend='cuda' does not implement"):
            prope_attention(q, q, q, backend="cuda", **kw)
