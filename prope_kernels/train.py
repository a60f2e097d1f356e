"""Train Gemma with fused p-RoPE attention.

    prope-train                                   # small Gemma, 0.75-RoPE, bundled corpus
    prope-train --preset gemma-2b --pe prope --p 0.75 --attn triton --data my.jsonl
    torchrun --nproc-per-node 8 -m prope_kernels.train --preset gemma-2b ...

A run folder (``--out``) gets config.json, metrics.jsonl, loss.png and checkpoint/ (safetensors +
JSON: model, optimizer, step, data position, RNG); ``--resume`` continues it on the same curve.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist

from . import backends, env
from .models.gemma import ATTN_BACKENDS, PE_KINDS, PRESETS, Gemma, preset
from .rotary import LAYOUTS, VARIANTS


@dataclass
class TrainConfig:
    preset: str = "gemma-small"
    pe: str = "prope"
    p: float = 0.75
    theta: float = 10000.0
    variant: str = "prope"
    layout: str = "half"
    attn: str = "auto"
    data: str = ""              # empty: the bundled corpus
    tokenizer: str = ""         # a sentencepiece .model; empty: train one on the data (cached)
    vocab_size: int = 4096      # for a trained tokenizer
    seq_len: int = 256
    batch_size: int = 8         # rows per optimizer step (global, over all ranks)
    grad_accum: int = 1
    steps: int = 150
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 15
    weight_decay: float = 0.1
    clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 8
    val_fraction: float = 0.05
    save_every: int = 0         # 0: only at the end
    stop_at: int = 0            # stop after this step with a checkpoint (0: run to --steps)
    out: str = "runs/prope-train"
    resume: bool = False
    seed: int = 0
    compile: bool = False
    activation_checkpointing: bool = False
    device: str = "auto"
    progress: bool = True


HELP = {
    "preset": f"model shape: {', '.join(PRESETS)} (small presets take the tokenizer's vocab)",
    "pe": "position encoding: nope, rope (p=1) or prope (fraction --p)",
    "p": "fraction of RoPE frequency pairs that rotate (prope), in [0, 1]",
    "theta": "RoPE base",
    "variant": "which pairs rotate: prope (fastest), reversed (slowest), partial (NeoX prefix)",
    "layout": "pair layout: half (Gemma/Llama rotate_half) or interleaved (GPT-J)",
    "attn": "attention: auto, a fused backend (" + ", ".join(backends.names()) + "), or "
            "unfused (RoPE, then SDPA: the baseline)",
    "data": "a text file, a directory of .txt/.md/.jsonl files, or a .jsonl with 'text' "
            "(default: the bundled corpus)",
    "tokenizer": "a sentencepiece .model file (e.g. Gemma's tokenizer.model); default: train a "
                 "BPE tokenizer on the data (cached)",
    "vocab_size": "vocabulary of the trained tokenizer",
    "seq_len": "tokens per row; documents are packed with boundaries",
    "batch_size": "rows per optimizer step, over all ranks",
    "grad_accum": "micro-batches per step (each batch_size / grad_accum rows)",
    "steps": "optimizer steps",
    "lr": "peak learning rate (AdamW)",
    "min_lr_ratio": "final learning rate as a fraction of --lr (cosine decay)",
    "warmup": "linear warmup steps",
    "weight_decay": "AdamW weight decay (matrices only)",
    "clip": "gradient-norm clipping (0: off)",
    "eval_every": "validation every N steps (and at the end)",
    "eval_batches": "validation batches per evaluation",
    "val_fraction": "fraction of documents held out for validation",
    "save_every": "checkpoint every N steps (0: only at the end)",
    "stop_at": "stop after this step, with a checkpoint, to continue later with --resume "
               "(0: run to --steps)",
    "out": "run folder",
    "resume": "continue from the checkpoint in --out",
    "seed": "random seed (model init and data order)",
    "compile": "torch.compile the model",
    "activation_checkpointing": "recompute each layer in backward to save memory",
    "device": "auto (cuda when present), cuda or cpu",
    "progress": "show a progress bar",
}


class UsageError(Exception):
    """A problem with the command line or the data, reported without a traceback."""


def parse_args(argv=None) -> TrainConfig:
    ap = argparse.ArgumentParser(
        prog="prope-train", description="Train Gemma with fused p-RoPE attention. With no "
        "arguments: a small Gemma with 0.75-RoPE on the bundled corpus.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    choices = {"preset": list(PRESETS), "pe": PE_KINDS, "variant": VARIANTS,
               "layout": LAYOUTS, "attn": ATTN_BACKENDS, "device": ("auto", "cuda", "cpu")}
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                            help=HELP[f.name])
        else:
            typ = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str)
                                                          else f.type.__name__]
            ap.add_argument(flag, type=typ, default=f.default, choices=choices.get(f.name),
                            help=HELP[f.name])
    cfg = TrainConfig(**vars(ap.parse_args(argv)))
    if cfg.batch_size % cfg.grad_accum:
        ap.error(f"--batch-size ({cfg.batch_size}) must be a multiple of --grad-accum "
                 f"({cfg.grad_accum})")
    for name in ("steps", "seq_len", "batch_size", "grad_accum", "eval_batches"):
        if getattr(cfg, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be positive")
    if not 0 <= cfg.p <= 1:
        ap.error(f"--p must be in [0, 1], got {cfg.p}")
    return cfg


# ------------------------------------------------------------------------------------------------

def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to --lr, then cosine decay to --lr * --min-lr-ratio."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def peak_flops(device: torch.device):
    """Dense bf16 peak used for MFU (None when unknown, e.g. on a CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40", 181e12)):
        if key in name:
            return flops
    return None


def _device(cfg: TrainConfig, local_rank: int) -> torch.device:
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but no CUDA device is available")
    return torch.device("cuda", local_rank)


def _memory_check(model_cfg, cfg: TrainConfig, device):
    """Refuse a preset whose weights + grads + AdamW state alone cannot fit the device."""
    need = model_cfg.num_params() * 16  # fp32 weights, grads, two Adam moments
    if device.type == "cuda":
        have = torch.cuda.get_device_properties(device).total_memory
    else:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have:  # DDP keeps a full replica on every device
        raise UsageError(
            f"preset {cfg.preset!r} needs about {need / 2**30:.0f} GiB for weights, gradients "
            f"and optimizer state, but the {device.type} has {have / 2**30:.0f} GiB; choose a "
            "smaller --preset or a larger device")


def _data(cfg: TrainConfig, rank: int, world: int):
    from .data import Batches, builtin_corpus, load_documents, load_tokenizer, pack, \
        split_docs, tokenize, train_tokenizer

    if cfg.data:
        try:
            docs = load_documents(cfg.data)
        except (FileNotFoundError, ValueError) as e:
            raise UsageError(str(e)) from None
    else:
        docs = builtin_corpus()
    train_docs, val_docs = split_docs(docs, cfg.val_fraction, cfg.seed)
    if cfg.tokenizer:
        if not Path(cfg.tokenizer).is_file():
            raise UsageError(f"tokenizer file {cfg.tokenizer!r} does not exist")
        tok = load_tokenizer(cfg.tokenizer)
    else:
        if dist.is_initialized() and rank != 0:
            dist.barrier()  # rank 0 trains (and caches) the tokenizer first
        tok = train_tokenizer(train_docs, cfg.vocab_size)
        if dist.is_initialized() and rank == 0:
            dist.barrier()
    train = pack(tokenize(train_docs, tok), cfg.seq_len)
    val = pack(tokenize(val_docs, tok), cfg.seq_len)
    if len(val) == 0:
        raise UsageError("the validation split is shorter than one row: use more data, a larger "
                         "--val-fraction or a smaller --seq-len")
    return tok, Batches(train, cfg.batch_size // cfg.grad_accum, cfg.seed, rank, world), val


# --- checkpoints: safetensors for tensors, JSON for the rest ---------------------------------------

def save_checkpoint(path: Path, model, opt, step: int, data_position: int, cfg: TrainConfig):
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path / "model.safetensors"))
    osd = opt.state_dict()
    tensors = {f"{i}.{k}": v.detach().cpu().contiguous()
               for i, s in osd["state"].items() for k, v in s.items() if torch.is_tensor(v)}
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, str(path / "optim.safetensors"))
    meta = {"step": step, "data_position": data_position, "param_groups": osd["param_groups"],
            "config": asdict(cfg)}
    (path / "state.json").write_text(json.dumps(meta, indent=1))


