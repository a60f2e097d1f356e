"""``prope-train --benchmark N``: the trainer's throughput with each attention backend, in one
process, on one model and one batch.

    prope-train --preset gemma-2b --benchmark 10          # one GPU: auto, cuda, triton, unfused, hf
    prope-train --preset gemma-tiny --benchmark 2 --device cpu --out /tmp/b   # the CPU smoke

Every entry trains the same model (same seed: same initial weights) on the same packed
micro-batches (drawn once from the run's data) with the trainer's own step (``train_step``:
bf16 autocast over float32 master weights, AdamW, clipping, gradient accumulation), the
non-attention parts compiled when ``--compile``. Entries:

* ``auto``, ``cuda``, ``triton``, ``sdpa``, ``reference``: the model's attention through that
  backend of the fused op (packed rows: the varlen op);
* ``unfused``: the baseline users run today: RoPE (the reference rotation), then torch's SDPA
  with a block-diagonal causal mask (PyTorch picks its kernel: cuDNN or memory-efficient);
* ``hf``: transformers' own ``GemmaForCausalLM`` at the same shape with ``attn_implementation
  = "sdpa"``, its own RoPE and loss, the same batch (position_ids restarting at each document)
  and the same optimizer step (Gemma 1 presets only).

Each entry: ``--benchmark-warmup`` untimed steps, then N timed steps between two device
synchronizations; tokens/s, MFU (model FLOPs, ``GemmaConfig.flops_per_token``, over the GPU's
dense bf16 peak, named) and the peak memory allocated (from before the model is built). An entry
that cannot run here (e.g. ``cuda`` on a CPU) is listed as skipped with the reason; one that
fails or runs out of memory is listed with the error, and the others still run. Writes
``benchmark.json`` and ``benchmark.md`` into ``--out`` when given, else into
``bench/results/<date>_<gpu>_train/`` (``prope-bench-results/`` outside a checkout; a CPU run
into the system's temp folder: CPU figures are a smoke check, never results).
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import platform
import re
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from . import reference as ref
from .models.gemma import ATTN_BACKENDS, UNFUSED, Gemma
from .train import (Run, TrainConfig, UsageError, _data, _device, _memory_check,
                    _model_config, attention_problem, compile_parts, make_autocast,
                    make_optimizer, memory_estimate, peak_flops_named, train_step, use_bf16)

HF = "hf"
# the issue's bars for gemma-2b on one H100 (auto against the unfused baseline)
BARS = {"mfu": 0.45, "speedup_vs_unfused": 1.15}


class _Replay:
    """The same micro-batches again and again (what ``Run.batches`` provides to train_step)."""

    def __init__(self, micro, device):
        self.micro = [tuple(x.to(device) if torch.is_tensor(x) else x for x in b) for b in micro]
        self.position = 0

    def next(self, device=None):
        b = self.micro[self.position % len(self.micro)]
        self.position += 1
        return b


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _hf_problem(model_cfg) -> str | None:
    if model_cfg.local_attn is not None and "L" in model_cfg.layer_pattern or \
            model_cfg.sandwich_norm or model_cfg.qk_norm or model_cfg.v_norm:
        return "hf: only Gemma 1 presets (transformers' GemmaForCausalLM) are compared"
    try:
        import transformers  # noqa: F401
    except ImportError:
        return "hf: transformers is not installed"
    return None


def _hf_model(model_cfg):
    """transformers' Gemma 1 at our shape, sdpa attention, tied embeddings (its RoPE: p = 1)."""
    import transformers

    g = model_cfg.global_attn
    cfg = transformers.GemmaConfig(
        vocab_size=model_cfg.vocab_size, hidden_size=model_cfg.hidden,
        intermediate_size=model_cfg.mlp, num_hidden_layers=model_cfg.layers,
        num_attention_heads=model_cfg.heads, num_key_value_heads=g.kv_heads,
        head_dim=g.head_dim, rms_norm_eps=model_cfg.rms_eps,
        hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True, attention_bias=False,
        use_cache=False, attention_dropout=0.0)
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": g.theta}
    cfg._attn_implementation = "sdpa"
    return transformers.GemmaForCausalLM(cfg)


