"""The trainer: learning on the bundled corpus, exact resume, the distributed paths (DDP, FSDP2,
sharded resume), the fused kernels in a training step against the float64 reference (and broken
kernels failing that check), CLI errors. Kept small (tiny presets, short rows):
about 5 CPU-minutes in all (2.5 minutes on 2 free cores), most of it the two-process runs."""

import contextlib
import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch

from prope_kernels import backends
from prope_kernels.models import preset
from prope_kernels.train import TrainConfig, main, parse_args, train


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    # one tokenizer cache for the whole session (the tokenizer is trained once)
    monkeypatch.setenv("PROPE_CACHE", str(tmp_path_factory.getbasetemp() / "prope_cache"))


def _cfg(out, name="gemma-tiny", attn="reference", **kw):
    base = dict(model=preset(name, attn=attn), vocab_size=512, seq_len=64, batch_size=8,
                steps=8, eval_every=4, eval_batches=2, lr=3e-3, warmup=2, out=str(out),
                progress=False)
    base.update(kw)
    return TrainConfig(**base)


def _losses(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def test_loss_decreases_on_bundled_corpus(tmp_path):
    res = train(_cfg(tmp_path / "run", steps=40, eval_every=20))
    m = res["metrics"]
    first = sum(r["loss"] for r in m[:5]) / 5
    last = sum(r["loss"] for r in m[-5:]) / 5
    vals = [r["val_loss"] for r in m if "val_loss" in r]
    assert last < first - 0.5, (first, last)
    assert vals[-1] < first - 0.5  # held-out documents improve too
    assert (tmp_path / "run" / "loss.png").stat().st_size > 0
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["model"]["global_attn"]["p"] == 0.75 and cfg["model"]["vocab_size"] == 512
    assert cfg["train"]["model"]["global_attn"]["p"] == 0.75


def test_resume_continues_the_same_curve(tmp_path):
    straight = train(_cfg(tmp_path / "a", steps=8))["metrics"]
    train(_cfg(tmp_path / "b", steps=8, stop_at=4))
    resumed = train(_cfg(tmp_path / "b", steps=8, resume=True))["metrics"]
    assert [r["step"] for r in resumed] == list(range(1, 9))
    for r1, r2 in zip(straight, resumed):
        assert r1["loss"] == pytest.approx(r2["loss"], rel=1e-6, abs=1e-6), (r1, r2)
    assert straight[-1]["val_loss"] == pytest.approx(resumed[-1]["val_loss"], rel=1e-6)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(out, *extra, steps=4):
    """prope-train on 2 CPU processes over gloo (as torchrun would start them)."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               WORLD_SIZE="2", OMP_NUM_THREADS="1")
    args = [sys.executable, "-m", "prope_kernels.train", "--preset", "gemma-tiny",
            "--vocab-size", "512", "--seq-len", "64", "--batch-size", "8", "--steps", str(steps),
            "--eval-every", "4", "--eval-batches", "2", "--lr", "3e-3", "--warmup", "2",
            "--attn", "reference", "--device", "cpu", "--no-progress", "--out", str(out), *extra]
    procs = [subprocess.Popen(args, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in (0, 1)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    return _losses(out)


def _agree(a, b, rel):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=rel), (x, y)
    assert a[-1]["val_loss"] == pytest.approx(b[-1]["val_loss"], rel=rel)


def test_two_process_gloo_runs_agree_with_one_process_and_resume_exactly(tmp_path):
    # DDP and FSDP2 (fully_shard) on 2 processes follow the 1-process curve (the gradient
    # reductions change the order of float sums, so not bitwise)
    # the CPU (gloo) path on any machine: on a one-GPU machine two ranks could not each own a GPU
    single = train(_cfg(tmp_path / "one", steps=4, eval_every=4, device="cpu"))["metrics"]
    _agree(single, _two_processes(tmp_path / "ddp"), rel=1e-4)
    # FSDP with 2 micro-batches a step (gradient sync on the last only): the same 8 rows a step,
    # and the same 16 validation rows (4 batches of 4)
    accum = ("--grad-accum", "2", "--eval-batches", "4")
    fsdp = _two_processes(tmp_path / "fsdp", "--fsdp", *accum)
    _agree(single, fsdp, rel=1e-4)
    conf = json.loads((tmp_path / "fsdp" / "config.json").read_text())
    assert conf["world_size"] == 2 and conf["parallel"] == "fsdp"
    # FSDP checkpoints are sharded: a torch.distributed.checkpoint folder, one file a rank
    assert len(list((tmp_path / "fsdp" / "checkpoint" / "dcp").glob("*.distcp"))) == 2
    # sharded resume: 2 steps, then 2 more from the checkpoint, equal the 4 straight steps
    _two_processes(tmp_path / "b", "--fsdp", *accum, "--stop-at", "2")
    _agree(fsdp, _two_processes(tmp_path / "b", "--fsdp", *accum, "--resume"), rel=1e-6)
    # resuming a sharded checkpoint in one process is refused clearly
    with pytest.raises(Exception, match="sharded"):
        train(_cfg(tmp_path / "b", steps=4, resume=True, device="cpu"))


@pytest.mark.parametrize("fsdp", [False, True])
def test_cpu_run_never_touches_cuda(tmp_path, monkeypatch, fsdp):
    """--device cpu on a GPU machine (the gloo tests there): save and resume, sharded (torch's
    checkpoint writer) or not, never open a CUDA context (one failed there on a full GPU)."""
    import torch._dynamo  # noqa: F401  (its import maps torch's functions: before the fakes)

    def refuse(name):
        def fake(*a, **k):
            raise AssertionError(f"a --device cpu run called torch.cuda.{name}")
        return fake
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name in ("get_rng_state", "set_rng_state", "current_stream", "Stream", "init"):
        monkeypatch.setattr(torch.cuda, name, refuse(name))
    # torch's own AdamW.step asks the accelerator whether a CUDA graph is being captured
    # (torch >= 2.12: torch.accelerator.current_stream().is_capturing()), which a CPU machine
    # with a CUDA build of torch cannot answer: the faked GPU answers "not capturing". That
    # query is torch's, whatever the run's device; the trainer's own calls are refused above.
    if torch.cuda.device_count() == 0 and hasattr(torch, "accelerator"):
        class _NotCapturing:
            def is_capturing(self):
                return False
        monkeypatch.setattr(torch.accelerator, "current_stream", lambda *a, **k: _NotCapturing(),
                            raising=False)
    if fsdp:  # one rank over gloo, as torchrun would start it
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", str(_free_port()))
        for var, val in (("WORLD_SIZE", "1"), ("RANK", "0"), ("LOCAL_RANK", "0")):
            monkeypatch.setenv(var, val)
    cfg = dict(steps=2, eval_every=2, device="cpu", fsdp=fsdp)
    try:
        train(_cfg(tmp_path / "r", stop_at=1, **cfg))
        assert (tmp_path / "r" / "checkpoint" / ("dcp" if fsdp else "model.safetensors")).exists()
        resumed = train(_cfg(tmp_path / "r", resume=True, **cfg))["metrics"]
        assert [r["step"] for r in resumed] == [1, 2]
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "prope_kernels.train", *args],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args,msg", [
    (["--data", "/nonexistent/corpus.txt"], "does not exist"),
    (["--preset", "gemma-7b", "--device", "cpu"], "needs about"),
    (["--preset", "nope"], "invalid choice"),
    (["--p", "1.5"], "--p must be in [0, 1]"),
    (["--local-p", "-0.1", "--preset", "gemma3-tiny"], "--local-p must be in [0, 1]"),
    (["--window", "8"], "no local_attn"),  # gemma-small has no local layers
    (["--window", "-1", "--preset", "gemma2-tiny"], "window must be >= 0"),
    (["--batch-size", "6", "--grad-accum", "4"], "multiple of --grad-accum"),
    (["--steps", "0"], "--steps must be positive"),
    (["--tokenizer", "/nonexistent.model"], "does not exist"),
    # a backend lacking a feature the preset's layers use: refused before any setup
    (["--attn", "sdpa", "--preset", "gemma2-tiny"], "--attn sdpa: backend='sdpa' does not "
                                                    "implement softcap or window"),
])
def test_cli_errors_are_clear(args, msg, capsys, tmp_path):
    # in process (an unexpected exception would fail the test with its traceback)
    try:
        code = main([*args, "--out", str(tmp_path / "run"), "--no-progress"])
    except SystemExit as e:  # argparse's errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert msg in err, err


@pytest.mark.parametrize("attn", ["triton", "cuda"])
def test_kernel_backend_on_the_cpu_is_an_argument_error(attn, monkeypatch, capsys, tmp_path):
    # --attn triton/cuda on a CPU run (no interpreter): an argparse error naming the argument,
    # exit 2, before the header and any setup (no corpus, tokenizer, model or run folder)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(SystemExit) as e:
        main(["--attn", attn, "--device", "cpu", "--out", str(tmp_path / "run"), "--no-progress"])
    assert e.value.code == 2
    out, err = capsys.readouterr()
    assert f"error: --attn {attn}: the {attn} kernels need a CUDA GPU" in err, err
    assert "--device cpu" in err and "one of --attn auto, " in err
    assert ("TRITON_INTERPRET=1" in err) == (attn == "triton")
    assert out == "" and not (tmp_path / "run").exists()
    # the Triton interpreter makes --attn triton a valid CPU run (the fused-run test trains it)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if attn == "triton" and backends.get("triton").unavailable() is None:
        assert parse_args(["--attn", "triton", "--device", "cpu"]).model.attn == "triton"


def test_header_comes_before_the_setup(monkeypatch, capsys, tmp_path):
    # what the run will do is printed first (the setup takes seconds: corpus, tokenizer, model)
    from prope_kernels import train as train_mod

    seen = {}

    def fake_train(cfg, log=None):
        seen["out"] = capsys.readouterr().out  # printed before train() was called
        log("ready")
        return {"final": {}, "out": cfg.out, "metrics": []}

    monkeypatch.setattr(train_mod, "train", fake_train)
    assert main(["--device", "cpu", "--out", str(tmp_path / "r"), "--no-progress"]) == 0
    out = " ".join(seen["out"].split())
    params = preset("gemma-small").updated(vocab_size=4096).num_params()
    assert f"prope-train: {params / 1e6:.1f}M parameters (vocabulary 4096)" in out, out
    for text in ("device cpu, float32", "attention auto (the reference on the CPU)",
                 "2,048 tokens a step (8 rows x 256), 150 steps", "data: the bundled corpus",
                 f"run folder: {tmp_path / 'r'}", "preparing the data"):
        assert text in out, (text, out)
    assert capsys.readouterr().out == "ready\n"  # train's log line goes to the same stream


def test_help_comes_from_the_dataclass_fields():
    r = _cli("--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())  # argparse wraps lines
    for flag in ("--preset", "--p ", "--local-p", "--window", "--attn", "--data", "--resume",
                 "--grad-accum", "--fsdp"):
        assert flag in r.stdout
    # texts written once, on the fields (TrainConfig, GemmaConfig, LayerAttn metadata)
    assert "0 = NoPE, 1 = RoPE" in text and "micro-batches per step" in text
    assert "shard parameters, gradients and optimizer state" in text


def test_defaults_are_the_main_job():
    cfg = parse_args([])
    assert cfg.model == preset("gemma-small") and cfg.data == ""
    assert (cfg.model.global_attn.p, cfg.model.attn, cfg.model.local_attn) == (0.75, "auto", None)
    assert cfg == TrainConfig()  # the CLI's defaults are the dataclass's
    cfg = parse_args(["--preset", "gemma4-tiny", "--local-p", "0.5", "--window", "8"])
    assert (cfg.model.global_attn.p, cfg.model.local_attn.p, cfg.model.local_attn.window) == \
        (0.25, 0.5, 8)  # unset flags keep the preset's values


def test_gemma2_preset_trains(tmp_path):
    # a family with windows and softcaps through the trainer (packed rows, varlen path)
    m = train(_cfg(tmp_path / "g2", name="gemma2-tiny", steps=4, eval_every=4))["metrics"]
    assert m[-1]["loss"] < m[0]["loss"] and math.isfinite(m[-1]["val_loss"])


# --- the fused kernels in the trainer, against the float64 reference -----------------------------
# One training step of the same model (same weights, same packed batch) three times: attention
# by the reference in float64 (the truth), by the reference math in bf16 (the unfused baseline:
# q, k, v rounded to bf16 as the fused path rounds them, then PyTorch's bf16 arithmetic) and by
# the fused Triton kernels (the interpreter on the CPU: an fp32 model attending in bf16; on a GPU
# both low-precision runs under bf16 autocast). Each layer's attention output and each parameter
# gradient of the fused run must be within 2x the baseline's error (Frobenius norms against the
# truth) plus what storing the truth in the run's dtype costs. On the CPU the unbroken kernels
# use at most 0.48 of the bound (every tensor's error within 0.96x the baseline's) and each
# mutation of MUTATIONS fails it by 4.8x (p forced to 1) to 88x (non-causal).

# name: (preset overrides, q/k gain, seq_len). The trainer's initial weights, with q and k
# scaled (their projections, or their RMSNorm weights under qk-norm) so that attention logits
# spread over about +-2: at initialization they are ~0.03 without qk-norm (nearly uniform
# attention: where the keys sit barely matters, so causality and positions go unchecked) and
# ~+-8 with Gemma 4's qk-norm and scale 1 (so peaked that bf16 rounding tips near-ties and the
# runs drift apart over the layers, which hides a wrong global layer). gemma2-tiny: softcaps of
# 5, which bind at these logits (Gemma 2's 50 would not). gemma4-tiny: rows of 64 tokens, so
# that the slow pairs its 0.25-RoPE global layer leaves still (theta 1e6) would turn by up to
# 2 rad if they rotated.
SHARP = {
    "gemma-tiny": ({}, 8.0, 32),
    "gemma4-tiny": ({}, 0.5, 64),
    "gemma2-tiny": ({"softcap": 5.0, "local_softcap": 5.0}, 8.0, 32),
}


def _bf16_reference(q, k, v, cu_seqlens=None, max_seqlen=None, *, p, theta, variant, layout,
                    causal=True, softmax_scale=None, window=(-1, -1), softcap=None,
                    backend=None):
    """The unfused baseline for the model's attention call: the reference math in bf16."""
    from prope_kernels import reference as ref
    from prope_kernels.rotary import PRoPESpec

    spec = PRoPESpec(q.shape[-1], p, theta, variant, layout)
    with torch.autocast(q.device.type, enabled=False):
        x = [t.bfloat16() for t in (q, k, v)]
        if cu_seqlens is None:
            o = ref.prope_attention(*x, spec, causal, softmax_scale, window=window,
                                    softcap=softcap)
        else:
            o = ref.prope_attention_varlen(*x, cu_seqlens, spec, causal, softmax_scale,
                                           window=window, softcap=softcap)
    return o.to(q.dtype)


def _one_step(out, name, device, attn, float64=False, call=None):
    """The attention output of each layer and the gradient of each parameter in one trainer
    step (train_step, before the optimizer uses them). ``call(fn)`` wraps the model's attention
    call (prope_attention / prope_attention_varlen, as models.gemma calls them)."""
    from prope_kernels.models import gemma
    from prope_kernels.train import setup, train_step

    overrides, gain, seq_len = SHARP[name]
    run = setup(TrainConfig(model=preset(name, attn=attn, **overrides), vocab_size=512,
                            seq_len=seq_len, batch_size=4, steps=1, warmup=1, clip=0.0,
                            device=device, out=str(out), progress=False))
    with torch.no_grad():
        for layer in run.model.layers:
            a = layer.self_attn
            if run.model_cfg.qk_norm:  # the norm scales by (1 + w) or w: scale that by gain
                for w in (a.q_norm.weight, a.k_norm.weight):
                    w.copy_((1 + w) * gain - 1 if run.model_cfg.norm_unit_offset else w * gain)
            else:
                a.q_proj.weight.mul_(gain)
                a.k_proj.weight.mul_(gain)
    if float64:
        run.model.double()
        run.autocast = contextlib.nullcontext
    found = {}
    for i, layer in enumerate(run.model.layers):
        layer.self_attn.register_forward_hook(
            lambda m, args, o, i=i: found.__setitem__(f"attention output of layer {i}",
                                                      o.detach().clone()))

    def snapshot(*args, **kwargs):  # instead of the update
        for n, p in run.model.named_parameters():
            found[f"gradient of {n}"] = p.grad.detach().clone()
    run.opt.step = snapshot
    with pytest.MonkeyPatch.context() as mp:
        if call is not None:
            mp.setattr(gemma, "prope_attention", call(gemma.prope_attention))
            mp.setattr(gemma, "prope_attention_varlen", call(gemma.prope_attention_varlen))
        train_step(run)
    return found


_YARDSTICKS = {}


def _yardsticks(out, name, device):
    """(truth, baseline) of :func:`_one_step` for a preset, once per session."""
    if (name, device) not in _YARDSTICKS:
        truth = _one_step(out / "float64", name, device, "reference", float64=True)
        base = _one_step(out / "bf16", name, device, "reference",
                         call=lambda fn: _bf16_reference)
        _YARDSTICKS[name, device] = truth, base
    return _YARDSTICKS[name, device]


def check_sharp(truth, base, fused, factor=2.0):
    """Each tensor of ``fused`` against the float64 ``truth``: ||fused - truth|| <= factor *
    ||base - truth|| + 2 ||truth rounded to fused's dtype - truth|| (Frobenius norms). Returns
    the rows (error / bound, name, error, bound), worst first; AssertionError naming the worst
    tensors when any is over its bound (or not finite)."""
    assert truth.keys() == base.keys() == fused.keys()
    rows = []
    for key, t in truth.items():
        got = fused[key]
        assert torch.isfinite(got).all(), f"{key}: non-finite values in the fused run"
        t = t.double()
        err = (got.double() - t).norm().item()
        err_base = (base[key].double() - t).norm().item()
        floor = 2 * (t.to(got.dtype).double() - t).norm().item()
        bound = factor * err_base + floor + 1e-30
        rows.append((err / bound, key, err, bound))
    rows.sort(reverse=True)
    over = [r for r in rows if r[0] > 1]
    assert not over, (f"{len(over)} of {len(rows)} tensors over the bound ({factor}x the bf16 "
                      "baseline's error + floor): " + "; ".join(
                          f"{k}: error {e:.3e} > bound {b:.3e} ({r:.2f}x)"
                          for r, k, e, b in over[:4]))
    return rows


@pytest.mark.parametrize("name", list(SHARP))
def test_triton_attention_trains_like_reference(tmp_path, device, name):
    # a trainer step with the fused Triton kernels (gemma-tiny: Gemma 1, p = 0.75; gemma4-tiny:
    # windows on packed rows, head_dim 32 local and 64 global, 0.25-RoPE global layers, scale 1;
    # gemma2-tiny: windows and softcaps, GQA) is as close to the float64 reference as the bf16
    # reference math is, layer by layer and gradient by gradient
    truth, base = _yardsticks(tmp_path, name, device)
    fused = _one_step(tmp_path / "triton", name, device, "triton")
    rows = check_sharp(truth, base, fused)
    assert len(rows) == len(truth) > 10


_MUTATED = []  # per attention call of a mutated run: whether the mutation changed it


def _mutation(change):
    """A ``call`` for :func:`_one_step` that applies ``change`` to the keyword arguments of
    each attention call."""
    def call(fn):
        def mutated(*args, **kw):
            before = dict(kw)
            change(kw)
            _MUTATED.append(kw != before)
            return fn(*args, **kw)
        return mutated
    return call


# each mutation of the fused run's attention call, and the preset that guards it
MUTATIONS = {
    "non-causal": ("gemma-tiny", lambda kw: kw.update(causal=False)),
    "p forced to 0": ("gemma-tiny", lambda kw: kw.update(p=0.0)),
    "p forced to 1": ("gemma4-tiny", lambda kw: kw.update(p=1.0)),   # its global layer: p 0.25
    "window one key wider": ("gemma2-tiny", lambda kw: "window" in kw and kw.update(
        window=(kw["window"][0] + 1, kw["window"][1]))),
    "softcap halved": ("gemma2-tiny", lambda kw: "softcap" in kw and kw.update(
        softcap=kw["softcap"] / 2)),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_broken_fused_attention_fails_the_check(tmp_path, device, mutation):
    # the comparison above is sharp: the fused run with one argument of its attention call
    # broken fails it
    name, change = MUTATIONS[mutation]
    truth, base = _yardsticks(tmp_path, name, device)
    _MUTATED.clear()
    broken = _one_step(tmp_path / "triton", name, device, "triton", call=_mutation(change))
    assert any(_MUTATED)  # the mutation changed a call
    with pytest.raises(AssertionError, match="over the bound"):
        check_sharp(truth, base, broken)
