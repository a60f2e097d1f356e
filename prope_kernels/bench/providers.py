"""Providers: our fused op per backend and the peers a user would otherwise call, as one table.

Each maps (q, k, v) to ``out`` in the case's layout: ``(batch, seqlen, heads, head_dim)``, or
``(total_tokens, heads, head_dim)`` for varlen. Peers rotate q and k first as users do (eager or
compiled); "norope" rows skip it. ``build`` raises :class:`Unavailable` with the reason when a
provider cannot run here (reported missing); optional peers are imported inside ``build`` only.
"""

from __future__ import annotations

import fnmatch
import importlib
import inspect
import os
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable, List

import torch
import torch.nn.functional as F

from prope_kernels import backends
from prope_kernels import env as prope_env
from prope_kernels.rotary import rotated_pairs

TK = prope_env.TRITON_KERNELS  # "PROPE_TRITON_KERNELS"


def triton_module(sub: str):
    """A module of the triton backend's package (hopper, tuning), found through the registry."""
    return importlib.import_module(backends.get("triton").module.rpartition(".")[0] + "." + sub)


class Unavailable(Exception):
    """The provider cannot run on this machine / torch build / case; str(e) says why."""


@dataclass(frozen=True)
class Provider:
    name: str       # stable id: command line, JSON/CSV, pytest-benchmark
    family: str     # "prope", "sdpa", "flex", "flash-attn", "fa3"
    backend: str    # prope: a registry name or "auto"; sdpa: cudnn/flash/efficient/math
    rope: str       # "fused" (ours), "none", "eager", "compiled"
    label: str      # what a person reads in the tables
    forced: tuple = ()   # ours: kernel switches it forces, ((var, value), ...)
    sets: str = ""       # the default lists that take it (see SETS)

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


# The default lists, one letter each in a row's ``sets``: a case takes, in table order (the order
# of importance: a spent time budget cuts the tail), the rows of its list that can run its
# features (``lacks``): so a backend that gains window/softcap in the registry joins those presets.
SETS = {"P": "presets", "S": "sweeps", "p": "p sweep", "V": "varlen cases",
        "s": "smoke presets", "w": "smoke sweeps", "q": "smoke p sweep", "v": "smoke varlen",
        "Q": ".ci/gpu_check.sh quick's peers", "B": "pytest-benchmark", "b": "pytest smoke"}
_SDPA = {"cudnn": "cuDNN SDPA", "flash": "FlashAttention-2 (SDPA flash)",
         "efficient": "SDPA memory-efficient", "math": "SDPA math"}
_PEER = {"flex": "FlexAttention (compiled)", "flash-attn": "flash-attn",
         "fa3": "FlashAttention-3 (flash_attn_interface)"}
_ROPE = {"none": ", no RoPE", "eager": " + RoPE eager", "compiled": " + RoPE compiled"}
_SM90 = ("PROPE_CUDA_SM90", "1")
# ours: name, backend, label in parentheses after "prope_attention", forced switches, sets
_OURS = [
    ("prope-triton", "triton", "triton", (), "PSpVswqvBb"),
    ("prope-triton-portable", "triton", "triton, portable kernels", ((TK, "portable"),), "P"),
    ("prope-sdpa", "sdpa", "sdpa: PyTorch kernel + our rotation", (), "PSpVswqvBb"),
    ("prope-auto", "auto", "auto", (), "PVs"),
    ("prope-cuda", "cuda", "cuda", (), "PSpVsB"),
    ("prope-cuda-sm90", "cuda", "cuda, SM90 wgmma/TMA kernels", (_SM90,), "P"),
    ("prope-cuda-sm80", "cuda", "cuda, SM80 mma.sync kernels", (("PROPE_CUDA_SM90", "0"),), "P"),
    # the SM90 split backward (deterministic mode's: dK/dV kernel + dQ kernel) vs the fused one
    ("prope-cuda-sm90-split", "cuda", "cuda, SM90 kernels, split backward",
     (_SM90, ("PROPE_CUDA_SM90_BWD", "split")), "P"),
    # the SM90 forward's first mainloop vs the default (overlap+lpt)
    ("prope-cuda-sm90-basic", "cuda", "cuda, SM90 kernels, basic forward",
     (_SM90, ("PROPE_CUDA_SM90_FWD", "basic")), "P"),
    # the SM90 kernels' rotation one pair at a time (Q, dK back) vs the default chunks from a table
    ("prope-cuda-sm90-rotpairs", "cuda", "cuda, SM90 kernels, rotation by pairs",
     (_SM90, ("PROPE_CUDA_ROT", "pairs")), "P"),
    ("prope-reference", "reference", "reference, PyTorch", (), "swqvb"),
    ("prope-triton-hopper", "triton", "triton, Hopper TMA kernels", ((TK, "hopper"),), ""),
]
# peers: family, backend, rope, sets
_PEERS = [
    ("sdpa", "cudnn", "none", "PSpsQB"), ("sdpa", "cudnn", "compiled", "PSpVsQB"),
    ("sdpa", "flash", "compiled", "PSQB"), ("sdpa", "cudnn", "eager", "P"),
    ("sdpa", "flash", "eager", "Ps"), ("sdpa", "flash", "none", "PQ"),
    ("flex", "flex", "none", "PV"), ("flex", "flex", "compiled", "PVs"),
    ("flash-attn", "flash-attn", "none", "PV"), ("flash-attn", "flash-attn", "compiled", "PSVB"),
    ("flash-attn", "flash-attn", "eager", "Ps"), ("fa3", "fa3", "none", "P"),
    ("fa3", "fa3", "compiled", "PSV"), ("sdpa", "efficient", "none", "P"),
    ("sdpa", "efficient", "compiled", "PV"), ("sdpa", "efficient", "eager", "Ps"),
    ("sdpa", "math", "none", "swq"), ("sdpa", "math", "eager", "swvb"),
    ("sdpa", "math", "compiled", ""), ("flex", "flex", "eager", ""), ("fa3", "fa3", "eager", ""),
]


