"""The vendor-core backend (backend="sdpa"): PyTorch's fused attention with our rotation around it,
and the ``auto`` dispatch (table, default, explain()).

On the CPU the backend runs PyTorch's CPU flash attention ATen op, so these tests check its
plumbing (rotation, layouts, lse, varlen, gradients, the lse gradient) against the float64
reference with the tolerance rule. The GPU kernels' calls (cuDNN, flash, memory-efficient) are
checked for shapes and layouts on the meta device here, and for numbers by the ``gpu`` cases.
"""

import json
import types

import pytest
import torch

from prope_kernels import dispatch, env, explain, prope_attention, prope_attention_varlen
from prope_kernels.backends import sdpa
from prope_kernels.rotary import PRoPESpec
from harness import HEADS, run_dense, run_varlen

# --- numbers against the reference (CPU: cpu_flash; GPU: the kernel choose() picks) -------------


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads", ["mha", "gqa", "mqa"])
@pytest.mark.parametrize("s", [1, 17, 97])
def test_shapes(device, s, heads, causal):
    hq, hkv = HEADS[heads]
    dtype = torch.bfloat16 if (s + len(heads)) % 2 else torch.float16
    run_dense(device, dtype, 3, s, hq, hkv, 32, causal=causal, backend="sdpa")


@pytest.mark.parametrize("variant,layout,p", [("prope", "half", 0.0), ("prope", "half", 0.25),
                                              ("reversed", "interleaved", 0.75),
                                              ("partial", "half", 1.0)])
def test_rotation_variants(device, variant, layout, p):
    run_dense(device, torch.bfloat16, 2, 41, 4, 2, 64, p=p, variant=variant, layout=layout,
              causal=p != 0.25, backend="sdpa")


@pytest.mark.parametrize("d", [16, 48, 80])
def test_head_dims(device, d):
    run_dense(device, torch.float16, 2, 33, 2, 1, d, p=0.5, layout="interleaved",
              backend="sdpa")


def test_softmax_scale_theta_and_long_positions(device):
    run_dense(device, torch.bfloat16, 1, 50, 2, 2, 64, p=0.25, theta=1e6, scale=0.3,
              backend="sdpa")
    gen = torch.Generator().manual_seed(7)
    pos = torch.randint(990_000, 1_000_000, (2, 24), generator=gen).to(device)
    run_dense(device, torch.float16, 2, 24, 2, 1, 64, p=1.0, theta=1e6, positions=pos,
              backend="sdpa")


@pytest.mark.parametrize("causal", [True, False])
def test_return_lse_and_its_gradient(device, causal):
    # the lse gradient is added outside the ATen backward (one extra fwd and bwd): exact math
    run_dense(device, torch.float16, 2, 29, 4, 2, 32, causal=causal, backend="sdpa", lse=True)
    run_dense(device, torch.bfloat16, 1, 18, 3, 1, 16, causal=causal, backend="sdpa", lse=True)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lens", [[1, 17, 40, 3], [70, 0, 33], [130]])
def test_varlen(device, lens, causal):
    run_varlen(device, torch.bfloat16, lens, 4, 2, 32, causal=causal, backend="sdpa")


def test_varlen_explicit_positions_and_mqa(device):
    run_varlen(device, torch.float16, [9, 31, 20], 4, 1, 64, p=0.25, variant="partial",
               layout="interleaved", explicit_positions=True, backend="sdpa")


def test_varlen_return_lse(device):
    gen = torch.Generator().manual_seed(4)
    cu = torch.tensor([0, 5, 5, 18], dtype=torch.int32, device=device)
    q, k, v = (torch.randn(18, h, 32, generator=gen).to(device, torch.float16)
               for h in (4, 2, 2))
    out, lse = prope_attention_varlen(q, k, v, cu, 13, backend="sdpa", return_lse=True)
    want, want_lse = prope_attention_varlen(q.float(), k.float(), v.float(), cu, 13,
                                            backend="reference", return_lse=True)
    assert lse.shape == (4, 18) and lse.dtype == torch.float32
    torch.testing.assert_close(lse, want_lse, atol=2e-2, rtol=0)
    torch.testing.assert_close(out.float(), want, atol=2e-2, rtol=0)


