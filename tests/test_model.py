"""Gemma model: parity with an independent implementation (transformers), across attention
backends, and the position-encoding switch."""

import pytest
import torch

from prope_kernels.models import Gemma, PRESETS, preset
from prope_kernels.models.gemma import chunked_cross_entropy


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return Gemma(preset("gemma-tiny", **kw)).eval()


def test_transformers_gemma_parity():
    transformers = pytest.importorskip("transformers")
    model = _model(pe="rope", attn="reference")
    c = model.cfg
    hf_cfg = transformers.GemmaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden, intermediate_size=c.mlp,
        num_hidden_layers=c.layers, num_attention_heads=c.heads, num_key_value_heads=c.kv_heads,
        head_dim=c.head_dim, rms_norm_eps=c.rms_eps, hidden_activation="gelu_pytorch_tanh",
        rope_theta=c.theta, tie_word_embeddings=True, attention_bias=False)
    hf_cfg.rope_parameters = {"rope_type": "default", "rope_theta": c.theta}
    hf_cfg._attn_implementation = "eager"
    hf = transformers.GemmaForCausalLM(hf_cfg).eval()
    # our random weights (RMSNorm weights too, so the (1 + w) convention is exercised)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(0, 0.1)
    state = {"model." + k: v for k, v in model.state_dict().items()}
    state["lm_head.weight"] = model.embed_tokens.weight
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    tokens = torch.randint(0, c.vocab_size, (2, 23))
    with torch.no_grad():
        ours = model(tokens)
        theirs = hf(tokens).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("pe,p", [("nope", 0.0), ("rope", 1.0), ("prope", 0.25)])
def test_backends_agree(pe, p):
    tokens = torch.randint(0, 512, (2, 32))
    cu = torch.tensor([0, 7, 32, 40, 41, 64], dtype=torch.int32)
    outs = {}
    for attn in ("reference", "unfused"):
        m = _model(pe=pe, p=p, attn=attn, variant="partial" if pe == "prope" else "prope")
        with torch.no_grad():
            outs[attn] = (m(tokens), m(tokens, cu, 25))
    torch.testing.assert_close(outs["reference"], outs["unfused"], rtol=2e-4, atol=2e-4)


def test_documents_are_isolated():
    # a packed row gives each document the logits it gets alone (positions restart)
    m = _model(attn="reference")
    a, b = torch.randint(0, 512, (1, 9)), torch.randint(0, 512, (1, 15))
    row = torch.cat([a, b], 1)
    cu = torch.tensor([0, 9, 24], dtype=torch.int32)
    with torch.no_grad():
        packed = m(row, cu, 15)
        torch.testing.assert_close(packed[:, :9], m(a), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(packed[:, 9:], m(b), rtol=1e-5, atol=1e-5)


def test_p_zero_matches_nope_and_p_changes_logits():
    tokens = torch.randint(0, 512, (1, 20))
    with torch.no_grad():
        nope = _model(pe="nope")(tokens)
        p0 = _model(pe="prope", p=0.0)(tokens)
        p75 = _model(pe="prope", p=0.75)(tokens)
    torch.testing.assert_close(nope, p0)
    assert (nope - p75).abs().max() > 1e-5  # small init: nearly uniform attention


def test_presets_have_published_shapes():
    g2, g7 = PRESETS["gemma-2b"], PRESETS["gemma-7b"]
    assert (g2.layers, g2.hidden, g2.heads, g2.kv_heads, g2.head_dim, g2.mlp, g2.vocab_size) == \
        (18, 2048, 8, 1, 256, 16384, 256000)
    assert (g7.layers, g7.hidden, g7.heads, g7.kv_heads, g7.head_dim, g7.mlp) == \
        (28, 3072, 16, 16, 256, 24576)
    assert 2.4e9 < g2.num_params() < 2.6e9 and 8.4e9 < g7.num_params() < 8.6e9
    with pytest.raises(ValueError, match="unknown preset"):
        preset("gemma-3b")


def test_chunked_cross_entropy_matches_full():
    torch.manual_seed(1)
    h = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    t = torch.randint(0, 50, (37,))
    t[::5] = -100
    got = chunked_cross_entropy(h, w, t, chunk=8)
    want = torch.nn.functional.cross_entropy(h @ w.t(), t, ignore_index=-100)
    torch.testing.assert_close(got, want)
    g1 = torch.autograd.grad(got, (h, w))
    g2 = torch.autograd.grad(want, (h, w))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)
