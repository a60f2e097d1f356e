"""prope_kernels.integrations.hf: transformers models patched to the fused op.

Each family is a tiny random model (2-3 layers, head_dim 16); the patched model is compared with
an unpatched copy holding the same weights: logits and the gradients of every parameter, with
and without padding, with packed position_ids; the fused op is counted so a silent fallback
cannot pass. Fallbacks warn once and give the original answer.
"""

import copy
import math
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from prope_kernels.integrations import hf  # noqa: E402
from prope_kernels.integrations.hf import (PRoPEFallbackWarning, apply_prope_attention,  # noqa
                                           prope_layer_settings, remove_prope_attention)
from tolerance import check  # noqa: E402

VOCAB = 97
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
              attention_dropout=0.0, pad_token_id=0,
              initializer_range=0.2)  # large enough that attention is far from uniform
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(num_hidden_layers=2)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(num_hidden_layers=2)),
    # Gemma 2 without its sliding window / soft-capping (those are in FEATURE_FAMILIES)
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(num_hidden_layers=2, layer_types=["full_attention"] * 2,
                    attn_logit_softcapping=None, final_logit_softcapping=30.0,
                    query_pre_attn_scalar=24)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(num_hidden_layers=2, layer_types=["full_attention"] * 2,
                    query_pre_attn_scalar=24)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_hidden_layers=2)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(num_hidden_layers=2)),
    # Gemma 4: proportional 0.25-RoPE (theta 1e6) on full layers with head_dim 32, k_eq_v,
    # and a KV-shared last layer; plain RoPE on the sliding layer
    "gemma4": ("Gemma4TextConfig", "Gemma4ForCausalLM",
               dict(num_hidden_layers=3, global_head_dim=32, attention_k_eq_v=True,
                    num_global_key_value_heads=1, num_kv_shared_layers=1,
                    layer_types=["full_attention", "sliding_attention", "full_attention"],
                    sliding_window=8, hidden_size_per_layer_input=8,
                    vocab_size_per_layer_input=VOCAB)),
}
MOE = dict(num_local_experts=4, num_experts_per_tok=2)
QWEN_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24)
TYPES = dict(layer_types=["sliding_attention", "full_attention"], sliding_window=5)
# families whose attention is Llama's shape, or one of the variations hf.ATTENTION_SHAPES knows:
# a sliding window read from the config (Mistral), a fused qkv_proj and a partial rotary
# (Phi-3), interleaved pairs (GLM, Helium, ERNIE 4.5), q/k norms over all heads (OLMo 2/3),
# layers without rotation (SmolLM3, EXAONE 4), a residual dropout after o_proj (Starcoder2)
LLAMA_SHAPED = {
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_hidden_layers=2, sliding_window=5)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(num_hidden_layers=2, sliding_window=6, **MOE)),
    "ministral": ("MinistralConfig", "MinistralForCausalLM", dict(num_hidden_layers=2, **TYPES)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(num_hidden_layers=2)),
    # a quarter of head_dim 16 rotates (frequencies over those dims): variant "partial"
    "phi3-partial": ("Phi3Config", "Phi3ForCausalLM",
                     dict(num_hidden_layers=2, partial_rotary_factor=0.5, sliding_window=6)),
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM", dict(num_hidden_layers=2, sliding_window=6,
                                                         **MOE)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(num_hidden_layers=2, shared_expert_intermediate_size=24,
                       use_sliding_window=True, sliding_window=5, max_window_layers=2,
                       **QWEN_MOE)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(num_hidden_layers=2, use_sliding_window=True, sliding_window=5,
                       **QWEN_MOE)),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM",
                   dict(num_hidden_layers=2, sliding_window=6)),
    "seed_oss": ("SeedOssConfig", "SeedOssForCausalLM", dict(num_hidden_layers=2)),
    "arcee": ("ArceeConfig", "ArceeForCausalLM", dict(num_hidden_layers=2)),
    "granite": ("GraniteConfig", "GraniteForCausalLM",
                dict(num_hidden_layers=2, attention_multiplier=0.3)),
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM",
                   dict(num_hidden_layers=2, attention_multiplier=0.3, **MOE)),
    "cwm": ("CwmConfig", "CwmForCausalLM",  # its default rope is llama3-scaled (falls back)
            dict(num_hidden_layers=2, rope_parameters={"rope_type": "default",
                                                       "rope_theta": 1e6}, **TYPES)),
    "dots1": ("Dots1Config", "Dots1ForCausalLM",
              dict(num_hidden_layers=2, first_k_dense_replace=2, **TYPES)),
    "olmo": ("OlmoConfig", "OlmoForCausalLM", dict(num_hidden_layers=2)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(num_hidden_layers=2)),
    "olmo3": ("Olmo3Config", "Olmo3ForCausalLM", dict(num_hidden_layers=2, **TYPES)),
    "helium": ("HeliumConfig", "HeliumForCausalLM", dict(num_hidden_layers=2, head_dim=8)),
    "ernie4_5": ("Ernie4_5Config", "Ernie4_5ForCausalLM", dict(num_hidden_layers=2)),
    "glm": ("GlmConfig", "GlmForCausalLM", dict(num_hidden_layers=2)),
    "glm4": ("Glm4Config", "Glm4ForCausalLM", dict(num_hidden_layers=2)),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM",
                dict(num_hidden_layers=4, no_rope_layer_interval=2)),
    "exaone4": ("Exaone4Config", "Exaone4ForCausalLM", dict(num_hidden_layers=2, **TYPES)),
}
FAMILIES.update(LLAMA_SHAPED)
# sliding-window and soft-capped layers: fused when the op has window=/softcap=, else they fall
# back (with a warning); either way the answer must be the original one
FEATURE_FAMILIES = {
    "gemma2-sliding-softcap": ("Gemma2Config", "Gemma2ForCausalLM",
                               dict(num_hidden_layers=2, sliding_window=5,
                                    attn_logit_softcapping=20.0, query_pre_attn_scalar=16)),
    "gemma3-sliding": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                       dict(num_hidden_layers=2, sliding_window=5,
                            layer_types=["sliding_attention", "full_attention"])),
}
ALL = {**FAMILIES, **FEATURE_FAMILIES}