def _table():
    rows = [Provider(n, "prope", be, "fused",
                     "prope_attention (sdpa: PyTorch kernel + our rotation)" if be == "sdpa"
                     else f"prope_attention ({lab})", forced, sets)
            for n, be, lab, forced, sets in _OURS]
    # a backend registered later gets its row too (in no default list until the table names it)
    rows += [Provider(f"prope-{be}", "prope", be, "fused", f"prope_attention ({be})")
             for be in backends.names() if be not in {r[1] for r in _OURS}]
    for fam, be, rope, sets in _PEERS:
        name = (f"sdpa-{be}" if fam == "sdpa" else fam) + (
            "-norope" if rope == "none" else f"+rope-{rope}")
        rows.append(Provider(name, fam, be, rope,
                             (_SDPA[be] if fam == "sdpa" else _PEER[fam]) + _ROPE[rope], (), sets))
    return {p.name: p for p in rows}


PROVIDERS = _table()
FLOOR = "sdpa-cudnn-norope"
# our backends that backend="auto" chooses between (the dispatch table is written from them)
OUR_BACKENDS = ["prope-triton", "prope-cuda", "prope-sdpa"]


def in_set(letter: str) -> List[str]:
    """The providers of one default list (a letter of SETS), in table order."""
    return [n for n, p in PROVIDERS.items() if letter in p.sets]


QUICK_PEER_PROVIDERS, PYTEST_BENCH_PROVIDERS, PYTEST_SMOKE_PROVIDERS = map(in_set, "QBb")


def needs(case) -> set:
    """The attention features a case uses."""
    return {f for f, on in (("window", case.has_window), ("softcap", case.softcap),
                            ("varlen", case.varlen)) if on}


# what the peers cannot express (SDPA: no softcap, a window only as an explicit (s x s) mask,
# which takes it off its fused kernels)
_PEER_LACKS = {
    "sdpa": {"softcap": "SDPA has no logit softcap", "window": "SDPA takes a sliding window only "
             "as an explicit (s x s) mask, which falls off its fused kernels; not timed"},
    "flex": {"window+varlen": "window with varlen: not wired for FlexAttention here"}}


def lacks(prov: Provider, case, device=None):
    """Why ``prov`` cannot run ``case``'s features, else None. Ours: the registry's features,
    and on ``device`` (where the backend runs there) its device-aware ones: the cuda backend has
    window/softcap on sm_90 only."""
    need = needs(case)
    if prov.family == "prope":
        if prov.backend == "auto":
            return None
        entry = backends.get(prov.backend)
        missing, where = sorted(need - set(entry.features)), ""
        if not missing and need and device is not None and entry.runs_on(device):
            # a q-like stand-in: the device check reads device, dtype and head_dim only
            x = SimpleNamespace(device=device, dtype=torch.bfloat16,
                                shape=(0, case.q_heads, case.head_dim))
            missing = sorted(need - set(entry.features_on(x, frozenset(need))))
            where = f" on this device ({entry.features_note})" if missing else ""
        return f"backend={prov.backend!r} does not implement {' or '.join(missing)}{where}" \
            if missing else None
    for what, why in _PEER_LACKS.get(prov.family, {}).items():
        if set(what.split("+")) <= need:
            return why
    return None


