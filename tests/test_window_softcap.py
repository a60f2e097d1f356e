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


@pytest.mark.parametrize("causal,window,softcap", [(True, (4, 0), 3.0), (False, (2, 5), None),
                                                   (False, (0, 0), 1.5)])
def test_reference_backend_written_out_backward(causal, window, softcap):
    # the reference backend's hand-written backward (mask and 1 - tanh^2) == autograd through
    # the definition, in float64, dense and varlen, with an lse gradient
    b, s, hq, hkv, d = 2, 11, 6, 2, 16
    q, k, v, dout = (_rand(shp, seed=i, scale=3.0 if i < 2 else 1.0) for i, shp in
                     enumerate([(b, s, hq, d), (b, s, hkv, d), (b, s, hkv, d), (b, s, hq, d)]))
    dlse = _rand((b, hq, s), seed=9)
    spec = PRoPESpec(d, 0.75)

    def grads(fn):
        xs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        out, lse = fn(*xs)
        loss = (out * dout).sum() + (lse * dlse).sum()
        return (out, lse, *torch.autograd.grad(loss, xs))

    want = grads(lambda q, k, v: ref.prope_attention(q, k, v, spec, causal, None, None, True,
                                                     window, softcap))
    got = grads(lambda q, k, v: prope_attention(q, k, v, causal=causal, window=window,
                                                softcap=softcap, backend="reference",
                                                return_lse=True))
    cu = torch.tensor([0, s, 2 * s], dtype=torch.int32)
    packed = grads(lambda q, k, v: (lambda o, l: (o.view(b, s, hq, d),
                                                  l.view(hq, b, s).transpose(0, 1)))(
        *prope_attention_varlen(q.reshape(b * s, hq, d), k.reshape(b * s, hkv, d),
                                v.reshape(b * s, hkv, d), cu, s, causal=causal, window=window,
                                softcap=softcap, backend="reference", return_lse=True)))
    for name, g, pk, w in zip(("out", "lse", "dq", "dk", "dv"), got, packed, want):
        # lse is float32 by the op contract, so its gradient reaches dq, dk rounded to float32
        tol = 1e-6 if name in ("lse", "dq", "dk") else 1e-10
        torch.testing.assert_close(g.double(), w, rtol=tol, atol=tol, msg=name)
        torch.testing.assert_close(pk.double(), w, rtol=tol, atol=tol, msg=name)


# --- the Triton kernels against the float64 reference (tolerance rule) ---------------------------
# Interpreter block sizes are fwd 32x16, dkdv 16x32, dq 32x16: the windows below cut blocks on
# both edges and leave whole blocks outside, which are skipped.

import itertools  # noqa: E402
import zlib  # noqa: E402

import harness  # noqa: E402
from harness import Reference, reference_grads, yardstick_grads  # noqa: E402
from tolerance import check  # noqa: E402

HEADS = {"mha": (4, 4), "gqa": (6, 2), "mqa": (3, 1), "gqa4": (8, 2), "mqa2": (2, 1)}


def _inputs(key, shapes, dtype, device, scale=1.0):
    gen = torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))
    return [(torch.randn(s, generator=gen) * scale).to(device=device, dtype=dtype) for s in shapes]


def _compare(fused, reference, inputs, dout, select=slice(None)):
    """out, dq, dk, dv of ``fused`` vs ``reference`` in float64 (truth) and in the inputs' dtype
    (PyTorch's own error). ``select`` picks the token rows compared (dim -3)."""
    def grads(fn, xs, do):
        xs = [x.detach().clone().requires_grad_() for x in xs]
        out = fn(*xs)
        return (out, *torch.autograd.grad(out, xs, do))
    got = grads(fused, inputs, dout)
    # at GPU sizes the truth one query head at a time (harness.reference_grads), the yardstick
    # by blocks equal to the all-heads call (harness.yardstick_grads)
    truth = reference_grads(reference, [x.double() for x in inputs], [dout.double()])
    lowp = yardstick_grads(reference, inputs, [dout])
    for name, g, t, lp in zip(("out", "dq", "dk", "dv"), got, truth, lowp):
        check(name, g[..., select, :, :], t[..., select, :, :], lp[..., select, :, :])
    return got


def run_dense(device, dtype, b, s, heads, d, causal, window=(-1, -1), softcap=None, p=0.75,
              in_scale=1.0):
    hq, hkv = HEADS[heads]
    q, k, v, dout = _inputs((b, s, heads, d, causal, window, softcap, str(dtype)),
                            [(b, s, hq, d), (b, s, hkv, d), (b, s, hkv, d), (b, s, hq, d)],
                            dtype, device)
    q, k = q * in_scale, k * in_scale        # large logits (softcap): scale q and k
    spec = PRoPESpec(d, p)
    return _compare(
        lambda q, k, v: prope_attention(q, k, v, p=p, causal=causal, window=window,
                                        softcap=softcap, backend="triton"),
        Reference(spec, causal, window=window, softcap=softcap), (q, k, v), dout)