def build(family, dtype=torch.float32, device="cpu", seed=0, attn=None, **over):
    cfg_name, cls_name, extra = ALL[family]
    kw = {**COMMON, **extra, **over}
    if family.startswith("gemma4"):
        kw.pop("head_dim")
        kw["head_dim"] = 16
    cfg = getattr(transformers, cfg_name)(**kw)
    if attn is None and getattr(cfg, "attn_logit_softcapping", None):
        # the original answer needs the eager attention: transformers' sdpa path drops the logit
        # softcap (5.24 marks Gemma 2 sdpa-unsupported; 5.17 picks sdpa and ignores the softcap)
        attn = "eager"
    if attn is not None:  # default: sdpa where the family has it
        cfg._attn_implementation = attn
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(cfg)
    with torch.no_grad():  # random norm weights, so (1 + w) and q/k/v norms are exercised
        for n, prm in model.named_parameters():
            if prm.dim() == 1:
                prm.normal_(0, 0.2)
    return model.to(device=device, dtype=dtype).eval()


def pair(family, backend="reference", dtype=torch.float32, device="cpu", **kw):
    """(patched, unpatched) with the same weights."""
    base = build(family, dtype, device, **kw)
    patched = apply_prope_attention(copy.deepcopy(base), backend=backend, verbose=False)
    return patched, base


class OpCounter:
    def __init__(self, monkeypatch):
        self.n = 0
        for name in ("prope_attention", "prope_attention_varlen"):
            fn = getattr(hf, name)

            def counted(*a, _fn=fn, **k):
                self.n += 1
                return _fn(*a, **k)
            monkeypatch.setattr(hf, name, counted)


def fused_layers(model):
    return sum(s.reason is None for s in prope_layer_settings(model))


def expected_fused(model):
    """Layers that must be fused: all but sliding/soft-capped ones while the op lacks them."""
    return sum((s.window is None or hf._HAS_WINDOW) and (s.softcap is None or hf._HAS_SOFTCAP)
               for s in prope_layer_settings(model))


def make_inputs(case, device, b=2, s=13, seed=1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (b, s), generator=gen)
    kw, keep = {}, torch.ones(b, s, dtype=torch.bool)
    if case == "padding":  # left padding in row 0, right padding in row 1
        keep[0, :4] = False
        keep[1, 9:] = False
        kw["attention_mask"] = keep.long()
    elif case == "packed":  # one row, three documents, positions restart
        ids = ids[:1]
        keep = keep[:1]
        kw["position_ids"] = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 4]])
        kw["use_cache"] = False
    # no loss on padding, nor on a token predicted from a padded position (a left-padded row's
    # first token): outputs at padded positions are meaningless in both models
    predicted_from_pad = torch.zeros_like(keep)
    predicted_from_pad[:, 1:] = ~keep[:, :-1]
    labels = ids.masked_fill(~keep | predicted_from_pad, -100)
    kw = {k: v.to(device) for k, v in kw.items() if isinstance(v, torch.Tensor)} | \
        {k: v for k, v in kw.items() if not isinstance(v, torch.Tensor)}
    return ids.to(device), labels.to(device), keep.to(device), kw


def run(model, ids, labels, kw, grads=True):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=labels, **kw)
    if not grads:
        return out.logits.detach(), {}
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()
                                 if p.grad is not None}