def default(letter: str, case, device=None) -> List[str]:
    """A default list for ``case``: its rows that can run the case's features (on ``device``)."""
    return [n for n in in_set(letter) if lacks(PROVIDERS[n], case, device) is None]


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


# the peers' p-RoPE as users write it: half-split, float32 math, identity pairs at frequency 0
# (as Gemma does). Tables once per case, outside the timed call; angles in float64 (fp32 is off by
# 0.03 rad at position 1e6).

def rope_tables(positions: torch.Tensor, head_dim: int, p: float, theta: float):
    """cos, sin: (len(positions), head_dim // 2) float32 on positions' device."""
    k = torch.arange(head_dim // 2, dtype=torch.float64, device=positions.device)
    inv_freq = torch.where(k < rotated_pairs(head_dim, p), theta ** (-2.0 * k / head_dim), 0.0)
    ang = positions.to(torch.float64)[:, None] * inv_freq
    return torch.cos(ang).float(), torch.sin(ang).float()


def rope_qk_eager(q, k, cos, sin):
    """q, k: (..., seqlen, heads, d); cos/sin (seqlen, d/2), broadcast over batch and heads."""
    def rot(x):
        x1, x2 = x.float().chunk(2, dim=-1)
        c, s = cos[:, None, :], sin[:, None, :]
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)
    return rot(q), rot(k)


_COMPILED = {}


def _compiled(key, fn):
    """``fn`` under torch.compile, one static graph per shape, created on first use."""
    if key not in _COMPILED:
        import torch._dynamo.config as dcfg
        # a sweep visits many shapes; never fall back to eager silently after N recompiles
        for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                     "accumulated_cache_size_limit"):
            if hasattr(dcfg, name):
                setattr(dcfg, name, max(getattr(dcfg, name), 1024))
        _COMPILED[key] = torch.compile(fn, dynamic=False)
    return _COMPILED[key]


def rope_qk_compiled():
    return _compiled("rope", rope_qk_eager)


def build(prov: Provider, case, ctx, q, k, v) -> Impl:
    """A callable for ``prov`` on ``case`` (ctx: the case's device tensors; q, k, v: sample
    inputs, for probing). Raises Unavailable."""
    dev = q.device
    why = lacks(prov, case, dev)
    if why:
        raise Unavailable(why)
    if prov.family == "prope":
        return _build_prope(prov, case, ctx, q, k, v)
    if prov.rope == "compiled" and dev.type != "cuda":
        raise Unavailable("torch.compile providers are not run on the CPU (compile time; smoke "
                          "mode)")
    if prov.family == "flex" and dev.type != "cuda":
        raise Unavailable("FlexAttention is run compiled, on a CUDA GPU only")
    rope = None
    if prov.rope != "none":
        f = rope_qk_eager if prov.rope == "eager" else rope_qk_compiled()
        rope = lambda q, k: f(q, k, ctx["cos"], ctx["sin"])  # noqa: E731
    impl = {"sdpa": _build_sdpa, "flex": _build_flex}.get(prov.family, _build_flash_attn)(
        prov, case, ctx, q, k, v)
    attn, varlen = impl.fn, case.varlen

    def fn(q, k, v):
        if rope is not None:
            q, k = rope(q, k)
        if varlen and prov.family in ("sdpa", "flex"):  # one row of packed documents
            return attn(q[None], k[None], v[None])[0]
        return attn(q, k, v)
    return Impl(fn, impl.notes)


