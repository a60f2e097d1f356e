"""Train Gemma (1, 2, 3, Gemma-4-style) with fused p-RoPE attention.

    prope-train                                   # gemma-small, 0.75-RoPE, bundled corpus
    prope-train --preset gemma-2b --p 0.75 --attn triton --data my.jsonl
    torchrun --nproc-per-node 8 -m prope_kernels.train --preset gemma3-1b ...          # DDP
    torchrun --nproc-per-node 8 -m prope_kernels.train --preset gemma4-style --fsdp ...  # FSDP2

From Python (what experiments build on)::

    from prope_kernels.models import preset
    from prope_kernels.train import TrainConfig, train
    res = train(TrainConfig(model=preset("gemma-small", p=0.25), steps=300, out="runs/p025"))

A run folder (``out``) gets config.json, metrics.jsonl, loss.png and checkpoint/ (safetensors +
JSON: model, optimizer, step, data position, RNG; with FSDP a torch.distributed.checkpoint folder
of shards instead); ``resume`` continues it on the same curve.

The pieces: :func:`setup` (device, process group, data, model, optimizer, resume) returns a
:class:`Run`; :func:`train_step` does one optimizer step; :func:`evaluate` the validation loss;
:func:`save_checkpoint` / :func:`load_checkpoint`; :func:`train` loops over them and logs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from . import backends, env
from .models.gemma import ALIASES, ATTN_BACKENDS, PRESETS, UNFUSED, Gemma, GemmaConfig, \
    LayerAttn, preset
from .rotary import LAYOUTS, VARIANTS


def _help(text: str, default=MISSING, default_factory=MISSING):
    """A field whose help text the CLI shows (``metadata["help"]``)."""
    return field(default=default, default_factory=default_factory, metadata={"help": text})


@dataclass
class TrainConfig:
    """Everything a run needs; ``model`` is the model's own config (see models.gemma)."""

    model: GemmaConfig = _help("the model (CLI: --preset and the model flags)",
                               default_factory=lambda: preset("gemma-small"))
    data: str = _help("a text file, a directory of .txt/.md/.jsonl files, or a .jsonl with "
                      "'text' (empty: the bundled corpus)", "")
    tokenizer: str = _help("a sentencepiece .model file (e.g. Gemma's tokenizer.model); empty: "
                           "train a BPE tokenizer on the data (cached)", "")
    vocab_size: int = _help("vocabulary of the trained tokenizer; the model's vocabulary "
                            "becomes the tokenizer's, except that a published-size one "
                            "(>= 256000) is kept with a tokenizer trained here", 4096)
    seq_len: int = _help("tokens per row; documents are packed with boundaries", 256)
    batch_size: int = _help("rows per optimizer step, over all ranks", 8)
    grad_accum: int = _help("micro-batches per step (each batch_size / grad_accum rows)", 1)
    steps: int = _help("optimizer steps", 150)
    lr: float = _help("peak learning rate (AdamW)", 3e-3)
    min_lr_ratio: float = _help("final learning rate as a fraction of --lr (cosine decay)", 0.1)
    warmup: int = _help("linear warmup steps", 15)
    weight_decay: float = _help("AdamW weight decay (matrices only)", 0.1)
    clip: float = _help("gradient-norm clipping (0: off)", 1.0)
    eval_every: int = _help("validation every N steps (and at the end)", 50)
    eval_batches: int = _help("validation batches per evaluation", 8)
    val_fraction: float = _help("fraction of documents held out for validation", 0.05)
    save_every: int = _help("checkpoint every N steps (0: only at the end)", 0)
    stop_at: int = _help("stop after this step, with a checkpoint, to continue later with "
                         "--resume (0: run to --steps)", 0)
    out: str = _help("run folder", "runs/prope-train")
    resume: bool = _help("continue from the checkpoint in --out", False)
    seed: int = _help("random seed (model init and data order)", 0)
    compile: bool = _help("torch.compile the non-attention parts of every layer (RMSNorms, "
                          "MLP) and the final norm; attention stays the fused op (or, with "
                          "--attn unfused, eager RoPE + SDPA)", False)
    precision: str = _help("auto: bf16 compute under autocast with float32 master weights, "
                           "gradients and AdamW state on a GPU with bf16, float32 otherwise; "
                           "bf16: the same on any device (the CPU too); fp32: float32 only",
                           "auto")
    fsdp: bool = _help("shard parameters, gradients and optimizer state over the ranks "
                       "(FSDP2, torch.distributed.fsdp.fully_shard) instead of DDP; "
                       "checkpoints become sharded (torch.distributed.checkpoint); needs "
                       "torchrun (a single process without it trains unsharded)", False)
    device: str = _help("auto (cuda when present), cuda or cpu", "auto")
    progress: bool = _help("show a progress bar", True)
    benchmark: int = _help("train nothing: time N optimizer steps of this model and batch with "
                           "each --benchmark-attn in one process, write benchmark.json and "
                           "benchmark.md (into --out if given, else bench/results/)", 0)
    benchmark_attn: str = _help("what --benchmark compares, in this order: attention backends "
                                "of the trainer and 'hf' (transformers' own Gemma, sdpa, same "
                                "shape and batch); the bars' pair (auto, unfused) first",
                                "auto,unfused,cuda,triton,hf")
    benchmark_warmup: int = _help("untimed steps of each --benchmark entry first (autotuning, "
                                  "compilation, allocator)", 3)


