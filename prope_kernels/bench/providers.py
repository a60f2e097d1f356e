"""Providers: our fused op per backend, and the peers a user would otherwise call.

Every provider turns (q, k, v) into ``out`` in the layout the case uses: dense
``(batch, seqlen, heads, head_dim)`` or packed ``(total_tokens, heads, head_dim)`` for varlen.
Peers get their p-RoPE from :mod:`prope_kernels.bench.user_rope` (eager, or the same function
compiled); "norope" rows skip it (the floor a fused op has to meet).

``build`` raises :class:`Unavailable` when a provider cannot run here (not installed, no GPU, no
such backend in this torch): the report lists it as missing with that reason, it is never faked.
Optional features (FlexAttention, cuDNN SDPA, flash-attn) are imported only inside ``build``.
"""

from __future__ import annotations

import fnmatch
import inspect
import os
from dataclasses import dataclass, field
from typing import Callable, List

import torch
import torch.nn.functional as F

from prope_kernels import backends
from prope_kernels import env as prope_env


class Unavailable(Exception):
    """The provider cannot run on this machine / torch build; str(e) says why."""


@dataclass(frozen=True)
class Provider:
    name: str     # stable id used on the command line, in JSON/CSV and by pytest-benchmark
    family: str   # "prope", "sdpa", "flex", "flash-attn", "fa3"
    backend: str  # prope: a name of prope_kernels.backends or "auto"; sdpa: cudnn/flash/
                  # efficient/math
    rope: str     # "fused" (ours), "none", "eager", "compiled"
    label: str    # what a person reads in the tables

    @property
    def kind(self) -> str:
        if self.family == "prope":
            return "ours"
        return "no-rope" if self.rope == "none" else "peer"


@dataclass
class Impl:
    fn: Callable          # fn(q, k, v) -> out
    notes: List[str] = field(default_factory=list)
    switches_set: dict = field(default_factory=dict)  # ours: the kernel switches it sets


_SDPA_LABEL = {"cudnn": "cuDNN SDPA", "flash": "FlashAttention-2 (SDPA flash)",
               "efficient": "SDPA memory-efficient", "math": "SDPA math"}
_ROPE_LABEL = {"none": ", no RoPE", "eager": " + RoPE eager", "compiled": " + RoPE compiled"}


def _all_providers():
    # ours: one provider per registered backend, and auto
    labels = {"reference": "prope_attention (reference, PyTorch)",
              "sdpa": "prope_attention (sdpa: PyTorch kernel + our rotation)"}
    out = [Provider(f"prope-{be}", "prope", be, "fused",
                    labels.get(be, f"prope_attention ({be})"))
           for be in backends.names() + ("auto",)]
    # the two Triton kernel sets of the triton backend, each forced (PROPE_TRITON_KERNELS)
    out += [Provider("prope-triton-hopper", "prope", "triton", "fused",
                     "prope_attention (triton, Hopper TMA kernels)"),
            Provider("prope-triton-portable", "prope", "triton", "fused",
                     "prope_attention (triton, portable kernels)"),
            # the CUDA backend's kernel families, each forced (PROPE_CUDA_SM90=1 / 0)
            Provider("prope-cuda-sm90", "prope", "cuda", "fused",
                     "prope_attention (cuda, SM90 wgmma/TMA kernels)"),
            Provider("prope-cuda-sm80", "prope", "cuda", "fused",
                     "prope_attention (cuda, SM80 mma.sync kernels)"),
            # the SM90 forward's first mainloop (PROPE_CUDA_SM90_FWD=basic; the default is
            # overlap+lpt), to compare
            Provider("prope-cuda-sm90-basic", "prope", "cuda", "fused",
                     "prope_attention (cuda, SM90 kernels, basic forward)"),
            # the SM90 split backward (deterministic mode's: dK/dV kernel + dQ kernel, 7 GEMMs),
            # to compare with the fused default (PROPE_CUDA_SM90_BWD=split)
            Provider("prope-cuda-sm90-split", "prope", "cuda", "fused",
                     "prope_attention (cuda, SM90 kernels, split backward)")]
    for be in ("cudnn", "flash", "efficient", "math"):
        for rope in ("none", "eager", "compiled"):
            suffix = "-norope" if rope == "none" else f"+rope-{rope}"
            out.append(Provider(f"sdpa-{be}{suffix}", "sdpa", be, rope,
                                _SDPA_LABEL[be] + _ROPE_LABEL[rope]))
    for fam, lab in (("flex", "FlexAttention (compiled)"), ("flash-attn", "flash-attn"),
                     ("fa3", "FlashAttention-3 (flash_attn_interface)")):
        for rope in ("none", "eager", "compiled"):
            suffix = "-norope" if rope == "none" else f"+rope-{rope}"
            out.append(Provider(f"{fam}{suffix}", fam, fam, rope, lab + _ROPE_LABEL[rope]))
    return {p.name: p for p in out}


