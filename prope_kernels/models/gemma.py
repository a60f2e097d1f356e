"""Gemma 1, 2, 3 and a Gemma-4-style model, with a switchable position encoding (NoPE, RoPE,
p-RoPE and its variants) and attention backend.

One module covers the families; they differ only in :class:`GemmaConfig` fields:

* Gemma 1: every layer global (full causal), RMSNorm before attention and before the MLP;
* Gemma 2: local (sliding-window) and global layers alternate, attention-logit softcap,
  final-logit softcap, ``query_pre_attn_scalar``, "sandwich" norms (after attention and MLP too);
* Gemma 3: 5 local : 1 global, local and global RoPE bases differ, RMSNorm of q and k (qk-norm);
* Gemma 4: as Gemma 3, plus global layers with their own head_dim (512), kv heads and
  p-RoPE (p = 0.25, theta 1e6), RMSNorm of v, softmax scale 1, norms scaled by ``w`` (not
  ``1 + w``), optionally keys = values on global layers.

Shapes: tokens (batch, seqlen); hidden states (batch, seqlen, hidden); attention q/k/v in the
package layout (batch, seqlen, heads, head_dim), or packed (batch*seqlen, heads, head_dim) with
``cu_seqlens`` when rows hold several documents (each attends only to itself, positions restart).
Parameter names follow transformers' ``Gemma*ForCausalLM`` (``model.`` prefix dropped), so its
state dicts load as they are.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import backends
from .. import reference as ref
from ..interface import apply_prope, prope_attention, prope_attention_varlen
from ..rotary import PRoPESpec

# "auto" and every registered backend of prope_kernels.backends, plus "unfused": the baseline
# users run today (RoPE with the reference rotation, then torch's scaled_dot_product_attention)
UNFUSED = "unfused"
ATTN_BACKENDS = backends.choices() + (UNFUSED,)


def _help(text: str, **kw):
    """A dataclass field whose help text the CLI reads (``metadata["help"]``)."""
    return field(metadata={"help": text}, **kw)


@dataclass
class LayerAttn:
    """Attention of one kind of layer (Gemma 2-4 have two kinds: local and global)."""

    head_dim: int = _help("dims per head", default=256)
    kv_heads: int = _help("key/value heads (query heads are a multiple: MHA, GQA, MQA)",
                          default=1)
    p: float = _help("fraction of RoPE frequency pairs that rotate: 0 = NoPE, 1 = RoPE, "
                     "0.75 = 0.75-RoPE (p-RoPE)", default=0.75)
    theta: float = _help("RoPE base", default=10000.0)
    window: int = _help("sliding window W: query i sees keys i-W+1 .. i (transformers' "
                        "sliding_window); 0 = full causal", default=0)
    softcap: float = _help("attention-logit softcap c: scores -> c*tanh(scores/c) "
                           "(0 = off; Gemma 2: 50)", default=0.0)
    k_eq_v: bool = _help("values are the key projection (no v_proj; Gemma 4 global layers "
                         "of its larger models)", default=False)

    def validate(self, where: str) -> "LayerAttn":
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"{where}.p must be in [0, 1], got {self.p}")
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"{where}.head_dim must be positive and even, got {self.head_dim}")
        if self.kv_heads <= 0:
            raise ValueError(f"{where}.kv_heads must be positive, got {self.kv_heads}")
        if self.window < 0:
            raise ValueError(f"{where}.window must be >= 0 (0: full causal), got {self.window}")
        if self.softcap < 0:
            raise ValueError(f"{where}.softcap must be >= 0 (0: off), got {self.softcap}")
        if self.theta <= 0:
            raise ValueError(f"{where}.theta must be positive, got {self.theta}")
        return self


# short names for nested fields, used by GemmaConfig.updated(), preset() and the CLI
ALIASES = {
    "p": "global_attn.p", "theta": "global_attn.theta", "head_dim": "global_attn.head_dim",
    "kv_heads": "global_attn.kv_heads", "softcap": "global_attn.softcap",
    "local_p": "local_attn.p", "local_theta": "local_attn.theta",
    "window": "local_attn.window", "local_softcap": "local_attn.softcap",
}


@dataclass
class GemmaConfig:
    """Shape and features of a Gemma model. Layer ``i`` is local (sliding window, attention
    ``local_attn``) where ``layer_pattern[i % len(layer_pattern)] == "L"``, else global
    (``global_attn``); Gemma 1 is ``"G"``, Gemma 2 ``"LG"``, Gemma 3/4 ``"LLLLLG"``."""

    vocab_size: int = _help("vocabulary size", default=256000)
    hidden: int = _help("model width", default=2048)
    layers: int = _help("decoder layers", default=18)
    heads: int = _help("query heads", default=8)
    mlp: int = _help("MLP width (tanh-GELU gated)", default=16384)
    rms_eps: float = _help("RMSNorm epsilon", default=1e-6)
    global_attn: LayerAttn = _help("attention of global layers (every layer of Gemma 1)",
                                   default_factory=LayerAttn)
    local_attn: Optional[LayerAttn] = _help("attention of local layers (None: no local "
                                            "layers)", default=None)
    layer_pattern: str = _help("layer kinds, cycled: L = local, G = global", default="G")
    variant: str = _help("which pairs rotate: prope (fastest), reversed (slowest), partial "
                         "(NeoX prefix)", default="prope")
    layout: str = _help("pair layout: half (Gemma/Llama rotate_half) or interleaved (GPT-J)",
                        default="half")
    query_pre_attn_scalar: float = _help("softmax scale is query_pre_attn_scalar ** -0.5 "
                                         "(0: head_dim ** -0.5; Gemma 4: 1, i.e. scale 1)",
                                         default=0.0)
    sandwich_norm: bool = _help("RMSNorm after attention and after the MLP as well (Gemma 2+)",
                                default=False)
    qk_norm: bool = _help("RMSNorm of q and k per head (Gemma 3+)", default=False)
    v_norm: bool = _help("RMSNorm (no weight) of v per head (Gemma 4)", default=False)
    norm_unit_offset: bool = _help("RMSNorm scales by (1 + w), w from 0 (Gemma 1-3); else by "
                                   "w, w from 1 (Gemma 4)", default=True)
    final_softcap: float = _help("final-logit softcap (0 = off; Gemma 2: 30)", default=0.0)
    attn: str = _help("attention: auto, a fused backend (" + ", ".join(backends.names())
                      + "), or unfused (RoPE, then SDPA: the baseline)", default="auto")
    activation_checkpointing: bool = _help("recompute each layer in backward to save memory",
                                           default=False)

    # --- per-layer view -------------------------------------------------------------------

    def is_local(self, i: int) -> bool:
        return self.layer_pattern[i % len(self.layer_pattern)] == "L"

    def layer_attn(self, i: int) -> LayerAttn:
        return self.local_attn if self.is_local(i) else self.global_attn

    def layer_types(self) -> list[str]:
        """transformers' names: "sliding_attention" / "full_attention" per layer."""
        return ["sliding_attention" if self.is_local(i) else "full_attention"
                for i in range(self.layers)]

    def softmax_scale(self, spec: LayerAttn) -> float:
        return (self.query_pre_attn_scalar or spec.head_dim) ** -0.5

    # --- construction ---------------------------------------------------------------------

    def validate(self) -> "GemmaConfig":
        if self.attn not in ATTN_BACKENDS:
            raise ValueError(f"attn must be one of {ATTN_BACKENDS}, got {self.attn!r}")
        for name in ("vocab_size", "hidden", "layers", "heads", "mlp"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.layer_pattern or set(self.layer_pattern) - {"L", "G"}:
            raise ValueError(f"layer_pattern must be a non-empty string of L and G, got "
                             f"{self.layer_pattern!r}")
        if "L" in self.layer_pattern and self.local_attn is None:
            raise ValueError(f"layer_pattern {self.layer_pattern!r} has local layers but "
                             "local_attn is None")
        from ..rotary import LAYOUTS, VARIANTS
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        for where, spec in (("global_attn", self.global_attn), ("local_attn", self.local_attn)):
            if spec is None:
                continue
            spec.validate(where)
            PRoPESpec(spec.head_dim, spec.p, spec.theta, self.variant, self.layout)  # validates
            if self.heads % spec.kv_heads:
                raise ValueError(f"heads ({self.heads}) must be a multiple of {where}.kv_heads "
                                 f"({spec.kv_heads})")
        if self.query_pre_attn_scalar < 0 or self.final_softcap < 0:
            raise ValueError("query_pre_attn_scalar and final_softcap must be >= 0")
        return self

    def updated(self, **kw) -> "GemmaConfig":
        """A copy with fields replaced; keys are field names, dotted nested names
        (``"local_attn.window"``) or the short names of :data:`ALIASES` (``p``, ``theta``,
        ``window``, ...). ``None`` values are ignored (CLI flags left unset)."""
        cfg = replace(self, global_attn=replace(self.global_attn),
                      local_attn=None if self.local_attn is None else replace(self.local_attn))
        for key, value in kw.items():
            if value is None:
                continue
            path = ALIASES.get(key, key)
            if "." in path:
                outer, inner = path.split(".", 1)
                spec = getattr(cfg, outer)
                if spec is None:
                    raise ValueError(f"{key!r}: this model has no {outer} (no local layers)")
                if inner not in {f.name for f in fields(LayerAttn)}:
                    raise ValueError(f"unknown attention field {inner!r}")
                setattr(spec, inner, value)
            elif key in {f.name for f in fields(GemmaConfig)}:
                if key in ("global_attn", "local_attn") and isinstance(value, dict):
                    value = LayerAttn(**value)
                setattr(cfg, key, value)
            else:
                raise ValueError(f"unknown model field {key!r}")
        return cfg.validate()

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GemmaConfig":
        d = dict(d)
        for k in ("global_attn", "local_attn"):
            if isinstance(d.get(k), dict):
                d[k] = LayerAttn(**d[k])
        return cls(**d).validate()

    # --- size and cost --------------------------------------------------------------------

    def num_params(self) -> int:
        """Exact parameter count (the model built on the meta device: no memory)."""
        with torch.device("meta"):
            return sum(p.numel() for p in Gemma(self).parameters())

    def flops_per_token(self, seqlen: int) -> float:
        """Training FLOPs per token: 6 * params (matmuls, fwd+bwd; the tied output matmul counted
        once more) + attention scores and values: 12 * heads * head_dim * (keys a query sees)."""
        dense = 6 * self.num_params()
        attn = 0.0
        for i in range(self.layers):
            spec = self.layer_attn(i)
            w = spec.window
            keys = seqlen / 2 if not w or w >= seqlen else w * (1 - w / (2 * seqlen))
            attn += 12 * self.heads * spec.head_dim * keys
        return float(dense + attn)


PRESETS = {
    # Gemma 1 as published (p-RoPE 0.75 by default: the project's main comparison)
    "gemma-2b": GemmaConfig(global_attn=LayerAttn(head_dim=256, kv_heads=1)),
    "gemma-7b": GemmaConfig(hidden=3072, layers=28, heads=16, mlp=24576,
                            global_attn=LayerAttn(head_dim=256, kv_heads=16)),
    # same shape rules, small enough for a CPU (the trainer sets vocab from the tokenizer)
    "gemma-small": GemmaConfig(vocab_size=4096, hidden=256, layers=4, heads=4, mlp=1024,
                               global_attn=LayerAttn(head_dim=64, kv_heads=1)),
    "gemma-tiny": GemmaConfig(vocab_size=512, hidden=64, layers=2, heads=2, mlp=128,
                              global_attn=LayerAttn(head_dim=32, kv_heads=1)),
    # Gemma 2 2B (google/gemma-2-2b): local/global alternate from layer 0, RoPE everywhere
    "gemma2-2b": GemmaConfig(
        vocab_size=256000, hidden=2304, layers=26, heads=8, mlp=9216, layer_pattern="LG",
        global_attn=LayerAttn(head_dim=256, kv_heads=4, p=1.0, softcap=50.0),
        local_attn=LayerAttn(head_dim=256, kv_heads=4, p=1.0, softcap=50.0, window=4096),
        query_pre_attn_scalar=256, sandwich_norm=True, final_softcap=30.0),
    "gemma2-tiny": GemmaConfig(
        vocab_size=512, hidden=64, layers=4, heads=4, mlp=128, layer_pattern="LG",
        global_attn=LayerAttn(head_dim=32, kv_heads=2, p=1.0, softcap=50.0),
        local_attn=LayerAttn(head_dim=32, kv_heads=2, p=1.0, softcap=50.0, window=16),
        query_pre_attn_scalar=24, sandwich_norm=True, final_softcap=30.0),
    # Gemma 3 1B (google/gemma-3-1b-pt): 5 local : 1 global, qk-norm, two RoPE bases
    "gemma3-1b": GemmaConfig(
        vocab_size=262144, hidden=1152, layers=26, heads=4, mlp=6912, layer_pattern="LLLLLG",
        global_attn=LayerAttn(head_dim=256, kv_heads=1, p=1.0, theta=1e6),
        local_attn=LayerAttn(head_dim=256, kv_heads=1, p=1.0, theta=1e4, window=512),
        query_pre_attn_scalar=256, sandwich_norm=True, qk_norm=True),
    "gemma3-tiny": GemmaConfig(
        vocab_size=512, hidden=64, layers=6, heads=2, mlp=128, layer_pattern="LLLLLG",
        global_attn=LayerAttn(head_dim=32, kv_heads=1, p=1.0, theta=1e6),
        local_attn=LayerAttn(head_dim=32, kv_heads=1, p=1.0, theta=1e4, window=16),
        query_pre_attn_scalar=32, sandwich_norm=True, qk_norm=True),
    # Gemma-4-style dense text model (transformers' Gemma4TextConfig defaults, without per-layer
    # embeddings, kv sharing or MoE): local RoPE layers; global layers head_dim 512, 0.25-RoPE
    "gemma4-style": GemmaConfig(
        vocab_size=262144, hidden=2304, layers=30, heads=8, mlp=9216, layer_pattern="LLLLLG",
        global_attn=LayerAttn(head_dim=512, kv_heads=4, p=0.25, theta=1e6),
        local_attn=LayerAttn(head_dim=256, kv_heads=4, p=1.0, theta=1e4, window=512),
        query_pre_attn_scalar=1.0, sandwich_norm=True, qk_norm=True, v_norm=True,
        norm_unit_offset=False),
    "gemma4-tiny": GemmaConfig(
        vocab_size=512, hidden=64, layers=6, heads=2, mlp=128, layer_pattern="LLLLLG",
        global_attn=LayerAttn(head_dim=64, kv_heads=1, p=0.25, theta=1e6),
        local_attn=LayerAttn(head_dim=32, kv_heads=1, p=1.0, theta=1e4, window=16),
        query_pre_attn_scalar=1.0, sandwich_norm=True, qk_norm=True, v_norm=True,
        norm_unit_offset=False),
}


def preset(name: str, **overrides) -> GemmaConfig:
    """A copy of ``PRESETS[name]`` with :meth:`GemmaConfig.updated` overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name].updated(**overrides)


class RMSNorm(nn.Module):
    """Gemma RMSNorm, computed in fp32: scaled by (1 + weight) (Gemma 1-3) or by weight
    (Gemma 4, ``unit_offset=False``), or not scaled (``scale=False``: Gemma 4's v-norm)."""

    def __init__(self, dim: int, eps: float, unit_offset: bool = True, scale: bool = True):
        super().__init__()
        self.eps, self.unit_offset = eps, unit_offset
        self.weight = nn.Parameter(torch.empty(dim)) if scale else None
        self.reset_parameters()

    def reset_parameters(self):
        if self.weight is not None:  # identity scale either way
            nn.init.constant_(self.weight, 0.0 if self.unit_offset else 1.0)

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is not None:
            w = self.weight.float()
            xf = xf * (1.0 + w if self.unit_offset else w)
        return xf.type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: GemmaConfig, spec: LayerAttn):
        super().__init__()
        self.cfg, self.spec = cfg, spec
        d = spec.head_dim
        self.q_proj = nn.Linear(cfg.hidden, cfg.heads * d, bias=False)
        self.k_proj = nn.Linear(cfg.hidden, spec.kv_heads * d, bias=False)
        self.v_proj = None if spec.k_eq_v else nn.Linear(cfg.hidden, spec.kv_heads * d,
                                                         bias=False)
        self.o_proj = nn.Linear(cfg.heads * d, cfg.hidden, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_eps, cfg.norm_unit_offset)
            self.k_norm = RMSNorm(d, cfg.rms_eps, cfg.norm_unit_offset)
        self.v_norm = RMSNorm(d, cfg.rms_eps, scale=False) if cfg.v_norm else None

    def forward(self, x, cu_seqlens=None, max_seqlen=None):
        c, s = self.cfg, self.spec
        b, t, _ = x.shape
        d = s.head_dim
        q = self.q_proj(x).view(b, t, c.heads, d)
        k = self.k_proj(x).view(b, t, s.kv_heads, d)
        v = k if self.v_proj is None else self.v_proj(x).view(b, t, s.kv_heads, d)
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.v_norm is not None:
            v = self.v_norm(v)
        kw = dict(p=s.p, theta=s.theta, variant=c.variant, layout=c.layout,
                  softmax_scale=c.softmax_scale(s))
        # window and softcap only when used, so that Gemma 1 needs neither keyword
        if s.window:
            kw["window"] = (s.window - 1, 0)  # (left, right), flash-attn's convention
        if s.softcap:
            kw["softcap"] = s.softcap
        if (c.attn in backends.REGISTRY and q.dtype not in backends.get(c.attn).dtypes
                and torch.bfloat16 in backends.get(c.attn).dtypes):
            # the fused kernels take fp16/bf16: without autocast, attend in bf16 as autocast would
            out_dtype = q.dtype
            q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
        else:
            out_dtype = None
        if c.attn == UNFUSED:
            o = _unfused_attention(q, k, v, cu_seqlens, kw)
        elif cu_seqlens is None:
            o = prope_attention(q, k, v, causal=True, backend=c.attn, **kw)
        else:
            o = prope_attention_varlen(q.reshape(b * t, c.heads, d),
                                       k.reshape(b * t, s.kv_heads, d),
                                       v.reshape(b * t, s.kv_heads, d), cu_seqlens,
                                       max_seqlen, causal=True, backend=c.attn, **kw)
        if out_dtype is not None:
            o = o.to(out_dtype)
        return self.o_proj(o.reshape(b, t, c.heads * d))


def _unfused_attention(q, k, v, cu_seqlens, kw):
    """The unfused baseline users run today: rotate q and k, then SDPA (documents separated by a
    block-diagonal causal mask when rows are packed, a band for a sliding window)."""
    if kw.get("softcap"):
        raise ValueError("attn='unfused' cannot softcap attention logits (SDPA has no "
                         "softcap); use attn='auto' or a fused backend")
    b, t = q.shape[:2]
    if cu_seqlens is None:
        pos = torch.arange(t, device=q.device)
        mask = None
    else:
        pos = ref.varlen_positions(cu_seqlens, b * t).view(b, t)
        doc = torch.repeat_interleave(torch.arange(cu_seqlens.numel() - 1, device=q.device),
                                      (cu_seqlens[1:] - cu_seqlens[:-1]).long(),
                                      output_size=b * t).view(b, t)
        mask = (doc[:, :, None] == doc[:, None, :])[:, None]              # (b, 1, t, t)
    if mask is not None or "window" in kw:
        i = torch.arange(t, device=q.device)
        band = i[None, :] <= i[:, None]                                   # causal (t, t)
        if "window" in kw:
            band &= i[None, :] >= i[:, None] - kw["window"][0]
        mask = band if mask is None else mask & band
    rope = {n: kw[n] for n in ("p", "theta", "variant", "layout")}
    q = apply_prope(q, pos, backend="reference", **rope)
    k = apply_prope(k, pos, backend="reference", **rope)
    group = q.shape[2] // k.shape[2]
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
    if group > 1:
        kh, vh = kh.repeat_interleave(group, 1), vh.repeat_interleave(group, 1)
    o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, is_causal=mask is None,
                                       scale=kw["softmax_scale"])
    return o.transpose(1, 2)