# ----------------------------------------------------------------------------------------------
# parity: reference backend, fp32
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["plain", "padding", "packed"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_parity_reference_fp32(family, case, device, monkeypatch):
    patched, base = pair(family, device=device)
    assert fused_layers(patched) == expected_fused(patched) > 0, prope_layer_settings(patched)
    ids, labels, keep, kw = make_inputs(case, device)
    calls = OpCounter(monkeypatch)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always", PRoPEFallbackWarning)
        got_logits, got_grads = run(patched, ids, labels, kw)
    for r in rec:  # only the static fallbacks of layers with a window the op lacks
        assert not issubclass(r.category, PRoPEFallbackWarning) or "sliding" in str(r.message)
    assert calls.n == fused_layers(patched)  # every other layer ran the fused op
    want_logits, want_grads = run(base, ids, labels, kw)
    torch.testing.assert_close(got_logits[keep], want_logits[keep], rtol=1e-5, atol=1e-5)
    assert got_grads.keys() == want_grads.keys()
    for n in want_grads:
        torch.testing.assert_close(got_grads[n], want_grads[n], rtol=1e-5, atol=1e-5, msg=n)


def test_gemma4_per_layer_settings():
    patched, _ = pair("gemma4")
    s = prope_layer_settings(patched)
    assert [x.layer_type for x in s] == ["full_attention", "sliding_attention", "full_attention"]
    full, sliding = s[0], s[1]
    # proportional rope, partial_rotary_factor 0.25 of head_dim 32: 4 of 16 pairs rotate
    assert (full.p, full.theta, full.head_dim, full.variant) == (0.25, 1e6, 32, "prope")
    assert (sliding.p, sliding.theta, sliding.head_dim) == (1.0, 1e4, 16)
    assert full.softmax_scale == 1.0
    assert sliding.window == (7, 0)  # query i sees keys i-7..i (transformers' sliding_window=8)


def test_llama_shaped_settings():
    """What each variation of the Llama shape reads from the model (rotation, window, scale)."""
    def settings(family):
        return [(x.p, x.variant, x.layout, x.window, x.reason)
                for x in prope_layer_settings(pair(family)[0])]
    # Mistral's sliding_window is in the config, not on the layer: every layer, i - j < 5
    assert settings("mistral") == [(1.0, "prope", "half", (4, 0), None)] * 2
    assert settings("phi3") == [(1.0, "prope", "half", None, None)] * 2
    # Phi-3, partial_rotary_factor 0.5: the first 8 of 16 dims rotate, frequencies over those 8
    assert settings("phi3-partial") == [(0.5, "partial", "half", (5, 0), None)] * 2
    # GLM: the first half of the head, interleaved pairs
    assert settings("glm") == [(0.5, "partial", "interleaved", None, None)] * 2
    assert settings("helium") == [(1.0, "prope", "interleaved", None, None)] * 2
    # SmolLM3 without rotation on every 2nd layer; EXAONE 4: the full-attention layer has none
    assert [x[0] for x in settings("smollm3")] == [1.0, 0.0, 1.0, 0.0]
    assert settings("exaone4") == [(1.0, "prope", "half", (4, 0), None),
                                   (0.0, "prope", "half", None, None)]
    assert [x.softmax_scale for x in prope_layer_settings(pair("granite")[0])] == [0.3, 0.3]


def test_every_supported_class_is_checked():
    """Each attention class the patch accepts is in a family the parity tests run."""
    covered = set()
    for family in FAMILIES:
        covered |= {type(m).__name__ for m in build(family).modules()}
    assert set(hf.SUPPORTED_ATTENTION_CLASSES) <= covered, \
        set(hf.SUPPORTED_ATTENTION_CLASSES) - covered


# ----------------------------------------------------------------------------------------------
# parity: Triton kernels (interpreter on the CPU), fp16/bf16, tolerance from the model's own error
# ----------------------------------------------------------------------------------------------

def _truth_and_lowp(family, device, dtype, case):
    # truth: the unpatched model in fp32 on the CPU (its error, ~1e-6, is far below the
    # fp16/bf16 errors compared here; fp64 is not used: Gemma 2's eager mask turns NaN in fp64)
    base = build(family, torch.float32, "cpu")
    low = build(family, dtype, device)
    ids, labels, keep, kw = make_inputs(case, device)
    cpu_kw = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    truth = run(base, ids.cpu(), labels.cpu(), cpu_kw)
    lowp = run(low, ids, labels, kw)
    return low, truth, lowp, (ids, labels, keep, kw)


@pytest.mark.parametrize("family,dtype,case", [
    ("llama", torch.bfloat16, "plain"), ("llama", torch.float16, "padding"),
    ("gemma", torch.bfloat16, "packed"), ("gemma2", torch.bfloat16, "padding"),
    ("gemma3", torch.float16, "plain"), ("qwen2", torch.bfloat16, "packed"),
    ("mistral", torch.bfloat16, "padding"), ("phi3-partial", torch.bfloat16, "packed"),
    ("glm", torch.float16, "plain"),
    ("qwen3", torch.bfloat16, "padding"), ("gemma4", torch.bfloat16, "plain"),
    ("gemma2-sliding-softcap", torch.bfloat16, "padding"),
    ("gemma3-sliding", torch.float16, "packed")])
def test_parity_triton_lowp(family, dtype, case, device, monkeypatch):
    low, truth, lowp, (ids, labels, keep, kw) = _truth_and_lowp(family, device, dtype, case)
    patched = apply_prope_attention(copy.deepcopy(low), backend="triton", verbose=False)
    calls = OpCounter(monkeypatch)
    got = run(patched, ids, labels, kw)
    assert calls.n == fused_layers(patched) > 0
    k = keep.cpu()
    check("logits", got[0].cpu()[k], truth[0][k], lowp[0].cpu()[k])
    for n in truth[1]:
        check(f"grad {n}", got[1][n].cpu(), truth[1][n], lowp[1][n].cpu())


# ----------------------------------------------------------------------------------------------
# features (sliding window, soft-capping) and fallbacks
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", list(FEATURE_FAMILIES))
def test_feature_layers_match(family, device, monkeypatch):
    patched, base = pair(family, device=device)
    ids, labels, keep, kw = make_inputs("padding", device, s=17)  # longer than the window
    calls = OpCounter(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PRoPEFallbackWarning)
        got = run(patched, ids, labels, kw)
    assert calls.n == fused_layers(patched) == expected_fused(patched)
    want = run(base, ids, labels, kw)
    torch.testing.assert_close(got[0][keep], want[0][keep], rtol=1e-5, atol=1e-5)
    for n in want[1]:
        torch.testing.assert_close(got[1][n], want[1][n], rtol=1e-5, atol=1e-5, msg=n)
    for s in prope_layer_settings(patched):
        if s.window is not None and not hf._HAS_WINDOW or \
                s.softcap is not None and not hf._HAS_SOFTCAP:
            assert s.reason is not None
        else:
            assert s.reason is None, s


def test_window_with_padding_holes_falls_back(device, monkeypatch):
    """A window counts the padded slots inside a row; the varlen op would not: fall back."""
    patched, base = pair("gemma3-sliding", device=device)
    ids, labels, keep, kw = make_inputs("padding", device, s=17)
    kw["attention_mask"][0, 8:10] = 0  # a hole inside row 0
    keep = kw["attention_mask"].bool()
    calls = OpCounter(monkeypatch)
    with pytest.warns(PRoPEFallbackWarning, match="padding inside a row"):
        got = patched(ids, **kw).logits
    assert calls.n == 1  # the full-attention layer stays fused
    torch.testing.assert_close(got[keep], base(ids, **kw).logits[keep], rtol=1e-5, atol=1e-5)


PHI3_LONGROPE = dict(head_dim=8, rope_parameters={
    "rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0, 1.5, 2.0, 3.0],
    "long_factor": [2.0] * 4, "original_max_position_embeddings": 64})


@pytest.mark.parametrize("family,over,match", [
    ("olmo", dict(clip_qkv=0.5), "clip_qkv"),
    ("phi3", PHI3_LONGROPE, "longrope"),
    ("mistral", {}, "padding inside a row"),
])
def test_llama_shaped_fallback_warns_once_and_matches(family, over, match, device, monkeypatch):
    patched, base = pair(family, device=device, **over)
    ids, labels, keep, kw = make_inputs("padding", device)
    if match.startswith("padding"):
        kw["attention_mask"][0, 7:9] = 0  # a hole inside row 0, with a sliding window
        keep = kw["attention_mask"].bool()
    calls = OpCounter(monkeypatch)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always", PRoPEFallbackWarning)
        got = run(patched, ids, labels, kw)
        run(patched, ids, labels, kw)
    fallbacks = [str(r.message) for r in rec if issubclass(r.category, PRoPEFallbackWarning)]
    assert len(fallbacks) == 1 and match in fallbacks[0], fallbacks
    assert calls.n == 0
    want = run(base, ids, labels, kw)
    torch.testing.assert_close(got[0][keep], want[0][keep], rtol=1e-5, atol=1e-5)
    for n in want[1]:
        torch.testing.assert_close(got[1][n], want[1][n], rtol=1e-5, atol=1e-5, msg=n)


def test_residual_dropout_in_training(device, monkeypatch):
    """Starcoder2's dropout after o_proj runs in the fused layer too: same masks, same seed."""
    patched, base = pair("starcoder2", device=device, residual_dropout=0.3)
    ids, labels, keep, kw = make_inputs("padding", device)
    results = []
    for model in (patched, base):
        model.train()
        calls = OpCounter(monkeypatch)
        torch.manual_seed(7)
        results.append(run(model, ids, labels, kw))
        assert calls.n == (2 if model is patched else 0)
    (got, got_g), (want, want_g) = results
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-5, atol=1e-5)
    for n in want_g:
        torch.testing.assert_close(got_g[n], want_g[n], rtol=1e-5, atol=1e-5, msg=n)
    base.eval()
    assert (base(ids, **kw).logits[keep] - want[keep]).abs().max() > 1e-3  # dropout was on


