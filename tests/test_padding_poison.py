"""Packed sequences are isolated from every row outside them, and padding rows are handled.

For each sequence j of a varlen batch with trailing padding rows (total > cu_seqlens[-1]), every
row outside sequence j (the other sequences and the padding) of q, k, v, dout and the lse
cotangent is filled with NaN, +Inf and -Inf; sequence j's rows of out, lse, dq, dk, dv must be
finite and bitwise equal to a clean run (same backend, same kernels) where those rows hold
ordinary values. A kernel whose tile reaches past the sequence (a ragged tail, a TMA box) and
masks only the probabilities fails this: a masked P of 0 times an Inf/NaN operand row is NaN.

Two levels:

* ``api``: prope_attention_varlen + autograd. The padding rows are dropped before the op (views:
  the memory past cu_seqlens[-1] still holds the poison, so a kernel reading past the last
  sequence sees it); they must come back 0 in out, lse, dq, dk, dv.
* ``backend``: the backend module's attn_fwd / attn_bwd called directly with the padding rows in
  the tensors (total > cu_seqlens[-1]: what the kernels get if a caller skips the API), on the
  kernels that take it (not sdpa, whose dense/varlen choice assumes cu_seqlens[-1] == total).

Plus the max_seqlen checks: an understated max_seqlen is a ValueError naming it wherever the
check is free (eager calls; the op on CPU cu_seqlens, i.e. inside torch.compile; the reference
backend), and an overstated one changes nothing.

CPU: reference, sdpa and triton (interpreted: portable and Hopper kernels); GPU (``gpu``): the
same plus cuda at GPU tile sizes.
"""

import itertools

import pytest
import torch

from harness import rand, seed
from prope_kernels import backends, env, prope_attention_varlen
from prope_kernels.rotary import PRoPESpec
from prope_kernels.validation import check_window_softcap

# the poisoned sequences' own programs compute on NaN/Inf (expected): the CPU interpreter's numpy
# warns about it
pytestmark = pytest.mark.filterwarnings("ignore:.*(invalid value|All-NaN):RuntimeWarning")

ON_GPU = torch.cuda.is_available()
SM90 = ON_GPU and torch.cuda.get_device_capability() == (9, 0)
NAMES = ("out", "lse", "dq", "dk", "dv")


def _poison(x, keep):
    """x with every row (dim 0) outside ``keep`` (a slice) set to NaN, +Inf, -Inf in turn
    (element by element, so each poisoned row holds all three)."""
    bad = torch.tensor([float("nan"), float("inf"), float("-inf")], dtype=x.dtype)
    fill = bad[torch.arange(x.numel()) % 3].view(x.shape).to(x.device)
    rows = torch.arange(x.shape[0], device=x.device)
    outside = ((rows < keep.start) | (rows >= keep.stop)).view(-1, *([1] * (x.dim() - 1)))
    return torch.where(outside, fill, x)


def _positions(lens, pad, device):
    return torch.cat([torch.arange(n) for n in lens] + [torch.zeros(pad, dtype=torch.long)]
                     ).to(device)


def _run_api(backend, cu, max_seqlen, kw):
    def run(q, k, v, dout, dlse):
        q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
        out, lse = prope_attention_varlen(q, k, v, cu, max_seqlen, backend=backend,
                                          return_lse=True, **kw)
        dq, dk, dv = torch.autograd.grad((out, lse), (q, k, v), (dout, dlse))
        return out, lse.t(), dq, dk, dv                    # lse rows first, like the others
    return run


def _run_backend(backend, cu, max_seqlen, positions, kw):
    m = backends.get(backend).load()
    d = kw["d"]
    spec = PRoPESpec(d, kw["p"])
    window, softcap, _ = check_window_softcap(kw["window"], kw["softcap"], kw["causal"])
    args = (cu, positions, max_seqlen, spec, kw["causal"], d ** -0.5, window, softcap)

    def run(q, k, v, dout, dlse):
        out, lse = m.attn_fwd(q, k, v, *args)
        dq, dk, dv = m.attn_bwd(dout, q, k, v, out, lse, dlse, *args)
        return out, lse.t(), dq, dk, dv
    return run