class UsageError(Exception):
    """A problem with the command line or the data, reported without a traceback."""


# --- command line --------------------------------------------------------------------------------

# model flags: CLI name -> GemmaConfig.updated() key; unset flags keep the preset's value
MODEL_FLAGS = ("p", "theta", "local_p", "local_theta", "window", "softcap", "local_softcap",
               "variant", "layout", "attn", "activation_checkpointing")
CHOICES = {"variant": VARIANTS, "layout": LAYOUTS, "attn": ATTN_BACKENDS,
           "device": ("auto", "cuda", "cpu"), "precision": ("auto", "bf16", "fp32")}

# Training defaults of a preset meant for one GPU (used unless the flag is given). gemma-2b on
# one 80 GB H100: rows of 2048, 16 rows a step in 8 micro-batches of 2 rows (32k tokens a step),
# no activation checkpointing, the non-attention parts compiled. Memory (memory_estimate, stated
# in docs/trainer.md): 40.1 GB of float32 weights, gradients and AdamW moments for 2.51B
# parameters, 5.0 GB of bf16 weight copies, ~14.6 GB of activations for a micro-batch of
# 2 x 2048 tokens, ~8.4 GB for one chunk of the 256k-vocabulary loss: ~68 GB (63 GiB of 79).
PRESET_TRAIN = {
    "gemma-2b": dict(seq_len=2048, batch_size=16, grad_accum=8, lr=3e-4, warmup=100,
                     steps=1000, eval_every=200, compile=True),
}


def _model_field(name: str):
    """The dataclass field behind a model flag (for its type and help text)."""
    path = ALIASES.get(name, name)
    owner, key = (LayerAttn, path.split(".")[1]) if "." in path else (GemmaConfig, path)
    f = next(f for f in fields(owner) if f.name == key)
    where = {"global_attn": "global layers (every layer of Gemma 1)",
             "local_attn": "local (sliding-window) layers"}.get(path.split(".")[0]) \
        if "." in path else None
    return f, (f"{f.metadata['help']}; of the {where}" if where else f.metadata["help"])


def _add(ap, name, ftype, default, help_text):
    flag = "--" + name.replace("_", "-")
    if ftype in ("bool", bool):
        ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                        help=help_text)
    else:
        typ = {"int": int, "float": float, "str": str}[ftype if isinstance(ftype, str)
                                                       else ftype.__name__]
        ap.add_argument(flag, type=typ, default=default, choices=CHOICES.get(name),
                        help=help_text)


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None (model flags: the preset's value)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="prope-train", description="Train Gemma with fused p-RoPE attention. With no "
        "arguments: gemma-small with 0.75-RoPE on the bundled corpus. Model flags left unset "
        "keep the preset's value.", formatter_class=_Help)
    ap.add_argument("--preset", default="gemma-small", choices=list(PRESETS),
                    help="the model's shape and features (tiny/small presets take the "
                    "tokenizer's vocabulary)")
    m = ap.add_argument_group("model (override the preset)")
    for name in MODEL_FLAGS:
        f, text = _model_field(name)
        _add(m, name, f.type, None, text + " (default: the preset's)")
    t = ap.add_argument_group("training")
    for f in fields(TrainConfig):
        if f.name != "model":
            _add(t, f.name, f.type, f.default, f.metadata["help"])
    return ap


