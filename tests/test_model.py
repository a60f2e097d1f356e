"""Gemma model: parity with an independent implementation (transformers), across attention
backends, and the position-encoding switch."""

import pytest
import torch

from prope_kernels.models import PRESETS, Gemma, GemmaConfig, preset
from prope_kernels.models.gemma import chunked_cross_entropy


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return Gemma(preset("gemma-tiny", **kw)).eval()


def _hf_model(transformers, c):
    """transformers' model of the same family and shape as our config ``c``."""
    common = dict(vocab_size=c.vocab_size, hidden_size=c.hidden, intermediate_size=c.mlp,
                  num_hidden_layers=c.layers, num_attention_heads=c.heads,
                  rms_norm_eps=c.rms_eps, hidden_activation="gelu_pytorch_tanh",
                  tie_word_embeddings=True, attention_bias=False)
    g, l = c.global_attn, c.local_attn
    if not c.sandwich_norm:  # Gemma 1
        cfg = transformers.GemmaConfig(num_key_value_heads=g.kv_heads, head_dim=g.head_dim,
                                       **common)
        cfg.rope_parameters = {"rope_type": "default", "rope_theta": g.theta}
        cls = transformers.GemmaForCausalLM
    elif not c.qk_norm:  # Gemma 2: one RoPE, one softcap for both kinds of layer
        cfg = transformers.Gemma2Config(
            num_key_value_heads=g.kv_heads, head_dim=g.head_dim, layer_types=c.layer_types(),
            sliding_window=l.window, query_pre_attn_scalar=c.query_pre_attn_scalar,
            attn_logit_softcapping=g.softcap or None,
            final_logit_softcapping=c.final_softcap or None, **common)
        cfg.rope_parameters = {"rope_type": "default", "rope_theta": g.theta}
        cls = transformers.Gemma2ForCausalLM
    elif not c.v_norm:  # Gemma 3
        cfg = transformers.Gemma3TextConfig(
            num_key_value_heads=g.kv_heads, head_dim=g.head_dim, layer_types=c.layer_types(),
            sliding_window=l.window, query_pre_attn_scalar=c.query_pre_attn_scalar,
            rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": g.theta},
                             "sliding_attention": {"rope_type": "default",
                                                   "rope_theta": l.theta}},
            final_logit_softcapping=c.final_softcap or None, **common)
        cls = transformers.Gemma3ForCausalLM
    else:  # Gemma 4 (text): global layers with their own head_dim, kv heads and p-RoPE
        cfg = transformers.Gemma4TextConfig(
            num_key_value_heads=l.kv_heads, head_dim=l.head_dim, global_head_dim=g.head_dim,
            num_global_key_value_heads=g.kv_heads, attention_k_eq_v=g.k_eq_v,
            layer_types=c.layer_types(), sliding_window=l.window,
            hidden_size_per_layer_input=0, num_kv_shared_layers=0,
            rope_parameters={"full_attention": {"rope_type": "proportional", "rope_theta": g.theta,
                                                "partial_rotary_factor": g.p},
                             "sliding_attention": {"rope_type": "default",
                                                   "rope_theta": l.theta}},
            final_logit_softcapping=c.final_softcap or None, **common)
        cls = transformers.Gemma4ForCausalLM
    cfg._attn_implementation = "eager"
    return cls(cfg).eval()


PARITY = {
    "gemma": dict(name="gemma-tiny", p=1.0),
    "gemma2": dict(name="gemma2-tiny"),
    "gemma3": dict(name="gemma3-tiny"),
    "gemma4": dict(name="gemma4-tiny"),
    # keys = values and fewer kv heads on the global layers (Gemma 4's larger models)
    "gemma4-k_eq_v": dict(name="gemma4-tiny", global_attn=dict(
        head_dim=64, kv_heads=1, p=0.25, theta=1e6, k_eq_v=True), heads=4,
        local_attn=dict(head_dim=32, kv_heads=2, p=1.0, theta=1e4, window=16)),
}