def _exact_grads(backend):
    """Whether the backward is bitwise repeatable here (CPU: always; GPU: the portable Triton
    kernels in torch's deterministic mode and the CUDA SM90 split backward; a sum by atomics, as
    the Hopper Triton kernels' dQ and the CUDA SM90 fused backward's, is not)."""
    if not ON_GPU:
        return True
    if backend == "triton":
        return env.triton_kernels() == "portable" and torch.are_deterministic_algorithms_enabled()
    if backend == "cuda":
        return SM90 and env.cuda_sm90() is not False and (
            env.cuda_sm90_bwd() == "split" or torch.are_deterministic_algorithms_enabled())
    return False                 # sdpa: torch's GPU backward kernels


def check_isolation(backend, lens, pad, hq, hkv, d, *, causal=True, p=0.75, window=(-1, -1),
                    softcap=None, dtype=torch.bfloat16, level="api", device="cpu"):
    gen = torch.Generator().manual_seed(seed("poison", tuple(lens), pad, hq, hkv, d, causal, p,
                                             window, softcap, str(dtype), backend, level))
    n = sum(lens)
    total = n + pad
    cu = torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32, device=device)
    q = rand((total, hq, d), dtype, device, gen)
    k = rand((total, hkv, d), dtype, device, gen)
    v = rand((total, hkv, d), dtype, device, gen)
    dout = rand((total, hq, d), dtype, device, gen)
    dlse = rand((total, hq), torch.float32, device, gen)         # rows first, as in _poison
    kw = dict(p=p, causal=causal, window=window, softcap=softcap)
    if level == "api":
        run = _run_api(backend, cu, max(lens), kw)
    else:
        run = _run_backend(backend, cu, max(lens), _positions(lens, pad, device), {**kw, "d": d})
    # the backward's row term reads dlse (hq, total)
    clean = run(q, k, v, dout, dlse.t().contiguous())
    for x, name in zip(clean, NAMES):
        assert torch.isfinite(x[:n]).all(), f"{backend}: clean {name} not finite"
    if level == "api":
        _check_padding_rows(clean, n, "clean run")
    exact = _exact_grads(backend)
    starts = cu.tolist()
    for j, (a, b) in enumerate(zip(starts[:-1], starts[1:])):
        if a == b:
            continue
        keep = slice(a, b)
        got = run(*(_poison(x, keep) for x in (q, k, v, dout)),
                  _poison(dlse, keep).t().contiguous())
        for name, want, g in zip(NAMES, clean, got):
            what = f"{backend} ({level}): sequence {j} rows [{a}, {b}) of {name}"
            assert torch.isfinite(g[keep]).all(), f"{what}: not finite with poisoned neighbours"
            if exact or name in ("out", "lse"):
                assert torch.equal(g[keep], want[keep]), f"{what}: differs from the clean run"
            else:
                torch.testing.assert_close(g[keep], want[keep], msg=what)
        if level == "api":
            _check_padding_rows(got, n, f"sequence {j} kept")


def _check_padding_rows(results, n, when):
    for name, x in zip(NAMES, results):
        assert (x[n:] == 0).all(), f"{when}: padding rows of {name} are not 0"


# --- CPU (and GPU): reference and sdpa --------------------------------------------------------

LENS, PAD = [5, 0, 40, 19], 7   # a short sequence, an empty one, ragged tails past 32 and 16


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("p", [0.0, 0.75, 1.0])
def test_reference(device, causal, p):
    check_isolation("reference", LENS, PAD, 4, 2, 32, causal=causal, p=p, device=device)


@pytest.mark.parametrize("window,softcap", [((6, 0), 5.0), ((3, 8), None), ((-1, -1), 10.0)])
def test_reference_window_softcap(device, window, softcap):
    check_isolation("reference", LENS, PAD, 3, 1, 32, causal=window[1] == 0, window=window,
                    softcap=softcap, dtype=torch.float16, device=device)


def test_reference_backend_level(device):
    check_isolation("reference", LENS, PAD, 4, 2, 32, level="backend", device=device)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("p", [0.0, 0.75, 1.0])
def test_sdpa(device, causal, p):
    check_isolation("sdpa", LENS, PAD, 4, 2, 32, causal=causal, p=p, device=device)


def test_sdpa_equal_lengths(device):
    # equal lengths take sdpa's dense (batched) kernel; the padding row makes it varlen again
    # only if it were handed over: it is dropped first
    check_isolation("sdpa", [16, 16], 3, 3, 1, 32, causal=False, device=device)


# --- Triton (interpreted on the CPU: portable and Hopper kernels) -----------------------------