@pytest.mark.parametrize("p,layout", [(0.75, "half"), (0.25, "interleaved")])
def test_with_the_triton_rotation(device, monkeypatch, p, layout):
    # the GPU path's rotation: the Triton kernel into new buffers, dq'/dk' rotated back in place
    # (on the CPU under the interpreter)
    if device == "cpu" and not env.interpreting():
        pytest.skip("needs TRITON_INTERPRET=1 on the CPU")
    monkeypatch.setattr(sdpa, "_TRITON_ON_CPU", True)
    run_dense(device, torch.bfloat16, 2, 21, 4, 2, 32, p=p, layout=layout, backend="sdpa",
              lse=True)


def test_p_zero_rotates_nothing_and_rope_op(device):
    # p=0: the kernel's inputs are q and k themselves; the rope contract returns a new tensor
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(10, 2, 16, generator=gen).to(device, torch.float16)
    pos = torch.arange(10, device=device)
    spec0 = PRoPESpec(16, 0.0)
    assert sdpa._rotate(x, pos, spec0, False) is x
    y = sdpa.rope(x, pos, spec0, False)
    assert y is not x and torch.equal(y, x)
    spec = PRoPESpec(16, 0.5)
    back = sdpa.rope(sdpa.rope(x, pos, spec, False), pos, spec, True)
    torch.testing.assert_close(back, x, atol=2e-3, rtol=0)


# --- the cuDNN path on the CPU: an emulation of torch's cuDNN ops and their graph cache ----------

class FakeCudnn:
    """CPU stand-ins for aten._scaled_dot_product_cudnn_attention(_backward) (torch 2.11, cuDNN
    >= 9.5.1), numbers from the CPU flash ops, with the behaviour of torch's cuDNN integration
    that matters to the caller: outputs and gradients in the layouts of q, k, v, lse (b, h, s, 1),
    and the backward graph cache keyed on q/k/v shapes and strides only, whose graph keeps the
    grad_out strides of the call that built it (MHA.cpp: MHACacheKeyWrapper(q, k, v, ...),
    Do->set_stride(dO.strides())). A later call with the same q/k/v but another grad_out layout
    reads grad_out's memory with the first layout's strides, as the GPU does."""

    def __init__(self):
        self.graphs = {}  # key -> grad_out strides baked into the "graph"
        self.bwd_calls = 0

    def _scaled_dot_product_cudnn_attention(self, q, k, v, bias, lse, dropout, causal, debug,
                                            scale=None):
        assert bias is None and dropout == 0.0 and lse and not debug
        out, lse3 = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, scale=scale)
        o = torch.empty_like(q)  # cuDNN's output matches q's layout
        o.copy_(out)
        return o, lse3.float().unsqueeze(-1).contiguous(), None, None, q.shape[2], k.shape[2]

    def _scaled_dot_product_cudnn_attention_backward(self, do, q, k, v, o, lse4, seed, offset,
                                                     bias, cum_q, cum_k, max_q, max_k, dropout,
                                                     causal, scale=None):
        self.bwd_calls += 1
        assert do.stride(-1) == 1  # else torch would permute it to o's layout first
        assert lse4.shape == (*q.shape[:3], 1) and lse4.is_contiguous()
        key = (q.dtype, causal) + tuple((x.shape, x.stride()) for x in (q, k, v))
        strides = self.graphs.setdefault(key, do.stride())
        do_seen = do.as_strided(do.shape, strides, do.storage_offset())
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do_seen, q, k, v, o, lse4.squeeze(-1), 0.0, causal, scale=scale)
        return tuple(torch.empty_like(x).copy_(g) for x, g in zip((q, k, v), grads))