class MLP(nn.Module):
    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden, cfg.mlp, bias=False)
        self.up_proj = nn.Linear(cfg.hidden, cfg.mlp, bias=False)
        self.down_proj = nn.Linear(cfg.mlp, cfg.hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class Block(nn.Module):
    """Gemma 1: x + attn(norm(x)), then x + mlp(norm(x)) (``post_attention_layernorm`` is the
    pre-MLP norm). Sandwich (Gemma 2+): x + norm(attn(norm(x))), x + norm(mlp(norm(x)))."""

    def __init__(self, cfg: GemmaConfig, spec: LayerAttn):
        super().__init__()
        norm = lambda: RMSNorm(cfg.hidden, cfg.rms_eps, cfg.norm_unit_offset)  # noqa: E731
        self.sandwich = cfg.sandwich_norm
        self.input_layernorm = norm()
        self.self_attn = Attention(cfg, spec)
        self.post_attention_layernorm = norm()
        if self.sandwich:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()
        self.mlp = MLP(cfg)

    def forward(self, x, cu_seqlens=None, max_seqlen=None):
        a = self.self_attn(self.input_layernorm(x), cu_seqlens, max_seqlen)
        if not self.sandwich:
            x = x + a
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.post_attention_layernorm(a)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma(nn.Module):
    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.cfg = cfg.validate()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.layers = nn.ModuleList(Block(cfg, cfg.layer_attn(i)) for i in range(cfg.layers))
        self.norm = RMSNorm(cfg.hidden, cfg.rms_eps, cfg.norm_unit_offset)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02):
        for m in self.modules():
            if isinstance(m, RMSNorm):
                m.reset_parameters()
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=std)

    def hidden_states(self, tokens, cu_seqlens=None, max_seqlen=None):
        x = self.embed_tokens(tokens)
        # Gemma scales embeddings by sqrt(hidden), rounded to the activation dtype
        x = x * torch.tensor(math.sqrt(self.cfg.hidden), dtype=x.dtype, device=x.device)
        for layer in self.layers:
            if self.cfg.activation_checkpointing and self.training:
                x = checkpoint(layer, x, cu_seqlens, max_seqlen, use_reentrant=False)
            else:
                x = layer(x, cu_seqlens, max_seqlen)
        return self.norm(x)

    def forward(self, tokens, cu_seqlens=None, max_seqlen=None, targets=None):
        """Logits (batch, seqlen, vocab), tied to the embedding (softcapped when
        ``final_softcap``); with ``targets`` the mean loss instead (:meth:`loss`: no full fp32
        logits). Going through forward keeps DDP/FSDP and torch.compile wrappers in the loop."""
        if targets is not None:
            return self.loss(tokens, targets, cu_seqlens, max_seqlen)
        logits = self.hidden_states(tokens, cu_seqlens, max_seqlen) @ self.embed_tokens.weight.t()
        return _softcap(logits, self.cfg.final_softcap)

    def loss(self, tokens, targets, cu_seqlens=None, max_seqlen=None, chunk: int = 2048):
        """Mean next-token cross-entropy over targets != -100."""
        h = self.hidden_states(tokens, cu_seqlens, max_seqlen)
        return chunked_cross_entropy(h.flatten(0, 1), self.embed_tokens.weight,
                                     targets.flatten(), chunk, self.cfg.final_softcap)


