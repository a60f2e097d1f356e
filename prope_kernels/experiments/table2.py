"""Table 2 of Barbero et al. (ICLR 2025) in miniature: one model trained with each of the paper's
seven position encodings on the same data and token budget, several seeds.

    prope-experiment table2                         # CPU-sized default (see PRESETS["cpu"])
    prope-experiment table2 --preset gpu            # one H100, at most 6 minutes (estimate)
    prope-experiment table2 --preset gpu-large --data big.jsonl   # ~1.4 h of one H100
    python -m prope_kernels.experiments.table2 --seeds 0 1 --steps 100

Writes to ``--out``: table.md (mean and spread over seeds of the validation loss and perplexity,
the paired difference to RoPE theta 1e4, the long-context probe, the paper's column), results.json
(every number of every run), curves.png (validation curves, long-context losses) and configs/
(the exact trainer config of every run). The run folders (checkpoints) go to ``--runs``.

Seeds: seed s fixes the model's initial weights, the data order, the held-out split and the
tokenizer for every encoding alike, so encodings are compared within a seed (paired) and the
spread over seeds says which differences are real.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from . import common

# The paper's seven encodings (Table 2), in its order; p = 0 is NoPE, p = 1 is RoPE.
ENCODINGS = {
    "nope": dict(p=0.0, theta=10000.0, variant="prope"),
    "rope-1e4": dict(p=1.0, theta=10000.0, variant="prope"),
    "rope-5e5": dict(p=1.0, theta=500000.0, variant="prope"),
    "0.75-rope-reversed": dict(p=0.75, theta=10000.0, variant="reversed"),
    "partial-rope-0.75": dict(p=0.75, theta=10000.0, variant="partial"),
    "0.25-rope": dict(p=0.25, theta=10000.0, variant="prope"),
    "0.75-rope": dict(p=0.75, theta=10000.0, variant="prope"),
}
LABELS = {
    "nope": "NoPE", "rope-1e4": "RoPE θ=1e4", "rope-5e5": "RoPE θ=5e5",
    "0.75-rope-reversed": "0.75-RoPE reversed", "partial-rope-0.75": "partial RoPE 0.75",
    "0.25-rope": "0.25-RoPE", "0.75-rope": "0.75-RoPE",
}
# Gemma 2B trained from scratch, validation on Wiki, as printed in the paper's Table 2
PAPER_WIKI = {
    "nope": 4.8594, "rope-1e4": 4.4627, "rope-5e5": 4.4485, "0.75-rope-reversed": 4.4592,
    "partial-rope-0.75": 4.4537, "0.25-rope": 4.5302, "0.75-rope": 4.4414,
}
BASELINE = "rope-1e4"


@dataclass
class Table2Config:
    """Model shape, training budget, seeds and evaluation of one Table 2 experiment."""

    shape: dict = field(default_factory=dict)   # hidden, layers, heads, kv_heads, head_dim, mlp
    vocab_size: int = 2048
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 200
    lr: float = 3e-3
    warmup: int = 20
    eval_every: int = 25
    eval_batches: int = 8
    val_fraction: float = 0.15
    seeds: tuple = (0, 1, 2)
    encodings: tuple = tuple(ENCODINGS)
    long_factors: tuple = (2, 4)     # the long-context probe: these multiples of seq_len
    max_long_docs: int = 64
    max_val_tokens: int = 65536      # the final validation reads at most this many tokens
    data: str = ""
    attn: str = "auto"               # "unfused": RoPE then SDPA (fast on a CPU)
    device: str = "auto"

    def train_kw(self, seed: int, out: str) -> dict:
        return dict(data=self.data, vocab_size=self.vocab_size, seq_len=self.seq_len,
                    batch_size=self.batch_size, steps=self.steps, lr=self.lr,
                    warmup=self.warmup, eval_every=self.eval_every,
                    eval_batches=self.eval_batches, val_fraction=self.val_fraction, seed=seed,
                    out=out, device=self.device, progress=False)


PRESETS = {
    # 2 shared CPU cores: ~0.2M parameters, 150 steps of 16 x 64 tokens (154k tokens, 0.28
    # passes over the bundled corpus) per run, 7 x 3 runs: 19.4 min measured on a busy machine
    "cpu": Table2Config(shape=dict(hidden=64, layers=2, heads=4, kv_heads=1, head_dim=16,
                                   mlp=256), vocab_size=1024, seq_len=64, batch_size=16,
                        steps=150, warmup=15, eval_every=25, seeds=(0, 1, 2), attn="unfused",
                        max_val_tokens=16384),
    # one H100 in at most 6 minutes, on the bundled corpus (the GPU machine has no network):
    # NoPE, RoPE and 0.75-RoPE (the paper's worst, baseline and best), 4 seeds (12 runs).
    # 14.3M parameters (12.7M without the embedding; 6 layers, MQA, head_dim 64 so 0.75-RoPE
    # leaves 8 slow pairs unrotated), rows of 512, 80 steps of 32 x 512 tokens = 1.31M tokens a
    # run, 3.46 passes over the training split (checked on the CPU: 378k tokens at vocabulary
    # 4096, 739 rows of 512, seed 0; the held-out split: 40k tokens, 2 documents long enough for
    # the 4x probe). Time (estimate_gpu_time, a CPU-side estimate, not measured): 1.2e14 FLOPs a
    # run, ~1.5 s at 10% MFU; the runs are bound by launch overhead, taken as 25 ms a step, 8 s
    # a run for data, setup and evaluation, and 60 s once for Triton's first compilation:
    # 3.2 min for the 12 runs. Seeds: the CPU run's paired NoPE - RoPE interval (± 0.175 at 3
    # seeds) is NoPE's own instability at 184k parameters; with 4 seeds the 95% interval is
    # 3.18 sd / 2 of the paired differences.
    "gpu": Table2Config(shape=dict(hidden=384, layers=6, heads=6, kv_heads=1, head_dim=64,
                                   mlp=1536), vocab_size=4096, seq_len=512, batch_size=32,
                        steps=80, lr=2e-3, warmup=10, eval_every=20, eval_batches=8,
                        val_fraction=0.1, seeds=(0, 1, 2, 3),
                        encodings=("nope", "rope-1e4", "0.75-rope"), max_long_docs=32,
                        max_val_tokens=1 << 16),
    # the gpu preset's model and encodings at CPU size (a check that it runs, seconds a run)
    "gpu-cpu": Table2Config(shape=dict(hidden=384, layers=6, heads=6, kv_heads=1, head_dim=64,
                                       mlp=1536), vocab_size=512, seq_len=64, batch_size=4,
                            steps=2, lr=2e-3, warmup=1, eval_every=2, eval_batches=1,
                            val_fraction=0.1, seeds=(0, 1),
                            encodings=("nope", "rope-1e4", "0.75-rope"), max_long_docs=2,
                            long_factors=(2,), max_val_tokens=512, attn="unfused"),
    # all seven encodings, ~113M parameters, 3000 steps of 32 x 1024 tokens (98M tokens) per
    # run, 7 x 3 runs: 1.5e18 training FLOPs, about 1.4 h on one H100 at an assumed 30% MFU
    # (an estimate from FLOPs, not measured; `--estimate` prints it). Meant for --data a corpus
    # of 100M+ tokens: the bundled one is ~0.5M tokens (the run warns when the budget is many
    # passes)
    "gpu-large": Table2Config(shape=dict(hidden=768, layers=12, heads=12, kv_heads=1,
                                         head_dim=64, mlp=3072), vocab_size=16384,
                              seq_len=1024, batch_size=32, steps=3000, lr=1e-3, warmup=300,
                              eval_every=250, eval_batches=16, val_fraction=0.05,
                              max_long_docs=128, max_val_tokens=1 << 20),
    # the tests: seconds on a CPU
    "tiny": Table2Config(shape=dict(hidden=32, layers=1, heads=2, kv_heads=1, head_dim=16,
                                    mlp=64), vocab_size=384, seq_len=32, batch_size=4, steps=4,
                         warmup=1, eval_every=2, eval_batches=1, val_fraction=0.1,
                         seeds=(0, 1), max_long_docs=4, max_val_tokens=1024, attn="unfused"),
}

H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s (SXM)


# --- evaluation -----------------------------------------------------------------------------------

@torch.no_grad()
def _val_loss(model, val_docs, tok, seq_len, device, max_tokens, rows_per_batch=16):
    """Mean token loss over the packed rows of the held-out documents (document boundaries
    kept, as in training), the first ``max_tokens`` tokens' worth of rows."""
    from ..data import make_batch, pack, tokenize

    packed = pack(tokenize(val_docs, tok), seq_len)
    n_rows = max(1, min(len(packed), max_tokens // seq_len))
    total, count = 0.0, 0
    for s in range(0, n_rows, rows_per_batch):
        tokens, targets, cu, max_len = make_batch(packed, list(range(s, min(s + rows_per_batch,
                                                                        n_rows))), device)
        with _autocast(device):
            loss = model(tokens, cu, max_len, targets=targets)
        n = int((targets != -100).sum())
        total += float(loss) * n
        count += n
    return total / count, count


def _autocast(device):
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    import contextlib
    return contextlib.nullcontext()


def _nll(model, tokens, device):
    """Per-position next-token loss (rows, length - 1) of token rows (rows, length)."""
    with _autocast(device):
        logits = model(tokens)
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), tokens[:, 1:], reduction="none").double().cpu()