@pytest.fixture
def triton_mode(monkeypatch):
    """Set the Triton kernels' switches of a case; on a GPU also torch's deterministic mode (the
    dK/dV of the GQA split then sums in a fixed order, so the runs are bitwise comparable)."""
    from prope_kernels.backends.triton import hopper, tuning
    changed = []

    def apply(q_on_load=True, kv_split=0, kernels="portable", fused_dq=None):
        monkeypatch.setenv("PROPE_TRITON_KERNELS", kernels)
        if kv_split:
            monkeypatch.setenv("PROPE_KV_SPLIT", str(kv_split))
        if not q_on_load:
            if ON_GPU:
                pytest.skip("the autotuner picks the Q rotation mode on a GPU")
            tuning.set_interpreter_q_on_load(False)
            changed.append("q_on_load")
        if fused_dq is not None:
            monkeypatch.setattr(hopper, "fused_dq", lambda d: fused_dq)
        if kernels == "hopper" and ((ON_GPU and not SM90) or not hopper.triton_supports()):
            pytest.skip("the Hopper kernels run on sm_90 GPUs (or the CPU interpreter)")
        if ON_GPU and kernels != "hopper":
            torch.use_deterministic_algorithms(True, warn_only=True)
    yield apply
    if changed:
        tuning.set_interpreter_q_on_load(True)
    torch.use_deterministic_algorithms(False)


TRITON_CASES = {
    # name: (check_isolation keywords, triton_mode keywords)
    "causal-gqa": (dict(hq=4, hkv=2, p=0.75), {}),
    "noncausal-mqa-qprerotated": (dict(hq=3, hkv=1, p=1.0, causal=False, dtype=torch.float16),
                                  dict(q_on_load=False)),
    "window-softcap-p0": (dict(hq=2, hkv=1, p=0.0, window=(6, 0), softcap=5.0), {}),
    "window2-softcap-split": (dict(hq=2, hkv=1, p=0.75, causal=False, window=(3, 8),
                                   softcap=10.0, dtype=torch.float16), dict(kv_split=2)),
    "backend-level": (dict(hq=2, hkv=1, p=0.75, level="backend"), {}),
    "hopper-fused": (dict(hq=2, hkv=1, p=0.75), dict(kernels="hopper", fused_dq=True)),
    "hopper-split-backend-level": (dict(hq=2, hkv=1, p=1.0, causal=False, level="backend"),
                                   dict(kernels="hopper", fused_dq=False)),
}


@pytest.mark.parametrize("case", list(TRITON_CASES))
def test_triton(device, triton_mode, case):
    kw, mode = TRITON_CASES[case]
    triton_mode(**mode)
    kw = dict(kw)
    check_isolation("triton", LENS, PAD, kw.pop("hq"), kw.pop("hkv"), 32, device=device, **kw)


# --- max_seqlen --------------------------------------------------------------------------------

def _small(device, lens=(3, 6), hq=2, hkv=1, d=16):
    gen = torch.Generator().manual_seed(1)
    total = sum(lens)
    q, k, v = (rand((total, h, d), torch.float16, device, gen) for h in (hq, hkv, hkv))
    cu = torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32, device=device)
    return q, k, v, cu


@pytest.mark.parametrize("backend", ["reference", "sdpa", "triton"])
def test_understated_max_seqlen_raises_in_eager_calls(device, backend):
    q, k, v, cu = _small(device)
    with pytest.raises(ValueError, match=r"max_seqlen \(5\) is smaller than the longest"):
        prope_attention_varlen(q, k, v, cu, 5, backend=backend)


def test_understated_max_seqlen_raises_in_the_op_on_cpu_cu_seqlens():
    # what torch.compile runs: the trace skips the value checks, the op makes them (free here)
    from prope_kernels.interface import _attn_fwd_op
    q, k, v, cu = _small("cpu")
    pos = torch.cat([torch.arange(3), torch.arange(6)])
    args = (0.75, 10000.0, "prope", "half", True, 0.25, -1, -1, 0.0, "reference")
    with pytest.raises(ValueError, match=r"max_seqlen \(5\)"):
        _attn_fwd_op(q, k, v, cu, pos, 5, *args)
    with pytest.raises(ValueError, match=r"must equal the number of tokens in q \(10\)"):
        _attn_fwd_op(*(torch.cat([x, x[:1]]) for x in (q, k, v)), cu,
                     torch.cat([pos, pos[:1]]), 6, *args)


def test_understated_max_seqlen_raises_under_torch_compile():
    q, k, v, cu = _small("cpu")

    def fn(q, k, v):
        return prope_attention_varlen(q, k, v, cu, 5, backend="reference")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match="max_seqlen") as err:
        compiled(q, k, v)
    # the op's ValueError, possibly wrapped by the compiled runtime
    assert isinstance(err.value, ValueError) or isinstance(err.value.__cause__, ValueError)