PROVIDERS = _all_providers()
FLOOR = "sdpa-cudnn-norope"
# our backends that backend="auto" chooses between (the dispatch table is written from them)
OUR_BACKENDS = ["prope-triton", "prope-cuda", "prope-sdpa"]

# Every provider list of the suite lives here (see bench/README.md); names not runnable on a
# machine turn into "missing" rows.
PRESET_PROVIDERS = [  # in order of importance: a spent time budget cuts the tail
    "prope-triton", "prope-triton-portable", "prope-sdpa", "prope-auto", "prope-cuda",
    "prope-cuda-sm90", "prope-cuda-sm80", "prope-cuda-sm90-split", "prope-cuda-sm90-basic",
    "sdpa-cudnn-norope", "sdpa-cudnn+rope-compiled", "sdpa-flash+rope-compiled",
    "sdpa-cudnn+rope-eager", "sdpa-flash+rope-eager", "sdpa-flash-norope",
    "flex-norope", "flex+rope-compiled",
    "flash-attn-norope", "flash-attn+rope-compiled", "flash-attn+rope-eager",
    "fa3-norope", "fa3+rope-compiled",
    "sdpa-efficient-norope", "sdpa-efficient+rope-compiled", "sdpa-efficient+rope-eager",
]
SWEEP_PROVIDERS = [
    "prope-triton", "prope-sdpa", "prope-cuda", "sdpa-cudnn-norope", "sdpa-cudnn+rope-compiled",
    "sdpa-flash+rope-compiled", "flash-attn+rope-compiled", "fa3+rope-compiled",
]
P_SWEEP_PROVIDERS = ["prope-triton", "prope-sdpa", "prope-cuda", "sdpa-cudnn-norope",
                     "sdpa-cudnn+rope-compiled"]
VARLEN_PROVIDERS = [
    "prope-triton", "prope-sdpa", "prope-auto", "prope-cuda", "flex-norope", "flex+rope-compiled",
    "flash-attn-norope", "flash-attn+rope-compiled", "fa3+rope-compiled",
    "sdpa-efficient+rope-compiled", "sdpa-cudnn+rope-compiled",
]
# sliding window / softcap presets: the providers that can express them (SDPA cannot: no softcap,
# and a window only as an explicit (s x s) mask, which takes it off its fused kernels)
FEATURE_PROVIDERS = [
    "prope-triton", "prope-cuda", "flash-attn+rope-compiled", "fa3+rope-compiled",
    "flex+rope-compiled", "flash-attn-norope", "fa3-norope", "flex-norope",
    "sdpa-cudnn+rope-compiled",
]
SMOKE_PROVIDERS = [
    "prope-triton", "prope-sdpa", "prope-auto", "prope-reference", "prope-cuda",
    "sdpa-math-norope", "sdpa-math+rope-eager", "sdpa-flash+rope-eager",
    "sdpa-cudnn-norope", "sdpa-cudnn+rope-compiled", "sdpa-efficient+rope-eager",
    "flex+rope-compiled", "flash-attn+rope-eager",
]
SMOKE_SWEEP_PROVIDERS = ["prope-triton", "prope-sdpa", "prope-reference", "sdpa-math-norope",
                         "sdpa-math+rope-eager"]
SMOKE_VARLEN_PROVIDERS = ["prope-triton", "prope-sdpa", "prope-reference", "sdpa-math+rope-eager"]
SMOKE_P_PROVIDERS = ["prope-triton", "prope-sdpa", "prope-reference", "sdpa-math-norope"]
# the peers `.ci/gpu_check.sh quick` times (bench/gpu_summary.py): cuDNN and FlashAttention-2
# (SDPA's flash backend), each without RoPE (the floor) and with the user's p-RoPE compiled
QUICK_PEER_PROVIDERS = ["sdpa-cudnn-norope", "sdpa-cudnn+rope-compiled", "sdpa-flash-norope",
                        "sdpa-flash+rope-compiled"]