def test_fake_cudnn_reproduces_the_stale_graph():
    # the emulation itself: a second backward with a head-major grad_out reads it wrongly
    fake = FakeCudnn()
    gen = torch.Generator().manual_seed(3)
    b, s, h, d = 2, 9, 2, 16
    q, k, v = (torch.randn(b, s, h, d, generator=gen).transpose(1, 2) for _ in range(3))
    o, lse4 = fake._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False)[:2]
    do = torch.randn(b, s, h, d, generator=gen).transpose(1, 2)
    args = (o, lse4, None, None, None, None, None, s, s, 0.0, True)
    first = fake._scaled_dot_product_cudnn_attention_backward(do, q, k, v, *args)
    head_major = do.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)  # same values
    stale = fake._scaled_dot_product_cudnn_attention_backward(head_major, q, k, v, *args)
    assert not torch.allclose(stale[2], first[2])
    again = fake._scaled_dot_product_cudnn_attention_backward(do.clone(), q, k, v, *args)
    torch.testing.assert_close(again[2], first[2])


@pytest.mark.parametrize("heads", ["mha", "gqa", "mqa"])
def test_cudnn_path_with_a_stale_backward_graph(monkeypatch, heads):
    # the GPU failure of the lse gradient with cuDNN (dk wrong): the lse term's backward call
    # must hand cuDNN a grad_out in out's layout; on the CPU through the emulation above
    fake = FakeCudnn()
    monkeypatch.setattr(sdpa, "ATEN", fake)
    monkeypatch.setattr(sdpa, "choose", lambda q, k, n, s, c: sdpa.Choice("cudnn", True, False,
                                                                         "test"))
    hq, hkv = HEADS[heads]
    for causal in (True, False):
        run_dense("cpu", torch.float16, 2, 29, hq, hkv, 32, causal=causal, backend="sdpa",
                  lse=True)
    assert fake.bwd_calls >= 4  # (main + lse term) per run: the emulation was called


def test_unused_lse_adds_no_kernel_calls(monkeypatch):
    # without return_lse the lse gradient is None (not zeros): no lse-term forward/backward
    seen = []
    orig = sdpa.attn_bwd

    def spy(*args, **kw):
        seen.append(args[6])
        return orig(*args, **kw)
    monkeypatch.setattr(sdpa, "attn_bwd", spy)
    monkeypatch.setattr(sdpa, "_add_dlse", lambda *a: pytest.fail("lse term on a zero dlse"))
    q, k, v = (torch.randn(1, 16, h, 32, dtype=torch.float16, requires_grad=True)
               for h in (4, 2, 2))
    prope_attention(q, k, v, backend="sdpa").float().sum().backward()
    out, lse = prope_attention(q, k, v, backend="sdpa", return_lse=True)
    out.float().sum().backward()  # lse returned but unused
    assert seen == [None, None] and q.grad is not None


def test_efficient_choice_asks_torch_about_the_expanded_call(monkeypatch):
    # torch's efficient kernel has no GQA (can_use_efficient_attention refuses unequal heads):
    # the choice must ask about the call it makes, k/v expanded to q's heads, enable_gqa off
    import torch.backends.cuda as cb
    asked = []
    monkeypatch.setattr(cb, "can_use_efficient_attention",
                        lambda p, debug: asked.append(p) or True)
    q = torch.empty(2 * 24, 4, 512, dtype=torch.bfloat16)
    k = torch.empty(2 * 24, 1, 512, dtype=torch.bfloat16)
    ch = sdpa._choose_gpu(q, k, 2, 24, True, True, "efficient")
    assert ch.kernel == "efficient" and ch.expand_kv and "expanded" in ch.notes[0]
    p = asked[0]
    assert p.key.shape == p.value.shape == p.query.shape == (2, 4, 24, 512)
    assert not p.enable_gqa


# --- the GPU kernels' calls, on the meta device (shapes, layouts, lse conversions) ---------------