def parse_args(argv=None) -> TrainConfig:
    ap = build_parser()
    # a GPU preset's training defaults replace the generic ones; flags given still win
    known, _ = ap.parse_known_args(argv)
    ap.set_defaults(**PRESET_TRAIN.get(known.preset, {}))
    args = vars(ap.parse_args(argv))
    name = args.pop("preset")
    overrides = {k: args.pop(k) for k in MODEL_FLAGS}
    for k in ("p", "local_p"):
        if overrides[k] is not None and not 0 <= overrides[k] <= 1:
            ap.error(f"--{k.replace('_', '-')} must be in [0, 1] (0 = NoPE, 1 = RoPE), got "
                     f"{overrides[k]}")
    try:
        model = preset(name, **overrides)
    except ValueError as e:
        ap.error(f"--preset {name}: {e}")
    cfg = TrainConfig(model=model, **args)
    if cfg.batch_size % cfg.grad_accum:
        ap.error(f"--batch-size ({cfg.batch_size}) must be a multiple of --grad-accum "
                 f"({cfg.grad_accum})")
    for n in ("steps", "seq_len", "batch_size", "grad_accum", "eval_batches"):
        if getattr(cfg, n) <= 0:
            ap.error(f"--{n.replace('_', '-')} must be positive")
    # before any slow setup: the device asked for, and whether --attn runs there
    if cfg.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available (use --device cpu)")
    why = attention_problem(cfg.model, _device_type(cfg), cfg.device)
    if why:
        ap.error(why)
    return cfg


# --- helpers -------------------------------------------------------------------------------------

def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to --lr, then cosine decay to --lr * --min-lr-ratio."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


# dense bf16 tensor-core peaks (no sparsity), by a substring of torch.cuda.get_device_name; the
# first match wins (H100 PCIe and NVL before the SXM part, whose name is "H100 80GB HBM3")
PEAK_BF16 = (("H100 PCIe", "H100 PCIe", 756e12), ("H100 NVL", "H100 NVL", 835e12),
             ("H100", "H100 SXM", 989e12), ("H200", "H200", 989e12), ("A100", "A100", 312e12),
             ("L40", "L40", 181e12))


def peak_flops_named(device_name: str):
    """(dense bf16 peak FLOP/s, the part it is for) of a GPU name, or (None, None)."""
    for key, part, flops in PEAK_BF16:
        if key in device_name:
            return flops, part
    return None, None


def peak_flops(device: torch.device):
    """Dense bf16 peak used for MFU (None when unknown, e.g. on a CPU)."""
    if device.type != "cuda":
        return None
    return peak_flops_named(torch.cuda.get_device_name(device))[0]


def mfu_text(device: torch.device) -> str:
    """What MFU is measured against (logged once a run is set up)."""
    if device.type != "cuda":
        return "MFU n/a on the CPU"
    name = torch.cuda.get_device_name(device)
    flops, part = peak_flops_named(name)
    if flops is None:
        return f"MFU n/a: no dense bf16 peak known for {name}"
    return (f"MFU = model FLOPs (6 x parameters + attention, no recomputation) x tokens/s over "
            f"the {part}'s dense bf16 peak, {flops / 1e12:.0f} TFLOP/s")


def memory_estimate(model: GemmaConfig, micro_rows: int, seq_len: int,
                    checkpointing: bool | None = None, ce_chunk: int = 2048) -> dict:
    """Peak training memory in bytes of one unsharded replica (an estimate, Gemma 1 shapes):
    float32 weights + gradients + two AdamW moments (16 B a parameter), the bf16 copies of the
    weights autocast keeps for backward (2 B), activations per token and layer, and one chunk of
    the chunked cross-entropy. Activation bytes a token and layer were measured on the CPU
    with saved-tensor hooks on one bf16-autocast gemma-2b layer (hidden 2048, MLP 16384): the
    MLP half 155.7 kB (9.25 B per MLP unit + 2.05 B per hidden unit), the attention half
    without the op 32.8 kB (16 B per hidden unit); the fused op keeps q, k, v, o in bf16 and
    the fp32 log-sum-exp. With activation checkpointing a layer keeps only its float32 input
    (4 x hidden B a token) and one layer's activations live again during its backward."""
    n = model.num_params()
    ckpt = model.activation_checkpointing if checkpointing is None else checkpointing
    tokens = micro_rows * seq_len
    per_layer = []
    for i in range(model.layers):
        s = model.layer_attn(i)
        # q and o (heads), k and v (kv heads) in bf16, the fp32 log-sum-exp a head
        attn_op = 2 * (2 * model.heads + 2 * s.kv_heads) * s.head_dim + 4 * model.heads
        mlp_half = 9.25 * model.mlp + 2.05 * model.hidden  # 155.7 kB at 16384 / 2048
        proj_half = 16.0 * model.hidden                     # 32.8 kB at 2048
        per_layer.append(mlp_half + proj_half + attn_op)
    if ckpt:
        acts = tokens * (model.layers * 4 * model.hidden + max(per_layer))
    else:
        acts = tokens * sum(per_layer)
    rows = min(ce_chunk, tokens)
    # logits bf16, fp32 logits, log-softmax and its gradient (fp32), the bf16 gradient
    ce = rows * model.vocab_size * (2 + 4 + 4 + 4 + 2)
    est = {"params": n, "weights": n * 4, "grads": n * 4, "adam": n * 8,
           "bf16_weight_copies": n * 2, "activations": acts, "loss_chunk": ce}
    est["total"] = sum(v for k, v in est.items() if k != "params")
    return est