def test_reference_backend_checks_max_seqlen_itself(device):
    # it reads cu_seqlens on the host anyway (free), CUDA tensors included
    from prope_kernels.backends import reference as rb
    q, k, v, cu = _small(device)
    pos = torch.cat([torch.arange(3), torch.arange(6)]).to(device)
    with pytest.raises(ValueError, match=r"max_seqlen \(4\)"):
        rb.attn_fwd(q, k, v, cu, pos, 4, PRoPESpec(16, 0.75), True, 0.25)


@pytest.mark.parametrize("backend", ["reference", "sdpa", "triton"])
def test_overstated_max_seqlen_changes_nothing(device, backend):
    q, k, v, cu = _small(device, lens=(6, 6))     # 6, 6: sdpa's dense kernel at max_seqlen 6
    exact = prope_attention_varlen(q, k, v, cu, 6, backend=backend, return_lse=True)
    over = prope_attention_varlen(q, k, v, cu, 40, backend=backend, return_lse=True)
    for a, b in zip(exact, over):
        if backend == "sdpa":   # dense batch vs one call per sequence: other summation order
            torch.testing.assert_close(a, b)
        else:
            assert torch.equal(a, b)


def test_padding_rows_rejected_past_total(device):
    q, k, v, cu = _small(device)
    with pytest.raises(ValueError, match=r"cu_seqlens\[-1\] \(9\) exceeds the number of tokens"):
        prope_attention_varlen(q[:8], k[:8], v[:8], cu, 6, backend="reference")


# --- GPU sizes (skipped without a GPU) ---------------------------------------------------------

GPU_LENS, GPU_PAD = [1, 200, 0, 129, 64, 77], 50


def _gpu_backend_ok(name, d):
    be = backends.get(name)
    x = torch.empty(0, 1, d, device="cuda", dtype=torch.bfloat16)
    if not be.can_run(x):
        pytest.skip(f"backend={name!r} cannot run head_dim {d} here: {be.unavailable()}")


@pytest.mark.gpu
@pytest.mark.parametrize("kernels", ["sm90-fused", "sm90-split", "sm80"])
@pytest.mark.parametrize("level", ["api", "backend"])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("causal,p", [(True, 0.75), (False, 1.0), (True, 0.0)])
def test_gpu_cuda(monkeypatch, kernels, level, d, causal, p):
    _gpu_backend_ok("cuda", d)
    if kernels.startswith("sm90"):
        if not SM90:
            pytest.skip("the SM90 kernels run on sm_90 only")
        monkeypatch.setenv("PROPE_CUDA_SM90", "1")
        monkeypatch.setenv("PROPE_CUDA_SM90_BWD", kernels.split("-")[1])
    else:
        monkeypatch.setenv("PROPE_CUDA_SM90", "0")
    check_isolation("cuda", GPU_LENS, GPU_PAD, 8, 2, d, causal=causal, p=p, level=level,
                    device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("kernels", ["portable", "hopper"])
@pytest.mark.parametrize("level", ["api", "backend"])
@pytest.mark.parametrize("case", [dict(causal=True, p=0.75), dict(causal=False, p=1.0),
                                  dict(causal=True, p=0.0, window=(100, 0), softcap=30.0)])
def test_gpu_triton(triton_mode, kernels, level, case):
    if kernels == "hopper" and "window" in case:
        pytest.skip("the Hopper kernels have no window/softcap")
    triton_mode(kernels=kernels)
    check_isolation("triton", GPU_LENS, GPU_PAD, 8, 2, 128, level=level, device="cuda", **case)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_sdpa(causal):
    _gpu_backend_ok("sdpa", 128)
    check_isolation("sdpa", GPU_LENS, GPU_PAD, 8, 2, 128, causal=causal, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda", "sdpa"])
def test_gpu_max_seqlen(backend):
    _gpu_backend_ok(backend, 64)
    q, k, v, cu = _small("cuda", lens=(3, 60), hq=4, hkv=2, d=64)
    with pytest.raises(ValueError, match="max_seqlen"):
        prope_attention_varlen(q, k, v, cu, 59, backend=backend)
    a = prope_attention_varlen(q, k, v, cu, 60, backend=backend)
    b = prope_attention_varlen(q, k, v, cu, 1000, backend=backend)
    torch.testing.assert_close(a, b)   # (the autotuner may key its choice on max_seqlen)

