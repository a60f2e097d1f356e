"""Gemma (v1 architecture, as published in gemma_pytorch / transformers ``GemmaConfig``) with a
switchable position encoding (NoPE, RoPE, p-RoPE and its variants) and attention backend.

Shapes: tokens (batch, seqlen); hidden states (batch, seqlen, hidden); attention q/k/v in the
package layout (batch, seqlen, heads, head_dim), or packed (batch*seqlen, heads, head_dim) with
``cu_seqlens`` when rows hold several documents (each attends only to itself, positions restart).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace


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
PE_KINDS = ("nope", "rope", "prope")


@dataclass
class GemmaConfig:
    vocab_size: int = 256000
    hidden: int = 2048
    layers: int = 18
    heads: int = 8
    kv_heads: int = 1
    head_dim: int = 256
    mlp: int = 16384
    rms_eps: float = 1e-6
    # position encoding: "nope", "rope" (p = 1) or "prope" (p below)
    pe: str = "prope"
    p: float = 0.75
    theta: float = 10000.0
    variant: str = "prope"
    layout: str = "half"
    # attention: "auto", a backend name of prope_kernels.backends, or "unfused" (RoPE, then SDPA)
    attn: str = "auto"
    activation_checkpointing: bool = False

    @property
    def rope_fraction(self) -> float:
        return {"nope": 0.0, "rope": 1.0}.get(self.pe, self.p)

    def validate(self) -> "GemmaConfig":
        if self.pe not in PE_KINDS:
            raise ValueError(f"pe must be one of {PE_KINDS}, got {self.pe!r}")
        if self.attn not in ATTN_BACKENDS:
            raise ValueError(f"attn must be one of {ATTN_BACKENDS}, got {self.attn!r}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads "
                             f"({self.kv_heads})")
        PRoPESpec(self.head_dim, self.p, self.theta, self.variant, self.layout)  # validates
        return self

    def num_params(self) -> int:
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        mlp = 3 * self.hidden * self.mlp
        return self.vocab_size * self.hidden + self.layers * (attn + mlp + 2 * self.hidden) \
            + self.hidden

    def flops_per_token(self, seqlen: int) -> float:
        """Training FLOPs per token: 6 * params (matmuls, fwd+bwd) + causal attention."""
        dense = 6 * (self.num_params() - self.vocab_size * self.hidden) \
            + 6 * self.vocab_size * self.hidden
        attn = 6 * self.layers * self.heads * self.head_dim * seqlen  # 12*L*H*D*T/2 causal
        return float(dense + attn)

    def to_dict(self):
        return asdict(self)


PRESETS = {
    # the published shapes
    "gemma-2b": GemmaConfig(),
    "gemma-7b": GemmaConfig(hidden=3072, layers=28, heads=16, kv_heads=16, head_dim=256,
                            mlp=24576),
    # same shape rules, small enough for a CPU (vocab set by the tokenizer)
    "gemma-small": GemmaConfig(vocab_size=4096, hidden=256, layers=4, heads=4, kv_heads=1,
                               head_dim=64, mlp=1024),
    "gemma-tiny": GemmaConfig(vocab_size=512, hidden=64, layers=2, heads=2, kv_heads=1,
                              head_dim=32, mlp=128),
}


def preset(name: str, **overrides) -> GemmaConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides).validate()


class RMSNorm(nn.Module):
    """Gemma RMSNorm: computed in fp32, scaled by (1 + weight)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.cfg = cfg
        self.q_proj = nn.Linear(cfg.hidden, cfg.heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden, cfg.kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden, cfg.kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.heads * cfg.head_dim, cfg.hidden, bias=False)

    def forward(self, x, cu_seqlens=None, max_seqlen=None):
        c = self.cfg
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, c.heads, c.head_dim)
        k = self.k_proj(x).view(b, t, c.kv_heads, c.head_dim)
        v = self.v_proj(x).view(b, t, c.kv_heads, c.head_dim)
        rope = dict(p=c.rope_fraction, theta=c.theta, variant=c.variant, layout=c.layout)
        if (c.attn in backends.REGISTRY and q.dtype not in backends.get(c.attn).dtypes
                and torch.bfloat16 in backends.get(c.attn).dtypes):
            # the fused kernels take fp16/bf16: without autocast, attend in bf16 as autocast would
            out_dtype = q.dtype
            q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
        else:
            out_dtype = None
        if c.attn == UNFUSED:
            o = _unfused_attention(q, k, v, cu_seqlens, rope)
        elif cu_seqlens is None:
            o = prope_attention(q, k, v, causal=True, backend=c.attn, **rope)
        else:
            o = prope_attention_varlen(q.view(b * t, c.heads, c.head_dim),
                                       k.view(b * t, c.kv_heads, c.head_dim),
                                       v.view(b * t, c.kv_heads, c.head_dim), cu_seqlens,
                                       max_seqlen, causal=True, backend=c.attn, **rope)
        if out_dtype is not None:
            o = o.to(out_dtype)
        return self.o_proj(o.reshape(b, t, c.heads * c.head_dim))