def adamw_kwargs(device: torch.device) -> dict:
    """AdamW's implementation: fused (one kernel for all parameters) on CUDA, torch's default
    (foreach) elsewhere; the fused CPU kernel is not used."""
    return {"fused": True} if device.type == "cuda" else {}


def use_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    """bf16 autocast (float32 master weights) or float32, from --precision."""
    if cfg.precision == "bf16":
        return True
    return (cfg.precision == "auto" and device.type == "cuda"
            and torch.cuda.is_bf16_supported())


def compile_parts(model, backend: str = "inductor"):
    """torch.compile every layer's non-attention parts (its RMSNorms and MLP) and the final norm,
    in place. The layers share one compiled graph per part (same code, parameters as inputs);
    the attention (fused op, or eager RoPE + SDPA for the baseline) is never traced."""
    from .models.gemma import MLP, RMSNorm

    for m in model.modules():
        if isinstance(m, (MLP, RMSNorm)):
            m.compile(backend=backend)
    return model


def _device_type(cfg: TrainConfig) -> str:
    """"cpu" or "cuda": where the run trains (--device, auto: cuda when present)."""
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return "cpu"
    return "cuda"


def attention_problem(model: GemmaConfig, device_type: str, device_flag: str = "auto"):
    """Why the model's ``attn`` backend cannot train on ``device_type`` ("cpu"/"cuda"; chosen
    by ``--device device_flag``), as an error naming --attn (None when it can): checked before
    the data and the model are built."""
    name = model.attn
    if name in ("auto", UNFUSED, "reference"):
        return None
    be = backends.get(name)
    dev = torch.device(device_type)

    def others(ok=lambda b: True) -> str:
        return ", ".join(["auto"] + [n for n in backends.names() if n != name
                                     and backends.get(n).runs_on(dev) and ok(backends.get(n))])

    if not be.runs_on(dev):
        hint = ("set TRITON_INTERPRET=1 to run the Triton kernels on the CPU (slowly), or use "
                if be.interpreter_cpu else "use ")
        on = "--device cpu" if device_flag == "cpu" else "no CUDA device is available"
        return (f"--attn {name}: the {name} kernels need a CUDA GPU, and this run is on the "
                f"CPU ({on}); {hint}one of --attn {others()}")
    why = be.unavailable()
    if why is not None:
        return f"--attn {name}: backend={name!r} {why}"
    needs = set()
    dims = set()
    for i in range(model.layers):
        spec = model.layer_attn(i)
        dims.add(spec.head_dim)
        if spec.window:
            needs.add("window")
        if spec.softcap:
            needs.add("softcap")
    missing = sorted(needs - set(be.features))
    if missing:
        return (f"--attn {name}: backend={name!r} does not implement {' or '.join(missing)}, "
                f"which this model's layers use; use one of --attn "
                + others(lambda b: needs <= b.features))
    bad = sorted(d for d in dims if not be.head_dim_ok(d))
    if bad:
        return (f"--attn {name}: backend={name!r} supports {be.head_dims}; this model's layers "
                f"use head_dim {', '.join(map(str, bad))}; use one of --attn "
                + others(lambda b: all(map(b.head_dim_ok, dims))))
    return None


def _device(cfg: TrainConfig, local_rank: int) -> torch.device:
    if _device_type(cfg) == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but no CUDA device is available")
    return torch.device("cuda", local_rank)