def run_varlen(device, dtype, lens, heads, d, causal, window=(-1, -1), softcap=None,
               in_scale=1.0):
    hq, hkv = HEADS[heads]
    total = sum(lens)
    cu = torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32, device=device)
    q, k, v, dout = _inputs((tuple(lens), heads, d, causal, window, softcap, str(dtype)),
                            [(total, hq, d), (total, hkv, d), (total, hkv, d), (total, hq, d)],
                            dtype, device)
    q, k = q * in_scale, k * in_scale
    spec = PRoPESpec(d, 0.75)
    _compare(
        lambda q, k, v: prope_attention_varlen(q, k, v, cu, max(lens), causal=causal,
                                               window=window, softcap=softcap, backend="triton"),
        Reference(spec, causal, window=window, softcap=softcap, cu_seqlens=cu), (q, k, v), dout)


@pytest.mark.parametrize("s,window,causal,heads,dtype", [
    (97, (16, 0), True, "gqa", torch.bfloat16),     # local causal layer, window << seqlen
    (97, (20, 7), False, "mha", torch.float16),     # two-sided
    (61, (13, -1), False, "mqa", torch.bfloat16),   # left side only
    (61, (-1, 9), False, "gqa", torch.float16),     # right side only
    (70, (5, 40), True, "mqa", torch.float16),      # causal caps the right side at 0
    (33, (100, 100), False, "gqa", torch.bfloat16),  # wider than the sequence: full attention
    (1, (3, 0), True, "mha", torch.float16),        # a single token
])
def test_window(device, s, window, causal, heads, dtype):
    run_dense(device, dtype, 2, s, heads, 32, causal, window)


def test_window_zero_is_the_diagonal_in_the_kernel(device):
    # (0, 0): each query sees only its own key, so out = v exactly (p = 1, no rounding)
    got = run_dense(device, torch.bfloat16, 2, 45, "mqa", 32, False, (0, 0))
    v = _inputs((2, 45, "mqa", 32, False, (0, 0), None, str(torch.bfloat16)),
                [(2, 45, 3, 32), (2, 45, 1, 32), (2, 45, 1, 32)], torch.bfloat16, device)[2]
    assert torch.equal(got[0], v.expand(2, 45, 3, 32))


@pytest.mark.parametrize("causal,dtype,heads", [(True, torch.float16, "gqa"),
                                                (False, torch.bfloat16, "mqa")])
def test_softcap_large_logits(device, causal, dtype, heads):
    # inputs scaled by 6: raw scores reach ~+-200, far past the cap of 50 (tanh saturates)
    run_dense(device, dtype, 2, 53, heads, 32, causal, softcap=50.0, in_scale=6.0)


def test_softcap_small_cap(device):
    # a cap well inside the score range: the tanh's curvature matters everywhere
    run_dense(device, torch.float16, 1, 40, "mha", 64, True, softcap=2.0, in_scale=2.0, p=0.25)


def test_softcap_and_window(device):
    run_dense(device, torch.bfloat16, 2, 77, "gqa", 32, True, (23, 0), softcap=30.0,
              in_scale=4.0)


@pytest.mark.parametrize("lens,window,causal,softcap", [
    ([1, 40, 70, 0, 9], (10, 0), True, None),
    ([33, 2, 64], (3, 5), False, 20.0),
])
def test_varlen_window(device, lens, window, causal, softcap):
    run_varlen(device, torch.float16, lens, "gqa", 32, causal, window, softcap,
               in_scale=3.0 if softcap else 1.0)


def test_window_with_gqa_split(device, monkeypatch):
    # dk/dv of a kv head reduced over 2 programs (atomics) with the window's loop bounds
    monkeypatch.setenv("PROPE_KV_SPLIT", "2")
    run_dense(device, torch.bfloat16, 1, 66, "gqa4", 32, False, (9, 4))


def test_blocks_outside_the_window_are_not_read(device):
    # Tokens [0, 64) are NaN. With window (8, 0), rows >= 128 (and their keys) never see them;
    # a kernel that visited those blocks and only masked them would turn 0 * NaN into NaN in
    # out, dq, dk or dv. The rows >= 128 must match the reference on clean inputs.
    b, s, d = 1, 256, 32
    hq, hkv = HEADS["gqa"]
    q, k, v, dout = _inputs(("skip",), [(b, s, hq, d), (b, s, hkv, d), (b, s, hkv, d),
                                        (b, s, hq, d)], torch.float16, device)
    spec = PRoPESpec(d, 0.75)
    window = (8, 0)

    def poisoned(q, k, v):
        nan = torch.zeros(1, s, 1, 1, device=q.device, dtype=q.dtype)
        nan[:, :64] = float("nan")
        return prope_attention(q + nan, k + nan, v + nan, window=window, backend="triton")

    got = _compare(poisoned, Reference(spec, True, window=window), (q, k, v), dout,
                   select=slice(128, None))
    assert torch.isnan(got[0][:, :64]).all()    # the poison did reach the rows that see it


def test_head_dim_512(device):
    # Gemma-4-style global layer head_dim with both features (interpreter: a small shape)
    run_dense(device, torch.bfloat16, 1, 37, "mqa2", 512, True, (20, 0), softcap=50.0,
              in_scale=3.0, p=0.25)