@pytest.mark.parametrize("kernel,dense,hq,hkv", [("cudnn", True, 4, 2), ("cudnn", True, 3, 1),
                                                 ("flash", True, 4, 2), ("flash", False, 6, 2),
                                                 ("efficient", True, 4, 2),
                                                 ("efficient", True, 4, 4)])
def test_gpu_kernel_calls_on_meta(kernel, dense, hq, hkv):
    b, s, d = 3, 40, 64
    total = b * s
    q = torch.empty(total, hq, d, device="meta", dtype=torch.bfloat16)
    k = torch.empty(total, hkv, d, device="meta", dtype=torch.bfloat16)
    cu = torch.arange(0, (b + 1) * s, s, device="meta", dtype=torch.int32)
    ch = sdpa.Choice(kernel, dense, kernel == "efficient" and hq != hkv, "test")
    out, lse = sdpa._fwd(ch, q, k, k, cu, s, True, 0.125)
    assert out.shape == q.shape and out.is_contiguous() and out.dtype == q.dtype
    assert lse.shape == (hq, total) and lse.is_contiguous() and lse.dtype == torch.float32
    if kernel == "efficient":
        return  # torch's meta function of _efficient_attention_backward lacks its `out` argument
    grads = sdpa._bwd(ch, torch.empty_like(out), q, k, k, out, lse, cu, s, True, 0.125)
    for g, x in zip(grads, (q, k, k)):
        assert g.shape == x.shape and g.is_contiguous() and g.dtype == x.dtype


@pytest.mark.parametrize("forced", [None, "cudnn", "flash", "efficient"])
def test_gpu_kernel_choice_runs_torch_checks(forced):
    # the GPU choice calls torch's own eligibility checks (SDPAParams, can_use_*); on CPU tensors
    # each refuses, and the answer says which kernel refused (varlen: cudnn/efficient not wired)
    q = torch.empty(2 * 24, 4, 64, dtype=torch.bfloat16)
    k = torch.empty(2 * 24, 2, 64, dtype=torch.bfloat16)
    for num_seqs, dense in ((2, True), (3, False)):
        ch = sdpa._choose_gpu(q, k, num_seqs, 24, True, dense, forced)
        assert ch.kernel is None and ch.dense == dense
        for kern in ([forced] if forced else sdpa.GPU_KERNELS):
            assert f"{kern}:" in ch.why, ch.why


def test_forced_kernel_must_be_known(monkeypatch):
    monkeypatch.setenv("PROPE_SDPA_KERNEL", "math")
    with pytest.raises(ValueError, match="PROPE_SDPA_KERNEL"):
        sdpa._forced()


def test_no_kernel_is_a_clear_error(monkeypatch, device):
    no = sdpa.Choice(None, True, False, "flash: head_dim 512 is above 256")
    monkeypatch.setattr(sdpa, "choose", lambda *a, **k: no)
    q, k, v = (torch.randn(1, 8, 2, 32, dtype=torch.float16, device=device) for _ in range(3))
    with pytest.raises(ValueError, match="backend='sdpa' has no PyTorch attention kernel.*512"):
        prope_attention(q, k, v, backend="sdpa")
    with pytest.raises(ValueError, match="backend='sdpa'"):
        explain(q, k, v, backend="sdpa")


# --- auto: the policy, the table, explain() ------------------------------------------------------

def _choice(kernel, dense=True):
    return sdpa.Choice(kernel, dense, False, "test")


KEY = dispatch.key("sm_90", 256, 8, True, False, 8192)


def _entry(backend, kernels="current"):
    """A table entry that compared triton and sdpa; kernels: the installed versions ("current"),
    others ("old") or none (a run from before they were recorded)."""
    have = dispatch.installed_kernels()
    rec = {"current": {b: have[b] for b in ("triton", "sdpa")},
           "old": {"triton": "0" * 16, "sdpa": have["sdpa"]}, None: None}[kernels]
    return {"backend": backend, "kernels": rec,
            "source": {"date_utc": "2026-11-26", "fwd_bwd_ms": {"triton": 8.7, "sdpa": 5.5}}}