def _build_prope(prov, case, ctx, q, k_sample, v_sample):
    from prope_kernels import interface as api
    dev, be, notes = q.device, prov.backend, []
    feat = _features(case, "window", case.softcap)
    kw = dict(p=case.p, theta=case.theta, causal=case.causal, backend=be, **feat)
    cu, max_s = ctx["cu_seqlens"], case.seqlen
    if be == "auto":
        vl = (cu, max_s) if case.varlen else ()
        dec = api.explain(q, k_sample, v_sample, *vl, p=case.p, theta=case.theta,
                          causal=case.causal, **feat)
        notes = [f"auto -> {dec.backend} ({dec.source})"
                 + (f", PyTorch kernel {dec.kernel}" if dec.kernel else "")]
    else:
        entry = backends.get(be)
        if not entry.runs_on(dev):
            raise Unavailable("needs a CUDA GPU" + (" (or TRITON_INTERPRET=1 on the CPU)"
                                                    if entry.interpreter_cpu else ""))
        if entry.unavailable() is not None:
            raise Unavailable(f"backend={be!r} {entry.unavailable()}")
        if entry.interpreter_cpu and dev.type == "cuda" and prope_env.interpreting():
            raise Unavailable("TRITON_INTERPRET=1 is set on a GPU machine: unset it to time "
                              "the compiled kernels")
        if be == "sdpa":
            ch = entry.load().choose(q, k_sample, len(ctx["cu_list"]) - 1, case.seqlen,
                                     case.causal)
            if ch.kernel is None:
                raise Unavailable(f"no PyTorch attention kernel for this shape: {ch.why}")
            notes = [f"PyTorch kernel: {ch.kernel}"] + list(ch.notes)
        if be == "reference" and dev.type == "cuda":
            need = 3 * 4 * case.q_heads * sum(n * n for n in (case.doc_lens or
                                                              [case.seqlen] * case.batch))
            if need > 16 * 2**30:
                raise Unavailable(f"the reference would materialise ~{need / 2**30:.0f} GiB of "
                                  "scores at this shape")
    _check_forced(prov, dev, bool(case.has_window or case.softcap))
    if case.varlen:
        return with_switches(prov, lambda q, k, v: api.prope_attention_varlen(
            q, k, v, cu, max_s, **kw), notes)
    return with_switches(prov, lambda q, k, v: api.prope_attention(q, k, v, **kw), notes)


# The kernel switches as the user set them when the benchmark started, and the ones each
# forcing provider sets over them. Every prope provider sets all of them at each call (a
# backward sees the setting of the forward's provider): reading os.environ when a later provider
# is built would pick up what an earlier one left behind. What really ran is read back from the
# backend after each call (prope_kernels.backends.launched: the row's `switches`).
SWITCHES = (TK, "PROPE_CUDA_SM90", "PROPE_CUDA_SM90_FWD", "PROPE_CUDA_SM90_BWD",
            "PROPE_CUDA_ROT")
USER_ENV = {var: os.environ.get(var) for var in SWITCHES}


def switches_set(name: str) -> dict:
    """The kernel switches provider ``name`` runs with: {var: value} of those set (the user's,
    then its own forced ones); {} = the package's defaults."""
    want = {**USER_ENV, **dict(PROVIDERS[name].forced)}
    return {var: val for var, val in want.items() if val is not None}


def with_switches(prov, call, notes) -> Impl:
    want = switches_set(prov.name)

    def fn(q, k, v):
        for var in SWITCHES:
            if var in want:
                os.environ[var] = want[var]
            else:
                os.environ.pop(var, None)
        return call(q, k, v)
    return Impl(fn, list(notes), want)


def _check_forced(prov, dev, features):
    """The Hopper Triton kernels and the SM90 CUDA kernels (forced by the provider or the user)
    run on an sm_90 GPU only; the Hopper ones have no window or softcap yet."""
    sw = switches_set(prov.name)
    cap = torch.cuda.get_device_capability(dev) if dev.type == "cuda" else None
    if prov.backend == "triton" and sw.get(TK) == "hopper":
        if features:
            raise Unavailable("the Hopper kernels have no sliding window or softcap yet (the "
                              "triton backend runs such calls on its portable kernels)")
        if cap is None:
            raise Unavailable("the Hopper kernels are timed on an sm_90 GPU only")
        if cap != (9, 0) or not triton_module("hopper").triton_supports():
            raise Unavailable(f"needs an sm_90 GPU and a Triton with tensor descriptors (have "
                              f"sm_{cap[0]}{cap[1]}, Triton {__import__('triton').__version__})")
    if prov.backend == "cuda" and sw.get("PROPE_CUDA_SM90") == "1" and cap != (9, 0):
        raise Unavailable("the SM90 kernels run on an sm_90 GPU (H100/H200) only")


def _features(case, window_key, softcap):
    """The window / softcap keywords, only where the case uses them (older flash-attn lacks
    them)."""
    return {**({window_key: tuple(case.window)} if case.has_window else {}),
            **({"softcap": softcap} if case.softcap else {})}


def _bhsd(q, k, v, group, expand):
    """(b, s, h, d) -> (b, h, s, d), k/v repeated to q's heads when ``expand``."""
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if expand:
        kt, vt = (x.repeat_interleave(group, dim=1) for x in (kt, vt))
    return qt, kt, vt