@torch.no_grad()
def _long_docs(model, val_docs, tok, length, t, device, max_docs):
    """The long-context probe on held-out documents of at least ``length`` tokens, each cut to
    its first ``length`` tokens. Returns per-position mean losses (length - 1,) over the
    documents, read two ways, and the number of documents:

    * full: the whole document in one causal window (positions 0 .. length-1; the model was
      trained on positions < t);
    * short: the same predictions with at most ``t`` tokens of context at positions < t
      (windows of t tokens at stride t/2; each prediction is taken from the window where it has
      the most context), i.e. what the model does within its training length.

    full - short at positions >= t: negative when the model gains from context beyond its
    training length, positive when positions it never saw break it."""
    from ..data import tokenize

    ids = [x[:length] for x in tokenize(val_docs, tok) if len(x) >= length][:max_docs]
    if not ids:
        return None, None, 0
    full = torch.zeros(length - 1, dtype=torch.float64)
    short = torch.zeros(length - 1, dtype=torch.float64)
    half = max(1, t // 2)
    starts = list(range(0, length - t + 1, half))
    for i in range(0, len(ids), 4):
        tokens = torch.tensor(ids[i:i + 4], dtype=torch.long, device=device)
        full += _nll(model, tokens, device).sum(0)
        win = torch.cat([tokens[:, s:s + t] for s in starts])            # (windows*rows, t)
        nll = _nll(model, win, device).view(len(starts), tokens.shape[0], t - 1).sum(1)
        covered = 0  # predictions 0 .. covered-1 already taken from an earlier window
        for w, s in enumerate(starts):
            lo = covered - s  # from here on each kept prediction has context >= t/2
            short[s + lo:s + t - 1] += nll[w, lo:]
            covered = s + t - 1
    return (full / len(ids)).numpy(), (short / len(ids)).numpy(), len(ids)


def evaluate_run(run_dir, cfg: Table2Config, device) -> dict:
    """Validation loss at the training length (the held-out split, up to max_val_tokens) and
    the long-context probe at 2x, 4x (``long_factors``) the training length."""
    attn = common.unfused_attn() if cfg.attn == "unfused" else None
    model, _, train = common.load_run(run_dir, device, attn=attn)
    tok, _, val_docs = common.run_data(train)
    t = train["seq_len"]
    loss, n_tokens = _val_loss(model, val_docs, tok, t, device, cfg.max_val_tokens)
    res = {"val_loss": loss, "val_ppl": math.exp(loss), "val_tokens": n_tokens}
    longest = t * max(cfg.long_factors)
    full, short, n_docs = _long_docs(model, val_docs, tok, longest, t, device,
                                     cfg.max_long_docs)
    res["long_docs"] = n_docs
    if full is not None:
        # per factor f: predictions at positions [t-1, f*t-1) (targets t .. f*t-1), i.e. the
        # tokens beyond the training length in a window of f*t; full and short context
        res["long"] = {"1x": {"window_loss": float(full[:t - 1].mean())}}
        for f in cfg.long_factors:
            n = f * t - 1
            res["long"][f"{f}x"] = {"window_loss": float(full[:n].mean()),
                                    "beyond_full": float(full[t - 1:n].mean()),
                                    "beyond_short": float(short[t - 1:n].mean()),
                                    "delta": float(full[t - 1:n].mean() - short[t - 1:n].mean())}
        res["long_per_position"] = {"full": full.tolist(), "short": short.tolist()}
    return res


# --- statistics -----------------------------------------------------------------------------------

_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262, 10: 2.228}