@pytest.mark.parametrize("runnable,kernel,entry,want,source", [
    # no table entry: the documented default
    ({"sdpa": 1, "triton": 1}, "cudnn", None, "triton", "default"),  # sdpa: by table entry only
    ({"sdpa": 1, "triton": 1}, "flash", None, "triton", "default"),
    ({"sdpa": 1, "triton": 1}, "efficient", None, "triton", "default"),  # e.g. head_dim 512
    ({"triton": 1}, None, None, "triton", "default"),                   # sdpa unsupported
    ({"sdpa": 1}, "efficient", None, "sdpa", "default"),
    ({}, None, None, "reference", "default"),
    # a current entry wins when its backend can run, else the default applies
    ({"sdpa": 1, "triton": 1}, "cudnn", _entry("triton"), "triton", "table"),
    ({"sdpa": 1, "triton": 1}, "cudnn", _entry("sdpa"), "sdpa", "table"),
    ({"triton": 1}, None, _entry("sdpa"), "triton", "default"),
    # an expired entry (a compared backend's kernels changed, or no versions) is ignored
    ({"sdpa": 1, "triton": 1}, "cudnn", _entry("sdpa", "old"), "triton", "default"),
    ({"sdpa": 1, "triton": 1}, "cudnn", _entry("sdpa", None), "triton", "default"),
])
def test_auto_policy(runnable, kernel, entry, want, source):
    dec = dispatch.pick(runnable, _choice(kernel), KEY, entry)
    assert (dec.backend, dec.source) == (want, source), str(dec)
    if source == "default":
        assert "default" in dec.reason
    if entry and source == "default":
        assert any("cannot run here" in n or "table entry ignored" in n for n in dec.notes)
    if entry and entry["kernels"] != _entry("x")["kernels"]:
        assert any("table entry ignored" in n for n in dec.notes), str(dec)
    assert f"backend: {want}" in str(dec)


