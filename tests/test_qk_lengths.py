"""seqlen_q != seqlen_k in the training ops (dense and varlen with cu_seqlens_k): flash-attn's
bottom-right alignment, q and k at their own positions, forward and dq/dk/dv, checked against the
float64 definition (prope_kernels.reference.prope_attention_varlen_qk) with the tolerance rule.

Interpreter block sizes are fwd 32x16, dkdv 16x32, dq 32x16: the lengths below are odd, cross
block edges, and include Lq > Lk (rows that see no key under a causal mask: out 0, lse -inf),
Lk = 0 and Lq = 0.
"""

import itertools
import zlib

import pytest
import torch

from prope_kernels import prope_attention, prope_attention_varlen
from prope_kernels import reference as ref
from prope_kernels.backends import common as backend_common
from prope_kernels.rotary import PRoPESpec
from tolerance import check

HEADS = {"mha": (4, 4), "gqa": (6, 2), "mqa": (3, 1)}


def _rand(key, shapes, dtype):
    gen = torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))
    return [torch.randn(s, generator=gen).to(dtype) for s in shapes]


def _cu(lens):
    return torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32)


def _default_positions(lq, lk):
    # the documented defaults: k at 0..Lk-1, q at the last Lq of them (Lk-Lq..Lk-1)
    qpos = torch.cat([torch.arange(b - a, b) for a, b in zip(lq, lk)] or [torch.zeros(0)])
    kpos = torch.cat([torch.arange(b) for b in lk] or [torch.zeros(0)])
    return qpos.long(), kpos.long()


def _grads(fn, xs, dout):
    xs = [x.detach().clone().requires_grad_() for x in xs]
    out, lse = fn(*xs)
    return (out, lse.detach(), *torch.autograd.grad(out, xs, dout))


def _compare(fused, lq, lk, heads, d, causal, window, p, dtype, qpos=None, kpos=None,
             softcap=None, device="cpu"):
    """out, lse, dq, dk, dv of ``fused(q, k, v) -> (out, lse)`` (varlen layout) against the
    float64 definition; PyTorch's error in ``dtype`` is the yardstick."""
    hq, hkv = HEADS[heads]
    cq, ck = _cu(lq).to(device), _cu(lk).to(device)
    q, k, v, do = (x.to(device) for x in _rand(
        (tuple(lq), tuple(lk), heads, d, causal, window, p, str(dtype)),
        [(sum(lq), hq, d), (sum(lk), hkv, d), (sum(lk), hkv, d), (sum(lq), hq, d)], dtype))
    if qpos is None:
        qpos, kpos = _default_positions(lq, lk)
    qpos, kpos = qpos.to(device), kpos.to(device)
    spec = PRoPESpec(d, p)

    def reference(q, k, v):
        return ref.prope_attention_varlen_qk(q, k, v, cq, ck, spec, qpos, kpos, causal, None,
                                             True, window, softcap)
    got = _grads(fused, (q, k, v), do)
    truth = _grads(reference, [x.double() for x in (q, k, v)], do.double())
    lowp = _grads(reference, (q, k, v), do)
    for name, g, t, lp in zip(("out", "dq", "dk", "dv"), got[:1] + got[2:], truth[:1] + truth[2:],
                              lowp[:1] + lowp[2:]):
        check(name, g, t, lp)
    # lse: -inf exactly on the rows that see no key, else within float32 noise
    lse, lse_t = got[1], truth[1]
    assert not torch.isnan(lse).any()
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_t))
    fin = torch.isfinite(lse_t)
    assert (lse.double()[fin] - lse_t[fin]).abs().max().item() < 1e-2 if fin.any() else True
    return got, truth