# pytest-benchmark (bench/conftest.py, bench/test_bench_kernels.py)
PYTEST_BENCH_PROVIDERS = ["prope-triton", "prope-sdpa", "prope-cuda", "sdpa-cudnn-norope",
                          "sdpa-cudnn+rope-compiled", "sdpa-flash+rope-compiled",
                          "flash-attn+rope-compiled"]
PYTEST_SMOKE_PROVIDERS = ["prope-reference", "prope-triton", "prope-sdpa", "sdpa-math+rope-eager"]


def select(patterns) -> List[str]:
    """Provider names matching comma-separated names or shell patterns ("prope-*,sdpa-cudnn*")."""
    if isinstance(patterns, str):
        patterns = [x.strip() for x in patterns.split(",") if x.strip()]
    names = []
    for pat in patterns:
        hits = [n for n in PROVIDERS if fnmatch.fnmatchcase(n, pat)]
        if not hits:
            raise ValueError(f"no provider matches {pat!r}; known: {', '.join(PROVIDERS)}")
        names += [n for n in hits if n not in names]
    return names


# ----------------------------------------------------------------------------------------------
# building a provider for a case
# ----------------------------------------------------------------------------------------------

def build(prov: Provider, case, ctx, q, k, v) -> Impl:
    """A callable for ``prov`` on ``case``. ``ctx`` holds the case's device tensors
    (positions, cu_seqlens, doc ids, cos/sin tables); q, k, v are sample inputs used to probe
    GQA support. Raises Unavailable."""
    dev = q.device
    if prov.family != "prope" and prov.rope == "compiled" and dev.type != "cuda":
        raise Unavailable("torch.compile providers are not run on the CPU (compile time; smoke "
                          "mode)")
    if prov.family == "prope":
        return _build_prope(prov, case, ctx, q, k, v)
    rope = _rope_fn(prov.rope, ctx)
    if prov.family == "sdpa":
        return _build_sdpa(prov, case, ctx, rope, q, k, v)
    if prov.family == "flex":
        return _build_flex(prov, case, ctx, rope, dev)
    if prov.family in ("flash-attn", "fa3"):
        return _build_flash_attn(prov, case, ctx, rope, dev)
    raise Unavailable(f"unknown provider family {prov.family}")  # pragma: no cover


def _rope_fn(kind, ctx):
    from . import user_rope
    if kind == "none":
        return None
    cos, sin = ctx["cos"], ctx["sin"]
    f = user_rope.rope_qk_eager if kind == "eager" else user_rope.rope_qk_compiled()
    return lambda q, k: f(q, k, cos, sin)


def _build_prope(prov, case, ctx, q, k_sample, v_sample):
    from prope_kernels import interface as api
    dev = q.device
    be = prov.backend
    notes = []
    # sliding window / softcap: passed only when the case uses them
    feat = {}
    if case.has_window:
        feat["window"] = tuple(case.window)
    if case.softcap:
        feat["softcap"] = case.softcap
    if be == "auto":
        dec = (api.explain(q, k_sample, v_sample, ctx["cu_seqlens"], case.seqlen, p=case.p,
                           theta=case.theta, causal=case.causal, **feat) if case.varlen else
               api.explain(q, k_sample, v_sample, p=case.p, theta=case.theta,
                           causal=case.causal, **feat))
        notes = [f"auto -> {dec.backend} ({dec.source})"
                 + (f", PyTorch kernel {dec.kernel}" if dec.kernel else "")]
        kw = dict(p=case.p, theta=case.theta, causal=case.causal, backend=be, **feat)
        if case.varlen:
            cu, max_s = ctx["cu_seqlens"], case.seqlen
            return _with_switches(
                prov, lambda q, k, v: api.prope_attention_varlen(q, k, v, cu, max_s, **kw), notes)
        return _with_switches(prov, lambda q, k, v: api.prope_attention(q, k, v, **kw), notes)
    entry = backends.get(be)
    missing = sorted(set(feat) - set(entry.features))
    if missing:
        raise Unavailable(f"backend={be!r} does not implement {' or '.join(missing)}")
    if not entry.runs_on(dev):
        raise Unavailable("needs a CUDA GPU" + (" (or TRITON_INTERPRET=1 on the CPU)"
                                                if entry.interpreter_cpu else ""))
    if entry.unavailable() is not None:
        raise Unavailable(f"backend={be!r} {entry.unavailable()}")
    if entry.interpreter_cpu and dev.type == "cuda" and prope_env.interpreting():
        raise Unavailable("TRITON_INTERPRET=1 is set on a GPU machine: unset it to time "
                          "the compiled kernels")
    if be == "sdpa":
        from prope_kernels.backends import sdpa
        ch = sdpa.choose(q, k_sample, len(ctx["cu_list"]) - 1, case.seqlen, case.causal)
        if ch.kernel is None:
            raise Unavailable(f"no PyTorch attention kernel for this shape: {ch.why}")
        notes = [f"PyTorch kernel: {ch.kernel}"] + list(ch.notes)
    if be == "reference" and dev.type == "cuda":
        need = 3 * 4 * case.q_heads * sum(n * n for n in (case.doc_lens or
                                                          [case.seqlen] * case.batch))
        if need > 16 * 2**30:
            raise Unavailable(f"the reference would materialise ~{need / 2**30:.0f} GiB of "
                              "scores at this shape")
    kw = dict(p=case.p, theta=case.theta, causal=case.causal, backend=be, **feat)
    if case.varlen:
        cu, max_s = ctx["cu_seqlens"], case.seqlen
        call = lambda q, k, v: api.prope_attention_varlen(q, k, v, cu, max_s, **kw)  # noqa: E731
    else:
        call = lambda q, k, v: api.prope_attention(q, k, v, **kw)  # noqa: E731
    if be == "cuda":
        return _cuda_kernel_family(prov, call, dev, notes)
    if be != "triton":
        return _with_switches(prov, call, notes)
    return _triton_kernel_set(prov, call, dev, notes, bool(case.has_window or case.softcap))


