"""What gets timed: one :class:`Case` per attention shape, named presets and sweeps. Dense:
``(batch, seqlen, heads, head_dim)``; varlen: ``(total_tokens, heads, head_dim)``, batch 1,
``seqlen`` the longest document."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, replace
from typing import Optional

from prope_kernels.reference import attention_flops

MODES = ("fwd", "bwd", "fwd_bwd")
MODE_LABELS = {"fwd": "fwd", "bwd": "bwd", "fwd_bwd": "fwd+bwd"}
SHORT_DTYPE = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


@dataclass(frozen=True)
class Case:
    """One attention problem; ``group``: its report section ("preset" or a sweep's name).
    ``window``: flash-attn convention, -1 unbounded; ``softcap``: 0 off."""
    name: str
    group: str
    batch: int
    seqlen: int
    q_heads: int
    kv_heads: int
    head_dim: int
    causal: bool = True
    p: float = 0.75
    theta: float = 10000.0
    dtype: str = "bfloat16"
    doc_lens: Optional[tuple] = None  # varlen: the packed documents' lengths
    window: tuple = (-1, -1)
    softcap: float = 0.0

    @property
    def has_window(self) -> bool:
        return self.window[0] >= 0 or (self.window[1] >= 0 and not self.causal)

    @property
    def varlen(self) -> bool:
        return self.doc_lens is not None

    @property
    def total_tokens(self) -> int:
        return sum(self.doc_lens) if self.varlen else self.batch * self.seqlen

    @property
    def attn_kind(self) -> str:
        if self.kv_heads == self.q_heads:
            return "MHA"
        return "MQA" if self.kv_heads == 1 else "GQA"

    def flops(self, mode: str) -> float:
        """The standard count (reference.attention_flops); varlen: the sum over documents."""
        return sum(attention_flops(b, n, self.q_heads, self.head_dim, self.causal, mode,
                                   self.window)
                   for b, n in ([(1, n) for n in self.doc_lens] if self.varlen
                                else [(self.batch, self.seqlen)]))

    def describe(self) -> str:
        heads = (f"{self.q_heads} heads" if self.attn_kind == "MHA"
                 else f"{self.q_heads} q heads, {self.kv_heads} kv head"
                 + ("s" if self.kv_heads > 1 else "") + f" ({self.attn_kind})")
        if self.varlen:
            shape = (f"varlen {len(self.doc_lens)} docs, {self.total_tokens} tokens, "
                     f"longest {self.seqlen}")
        else:
            shape = f"batch {self.batch}, seqlen {self.seqlen}"
        theta = "" if self.theta == 10000.0 else f", theta {self.theta:g}"
        feats = (f", window {tuple(self.window)}" if self.has_window else "") + (
            f", softcap {self.softcap:g}" if self.softcap else "")
        return (f"{shape}, {heads}, head_dim {self.head_dim}, "
                f"{'causal' if self.causal else 'non-causal'}, "
                f"{SHORT_DTYPE.get(self.dtype, self.dtype)}, p={self.p:g}{theta}{feats}")

    def as_dict(self) -> dict:
        d = asdict(self)
        d["doc_lens"] = list(self.doc_lens) if self.varlen else None
        d["window"] = list(self.window)
        d.update(total_tokens=self.total_tokens, attn_kind=self.attn_kind, varlen=self.varlen,
                 num_docs=len(self.doc_lens) if self.varlen else self.batch)
        return d


def from_dict(d) -> Case:
    """A Case from its as_dict() (a run's settings), extra keys ignored."""
    fields = {f: d[f] for f in Case.__dataclass_fields__ if f in d}
    for f in ("doc_lens", "window"):
        if fields.get(f) is not None:
            fields[f] = tuple(fields[f])
    return Case(**fields)


def uneven_doc_lens(total: int, seed: int = 0, min_len: int = 64, max_len: Optional[int] = None):
    """Lengths summing to ``total``, log-uniform (many short documents, a few long ones, as in
    packed pre-training data); deterministic for a seed."""
    rng = random.Random(seed)
    max_len = max_len or max(min_len, total // 2)
    lens, left = [], total
    while left > 0:
        n = int(round(min_len * (max_len / min_len) ** rng.random()))
        n = max(1, min(n, left))
        lens.append(n)
        left -= n
    return tuple(lens)


def varlen_case(name, group, total, q_heads, kv_heads, head_dim, *, seed=0, min_len=64,
                max_len=None, **kw) -> Case:
    lens = uneven_doc_lens(total, seed, min_len, max_len)
    return Case(name, group, 1, max(lens), q_heads, kv_heads, head_dim, doc_lens=lens, **kw)


# presets: published model shapes (Gemma, Llama-style GQA, MHA at head_dim 64)

PRESETS = {
    "gemma-2b": Case("gemma-2b", "preset", 2, 8192, 8, 1, 256),
    "llama-gqa": Case("llama-gqa", "preset", 4, 4096, 32, 8, 128),
    "mha-d64": Case("mha-d64", "preset", 4, 4096, 32, 32, 64),
    "gemma-7b": Case("gemma-7b", "preset", 1, 8192, 16, 16, 256),
    "gemma4-global": Case("gemma4-global", "preset", 1, 8192, 16, 4, 512, p=0.25, theta=1e6),
    # Gemma 2B attention over packed documents of uneven length (16k tokens per row)
    "gemma-2b-varlen": varlen_case("gemma-2b-varlen", "preset", 16384, 8, 1, 256, seed=1,
                                   min_len=128, max_len=8192),
    # the gemma-2b shape with Gemma 2's local-layer sliding window (transformers'
    # sliding_window=4096: key j visible iff i - j < 4096) and with its logit softcap; the
    # feature bars compare them with gemma-2b (same backend)
    "gemma-2b-window": Case("gemma-2b-window", "preset", 2, 8192, 8, 1, 256, window=(4095, 0)),
    "gemma-2b-softcap": Case("gemma-2b-softcap", "preset", 2, 8192, 8, 1, 256, softcap=50.0),
}
PRESET_ORDER = ["gemma-2b", "llama-gqa", "mha-d64", "gemma-7b", "gemma4-global",
                "gemma-2b-varlen", "gemma-2b-window", "gemma-2b-softcap"]
FEATURE_PRESETS = ["gemma-2b-window", "gemma-2b-softcap"]

# tiny shapes for the CPU smoke run (reference backend, Triton interpreter)
SMOKE_PRESETS = {
    "smoke-mqa": Case("smoke-mqa", "preset", 2, 24, 2, 1, 32),
    "smoke-gqa-noncausal": Case("smoke-gqa-noncausal", "preset", 1, 20, 4, 2, 16, causal=False),
    "smoke-window-softcap": Case("smoke-window-softcap", "preset", 1, 40, 2, 1, 16,
                                 window=(7, 0), softcap=5.0),
}

P_VALUES = (0.0, 0.25, 0.75, 1.0)


SWEEPS = ("seqlen", "head_dim", "causal", "heads", "p", "varlen")


def sweep_causal(base: Case):
    return [replace(base, name=f"{base.name}-{'causal' if c else 'noncausal'}", group="causal",
                    causal=c) for c in (True, False)]


def sweep_p(base: Case, p_values=P_VALUES):
    """The cost of the identity: one shape, only p changes."""
    return [replace(base, name=f"p-{p:g}", group="p", p=p) for p in p_values]


def build_sweep(name: str, dtype: str = "bfloat16", seqlens=None, head_dims=None,
                p_values=P_VALUES, smoke: bool = False):
    """The cases of one sweep (``smoke``: a few dozen tokens). seqlen: constant tokens per call,
    llama-gqa's heads; head_dim: hidden 4096, MHA; heads: MHA, GQA, MQA at one shape."""
    base = SMOKE_PRESETS["smoke-mqa"] if smoke else PRESETS["llama-gqa"]
    if name == "seqlen":  # (tokens, q heads, kv heads, head_dim)
        tok, hq, hkv, d = (32, 2, 1, 16) if smoke else (32768, 32, 8, 128)
        return [Case(f"seqlen-{s}", "seqlen", max(1, tok // s), s, hq, hkv, d, dtype=dtype)
                for s in seqlens or ((16, 32) if smoke else (512, 1024, 2048, 4096, 8192, 16384,
                                                            32768))]
    if name == "head_dim":  # (seqlen, batch, hidden)
        s, b, hidden = (32, 1, 128) if smoke else (4096, 4, 4096)
        return [Case(f"head_dim-{d}", "head_dim", b, s, hidden // d, hidden // d, d, dtype=dtype)
                for d in head_dims or ((32, 64) if smoke else (64, 128, 256))]
    if name == "causal":
        return sweep_causal(replace(base, dtype=dtype))
    if name == "heads":  # (seqlen, batch, q heads, head_dim)
        s, b, hq, d = (32, 1, 4, 32) if smoke else (4096, 4, 32, 128)
        gqa = hq // 4 if hq >= 8 else max(1, hq // 2)
        return [Case(f"heads-{kind}", "heads", b, s, hq, hkv, d, dtype=dtype)
                for kind, hkv in (("mha", hq), ("gqa", gqa), ("mqa", 1))]
    if name == "p":
        return sweep_p(replace(base, batch=1, seqlen=16, q_heads=1, dtype=dtype) if smoke
                       else replace(PRESETS["gemma-2b"], dtype=dtype), p_values)
    if name == "varlen":
        if smoke:
            return [Case("varlen-smoke", "varlen", 1, 13, 2, 1, 16, doc_lens=(5, 13, 9),
                         dtype=dtype)]
        return [varlen_case("varlen-16384", "varlen", 16384, 32, 8, 128, seed=2, min_len=128,
                            max_len=8192, dtype=dtype)]
    raise ValueError(f"unknown sweep {name!r}")


# the banner a smoke run's report and plots carry (its numbers are not GPU figures)
SMOKE_BANNER = ("CPU SMOKE RUN: tiny shapes on a CPU (reference backend, Triton interpreter). "
                "It checks that the suite works end to end; its numbers are not GPU figures and "
                "say nothing about speed.")
GPU_SMOKE_BANNER = ("GPU SMOKE RUN: tiny shapes; launch overhead dominates. Not the standard "
                    "report: run `prope-bench` without --smoke for figures.")


def banner(meta):
    return {"cpu-smoke": SMOKE_BANNER, "gpu-smoke": GPU_SMOKE_BANNER}.get(meta["run_kind"])