def test_kernel_versions_follow_the_sources(tmp_path):
    # a backend's version is a hash of its kernel sources: an edit changes it, and so expires
    # the table entries that timed it; a backend whose sources are absent has none
    from prope_kernels import backends
    root = tmp_path / "repo"
    for name in ("prope_kernels/backends/triton/ops.py", "prope_kernels/rotary.py"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("x = 1\n")
    before = backends.kernel_hash("triton", root)
    assert before and backends.kernel_hash("triton", root) == before
    (root / "prope_kernels/backends/triton/ops.py").write_text("x = 2\n")
    assert backends.kernel_hash("triton", root) not in (None, before)
    assert backends.kernel_hash("cuda", root) is None          # no csrc/ here
    assert set(dispatch.installed_kernels()) == {"triton", "sdpa", "cuda"}


def test_seqlen_bucket_and_key():
    assert [dispatch.seqlen_bucket(n) for n in (1, 128, 129, 4096, 5000)] == [128, 128, 256,
                                                                                4096, 8192]
    assert dispatch.key("sm_90", 128, 4, False, True, 3000) == dict(
        arch="sm_90", head_dim=128, group=4, causal=False, varlen=True, seqlen=4096)


def _row(case, backend, ms, **kw):
    r = dict(case=case, kind="ours", family="prope", status="ok", mode="fwd_bwd",
             backend=backend, ms_median=ms, head_dim=256, q_heads=8, kv_heads=1, causal=True,
             varlen=False, seqlen=8192, switches_set={})
    r.update(kw)
    return r


def test_table_written_from_rows_and_read_back(tmp_path, monkeypatch):
    hashes = dispatch.installed_kernels()
    meta = dict(capability="9.0", gpu="NVIDIA H100", run_kind="gpu", date_utc="2026-11-26",
                git_commit="abc", kernel_hashes=hashes)
    rows = [_row("gemma-2b", "triton", 8.7), _row("gemma-2b", "sdpa", 4.9),
            _row("gemma-2b", "auto", 4.8),                        # auto is not a backend to pick
            _row("gemma-2b", "cuda", 3.0, provider="prope-cuda-sm90-atomic"),  # a forced variant
            _row("gemma-2b", "cuda", 2.0, provider="prope-cuda",  # a switch set by the user
                 switches_set={"PROPE_CUDA_SM90_FWD": "basic"}),
            _row("gemma-2b", "cuda", 5.8, provider="prope-cuda"),
            _row("gemma-2b", "sdpa", 1.0, mode="fwd"),            # only fwd+bwd decides
            _row("llama-gqa", "triton", 9.0, head_dim=128, q_heads=32, kv_heads=8,
                 seqlen=4096),                                    # one backend: no entry
            _row("mha-d64", "sdpa", 2.0, status="failed", head_dim=64, q_heads=32,
                 kv_heads=32, seqlen=4096)]
    table = dispatch.table_from_rows(rows, meta, "2026-11-26_run")
    assert table["run"]["name"] == "2026-11-26_run" and len(table["entries"]) == 1
    e = table["entries"][0]
    assert e["backend"] == "sdpa"
    assert e["source"]["fwd_bwd_ms"] == {"triton": 8.7, "sdpa": 4.9, "cuda": 5.8}
    assert e["kernels"] == {b: hashes[b] for b in ("triton", "sdpa", "cuda")}
    assert dispatch._key_tuple(e) == dispatch._key_tuple(KEY)
    path = tmp_path / "dispatch.json"
    dispatch.write(path, table)
    # a second run replaces the whole table: nothing of the first is merged in
    dispatch.write(path, dispatch.table_from_rows(rows[-2:], meta, "other"))
    data = json.loads(path.read_text())
    assert data["entries"] == [] and data["run"]["name"] == "other"
    dispatch.write(path, table)
    monkeypatch.setenv("PROPE_DISPATCH_TABLE", str(path))
    assert dispatch.lookup(KEY)["backend"] == "sdpa"
    assert dispatch.expired(dispatch.lookup(KEY)) is None
    assert dispatch.lookup(dict(KEY, arch="sm_80")) is None


def test_legacy_rows_count_only_at_their_defaults():
    # runs from before `switches_set` name the switches in notes; a leaked one excludes the row
    for notes, ok in [("PROPE_CUDA_SM90=unset; PROPE_CUDA_SM90_FWD=unset", True),
                      ("PROPE_TRITON_KERNELS=auto; configs fwd 64x64 w4 s3 q0", True),
                      ("PyTorch kernel: cudnn", True),
                      ("PROPE_CUDA_SM90=1; PROPE_CUDA_SM90_BWD=atomic", False),
                      ("PROPE_TRITON_KERNELS=hopper; configs hfwd 128x64 w8 s2", False),
                      ("PROPE_CUDA_SM90=0", False)]:
        assert dispatch.ran_defaults({"notes": notes}) is ok, notes


def test_committed_table_is_its_run():
    # prope_kernels/dispatch.json is exactly what its one committed run gives through the code
    # that writes it: no hand-edited or merged entry survives this
    from pathlib import Path
    data = json.loads(dispatch.TABLE.read_text())
    assert data["schema"] == dispatch.SCHEMA
    run = data["run"]["name"]
    folder = Path(__file__).resolve().parent.parent / "bench" / "results" / run
    raw = next(folder / n for n in ("results.json", "bench.json") if (folder / n).is_file())
    rawd = json.loads(raw.read_text())
    assert rawd["meta"]["run_kind"] == "gpu"
    assert data == dispatch.table_from_rows(rawd["results"], rawd["meta"], run)


def test_table_of_the_2026_11_26_validation_run():
    # what that run measured at the backends' defaults: gemma-2b only (llama-gqa's CUDA row ran
    # switches leaked from the provider before it, its sdpa row never ran); it recorded no kernel
    # versions, so its entry has expired
    from pathlib import Path
    raw = (Path(__file__).resolve().parent.parent / "bench" / "results" /
           "2026-11-26_nvidia-h100-80gb-hbm3_validate" / "bench.json")
    rawd = json.loads(raw.read_text())
    entries = dispatch.table_from_rows(rawd["results"], rawd["meta"], "v")["entries"]
    assert [(e["source"]["case"], e["backend"]) for e in entries] == [("gemma-2b", "sdpa")]
    assert entries[0]["source"]["fwd_bwd_ms"] == {"cuda": 5.8371, "triton": 8.7819,
                                                  "sdpa": 5.5261}
    assert dispatch.expired(entries[0]) == "its run recorded no kernel versions"


def test_explain_on_cpu(device):
    q, k, v = (torch.randn(2, 16, h, 32, dtype=torch.float16, device=device) for h in (4, 2, 2))
    dec = explain(q, k, v, p=0.5)
    if device == "cpu":
        assert dec.backend == "reference" and "CUDA" in dec.reason
        assert prope_attention(q, k, v, p=0.5).shape == q.shape  # and auto does run it
    dec = explain(q, k, v, backend="sdpa")
    assert dec.backend == "sdpa" and dec.source == "requested" and dec.kernel
    cu = torch.tensor([0, 7, 32], dtype=torch.int32, device=device)
    dec = explain(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, 25, backend="sdpa")
    assert dec.kernel
    with pytest.raises(ValueError, match="p must be in"):
        explain(q, k, v, p=2.0)
    with pytest.raises(TypeError, match="max_seqlen"):
        explain(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu)


# --- GPU (skipped without one) ------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["cudnn", "flash", "efficient"])
@pytest.mark.parametrize("heads", ["mha", "gqa", "mqa"])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_gpu_each_kernel(monkeypatch, kernel, heads, d):
    monkeypatch.setenv("PROPE_SDPA_KERNEL", kernel)
    hq, hkv = {"mha": (8, 8), "gqa": (8, 2), "mqa": (8, 1)}[heads]
    q = torch.empty(2 * 1025, hq, d, device="cuda", dtype=torch.bfloat16)
    k = torch.empty(2 * 1025, hkv, d, device="cuda", dtype=torch.bfloat16)
    ch = sdpa.choose(q, k, 2, 1025, True)
    if ch.kernel is None:
        pytest.skip(f"torch refuses {kernel} here: {ch.why}")
    for causal in (True, False):
        run_dense("cuda", torch.bfloat16, 2, 1025, hq, hkv, d, causal=causal, backend="sdpa")


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["cudnn", "flash", "efficient"])
def test_gpu_lse(monkeypatch, kernel):
    monkeypatch.setenv("PROPE_SDPA_KERNEL", kernel)
    run_dense("cuda", torch.bfloat16, 2, 1000, 8, 2, 128, backend="sdpa", lse=True)