# The kernel switches as the user set them when the benchmark started, and the ones each
# forcing provider sets over them. Every prope provider sets all of them at each call (a
# backward sees the setting of the forward's provider): reading os.environ when a later provider
# is built would pick up what an earlier one left behind (that made every CUDA provider of one
# run time the same kernels). What really ran is read back from the backend after each call
# (prope_kernels.backends.launched: the row's `switches`).
SWITCHES = (prope_env.TRITON_KERNELS, "PROPE_CUDA_SM90", "PROPE_CUDA_SM90_FWD",
            "PROPE_CUDA_SM90_BWD")
_USER_ENV = {var: os.environ.get(var) for var in SWITCHES}
FORCED = {
    "prope-triton-hopper": {prope_env.TRITON_KERNELS: "hopper"},
    "prope-triton-portable": {prope_env.TRITON_KERNELS: "portable"},
    "prope-cuda-sm90": {"PROPE_CUDA_SM90": "1"},
    "prope-cuda-sm80": {"PROPE_CUDA_SM90": "0"},
    "prope-cuda-sm90-basic": {"PROPE_CUDA_SM90": "1", "PROPE_CUDA_SM90_FWD": "basic"},
    "prope-cuda-sm90-split": {"PROPE_CUDA_SM90": "1", "PROPE_CUDA_SM90_BWD": "split"},
}


def switches_set(name: str) -> dict:
    """The kernel switches provider ``name`` runs with: {var: value} of those set (the user's,
    then its own forced ones); {} = the package's defaults."""
    want = {**_USER_ENV, **FORCED.get(name, {})}
    return {var: val for var, val in want.items() if val is not None}


def _with_switches(prov, call, notes) -> Impl:
    want = switches_set(prov.name)

    def fn(q, k, v):
        for var in SWITCHES:
            if var in want:
                os.environ[var] = want[var]
            else:
                os.environ.pop(var, None)
        return call(q, k, v)
    return Impl(fn, list(notes), want)


def _triton_kernel_set(prov, call, dev, notes, features):
    """prope-triton: the kernels the backend picks (the user's PROPE_TRITON_KERNELS, default
    portable); prope-triton-hopper / -portable: that kernel set forced."""
    from prope_kernels.backends.triton import hopper
    if switches_set(prov.name).get(prope_env.TRITON_KERNELS) == "hopper":
        if features:
            raise Unavailable("the Hopper kernels have no sliding window or softcap yet (the "
                              "triton backend runs such calls on its portable kernels)")
        if dev.type != "cuda":
            raise Unavailable("the Hopper kernels are timed on an sm_90 GPU only")
        cap = torch.cuda.get_device_capability(dev)
        if cap != (9, 0) or not hopper.triton_supports():
            raise Unavailable(f"needs an sm_90 GPU and a Triton with tensor descriptors (have "
                              f"sm_{cap[0]}{cap[1]}, Triton {__import__('triton').__version__})")
    return _with_switches(prov, call, notes)