def _dense(backend, b, sq, sk, heads, d, causal, window, p, dtype, **kw):
    """A dense call compared in the varlen layout (its rows packed by a view)."""
    hq, hkv = HEADS[heads]

    def fused(qf, kf, vf):
        out, lse = prope_attention(qf.view(b, sq, hq, d), kf.view(b, sk, hkv, d),
                                   vf.view(b, sk, hkv, d), p=p, causal=causal, window=window,
                                   backend=backend, return_lse=True, **kw)
        return out.reshape(b * sq, hq, d), lse.transpose(0, 1).reshape(hq, b * sq)
    return _compare(fused, [sq] * b, [sk] * b, heads, d, causal, window, p, dtype)


def _varlen(backend, lq, lk, heads, d, causal, window, p, dtype, softcap=None, device="cpu"):
    def fused(q, k, v):
        return prope_attention_varlen(q, k, v, _cu(lq).to(device), max(lq), p=p, causal=causal,
                                      window=window, softcap=softcap, backend=backend,
                                      return_lse=True, cu_seqlens_k=_cu(lk).to(device),
                                      max_seqlen_k=max(lk))
    return _compare(fused, lq, lk, heads, d, causal, window, p, dtype, softcap=softcap,
                    device=device)


# --- the definition ------------------------------------------------------------------------------

def test_bottom_right_mask_is_flash_attn_alignment():
    m, n = 5, 9
    for causal, (left, right) in itertools.product([True, False], [(-1, -1), (2, -1), (1, 3)]):
        keep = ref.attention_mask_bottom_right(m, n, causal, (left, right))
        r = 0 if causal and right < 0 else (min(right, 0) if causal else right)
        for i in range(m):
            for j in range(n):
                want = ((left < 0 or j >= i + n - m - left) and (r < 0 or j <= i + n - m + r))
                assert (True if keep is None else bool(keep[i, j])) == want


# --- reference backend ---------------------------------------------------------------------------

@pytest.mark.parametrize("lq,lk,causal,window", [
    ([3, 7], [9, 4], True, (-1, -1)),     # Lq < Lk and Lq > Lk (empty rows)
    ([5, 0, 6], [2, 3, 0], False, (1, 2)),  # a window, Lq = 0 and Lk = 0
    ([4], [11], True, (3, -1)),
])
def test_reference_backend(lq, lk, causal, window):
    _varlen("reference", lq, lk, "gqa", 16, causal, window, 0.5, torch.float32)


def test_reference_backend_dense_and_lse_gradient():
    _dense("reference", 2, 3, 8, "mqa", 16, True, (-1, -1), 1.0, torch.float32)
    # an lse gradient: the written-out backward against autograd of the float64 definition
    lq, lk, hq, d = [6, 2], [3, 5], 4, 16
    q, k, v = _rand("lse", [(8, hq, d), (8, hq, d), (8, hq, d)], torch.float64)
    spec = PRoPESpec(d, 0.75)
    qpos, kpos = _default_positions(lq, lk)
    dl = torch.randn(hq, 8, dtype=torch.float64)

    def loss(fn, xs):
        xs = [x.clone().requires_grad_() for x in xs]
        out, lse = fn(*xs)
        val = out.sum() + (lse.double().nan_to_num(0, 0, 0) * dl).sum()
        return torch.autograd.grad(val, xs)
    got = loss(lambda q, k, v: prope_attention_varlen(
        q, k, v, _cu(lq), 6, cu_seqlens_k=_cu(lk), max_seqlen_k=5, backend="reference",
        return_lse=True), (q, k, v))
    want = loss(lambda q, k, v: _finite_lse(ref.prope_attention_varlen_qk(
        q, k, v, _cu(lq), _cu(lk), spec, qpos, kpos, True, None, True)), (q, k, v))
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)   # lse is float32 (contract)


def _finite_lse(res):
    # the definition's logsumexp of an all -inf row has a NaN gradient; those rows are constant
    out, lse = res
    return out, torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)


# --- Triton kernels (interpreter on the CPU) ----------------------------------------------------