def _build_sdpa(prov, case, ctx, q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel  # torch >= 2.3 (we need 2.4)
    attr = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION",
            "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}[prov.backend]
    if not hasattr(SDPBackend, attr):
        raise Unavailable(f"this torch ({torch.__version__}) has no SDPBackend.{attr}")
    if prov.backend in ("cudnn", "efficient") and q.device.type != "cuda":
        raise Unavailable("needs a CUDA GPU")
    backend, group, notes, mask = getattr(SDPBackend, attr), case.q_heads // case.kv_heads, [], None
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
            kw = {"enable_gqa": True} if gqa and group > 1 else {}
            with sdpa_kernel(backend):
                o = F.scaled_dot_product_attention(
                    *_bhsd(q, k, v, group, not gqa), attn_mask=mask,
                    is_causal=case.causal and mask is None, scale=case.head_dim ** -0.5, **kw)
            return o.transpose(1, 2)
        return fn

    if group == 1:
        return Impl(make(False), notes)
    first_err = None
    for gqa in (True, False):  # enable_gqa (torch >= 2.5; a builtin: no signature to read) first
        fn = make(gqa)
        qs, ks, vs = (x.detach().requires_grad_(True) for x in (q, k, v))
        if case.varlen:
            qs, ks, vs = qs[None], ks[None], vs[None]
        try:  # one forward+backward on the sample inputs: does this path work at all?
            fn(qs, ks, vs).backward(torch.ones_like(qs))
        except Exception as e:  # noqa: BLE001 - any refusal of enable_gqa means "expand"
            if not gqa:
                raise  # the real reason when expanding fails too
            first_err = short(e)
            continue
        why = f" (enable_gqa failed: {first_err})" if first_err else ""
        return Impl(fn, notes + ["GQA: enable_gqa=True" if gqa else
                                 "GQA: k/v expanded with repeat_interleave" + why])


def _build_flex(prov, case, ctx, q, k, v):
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as e:
        raise Unavailable(f"torch {torch.__version__} has no FlexAttention") from e
    rope_qk_compiled()  # raises the recompile limits as a side effect
    flex = _compiled("flex", flex_attention)
    group, dev = case.q_heads // case.kv_heads, q.device
    n = case.total_tokens if case.varlen else case.seqlen
    doc, pos, mask_mod = ctx["doc_ids"], ctx["positions"], None
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
    elif case.varlen:
        def mask_mod(b, h, qi, ki):
            same = doc[qi] == doc[ki]
            return same & (pos[ki] <= pos[qi]) if case.causal else same
    elif case.causal:
        def mask_mod(b, h, qi, ki):
            return ki <= qi
    block_mask = (create_block_mask(mask_mod, None, None, n, n, device=dev)
                  if mask_mod is not None else None)
    kw, notes = {}, []
    if case.softcap:
        cap = float(case.softcap)

        def score_mod(score, b, h, qi, ki):  # score: q.k * scale, as Gemma 2 caps it
            return torch.tanh(score / cap) * cap
        kw["score_mod"] = score_mod
        notes.append("softcap: score_mod")
    expand = group > 1 and "enable_gqa" not in inspect.signature(flex_attention).parameters
    if group > 1:
        kw.update({} if expand else {"enable_gqa": True})
        notes.append("GQA: k/v expanded with repeat_interleave (no enable_gqa)" if expand
                     else "GQA: enable_gqa=True")
    if block_mask is not None:
        notes.append("block mask built outside the timed call")

    def fn(q, k, v):
        o = flex(*_bhsd(q, k, v, group, expand), block_mask=block_mask,
                 scale=case.head_dim ** -0.5, **kw)
        return o.transpose(1, 2)
    return Impl(fn, notes)


def _build_flash_attn(prov, case, ctx, q, k, v):
    mod, hint = (("flash_attn_interface", "FlashAttention-3 (flash_attn_interface, hopper build) "
                  "is not installed") if prov.family == "fa3" else
                 ("flash_attn", "flash-attn is not installed (pip install flash-attn)"))
    try:
        fa = importlib.import_module(mod)
    except ImportError as e:
        raise Unavailable(hint) from e
    if q.device.type != "cuda":
        raise Unavailable("needs a CUDA GPU")
    feat = dict(softmax_scale=case.head_dim ** -0.5, causal=case.causal,
                **_features(case, "window_size", float(case.softcap)))
    cu, max_s = ctx["cu_seqlens"], case.seqlen

    def fn(q, k, v):
        o = (fa.flash_attn_varlen_func(q, k, v, cu, cu, max_s, max_s, **feat) if case.varlen
             else fa.flash_attn_func(q, k, v, **feat))
        return o[0] if isinstance(o, tuple) else o  # some versions return (out, lse)
    return Impl(fn, [f"{prov.family} {getattr(fa, '__version__', '')}".strip()])


def short(e: BaseException, n: int = 160) -> str:
    msg = " ".join(str(e).split())
    msg = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
    return msg if len(msg) <= n else msg[: n - 3] + "..."
