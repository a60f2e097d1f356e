"""Public API: fused p-RoPE attention, varlen, and the rotation alone.

One path from kernel to user, whatever the backend::

    backend module (prope_kernels/backends/): attn_fwd / attn_bwd / rope on the packed layout
    torch.library custom ops  prope_kernels::attn_fwd / attn_bwd / rope   (+ fake impls, autograd)
    prope_attention / prope_attention_varlen / apply_prope   (validation, layout, dispatch)

Every backend sees the packed layout: q (total, q_heads, d), k/v (total, kv_heads, d), int32
``cu_seqlens`` (num_seqs + 1,) and int64 ``positions`` (total,). A dense (batch, seqlen, ...) call is
packed by a free view. ``lse`` is (q_heads, total) float32, natural log. The backends, their
capabilities in :mod:`prope_kernels.backends.registry`, the ``auto`` policy and the call's plan
in :mod:`prope_kernels.dispatch`; the checks in :mod:`prope_kernels.validation`.

One decision per call: the public function resolves ``backend`` once into a plan
(:func:`prope_kernels.dispatch.plan`: the backend and, for sdpa, PyTorch's kernel), passed to
the custom op as a string; the forward saves it with its arguments and the backward runs the
same plan (neither checks nor chooses again). :func:`explain` returns that same plan.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch

from . import dispatch
from . import reference as ref
from .backends import registry
from .rotary import PRoPESpec
from .validation import (check_attention, check_cu_seqlens, check_cu_values, check_positions,
                         check_deterministic, check_rope_input, check_window_softcap,
                         features_needed)

# ----------------------------------------------------------------------------------------------
# custom ops (torch.compile sees them as opaque nodes with fake impls; autograd via fwd/bwd ops)
# ----------------------------------------------------------------------------------------------

@lru_cache(maxsize=256)
def _spec(d, p, theta, variant, layout) -> PRoPESpec:
    # the public functions validated these; the ops rebuild the spec once per distinct value
    return PRoPESpec(d, p, theta, variant, layout)


def _backend_module(name: str):
    return registry.get(name).load()


def _attn_plan(plan, q, k, cu_seqlens, max_seqlen, causal, window_left=-1, window_right=-1,
               softcap=0.0, deterministic=False, qk=False):
    """(backend module, its keyword arguments) for the op's ``backend`` argument: the call's
    plan (dispatch.plan: "triton", "sdpa:flash", ...), made once by the public function before
    the forward and saved for the backward. "auto" reaches the op only from torch.compile, where
    the decision is made here, on the real tensors (with the features the call needs)."""
    if plan == "auto":
        needs = features_needed((window_left, window_right), softcap, causal, deterministic)
        if qk:
            needs = needs | {"qk_lengths"}
        plan = dispatch.decide(q, k, cu_seqlens.numel() - 1, max_seqlen, causal,
                               needs=needs).plan
    name, kernel = dispatch.parse_plan(plan)
    return _backend_module(name), ({} if kernel is None else {"kernel": kernel})


@torch.library.custom_op("prope_kernels::attn_fwd", mutates_args=())
def _attn_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                 positions: torch.Tensor, max_seqlen: int, p: float, theta: float, variant: str,
                 layout: str, causal: bool, softmax_scale: float, window_left: int,
                 window_right: int, softcap: float, backend: str, deterministic: bool = False,
                 cu_seqlens_k: Optional[torch.Tensor] = None,
                 positions_k: Optional[torch.Tensor] = None, max_seqlen_k: int = -1
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    # cu_seqlens_k, positions_k, max_seqlen_k: keys of their own lengths and positions
    # (seqlen_q != seqlen_k, bottom-right aligned); None: k/v rows are q's (cu_seqlens, positions)
    if cu_seqlens.device.type == "cpu":
        # free here (no device sync): the check torch.compile skips when tracing the public call
        check_cu_values(cu_seqlens, q.shape[0], max_seqlen, padding=False)
        if cu_seqlens_k is not None:
            check_cu_values(cu_seqlens_k, k.shape[0], max_seqlen_k, padding=False,
                            name="cu_seqlens_k", max_name="max_seqlen_k", rows="k")
    spec = _spec(q.shape[-1], p, theta, variant, layout)
    m, kw = _attn_plan(backend, q, k, cu_seqlens, max(max_seqlen, max_seqlen_k), causal,
                       window_left, window_right, softcap, deterministic,
                       qk=cu_seqlens_k is not None)
    return m.attn_fwd(q, k, v, cu_seqlens, positions, max_seqlen, spec, causal, softmax_scale,
                      (window_left, window_right), softcap, **kw,
                      **_qk_args(cu_seqlens_k, positions_k, max_seqlen_k))


def _qk_args(cu_seqlens_k, positions_k, max_seqlen_k) -> dict:
    # only calls with keys of their own lengths hand the backends these (the equal-length call
    # is unchanged, and a backend without "qk_lengths" never sees them)
    if cu_seqlens_k is None:
        return {}
    return dict(cu_seqlens_k=cu_seqlens_k, positions_k=positions_k, max_seqlen_k=max_seqlen_k)


@_attn_fwd_op.register_fake
def _(q, k, v, cu_seqlens, positions, max_seqlen, p, theta, variant, layout, causal,
      softmax_scale, window_left, window_right, softcap, backend, deterministic=False,
      cu_seqlens_k=None, positions_k=None, max_seqlen_k=-1):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("prope_kernels::attn_bwd", mutates_args=())
def _attn_bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 out: torch.Tensor, lse: torch.Tensor, dlse: Optional[torch.Tensor],
                 cu_seqlens: torch.Tensor, positions: torch.Tensor, max_seqlen: int, p: float,
                 theta: float, variant: str, layout: str, causal: bool, softmax_scale: float,
                 window_left: int, window_right: int, softcap: float, backend: str,
                 deterministic: bool = False, cu_seqlens_k: Optional[torch.Tensor] = None,
                 positions_k: Optional[torch.Tensor] = None, max_seqlen_k: int = -1
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    spec = _spec(q.shape[-1], p, theta, variant, layout)
    m, kw = _attn_plan(backend, q, k, cu_seqlens, max(max_seqlen, max_seqlen_k), causal,
                       window_left, window_right, softcap, deterministic,
                       qk=cu_seqlens_k is not None)
    return m.attn_bwd(dout, q, k, v, out, lse, dlse, cu_seqlens, positions, max_seqlen, spec,
                      causal, softmax_scale, (window_left, window_right), softcap,
                      deterministic=deterministic, **kw,
                      **_qk_args(cu_seqlens_k, positions_k, max_seqlen_k))


@_attn_bwd_op.register_fake
def _(dout, q, k, v, out, lse, dlse, cu_seqlens, positions, max_seqlen, p, theta, variant, layout,
      causal, softmax_scale, window_left, window_right, softcap, backend, deterministic=False,
      cu_seqlens_k=None, positions_k=None, max_seqlen_k=-1):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


_N_ARGS = 11   # p .. deterministic: the op's arguments between max_seqlen and cu_seqlens_k


def _attn_setup_context(ctx, inputs, output):
    q, k, v, cu, pos, max_seqlen, *args = inputs
    out, lse = output
    # the k-specific trailing arguments (None, None, -1 for an equal-length call)
    cu_k, pos_k, max_k = (list(args[_N_ARGS:]) + [None, None, -1])[:3]
    args = args[:_N_ARGS]
    ctx.save_for_backward(q, k, v, out, lse, cu, pos, cu_k, pos_k)  # no rotated copies kept
    ctx.max_k = max_k
    # an unused output's gradient arrives as None, not zeros: without return_lse (or with an
    # unused lse) the backends get dlse=None and skip its term (the sdpa backend would else run
    # an extra forward and backward on a zero dlse)
    ctx.set_materialize_grads(False)
    # p, theta, variant, layout, causal, scale, window_left, window_right, softcap, backend (the
    # call's plan: the backward runs what the forward ran) and deterministic, when given
    ctx.args = (max_seqlen, *args)
    ctx.n_inputs = len(inputs)


def _attn_backward(ctx, dout, dlse):
    q, k, v, out, lse, cu, pos, cu_k, pos_k = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = _attn_bwd_op(dout.contiguous(), q, k, v, out, lse, dlse, cu, pos, *ctx.args,
                              cu_seqlens_k=cu_k, positions_k=pos_k, max_seqlen_k=ctx.max_k)
    return (dq, dk, dv) + (None,) * (ctx.n_inputs - 3)


_attn_fwd_op.register_autograd(_attn_backward, setup_context=_attn_setup_context)


@torch.library.custom_op("prope_kernels::rope", mutates_args=())
def _rope_op(x: torch.Tensor, positions: torch.Tensor, p: float, theta: float, variant: str,
             layout: str, conjugate: bool, backend: str) -> torch.Tensor:
    spec = _spec(x.shape[-1], p, theta, variant, layout)
    return _backend_module(backend).rope(x, positions, spec, conjugate)


@_rope_op.register_fake
def _(x, positions, p, theta, variant, layout, conjugate, backend):
    return torch.empty_like(x)


def _rope_setup_context(ctx, inputs, output):
    x, positions, p, theta, variant, layout, conjugate, backend = inputs
    ctx.save_for_backward(positions)
    ctx.args = (p, theta, variant, layout, not conjugate, backend)


def _rope_backward(ctx, grad):
    (positions,) = ctx.saved_tensors
    # The gradient of a rotation is the opposite rotation.
    return _rope_op(grad.contiguous(), positions, *ctx.args), None, None, None, None, None, None, None


_rope_op.register_autograd(_rope_backward, setup_context=_rope_setup_context)


# ----------------------------------------------------------------------------------------------
# public functions
# ----------------------------------------------------------------------------------------------

def prope_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, p: float = 0.75,
                    theta: float = 10000.0, variant: str = "prope", layout: str = "half",
                    causal: bool = True, softmax_scale: Optional[float] = None,
                    positions: Optional[torch.Tensor] = None, backend: str = "auto",
                    return_lse: bool = False, window: tuple = (-1, -1),
                    softcap: Optional[float] = None, deterministic: bool = False,
                    k_positions: Optional[torch.Tensor] = None):
    """Attention with p-RoPE applied to q and k inside the kernel.

    Args:
        q: (batch, seqlen, q_heads, head_dim), float16/bfloat16 for the kernels.
        k, v: (batch, seqlen_k, kv_heads, head_dim); q_heads % kv_heads == 0 (MHA, GQA, MQA:
            k/v are never expanded in memory). seqlen_k may differ from q's seqlen (see
            "seqlen_q != seqlen_k" below).
        p: fraction of the d/2 frequency pairs that rotate, in [0, 1] (0: NoPE, 1: RoPE).
        theta: RoPE base.
        variant: "prope" (fastest pairs rotate), "reversed" (slowest pairs rotate) or
            "partial" (NeoX rotary_pct: a prefix of 2r dims with frequencies recomputed over it).
        layout: "half" (pair k = dims (k, k + d/2), Llama/Gemma) or "interleaved" (2k, 2k+1).
        causal: causal mask (query i attends to keys j <= i).
        softmax_scale: defaults to head_dim ** -0.5.
        positions: integer (seqlen,) or (batch, seqlen); default 0..seqlen-1.
        backend: "auto" (a measured dispatch table, else a documented default: see
            :mod:`prope_kernels.dispatch` and :func:`explain`) or a name of
            :mod:`prope_kernels.backends`: "triton", "cuda", "sdpa" (PyTorch's cuDNN / flash /
            memory-efficient kernel with our rotation around it), "reference" (pure PyTorch,
            any device).
        return_lse: also return the log-sum-exp (batch, q_heads, seqlen), float32.
        window: (left, right) sliding window, flash-attn's ``window_size`` convention: query i
            sees key j iff ``i - left <= j <= i + right`` (i, j: indices in the sequence, not
            ``positions``); -1 = unbounded on that side; with ``causal`` the right side is
            capped at 0. (-1, -1) = full attention. Every query sees at least its own key.
            A transformers ``sliding_window=W`` (Gemma 2/3: key j visible iff i - j < W) is
            ``window=(W - 1, 0)`` with causal. The kernels skip key blocks outside the window.
        softcap: Gemma 2's logit softcapping: the scaled scores s = q.k * softmax_scale become
            ``softcap * tanh(s / softcap)`` before the mask and softmax (Gemma 2: 50.0);
            None or 0 = off. The returned lse is over the capped scores.
        deterministic: a bitwise repeatable backward (flash-attn's name): only backends that
            have one run the call (reference, triton, and cuda on sm_90 with its split
            backward; the sdpa backend's kernels follow torch's own setting, so it is refused).
            ``torch.use_deterministic_algorithms(True)`` asks each backend's kernels for the
            same. Off by default: the fastest backward sums dQ with atomics.

        k_positions: k's positions, (seqlen_k,) or (batch, seqlen_k); see below.

    seqlen_q != seqlen_k (flash-attn's convention, e.g. new queries over a longer context):
    the masks align bottom-right: query i sees key j iff ``j <= i + seqlen_k - seqlen_q``
    (causal) and the window's bounds shift the same way. Default positions: k at
    ``0..seqlen_k-1``, q at the last seqlen_q of them (``seqlen_k - seqlen_q + i``; with
    ``k_positions`` given, q defaults to its last seqlen_q entries). ``positions`` alone with
    different lengths is ambiguous and refused (pass ``k_positions`` too). A query row that sees
    no key (seqlen_q > seqlen_k under a causal mask) gets out 0 and lse -inf, as in flash-attn;
    its gradients are 0. Backends: reference and triton (the portable kernels); the others
    refuse it and ``auto`` passes them over. With equal lengths and no ``k_positions``
    nothing of this runs.

    Returns:
        out (batch, seqlen, q_heads, head_dim) like q, and lse when ``return_lse``.
    """
    spec, scale = check_attention(q, k, v, packed=False, p=p, theta=theta, variant=variant,
                                  layout=layout, causal=causal, softmax_scale=softmax_scale,
                                  return_lse=return_lse, k_len_free=True)
    window, softcap, needs = check_window_softcap(window, softcap, causal)
    needs = check_deterministic(deterministic, needs)
    b, s = q.shape[:2]
    if k.shape[1] != s or k_positions is not None:
        return _dense_qk(q, k, v, spec, scale, causal, positions, k_positions, backend,
                         return_lse, window, softcap, deterministic, needs)
    if positions is not None:
        check_positions(positions, [(s,), (b, s)], q.device)
    backend = dispatch.plan(backend, q, k, b, s, causal, needs).plan

    if positions is None:
        pos = torch.arange(s, device=q.device, dtype=torch.int64).repeat(b)
    else:
        pos = positions.to(torch.int64).expand(b, s).reshape(b * s)
    cu = torch.arange(0, (b + 1) * s, s, device=q.device, dtype=torch.int32)
    qf, kf, vf = (x.reshape(b * s, x.shape[2], x.shape[3]) for x in (q, k, v))
    out, lse = _attn_fwd_op(qf, kf, vf, cu, pos, s, spec.p, spec.theta, variant, layout,
                            causal, scale, *window, softcap, backend, deterministic)
    out = out.view(b, s, q.shape[2], q.shape[3])
    if return_lse:
        return out, lse.view(q.shape[2], b, s).transpose(0, 1)
    return out


def _dense_qk(q, k, v, spec, scale, causal, positions, k_positions, backend, return_lse, window,
              softcap, deterministic, needs):
    """prope_attention with seqlen_q != seqlen_k or k's own positions: packed as varlen with
    separate q and k offsets."""
    b, s = q.shape[:2]
    sk = k.shape[1]
    pos, kpos = _qk_positions(positions, k_positions, [(s,), (b, s)], [(sk,), (b, sk)], s, sk,
                              q.device)
    needs = needs | {"qk_lengths"}
    backend = dispatch.plan(backend, q, k, b, max(s, sk), causal, needs).plan
    pos = pos.to(torch.int64).expand(b, s).reshape(b * s)
    kpos = kpos.to(torch.int64).expand(b, sk).reshape(b * sk)
    cu = torch.arange(b + 1, device=q.device, dtype=torch.int32) * s
    cu_k = torch.arange(b + 1, device=q.device, dtype=torch.int32) * sk
    qf = q.reshape(b * s, q.shape[2], q.shape[3])
    kf, vf = (x.reshape(b * sk, x.shape[2], x.shape[3]) for x in (k, v))
    out, lse = _attn_fwd_op(qf, kf, vf, cu, pos, s, spec.p, spec.theta, spec.variant,
                            spec.layout, causal, scale, *window, softcap, backend, deterministic,
                            cu_k, kpos, sk)
    out = out.view(b, s, q.shape[2], q.shape[3])
    if return_lse:
        return out, lse.view(q.shape[2], b, s).transpose(0, 1)
    return out


def _qk_positions(positions, k_positions, q_shapes, k_shapes, s, sk, device):
    """Dense (q, k) positions of a seqlen_q != seqlen_k call (validated; defaults: k 0..sk-1, q
    the last s of k's)."""
    if positions is not None:
        check_positions(positions, q_shapes, device)
    if k_positions is not None:
        check_positions(k_positions, k_shapes, device, name="k_positions")
    if k_positions is None:
        if positions is not None:
            raise ValueError(f"k_positions is required when positions is given and seqlen_q "
                             f"({s}) != seqlen_k ({sk}): which positions k has is ambiguous")
        k_positions = torch.arange(sk, device=device)
        return torch.arange(sk - s, sk, device=device), k_positions
    if positions is None:
        if s > sk:
            raise ValueError(f"positions is required when k_positions is given and seqlen_q "
                             f"({s}) > seqlen_k ({sk}): q's default is the last seqlen_q "
                             f"entries of k_positions")
        positions = k_positions[..., sk - s:]
    return positions, k_positions


def prope_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           cu_seqlens: torch.Tensor, max_seqlen: int, *, p: float = 0.75,
                           theta: float = 10000.0, variant: str = "prope", layout: str = "half",
                           causal: bool = True, softmax_scale: Optional[float] = None,
                           positions: Optional[torch.Tensor] = None, backend: str = "auto",
                           return_lse: bool = False, window: tuple = (-1, -1),
                           softcap: Optional[float] = None, deterministic: bool = False,
                           cu_seqlens_k: Optional[torch.Tensor] = None,
                           max_seqlen_k: Optional[int] = None,
                           k_positions: Optional[torch.Tensor] = None):
    """Packed sequences: q (total, q_heads, d), k/v (total, kv_heads, d).

    Sequence i is tokens ``cu_seqlens[i]:cu_seqlens[i+1]`` (int32/int64 on q's device, starts at
    0, non-decreasing) and attends only within itself: its rows of out, lse and of the gradients
    depend on no other row, whatever those rows hold (NaN/Inf included).
    cu_seqlens[-1] <= total: rows past ``cu_seqlens[-1]`` are padding (e.g. a fixed-size buffer):
    their out and lse rows are 0 and their dq, dk, dv rows 0; no kernel reads them (the call
    runs on the first ``cu_seqlens[-1]`` rows, views; with padding, out and lse are copied into
    zero-padded tensors, and the backward copies dq, dk, dv likewise).
    max_seqlen: at least the longest sequence (the kernels size their grids by it; an
    understated value would leave the rows past it unwritten); an overstated one only launches
    idle programs. Checks: eager calls check every value above (``ValueError`` naming the
    argument), which costs a device->host copy of cu_seqlens once per unmodified cu_seqlens
    tensor (cached: the layers of a model that share one cu_seqlens pay it once). Inside
    ``torch.compile`` the trace cannot read the values: there cu_seqlens[-1] must equal total
    (no padding) and max_seqlen must hold; the op checks both when cu_seqlens is a CPU tensor
    (free) and the reference backend checks max_seqlen on any device (it reads cu_seqlens on the
    host anyway); nothing checks them on CUDA tensors, where the check would be a host sync per
    call (flash-attn does not check either): there they are the caller's contract (see the
    docs/api.md, "Input checks", for what breaking it does).
    positions: (total,) integers; default restarts at 0 in each sequence.
    window, softcap, deterministic: as in :func:`prope_attention`; the window is over indices
    inside each sequence (it never crosses a sequence boundary).
    cu_seqlens_k, max_seqlen_k, k_positions: keys of their own lengths (flash-attn's
    ``cu_seqlens_k``/``max_seqlen_k``): k/v (total_k, kv_heads, d), sequence i's keys are rows
    ``cu_seqlens_k[i]:cu_seqlens_k[i+1]`` (same number of sequences as ``cu_seqlens``, which
    then describes q alone; rows past ``cu_seqlens_k[-1]`` are padding as for q). Masks align
    bottom-right per sequence and positions default as in :func:`prope_attention` (k
    ``0..Lk-1``, q ``Lk-Lq..Lk-1``); k_positions: (total_k,). Without them (or with
    ``cu_seqlens_k`` the same tensor as ``cu_seqlens`` and no other k argument), cu_seqlens and
    max_seqlen describe both and the equal-length path runs.
    Returns out (total, q_heads, d), and lse (q_heads, total) when ``return_lse``.
    """
    if (cu_seqlens_k is cu_seqlens and k_positions is None
            and (max_seqlen_k is None or max_seqlen_k == max_seqlen)):
        cu_seqlens_k = max_seqlen_k = None    # the same keys as queries: the equal-length path
    qk = cu_seqlens_k is not None or max_seqlen_k is not None or k_positions is not None
    spec, scale = check_attention(q, k, v, packed=True, p=p, theta=theta, variant=variant,
                                  layout=layout, causal=causal, softmax_scale=softmax_scale,
                                  return_lse=return_lse, k_len_free=cu_seqlens_k is not None)
    window, softcap, needs = check_window_softcap(window, softcap, causal)
    needs = check_deterministic(deterministic, needs)
    if qk:
        return _varlen_qk(q, k, v, cu_seqlens, max_seqlen, cu_seqlens_k, max_seqlen_k, spec,
                          scale, causal, positions, k_positions, backend, return_lse, window,
                          softcap, deterministic, needs)
    total = q.shape[0]
    used = check_cu_seqlens(cu_seqlens, total, q.device, max_seqlen)   # None inside compile
    if positions is not None:
        check_positions(positions, [(total,)], q.device)
    pad = 0 if used is None else total - used
    if pad:  # padding rows: never handed to a backend (views of the rows inside sequences)
        q, k, v = q[:used], k[:used], v[:used]
        if positions is not None:
            positions = positions[:used]
    num_seqs = cu_seqlens.numel() - 1
    backend = dispatch.plan(backend, q, k, num_seqs, int(max_seqlen), causal, needs).plan

    if positions is None:
        pos = ref.varlen_positions(cu_seqlens, q.shape[0])
    else:
        pos = positions.to(torch.int64)
    out, lse = _attn_fwd_op(q, k, v, cu_seqlens.to(torch.int32), pos, int(max_seqlen), spec.p,
                            spec.theta, variant, layout, causal, scale, *window, softcap,
                            backend, deterministic)
    if pad:
        out = torch.nn.functional.pad(out, (0, 0, 0, 0, 0, pad))
        lse = torch.nn.functional.pad(lse, (0, pad))
    return (out, lse) if return_lse else out


def _varlen_qk(q, k, v, cu_seqlens, max_seqlen, cu_k, max_k, spec, scale, causal, positions,
               k_positions, backend, return_lse, window, softcap, deterministic, needs):
    """prope_attention_varlen with cu_seqlens_k / max_seqlen_k / k_positions."""
    if cu_k is None:
        cu_k = cu_seqlens          # keys packed like q (k_positions alone, or max_seqlen_k)
    if max_k is None:
        if cu_k is not cu_seqlens:
            raise TypeError("max_seqlen_k is required with cu_seqlens_k")
        max_k = max_seqlen
    total, total_k = q.shape[0], k.shape[0]
    used = check_cu_seqlens(cu_seqlens, total, q.device, max_seqlen)     # None inside compile
    if isinstance(cu_k, torch.Tensor) and cu_k.numel() != cu_seqlens.numel():
        raise ValueError(f"cu_seqlens_k must have as many entries as cu_seqlens (num_seqs + 1 = "
                         f"{cu_seqlens.numel()}), got {cu_k.numel()}")
    used_k = check_cu_seqlens(cu_k, total_k, q.device, max_k, name="cu_seqlens_k",
                              max_name="max_seqlen_k", rows="k")
    if positions is not None:
        check_positions(positions, [(total,)], q.device)
    if k_positions is not None:
        check_positions(k_positions, [(total_k,)], q.device, name="k_positions")
    if positions is not None and k_positions is None and cu_k is not cu_seqlens:
        raise ValueError("k_positions is required when positions is given with cu_seqlens_k: "
                         "which positions k has is ambiguous")
    pad = 0 if used is None else total - used
    pad_k = 0 if used_k is None else total_k - used_k
    if pad:    # padding rows: never handed to a backend
        q = q[:used]
        positions = None if positions is None else positions[:used]
    if pad_k:
        k, v = k[:used_k], v[:used_k]
        k_positions = None if k_positions is None else k_positions[:used_k]
    cq = cu_seqlens.to(torch.int64)
    ck = cu_k.to(torch.int64)
    lens_q = cq[1:] - cq[:-1]
    if k_positions is None:
        kpos = ref.varlen_positions(ck, k.shape[0])
    else:
        kpos = k_positions.to(torch.int64)
    if positions is not None:
        pos = positions.to(torch.int64)
    else:
        # query t of sequence i is key row t + (cu_k[i+1] - cu_q[i+1]): the last Lq keys
        if k_positions is not None and used is not None and bool(((ck[1:] - ck[:-1])
                                                                   < lens_q).any()):
            raise ValueError("positions is required when k_positions is given and a sequence "
                             "has more queries than keys (cu_seqlens vs cu_seqlens_k): q's "
                             "default is the last Lq entries of its sequence in k_positions")
        shift = torch.repeat_interleave(ck[1:] - cq[1:], lens_q, output_size=q.shape[0])
        rows = torch.arange(q.shape[0], device=q.device) + shift
        if k_positions is None:
            pos = rows - torch.repeat_interleave(ck[:-1], lens_q, output_size=q.shape[0])
        else:
            pos = kpos[rows]
    num_seqs = cu_seqlens.numel() - 1
    needs = needs | {"qk_lengths"}
    backend = dispatch.plan(backend, q, k, num_seqs, max(int(max_seqlen), int(max_k)), causal,
                            needs).plan
    out, lse = _attn_fwd_op(q, k, v, cu_seqlens.to(torch.int32), pos, int(max_seqlen), spec.p,
                            spec.theta, spec.variant, spec.layout, causal, scale, *window,
                            softcap, backend, deterministic, cu_k.to(torch.int32), kpos,
                            int(max_k))
    if pad:
        out = torch.nn.functional.pad(out, (0, 0, 0, 0, 0, pad))
        lse = torch.nn.functional.pad(lse, (0, pad))
    return (out, lse) if return_lse else out


def explain(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            cu_seqlens: Optional[torch.Tensor] = None, max_seqlen: Optional[int] = None, *,
            p: float = 0.75, theta: float = 10000.0, variant: str = "prope",
            layout: str = "half", causal: bool = True, softmax_scale: Optional[float] = None,
            positions: Optional[torch.Tensor] = None, backend: str = "auto",
            return_lse: bool = False, window: tuple = (-1, -1), softcap: Optional[float] = None,
            deterministic: bool = False, cu_seqlens_k: Optional[torch.Tensor] = None,
            max_seqlen_k: Optional[int] = None, k_positions: Optional[torch.Tensor] = None):
    """Which backend :func:`prope_attention` (or, with ``cu_seqlens`` and ``max_seqlen``,
    :func:`prope_attention_varlen`) would run for these arguments, and why: a dispatch-table
    entry (measured) or the documented default, the sdpa backend's PyTorch kernel, k/v
    expansions, what cannot run. Validates like the op (same errors) and runs nothing.
    Returns a :class:`prope_kernels.dispatch.Decision`, the one :func:`prope_kernels.dispatch.plan`
    makes for the call (its ``plan`` is what the op's forward and backward run); ``print()`` it
    for the explanation.
    """
    packed = cu_seqlens is not None
    check_attention(q, k, v, packed=packed, p=p, theta=theta, variant=variant, layout=layout,
                    causal=causal, softmax_scale=softmax_scale, return_lse=return_lse,
                    k_len_free=not packed or cu_seqlens_k is not None)
    _, _, needs = check_window_softcap(window, softcap, causal)
    needs = check_deterministic(deterministic, needs)
    # seqlen_q != seqlen_k (the backends with "qk_lengths"; the full checks are the call's)
    qk = (k_positions is not None or cu_seqlens_k is not None or max_seqlen_k is not None
          or (not packed and k.shape[1] != q.shape[1]))
    if qk:
        needs = needs | {"qk_lengths"}
        if packed:
            return dispatch.plan(backend, q, k, cu_seqlens.numel() - 1,
                                 max(int(max_seqlen or 0), int(max_seqlen_k or 0)), causal,
                                 needs=needs)
        return dispatch.plan(backend, q, k, q.shape[0], max(q.shape[1], k.shape[1]), causal,
                             needs=needs)
    if packed:
        if max_seqlen is None:
            raise TypeError("explain: max_seqlen is required with cu_seqlens")
        used = check_cu_seqlens(cu_seqlens, q.shape[0], q.device, max_seqlen)
        if positions is not None:
            check_positions(positions, [(q.shape[0],)], q.device)
        if used is not None and used < q.shape[0]:   # the op runs without the padding rows
            q, k = q[:used], k[:used]
        attn = (k, cu_seqlens.numel() - 1, int(max_seqlen), causal)
    else:
        b, s = q.shape[:2]
        if positions is not None:
            check_positions(positions, [(s,), (b, s)], q.device)
        attn = (k, b, s, causal)
    return dispatch.plan(backend, q, *attn, needs=needs)  # what the call plans and runs


def apply_prope(x: torch.Tensor, positions: Optional[torch.Tensor] = None, *, p: float = 0.75,
                theta: float = 10000.0, variant: str = "prope", layout: str = "half",
                conjugate: bool = False, backend: str = "auto") -> torch.Tensor:
    """The p-RoPE rotation alone (differentiable).

    x: (batch, seqlen, heads, d) with positions (seqlen,) or (batch, seqlen), or packed
    (total, heads, d) with positions (total,); default positions 0..seqlen-1 (0..total-1 packed).
    conjugate: rotate by -angle (the inverse rotation).
    Only the rotated dims are multiplied; identity dims are copied.
    """
    spec = check_rope_input(x, positions, p, theta, variant, layout, conjugate)
    lead = x.shape[:-2]
    if positions is None:
        positions = torch.arange(lead[-1], device=x.device)
    if x.stride(-1) != 1:
        x = x.contiguous()
    backend = registry.resolve(backend, x)
    pos = positions.to(torch.int64).expand(lead).reshape(-1)
    xf = x.reshape(-1, x.shape[-2], x.shape[-1])
    y = _rope_op(xf, pos, spec.p, spec.theta, variant, layout, conjugate, backend)
    return y.view(x.shape)