@pytest.mark.parametrize("b,sq,sk,heads,causal,window,p,dtype", [
    (2, 7, 37, "gqa", True, (-1, -1), 0.5, torch.float16),    # Lq < Lk
    (2, 37, 9, "mha", True, (-1, -1), 1.0, torch.bfloat16),   # Lq > Lk: empty rows
    (1, 21, 50, "mqa", False, (-1, -1), 0.0, torch.float16),  # non-causal, NoPE
    (2, 19, 45, "gqa", True, (6, -1), 0.5, torch.bfloat16),   # causal local window
    (1, 40, 23, "mha", False, (5, 3), 1.0, torch.float16),    # two-sided window, Lq > Lk
])
def test_triton_dense(b, sq, sk, heads, causal, window, p, dtype):
    _dense("triton", b, sq, sk, heads, 32, causal, window, p, dtype)


@pytest.mark.parametrize("lq,lk,causal,window,heads", [
    ([5, 19, 3, 0, 7], [9, 11, 3, 4, 0], True, (-1, -1), "gqa"),
    ([13, 33, 1], [40, 17, 6], False, (-1, -1), "mha"),
    ([13, 33, 1], [40, 17, 6], True, (4, -1), "mqa"),
    ([9, 30], [31, 8], False, (2, 7), "gqa"),
    # whole blocks no row sees, on both sides: query blocks far before the keys (Lq - Lk > the
    # forward's 32 rows) and key blocks far before every query's window (dK/dV kernel: empty
    # query range, hi < lo)
    ([80, 5], [5, 100], True, (3, -1), "mqa"),
])
def test_triton_varlen(lq, lk, causal, window, heads):
    _varlen("triton", lq, lk, heads, 32, causal, window, 0.5, torch.float16)


def test_triton_varlen_softcap():
    _varlen("triton", [11, 4], [6, 21], "gqa", 32, True, (-1, -1), 1.0, torch.bfloat16,
            softcap=5.0)


def test_triton_explicit_positions():
    lq, lk = [6, 10], [17, 4]
    qpos = torch.tensor([3, 9, 100, 4, 4, 0] + list(range(50, 60)))
    kpos = torch.tensor(list(range(7, 24)) + [1, 1000, 2, 3])

    def fused(q, k, v):
        return prope_attention_varlen(q, k, v, _cu(lq), 10, cu_seqlens_k=_cu(lk),
                                      max_seqlen_k=17, positions=qpos, k_positions=kpos,
                                      p=0.5, backend="triton", return_lse=True)
    _compare(fused, lq, lk, "mha", 32, True, (-1, -1), 0.5, torch.float16, qpos, kpos)


def test_k_positions_default_q_is_last_of_k():
    # with k_positions only, q defaults to the last seqlen_q of them
    q, k, v = _rand("kpos", [(2, 3, 2, 16), (2, 5, 2, 16), (2, 5, 2, 16)], torch.float64)
    kpos = torch.tensor([10, 20, 30, 40, 50])
    a = prope_attention(q, k, v, k_positions=kpos, backend="reference")
    b = prope_attention(q, k, v, positions=kpos[2:], k_positions=kpos, backend="reference")
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    spec = PRoPESpec(16, 0.75)
    want = ref.prope_attention_qk(q, k, v, spec, kpos[2:], kpos)
    torch.testing.assert_close(a, want)


# --- the equal-length path is the one from before ------------------------------------------------

def test_equal_lengths_hand_no_k_arguments(monkeypatch):
    from prope_kernels.backends import reference as be
    seen = []
    orig = be.attn_fwd

    def spy(*args, **kw):
        seen.append(sorted(kw))
        return orig(*args, **kw)
    monkeypatch.setattr(be, "attn_fwd", spy)
    q, k, v = _rand("eq", [(2, 6, 2, 16)] * 3, torch.float32)
    prope_attention(q, k, v, backend="reference")
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    prope_attention_varlen(q.view(12, 2, 16), k.view(12, 2, 16), v.view(12, 2, 16), cu, 7,
                           backend="reference")
    assert seen and all("cu_seqlens_k" not in s for s in seen), seen
    # and the qk path at equal lengths with default positions gives the same numbers
    out = prope_attention(q, k, v, backend="reference")
    out_k = prope_attention(q, k, v, backend="reference", k_positions=torch.arange(6))
    torch.testing.assert_close(out, out_k, rtol=1e-6, atol=1e-6)
    assert len(seen) == 4 and "cu_seqlens_k" in seen[-1]


