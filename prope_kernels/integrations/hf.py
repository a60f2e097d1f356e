"""Fused p-RoPE attention inside Hugging Face ``transformers`` models.

    from prope_kernels.integrations.hf import apply_prope_attention
    model = AutoModelForCausalLM.from_pretrained(...)
    apply_prope_attention(model)                 # same model, fused rotation + attention
    apply_prope_attention(model, p=0.75)         # convert a RoPE model to 0.75-RoPE

Supported attention classes (:data:`ATTENTION_SHAPES`, by class name): Llama, Gemma, Gemma 2,
Gemma 3 (text), Gemma 4 (text), Qwen2, Qwen3, Qwen2-MoE, Qwen3-MoE, Mistral, Mixtral, Ministral,
Phi-3, PhiMoE, Starcoder2, Seed-OSS, Arcee, Granite, GraniteMoE, CWM, dots.llm1, OLMo, OLMo 2,
OLMo 3, Helium, ERNIE 4.5, GLM, GLM-4, SmolLM3, EXAONE 4. Each is the Llama attention or a
variation of it that :class:`AttentionShape` describes: the sliding window read from the config
(Mistral, Mixtral, Phi-3, PhiMoE, Starcoder2), one fused ``qkv_proj`` (Phi-3), a rotary over a
prefix of the head with its own frequencies (Phi-3 and GLM ``partial_rotary_factor``: the op's
``variant="partial"``), interleaved pairs (GLM, Helium, ERNIE 4.5: ``layout="interleaved"``), q/k
norms over all heads before the head split (OLMo 2/3), layers without rotation (SmolLM3's
``no_rope_layers``, EXAONE 4's full-attention layers: p = 0), a residual dropout after ``o_proj``
(Starcoder2, Seed-OSS: applied in training as the original does), OLMo's ``clip_qkv`` (falls back).

How it works. Each attention layer's ``forward`` is replaced (on the instance) by one that projects
q, k, v in the model's own ``(batch, seqlen, heads, head_dim)`` layout, applies the model's q/k/v
norms, and calls :func:`prope_attention` (or :func:`prope_attention_varlen`) with the positions, the
base ``theta`` and the rotated fraction ``p`` of that layer: the model's own cos/sin rotation is not
applied. A forward pre-hook on the decoder stack turns the call's inputs into a *plan* once per
forward, passed to every layer as the keyword ``prope_plan``:

* no mask, or an all-ones 2-D mask: the dense op, positions = ``position_ids`` (default 0..s-1);
* a 2-D padding mask: the varlen op over the kept tokens (outputs at padded positions are 0 before
  ``o_proj``; they are meaningless in the original model too and no kept token reads them);
* ``position_ids`` that restart (packed documents, no mask, no cache): the varlen op, one sequence
  per run of consecutive positions, exactly as transformers' own packed-sequence mask does;
* flash-attn style ``cu_seq_lens_q`` / ``max_length_q`` keywords (e.g. from
  ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``): the varlen op with them, as the
  ``flash_attention_2`` implementation does (no host sync, so ``torch.compile`` sees no break).

* a dynamic KV cache that already holds tokens (``generate()`` after the prompt, a second chunk):
  the new rotated keys go through ``cache.update`` and :func:`prope_attention_with_kvcache` runs
  over the keys it returns (q rotated at ``position_ids``, the mask aligned bottom-right; a
  left-padded batch's pads skipped with ``cache_leftpad``).

Anything the fused op cannot express falls back to the layer's original forward (its own rotation
and attention implementation), with one warning per reason: a 4-D or prepared mask, a KV cache that
already holds tokens together with padding other than on the left, with gradients enabled, of a
static / quantized / offloaded kind or in a model with KV-shared layers, attention dropout in
training, attention weights
requested, rope types other than "default"/"proportional" (linear, yarn, llama3, ...), non-causal
layers, and sliding windows / logit soft-capping while the op has no ``window`` / ``softcap``.
A cache that is empty (a prompt, or a training forward with ``use_cache``) is filled with the
rotated keys as the original path would, and the attention itself stays fused (training with
``use_cache=False``, as transformers recommends, skips that rotation).

The rotation of each layer is read from the model's rotary module (``inv_freq`` per layer type)
and checked against ``rope_theta``: a frequency vector that is not ``theta^(-2k/d)`` on the
rotated pairs and 0 elsewhere is not p-RoPE, and that layer falls back. Passing ``p`` converts
the model: its ``inv_freq`` buffers are rewritten (so the original path, generation included,
computes the same p-RoPE) and its config records ``rope_type="proportional"`` with
``partial_rotary_factor=p``, so ``save_pretrained`` / ``from_pretrained`` give it back. Classes
that read ``partial_rotary_factor`` as a rotary prefix (Phi-3, GLM) are not converted.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import types
import warnings
from dataclasses import dataclass
from typing import Optional, Union

import torch

from ..interface import prope_attention, prope_attention_varlen, apply_prope
from ..kvcache import prope_attention_with_kvcache
from ..rotary import rotated_pairs

__all__ = ["apply_prope_attention", "remove_prope_attention", "prope_layer_settings",
           "unpatch_class", "LayerSettings", "Plan", "PRoPEFallbackWarning", "PLAN_KWARG",
           "SUPPORTED_ATTENTION_CLASSES", "ATTENTION_SHAPES", "AttentionShape"]

PLAN_KWARG = "prope_plan"


@dataclass(frozen=True)
class AttentionShape:
    """What the fused forward must reproduce of one transformers attention class: how it computes
    q, k, v and how its ``apply_rotary_pos_emb`` rotates them. The default is Llama's: separate
    q/k/v/o projections, optional per-head q/k norms after the head split, rotate_half over the
    whole head, the layer's own ``sliding_window`` attribute (None: full attention)."""

    layout: str = "half"            # "interleaved": the rotation pairs dims (2k, 2k+1)
    partial: bool = False           # rotates a prefix of the head when inv_freq is shorter than
    #                                 head_dim/2, frequencies over that prefix (variant "partial")
    fused_qkv: bool = False         # one qkv_proj, split q | k | v (Phi-3)
    flat_qk_norm: bool = False      # q_norm/k_norm over the whole projection, before the split
    config_window: bool = False     # every layer's mask uses config.sliding_window (Mistral)
    residual_dropout: bool = False  # dropout(residual_dropout) after o_proj in training
    window: Optional[object] = None     # attn -> sliding window size or None (overrides)
    rotates: Optional[object] = None    # attn -> False for a layer without rotation (NoPE)
    refuse: Optional[object] = None     # attn -> why this layer cannot be fused, or None