def summarize(values) -> dict:
    """mean, sample std, min, max, n and the half-width of the 95% t interval of the mean."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    n = len(v)
    if n == 0:
        return {"n": 0}
    sd = float(v.std(ddof=1)) if n > 1 else float("nan")
    ci = _T975.get(n - 1, 1.96) * sd / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": float(v.mean()), "std": sd, "min": float(v.min()), "max": float(v.max()),
            "n": n, "ci95": ci}


def _fmt(s: dict, key="mean", digits=3) -> str:
    if not s.get("n"):
        return "n/a"
    if s["n"] == 1:
        return f"{s['mean']:.{digits}f}"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def _signed(s: dict, digits=3) -> str:
    if not s.get("n"):
        return "n/a"
    if s["n"] == 1:
        return f"{s['mean']:+.{digits}f}"
    return f"{s['mean']:+.{digits}f} ± {s['std']:.{digits}f}"


def analyze(results: dict, cfg: Table2Config) -> dict:
    """Per encoding: summaries over seeds, the paired difference to the baseline per seed with
    its 95% interval, the ranks."""
    seeds = [int(s) for s in cfg.seeds]
    out = {}
    for enc in cfg.encodings:
        runs = results[enc]
        row = {"val_loss": summarize(runs[str(s)]["val_loss"] for s in seeds),
               "val_ppl": summarize(runs[str(s)]["val_ppl"] for s in seeds)}
        if BASELINE in results and enc != BASELINE:
            d = [runs[str(s)]["val_loss"] - results[BASELINE][str(s)]["val_loss"] for s in seeds]
            row["delta_vs_baseline"] = summarize(d)
            st = row["delta_vs_baseline"]
            row["resolved"] = bool(st["n"] > 1 and abs(st["mean"]) > st["ci95"])
        for f in (1,) + tuple(cfg.long_factors):
            key = f"{f}x"
            for name in ("window_loss", "beyond_full", "beyond_short", "delta"):
                vals = [runs[str(s)].get("long", {}).get(key, {}).get(name) for s in seeds]
                row[f"{name}_{key}"] = summarize(vals)
        out[enc] = row
    order = sorted(cfg.encodings, key=lambda e: out[e]["val_loss"]["mean"])
    paper_order = sorted((e for e in cfg.encodings), key=lambda e: PAPER_WIKI[e])
    for e in cfg.encodings:
        out[e]["rank"] = order.index(e) + 1
        out[e]["paper_rank"] = paper_order.index(e) + 1
    return out


# --- outputs --------------------------------------------------------------------------------------

def write_table(path: Path, stats: dict, cfg: Table2Config, meta: dict):
    t = cfg.seq_len
    fs = (1,) + tuple(cfg.long_factors)
    head = ["encoding", "val loss", "val ppl", "Δ loss vs RoPE 1e4 (95% CI)",
            f"long docs: loss @{t}"] + \
        [f"@{f * t}: beyond-{t} loss, full − ≤{t} context" for f in cfg.long_factors] + \
        ["rank", "paper (Wiki)", "paper rank"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for enc in cfg.encodings:
        s = stats[enc]
        if "delta_vs_baseline" in s:
            d = s["delta_vs_baseline"]
            mark = " **resolved**" if s["resolved"] else ""
            delta = f"{d['mean']:+.3f} (± {d['ci95']:.3f}){mark}" if d["n"] > 1 else \
                f"{d['mean']:+.3f}"
        else:
            delta = "baseline"
        row = [LABELS[enc], _fmt(s["val_loss"]), _fmt(s["val_ppl"], digits=1), delta]
        row += [_fmt(s["window_loss_1x"])]
        row += [f"{_fmt(s[f'beyond_full_{f}x'])}, {_signed(s[f'delta_{f}x'])}"
                for f in cfg.long_factors]
        row += [str(s["rank"]), f"{PAPER_WIKI[enc]:.4f}", str(s["paper_rank"])]
        lines.append("| " + " | ".join(row) + " |")
    n = len(cfg.seeds)
    m = meta
    text = [
        f"# Table 2 in miniature ({m['preset']})", "",
        f"Model: Gemma, {m['params']:,} parameters ({m['shape']}), trained {cfg.steps} steps of "
        f"{cfg.batch_size} x {cfg.seq_len} tokens ({cfg.steps * cfg.batch_size * cfg.seq_len:,} "
        f"tokens, {m['passes']:.3g} passes over the training split) per run on {m['data']}; "
        f"{n} seeds ({', '.join(map(str, cfg.seeds))}) per "
        f"encoding; device {m['device']}. Training: {m['train_span_s'] / 60:.1f} min of wall "
        f"time from the first run's start to the last run's end (sum over runs "
        f"{m['train_sum_s'] / 60:.1f} min); this invocation (evaluation, and training of runs "
        f"not already trained) took {m['wall_s'] / 60:.1f} min.", "",
        "\n".join(lines), "",
        f"* **val loss / val ppl**: mean ± sample std over the {n} seeds of the token loss on "
        f"packed rows of the held-out documents ({m['val_tokens']:,} target tokens a seed on "
        f"average, rows of {t}, document boundaries kept as in training).",
        f"* **Δ loss vs RoPE 1e4**: per seed, this encoding's val loss minus RoPE θ=1e4's (same "
        f"seed: same initial weights, data order, split, tokenizer); mean and the half-width of "
        f"its 95% t interval over seeds. Only a difference marked **resolved** (interval "
        f"excludes 0) counts as a difference; the others are within seed noise.",
        f"* **long docs** (the long-context probe): held-out documents of at least "
        f"{t * max(fs)} tokens (about {m['long_docs']} a seed), each cut to its first "
        f"{t * max(fs)} tokens. **loss @{t}**: mean loss of the first {t} tokens' predictions. "
        f"**@L** (L = {', '.join(f'{f}x' for f in cfg.long_factors)} the training length "
        f"{t}): the document read in one causal window of L tokens; first number: mean loss "
        f"of the predictions beyond the training length (targets {t} .. L-1, positions the "
        f"model never saw in training); second: that loss minus the loss of the same "
        f"predictions made with at most {t} tokens of context (windows of {t} at stride "
        f"{t // 2}), mean ± std over seeds. Negative: the model gains from context beyond its "
        f"training length; positive: unseen positions hurt it.",
        "* **paper (Wiki)**: Gemma 2B trained from scratch, Table 2 of Barbero et al. (ICLR "
        "2025), as printed; a different scale, data and budget, so compare orderings only. "
        "**rank** orders our mean val loss (1 = best), **paper rank** the paper's column.",
    ]
    if m.get("reading"):
        text += ["", m["reading"]]
    path.write_text("\n".join(text) + "\n")


def plot(path: Path, results: dict, stats: dict, cfg: Table2Config):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 5))
    colors = plt.get_cmap("tab10")
    for i, enc in enumerate(cfg.encodings):
        curves = []
        for s in cfg.seeds:
            m = results[enc][str(s)]["curve"]
            curves.append(m)
        steps = [st for st, _ in curves[0]]
        vals = np.array([[v for _, v in c] for c in curves if len(c) == len(steps)])
        mean = vals.mean(0)
        a.plot(steps, mean, "o-", ms=3, color=colors(i), label=LABELS[enc])
        if len(vals) > 1:
            a.fill_between(steps, vals.min(0), vals.max(0), color=colors(i), alpha=0.15)
        xs, ys, es = [], [], []
        for f in cfg.long_factors:
            st = stats[enc][f"delta_{f}x"]
            if st.get("n"):
                xs.append(f * cfg.seq_len)
                ys.append(st["mean"])
                es.append(st["std"] if st["n"] > 1 else 0.0)
        if xs:
            off = 1 + 0.03 * (i - len(cfg.encodings) / 2)  # spread the points apart
            b.errorbar([x * off for x in xs], ys, yerr=es, fmt="o-", ms=4, capsize=3,
                       color=colors(i), label=LABELS[enc])
    a.set_xlabel("step")
    a.set_ylabel("validation loss (trainer's periodic evaluation)")
    a.set_title(f"validation curves: mean over {len(cfg.seeds)} seeds, band = min..max")
    a.legend(fontsize=8)
    lo = min(stats[e]["val_loss"]["min"] for e in cfg.encodings)
    a.set_ylim(lo - 0.2, lo + 2.5)
    b.set_xscale("log", base=2)
    b.set_xticks([f * cfg.seq_len for f in cfg.long_factors],
                 [str(f * cfg.seq_len) for f in cfg.long_factors])
    b.set_xlabel(f"evaluation window L (tokens); training length {cfg.seq_len}")
    b.set_ylabel(f"loss beyond {cfg.seq_len}: full context − ≤{cfg.seq_len} context")
    b.axhline(0, color="gray", ls=":")
    b.set_title("long-context probe, mean ± std over seeds\n(< 0: the model gains from context "
                "beyond its training length)", fontsize=10)
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def reading(stats: dict, cfg: Table2Config) -> str:
    """A plain statement of what the numbers show, generated from them (no hand-written claims
    about numbers that could go stale)."""
    order = sorted(cfg.encodings, key=lambda e: stats[e]["val_loss"]["mean"])
    paper = sorted(cfg.encodings, key=lambda e: PAPER_WIKI[e])
    lines = ["## Reading", "",
             "Ours, best to worst by mean val loss: " + " < ".join(LABELS[e] for e in order)
             + ".", "Paper, best to worst: " + " < ".join(LABELS[e] for e in paper) + "."]
    res = [e for e in cfg.encodings if stats[e].get("resolved")]
    if BASELINE in cfg.encodings:
        if res:
            lines.append("Differences to RoPE θ=1e4 resolved by the seeds (95% interval of the "
                         "paired difference excludes 0): " + ", ".join(
                             f"{LABELS[e]} {stats[e]['delta_vs_baseline']['mean']:+.3f}"
                             for e in res) + ".")
        unres = [e for e in cfg.encodings if e != BASELINE and e not in res]
        if unres:
            lines.append("Not resolved (within seed noise of RoPE θ=1e4): "
                         + ", ".join(LABELS[e] for e in unres) + ".")
    far = max(cfg.long_factors)
    grow = {e: stats[e][f"delta_{far}x"] for e in cfg.encodings
            if stats[e][f"delta_{far}x"].get("n")}
    if grow:
        lines.append(f"Long context at {far}x the training length, loss beyond it with full "
                     f"context minus with at most {cfg.seq_len} tokens of context (lower = uses "
                     "long context better), mean ± std: " + ", ".join(
                         f"{LABELS[e]} {_signed(v)}" for e, v in
                         sorted(grow.items(), key=lambda kv: kv[1]["mean"])) + ".")
    return "\n".join(lines)


# --- the experiment -------------------------------------------------------------------------------

# what estimate_gpu_time assumes beyond FLOPs (not measured): a small model's step is bound by
# kernel launches, each run prepares its data, model and evaluation, and the first run compiles
# the Triton kernels
OVERHEAD = {"step_s": 0.025, "run_s": 8.0, "first_compile_s": 60.0}


def estimate_gpu_time(cfg: Table2Config, model_cfg, mfu: float | None = None) -> dict:
    """Time of the whole experiment on one H100 (an estimate, not a measurement): FLOPs per
    token x tokens x runs / (bf16 peak x an assumed MFU: 30% for a model of 50M+ parameters,
    10% below), plus the assumed overheads of OVERHEAD (launch-bound steps, per-run setup and
    evaluation, the first compilation)."""
    if mfu is None:
        mfu = 0.3 if model_cfg.num_params() >= 50e6 else 0.1
    runs = len(cfg.seeds) * len(cfg.encodings)
    tokens = cfg.steps * cfg.batch_size * cfg.seq_len
    flops = model_cfg.flops_per_token(cfg.seq_len) * tokens * runs
    compute_s = flops / (H100_BF16_PEAK * mfu)
    wall_s = compute_s + runs * (cfg.steps * OVERHEAD["step_s"] + OVERHEAD["run_s"]) + \
        OVERHEAD["first_compile_s"]
    return {"train_flops": flops, "assumed_mfu": mfu, "runs": runs,
            "tokens_per_run": tokens, "h100_hours": compute_s / 3600,
            "assumed_overhead": dict(OVERHEAD), "h100_wall_min": wall_s / 60}


def passes(cfg: Table2Config, seed: int) -> float:
    """How many times each run reads its training split (the token budget over the split)."""
    from ..data import pack, tokenize

    tok, train_docs, _ = common.run_data(dict(cfg.train_kw(seed, ""), tokenizer=""))
    rows = len(pack(tokenize(train_docs, tok), cfg.seq_len))
    return cfg.steps * cfg.batch_size / max(rows, 1)


def run(cfg: Table2Config, out: Path, runs: Path, preset_name: str = "custom",
        log=print, max_minutes: float = 0.0) -> dict:
    """Train and evaluate every (seed, encoding); tabulate. ``max_minutes`` (0: no limit): a
    seed is started only when the time so far plus the slowest seed so far fits, so a run
    with a deadline tabulates the seeds it finished (every encoding of each) instead of none."""
    from ..train import train

    t0 = time.time()
    seed_s, done_seeds = [], []
    out.mkdir(parents=True, exist_ok=True)
    (out / "configs").mkdir(exist_ok=True)
    device = common.default_device(cfg.device)
    results = {e: {} for e in cfg.encodings}
    model_cfg = None
    for seed in cfg.seeds:
        elapsed = time.time() - t0
        if max_minutes and seed_s and elapsed + max(seed_s) > max_minutes * 60:
            log(f"[table2] --max-minutes {max_minutes:g}: {elapsed / 60:.1f} min spent, a seed "
                f"takes up to {max(seed_s) / 60:.1f}; stopping after seeds {done_seeds}")
            break
        ts_seed = time.time()
        for enc in cfg.encodings:
            run_dir = runs / f"{enc}_seed{seed}"
            attn = common.unfused_attn() if cfg.attn == "unfused" else cfg.attn
            model_cfg = common.model_config(dict(cfg.shape, vocab_size=cfg.vocab_size),
                                            ENCODINGS[enc], attn=attn)
            tcfg = common.train_config(model_cfg, **cfg.train_kw(seed, str(run_dir)))
            ts = time.time()
            state = run_dir / "checkpoint" / "state.json"
            done = state.is_file() and json.loads(state.read_text())["step"] == cfg.steps
            if done:
                log(f"[table2] {enc} seed {seed}: already trained in {run_dir}, reused")
            else:
                train(tcfg)
            metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().split("\n")
                       if x]
            train_s = time.time() - ts
            # a reused run's training time from its files: config.json is written when its
            # training starts (after the data is ready), checkpoint/state.json when it ends
            t_start = (run_dir / "config.json").stat().st_mtime
            t_end = state.stat().st_mtime
            if done:
                train_s = t_end - t_start
            te = time.time()
            r = evaluate_run(run_dir, cfg, device)
            r["trained"] = {"start": t_start, "end": t_end, "reused": bool(done)}
            r["curve"] = [(m["step"], m["val_loss"]) for m in metrics if "val_loss" in m]
            r["final_train_loss"] = metrics[-1]["loss"]
            r["train_s"] = train_s
            r["eval_s"] = time.time() - te
            results[enc][str(seed)] = r
            run_cfg = json.loads((run_dir / "config.json").read_text())
            (out / "configs" / f"{enc}_seed{seed}.json").write_text(json.dumps(run_cfg, indent=1))
            long = r.get("long", {})
            log(f"[table2] {enc:20s} seed {seed}: val loss {r['val_loss']:.4f} "
                f"(ppl {r['val_ppl']:.1f}); long " + ", ".join(
                    f"{k} {v['window_loss']:.3f}" for k, v in long.items())
                + f"; train {train_s:.0f} s, eval {r['eval_s']:.0f} s")
        seed_s.append(time.time() - ts_seed)
        done_seeds.append(seed)
    if tuple(done_seeds) != tuple(cfg.seeds):
        cfg = replace(cfg, seeds=tuple(done_seeds))  # the table states the seeds it has
    stats = analyze(results, cfg)
    n_pass = passes(cfg, cfg.seeds[0])
    if n_pass > 4:
        log(f"[table2] warning: each run read its training split {n_pass:.0f} times; the "
            "comparison measures memorization more than modelling: pass --data a larger corpus")
    full_cfg = common.model_config(dict(cfg.shape, vocab_size=cfg.vocab_size),
                                   ENCODINGS["0.75-rope"])
    meta = {
        "preset": preset_name, "params": model_cfg.num_params(),
        "shape": ", ".join(f"{k} {v}" for k, v in cfg.shape.items()) +
        f", vocab {model_cfg.vocab_size}",
        "data": cfg.data or "the bundled corpus", "device": str(device) + (
            f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
            f" (torch threads: {torch.get_num_threads()})"),
        "wall_s": time.time() - t0,
        "train_sum_s": sum(results[e][str(s)]["train_s"] for e in cfg.encodings
                           for s in cfg.seeds),
        "train_span_s": max(results[e][str(s)]["trained"]["end"] for e in cfg.encodings
                            for s in cfg.seeds) -
        min(results[e][str(s)]["trained"]["start"] for e in cfg.encodings for s in cfg.seeds),
        "val_tokens": int(np.mean([results[e][str(s)]["val_tokens"]
                                   for e in cfg.encodings for s in cfg.seeds])),
        "long_docs": int(np.mean([results[e][str(s)]["long_docs"]
                                  for e in cfg.encodings for s in cfg.seeds])),
        "h100_estimate": estimate_gpu_time(cfg, full_cfg),
        "passes": n_pass,
    }
    meta["reading"] = reading(stats, cfg)
    doc = {"config": asdict(cfg), "meta": meta, "paper_wiki": PAPER_WIKI, "stats": stats,
           "runs": results}
    (out / "results.json").write_text(json.dumps(doc, indent=1))
    write_table(out / "table.md", stats, cfg, meta)
    plot(out / "curves.png", results, stats, cfg)
    log(f"[table2] wrote {out / 'table.md'}, results.json, curves.png, configs/ "
        f"in {meta['wall_s'] / 60:.1f} min")
    return doc


def build_parser(ap=None) -> argparse.ArgumentParser:
    ap = ap or argparse.ArgumentParser(prog="prope-experiment table2", description=__doc__,
                                       formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu", choices=list(PRESETS),
                    help="model and budget: cpu (default; measured 19.4 min on 2 shared CPU "
                    "cores), gpu (one H100, <= 6 min estimated; NoPE, RoPE, 0.75-RoPE x 4 "
                    "seeds), gpu-cpu (gpu's model at CPU size), gpu-large (all seven, ~1.4 h; "
                    "--data a large corpus), tiny (tests)")
    ap.add_argument("--out", default=None, help="results folder (default results/table2_PRESET)")
    ap.add_argument("--runs", default=None, help="run folders with checkpoints (default "
                    "runs/table2_PRESET); a finished run found there is reused")
    ap.add_argument("--seeds", type=int, nargs="+", help="seeds (default: the preset's)")
    ap.add_argument("--encodings", nargs="+", choices=list(ENCODINGS),
                    help="a subset of the seven encodings (default: all)")
    for name in ("steps", "seq_len", "batch_size", "vocab_size", "eval_every"):
        ap.add_argument("--" + name.replace("_", "-"), type=int, help="override the preset")
    ap.add_argument("--lr", type=float, help="override the preset")
    ap.add_argument("--data", help="a text file, directory or .jsonl (default: bundled corpus)")
    ap.add_argument("--attn", help="attention backend of the trainer (default auto)")
    ap.add_argument("--device", help="auto, cuda or cpu")
    ap.add_argument("--max-minutes", type=float, default=0.0,
                    help="start a seed only while it fits in this many minutes (0: no limit); "
                    "the table holds the seeds finished")
    ap.add_argument("--estimate", action="store_true",
                    help="print the preset's FLOPs and estimated H100 time, train nothing")
    return ap


def config_from_args(args) -> Table2Config:
    cfg = PRESETS[args.preset]
    kw = {k: getattr(args, k) for k in ("steps", "seq_len", "batch_size", "vocab_size",
                                        "eval_every", "lr", "data", "attn", "device")
          if getattr(args, k) is not None}
    if args.seeds:
        kw["seeds"] = tuple(args.seeds)
    if args.encodings:
        kw["encodings"] = tuple(e for e in ENCODINGS if e in args.encodings)
    cfg = replace(cfg, **kw)
    if cfg.encodings and BASELINE not in cfg.encodings:
        print(f"[table2] note: {BASELINE} is not among the encodings, no paired differences",
              file=sys.stderr)
    return cfg


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    if args.estimate:
        m = common.model_config(dict(cfg.shape, vocab_size=cfg.vocab_size), ENCODINGS["0.75-rope"])
        est = estimate_gpu_time(cfg, m)
        print(json.dumps({"params": m.num_params(), **est}, indent=1))
        return 0
    out = Path(args.out or f"results/table2_{args.preset}")
    runs = Path(args.runs or f"runs/table2_{args.preset}")
    run(cfg, out, runs, args.preset, max_minutes=args.max_minutes)
    print((out / "table.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