# --- bad input -----------------------------------------------------------------------------------

def _qkv(total_q=8, total_k=10):
    return _rand("bad", [(total_q, 2, 16), (total_k, 2, 16), (total_k, 2, 16)], torch.float32)


@pytest.mark.parametrize("kw,match", [
    (dict(cu_seqlens_k=torch.tensor([0, 10], dtype=torch.int32), max_seqlen_k=10),
     "cu_seqlens_k must have as many entries"),
    (dict(cu_seqlens_k=torch.tensor([0, 4, 10], dtype=torch.int32)), "max_seqlen_k is required"),
    (dict(cu_seqlens_k=torch.tensor([0, 4, 10], dtype=torch.int32), max_seqlen_k=5),
     "max_seqlen_k"),
    (dict(cu_seqlens_k=torch.tensor([0, 4, 11], dtype=torch.int32), max_seqlen_k=7),
     r"cu_seqlens_k\[-1\] \(11\) exceeds the number of tokens in k"),
    (dict(cu_seqlens_k=torch.tensor([1, 4, 10], dtype=torch.int32), max_seqlen_k=7),
     "cu_seqlens_k must start at 0"),
    (dict(cu_seqlens_k=torch.tensor([0, 4, 10], dtype=torch.int32), max_seqlen_k=6,
          positions=torch.arange(8)), "k_positions is required"),
    (dict(cu_seqlens_k=torch.tensor([0, 4, 10], dtype=torch.int32), max_seqlen_k=6,
          k_positions=torch.arange(9)), "k_positions must have shape"),
    (dict(cu_seqlens_k=torch.tensor([0, 4, 10], dtype=torch.int32), max_seqlen_k=6,
          k_positions=torch.arange(10)), "positions is required when k_positions"),
])
def test_varlen_errors(kw, match):
    q, k, v = _qkv()
    cu = torch.tensor([0, 5, 8], dtype=torch.int32)
    with pytest.raises((ValueError, TypeError), match=match):
        prope_attention_varlen(q, k, v, cu, 5, backend="reference", **kw)


def test_varlen_without_cu_seqlens_k_needs_equal_totals():
    q, k, v = _qkv(8, 10)
    with pytest.raises(ValueError, match="total_tokens"):
        prope_attention_varlen(q, k, v, torch.tensor([0, 8], dtype=torch.int32), 8,
                               backend="reference")


def test_dense_errors():
    q, = _rand("d", [(2, 3, 2, 16)], torch.float32)
    k, v = _rand("d2", [(1, 5, 2, 16)] * 2, torch.float32)
    with pytest.raises(ValueError, match="agree in batch"):
        prope_attention(q, k, v, backend="reference")
    k, v = _rand("d3", [(2, 5, 2, 16)] * 2, torch.float32)
    with pytest.raises(ValueError, match="k_positions is required"):
        prope_attention(q, k, v, positions=torch.arange(3), backend="reference")
    with pytest.raises(ValueError, match="k_positions must have shape"):
        prope_attention(q, k, v, k_positions=torch.arange(4), backend="reference")
    with pytest.raises(ValueError, match="positions is required when k_positions"):
        prope_attention(k, q, q, k_positions=torch.arange(3), backend="reference")


@pytest.mark.parametrize("backend", ["sdpa", "cuda"])
def test_other_backends_refuse(backend):
    q, = _rand("r", [(2, 3, 2, 16)], torch.float16)
    k, v = _rand("r2", [(2, 5, 2, 16)] * 2, torch.float16)
    with pytest.raises(ValueError, match="qk_lengths"):
        prope_attention(q, k, v, backend=backend)