def _cuda_kernel_family(prov, call, dev, notes):
    """prope-cuda: the kernels the backend picks (SM90 on sm_90 where built, unless the user set
    PROPE_CUDA_SM90); prope-cuda-sm90 / -sm80: that family forced (with the user's variants);
    prope-cuda-sm90-basic: the SM90 kernels with the first forward mainloop;
    prope-cuda-sm90-split: the SM90 kernels with the split (deterministic) backward (FORCED)."""
    if switches_set(prov.name).get("PROPE_CUDA_SM90") == "1":
        if dev.type != "cuda" or torch.cuda.get_device_capability(dev) != (9, 0):
            raise Unavailable("the SM90 kernels run on an sm_90 GPU (H100/H200) only")
    return _with_switches(prov, call, notes)


def _sdpa_backend(name):
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError as e:  # torch < 2.3
        raise Unavailable(f"torch.nn.attention.sdpa_kernel is missing in torch "
                          f"{torch.__version__}") from e
    attr = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION",
            "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}[name]
    if not hasattr(SDPBackend, attr):
        raise Unavailable(f"this torch ({torch.__version__}) has no SDPBackend.{attr}")
    return sdpa_kernel, getattr(SDPBackend, attr)


def _has_enable_gqa():
    try:
        return "enable_gqa" in inspect.signature(F.scaled_dot_product_attention).parameters
    except (TypeError, ValueError):  # builtins without a signature: try it
        return True


def _probe(fn, q, k, v):
    """One forward+backward on the sample inputs: does this path work at all?"""
    qs, ks, vs = (x.detach().requires_grad_(True) for x in (q, k, v))
    out = fn(qs, ks, vs)
    out.backward(torch.ones_like(out))


def _build_sdpa(prov, case, ctx, rope, q, k, v):
    if case.softcap:
        raise Unavailable("SDPA has no logit softcap")
    if case.has_window:
        raise Unavailable("SDPA takes a sliding window only as an explicit (s x s) mask, which "
                          "falls off its fused kernels; not timed")
    sdpa_kernel, backend = _sdpa_backend(prov.backend)
    dev = q.device
    if prov.backend in ("cudnn", "efficient") and dev.type != "cuda":
        raise Unavailable("needs a CUDA GPU")
    scale = case.head_dim ** -0.5
    group = case.q_heads // case.kv_heads
    notes = []
    mask = None
    if case.varlen:
        # what users do without a varlen API: one row, a dense block-diagonal mask (T x T)
        doc, pos = ctx["doc_ids"], ctx["positions"]
        mask = doc[:, None] == doc[None, :]
        if case.causal:
            mask &= pos[None, :] <= pos[:, None]
        mask = mask[None, None]
        notes.append("varlen: dense block-diagonal mask")

    def make(gqa):
        def fn(q, k, v):
            if rope is not None:
                q, k = rope(q, k)
            if case.varlen:
                q, k, v = q[None], k[None], v[None]
            qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            kw = {}
            if group > 1 and gqa == "enable_gqa":
                kw["enable_gqa"] = True
            elif group > 1:
                kt = kt.repeat_interleave(group, dim=1)
                vt = vt.repeat_interleave(group, dim=1)
            with sdpa_kernel(backend):
                o = F.scaled_dot_product_attention(
                    qt, kt, vt, attn_mask=mask, is_causal=case.causal and mask is None,
                    scale=scale, **kw)
            o = o.transpose(1, 2)
            return o[0] if case.varlen else o
        return fn

    if group == 1:
        return Impl(make(None), notes)
    first_err = None
    if _has_enable_gqa():
        fn = make("enable_gqa")
        try:
            _probe(fn, q, k, v)
            return Impl(fn, notes + ["GQA: enable_gqa=True"])
        except Exception as e:  # noqa: BLE001 - any backend refusal means "try expanding"
            first_err = _short(e)
    fn = make("expand")
    _probe(fn, q, k, v)  # raises with the real reason when this path fails too
    why = f" (enable_gqa failed: {first_err})" if first_err else ""
    return Impl(fn, notes + ["GQA: k/v expanded with repeat_interleave" + why])


_FLEX = {}