_LLAMA = AttentionShape()


def _olmo_refuse(attn):
    clip = getattr(attn.config, "clip_qkv", None)
    return None if clip is None else f"clip_qkv={clip} (q/k/v clamping) is not fused"


# transformers attention classes whose forward we know, by class name. Each is checked in
# tests/test_hf.py (a tiny random model: logits and gradients equal the unpatched model's).
ATTENTION_SHAPES = {
    "LlamaAttention": _LLAMA,
    "GemmaAttention": _LLAMA,
    "Gemma2Attention": _LLAMA,
    "Gemma3Attention": _LLAMA,
    "Gemma4TextAttention": _LLAMA,
    "Qwen2Attention": _LLAMA,
    "Qwen3Attention": _LLAMA,
    "Qwen2MoeAttention": _LLAMA,
    "Qwen3MoeAttention": _LLAMA,
    "MistralAttention": AttentionShape(config_window=True),
    "MixtralAttention": AttentionShape(config_window=True),
    "MinistralAttention": _LLAMA,
    "Phi3Attention": AttentionShape(partial=True, fused_qkv=True, config_window=True),
    "PhimoeAttention": AttentionShape(config_window=True),
    "Starcoder2Attention": AttentionShape(config_window=True, residual_dropout=True),
    "SeedOssAttention": AttentionShape(residual_dropout=True),
    "ArceeAttention": _LLAMA,
    "GraniteAttention": _LLAMA,
    "GraniteMoeAttention": _LLAMA,
    "CwmAttention": _LLAMA,
    "Dots1Attention": _LLAMA,
    "OlmoAttention": AttentionShape(refuse=_olmo_refuse),
    "Olmo2Attention": AttentionShape(flat_qk_norm=True),
    "Olmo3Attention": AttentionShape(flat_qk_norm=True),
    "HeliumAttention": AttentionShape(layout="interleaved"),
    "Ernie4_5Attention": AttentionShape(layout="interleaved"),
    "GlmAttention": AttentionShape(layout="interleaved", partial=True),
    "Glm4Attention": AttentionShape(layout="interleaved", partial=True),
    "SmolLM3Attention": AttentionShape(rotates=lambda a: bool(a.use_rope)),
    "Exaone4Attention": AttentionShape(
        rotates=lambda a: a.sliding_window is None or a.is_sliding,
        window=lambda a: a.sliding_window if a.is_sliding else None),
}
SUPPORTED_ATTENTION_CLASSES = tuple(ATTENTION_SHAPES)

_OP_KEYWORDS = set(inspect.signature(prope_attention).parameters)
_HAS_WINDOW = "window" in _OP_KEYWORDS
_HAS_SOFTCAP = "softcap" in _OP_KEYWORDS


class PRoPEFallbackWarning(UserWarning):
    """A layer ran its original (unfused) path; the message says why."""


_WARNED: set = set()


@torch._dynamo.disable
def _warn_once(key, message: str) -> None:
    if key in _WARNED:
        return
    _WARNED.add(key)
    warnings.warn(message, PRoPEFallbackWarning, stacklevel=3)


# ----------------------------------------------------------------------------------------------
# per-layer settings
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerSettings:
    """What the fused op is called with in one attention layer (``reason``: why it falls back)."""

    layer_idx: int
    layer_type: Optional[str]
    head_dim: int
    p: float
    theta: float
    variant: str
    softmax_scale: float
    window: Optional[tuple]       # (left, right), flash-attn convention, or None
    softcap: Optional[float]
    reason: Optional[str] = None
    layout: str = "half"          # the rotation's pair layout ("interleaved": GLM, Helium, ...)


def _rope_params(config, layer_type):
    rp = getattr(config, "rope_parameters", None)
    if not isinstance(rp, dict):
        return None
    if "rope_type" not in rp and layer_type is not None and isinstance(rp.get(layer_type), dict):
        return rp[layer_type]
    return rp


def _inv_freq_names(rotary, layer_type):
    if layer_type is not None and hasattr(rotary, f"{layer_type}_inv_freq"):
        return (f"{layer_type}_inv_freq", f"{layer_type}_original_inv_freq",
                f"{layer_type}_attention_scaling")
    return "inv_freq", "original_inv_freq", "attention_scaling"


