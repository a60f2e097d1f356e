"""flash_attn_func / flash_attn_varlen_func (flash-attn's arguments) and nn.PRoPEAttention.

Both are thin layers over prope_attention / prope_attention_varlen: every comparison is with the
same call made directly, so the results must be bitwise equal. Reference backend (pure PyTorch)
except where a kernel is the point.
"""

import copy
import inspect

import pytest
import torch

import prope_kernels
from prope_kernels import (PRoPEAttention, flash_attn_func, flash_attn_varlen_func,
                           prope_attention, prope_attention_varlen)

COMPILE_BACKEND = "inductor" if torch.cuda.is_available() else "aot_eager"


def dense(device, b=2, s=12, hq=4, hkv=2, d=16, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, s, h, d, generator=gen).to(device=device, dtype=dtype)
            for h in (hq, hkv, hkv)]


def packed(device, lens=(5, 11, 4), hq=4, hkv=2, d=16, seed=1):
    gen = torch.Generator().manual_seed(seed)
    total = sum(lens)
    q, k, v = (torch.randn(total, h, d, generator=gen).to(device) for h in (hq, hkv, hkv))
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32,
                      device=device)
    return q, k, v, cu, max(lens)


# ----------------------------------------------------------------------------------------------
# signatures: flash-attn's names, order and defaults, then keyword-only rotary arguments
# ----------------------------------------------------------------------------------------------

FLASH_DENSE = [("q", None), ("k", None), ("v", None), ("dropout_p", 0.0),
               ("softmax_scale", None), ("causal", False), ("window_size", (-1, -1)),
               ("softcap", 0.0), ("alibi_slopes", None), ("deterministic", False),
               ("return_attn_probs", False)]
FLASH_VARLEN = FLASH_DENSE[:3] + [("cu_seqlens_q", None), ("cu_seqlens_k", None),
                                  ("max_seqlen_q", None), ("max_seqlen_k", None)] \
    + FLASH_DENSE[3:] + [("block_table", None)]
ROTARY = {"p": inspect.Parameter.empty, "theta": 10000.0, "variant": "prope", "layout": "half",
          "positions": None, "backend": "auto"}


@pytest.mark.parametrize("fn,flash", [(flash_attn_func, FLASH_DENSE),
                                      (flash_attn_varlen_func, FLASH_VARLEN)])
def test_signature_matches_flash_attn(fn, flash):
    params = list(inspect.signature(fn).parameters.values())
    lead = [x for x in params if x.kind == x.POSITIONAL_OR_KEYWORD]
    assert [x.name for x in lead] == [n for n, _ in flash]
    for x, (_, default) in zip(lead, flash):
        assert x.default == (inspect.Parameter.empty if default is None and x.name in
                             ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q",
                              "max_seqlen_k") else default), x.name
    kw = {x.name: x.default for x in params if x.kind == x.KEYWORD_ONLY}
    # the varlen call also takes the keys' own positions (cu_seqlens_k != cu_seqlens_q)
    assert kw == (dict(ROTARY, k_positions=None) if fn is flash_attn_varlen_func else ROTARY)


def test_exports():
    for name in ("flash_attn_func", "flash_attn_varlen_func", "PRoPEAttention"):
        assert name in prope_kernels.__all__ and hasattr(prope_kernels, name)
    assert prope_kernels.nn.PRoPEAttention is PRoPEAttention


# ----------------------------------------------------------------------------------------------
# flash_attn_func: the same call as prope_attention
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flash_args,flash_kw,ours", [
    # flash-attn's default is causal=False
    ((), dict(p=0.5), dict(p=0.5, causal=False)),
    ((), dict(causal=True, p=1.0, theta=500.0), dict(p=1.0, theta=500.0, causal=True)),
    # positional, in flash-attn's order: dropout_p, softmax_scale, causal, window_size, softcap
    ((0.0, 0.3, True, (3, 0), 5.0), dict(p=0.25, variant="reversed"),
     dict(p=0.25, variant="reversed", softmax_scale=0.3, causal=True, window=(3, 0),
          softcap=5.0)),
    ((), dict(window_size=[2, 1], softcap=0.0, p=0.75, layout="interleaved"),
     dict(p=0.75, layout="interleaved", causal=False, window=(2, 1))),
    ((), dict(causal=True, deterministic=True, p=0.5, variant="partial"),
     dict(p=0.5, variant="partial", causal=True, deterministic=True)),
])
def test_flash_attn_func_is_prope_attention(device, flash_args, flash_kw, ours):
    q, k, v = dense(device)
    got = flash_attn_func(q, k, v, *flash_args, backend="reference", **flash_kw)
    want = prope_attention(q, k, v, backend="reference", **ours)
    assert torch.equal(got, want)