def test_fallback_4d_mask_warns_once_and_matches(device):
    patched, base = pair("llama", device=device)
    ids, labels, keep, _ = make_inputs("plain", device)
    s = ids.shape[1]
    mask = torch.tril(torch.ones(s, s, dtype=torch.bool, device=device))
    mask[5:, 2] = False  # not expressible as padding or packing
    mask = mask[None, None].expand(ids.shape[0], 1, s, s)
    with pytest.warns(PRoPEFallbackWarning, match="4-D") as rec:
        got = patched(ids, attention_mask=mask).logits
        patched(ids, attention_mask=mask)
    assert sum(issubclass(r.category, PRoPEFallbackWarning) for r in rec) == 1
    want = base(ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def returned_cache(out):
    """The KV cache a forward returned: ``out.cache`` in recent transformers, ``past_key_values``
    in earlier 5.x releases (5.17 on the GPU machine)."""
    return out.cache if hasattr(out, "cache") else out.past_key_values


class KVCacheCounter:
    """Counts the calls of prope_attention_with_kvcache from the patched layers."""

    def __init__(self, monkeypatch):
        self.n = 0
        fn = hf.prope_attention_with_kvcache

        def counted(*a, **k):
            self.n += 1
            return fn(*a, **k)
        monkeypatch.setattr(hf, "prope_attention_with_kvcache", counted)


@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma2-sliding-softcap", "qwen2",
                                    "qwen3", "mistral", "phi3-partial", "glm"])