def test_backend_modules_refuse_direct_calls():
    from prope_kernels.backends import cuda, sdpa
    spec = PRoPESpec(16, 0.5)
    q, k, v = _qkv()
    cu = torch.tensor([0, 8], dtype=torch.int32)
    for m in (cuda, sdpa):
        with pytest.raises(ValueError, match="qk_lengths"):
            m.attn_fwd(q, k, v, cu, torch.arange(8), 8, spec, True, 0.25,
                       cu_seqlens_k=torch.tensor([0, 10], dtype=torch.int32),
                       positions_k=torch.arange(10), max_seqlen_k=10)
    with pytest.raises(ValueError, match="qk_lengths"):
        backend_common.refuse_qk("x", cu)


def test_auto_passes_over_backends_without_the_feature():
    from prope_kernels.backends import registry
    needs = frozenset({"qk_lengths"})
    x = torch.zeros(4, 2, 64, dtype=torch.float16)
    assert not registry.get("sdpa").can_run(x, needs) or "qk_lengths" in registry.get(
        "sdpa").features
    assert "qk_lengths" not in registry.get("cuda").features
    assert "qk_lengths" not in registry.get("sdpa").features
    assert "qk_lengths" in registry.get("triton").features
    assert "qk_lengths" in registry.get("reference").features


def test_explain_names_the_feature():
    from prope_kernels import explain
    q, = _rand("x", [(2, 3, 2, 16)], torch.float16)
    k, v = _rand("x2", [(2, 5, 2, 16)] * 2, torch.float16)
    assert explain(q, k, v, backend="reference").plan == "reference"
    with pytest.raises(ValueError, match="qk_lengths"):
        explain(q, k, v, backend="sdpa")


# --- torch.compile and the op schema -------------------------------------------------------------

COMPILE_BACKEND = "inductor" if torch.cuda.is_available() else "aot_eager"


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_compile_fullgraph_varlen_qk(device, backend):
    lq, lk = [5, 12], [9, 3]
    q, k, v = _rand("c", [(17, 4, 32), (12, 2, 32), (12, 2, 32)], torch.float16)
    q, k, v = (x.to(device) for x in (q, k, v))
    cq, ck = _cu(lq).to(device), _cu(lk).to(device)

    def fn(q, k, v):
        o = prope_attention_varlen(q, k, v, cq, 12, cu_seqlens_k=ck, max_seqlen_k=9, p=0.5,
                                   backend=backend)
        return (o.float() ** 2).sum()
    compiled = torch.compile(fn, fullgraph=True, backend=COMPILE_BACKEND)
    res = []
    for f in (fn, compiled):
        xs = [x.clone().requires_grad_() for x in (q, k, v)]
        loss = f(*xs)
        res.append((loss.detach(), *torch.autograd.grad(loss, xs)))
    for a, b in zip(*res):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_opcheck_attn_fwd_qk(device):
    from prope_kernels.interface import _attn_fwd_op
    q, k, v = _rand("o", [(17, 4, 32), (12, 2, 32), (12, 2, 32)], torch.float16)
    q, k, v = (x.to(device).requires_grad_() for x in (q, k, v))
    cq, ck = _cu([5, 12]).to(device), _cu([9, 3]).to(device)
    qpos, kpos = (x.to(device) for x in _default_positions([5, 12], [9, 3]))
    torch.library.opcheck(_attn_fwd_op, (q, k, v, cq, qpos, 12, 0.75, 10000.0, "prope", "half",
                                         True, 32 ** -0.5, -1, -1, 0.0, "triton", False, ck,
                                         kpos, 9))