@pytest.mark.gpu
def test_gpu_cudnn_backward_any_dout_layout(monkeypatch, record_property):
    # the same backward with a head-major dout (same values) after a contiguous one: the
    # gradients must not change (torch's cached cuDNN graph would read it with stale strides)
    monkeypatch.setenv("PROPE_SDPA_KERNEL", "cudnn")
    b, s, hq, hkv, d = 2, 256, 8, 2, 128
    gen = torch.Generator().manual_seed(11)
    q, dout = (torch.randn(b * s, hq, d, generator=gen).cuda().bfloat16() for _ in range(2))
    k, v = (torch.randn(b * s, hkv, d, generator=gen).cuda().bfloat16() for _ in range(2))
    ch = sdpa.choose(q, k, b, s, True)
    if ch.kernel != "cudnn":
        pytest.skip(f"torch refuses cudnn here: {ch.why}")
    out, lse = sdpa._fwd(ch, q, k, v, None, s, True, d ** -0.5)
    want = sdpa._bwd(ch, dout, q, k, v, out, lse, None, s, True, d ** -0.5)
    head_major = dout.transpose(0, 1).contiguous().transpose(0, 1)
    got = sdpa._bwd(ch, head_major, q, k, v, out, lse, None, s, True, d ** -0.5)
    for name, w, g in zip(("dq", "dk", "dv"), want, got):
        err = (g.float() - w.float()).abs().max().item()
        assert err < 2e-2, f"{name}: {err}"
    # what torch itself does with such a dout (recorded in the junit xml, not asserted: a later
    # torch may key its graph cache on dout's strides)
    t = lambda x: x.view(b, s, -1, d).transpose(1, 2)  # noqa: E731
    lse4 = lse.view(hq, b, s).transpose(0, 1).contiguous().unsqueeze(-1)
    seed = torch.empty((), dtype=torch.int64, device="cuda")
    raw = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        t(head_major), t(q), t(k), t(v), t(out), lse4, seed, seed, None, None, None, s, s, 0.0,
        True, scale=d ** -0.5)
    err = (raw[2].transpose(1, 2).reshape(b * s, hkv, d).float() - want[2].float()).abs().max()
    record_property("torch_cudnn_bwd_head_major_dout_dv_max_err", float(err))