def _build_flex(prov, case, ctx, rope, dev):
    if dev.type != "cuda":
        raise Unavailable("FlexAttention is run compiled, on a CUDA GPU only")
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as e:
        raise Unavailable(f"torch {torch.__version__} has no FlexAttention") from e
    if "fn" not in _FLEX:
        from . import user_rope
        user_rope.rope_qk_compiled()  # raises the recompile limits as a side effect
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    flex = _FLEX["fn"]
    scale = case.head_dim ** -0.5
    group = case.q_heads // case.kv_heads
    n = case.total_tokens if case.varlen else case.seqlen
    if case.has_window and case.varlen:
        raise Unavailable("window with varlen: not wired for FlexAttention here")
    if case.has_window:
        left, right = case.window
        if case.causal:
            right = 0 if right < 0 else min(right, 0)

        def mask_mod(b, h, qi, ki):
            keep = ki >= 0
            if left >= 0:
                keep = keep & (qi - ki <= left)
            if right >= 0:
                keep = keep & (ki - qi <= right)
            return keep
        block_mask = create_block_mask(mask_mod, None, None, n, n, device=dev)
    elif case.varlen:
        doc, pos = ctx["doc_ids"], ctx["positions"]
        if case.causal:
            def mask_mod(b, h, qi, ki):
                return (doc[qi] == doc[ki]) & (pos[ki] <= pos[qi])
        else:
            def mask_mod(b, h, qi, ki):
                return doc[qi] == doc[ki]
        block_mask = create_block_mask(mask_mod, None, None, n, n, device=dev)
    elif case.causal:
        def mask_mod(b, h, qi, ki):
            return ki <= qi
        block_mask = create_block_mask(mask_mod, None, None, n, n, device=dev)
    else:
        block_mask = None
    kw, notes = {}, []
    if case.softcap:
        cap = float(case.softcap)

        def score_mod(score, b, h, qi, ki):  # score: q.k * scale, as Gemma 2 caps it
            return torch.tanh(score / cap) * cap
        kw["score_mod"] = score_mod
        notes.append("softcap: score_mod")
    expand = False
    if group > 1:
        if "enable_gqa" in inspect.signature(flex_attention).parameters:
            kw["enable_gqa"] = True
            notes.append("GQA: enable_gqa=True")
        else:
            expand = True
            notes.append("GQA: k/v expanded with repeat_interleave (no enable_gqa)")

    def fn(q, k, v):
        if rope is not None:
            q, k = rope(q, k)
        if case.varlen:
            q, k, v = q[None], k[None], v[None]
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if expand:
            kt = kt.repeat_interleave(group, dim=1)
            vt = vt.repeat_interleave(group, dim=1)
        o = flex(qt, kt, vt, block_mask=block_mask, scale=scale, **kw)
        o = o.transpose(1, 2)
        return o[0] if case.varlen else o
    if block_mask is not None:
        notes.append("block mask built outside the timed call")
    return Impl(fn, notes)


def _build_flash_attn(prov, case, ctx, rope, dev):
    if prov.family == "fa3":
        try:
            import flash_attn_interface as fa
        except ImportError as e:
            raise Unavailable("FlashAttention-3 (flash_attn_interface, hopper build) is not "
                              "installed") from e
    else:
        try:
            import flash_attn as fa
        except ImportError as e:
            raise Unavailable("flash-attn is not installed (pip install flash-attn)") from e
    if dev.type != "cuda":
        raise Unavailable("needs a CUDA GPU")
    scale = case.head_dim ** -0.5
    notes = [f"{prov.family} {getattr(fa, '__version__', '')}".strip()]
    feat = {}  # only when used: older flash-attn versions lack the keywords
    if case.has_window:
        feat["window_size"] = tuple(case.window)
    if case.softcap:
        feat["softcap"] = float(case.softcap)

    def first(o):
        return o[0] if isinstance(o, tuple) else o  # some versions return (out, lse)

    if case.varlen:
        cu, max_s = ctx["cu_seqlens"], case.seqlen

        def attn(q, k, v):
            return first(fa.flash_attn_varlen_func(q, k, v, cu, cu, max_s, max_s,
                                                   softmax_scale=scale, causal=case.causal,
                                                   **feat))
    else:
        def attn(q, k, v):
            return first(fa.flash_attn_func(q, k, v, softmax_scale=scale, causal=case.causal,
                                            **feat))

    def fn(q, k, v):
        if rope is not None:
            q, k = rope(q, k)
        return attn(q, k, v)
    return Impl(fn, notes)


def _short(e: BaseException, n: int = 160) -> str:
    msg = " ".join(str(e).split())
    msg = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
    return msg if len(msg) <= n else msg[: n - 3] + "..."