@pytest.mark.parametrize("family,attn", [
    (f, a) for f in PARITY for a in ("reference", "unfused")
    if not (a == "unfused" and f == "gemma2")])  # the unfused SDPA baseline has no softcap
def test_transformers_parity(family, attn):
    # logits within 1e-4 in fp32 with the same random weights loaded into both; 40 tokens,
    # longer than the tiny presets' window of 16, so local layers do slide
    transformers = pytest.importorskip("transformers")
    kw = dict(PARITY[family])
    torch.manual_seed(0)
    c = preset(kw.pop("name"), attn=attn, **kw)
    model = Gemma(c).eval()
    hf = _hf_model(transformers, c)
    # our random weights (RMSNorm weights too, so the (1 + w) / w conventions are exercised)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(0, 0.1) if c.norm_unit_offset else p.normal_(1, 0.1)
    state = {"model." + k: v for k, v in model.state_dict().items()}
    state["lm_head.weight"] = model.embed_tokens.weight
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert all("rotary" in m or "layer_scalar" in m for m in missing), missing
    tokens = torch.randint(0, c.vocab_size, (2, 40))
    with torch.no_grad():
        ours = model(tokens)
        theirs = hf(tokens).logits
    assert ours.abs().max() > 0.1  # not a degenerate comparison
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,kw", [
    ("gemma-tiny", dict(p=0.0)), ("gemma-tiny", dict(p=1.0)),
    ("gemma-tiny", dict(p=0.25, variant="partial")),
    ("gemma3-tiny", {}), ("gemma4-tiny", {}),  # sliding windows, two bases, head_dim 64 global
])
def test_backends_agree(name, kw):
    # the fused op's reference path and the unfused baseline (RoPE, then SDPA with a mask),
    # on whole rows and on packed documents (varlen), windows shorter than the documents
    tokens = torch.randint(0, 512, (2, 32))
    cu = torch.tensor([0, 7, 32, 40, 41, 64], dtype=torch.int32)
    outs = {}
    for attn in ("reference", "unfused"):
        torch.manual_seed(0)
        m = Gemma(preset(name, attn=attn, **kw)).eval()
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


def test_p_zero_is_nope_and_p_changes_logits():
    # one knob: p = 0 is NoPE (no variant rotates anything), p > 0 changes the logits
    tokens = torch.randint(0, 512, (1, 20))
    with torch.no_grad():
        p0 = _model(p=0.0)(tokens)
        p0_rev = _model(p=0.0, variant="reversed")(tokens)
        p75 = _model(p=0.75)(tokens)
    torch.testing.assert_close(p0, p0_rev)
    assert (p0 - p75).abs().max() > 1e-5  # small init: nearly uniform attention