@pytest.mark.gpu
def test_gpu_varlen_flash_and_head_dim_512():
    run_varlen("cuda", torch.bfloat16, [1, 3000, 0, 517, 2048, 7], 16, 4, 128, backend="sdpa")
    # head_dim 512: only the memory-efficient kernel, which has no GQA: k/v expanded
    q = torch.empty(1024, 4, 512, device="cuda", dtype=torch.bfloat16)
    ch = sdpa.choose(q, q[:, :1], 1, 1024, True)
    assert (ch.kernel, ch.expand_kv) == ("efficient", True), ch
    run_dense("cuda", torch.bfloat16, 1, 1024, 4, 1, 512, p=0.25, theta=1e6, backend="sdpa")
    run_dense("cuda", torch.bfloat16, 1, 300, 4, 2, 512, p=0.25, theta=1e6, backend="sdpa",
              lse=True)


@pytest.mark.gpu
def test_gpu_explain_default():
    q, k, v = (torch.randn(2, 2048, h, 128, device="cuda", dtype=torch.bfloat16)
               for h in (8, 2, 2))
    dec = explain(q, k, v)
    print(dec)
    if dec.source == "default":
        assert dec.backend == "triton", str(dec)
    q5, k5, v5 = (torch.randn(1, 256, h, 512, device="cuda", dtype=torch.bfloat16)
                  for h in (4, 1, 1))
    assert explain(q5, k5, v5).backend == "triton"


def test_auto_respects_needed_features(monkeypatch):
    # a feature the sdpa backend lacks (e.g. a sliding window) takes it out of auto's choice
    from prope_kernels import backends
    seen = {}

    def fake_pick(runnable, ch, k_, entry, cuda_preferred=False, notes=None):
        seen.update(runnable=dict(runnable), ch=ch)
        return dispatch.Decision("x", "", "default")
    monkeypatch.setattr(dispatch, "pick", fake_pick)
    monkeypatch.setattr(dispatch, "arch", lambda dev: "sm_90")
    monkeypatch.setattr(sdpa, "choose", lambda *a: _choice("flash"))
    q = types.SimpleNamespace(device=torch.device("cuda"), dtype=torch.bfloat16,
                              shape=(64, 4, 128))
    k = types.SimpleNamespace(shape=(64, 2, 128))
    feats = {n: be.features for n, be in backends.REGISTRY.items()}
    dispatch.decide(q, k, 1, 64, True)
    assert "sdpa" in seen["runnable"] and seen["ch"].kernel == "flash"
    missing = next(iter({"window", "softcap"} - set(feats["sdpa"])))
    dispatch.decide(q, k, 1, 64, True, needs=frozenset({missing}))
    assert "sdpa" not in seen["runnable"] and missing in seen["ch"].why