def _memory_check(model_cfg: GemmaConfig, cfg: TrainConfig, device, world: int):
    """Refuse a model whose weights + grads + AdamW state alone cannot fit the device."""
    need = model_cfg.num_params() * 16  # fp32 weights, grads, two Adam moments
    if cfg.fsdp:
        need //= world  # sharded over the ranks
    if device.type == "cuda":
        have = torch.cuda.get_device_properties(device).total_memory
    else:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have:
        raise UsageError(
            f"the model needs about {need / 2**30:.0f} GiB {'a rank ' if cfg.fsdp else ''}for "
            f"weights, gradients and optimizer state, but the {device.type} has "
            f"{have / 2**30:.0f} GiB; choose a smaller --preset, --fsdp over more ranks, or a "
            "larger device")


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
    try:
        batches = Batches(train, cfg.batch_size // cfg.grad_accum, cfg.seed, rank, world)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return tok, batches, val


# --- setup ---------------------------------------------------------------------------------------

@dataclass
class Run:
    """The state of a run: what :func:`setup` builds and :func:`train_step` advances."""

    cfg: TrainConfig
    model_cfg: GemmaConfig          # cfg.model with the tokenizer's vocabulary
    device: torch.device
    rank: int
    world: int
    model: torch.nn.Module          # parameters live here (sharded under FSDP)
    fwd_model: torch.nn.Module      # what forward goes through (DDP / compile wrappers)
    opt: torch.optim.Optimizer
    batches: Any
    val: Any
    autocast: Callable
    out: Path
    step: int = 0
    metrics: list = field(default_factory=list)


def _init_distributed(cfg: TrainConfig):
    world, rank, local_rank = env.distributed()
    device = _device(cfg, local_rank)
    # a process group for several ranks, or for FSDP on one rank started by torchrun
    if (world > 1 or cfg.fsdp and "MASTER_ADDR" in os.environ) and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device, rank, world, local_rank


def _model_config(cfg: TrainConfig, tok) -> GemmaConfig:
    n = tok.get_piece_size()
    if cfg.tokenizer or cfg.model.vocab_size < 256000:
        return cfg.model.updated(vocab_size=n)
    if n > cfg.model.vocab_size:
        raise UsageError(f"the tokenizer has {n} pieces, more than the model's vocabulary "
                         f"({cfg.model.vocab_size})")
    return cfg.model.updated()  # a published vocabulary kept: the published shape


def _wrap(model, cfg: TrainConfig, device, world: int, local_rank: int):
    """DDP (a full replica a rank) or FSDP2 (fully_shard each block, then the root)."""
    if cfg.fsdp and dist.is_initialized():
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world,))
        for layer in model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(model, device_ids=[local_rank] if device.type == "cuda" else None)
    return model