def test_generate_runs_fused_every_step(family, device, monkeypatch):
    """greedy fp32 generate(): the prompt runs the fused op and fills the cache with rotated
    keys; every later step runs prope_attention_with_kvcache in every layer (no fallback), and
    the tokens are the unpatched model's. Prompt 9 > the sliding windows (5, 6): the windowed
    layers' caches are cropped by transformers while decoding."""
    patched, base = pair(family, device=device)
    ids = make_inputs("plain", device, b=2, s=9)[0]
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    spy = KVCacheCounter(monkeypatch)
    counter = OpCounter(monkeypatch)
    kw.update(output_logits=True, return_dict_in_generate=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PRoPEFallbackWarning)
        res = patched.generate(ids, **kw)
    ref_res = base.generate(ids, **kw)
    got = res.sequences
    assert torch.equal(got, ref_res.sequences)
    # the logits of every step too (tokens alone can hide a wrong step)
    for a, b in zip(res.logits, ref_res.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    layers = len(prope_layer_settings(patched))
    assert fused_layers(patched) == layers
    steps = got.shape[1] - ids.shape[1] - 1          # forwards after the prompt's
    assert steps == 5 and spy.n == steps * layers, (spy.n, steps, layers)
    assert counter.n == layers                        # the prompt: the dense op, once a layer


@pytest.mark.parametrize("family", ["llama", "gemma2-sliding-softcap", "qwen2", "mistral"])
def test_generate_left_padded_batch_runs_fused(family, device, monkeypatch):
    """A left-padded batch (generate()'s padding side for decoder models): every step after the
    prompt runs prope_attention_with_kvcache with cache_leftpad; tokens and each step's logits
    are the unpatched model's (windows 5-6 < the prompt: the sliding caches crop past the pads)."""
    patched, base = pair(family, device=device)
    ids = make_inputs("plain", device, b=3, s=9)[0]
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :7] = 0
    ids = ids.masked_fill(mask == 0, 0)
    kw = dict(attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False,
              pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    spy = KVCacheCounter(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PRoPEFallbackWarning)
        res = patched.generate(ids, **kw)
    ref_res = base.generate(ids, **kw)
    assert torch.equal(res.sequences, ref_res.sequences)
    for a, b in zip(res.logits, ref_res.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert spy.n == 5 * len(prope_layer_settings(patched))


def test_cached_chunk_runs_fused(device, monkeypatch):
    """A second chunk of several tokens over a filled cache (chunked prefill) gives the logits of
    the unpatched model."""
    patched, base = pair("llama", device=device)
    ids = make_inputs("plain", device, b=2, s=12)[0]
    spy = KVCacheCounter(monkeypatch)
    with torch.no_grad():
        cp = returned_cache(patched(ids[:, :7], use_cache=True))
        cb = returned_cache(base(ids[:, :7], use_cache=True))
        got = patched(ids[:, 7:], past_key_values=cp, use_cache=True).logits
        want = base(ids[:, 7:], past_key_values=cb, use_cache=True).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert spy.n == len(prope_layer_settings(patched))


def test_cached_step_with_gradients_falls_back(device):
    patched, base = pair("llama", device=device)
    ids = make_inputs("plain", device, b=2, s=9)[0]
    with torch.no_grad():
        cp = returned_cache(patched(ids[:, :8], use_cache=True))
        cb = returned_cache(base(ids[:, :8], use_cache=True))
    with pytest.warns(PRoPEFallbackWarning, match="inference-only"):
        got = patched(ids[:, 8:], past_key_values=cp, use_cache=True).logits
    want = base(ids[:, 8:], past_key_values=cb, use_cache=True).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma4", "phi3-partial", "glm"])
def test_generate_with_cache_matches(family, device):
    """The prompt runs fused and fills the cache with rotated keys (compared with the original
    path's cache below); Gemma 4's KV-shared layers still fall back after the prompt."""
    patched, base = pair(family, device=device)
    ids = make_inputs("plain", device, b=2, s=9)[0]
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    if family == "gemma4":
        with pytest.warns(PRoPEFallbackWarning, match="KV cache"):
            got = patched.generate(ids, **kw)
    else:
        got = patched.generate(ids, **kw)
    want = base.generate(ids, **kw)
    assert torch.equal(got, want)
    with torch.no_grad():
        lp = returned_cache(patched(ids, use_cache=True))
        lb = returned_cache(base(ids, use_cache=True))
    assert lb is not None and lp is not None
    compared = 0
    for layer in range(len(lb.layers)):
        if lb.layers[layer].keys is not None and lp.layers[layer].keys is not None:
            torch.testing.assert_close(lp.layers[layer].keys, lb.layers[layer].keys,
                                       rtol=1e-5, atol=1e-5)
            compared += 1
    assert compared > 0


def test_dropout_in_training_falls_back(device):
    patched, base = pair("llama", device=device, attention_dropout=0.5)
    patched.train()
    ids, labels, _, _ = make_inputs("plain", device)
    with pytest.warns(PRoPEFallbackWarning, match="dropout"):
        patched(ids, labels=labels)
    patched.eval()
    torch.testing.assert_close(patched(ids).logits, base(ids).logits, rtol=1e-5, atol=1e-5)


def test_scaled_rope_falls_back(device):
    patched, base = pair("llama", device=device,
                         rope_parameters={"rope_type": "linear", "factor": 2.0,
                                          "rope_theta": 10000.0})
    assert all("linear" in s.reason for s in prope_layer_settings(patched))
    ids = make_inputs("plain", device)[0]
    with pytest.warns(PRoPEFallbackWarning, match="linear"):
        got = patched(ids).logits
    torch.testing.assert_close(got, base(ids).logits, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# flash-attn style kwargs, conversion, class patching, undo
# ----------------------------------------------------------------------------------------------

def test_cu_seq_lens_kwargs(device, monkeypatch):
    patched, base = pair("qwen3", device=device)
    ids, labels, keep, kw = make_inputs("packed", device)
    cu = torch.tensor([0, 5, 8, 13], dtype=torch.int32, device=device)
    calls = OpCounter(monkeypatch)
    got = patched(ids, position_ids=kw["position_ids"], cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                  max_length_q=5, max_length_k=5, use_cache=False).logits
    assert calls.n == 2
    want = base(ids, **kw).logits  # packed position_ids: transformers' block-diagonal mask
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_convert_rope_to_prope_roundtrip(tmp_path, device, monkeypatch):
    model = build("llama", device=device)
    apply_prope_attention(model, p=0.25, backend="reference")
    assert [s.p for s in prope_layer_settings(model)] == [0.25, 0.25]  # 2 of 8 pairs rotate
    assert model.config.rope_parameters["rope_type"] == "proportional"
    ids, labels, keep, kw = make_inputs("padding", device)
    calls = OpCounter(monkeypatch)
    fused = model(ids, **kw).logits
    assert calls.n == 2
    # the original path of the converted model computes the same p-RoPE
    remove_prope_attention(model)
    torch.testing.assert_close(model(ids, **kw).logits[keep], fused[keep], rtol=1e-5, atol=1e-5)
    # and so does a model reloaded from its saved config, unpatched
    model.save_pretrained(tmp_path)
    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path).to(device).eval()
    torch.testing.assert_close(again(ids, **kw).logits[keep], fused[keep], rtol=1e-5, atol=1e-5)
    # p-RoPE differs from the RoPE the model had
    rope = build("llama", device=device)(ids, **kw).logits[keep]
    assert (rope - fused[keep]).abs().max() > 1e-2


@pytest.mark.parametrize("family", ["mistral", "helium", "smollm3"])
def test_convert_llama_shaped(family, tmp_path, device, monkeypatch):
    """p converts half (Mistral) and interleaved (Helium) rotations; layers without rotation
    (SmolLM3) keep none; the converted model's own path, and a reloaded one, compute the same
    p-RoPE."""
    model = build(family, device=device)
    rope = model(make_inputs("padding", device)[0]).logits
    apply_prope_attention(model, p=0.25, backend="reference", verbose=False)
    want_p = [0.0 if family == "smollm3" and i % 2 else 0.25
              for i in range(model.config.num_hidden_layers)]
    assert [x.p for x in prope_layer_settings(model)] == want_p
    ids, labels, keep, kw = make_inputs("padding", device)
    calls = OpCounter(monkeypatch)
    fused = model(ids, **kw).logits
    assert calls.n == len(want_p)
    remove_prope_attention(model)
    torch.testing.assert_close(model(ids, **kw).logits[keep], fused[keep], rtol=1e-5, atol=1e-5)
    assert (model(ids).logits - rope).abs().max() > 1e-3
    model.save_pretrained(tmp_path)
    again = type(model).from_pretrained(tmp_path).to(device).eval()
    torch.testing.assert_close(again(ids, **kw).logits[keep], fused[keep], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["phi3", "phi3-partial", "glm"])
def test_convert_partial_rotary_refused(family):
    """Phi-3 and GLM configs read partial_rotary_factor as a rotary prefix: no conversion (it
    could not be saved), and nothing is changed."""
    model = build(family)
    before = {n: b.clone() for n, b in model.named_buffers()}
    with pytest.raises(ValueError, match="rotary prefix"):
        apply_prope_attention(model, p=0.5, backend="reference")
    assert all(torch.equal(b, before[n]) for n, b in model.named_buffers())
    assert model.config.rope_parameters.get("rope_type", "default") == "default"


def test_convert_per_layer_type_gemma4(device):
    model = build("gemma4", device=device)
    apply_prope_attention(model, p={"sliding_attention": 0.5}, backend="reference")
    s = prope_layer_settings(model)
    assert [x.p for x in s] == [0.25, 0.5, 0.25]


@pytest.mark.parametrize("family", ["qwen2", "phi3-partial", "glm"])
def test_patch_class(family, tmp_path, device, monkeypatch):
    """A patched class: from_pretrained builds on the meta device, so the rotation is read
    from the config (partial rotaries included)."""
    build(family).save_pretrained(tmp_path)
    cls = getattr(transformers, ALL[family][1])
    apply_prope_attention(cls, backend="reference")
    try:
        model = cls.from_pretrained(tmp_path).to(device).eval()
    finally:
        hf.unpatch_class(cls)
    plain = cls.from_pretrained(tmp_path).to(device).eval()
    assert not prope_layer_settings(plain)
    ids = make_inputs("plain", device)[0]
    calls = OpCounter(monkeypatch)
    got = model(ids).logits
    assert calls.n == 2
    torch.testing.assert_close(got, plain(ids).logits, rtol=1e-5, atol=1e-5)


def test_bad_arguments():
    model = build("llama")
    with pytest.raises(ValueError, match="p must be"):
        apply_prope_attention(model, p=1.5)
    with pytest.raises(ValueError, match="backend"):
        apply_prope_attention(model, backend="flash")
    with pytest.raises(ValueError, match="variant"):
        apply_prope_attention(model, variant="partial")
    with pytest.raises(TypeError, match="model"):
        apply_prope_attention("llama")
    with pytest.raises(ValueError, match="no attention layer"):
        apply_prope_attention(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="unknown layer types"):
        apply_prope_attention(build("gemma4"), p={"global": 0.5})


# ----------------------------------------------------------------------------------------------
# torch.compile and transformers.Trainer
# ----------------------------------------------------------------------------------------------

def test_compile_fullgraph_no_break(device):
    dtype = torch.bfloat16
    patched, base = pair("llama", backend="triton", dtype=dtype, device=device)
    ids, labels, _, _ = make_inputs("plain", device)
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(patched, backend=backend, fullgraph=True)
    out = compiled(ids, labels=labels, use_cache=False)
    assert sum("prope_kernels.attn_fwd" in t for t in seen) == 2, seen
    eager = patched(ids, labels=labels, use_cache=False)
    torch.testing.assert_close(out.logits, eager.logits)
    out.loss.backward()  # autograd through the op inside the compiled graph
    assert all(torch.isfinite(p.grad).all() for p in patched.parameters() if p.grad is not None)
    # flash-attn style kwargs (DataCollatorWithFlattening): varlen, still one graph
    seen.clear()
    torch._dynamo.reset()
    _, _, _, kw = make_inputs("packed", device)
    cu = torch.tensor([0, 5, 8, 13], dtype=torch.int32, device=device)
    packed = dict(position_ids=kw["position_ids"], cu_seq_lens_q=cu, cu_seq_lens_k=cu.clone(),
                  max_length_q=5, max_length_k=5, use_cache=False)
    got = torch.compile(patched, backend=backend, fullgraph=True)(ids[:1], **packed).logits
    assert sum("prope_kernels.attn_fwd" in t for t in seen) == 2, seen
    torch.testing.assert_close(got, patched(ids[:1], **packed).logits)
    # a padding mask needs a host sync to plan: graph breaks are allowed, none at the op
    torch._dynamo.reset()
    _, _, _, kw = make_inputs("padding", device)
    expl = torch._dynamo.explain(patched)(ids, **kw)
    assert not any("prope" in str(r.reason) for r in expl.break_reasons), expl.break_reasons
    torch._dynamo.reset()


def _corpus_rows(n_rows, seqlen):
    """Byte-level rows of the bundled corpus, packed with document boundaries kept."""
    from prope_kernels.data import builtin_corpus, pack
    docs = builtin_corpus(max_chars=20_000)[:40]
    ids = [[1] + [2 + (c % (VOCAB - 2)) for c in d.encode()][:3 * seqlen] for d in docs]
    data = pack(ids, seqlen)
    rows = []
    for r in range(n_rows):
        toks = torch.from_numpy(data.tokens[r].astype("int64"))
        pos = torch.cat([torch.arange(n) for n in data.seg_lens[r]])
        labels = toks.clone()
        labels[pos == 0] = -100  # no target across a document boundary
        rows.append(dict(input_ids=toks, labels=labels, position_ids=pos))
    return rows


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_trainer_same_losses(family, tmp_path, device, monkeypatch):
    pytest.importorskip("accelerate")  # transformers.Trainer needs it (in the "test" extra)
    rows = _corpus_rows(8, 48)
    assert any((r["position_ids"] == 0).sum() > 1 for r in rows)  # packed rows present
    losses = []
    for patch in (False, True):
        model = build(family, device=device, use_cache=False)
        if patch:
            apply_prope_attention(model, backend="reference")
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / str(patch)), max_steps=4, per_device_train_batch_size=2,
            learning_rate=1e-3, logging_steps=1, report_to=[], save_strategy="no", seed=0,
            use_cpu=device == "cpu", dataloader_num_workers=0, disable_tqdm=True)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=rows)
        calls = OpCounter(monkeypatch)
        trainer.train()
        assert calls.n == (4 * 2 if patch else 0)  # 4 steps x 2 layers, varlen (packed rows)
        losses.append([h["loss"] for h in trainer.state.log_history if "loss" in h])
    assert len(losses[0]) == 4 and all(math.isfinite(x) for x in losses[0])
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]),
                               rtol=1e-5, atol=1e-5)