@pytest.mark.parametrize("shapes,lq,lk", [
    # dK/dV kernel, BLOCK_M > BLOCK_N: key blocks no query's window reaches (hi < lo in their
    # query range): fails without the free_hi <= hi bound (non-finite dk under the poison)
    ({"dkdv": (64, 16)}, [40, 5], [30, 100]),
    # forward and dQ kernels, BLOCK_N > BLOCK_M: query blocks that see no key (Lq >> Lk): fails
    # without the hi >= lo clamp of _key_blocks (non-finite out)
    ({"fwd": (16, 64), "dq": (16, 64)}, [90, 5], [6, 30]),
])
def test_triton_empty_block_ranges_with_other_block_shapes(shapes, lq, lk):
    """The block shapes the GPU tables have (tall or wide) on the empty ranges of the SHIFT
    kernels: integer division truncates toward 0 (as on the GPU), so a range end computed from a
    negative row could land past an empty range's start. The interpreter's one config per
    kernel is reshaped for this test."""
    from prope_kernels import env
    from prope_kernels.backends.triton.attention import KERNELS
    if not env.interpreting():
        pytest.skip("reshapes the CPU interpreter's single config of each kernel")
    saved = []
    try:
        for name, (bm, bn) in shapes.items():
            cfg = KERNELS[name].configs[0]
            saved.append((name, cfg, dict(cfg.kwargs)))
            cfg.kwargs.update(BLOCK_M=bm, BLOCK_N=bn)
            KERNELS[name].cache.clear()
        _varlen("triton", lq, lk, "mqa", 32, True, (3, -1), 0.5, torch.float16)
    finally:
        for name, cfg, old in saved:
            cfg.kwargs.clear()
            cfg.kwargs.update(old)
            KERNELS[name].cache.clear()


def test_same_cu_seqlens_tensor_is_the_equal_length_path(monkeypatch):
    from prope_kernels.backends import reference as be
    seen = []
    orig = be.attn_fwd
    monkeypatch.setattr(be, "attn_fwd", lambda *a, **kw: seen.append(sorted(kw)) or orig(*a, **kw))
    q, k, v = _qkv(8, 8)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    a = prope_attention_varlen(q, k, v, cu, 5, cu_seqlens_k=cu, max_seqlen_k=5,
                               backend="reference")
    b = prope_attention_varlen(q, k, v, cu, 5, cu_seqlens_k=cu.clone(), max_seqlen_k=5,
                               backend="reference")
    assert "cu_seqlens_k" not in seen[0] and "cu_seqlens_k" in seen[1]
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_auto_on_a_gpu_plans_triton_without_asking_sdpa(monkeypatch):
    # auto on CUDA tensors: sdpa's eligibility check (a reshape of k as packed like q) is not
    # asked for keys of their own lengths; the plan is a backend with qk_lengths. Stand-in CUDA
    # "tensors": the policy reads only device, dtype and shapes.
    import types
    from prope_kernels import dispatch
    from prope_kernels.backends import sdpa

    def like(shape):
        return types.SimpleNamespace(device=torch.device("cuda"), dtype=torch.bfloat16,
                                     shape=shape, dim=lambda: len(shape))

    def asked(*a, **kw):
        raise AssertionError("sdpa.choose was asked about a qk_lengths call")
    monkeypatch.setattr(dispatch, "arch", lambda dev: "sm_90")
    monkeypatch.setattr(sdpa, "choose", asked)
    dec = dispatch.decide(like((2, 3, 4, 128)), like((2, 7, 2, 128)), 2, 7, True,
                          needs=frozenset({"qk_lengths"}))
    assert dec.plan in ("triton", "reference"), dec


# --- GPU (skipped without one): GPU sizes, the tuned configs, sm_90 (portable kernels there) -----

@pytest.mark.gpu
@pytest.mark.parametrize("lq,lk,causal,window,heads,d,dtype", [
    ([1000, 77, 513], [2048, 30, 513], True, (-1, -1), "gqa", 128, torch.bfloat16),
    ([300, 1025], [4000, 64], False, (128, 0), "mha", 64, torch.float16),
    ([700, 9], [130, 2000], True, (255, -1), "mqa", 256, torch.bfloat16),
])
def test_gpu_qk_lengths(lq, lk, causal, window, heads, d, dtype):
    _varlen("triton", lq, lk, heads, d, causal, window, 0.5, dtype, device="cuda")