def test_flash_attn_func_positions_and_grads(device):
    q, k, v = dense(device, seed=3)
    pos = torch.tensor([[3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14],
                        [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22]], device=device)
    grads = []
    for call in (lambda *x: flash_attn_func(*x, causal=True, p=0.5, positions=pos,
                                            backend="reference"),
                 lambda *x: prope_attention(*x, p=0.5, positions=pos, backend="reference")):
        xs = [x.clone().requires_grad_() for x in (q, k, v)]
        out = call(*xs)
        grads.append((out, *torch.autograd.grad((out ** 2).sum(), xs)))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_flash_attn_func_triton_kernel(device):
    """One call through a kernel (the Triton interpreter on the CPU): same launch as ours."""
    q, k, v = dense(device, s=16, d=32, dtype=torch.float16)
    got = flash_attn_func(q, k, v, 0.0, None, True, (4, 0), p=0.75, backend="triton")
    want = prope_attention(q, k, v, p=0.75, causal=True, window=(4, 0), backend="triton")
    assert torch.equal(got, want)


def test_p_is_required(device):
    q, k, v = dense(device)
    with pytest.raises(TypeError, match="'p'"):
        flash_attn_func(q, k, v, causal=True)
    with pytest.raises(TypeError):  # the rotary arguments are keyword-only
        flash_attn_func(q, k, v, 0.0, None, True, (-1, -1), 0.0, None, False, False, 0.5)


@pytest.mark.parametrize("kw,match", [
    (dict(dropout_p=0.1), "dropout_p"),
    (dict(alibi_slopes=torch.ones(4)), "alibi_slopes"),
    (dict(return_attn_probs=True), "return_attn_probs"),
    (dict(window_size=3), "window_size"),
    (dict(softcap=None), "softcap"),
])
def test_flash_attn_func_refuses(device, kw, match):
    q, k, v = dense(device)
    err = TypeError if match in ("window_size", "softcap") else ValueError
    with pytest.raises(err, match=match):
        flash_attn_func(q, k, v, p=0.5, backend="reference", **kw)


def test_sdpa_layout_detected_when_shapes_tell(device):
    q, k, v = dense(device)  # (b, s, h, d)
    bhsd = [x.transpose(1, 2) for x in (q, k, v)]  # GQA in SDPA's layout: 4 vs 2 heads in dim 1
    with pytest.raises(ValueError, match=r"\(batch, heads, seqlen, head_dim\)"):
        flash_attn_func(*bhsd, p=0.5, backend="reference")
    with pytest.raises(ValueError, match="qkv_layout='bhsd'"):
        PRoPEAttention(backend="reference")(*bhsd)
    # never a valid call: dim 1 (seqlen) agrees, even when seqlen == heads or seqlen == kv_heads
    for s in (4, 2):
        q, k, v = dense(device, s=s)
        assert torch.equal(flash_attn_func(q, k, v, p=0.5, backend="reference"),
                           prope_attention(q, k, v, p=0.5, causal=False, backend="reference"))


# ----------------------------------------------------------------------------------------------
# flash_attn_varlen_func
# ----------------------------------------------------------------------------------------------

def test_flash_attn_varlen_func_is_prope_attention_varlen(device):
    q, k, v, cu, m = packed(device)
    got = flash_attn_varlen_func(q, k, v, cu, cu, m, m, p=0.5, backend="reference")
    want = prope_attention_varlen(q, k, v, cu, m, p=0.5, causal=False, backend="reference")
    assert torch.equal(got, want)
    # positional flash-attn arguments, an equal (not identical) cu_seqlens_k, positions
    pos = torch.arange(q.shape[0], device=device) * 2
    got = flash_attn_varlen_func(q, k, v, cu, cu.clone(), m, m, 0.0, 0.25, True, (2, 0), 7.0,
                                 None, True, False, None, p=0.75, theta=100.0, positions=pos,
                                 backend="reference")
    want = prope_attention_varlen(q, k, v, cu, m, p=0.75, theta=100.0, causal=True,
                                  softmax_scale=0.25, window=(2, 0), softcap=7.0,
                                  deterministic=True, positions=pos, backend="reference")
    assert torch.equal(got, want)