def _unfused_attention(q, k, v, cu_seqlens, rope):
    """The unfused baseline users run today: rotate q and k, then SDPA (documents separated by a
    block-diagonal causal mask when rows are packed)."""
    b, t = q.shape[:2]
    if cu_seqlens is None:
        pos = torch.arange(t, device=q.device)
        mask = None
    else:
        pos = ref.varlen_positions(cu_seqlens, b * t).view(b, t)
        doc = torch.repeat_interleave(torch.arange(cu_seqlens.numel() - 1, device=q.device),
                                      (cu_seqlens[1:] - cu_seqlens[:-1]).long(),
                                      output_size=b * t).view(b, t)
        causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
        mask = (doc[:, :, None] == doc[:, None, :]) & causal              # (b, t, t)
        mask = mask[:, None]
    q = apply_prope(q, pos, backend="reference", **rope)
    k = apply_prope(k, pos, backend="reference", **rope)
    group = q.shape[2] // k.shape[2]
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
    if group > 1:
        kh, vh = kh.repeat_interleave(group, 1), vh.repeat_interleave(group, 1)
    o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, is_causal=mask is None)
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
    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden, cfg.rms_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden, cfg.rms_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cu_seqlens=None, max_seqlen=None):
        x = x + self.self_attn(self.input_layernorm(x), cu_seqlens, max_seqlen)
        return x + self.mlp(self.post_attention_layernorm(x))


class Gemma(nn.Module):
    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.cfg = cfg.validate()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.hidden, cfg.rms_eps)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02):
        for name, p in self.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=std)
            else:
                nn.init.zeros_(p)  # RMSNorm: (1 + 0) = identity scale

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
        """Logits (batch, seqlen, vocab), tied to the embedding; with ``targets`` the mean loss
        instead (:meth:`loss`: no full fp32 logits). Going through forward keeps DDP and
        torch.compile wrappers in the loop."""
        if targets is not None:
            return self.loss(tokens, targets, cu_seqlens, max_seqlen)
        return self.hidden_states(tokens, cu_seqlens, max_seqlen) @ self.embed_tokens.weight.t()

    def loss(self, tokens, targets, cu_seqlens=None, max_seqlen=None, chunk: int = 2048):
        """Mean next-token cross-entropy over targets != -100."""
        h = self.hidden_states(tokens, cu_seqlens, max_seqlen)
        return chunked_cross_entropy(h.flatten(0, 1), self.embed_tokens.weight,
                                     targets.flatten(), chunk)


def _ce_chunk(h, weight, t):
    return F.cross_entropy((h @ weight.t()).float(), t, ignore_index=-100, reduction="sum")


def chunked_cross_entropy(h, weight, targets, chunk: int = 2048):
    """Cross-entropy of logits ``h @ weight.T`` computed ``chunk`` rows at a time; each chunk's
    fp32 logits are recomputed in backward instead of stored (a 256k vocabulary would otherwise
    need batch * seqlen * 256000 * 4 bytes). h: (n, hidden), weight: (vocab, hidden)."""
    total = h.new_zeros((), dtype=torch.float32)
    for s in range(0, h.shape[0], chunk):
        t = targets[s:s + chunk]
        if torch.is_grad_enabled():
            total = total + checkpoint(_ce_chunk, h[s:s + chunk], weight, t, use_reentrant=False)
        else:
            total = total + _ce_chunk(h[s:s + chunk], weight, t)
    count = (targets != -100).sum().clamp(min=1)
    return total / count




__all__ = ["Gemma", "GemmaConfig", "PRESETS", "preset", "chunked_cross_entropy", "RMSNorm"]