def make_optimizer(model, cfg: TrainConfig, device) -> torch.optim.Optimizer:
    """AdamW over the (float32) parameters: decay on matrices only; fused on CUDA."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr,
                             betas=(0.9, 0.95), **adamw_kwargs(device))


def make_autocast(cfg: TrainConfig, device) -> Callable:
    """A context factory: bf16 autocast on the run's device (weights stay float32: the master
    copy AdamW updates; matmuls and attention run in bf16), or nothing (float32)."""
    if use_bf16(cfg, device):
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def setup(cfg: TrainConfig) -> Run:
    """Process group, data, model (sharded or replicated), optimizer, resume, run folder."""
    device, rank, world, local_rank = _init_distributed(cfg)
    why = attention_problem(cfg.model, device.type, cfg.device)
    if why:  # before the data and the model (the CLI has already said so)
        raise UsageError(why)
    if cfg.batch_size % (world * cfg.grad_accum):
        raise UsageError(f"--batch-size ({cfg.batch_size}) must be a multiple of "
                         f"world size x --grad-accum ({world} x {cfg.grad_accum})")
    _memory_check(cfg.model, cfg, device, world)  # early: before the data and tokenizer
    torch.manual_seed(cfg.seed)
    tok, batches, val = _data(cfg, rank, world)
    model_cfg = _model_config(cfg, tok)
    _memory_check(model_cfg, cfg, device, world)
    with torch.device(device):  # initialized where it trains (gemma-2b: no 10 GB CPU copy)
        model = Gemma(model_cfg)  # same seed on every rank: same initial weights
    if cfg.compile:
        compile_parts(model)
    fwd_model = _wrap(model, cfg, device, world, local_rank)
    opt = make_optimizer(model, cfg, device)
    autocast = make_autocast(cfg, device)

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    run = Run(cfg, model_cfg, device, rank, world, model, fwd_model, opt, batches, val,
              autocast, out)
    if cfg.resume:
        load_checkpoint(run)
    if rank == 0:
        (out / "config.json").write_text(json.dumps(
            {"train": asdict(cfg), "model": model_cfg.to_dict(), "world_size": world,
             "parallel": "fsdp" if _sharded(run) else "ddp" if world > 1 else "none"},
            indent=1))
        metrics_path = out / "metrics.jsonl"
        if not cfg.resume:
            metrics_path.write_text("")
        run.metrics = [json.loads(line) for line in metrics_path.read_text().splitlines()
                       if line]
    return run


# --- checkpoints ---------------------------------------------------------------------------------
# DDP / one process: safetensors for tensors (rank 0), JSON for the rest.
# FSDP: torch.distributed.checkpoint writes each rank's shards of model and optimizer into
# checkpoint/dcp/ (collective), rank 0 the same JSON.

def _sharded(run: Run) -> bool:
    return run.cfg.fsdp and dist.is_initialized()


def _dcp_writer(run: Run, path: Path):
    """torch's file writer stages tensors through a CUDA stream whenever CUDA is present, even
    for CPU tensors; a CPU run (gloo) copies serially (per_thread_copy_ahead=0) and so never
    opens a CUDA context (on a GPU machine it could fail there when the GPU is full)."""
    from torch.distributed.checkpoint import FileSystemWriter

    ahead = {} if run.device.type == "cuda" else {"per_thread_copy_ahead": 0}
    return FileSystemWriter(str(path), **ahead)


def save_checkpoint(run: Run):
    path = run.out / "checkpoint"
    meta = {"step": run.step, "data_position": run.batches.position,
            "param_groups": [{k: v for k, v in g.items() if k != "params"}
                             for g in run.opt.state_dict()["param_groups"]],
            "config": asdict(run.cfg), "sharded": _sharded(run)}
    rng = {"rng.cpu": torch.get_rng_state()}
    if run.device.type == "cuda":  # a CPU run on a GPU machine never creates a CUDA context
        rng["rng.cuda"] = torch.cuda.get_rng_state(run.device)
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    if _sharded(run):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(run.model, run.opt)
        dcp.save({"model": msd, "optim": osd}, storage_writer=_dcp_writer(run, path / "dcp"))
        if run.rank == 0:
            save_file(rng, str(path / "rng.safetensors"))
            (path / "state.json").write_text(json.dumps(meta, indent=1))
        dist.barrier()
        return
    if run.rank != 0:
        return
    state = {k: v.detach().cpu().contiguous() for k, v in run.model.state_dict().items()}
    save_file(state, str(path / "model.safetensors"))
    osd = run.opt.state_dict()
    tensors = {f"{i}.{k}": v.detach().cpu().contiguous()
               for i, s in osd["state"].items() for k, v in s.items() if torch.is_tensor(v)}
    tensors.update(rng)
    save_file(tensors, str(path / "optim.safetensors"))
    meta["param_groups"] = osd["param_groups"]
    (path / "state.json").write_text(json.dumps(meta, indent=1))


def load_checkpoint(run: Run):
    from safetensors.torch import load_file

    path = run.out / "checkpoint"
    if not (path / "state.json").exists():
        raise UsageError(f"--resume: no checkpoint in {path}")
    meta = json.loads((path / "state.json").read_text())
    if meta.get("sharded", False) != _sharded(run):
        was = "sharded (--fsdp over several ranks)" if meta.get("sharded") else "not sharded"
        raise UsageError(f"--resume: the checkpoint in {path} is {was}; resume it the same way")
    if _sharded(run):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        msd, osd = get_state_dict(run.model, run.opt)  # initializes the optimizer state
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=str(path / "dcp"))
        set_state_dict(run.model, run.opt, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        tensors = load_file(str(path / "rng.safetensors"))
    else:
        run.model.load_state_dict(load_file(str(path / "model.safetensors"),
                                            device=str(run.device)))
        tensors = load_file(str(path / "optim.safetensors"))
        state = {}
        for key, v in tensors.items():
            if key.startswith("rng."):
                continue
            i, name = key.split(".", 1)
            state.setdefault(int(i), {})[name] = v if name == "step" else v.to(run.device)
        run.opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and run.device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.cuda"], run.device)
    run.step, run.batches.position = meta["step"], meta["data_position"]


# --- step and evaluation -------------------------------------------------------------------------

def _loss_terms(model, batch):
    """Sum of token losses and the number of target tokens of one micro-batch."""
    tokens, targets, cu, max_len = batch
    count = (targets != -100).sum()
    return model(tokens, cu, max_len, targets=targets) * count, count


def _grad_sync(run: Run, sync: bool):
    """Gradient reduction only on the last micro-batch (DDP no_sync / FSDP2 switch)."""
    if run.world == 1:
        return contextlib.nullcontext()
    if _sharded(run):
        run.model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if sync else run.fwd_model.no_sync()


def train_step(run: Run) -> dict:
    """One optimizer step over grad_accum micro-batches; returns the step's record."""
    cfg, device = run.cfg, run.device
    lr = lr_at(run.step, cfg)
    for g in run.opt.param_groups:
        g["lr"] = lr
    micro = [run.batches.next(device) for _ in range(cfg.grad_accum)]
    count = sum((b[1] != -100).sum() for b in micro).float()
    if dist.is_initialized():
        dist.all_reduce(count)
    loss_sum = torch.zeros((), device=device)
    for i, b in enumerate(micro):
        with _grad_sync(run, i == len(micro) - 1):
            with run.autocast():
                s, _ = _loss_terms(run.fwd_model, b)
            # DDP and FSDP average gradients over ranks: scale to the global token mean
            (s.float() * run.world / count).backward()
        loss_sum += s.detach().float()
    if dist.is_initialized():
        dist.all_reduce(loss_sum)
    gnorm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.clip) if cfg.clip > 0 \
        else torch.zeros(())
    if hasattr(gnorm, "full_tensor"):  # a DTensor under FSDP
        gnorm = gnorm.full_tensor()
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    run.step += 1
    return {"step": run.step, "loss": (loss_sum / count).item(), "lr": lr,
            "grad_norm": float(gnorm)}