def test_flash_attn_varlen_func_keys_of_their_own_lengths(device):
    # cu_seqlens_k != cu_seqlens_q: prope_attention_varlen with cu_seqlens_k (bottom-right masks)
    q, k, v, cu, m = packed(device)
    cu_k = torch.tensor([0, 9, 13, 20], dtype=torch.int32, device=device)
    got = flash_attn_varlen_func(q, k, v, cu, cu_k, m, 9, causal=True, p=0.5,
                                 backend="reference")
    want = prope_attention_varlen(q, k, v, cu, m, p=0.5, causal=True, cu_seqlens_k=cu_k,
                                  max_seqlen_k=9, backend="reference")
    assert torch.equal(got, want)
    assert not torch.equal(got, flash_attn_varlen_func(q, k, v, cu, cu, m, m, causal=True, p=0.5,
                                                       backend="reference"))


@pytest.mark.parametrize("change,match", [
    (dict(dropout_p=0.5), "dropout_p"),
    (dict(block_table=torch.zeros(3, 1, dtype=torch.int32)), "block_table"),
    (dict(return_attn_probs=True), "return_attn_probs"),
    (dict(alibi_slopes=torch.ones(4)), "alibi_slopes"),
    ("cu_k", "cu_seqlens_k must have as many entries"),   # keys of another num_seqs
    ("max_k", "max_seqlen_k"),                              # below the longest key sequence
])
def test_flash_attn_varlen_func_refuses(device, change, match):
    q, k, v, cu, m = packed(device)
    cu_k, m_k, kw = cu, m, {}
    if change == "cu_k":
        cu_k = torch.tensor([0, 6, 20], dtype=torch.int32, device=device)
    elif change == "max_k":
        m_k = m - 1
    else:
        kw = {n: (x.to(device) if isinstance(x, torch.Tensor) else x) for n, x in change.items()}
    with pytest.raises(ValueError, match=match):
        flash_attn_varlen_func(q, k, v, cu, cu_k, m, m_k, p=0.5, backend="reference", **kw)


# ----------------------------------------------------------------------------------------------
# nn.PRoPEAttention
# ----------------------------------------------------------------------------------------------

def test_module_config_repr_state():
    m = PRoPEAttention(p=0.25, theta=5e5, window=(7, 0), softcap=30.0, backend="reference")
    assert repr(m) == ("PRoPEAttention(p=0.25, theta=500000.0, variant='prope', layout='half', "
                       "causal=True, window=(7, 0), softcap=30.0, backend='reference')")
    assert repr(PRoPEAttention()) == ("PRoPEAttention(p=0.75, theta=10000.0, variant='prope', "
                                      "layout='half', causal=True, backend='auto')")
    assert "qkv_layout='bhsd'" in repr(PRoPEAttention(qkv_layout="bhsd"))
    assert list(m.parameters()) == [] and list(m.buffers()) == [] and m.state_dict() == {}
    assert repr(copy.deepcopy(m)) == repr(m)
    seq = torch.nn.Sequential(PRoPEAttention(p=1.0))  # a child module like any other
    assert "PRoPEAttention(p=1.0" in repr(seq) and seq.state_dict() == {}


@pytest.mark.parametrize("kw,err,match", [
    (dict(p=1.5), ValueError, "p must be"),
    (dict(theta=0.5), ValueError, "theta"),
    (dict(variant="yarn"), ValueError, "variant"),
    (dict(layout="bhsd"), ValueError, "layout"),
    (dict(causal=1), TypeError, "causal"),
    (dict(window=(-2, 0)), ValueError, "window"),
    (dict(softcap=-1.0), ValueError, "softcap"),
    (dict(softmax_scale=0.0), ValueError, "softmax_scale"),
    (dict(backend="flash"), ValueError, "backend"),
    (dict(qkv_layout="sbhd"), ValueError, "qkv_layout"),
    (dict(deterministic="yes"), TypeError, "deterministic"),
])
def test_module_bad_config(kw, err, match):
    with pytest.raises(err, match=match):
        PRoPEAttention(**kw)


OPTS = dict(p=0.5, theta=1000.0, variant="reversed", layout="interleaved", window=(3, 0),
            softcap=8.0, softmax_scale=0.2, backend="reference")