def test_no_mask_built_when_all_layers_fused(device, monkeypatch):
    """Padding and packing: transformers' (b, 1, s, s) mask is not built; same answer either way."""
    from transformers.models.llama import modeling_llama
    built = []
    orig = modeling_llama.create_causal_mask

    def spy(*a, **k):
        m = orig(*a, **k)
        built.append(None if m is None else tuple(m.shape))
        return m
    monkeypatch.setattr(modeling_llama, "create_causal_mask", spy)
    skip, keep_mask = pair("llama", device=device)[0], None
    keep_mask = apply_prope_attention(copy.deepcopy(skip), backend="reference", skip_mask=False)
    for case in ("padding", "packed"):
        ids, labels, keep, kw = make_inputs(case, device)
        built.clear()
        a = skip(ids, **kw).logits
        assert built == [(ids.shape[0], 1, 1, 1)]  # the placeholder, returned as is
        built.clear()
        b = keep_mask(ids, **kw).logits
        assert built and built[0][-2:] == (ids.shape[1], ids.shape[1])
        torch.testing.assert_close(a[keep], b[keep], rtol=1e-5, atol=1e-5)


def test_bench_hf_throughput_smoke(tmp_path):
    """prope_kernels/bench/hf_throughput.py end to end at the tiny size (CPU: a smoke check, not
    figures)."""
    import json

    from prope_kernels.bench import hf_throughput
    assert hf_throughput.main(["--smoke", "--families", "llama", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "hf_throughput.json").read_text())
    assert res["meta"]["run_kind"] in ("cpu-smoke", "gpu-smoke")
    rows = res["rows"]
    assert [(r["inputs"], r["provider"].split()[0]) for r in rows] == [
        ("dense", "unpatched"), ("dense", "patched"), ("packed", "unpatched"),
        ("packed", "patched")]
    for unpatched, patched in (rows[:2], rows[2:]):
        assert patched["tokens_per_s_median"] > 0 and unpatched["tokens_per_s_median"] > 0
        assert all(layer["fused"] for layer in patched["layers"])
        tol = 1e-3 if res["meta"]["run_kind"] == "cpu-smoke" else 3e-2  # fp32 CPU, bf16 GPU
        assert abs(patched["loss_before"] - unpatched["loss_before"]) < tol