def test_headwise_reference_equals_all_heads(device):
    # reference_grads splits GPU-size references by query head: the same out, lse, dq, dk, dv
    # (dense GQA with lse, window and softcap; packed MQA) as the all-heads call
    spec = PRoPESpec(32, 0.75)
    q, k, v, do = _inputs("headwise", [(2, 19, 6, 32), (2, 19, 2, 32), (2, 19, 2, 32),
                                       (2, 19, 6, 32)], torch.float64, device)
    dlse = _inputs("headwise-lse", [(2, 6, 19)], torch.float64, device)[0]

    def dense(q, k, v):
        return ref.prope_attention(q, k, v, spec, True, None, None, return_lse=True,
                                   window=(5, 0), softcap=20.0)
    cu = torch.tensor([0, 7, 19], dtype=torch.int32, device=device)

    def packed(q, k, v):
        return ref.prope_attention_varlen(q, k, v, cu, spec, True, None)
    packed_in = [x[0, :, :3] if x.shape[-2] == 6 else x[0, :, :1] for x in (q, k, v, do)]
    for fn, xs, cots in ((dense, (q, k, v), [do, dlse]),
                         (packed, packed_in[:3], packed_in[3:])):
        whole = reference_grads(fn, xs, cots)
        split = reference_grads(fn, xs, cots, headwise_bytes=0)
        assert len(whole) == len(split) == len(cots) + 3
        for a, b in zip(whole, split):
            assert a.shape == b.shape
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_yardstick_blocks_equal_the_all_heads_call(dtype):
    # yardstick_grads computes GPU-size yardsticks by blocks (batch entries, whole kv-head groups
    # or single query heads): q and k rotated once, dk and dv summed over the blocks in fp32 and
    # rounded once, dk rotated back once, which is what the all-heads call does, so the results
    # are the same bits (float64: the same to 1e-12). Dense GQA with lse, window, softcap and
    # positions per row; dense MQA; packed GQA with lse. (Not float16: the CPU's float16 matmul
    # rounds differently with the batch size, by one unit in the last place.)
    spec = PRoPESpec(32, 0.75)
    q, k, v, do = _inputs(("yardstick", str(dtype)), [(2, 23, 6, 32), (2, 23, 2, 32),
                                                    (2, 23, 2, 32), (2, 23, 6, 32)], dtype, "cpu")
    dlse = _inputs("yardstick-lse", [(2, 6, 23)], torch.float32, "cpu")[0]
    pos = torch.randint(0, 3000, (2, 23), generator=torch.Generator().manual_seed(3))
    cu = torch.tensor([0, 9, 9, 23], dtype=torch.int32)
    one = 23 * 23 * 4                   # float32 scores of one head of one batch entry
    cases = [  # (reference, inputs, cotangents, block bytes: entries, kv groups, single heads)
        (Reference(spec, True, None, pos, (6, 0), 10.0, return_lse=True), (q, k, v),
         [do, dlse], (6 * one, 3 * one, one)),
        (Reference(spec, False, 0.3), (q, k[..., :1, :], v[..., :1, :]), [do],
         (6 * one, 6 * one, one)),
        (Reference(spec, True, cu_seqlens=cu, return_lse=True),
         tuple(x[0] for x in (q, k, v)), [do[0], dlse[0]], (3 * one, one)),
    ]
    for r, xs, cots, sizes in cases:
        whole = harness.grads(r, xs, cots)
        for size in sizes:
            split = yardstick_grads(r, xs, cots, block_bytes=size)
            assert len(split) == len(whole) == len(cots) + 3
            for a, b in zip(split, whole):
                assert a.dtype == b.dtype and a.shape == b.shape
                if dtype == torch.float64:
                    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
                else:
                    assert torch.equal(a, b), (r, size, (a.double() - b.double()).abs().max())


# --- GPU sizes (skipped without a GPU) -----------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("d", [128, 256])
@pytest.mark.parametrize("heads", ["gqa", "mqa"])
@pytest.mark.parametrize("window,causal", [((1023, 0), True), ((300, 700), False)])
def test_gpu_window(d, heads, window, causal):
    run_dense("cuda", torch.bfloat16, 2, 4096, heads, d, causal, window)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_softcap(dtype):
    run_dense("cuda", dtype, 2, 2048, "mqa", 256, True, softcap=50.0, in_scale=4.0)


@pytest.mark.gpu
def test_gpu_gemma2_local_layer_and_varlen():
    # Gemma 2 local layer: window 4096 (transformers' sliding_window) + softcap 50
    run_dense("cuda", torch.bfloat16, 1, 8192, "mqa", 256, True, (4095, 0), softcap=50.0,
              in_scale=3.0)
    run_varlen("cuda", torch.bfloat16, [1, 3000, 517, 2048, 7], "gqa", 128, True, (511, 0),
               softcap=30.0, in_scale=3.0)


@pytest.mark.gpu
def test_gpu_head_dim_512_window_softcap():
    run_dense("cuda", torch.bfloat16, 1, 2048, "mqa", 512, True, (511, 0), softcap=50.0, p=0.25)