@torch.no_grad()
def evaluate(run: Run) -> float:
    """Mean token loss over the first eval_batches validation batches (all ranks agree)."""
    from .data import make_batch

    cfg, model, val, device = run.cfg, run.fwd_model, run.val, run.device
    model.eval()
    total, count = torch.zeros((), device=device), torch.zeros((), device=device)
    per = cfg.batch_size // cfg.grad_accum
    for i in range(min(cfg.eval_batches, max(1, len(val) // per))):
        rows = list(range(i * per, min((i + 1) * per, len(val))))
        with run.autocast():
            s, c = _loss_terms(model, make_batch(val, rows, device))
        total += s.float()
        count += c
    if dist.is_initialized():
        dist.all_reduce(total)
        dist.all_reduce(count)
    model.train()
    return (total / count).item()


# --- the loop ------------------------------------------------------------------------------------

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


def _progress(run: Run):
    if run.rank != 0 or not run.cfg.progress:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=run.cfg.steps, initial=run.step, desc="train", dynamic_ncols=True)


def _count(n: float) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(int(n))


def header(cfg: TrainConfig) -> str:
    """What a run is about to do (the CLI prints it before the slow setup: corpus, tokenizer,
    model): the model and its parameter count, device and dtype, attention backend, tokens per
    step, steps, data and run folder."""
    m = cfg.model
    world = env.distributed()[0]
    dev = _device_type(cfg)
    # the vocabulary the model will get (_model_config): a trained tokenizer's, the published
    # one, or that of --tokenizer (known once it is loaded)
    if cfg.tokenizer:
        vocab = m.vocab_size
        vocab_text = f"at vocabulary {vocab}; --tokenizer's vocabulary replaces it"
    elif m.vocab_size >= 256000:
        vocab, vocab_text = m.vocab_size, f"vocabulary {m.vocab_size}"
    else:
        vocab, vocab_text = cfg.vocab_size, f"vocabulary {cfg.vocab_size}"
    params = m.updated(vocab_size=vocab).num_params()
    g = m.global_attn
    p = f"p {g.p:g}" + (f" global, {m.local_attn.p:g} local (window {m.local_attn.window})"
                        if m.local_attn is not None and "L" in m.layer_pattern else "")
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and dev == "cuda"
                                         and torch.cuda.is_bf16_supported())
    dtype = ("bfloat16 autocast, float32 master weights, gradients and AdamW state" if bf16
             else "float32")
    if dev == "cuda":
        name = torch.cuda.get_device_name(env.distributed()[2])
        device = f"cuda ({name})"
    else:
        device = "cpu"
    attn = m.attn
    if attn == "auto":
        attn += (" (the reference on the CPU)" if dev == "cpu" else
                 " (chosen per call: prope_kernels.explain says which)")
    elif attn == UNFUSED:
        attn += " (RoPE, then torch's scaled_dot_product_attention)"
    elif attn == "triton" and dev == "cpu":
        attn += " (Triton interpreter: slow)"
    step = (f"{cfg.batch_size * cfg.seq_len:,} tokens a step ({cfg.batch_size} rows x "
            f"{cfg.seq_len}" + (f", {cfg.grad_accum} micro-batches" if cfg.grad_accum > 1 else "")
            + (f", over {world} processes" if world > 1 else "") + ")")
    data = cfg.data or "the bundled corpus"
    tok = cfg.tokenizer or f"a BPE tokenizer trained on the data (cached in {env.cache_dir()})"
    return "\n".join([
        f"prope-train: {_count(params)} parameters ({vocab_text}): {m.layers} layers, width "
        f"{m.hidden}, {m.heads} heads, head_dim {g.head_dim}, {p}",
        f"  device {device}, {dtype}; attention {attn}",
        f"  {step}, {cfg.steps} steps" + (f" (stop at {cfg.stop_at})" if cfg.stop_at else "")
        + (", resuming" if cfg.resume else ""),
        f"  data: {data}; tokenizer: {tok}",
        f"  run folder: {cfg.out}",
        "preparing the data, tokenizer and model ...",
    ])


def train(cfg: TrainConfig, log: Callable[[str], None] | None = None) -> dict:
    """Run (or resume) training; returns {"final": last record, "out": folder, "metrics"}.
    ``log``: called with a line once the setup is done (the CLI prints it)."""
    t0 = time.perf_counter()
    run = setup(cfg)
    if log is not None and run.rank == 0:
        log(f"ready after {time.perf_counter() - t0:.1f} s: "
            f"{run.model_cfg.num_params():,} parameters (vocabulary {run.model_cfg.vocab_size}), "
            f"{len(run.batches.data):,} training rows, {len(run.val):,} validation rows"
            + (f", resumed at step {run.step}" if run.step else ""))
        log("  " + mfu_text(run.device))
    tokens_per_step = cfg.batch_size * cfg.seq_len
    peak = peak_flops(run.device)
    flops_token = run.model_cfg.flops_per_token(cfg.seq_len)
    metrics_path = run.out / "metrics.jsonl"
    bar = _progress(run)
    result = {}
    t_last = time.perf_counter()
    last = min(cfg.steps, cfg.stop_at) if cfg.stop_at else cfg.steps
    while run.step < last:
        rec = train_step(run)
        now = time.perf_counter()
        rec["tok_s"] = tokens_per_step / (now - t_last)
        t_last = now
        if peak:
            rec["mfu"] = flops_token * rec["tok_s"] / peak
        if run.device.type == "cuda":
            rec["peak_mem_gib"] = torch.cuda.max_memory_allocated(run.device) / 2**30
        step = run.step
        if step % cfg.eval_every == 0 or step == cfg.steps:
            rec["val_loss"] = evaluate(run)
            rec["val_ppl"] = math.exp(rec["val_loss"])
            t_last = time.perf_counter()  # evaluation time is not training throughput
        if cfg.save_every and step % cfg.save_every == 0 or step == last:
            save_checkpoint(run)
        if run.rank == 0:
            run.metrics.append(rec)
            with open(metrics_path, "a") as fh:
                fh.write(json.dumps(rec) + "\n")
            if bar is not None:
                post = {"loss": f"{rec['loss']:.3f}", "tok/s": f"{rec['tok_s']:,.0f}"}
                post["mfu"] = f"{rec['mfu']:.1%}" if "mfu" in rec else "n/a"
                if "peak_mem_gib" in rec:
                    post["mem"] = f"{rec['peak_mem_gib']:.1f}G"
                if "val_ppl" in rec:
                    post["val_ppl"] = f"{rec['val_ppl']:.2f}"
                bar.set_postfix(post)
                bar.update(1)
        result = rec
    if bar is not None:
        bar.close()
    if run.rank == 0:
        _plot(run.metrics, run.out)
    if dist.is_initialized():
        dist.barrier()
    return {"final": result, "out": str(run.out), "metrics": run.metrics}


def main(argv=None) -> int:
    cfg = parse_args(argv)
    if cfg.benchmark:  # the benchmark imports this module: prope-train (train_main) runs it
        print("prope-train: error: --benchmark runs through prope-train "
              "(python -m prope_kernels.train_main), not python -m prope_kernels.train",
              file=sys.stderr)
        return 2
    first = env.distributed()[1] == 0

    def say(line: str) -> None:
        print(line, flush=True)

    try:
        if first:
            say(header(cfg))
        res = train(cfg, log=say if first else None)
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
        last = res["metrics"][-min(len(res["metrics"]), 10):]  # the last steps' throughput
        tok_s = sorted(m["tok_s"] for m in last)[len(last) // 2]
        mfu = sorted(m.get("mfu", 0.0) for m in last)[len(last) // 2]
        mem = max((m.get("peak_mem_gib", 0.0) for m in res["metrics"]), default=0.0)
        print(f"throughput (median of the last {len(last)} steps): {tok_s:,.0f} tokens/s"
              + (f", MFU {mfu:.1%}" if "mfu" in final else ", MFU n/a")
              + (f", peak memory {mem:.1f} GiB" if mem else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
