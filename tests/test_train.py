"""The trainer: learning on the bundled corpus, exact resume, the distributed paths (DDP, FSDP2,
sharded resume), the fused kernels in training, CLI errors. Kept small (tiny presets, short rows):
about 5 CPU-minutes in all (2.5 minutes on 2 free cores), most of it the two-process runs."""

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


@pytest.mark.parametrize("name", ["gemma-tiny", "gemma4-tiny"])
def test_triton_attention_trains_like_reference(tmp_path, device, name, monkeypatch):
    # a few steps with the fused Triton kernels follow the reference attention, on the machine's
    # device: the CPU (interpreter; fp32 model, the fused run attends in bf16) or the GPU (both
    # runs under bf16 autocast). gemma4-tiny: sliding windows on packed rows, head_dim 32 local
    # and 64 global, 0.25-RoPE global layers, and scale-1 scores of unit-RMS q and k (logits up
    # to head_dim, so bf16 rounding of q and k moves them by ~0.1)
    kw = dict(steps=3, eval_every=3, seq_len=32, batch_size=4, device=device)

    def losses(attn):
        m = train(_cfg(tmp_path / attn, name=name, attn=attn, **kw))["metrics"]
        return [r["loss"] for r in m] + [m[-1]["val_loss"]]

    ref, fused = losses("reference"), losses("triton")
    assert len(fused) == len(ref) == kw["steps"] + 1 and all(map(math.isfinite, fused))
    err = max(abs(a - b) for a, b in zip(ref, fused))
    # yardstick: the same math with bf16 attention inputs. On a GPU the unfused bf16 baseline
    # (RoPE, then SDPA) under autocast; on the CPU the reference fed bf16-rounded q, k, v (the
    # trainer's rows are packed: the varlen op). The fused run must be within 2x of it, plus a
    # floor of 0.02% of the loss
    if device == "cpu":
        from prope_kernels.models import gemma

        exact = gemma.prope_attention_varlen

        def rounded(q, k, v, *args, **kwargs):
            return exact(*(x.bfloat16().float() for x in (q, k, v)), *args, **kwargs)

        monkeypatch.setattr(gemma, "prope_attention_varlen", rounded)
        base = losses("reference")
        monkeypatch.undo()
    else:
        base = losses("unfused")
    bound = 2 * max(abs(a - b) for a, b in zip(ref, base)) + 2e-4 * max(map(abs, ref))
    assert err <= bound, (err, bound, ref, base, fused)