def _expected_inv_freq(head_dim, p, theta, variant) -> torch.Tensor:
    """(head_dim/2,) float64: theta^(-2k/d) on the rotated pairs, 0 on the identity pairs (the
    form of transformers' "proportional" rope; "reversed" rotates the slowest pairs instead)."""
    h = head_dim // 2
    r = rotated_pairs(head_dim, p)
    k = torch.arange(h, dtype=torch.float64, device="cpu")  # not a meta-device context
    f = float(theta) ** (-2.0 * k / head_dim)
    keep = k < r if variant == "prope" else k >= h - r
    return torch.where(keep, f, torch.zeros_like(f))


def _config_inv_freq(params, head_dim, theta, partial=False) -> torch.Tensor:
    """The frequencies transformers computes from a "default"/"proportional" rope config
    (``partial``: a class whose default rope covers ``int(head_dim * partial_rotary_factor)``
    dims, frequencies over those dims, e.g. Phi-3 and GLM)."""
    if partial and params.get("rope_type", "default") == "default":
        dim = int(head_dim * float(params.get("partial_rotary_factor", 1.0)))
        k = torch.arange(0, dim, 2, dtype=torch.float64, device="cpu")
        return float(theta) ** (-k / dim)
    if params.get("rope_type", "default") == "default" or params.get("factor", 1.0) != 1.0:
        p = 1.0 if params.get("factor", 1.0) == 1.0 else float("nan")
    else:
        p = float(params.get("partial_rotary_factor", 1.0))
    if math.isnan(p):
        return torch.full((head_dim // 2,), float("nan"), device="cpu")
    r = int(p * head_dim // 2)
    return _expected_inv_freq(head_dim, r / (head_dim // 2), theta, "prope")


def _read_rotation(inv_freq: torch.Tensor, head_dim: int, theta: float, partial=False):
    """(p, variant) if ``inv_freq`` is p-RoPE with this theta, else (None, reason).
    partial: the class rotates a prefix of 2 * len(inv_freq) dims (Phi-3, GLM), which is the
    "partial" variant when the frequencies are theta^(-2k / (2 * len(inv_freq)))."""
    h = head_dim // 2
    # built in float32 (relative error ~1e-7); a model cast with .to(bf16) rounds it further
    rtol = max(1e-5, 4 * torch.finfo(inv_freq.dtype).eps)
    got = inv_freq.detach().to("cpu", torch.float64)
    if partial and 0 < got.numel() < h:
        r = got.numel()
        want = float(theta) ** (-torch.arange(r, dtype=torch.float64, device="cpu") / r)
        if torch.allclose(got, want, rtol=rtol, atol=0):
            return r / h, "partial"
        return None, (f"its rotary frequencies over the first {2 * r} dims are not "
                      f"theta^(-2k/{2 * r}) with rope_theta={theta} (a scaled rope)")
    if got.numel() != h:
        return None, (f"its rotary frequencies cover {2 * got.numel()} of head_dim {head_dim} "
                      "dims (partial rotary), which is not p-RoPE in the rotate_half layout")
    r = int((got != 0).sum())
    for variant in ("prope", "reversed"):
        want = _expected_inv_freq(head_dim, r / h, theta, variant)
        if torch.equal(want != 0, got != 0) and torch.allclose(got, want, rtol=rtol, atol=0):
            return r / h, variant
    return None, ("its rotary frequencies are not theta^(-2k/d) with rope_theta="
                  f"{theta} (a scaled rope: linear, yarn, llama3, ...)")


def _layer_type(attn) -> Optional[str]:
    """The layer's type ("full_attention", "sliding_attention", ...): it names the rope
    parameters and rotary buffers of that type (OLMo 3 calls it ``attention_type``)."""
    lt = getattr(attn, "layer_type", None)
    if lt is None and type(attn).__name__ == "Olmo3Attention":
        lt = getattr(attn, "attention_type", None)
    return lt


def _sliding_window(attn, config, shape: AttentionShape):
    if shape.window is not None:
        return shape.window(attn)
    if shape.config_window:
        return getattr(config, "sliding_window", None)
    return getattr(attn, "sliding_window", None)


def _layer_settings(attn, rotary, config, backend) -> LayerSettings:
    shape = ATTENTION_SHAPES[type(attn).__name__]
    layer_type = _layer_type(attn)
    head_dim = int(attn.head_dim)
    window = None
    sw = _sliding_window(attn, config, shape)
    if sw:
        # transformers' sliding mask: key j visible from query i iff i - sw < j <= i
        window = (int(sw) - 1, 0)
    softcap = getattr(attn, "attn_logit_softcapping", None) or None
    base = dict(layer_idx=attn.layer_idx, layer_type=layer_type, head_dim=head_dim,
                softmax_scale=float(attn.scaling), window=window,
                softcap=None if softcap is None else float(softcap), layout=shape.layout)

    def fallback(reason):
        return LayerSettings(p=1.0, theta=10000.0, variant="prope", reason=reason, **base)

    refused = shape.refuse(attn) if shape.refuse is not None else None
    if refused:
        return fallback(refused)
    params = _rope_params(config, layer_type)
    if shape.rotates is not None and not shape.rotates(attn):
        # a layer without rotation (NoPE): p = 0, whatever the rope config says
        theta = float(params["rope_theta"]) if params and "rope_theta" in params else 10000.0
        return _causal_and_features(LayerSettings(p=0.0, theta=theta, variant="prope", **base),
                                    attn, backend)
    if params is None or "rope_theta" not in params:
        return fallback("its config has no rope_parameters with a rope_theta")
    rope_type = params.get("rope_type", "default")
    if rope_type not in ("default", "proportional"):
        return fallback(f"rope_type={rope_type!r} is not p-RoPE (only 'default' and "
                        "'proportional' are fused)")
    theta = float(params["rope_theta"])
    f_name, _, s_name = _inv_freq_names(rotary, layer_type)
    scaling = getattr(rotary, s_name, 1.0)
    if scaling != 1.0:
        return fallback(f"its rope scales cos/sin by {scaling}")
    inv_freq = getattr(rotary, f_name)
    if inv_freq.is_meta:  # built on the meta device: transformers fills it from the config
        inv_freq = _config_inv_freq(params, head_dim, theta, shape.partial)
    p, variant = _read_rotation(inv_freq, head_dim, theta, shape.partial)
    if p is None:
        return fallback(variant)
    return _causal_and_features(LayerSettings(p=p, theta=theta, variant=variant, **base), attn,
                                backend)


def _causal_and_features(s: LayerSettings, attn, backend) -> LayerSettings:
    """``s`` with its ``reason``: why a layer with a fusable rotation still falls back (None:
    it does not)."""
    window, softcap = s.window, s.softcap
    reason = None
    if not getattr(attn, "is_causal", True):
        reason = "the layer is not causal (bidirectional attention)"
    elif window is not None and not _HAS_WINDOW:
        reason = ("sliding-window attention needs the op's window= keyword, not in this "
                  "prope_kernels version")
    elif softcap is not None and not _HAS_SOFTCAP:
        reason = ("attention logit soft-capping needs the op's softcap= keyword, not in this "
                  "prope_kernels version")
    elif backend == "cuda" and (window is not None or softcap is not None):
        reason = "backend='cuda' has no sliding window / soft-capping (use 'auto' or 'triton')"
    return dataclasses.replace(s, reason=reason)


def _convert_rotary(rotary, config, layer_type, head_dim, p, variant):
    """Rewrite the rotary module's frequencies (and the config) to p-RoPE with the same theta."""
    params = _rope_params(config, layer_type)
    if params is None or "rope_theta" not in params:
        raise ValueError("p: the model's config has no rope_parameters['rope_theta'] to keep")
    rope_type = params.get("rope_type", "default")
    if rope_type not in ("default", "proportional") or params.get("factor", 1.0) != 1.0:
        raise ValueError(f"p: cannot convert rope_type={rope_type!r} (scaled) to p-RoPE; only "
                         "'default' and 'proportional' ropes are converted")
    theta = float(params["rope_theta"])
    want = _expected_inv_freq(head_dim, p, theta, variant)
    f_name, o_name, _ = _inv_freq_names(rotary, layer_type)
    for name in (f_name, o_name):
        buf = getattr(rotary, name, None)
        if buf is not None:
            if buf.numel() != want.numel():
                raise ValueError(f"p: the rotary buffer {name} has {buf.numel()} entries, "
                                 f"expected head_dim/2 = {want.numel()}")
            if not buf.is_meta:  # meta: transformers fills it from the (updated) config
                with torch.no_grad():
                    buf.copy_(want.to(buf.dtype))
    if variant == "prope":
        params["rope_type"] = "proportional"
        params["partial_rotary_factor"] = float(p)
        params.pop("factor", None)
        r_hf = int(float(p) * head_dim // 2)
        if r_hf != rotated_pairs(head_dim, p):
            warnings.warn(f"p={p}: transformers would rotate {r_hf} pairs when reloading this "
                          f"config, this model rotates {rotated_pairs(head_dim, p)}")
    else:
        warnings.warn(f"variant={variant!r}: the model's rotary buffers were rewritten, but "
                      "transformers' config has no way to record it; a reloaded model is RoPE")


# ----------------------------------------------------------------------------------------------
# the plan: what the whole forward does, decided once from the model's inputs
# ----------------------------------------------------------------------------------------------

@dataclass
class Plan:
    """How every patched layer of one forward calls the op (``reason``: fall back instead).

    dense:  positions None (0..s-1) or (s,) / (b, s) integers.
    varlen: cu_seqlens (n+1,) int32 over the flattened (b*s) tokens, or over the kept ones
            (``indices`` (total,) int64 rows of the flattened batch) when there is padding;
            positions (total,).
    """

    reason: Optional[str] = None
    varlen: bool = False
    positions: Optional[torch.Tensor] = None
    cu_seqlens: Optional[torch.Tensor] = None
    max_seqlen: int = 0
    indices: Optional[torch.Tensor] = None
    rope_positions: Optional[torch.Tensor] = None  # (s,) or (b, s) as the model rotates (cache)
    cached: bool = False  # the cache holds tokens: prope_attention_with_kvcache over cache + new
    leftpad: Optional[torch.Tensor] = None  # cached, left padding: (b,) padded slots of the mask
    mask_len: int = 0                       # cached: the mask's length (past + s)
    holes: bool = False  # padding inside a row: windows count the padded slots, varlen would not


def _get(args, kwargs, name, index):
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else None


def _make_plan(base, state, args, kwargs) -> Plan:
    plan = _decide(base, state, args, kwargs)
    pos = kwargs.get("position_ids")
    if plan.reason is None and pos is not None:
        pos = pos.reshape(-1, pos.shape[-1]).to(torch.int64)
        plan.rope_positions = pos[0] if pos.shape[0] == 1 else pos
    return plan


def _decide(base, state, args, kwargs) -> Plan:
    if len(args) > 1:
        return Plan("positional arguments after input_ids (pass them by keyword)")
    ids = _get(args, kwargs, "input_ids", 0)
    x = ids if ids is not None else kwargs.get("inputs_embeds")
    if x is None:
        return Plan("no input_ids or inputs_embeds")
    b, s = x.shape[0], x.shape[1]
    device = x.device
    config = base.config
    if kwargs.get("output_attentions") or getattr(config, "output_attentions", False):
        return Plan("attention weights were requested (output_attentions)")
    if kwargs.get("is_causal", True) is False:
        return Plan("is_causal=False (bidirectional attention)")
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is not None:
        get_len = getattr(cache, "get_seq_length", None)
        if get_len is None:
            return Plan("a KV cache of an unknown type")
        past = get_len()
        if past > 0:
            return _cached_plan(base, state, cache, past, args, kwargs)
    if state.kv_shared and kwargs.get("logits_to_keep", 0) not in (0, None):
        return Plan("logits_to_keep with KV-shared layers (queries shorter than keys)")
    if kwargs.get("shared_kv_states") is not None:
        return Plan("shared_kv_states passed in (KV states of another forward)")
    if state.kv_shared and kwargs.get("return_shared_kv_states"):
        return Plan("return_shared_kv_states (the fused layers share unrotated keys)")
    use_cache = kwargs.get("use_cache")
    if use_cache is None:
        use_cache = getattr(config, "use_cache", False)
        if getattr(base, "gradient_checkpointing", False) and base.training \
                and torch.is_grad_enabled():
            use_cache = False
    has_cache = cache is not None or bool(use_cache)

    mask = kwargs.get("attention_mask")
    pos = kwargs.get("position_ids")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            return Plan("a prepared (4-D or per-layer) attention mask")
        if tuple(mask.shape) != (b, s):
            return Plan(f"a 2-D attention mask of shape {tuple(mask.shape)}, not (batch, seqlen) "
                        f"= {(b, s)}")
    if pos is not None:
        if pos.dim() == 1:
            pos = pos[None]
        if pos.dim() != 2 or pos.shape[1] != s or pos.shape[0] not in (1, b):
            return Plan(f"position_ids of shape {tuple(pos.shape)} (expected (batch, seqlen))")
        pos = pos.to(device=device, dtype=torch.int64)

    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        cu_k = kwargs.get("cu_seq_lens_k", cu)
        if cu_k is not cu and (cu_k.shape != cu.shape or (not torch.compiler.is_compiling()
                                                          and not torch.equal(cu_k, cu))):
            # (compiled: a value check would need a host sync; equal lengths are the contract)
            return Plan("cu_seq_lens_k differs from cu_seq_lens_q")
        if b != 1:
            return Plan("cu_seq_lens_q with batch > 1 (expected one flattened row)")
        if mask is not None and not bool(mask.all()):
            return Plan("both cu_seq_lens_q and a padding mask")
        max_len = kwargs.get("max_length_q")
        if max_len is None:
            max_len = int((cu[1:] - cu[:-1]).max())
        positions = pos[0] if pos is not None else torch.arange(s, device=device)
        return Plan(varlen=True, positions=positions, cu_seqlens=cu.to(torch.int32),
                    max_seqlen=int(max_len))

    if mask is not None:
        keep = mask.to(device=device, dtype=torch.bool)
        if bool(keep.all()):
            # transformers' rule: with a 2-D mask there is no packed-sequence detection
            return Plan(positions=None if pos is None else (pos[0] if pos.shape[0] == 1 else pos))
        full = (pos.expand(b, s) if pos is not None
                else torch.arange(s, device=device).expand(b, s))
        indices = keep.reshape(-1).nonzero().squeeze(1)
        lens = keep.sum(1)
        cu = torch.nn.functional.pad(lens.cumsum(0), (1, 0)).to(torch.int32)
        runs = (keep[:, 1:] & ~keep[:, :-1]).sum(1) + keep[:, 0]
        return Plan(varlen=True, positions=full.reshape(-1).index_select(0, indices),
                    cu_seqlens=cu, max_seqlen=int(lens.max()), indices=indices,
                    holes=bool((runs > 1).any()))

    if pos is None:
        return Plan()
    dense_pos = pos[0] if pos.shape[0] == 1 else pos
    if has_cache:
        return Plan(positions=dense_pos)  # transformers detects packing only without a cache
    # packed documents: a new sequence wherever the position does not step by one
    full = pos.expand(b, s)
    starts = torch.ones(b, s, dtype=torch.bool, device=device)
    starts[:, 1:] = (full[:, 1:] - full[:, :-1]) != 1
    if not bool(starts[:, 1:].any()):
        return Plan(positions=dense_pos)
    first = starts.reshape(-1).nonzero().squeeze(1)
    cu = torch.cat([first, first.new_tensor([b * s])]).to(torch.int32)
    return Plan(varlen=True, positions=full.reshape(-1), cu_seqlens=cu,
                max_seqlen=int((cu[1:] - cu[:-1]).max()))


_DYNAMIC_LAYERS = ("DynamicLayer", "DynamicSlidingWindowLayer")


def _cached_plan(base, state, cache, past, args, kwargs) -> Plan:
    """A forward over a cache that holds ``past`` tokens (generate() after the prompt, chunked
    prefill): each layer appends its rotated keys with ``cache.update`` and runs
    :func:`prope_attention_with_kvcache` over the keys the cache returns, q rotated at its
    ``position_ids`` (default ``past .. past + s - 1``), the mask aligned bottom-right."""
    ids = _get(args, kwargs, "input_ids", 0)
    x = ids if ids is not None else kwargs.get("inputs_embeds")
    b, s = x.shape[0], x.shape[1]
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer).__name__ not in _DYNAMIC_LAYERS for layer in layers):
        return Plan("a KV cache other than transformers' dynamic cache (static, quantized, "
                    "offloaded) that already holds tokens")
    if state.kv_shared:
        return Plan("a KV cache that already holds tokens in a model with KV-shared layers")
    if torch.is_grad_enabled():
        return Plan("a KV cache that already holds tokens with gradients enabled (the cached "
                    "op is inference-only)")
    if kwargs.get("cu_seq_lens_q") is not None:
        return Plan("cu_seq_lens_q with a KV cache that holds tokens")
    mask = kwargs.get("attention_mask")
    leftpad = None
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            return Plan("a prepared (4-D or per-layer) attention mask")
        keep = mask.to(torch.bool)
        if mask.shape[0] != b or mask.shape[1] < s:
            return Plan(f"a 2-D attention mask of shape {tuple(mask.shape)} with a KV cache "
                        f"(expected (batch, cached + new tokens))")
        if not bool(keep.all()):
            # left padding (generate() of a padded batch): each row is 0s then 1s, and the new
            # tokens are real; the op then starts each sequence's keys after its pads
            if bool((keep[:, 1:] < keep[:, :-1]).any()) or not bool(keep[:, -s:].all()):
                return Plan("a padding mask other than left padding with a KV cache that holds "
                            "tokens")
            leftpad = (~keep).sum(1)
    pos = kwargs.get("position_ids")
    if pos is None:
        pos = torch.arange(past, past + s, device=x.device)
    else:
        pos = pos.reshape(-1, pos.shape[-1]).to(device=x.device, dtype=torch.int64)
        if pos.shape[-1] != s or pos.shape[0] not in (1, b):
            return Plan(f"position_ids of shape {tuple(pos.shape)} (expected (batch, seqlen))")
        pos = pos[0] if pos.shape[0] == 1 else pos
    return Plan(positions=pos, rope_positions=pos, cached=True, leftpad=leftpad,
                mask_len=0 if mask is None else mask.shape[1])


# ----------------------------------------------------------------------------------------------
# the patched attention forward
# ----------------------------------------------------------------------------------------------

def _fused_forward(self, hidden_states, position_embeddings=None, attention_mask=None,
                   *args, **kwargs):
    plan = kwargs.pop(PLAN_KWARG, None)
    st: LayerSettings = self._prope_settings
    reason = st.reason
    if reason is None:
        if plan is None:
            reason = "the layer was called without the decoder's pre-hook (no plan)"
        elif plan.reason is not None:
            reason = plan.reason
        else:
            reason = _dynamic_reason(self, st, plan)
    if reason is not None:
        _warn_once((id(self._prope_state), reason),
                   f"prope_kernels: layer {st.layer_idx} ({type(self).__name__}) runs its "
                   f"original attention: {reason}")
        return self._prope_orig_forward(hidden_states, position_embeddings, attention_mask,
                                        *args, **kwargs)

    shared = kwargs.get("shared_kv_states", args[0] if args else None)
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    shape: AttentionShape = self._prope_shape
    b, s = hidden_states.shape[:2]
    d = st.head_dim
    q_norm, k_norm = getattr(self, "q_norm", None), getattr(self, "k_norm", None)
    if shape.fused_qkv:                                            # Phi-3: q | k | v
        qkv = self.qkv_proj(hidden_states)
        nq = self.config.num_attention_heads * d
        q, k, v = qkv.split([nq, (qkv.shape[-1] - nq) // 2, (qkv.shape[-1] - nq) // 2], dim=-1)
        q, k, v = (t.reshape(b, s, -1, d) for t in (q, k, v))
    else:
        q = self.q_proj(hidden_states)
        if shape.flat_qk_norm and q_norm is not None:              # OLMo 2: over all heads
            q = q_norm(q)
        q = q.view(b, s, -1, d)                                    # (b, s, hq, d)
        if not shape.flat_qk_norm and q_norm is not None:
            q = q_norm(q)
    if getattr(self, "is_kv_shared_layer", False):
        k, v = shared[self.layer_type]                             # stored (b, hkv, s, d)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
    else:
        if not shape.fused_qkv:
            k = self.k_proj(hidden_states)
            if shape.flat_qk_norm and k_norm is not None:
                k = k_norm(k)
            k = k.view(b, s, -1, d)                                # (b, s, hkv, d)
            v_proj = getattr(self, "v_proj", None)
            v = v_proj(hidden_states).view(b, s, -1, d) if v_proj is not None else k  # k_eq_v
            if not shape.flat_qk_norm and k_norm is not None:
                k = k_norm(k)
        if getattr(self, "v_norm", None) is not None:
            v = self.v_norm(v)
        if cache is not None:
            # the cache holds rotated keys in (b, h, s, d), as the original path writes them
            k_rot = apply_prope(k, plan.rope_positions, p=st.p, theta=st.theta,
                                variant=st.variant, layout=st.layout,
                                backend=self._prope_state.rope_backend(k))
            k_all, v_all = cache.update(k_rot.transpose(1, 2), v.transpose(1, 2), self.layer_idx,
                                        kwargs=kwargs)
    if getattr(self, "store_full_length_kv", False):
        shared[self.layer_type] = (k.transpose(1, 2), v.transpose(1, 2))  # unrotated, see docs

    opts = dict(p=st.p, theta=st.theta, variant=st.variant, layout=st.layout, causal=True,
                softmax_scale=st.softmax_scale, backend=self._prope_state.backend)
    if st.window is not None:
        opts["window"] = st.window
    if st.softcap is not None:
        opts["softcap"] = st.softcap
    if plan.cached:
        # keys of the cache (rotated, (b, hkv, L, d)) + the new ones: the last s of the L keys
        # are this call's tokens (bottom-right alignment); transposed views, no copy
        kv_opts = {n: opts[n] for n in ("p", "theta", "variant", "layout", "causal",
                                        "softmax_scale", "window", "softcap") if n in opts}
        be = self._prope_state.backend
        leftpad = None
        if plan.leftpad is not None:
            # a sliding-window layer's cache dropped its oldest (mask_len - L) slots
            dropped = plan.mask_len - k_all.shape[2]
            leftpad = (plan.leftpad - dropped).clamp(min=0).to(torch.int32)
        out = prope_attention_with_kvcache(
            q, k_all.transpose(1, 2), v_all.transpose(1, 2), cache_seqlens=k_all.shape[2],
            positions=plan.positions, backend=be if be in ("triton", "reference") else "auto",
            cache_leftpad=leftpad, check_cache_seqlens=leftpad is None, **kv_opts)
    elif not plan.varlen:
        out = prope_attention(q, k.contiguous(), v.contiguous(), positions=plan.positions, **opts)
    else:
        qf, kf, vf = (t.reshape(b * s, t.shape[2], d) for t in (q, k, v))
        if plan.indices is not None:
            qf, kf, vf = (t.index_select(0, plan.indices) for t in (qf, kf, vf))
        out = prope_attention_varlen(qf, kf, vf, plan.cu_seqlens, plan.max_seqlen,
                                     positions=plan.positions, **opts)
        if plan.indices is not None:
            out = out.new_zeros(b * s, out.shape[1], d).index_copy(0, plan.indices, out)
    out = self.o_proj(out.reshape(b, s, -1))
    if shape.residual_dropout and self.training and self.residual_dropout:
        out = torch.nn.functional.dropout(out, p=self.residual_dropout, training=True)
    return out, None


def _dynamic_reason(attn, st: LayerSettings, plan: Plan) -> Optional[str]:
    """Why a layer whose settings fuse falls back in this forward (None: it runs fused)."""
    if attn.training and getattr(attn, "attention_dropout", 0.0):
        return "attention dropout in training"
    if plan.holes and st.window is not None:
        return "a sliding window with padding inside a row (not only at its ends)"
    return None


# ----------------------------------------------------------------------------------------------
# patching
# ----------------------------------------------------------------------------------------------

class _State:
    """Shared by the hook and the layers of one patched decoder stack."""

    def __init__(self, backend, kv_shared, skip_mask):
        self.backend = backend
        self.skip_mask = skip_mask
        self.kv_shared = kv_shared
        self.hook = None
        self.layers = []

    def rope_backend(self, x):
        # the cache fill uses the rotation alone; "auto" picks the kernel for x's device/dtype
        return self.backend if self.backend != "triton" or x.dtype != torch.float32 else "reference"


def _decoder_stacks(model):
    """(base, attention modules) for each decoder stack with supported attention layers."""
    out = []
    for mod in model.modules():
        layers = getattr(mod, "layers", None)
        if not isinstance(layers, torch.nn.ModuleList) or not hasattr(mod, "rotary_emb"):
            continue
        attns = [getattr(layer, "self_attn", None) for layer in layers]
        attns = [a for a in attns if a is not None
                 and type(a).__name__ in SUPPORTED_ATTENTION_CLASSES]
        if attns:
            out.append((mod, attns))
    return out


def _plan_hook(state, base, args, kwargs):
    plan = _make_plan(base, state, args, kwargs)
    kwargs = dict(kwargs)
    kwargs[PLAN_KWARG] = plan
    if state.skip_mask and plan.reason is None and _all_layers_fused(state, base, plan):
        # No layer reads the mask: hand transformers a prepared (4-D) placeholder, so that it
        # neither builds a (b, 1, s, s) mask for padding or packing nor scans position_ids.
        x = _get(args, kwargs, "input_ids", 0)
        x = x if x is not None else kwargs["inputs_embeds"]
        kwargs["attention_mask"] = torch.ones(x.shape[0], 1, 1, 1, dtype=torch.bool,
                                              device=x.device)
    return args, kwargs


def _all_layers_fused(state, base, plan):
    for a in state.layers:
        st = a._prope_settings
        if st.reason is not None or _dynamic_reason(a, st, plan) is not None:
            return False
    return True


def apply_prope_attention(model, p: Union[float, dict, None] = None, backend: str = "auto",
                          variant: str = "prope", verbose: bool = True, skip_mask: bool = True):
    """Make a transformers causal LM's attention layers call the fused p-RoPE op.

    Args:
        model: a loaded model (e.g. ``LlamaForCausalLM``, ``Gemma3ForCausalLM``, a base model),
            patched in place; or a model class, whose instances are patched when constructed
            (``from_pretrained`` included) with these arguments.
        p: None keeps the model's rotation (read from its rotary frequencies, per layer type).
            A float in [0, 1] (or ``{layer_type: p}``, e.g. ``{"full_attention": 0.25}``)
            converts the model to p-RoPE with its own ``rope_theta``: the rotary buffers and the
            config are rewritten, so unfused paths and a reloaded model agree.
        backend: the op's backend: "auto", "triton", "cuda" or "reference".
        variant: "prope" (the fastest pairs rotate) or "reversed"; only used with ``p``.
        verbose: warn once per layer that falls back statically (unsupported feature).
        skip_mask: when every layer of a forward runs fused, give transformers a placeholder
            mask so that it does not build its (batch, 1, seqlen, seqlen) padding/packing mask.

    Returns:
        the model (or class). Per-layer settings: :func:`prope_layer_settings`.
    """
    if isinstance(model, type):
        return _patch_class(model, p=p, backend=backend, variant=variant, verbose=verbose,
                            skip_mask=skip_mask)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or a model class, got "
                        f"{type(model).__name__}")
    if backend not in ("auto", "triton", "cuda", "reference"):
        raise ValueError(f"backend must be 'auto', 'triton', 'cuda' or 'reference', got "
                         f"{backend!r}")
    if variant not in ("prope", "reversed"):
        raise ValueError(f"variant must be 'prope' or 'reversed' (transformers' rotate_half "
                         f"layout), got {variant!r}")
    if p is not None and not isinstance(p, dict):
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be None, a float in [0, 1] or a dict of them, got {p!r}")
    stacks = _decoder_stacks(model)
    if not stacks:
        raise ValueError(f"model ({type(model).__name__}) has no attention layer of a supported "
                         f"class {SUPPORTED_ATTENTION_CLASSES}")
    for base, attns in stacks:
        if getattr(base, "_prope_state", None) is not None:
            remove_prope_attention(base)
        config = base.config
        rotary = base.rotary_emb
        if p is not None:
            done = set()
            for a in attns:
                lt = _layer_type(a)
                key = _inv_freq_names(rotary, lt)[0]
                if key in done:
                    continue
                pl = p.get(lt) if isinstance(p, dict) else p
                if pl is None:
                    continue
                if isinstance(pl, bool) or not isinstance(pl, (int, float)) \
                        or not 0.0 <= pl <= 1.0:
                    raise ValueError(f"p[{lt!r}] must be a float in [0, 1], got {pl!r}")
                if ATTENTION_SHAPES[type(a).__name__].partial:
                    raise ValueError(
                        f"p: {type(a).__name__} reads partial_rotary_factor as a rotary prefix "
                        f"with its own frequencies (variant 'partial'), so its config cannot "
                        f"record a p-RoPE conversion; patch it without p (its own rotation is "
                        f"fused)")
                _convert_rotary(rotary, config, lt, int(a.head_dim), float(pl), variant)
                done.add(key)
            if isinstance(p, dict):
                unknown = set(p) - {_layer_type(a) for a in attns}
                if unknown:
                    raise ValueError(f"p: unknown layer types {sorted(map(str, unknown))}")
        state = _State(backend, any(getattr(a, "is_kv_shared_layer", False) for a in attns),
                       skip_mask)
        for a in attns:
            a._prope_shape = ATTENTION_SHAPES[type(a).__name__]
            a._prope_settings = _layer_settings(a, rotary, config, backend)
            a._prope_state = state
            a._prope_orig_forward = a.forward
            a.forward = types.MethodType(_fused_forward, a)
            state.layers.append(a)
            if verbose and a._prope_settings.reason:
                _warn_once((id(state), a._prope_settings.reason),
                           f"prope_kernels: layer {a.layer_idx} ({type(a).__name__}) and others "
                           f"like it keep their original attention: {a._prope_settings.reason}")
        state.hook = base.register_forward_pre_hook(functools.partial(_plan_hook, state),
                                                    with_kwargs=True)
        base._prope_state = state
    return model


def remove_prope_attention(model):
    """Undo :func:`apply_prope_attention` (a converted rotation stays converted)."""
    for mod in model.modules():
        state = getattr(mod, "_prope_state", None)
        if state is None or getattr(mod, "layers", None) is None:
            continue
        state.hook.remove()
        for a in state.layers:
            a.forward = a._prope_orig_forward
            for name in ("_prope_settings", "_prope_state", "_prope_orig_forward",
                         "_prope_shape"):
                delattr(a, name)
        del mod._prope_state
    return model


def prope_layer_settings(model) -> list:
    """The :class:`LayerSettings` of every patched layer, in order."""
    return [a._prope_settings for a in model.modules() if hasattr(a, "_prope_settings")]


def _patch_class(cls, **options):
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise TypeError(f"model must be a torch.nn.Module or a subclass of it, got {cls!r}")
    if options.get("variant", "prope") != "prope" and options.get("p") is not None:
        raise ValueError("a patched class converts through its config, which records only "
                         "variant='prope'; patch the loaded model for variant='reversed'")
    init = cls.__init__
    init = getattr(init, "_prope_original", init)

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if type(self) is cls:  # once, for the outermost class being built
            apply_prope_attention(self, **options)

    __init__._prope_original = init
    cls.__init__ = __init__
    return cls


def unpatch_class(cls):
    """Undo :func:`apply_prope_attention` on a class (models built before stay patched)."""
    init = getattr(cls.__init__, "_prope_original", None)
    if init is not None:
        cls.__init__ = init
    return cls