def test_presets_have_published_shapes():
    def shape(c, a):
        return (c.layers, c.hidden, c.heads, a.kv_heads, a.head_dim, c.mlp, c.vocab_size)

    g2, g7 = PRESETS["gemma-2b"], PRESETS["gemma-7b"]
    assert shape(g2, g2.global_attn) == (18, 2048, 8, 1, 256, 16384, 256000)
    assert shape(g7, g7.global_attn) == (28, 3072, 16, 16, 256, 24576, 256000)
    assert 2.4e9 < g2.num_params() < 2.6e9 and 8.4e9 < g7.num_params() < 8.6e9
    # Gemma 2 2B: alternating from a local layer 0, window 4096, softcaps 50 / 30
    c = PRESETS["gemma2-2b"]
    assert shape(c, c.global_attn) == (26, 2304, 8, 4, 256, 9216, 256000)
    assert c.layer_types()[:2] == ["sliding_attention", "full_attention"]
    assert (c.local_attn.window, c.global_attn.window) == (4096, 0)
    assert c.global_attn.softcap == c.local_attn.softcap == 50.0 and c.final_softcap == 30.0
    assert c.query_pre_attn_scalar == 256 and c.sandwich_norm and not c.qk_norm
    assert 2.5e9 < c.num_params() < 2.7e9
    # Gemma 3 1B: 5 local : 1 global, window 512, theta 1e4 local / 1e6 global, qk-norm
    c = PRESETS["gemma3-1b"]
    assert shape(c, c.global_attn) == (26, 1152, 4, 1, 256, 6912, 262144)
    assert c.layer_types()[:6] == ["sliding_attention"] * 5 + ["full_attention"]
    assert (c.local_attn.window, c.local_attn.theta, c.global_attn.theta) == (512, 1e4, 1e6)
    assert c.qk_norm and c.global_attn.p == c.local_attn.p == 1.0
    assert 0.95e9 < c.num_params() < 1.05e9
    # Gemma-4-style: global layers head_dim 512, 0.25-RoPE, theta 1e6; local RoPE layers
    c = PRESETS["gemma4-style"]
    g, l = c.global_attn, c.local_attn
    assert (g.head_dim, g.p, g.theta, l.head_dim, l.p, l.theta) == (512, 0.25, 1e6, 256, 1.0, 1e4)
    assert c.qk_norm and c.v_norm and not c.norm_unit_offset and c.query_pre_attn_scalar == 1.0
    with pytest.raises(ValueError, match="unknown preset"):
        preset("gemma-3b")


@pytest.mark.parametrize("name", [n for n in PRESETS if n.endswith("tiny")])
def test_tiny_presets_take_a_step(name):
    # every family builds, trains one AdamW step on packed rows, and its loss goes down
    torch.manual_seed(0)
    m = Gemma(preset(name, attn="reference"))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    tokens = torch.randint(0, 512, (2, 24))
    targets = tokens.roll(-1, 1)
    cu = torch.tensor([0, 10, 24, 48], dtype=torch.int32)
    losses = []
    for _ in range(2):
        loss = m(tokens, cu, 24, targets=targets)
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[1] < losses[0], losses


def test_config_overrides_and_errors():
    c = preset("gemma4-tiny", p=0.5, local_p=0.75, window=8, local_theta=500.0)
    assert (c.global_attn.p, c.local_attn.p, c.local_attn.window, c.local_attn.theta) == \
        (0.5, 0.75, 8, 500.0)
    assert PRESETS["gemma4-tiny"].global_attn.p == 0.25  # presets are not mutated
    assert GemmaConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="no local_attn"):
        preset("gemma-tiny", window=8)
    with pytest.raises(ValueError, match=r"global_attn.p must be in \[0, 1\]"):
        preset("gemma-tiny", p=1.5)
    with pytest.raises(ValueError, match="multiple of global_attn.kv_heads"):
        preset("gemma-tiny", kv_heads=3)
    with pytest.raises(ValueError, match="layer_pattern"):
        preset("gemma-tiny", layer_pattern="LX")
    with pytest.raises(ValueError, match="unknown model field"):
        preset("gemma-tiny", pe="rope")
    with pytest.raises(ValueError, match="softcap"):
        Gemma(preset("gemma2-tiny", attn="unfused"))(torch.zeros(1, 4, dtype=torch.long))


@pytest.mark.parametrize("softcap", [0.0, 3.0])
def test_chunked_cross_entropy_matches_full(softcap):
    torch.manual_seed(1)
    h = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    t = torch.randint(0, 50, (37,))
    t[::5] = -100
    got = chunked_cross_entropy(h, w, t, chunk=8, softcap=softcap)
    logits = h @ w.t()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    want = torch.nn.functional.cross_entropy(logits, t, ignore_index=-100)
    torch.testing.assert_close(got, want)
    g1 = torch.autograd.grad(got, (h, w))
    g2 = torch.autograd.grad(want, (h, w))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)
