"""Training throughput of a transformers model patched with apply_prope_attention vs unpatched.

    python -m prope_kernels.bench.hf_throughput               # GPU: small Llama and Gemma
    python -m prope_kernels.bench.hf_throughput --smoke --out /tmp/x  # CPU smoke, tiny size

(``python -m bench.hf_throughput`` from the repository root.) Per case one random model and a
patched copy, timed over full training steps (forward with labels, backward, AdamW) in alternating
rounds, after comparing their losses on one batch. Inputs "dense", or "packed" (position_ids that
restart: sdpa's block-diagonal mask vs the varlen op). Writes <date>_<gpu>_hf/hf_throughput.json
under the default results folder (see bench/README.md), or into --out.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from . import env
from prope_kernels.integrations.hf import (apply_prope_attention, prope_layer_settings,
                                           remove_prope_attention)

# small models (~100-200M parameters with the vocabulary): enough attention work per token to
# see the op, small enough for one GPU in minutes
def _cfg(hidden, inter, layers, heads, kv, d, vocab, max_pos):
    return dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv, head_dim=d, vocab_size=vocab,
                max_position_embeddings=max_pos)


SIZES = {
    "small": {"llama": _cfg(1024, 2816, 8, 8, 4, 128, 32000, 8192),
              "gemma": _cfg(1024, 4096, 8, 8, 1, 256, 32000, 8192), "batch": 4, "seqlen": 2048},
    "tiny": {"llama": _cfg(64, 128, 2, 4, 2, 16, 256, 256),
             "gemma": _cfg(64, 128, 2, 4, 1, 16, 256, 256), "batch": 2, "seqlen": 64},
}
CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "gemma": ("GemmaConfig",
                                                                    "GemmaForCausalLM")}


def build(family, size, dtype, device, seed=0):
    import transformers
    cfg_name, cls_name = CLASSES[family]
    cfg = getattr(transformers, cfg_name)(**SIZES[size][family], use_cache=False,
                                          attention_dropout=0.0)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return getattr(transformers, cls_name)(cfg).to(device=device, dtype=dtype).train()


def batch(kind, b, s, vocab, device, seed=1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (b, s), generator=gen)
    kw = {}
    if kind == "packed":  # documents of 1/8, 3/8 and 1/2 of the row
        cuts = [0, s // 8, s // 2, s]
        pos = torch.cat([torch.arange(cuts[i + 1] - cuts[i]) for i in range(3)])
        kw["position_ids"] = pos.expand(b, s).to(device)
    return ids.to(device), kw


def train_steps(model, opt, ids, kw, n, sync):
    for _ in range(n):
        loss = model(ids, labels=ids, **kw).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync()
    return loss


def run_case(family, kind, args, device, dtype, sync):
    base = build(family, args.size, dtype, device)
    patched = apply_prope_attention(copy.deepcopy(base), p=args.p, backend=args.backend)
    if args.p is not None:  # the converted rotation, in both models
        remove_prope_attention(apply_prope_attention(base, p=args.p, backend=args.backend))
    b, s = args.batch or SIZES[args.size]["batch"], args.seqlen or SIZES[args.size]["seqlen"]
    ids, kw = batch(kind, b, s, base.config.vocab_size, device)
    with torch.no_grad():  # same answer before timing (bf16: the models' own rounding differs)
        l_base = base(ids, labels=ids, **kw).loss.float().item()
        l_patched = patched(ids, labels=ids, **kw).loss.float().item()
    models = {"unpatched (sdpa + RoPE)": base, "patched (prope_attention)": patched}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4, fused=device == "cuda")
            for k, m in models.items()}
    rates = {k: [] for k in models}
    peak = {}
    for k, m in models.items():  # warm-up (autotuning, allocator)
        train_steps(m, opts[k], ids, kw, args.warmup, sync)
    for _ in range(args.rounds):
        for k, m in models.items():
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            train_steps(m, opts[k], ids, kw, args.steps, sync)
            dt = time.perf_counter() - t0
            rates[k].append(b * s * args.steps / dt)
            if device == "cuda":
                peak[k] = torch.cuda.max_memory_allocated() / 2**20
    rows = [dict(family=family, inputs=kind, provider=k, batch=b, seqlen=s,
                 dtype=str(dtype).replace("torch.", ""),
                 params_m=round(sum(x.numel() for x in m.parameters()) / 1e6, 1),
                 tokens_per_s_median=statistics.median(rates[k]), tokens_per_s_rounds=rates[k],
                 peak_mib=peak.get(k), loss_before=l_base if m is base else l_patched)
            for k, m in models.items()]
    rows[1]["speedup_vs_unpatched"] = (rows[1]["tokens_per_s_median"]
                                       / rows[0]["tokens_per_s_median"])
    rows[1]["layers"] = [dict(p=x.p, theta=x.theta, head_dim=x.head_dim, fused=x.reason is None)
                         for x in prope_layer_settings(patched)]
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m prope_kernels.bench.hf_throughput",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--families", default="llama,gemma")
    ap.add_argument("--inputs", default="dense,packed")
    ap.add_argument("--smoke", action="store_true", help="tiny size, 1 step (CPU check)")
    ap.add_argument("--size", default=None, choices=list(SIZES))
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seqlen", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--p", type=float, default=None,
                    help="convert both models to this p first (default: the model's RoPE)")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--out", default=None, help="output folder (default: <date>_<gpu>_hf/ under "
                    "prope-bench-results/ here, or bench/results/ at the root of a checkout)")
    args = ap.parse_args(argv)
    gpu = torch.cuda.is_available()
    args.size = args.size or ("tiny" if args.smoke or not gpu else "small")
    args.steps = args.steps or (1 if args.smoke else 10)
    args.rounds = args.rounds or (1 if args.smoke else 3)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 3)
    device = "cuda" if gpu else "cpu"
    dtype = torch.bfloat16 if gpu else torch.float32
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    meta = env.collect(smoke=args.smoke or not gpu)
    import transformers
    meta["transformers"] = transformers.__version__
    rows = []
    for fam in args.families.split(","):
        for kind in args.inputs.split(","):
            rows += run_case(fam, kind, args, device, dtype, sync)
            r = rows[-2:]
            print(f"{fam:6s} {kind:7s} unpatched {r[0]['tokens_per_s_median']:12.0f} tok/s  "
                  f"patched {r[1]['tokens_per_s_median']:12.0f} tok/s  "
                  f"x{r[1]['speedup_vs_unpatched']:.3f}  loss {r[0]['loss_before']:.4f} / "
                  f"{r[1]['loss_before']:.4f}", flush=True)
    if args.out:
        out = Path(args.out)
    elif not gpu:  # CPU figures are a smoke check, never results
        out = Path(tempfile.gettempdir()) / "prope_hf_throughput"
    else:  # <date>_<gpu>_hf
        out = env.results_root() / f"{env.slug(dict(meta, run_kind='gpu'))}_hf"
    out.mkdir(parents=True, exist_ok=True)
    path = out / "hf_throughput.json"
    path.write_text(json.dumps(dict(meta=meta, args=vars(args), rows=rows), indent=1))
    print(f"wrote {path} ({meta['run_kind']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