def _hf_step(model, opt, batches, cfg: TrainConfig, autocast, device):
    """One optimizer step of transformers' model over grad_accum micro-batches (as train_step:
    token-mean loss over the step, clipping, AdamW)."""
    micro = [batches.next(device) for _ in range(cfg.grad_accum)]
    count = sum(int((b[1] != -100).sum()) for b in micro)
    total = 0.0
    for tokens, targets, cu, _ in micro:
        pos = ref.varlen_positions(cu, tokens.numel()).view_as(tokens)
        with autocast():
            logits = model(input_ids=tokens, position_ids=pos).logits
            loss = torch.nn.functional.cross_entropy(
                logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100,
                reduction="sum")
        (loss / count).backward()
        total += loss.detach()
    if cfg.clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return {"loss": float(total) / count}


def _entry(name, cfg: TrainConfig, model_cfg, micro, device, peak, out):
    """Build, warm up and time one entry; returns its row."""
    autocast = make_autocast(cfg, device)
    torch.manual_seed(cfg.seed)
    batches = _Replay(micro, device)
    if name == HF:
        mcfg = model_cfg
        with torch.device(device):  # built where it trains (2.5B parameters: no CPU init)
            ours = Gemma(model_cfg)  # first after the seed: the other entries' initial weights
            model = _hf_model(model_cfg)
        # our initial weights (transformers' parameter names, "model." prefix dropped)
        model.model.load_state_dict(ours.state_dict())
        del ours
        opt = make_optimizer(model, cfg, device)
        # the model's own forward is what is compared: the non-attention parts uncompiled there
        step = lambda: _hf_step(model, opt, batches, cfg, autocast, device)  # noqa: E731
    else:
        mcfg = model_cfg.updated(attn=name)
        with torch.device(device):
            model = Gemma(mcfg)
        if cfg.compile:
            compile_parts(model)
        opt = make_optimizer(model, cfg, device)
        run = Run(cfg, mcfg, device, 0, 1, model, model, opt, batches, None, autocast, out)
        step = lambda: train_step(run)  # noqa: E731
    params = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    first = step()["loss"]  # the first step's loss: same weights, same batch for every entry
    for _ in range(max(0, cfg.benchmark_warmup - 1)):
        step()
    _sync(device)
    warm_s = time.perf_counter() - t0
    times = []
    last = first
    for _ in range(cfg.benchmark):
        t = time.perf_counter()
        last = step()["loss"]
        _sync(device)
        times.append(time.perf_counter() - t)
    total = sum(times)
    tokens = cfg.batch_size * cfg.seq_len
    row = {"attn": name, "status": "ok", "params": params, "steps": cfg.benchmark,
           "warmup_steps": max(1, cfg.benchmark_warmup), "warmup_s": warm_s,
           "step_s": times, "tokens_per_s": tokens * cfg.benchmark / total,
           "tokens_per_s_median_step": tokens / sorted(times)[len(times) // 2],
           "loss_first_step": first, "loss_last_step": last}
    # model FLOPs of our model at this shape (transformers' model has the same matmuls and
    # attention; its RoPE is p = 1, which costs no FLOPs counted here)
    flops_token = mcfg.flops_per_token(cfg.seq_len)
    row["model_tflops_per_step"] = flops_token * tokens / 1e12
    if peak:
        row["mfu"] = flops_token * row["tokens_per_s"] / peak
    if device.type == "cuda":
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    del model, opt, step, batches
    if name != HF:
        del run
    return row


def _cleanup(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def out_dir(cfg: TrainConfig, device, gpu_name: str | None) -> Path:
    """--out when given (not the trainer's default run folder), else the results folder."""
    if cfg.out != TrainConfig().out:
        return Path(cfg.out)
    if device.type != "cuda":
        return Path(tempfile.gettempdir()) / "prope_train_benchmark"
    day = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    slug = re.sub(r"[^a-z0-9]+", "-", (gpu_name or "gpu").lower()).strip("-")
    root = Path("bench/results") if Path("bench/results").is_dir() else \
        Path("prope-bench-results")
    return root / f"{day}_{slug}_train"


def benchmark(cfg: TrainConfig, log=print, command: str = "prope-train --benchmark") -> dict:
    """Run the entries of ``cfg.benchmark_attn``; write and return the results."""
    names = [x.strip() for x in cfg.benchmark_attn.split(",") if x.strip()]
    bad = [x for x in names if x not in ATTN_BACKENDS + (HF,)]
    if bad or not names:
        raise UsageError(f"--benchmark-attn: unknown entry {', '.join(bad) or '(none)'}; choose "
                         f"from {', '.join(ATTN_BACKENDS + (HF,))}")
    if cfg.benchmark <= 0:
        raise UsageError("--benchmark must be positive")
    device = _device(cfg, 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    _memory_check(cfg.model, cfg, device, 1)
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    tok, batches, _ = _data(cfg, 0, 1)
    model_cfg = _model_config(cfg, tok)
    _memory_check(model_cfg, cfg, device, 1)
    micro = [batches.next() for _ in range(cfg.grad_accum)]  # on the CPU; each entry copies
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    peak, part = peak_flops_named(gpu) if gpu else (None, None)
    out = out_dir(cfg, device, gpu)
    out.mkdir(parents=True, exist_ok=True)
    est = memory_estimate(model_cfg, cfg.batch_size // cfg.grad_accum, cfg.seq_len)
    log(f"benchmark: {model_cfg.num_params():,} parameters, {cfg.batch_size} x {cfg.seq_len} "
        f"tokens a step in {cfg.grad_accum} micro-batches, {cfg.benchmark} timed steps after "
        f"{cfg.benchmark_warmup} untimed, entries {', '.join(names)}; data ready in "
        f"{time.perf_counter() - t0:.1f} s; memory estimate {est['total'] / 2**30:.1f} GiB")
    meta = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": command,
            "device": gpu or "cpu", "peak_bf16_flops": peak, "peak_part": part,
            "run_kind": "gpu" if device.type == "cuda" else "cpu smoke (not a result)",
            "torch": torch.__version__, "python": platform.python_version(),
            "precision": "bf16 autocast, fp32 master weights" if use_bf16(cfg, device)
            else "fp32", "memory_estimate_bytes": est,
            "flops_per_token": model_cfg.flops_per_token(cfg.seq_len)}
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        pass
    rows = []
    _cleanup(device)
    for name in names:
        why = _hf_problem(model_cfg) if name == HF else \
            attention_problem(model_cfg.updated(attn=name), device.type, cfg.device)
        if why is None and name == UNFUSED and any(
                model_cfg.layer_attn(i).softcap for i in range(model_cfg.layers)):
            why = "unfused: SDPA has no attention-logit softcap, which this model uses"
        if why is not None:
            rows.append({"attn": name, "status": "skipped", "reason": why})
            log(f"  {name:10s} skipped: {why}")
            _write(out, meta, cfg, model_cfg, rows, device, names)
            continue
        t = time.perf_counter()
        try:
            row = _entry(name, cfg, model_cfg, micro, device, peak, out)
        except Exception as e:  # noqa: BLE001 - one entry's failure must not lose the others
            kind = "oom" if "out of memory" in str(e).lower() else "failed"
            first_line = str(e).splitlines()[0][:300] if str(e) else ""
            row = {"attn": name, "status": kind, "reason": f"{type(e).__name__}: {first_line}"}
        _cleanup(device)
        row["wall_s"] = time.perf_counter() - t
        rows.append(row)
        _write(out, meta, cfg, model_cfg, rows, device, names)
        if row["status"] == "ok":
            log(f"  {name:10s} {row['tokens_per_s']:12,.0f} tokens/s"
                + (f"  MFU {row['mfu']:.1%}" if "mfu" in row else "  MFU n/a")
                + (f"  peak {row['peak_mem_gib']:.1f} GiB" if "peak_mem_gib" in row else "")
                + f"  loss step 1 {row['loss_first_step']:.4f}  ({row['wall_s']:.0f} s)")
        else:
            log(f"  {name:10s} {row['status']}: {row['reason']}")
    doc = _write(out, meta, cfg, model_cfg, rows, device, names)
    log(f"wrote {out / 'benchmark.json'} and benchmark.md")
    return doc


def _write(out: Path, meta: dict, cfg: TrainConfig, model_cfg, rows: list, device,
           names: list) -> dict:
    """benchmark.json and benchmark.md from the rows so far (written after every entry, so
    that a run cut short keeps what it measured; ``pending`` lists the entries not reached)."""
    base = next((r for r in rows if r["attn"] == UNFUSED and r["status"] == "ok"), None)
    for r in rows:
        if base is not None and r["status"] == "ok":
            r["speedup_vs_unfused"] = r["tokens_per_s"] / base["tokens_per_s"]
            if "peak_mem_gib" in r:
                r["mem_vs_unfused"] = r["peak_mem_gib"] / base["peak_mem_gib"]
    done = {r["attn"] for r in rows}
    doc = {"meta": meta, "train": {k: v for k, v in asdict(cfg).items() if k != "model"},
           "model": model_cfg.to_dict(), "rows": rows, "bars": bars(rows, device),
           "pending": [n for n in names if n not in done]}
    (out / "benchmark.json").write_text(json.dumps(doc, indent=1))
    (out / "benchmark.md").write_text(markdown(doc))
    return doc


def bars(rows, device) -> dict:
    """The issue's bars for ``auto`` against ``unfused`` (None: not measurable here)."""
    by = {r["attn"]: r for r in rows if r.get("status") == "ok"}
    a, u = by.get("auto"), by.get(UNFUSED)
    res = {"mfu_ge_45pct": None, "speedup_ge_1.15x": None, "memory_le_unfused": None}
    if a is not None and "mfu" in a:
        res["mfu_ge_45pct"] = a["mfu"] >= BARS["mfu"]
    if a is not None and u is not None and device.type == "cuda":
        res["speedup_ge_1.15x"] = a["speedup_vs_unfused"] >= BARS["speedup_vs_unfused"]
        res["memory_le_unfused"] = a["peak_mem_gib"] <= u["peak_mem_gib"]
    return res


def _f(v, fmt):
    return "n/a" if v is None else format(v, fmt)


def markdown(doc: dict) -> str:
    m, t, mc = doc["meta"], doc["train"], doc["model"]
    lines = [
        f"# Trainer benchmark: {m['device']}",
        "",
        f"`{m['command']}` on {m['date']} ({m['run_kind']}); torch {m['torch']}"
        + (f", Triton {m['triton']}" if "triton" in m else "") + f"; {m['precision']}.",
        f"Model: {mc['layers']} layers, hidden {mc['hidden']}, {mc['heads']} heads, "
        f"head_dim {mc['global_attn']['head_dim']}, kv heads {mc['global_attn']['kv_heads']}, "
        f"MLP {mc['mlp']}, vocabulary {mc['vocab_size']}, p {mc['global_attn']['p']:g}; "
        f"activation checkpointing {'on' if mc['activation_checkpointing'] else 'off'}, "
        f"compile {'on (non-attention parts)' if t['compile'] else 'off'}.",
        f"Step: {t['batch_size']} packed rows x {t['seq_len']} tokens in {t['grad_accum']} "
        f"micro-batches; {t['benchmark']} timed steps after {t['benchmark_warmup']} untimed; "
        f"{m['flops_per_token'] / 1e9:.2f} GFLOP a token (model FLOPs incl. attention, causal "
        f"halved, windows counted). MFU against the "
        + (f"{m['peak_part']}'s dense bf16 peak, {m['peak_bf16_flops'] / 1e12:.0f} TFLOP/s."
           if m.get("peak_bf16_flops") else "GPU's dense bf16 peak: n/a here."),
        "",
        "| entry | tokens/s | vs unfused | MFU | peak memory (GiB) | vs unfused | loss step 1 | "
        "status |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['attn']} | | | | | | | {r['status']}: "
                         f"{r.get('reason', '').replace('|', '/')} |")
            continue
        lines.append(
            f"| {r['attn']} | {r['tokens_per_s']:,.0f} | "
            f"{_f(r.get('speedup_vs_unfused'), '.3f')} | {_f(r.get('mfu'), '.1%')} | "
            f"{_f(r.get('peak_mem_gib'), '.1f')} | {_f(r.get('mem_vs_unfused'), '.3f')} | "
            f"{r['loss_first_step']:.4f} | ok |")
    if doc.get("pending"):
        lines.append(f"| {', '.join(doc['pending'])} | | | | | | | not reached (cut short, or "
                     "still running) |")
    b = doc["bars"]
    word = {True: "pass", False: "FAIL", None: "n/a"}
    lines += ["", f"Bars (auto): MFU >= 45%: {word[b['mfu_ge_45pct']]}; tokens/s >= 1.15x "
              f"unfused: {word[b['speedup_ge_1.15x']]}; peak memory <= unfused: "
              f"{word[b['memory_le_unfused']]}.",
              "", "unfused: RoPE (reference rotation), then torch SDPA with a block-diagonal "
              "causal mask; hf: transformers' GemmaForCausalLM (sdpa, its RoPE p = 1), same "
              "batch and optimizer step. The memory estimate of the trainer for this step: "
              f"{m['memory_estimate_bytes']['total'] / 2**30:.1f} GiB.", ""]
    return "\n".join(lines)