def load_checkpoint(path: Path, model, opt, device):
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(path / "model.safetensors"), device=str(device)))
    meta = json.loads((path / "state.json").read_text())
    tensors = load_file(str(path / "optim.safetensors"))
    state = {}
    for key, v in tensors.items():
        if key.startswith("rng."):
            continue
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = v if name == "step" else v.to(device)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return meta["step"], meta["data_position"]


# --- the loop ---------------------------------------------------------------------------------------

def _loss_terms(model, batch):
    """Sum of token losses and the number of target tokens of one micro-batch."""
    tokens, targets, cu, max_len = batch
    count = (targets != -100).sum()
    return model(tokens, cu, max_len, targets=targets) * count, count


@torch.no_grad()
def evaluate(model, val, cfg, device, autocast):
    from .data import make_batch

    model.eval()
    total, count = torch.zeros((), device=device), torch.zeros((), device=device)
    per = cfg.batch_size // cfg.grad_accum
    for i in range(min(cfg.eval_batches, max(1, len(val) // per))):
        rows = list(range(i * per, min((i + 1) * per, len(val))))
        with autocast():
            s, c = _loss_terms(model, make_batch(val, rows, device))
        total += s.float()
        count += c
    if dist.is_initialized():
        dist.all_reduce(total)
        dist.all_reduce(count)
    model.train()
    return (total / count).item()


def _plot(metrics, out: Path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    tr = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    va = [(m["step"], m["val_loss"]) for m in metrics if "val_loss" in m]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    if tr:
        a.plot(*zip(*tr), label="train")
    if va:
        a.plot(*zip(*va), "o-", label="validation")
        b.plot([s for s, _ in va], [math.exp(v) for _, v in va], "o-")
    a.set_xlabel("step"), a.set_ylabel("loss"), a.legend()
    b.set_xlabel("step"), b.set_ylabel("validation perplexity")
    fig.suptitle(out.name)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=100)
    plt.close(fig)


def train(cfg: TrainConfig) -> dict:
    world, rank, local_rank = env.distributed()
    device = _device(cfg, local_rank)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if cfg.batch_size % (world * cfg.grad_accum):
        raise UsageError(f"--batch-size ({cfg.batch_size}) must be a multiple of "
                         f"world size x --grad-accum ({world} x {cfg.grad_accum})")
    torch.manual_seed(cfg.seed)
    tok, batches, val = _data(cfg, rank, world)

    overrides = dict(pe=cfg.pe, p=cfg.p, theta=cfg.theta, variant=cfg.variant,
                     layout=cfg.layout, attn=cfg.attn,
                     activation_checkpointing=cfg.activation_checkpointing)
    if cfg.preset in ("gemma-small", "gemma-tiny") or cfg.tokenizer or cfg.preset not in (
            "gemma-2b", "gemma-7b"):
        overrides["vocab_size"] = tok.get_piece_size()
    try:
        model_cfg = preset(cfg.preset, **overrides)
    except ValueError as e:
        raise UsageError(str(e)) from None
    _memory_check(model_cfg, cfg, device)
    model = Gemma(model_cfg).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr,
                            betas=(0.9, 0.95), fused=device.type == "cuda")

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    step = 0
    if cfg.resume:
        if not (out / "checkpoint" / "state.json").exists():
            raise UsageError(f"--resume: no checkpoint in {out / 'checkpoint'}")
        step, batches.position = load_checkpoint(out / "checkpoint", model, opt, device)
    if rank == 0:
        (out / "config.json").write_text(json.dumps(
            {"train": asdict(cfg), "model": model_cfg.to_dict(), "world_size": world}, indent=1))

    fwd_model = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        fwd_model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None)
    if cfg.compile:
        fwd_model = torch.compile(fwd_model)
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else \
        contextlib.nullcontext

    metrics_path = out / "metrics.jsonl"
    if rank == 0 and not cfg.resume:
        metrics_path.write_text("")
    metrics = [json.loads(line) for line in metrics_path.read_text().splitlines() if line] \
        if rank == 0 else []
    tokens_per_step = cfg.batch_size * cfg.seq_len
    peak = peak_flops(device)
    flops_step = model_cfg.flops_per_token(cfg.seq_len) * tokens_per_step

    bar = None
    if rank == 0 and cfg.progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=cfg.steps, initial=step, desc="train", dynamic_ncols=True)
        except ImportError:
            pass
    result = {}
    t_last = time.perf_counter()
    last = min(cfg.steps, cfg.stop_at) if cfg.stop_at else cfg.steps
    while step < last:
        lr = lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        micro = [batches.next(device) for _ in range(cfg.grad_accum)]
        count = sum((b[1] != -100).sum() for b in micro).float()
        if dist.is_initialized():
            dist.all_reduce(count)
        loss_sum = torch.zeros((), device=device)
        for i, b in enumerate(micro):
            sync = (world == 1 or i == len(micro) - 1)
            ctx = contextlib.nullcontext() if sync else fwd_model.no_sync()
            with ctx, autocast():
                s, _ = _loss_terms(fwd_model, b)
            # DDP averages gradients over ranks: scale so the result is the global token mean
            with ctx:
                (s.float() * world / count).backward()
            loss_sum += s.detach().float()
        if dist.is_initialized():
            dist.all_reduce(loss_sum)
        loss = (loss_sum / count).item()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip) if cfg.clip > 0 \
            else torch.zeros(())
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1

        now = time.perf_counter()
        tok_s = tokens_per_step / (now - t_last)
        t_last = now
        rec = {"step": step, "loss": loss, "lr": lr, "grad_norm": float(gnorm), "tok_s": tok_s}
        if peak:
            rec["mfu"] = flops_step * tok_s / tokens_per_step / peak
        if step % cfg.eval_every == 0 or step == cfg.steps:
            rec["val_loss"] = evaluate(fwd_model, val, cfg, device, autocast)
            rec["val_ppl"] = math.exp(rec["val_loss"])
            t_last = time.perf_counter()  # evaluation time is not training throughput
        if cfg.save_every and step % cfg.save_every == 0 or step == last:
            if rank == 0:
                save_checkpoint(out / "checkpoint", model, opt, step, batches.position, cfg)
        if rank == 0:
            metrics.append(rec)
            with open(metrics_path, "a") as fh:
                fh.write(json.dumps(rec) + "\n")
            if bar is not None:
                post = {"loss": f"{loss:.3f}", "tok/s": f"{tok_s:,.0f}"}
                post["mfu"] = f"{rec['mfu']:.1%}" if "mfu" in rec else "n/a"
                if "val_ppl" in rec:
                    post["val_ppl"] = f"{rec['val_ppl']:.2f}"
                bar.set_postfix(post)
                bar.update(1)
        result = rec
    if bar is not None:
        bar.close()
    if rank == 0:
        _plot(metrics, out)
    if dist.is_initialized():
        dist.barrier()
    return {"final": result, "out": str(out), "metrics": metrics}


def main(argv=None) -> int:
    cfg = parse_args(argv)
    try:
        res = train(cfg)
    except UsageError as e:
        print(f"prope-train: error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    final = res["final"]
    if env.distributed()[1] == 0 and "val_ppl" in final:
        print(f"validation loss {final['val_loss']:.4f}, perplexity {final['val_ppl']:.2f} "
              f"after {final['step']} steps; run folder: {res['out']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