def test_module_dense_is_prope_attention(device):
    q, k, v = dense(device)
    pos = torch.arange(3, 15, device=device)
    m = PRoPEAttention(**OPTS)
    assert torch.equal(m(q, k, v), prope_attention(q, k, v, causal=True, **OPTS))
    assert torch.equal(m(q, k, v, pos), prope_attention(q, k, v, positions=pos, **OPTS))
    nc = PRoPEAttention(p=0.5, causal=False, backend="reference")
    assert torch.equal(nc(q, k, v), prope_attention(q, k, v, p=0.5, causal=False,
                                                    backend="reference"))


def test_module_bhsd_layout(device):
    q, k, v = dense(device, hq=4, hkv=4)  # MHA: the shapes alone could not tell the layouts apart
    m = PRoPEAttention(qkv_layout="bhsd", **OPTS)
    got = m(*(x.transpose(1, 2).contiguous() for x in (q, k, v)))
    want = prope_attention(q, k, v, **OPTS)
    assert got.shape == (2, 4, 12, 16)
    assert torch.equal(got, want.transpose(1, 2))
    qp, kp, vp, cu, mx = packed(device)
    with pytest.raises(ValueError, match="bhsd"):
        m(qp, kp, vp, cu_seqlens=cu, max_seqlen=mx)


def test_module_varlen_is_prope_attention_varlen(device):
    q, k, v, cu, mx = packed(device)
    m = PRoPEAttention(**OPTS)
    want = prope_attention_varlen(q, k, v, cu, mx, **OPTS)
    assert torch.equal(m(q, k, v, cu_seqlens=cu, max_seqlen=mx), want)
    assert torch.equal(m(q, k, v, cu_seqlens=cu), want)  # max_seqlen read from cu_seqlens
    pos = torch.arange(q.shape[0], device=device)
    assert torch.equal(m(q, k, v, pos, cu, mx),
                       prope_attention_varlen(q, k, v, cu, mx, positions=pos, **OPTS))
    with pytest.raises(ValueError, match="max_seqlen"):
        m(*dense(device), max_seqlen=12)


def test_module_gradients(device):
    q, k, v = dense(device, seed=5)
    m = PRoPEAttention(**OPTS)
    res = []
    for call in (m, lambda *x: prope_attention(*x, **OPTS)):
        xs = [x.clone().requires_grad_() for x in (q, k, v)]
        out = call(*xs)
        res.append(torch.autograd.grad(out.square().sum(), xs))
    for a, b in zip(*res):
        assert torch.equal(a, b)


def test_module_compile_fullgraph(device):
    """torch.compile(fullgraph=True) over a block holding the module: dense, varlen, and the
    flash-attn function; the op is one opaque node, so results equal eager."""
    torch._dynamo.reset()

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(32, 3 * 32)
            self.attn = PRoPEAttention(p=0.5, window=(5, 0), backend="reference")

        def forward(self, x, cu=None, mx=None):
            q, k, v = self.qkv(x).unflatten(-1, (3, 2, 16)).unbind(-3)
            if cu is None:
                return self.attn(q, k, v)
            return self.attn(q, k, v, cu_seqlens=cu, max_seqlen=mx)

    torch.manual_seed(0)
    block = Block().to(device)
    compiled = torch.compile(block, fullgraph=True, backend=COMPILE_BACKEND)
    x = torch.randn(2, 12, 32, device=device)
    torch.testing.assert_close(compiled(x), block(x), rtol=0, atol=0)
    xp = torch.randn(20, 32, device=device)
    cu = torch.tensor([0, 5, 16, 20], dtype=torch.int32, device=device)
    torch.testing.assert_close(compiled(xp, cu, 11), block(xp, cu, 11), rtol=0, atol=0)
    # backward through the compiled graph
    xg = x.clone().requires_grad_()
    g_c, = torch.autograd.grad(compiled(xg).sum(), xg)
    g_e, = torch.autograd.grad(block(xg).sum(), xg)
    torch.testing.assert_close(g_c, g_e)

    def fa(q, k, v):
        return flash_attn_func(q, k, v, causal=True, p=0.75, backend="reference")
    q, k, v = dense(device)
    torch.testing.assert_close(torch.compile(fa, fullgraph=True, backend=COMPILE_BACKEND)(q, k, v),
                               fa(q, k, v), rtol=0, atol=0)
    torch._dynamo.reset()