def _softcap(x, cap: float):
    return x if not cap else cap * torch.tanh(x / cap)


def _ce_chunk(h, weight, t, softcap):
    logits = _softcap((h @ weight.t()).float(), softcap)
    return F.cross_entropy(logits, t, ignore_index=-100, reduction="sum")


def chunked_cross_entropy(h, weight, targets, chunk: int = 2048, softcap: float = 0.0):
    """Cross-entropy of logits ``h @ weight.T`` (softcapped in fp32 when ``softcap``) computed
    ``chunk`` rows at a time; each chunk's fp32 logits are recomputed in backward instead of
    stored (a 256k vocabulary would otherwise need batch * seqlen * 256000 * 4 bytes).
    h: (n, hidden), weight: (vocab, hidden)."""
    total = h.new_zeros((), dtype=torch.float32)
    for s in range(0, h.shape[0], chunk):
        t = targets[s:s + chunk]
        if torch.is_grad_enabled():
            total = total + checkpoint(_ce_chunk, h[s:s + chunk], weight, t, softcap,
                                       use_reentrant=False)
        else:
            total = total + _ce_chunk(h[s:s + chunk], weight, t, softcap)
    count = (targets != -100).sum().clamp(min=1)
    return total / count


__all__ = ["ALIASES", "ATTN_BACKENDS", "Gemma", "GemmaConfig", "LayerAttn", "PRESETS", "preset",
           "chunked_cross_entropy", "RMSNorm"]
