"""How a trained model uses each RoPE frequency (the paper's Figures 3, 5, 6).

    prope-experiment frequencies runs/prope-train            # a run folder of our trainer
    prope-experiment frequencies /models/gemma-2b --texts my.jsonl   # a local HF checkpoint

For each layer and each frequency pair ``k`` (fastest first), the mean 2-norm of the query's and
the key's 2-dim chunk ``(x_a, x_b)`` of that pair, before rotation (after qk-norm where the model
has one), averaged over heads, tokens and input texts; the same chunks of the values as the
control (values are never rotated). Per head, the attention pattern is scored: the mean weight on
the diagonal (query i on key i) and on the previous token (i on i-1), over positions i >= 1; a
head with either score >= ``--threshold`` is marked positional, and the pairs its query and key
use most are listed.

Writes to ``--out``: heatmaps.png (layer x pair, q / k / v), heads.png (per head: q and k norm per
pair, positional heads marked), frequencies.npz and frequencies.json (every array), summary.md.

Pairs: with ``layout="half"`` pair k is dims (k, k + d/2), with "interleaved" (2k, 2k+1), frequency
``theta^(-2k/d)``; for p-RoPE / reversed / NoPE models every pair is kept on this axis and the ones
the model does not rotate are marked. For ``variant="partial"`` the rotated block's pairs come
first (their own frequencies), then the untouched dims in pairs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..rotary import PRoPESpec
from . import common


# --- which dims form each frequency pair ----------------------------------------------------------

@dataclass
class Chunks:
    """The frequency pairs of one layer's heads, fastest first."""

    a: np.ndarray        # (P,) first dim of each pair
    b: np.ndarray        # (P,) second dim
    freq: np.ndarray     # (P,) frequency (radians per position); nominal where not rotated
    rotated: np.ndarray  # (P,) bool: the model rotates this pair


def chunks(spec: PRoPESpec) -> Chunks:
    d, h = spec.head_dim, spec.head_dim // 2
    half = spec.layout == "half"
    if spec.variant == "partial":
        ra, rb, rf = spec.pairs()
        rest = spec.identity_dims()
        m = len(rest) // 2
        ia = rest[:m] if half else rest[0::2]
        ib = rest[m:] if half else rest[1::2]
        a, b = list(ra) + list(ia), list(rb) + list(ib)
        freq = list(rf) + [0.0] * m
        rot = [True] * len(ra) + [False] * m
    else:
        ks = np.arange(h)
        a = ks if half else 2 * ks
        b = ks + h if half else 2 * ks + 1
        freq = spec.theta ** (-2.0 * ks / d)
        ra = set(spec.pairs()[0])
        rot = [int(x) in ra for x in a]
    return Chunks(np.asarray(a), np.asarray(b), np.asarray(freq, dtype=np.float64),
                  np.asarray(rot, dtype=bool))


def chunk_norms(x: torch.Tensor, c: Chunks) -> torch.Tensor:
    """x (..., head_dim) -> (..., P) 2-norms of each pair's chunk."""
    a = torch.as_tensor(c.a, device=x.device)
    b = torch.as_tensor(c.b, device=x.device)
    xf = x.float()
    return torch.sqrt(xf[..., a] ** 2 + xf[..., b] ** 2)


def positional_scores(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """probs (heads, t, t) attention weights of one text -> (diag, prev) per head: the mean weight
    of query i on key i and on key i-1, over i >= 1 (position 0 can only attend to itself)."""
    t = probs.shape[-1]
    if t < 2:
        z = probs.new_zeros(probs.shape[0])
        return z, z
    i = torch.arange(1, t, device=probs.device)
    return probs[:, i, i].mean(-1), probs[:, i, i - 1].mean(-1)


# --- models: hooks on the projections -------------------------------------------------------------

class _Capture:
    """Forward hooks that keep each layer's q, k, v (batch, t, heads, head_dim) before rotation."""

    def __init__(self, layers, head_dims):
        self.store, self.handles, self.seqlen = {}, [], 0
        for i, layer in enumerate(layers):
            attn = layer.self_attn
            for name, mods in (("q", ("q_norm", "q_proj")), ("k", ("k_norm", "k_proj")),
                               ("v", ("v_proj",))):
                mod = next((getattr(attn, m) for m in mods
                            if isinstance(getattr(attn, m, None), torch.nn.Module)), None)
                if mod is not None:
                    self.handles.append(mod.register_forward_hook(self._hook(i, name,
                                                                             head_dims[i])))

    def _hook(self, i, name, hd):
        def fn(_mod, _inp, out):
            # a projection gives (b, t, heads*hd); a per-head norm (b, t, heads, hd), or
            # (b, heads, t, hd) where the model transposes first (transformers' Gemma 3)
            t = self.seqlen
            if out.dim() == 4 and out.shape[1] != t and out.shape[2] == t:
                out = out.transpose(1, 2)
            self.store[(i, name)] = out.detach().reshape(out.shape[0], t, -1, hd)
        return fn

    def close(self):
        for h in self.handles:
            h.remove()


class OurModel:
    """A run folder of prope_kernels' trainer (config.json + checkpoint/)."""

    def __init__(self, path, device):
        self.model, self.cfg, self.train = common.load_run(path, device, attn="reference")
        self.layers = list(self.model.layers)
        self.specs = [common.layer_rotation(self.cfg, i) for i in range(self.cfg.layers)]
        self.attn = [common.layer_attention(self.cfg, i) for i in range(self.cfg.layers)]
        self.heads = self.cfg.heads
        self.kv_heads = self.attn[0]["kv_heads"]
        self.name = str(path)

    @classmethod
    def from_model(cls, model, name="model"):
        """An in-memory Gemma of this package (tests build one with known weights)."""
        self = cls.__new__(cls)
        self.model, self.cfg, self.train = model.eval(), model.cfg, None
        self.layers = list(model.layers)
        self.specs = [common.layer_rotation(self.cfg, i) for i in range(self.cfg.layers)]
        self.attn = [common.layer_attention(self.cfg, i) for i in range(self.cfg.layers)]
        self.heads = self.cfg.heads
        self.kv_heads = self.attn[0]["kv_heads"]
        self.name = name
        return self

    def token_ids(self, texts, length):
        from ..data import tokenize
        if self.train is None:
            raise ValueError("an in-memory model has no tokenizer: pass token ids")
        tok, _, _ = common.run_data(self.train)
        return [x[:length] for x in tokenize(texts, tok)]

    def default_texts(self):
        return common.run_data(self.train)[2]  # the run's held-out documents

    def forward(self, ids: torch.Tensor):
        self.model(ids)
        return None  # attention recomputed from the captured q, k (see _probs)


class HFModel:
    """A local checkpoint transformers loads offline (Gemma, Llama and relatives)."""

    def __init__(self, path, device):
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as e:
            raise ValueError(f"{path} is not a run folder of prope-train, and transformers is "
                             "not installed to load it") from e
        try:
            self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = AutoModelForCausalLM.from_pretrained(
                path, local_files_only=True, attn_implementation="eager",
                torch_dtype=torch.float32).to(device).eval()
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: neither a run folder of prope-train (config.json + "
                             f"checkpoint/) nor a checkpoint transformers can load offline: {e}"
                             ) from None
        c = self.model.config
        c = getattr(c, "text_config", c)
        self.layers = list(_decoder_layers(self.model))
        self.heads = c.num_attention_heads
        self.kv_heads = getattr(c, "num_key_value_heads", None) or self.heads
        hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        p = float(getattr(c, "partial_rotary_factor", 1.0) or 1.0)
        self.specs = [PRoPESpec(hd, p, _hf_theta(c, i), "partial" if p < 1 else "prope", "half")
                      for i in range(len(self.layers))]
        self.attn = [dict(head_dim=hd) for _ in self.layers]
        self.name = str(path)

    def token_ids(self, texts, length):
        return [self.tok(t, add_special_tokens=True)["input_ids"][:length] for t in texts]

    def default_texts(self):
        from ..data import builtin_corpus, split_docs
        return split_docs(builtin_corpus(), 0.05, 0)[1]

    def forward(self, ids):
        out = self.model(ids, output_attentions=True)
        return out.attentions  # per layer (batch, heads, t, t)


def _decoder_layers(model):
    for path in ("model.layers", "model.language_model.layers", "language_model.model.layers"):
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
            return obj
        except AttributeError:
            continue
    raise ValueError("cannot find the decoder layers of this transformers model")


def _hf_theta(c, i):
    types = getattr(c, "layer_types", None)
    local = bool(types) and types[i] == "sliding_attention"
    rp = getattr(c, "rope_parameters", None)
    if isinstance(rp, dict):
        sub = rp.get("sliding_attention" if local else "full_attention", rp)
        if isinstance(sub, dict) and "rope_theta" in sub:
            return float(sub["rope_theta"])
    if local and getattr(c, "rope_local_base_freq", None):
        return float(c.rope_local_base_freq)
    return float(getattr(c, "rope_theta", 10000.0))


def load_model(path, device="cpu"):
    if common.is_run_folder(path):
        return OurModel(path, device)
    return HFModel(path, device)


def _probs(q, k, spec: PRoPESpec, att: dict):
    """Attention weights (heads, t, t) of one text from q (1, t, h, d), k (1, t, kv, d): the
    layer's rotation, scale, softcap, sliding window and the causal mask."""
    from ..reference import apply_prope

    t = q.shape[1]
    pos = torch.arange(t, device=q.device)
    qr = apply_prope(q.float(), pos, spec)[0].transpose(0, 1)  # (h, t, d)
    kr = apply_prope(k.float(), pos, spec)[0].transpose(0, 1)
    kr = kr.repeat_interleave(qr.shape[0] // kr.shape[0], 0)
    s = qr @ kr.transpose(1, 2) * att.get("scale", spec.head_dim ** -0.5)
    if att.get("softcap"):
        s = att["softcap"] * torch.tanh(s / att["softcap"])
    i = torch.arange(t, device=q.device)
    mask = i[None, :] <= i[:, None]
    if att.get("window"):
        mask &= i[None, :] > i[:, None] - att["window"]
    return s.masked_fill(~mask, float("-inf")).softmax(-1)


# --- the analysis ---------------------------------------------------------------------------------

@torch.no_grad()
def analyze(m, token_ids: list, device="cpu") -> dict:
    """Arrays of the analysis over ``token_ids`` (a list of token-id lists, one per text)."""
    nl = len(m.layers)
    cks = [chunks(s) for s in m.specs]
    npair = max(len(c.a) for c in cks)
    cap = _Capture(m.layers, [s.head_dim for s in m.specs])
    sums = {}
    diag = np.zeros((nl, m.heads))
    prev = np.zeros((nl, m.heads))
    ntok, ntext = 0, 0
    try:
        for ids in token_ids:
            if len(ids) in (m.heads, m.kv_heads):
                ids = ids[:-1]  # (b, heads, t, hd) and (b, t, heads, hd) would look alike
            if len(ids) < 2:
                continue
            cap.store.clear()
            cap.seqlen = len(ids)
            x = torch.tensor([ids], dtype=torch.long, device=device)
            atts = m.forward(x)
            ntok += len(ids)
            ntext += 1
            for i in range(nl):
                for name in ("q", "k", "v"):
                    t = cap.store.get((i, name))
                    if t is None:
                        continue
                    n = chunk_norms(t[0], cks[i]).sum(0).double().cpu().numpy()  # (heads, P)
                    key = (i, name)
                    sums[key] = sums.get(key, 0) + n
                if atts is not None:
                    pr = atts[i][0].float()
                elif (i, "q") in cap.store and (i, "k") in cap.store:
                    pr = _probs(cap.store[(i, "q")], cap.store[(i, "k")], m.specs[i], m.attn[i])
                else:
                    continue
                dg, pv = positional_scores(pr)
                diag[i] += dg.double().cpu().numpy()
                prev[i] += pv.double().cpu().numpy()
    finally:
        cap.close()
    if ntext == 0:
        raise ValueError("no input text of at least 2 tokens")

    def per_head(name):
        heads = max((sums[(i, name)].shape[0] for i in range(nl) if (i, name) in sums),
                    default=0)
        out = np.full((nl, heads, npair), np.nan)
        for i in range(nl):
            if (i, name) in sums:
                s = sums[(i, name)] / ntok
                out[i, :s.shape[0], :s.shape[1]] = s
        return out

    res = {n + "_head": per_head(n) for n in ("q", "k", "v")}
    for n in ("q", "k", "v"):
        res[n] = np.nanmean(res[n + "_head"], axis=1) if res[n + "_head"].shape[1] else \
            np.full((nl, npair), np.nan)
    res["diag"] = diag / ntext
    res["prev"] = prev / ntext
    res["freq"] = np.stack([np.pad(c.freq, (0, npair - len(c.freq)), constant_values=np.nan)
                            for c in cks])
    res["rotated"] = np.stack([np.pad(c.rotated, (0, npair - len(c.rotated))) for c in cks])
    res["texts"], res["tokens"] = ntext, ntok
    return res


def positional_heads(res: dict, threshold: float = 0.5, top: int = 3) -> list:
    """Heads whose diagonal or previous-token score is >= threshold, with the pairs where the
    product of their query's and key's mean chunk norms is largest."""
    found = []
    q, k = res["q_head"], res["k_head"]
    nl, nh = res["diag"].shape
    for i in range(nl):
        for h in range(nh):
            kinds = [n for n, s in (("diagonal", res["diag"][i, h]),
                                    ("previous-token", res["prev"][i, h])) if s >= threshold]
            if not kinds:
                continue
            kvh = h // (nh // k.shape[1]) if k.shape[1] else 0
            use = q[i, h] * k[i, kvh]
            pairs = [int(j) for j in np.argsort(-np.nan_to_num(use, nan=-1))[:top]]
            found.append({"layer": i, "head": h, "kind": "+".join(kinds),
                          "diag": float(res["diag"][i, h]), "prev": float(res["prev"][i, h]),
                          "top_pairs": pairs,
                          "top_freqs": [float(res["freq"][i, j]) for j in pairs],
                          "top_pairs_rotated": [bool(res["rotated"][i, j]) for j in pairs]})
    return found


# --- outputs --------------------------------------------------------------------------------------

def _xlabels(ax, res):
    npair = res["q"].shape[1]
    f = res["freq"][0]
    step = max(1, npair // 8)
    ticks = list(range(0, npair, step))
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{j}\n{f[j]:.1e}" if np.isfinite(f[j]) else str(j) for j in ticks],
                       fontsize=7)
    ax.set_xlabel("frequency pair k (fastest → slowest); below: radians per position")


def plot_heatmaps(path: Path, res: dict, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nl = res["q"].shape[0]
    fig, axes = plt.subplots(1, 3, figsize=(16, 1.8 + 0.35 * max(nl, 4)), squeeze=False)
    for ax, name, label in zip(axes[0], ("q", "k", "v"), ("queries", "keys",
                                                          "values (control)")):
        im = ax.imshow(res[name], aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_title(f"{label}: mean 2-norm of each pair's chunk")
        ax.set_ylabel("layer")
        ax.set_yticks(range(nl))
        _xlabels(ax, res)
        rot = res["rotated"]
        for i in range(nl):  # where rotation stops or starts on this layer
            edges = np.nonzero(np.diff(rot[i].astype(int)))[0]
            for e in edges:
                ax.plot([e + 0.5, e + 0.5], [i - 0.5, i + 0.5], color="white", lw=1.5)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(f"{title} ({res['texts']} texts, {res['tokens']} tokens); white bars: "
                 "boundary between rotated and unrotated pairs")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_heads(path: Path, res: dict, pos: list, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    q, k = res["q_head"], res["k_head"]
    nl, nh, npair = q.shape
    group = nh // k.shape[1] if k.shape[1] else 1
    kk = np.repeat(k, group, axis=1) if k.shape[1] else np.full_like(q, np.nan)
    use = (q * kk).reshape(nl * nh, npair)
    use = use / np.nanmax(use, axis=1, keepdims=True).clip(min=1e-30)
    fig, ax = plt.subplots(figsize=(10, 1.5 + 0.28 * nl * nh))
    ax.imshow(use, aspect="auto", cmap="magma", interpolation="nearest")
    marks = {(p["layer"], p["head"]): p["kind"] for p in pos}
    ax.set_yticks(range(nl * nh))
    ax.set_yticklabels([f"L{i} H{h}" + (f"  [{marks[(i, h)]}]" if (i, h) in marks else "")
                        + f"  d={res['diag'][i, h]:.2f} p={res['prev'][i, h]:.2f}"
                        for i in range(nl) for h in range(nh)], fontsize=7)
    for t in ax.get_yticklabels():
        if "[" in t.get_text():
            t.set_color("red")
    _xlabels(ax, res)
    ax.set_title(f"{title}: per head, |q chunk| x |k chunk| per pair (row-normalized)\nred: "
                 "positional heads (d = diagonal, p = previous-token score)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(out: Path, res: dict, pos: list, title: str, meta: dict):
    out.mkdir(parents=True, exist_ok=True)
    arrays = {k: v for k, v in res.items() if isinstance(v, np.ndarray)}
    np.savez(out / "frequencies.npz", **arrays)

    def clean(a):
        return [[None if isinstance(x, float) and math.isnan(x) else x for x in row]
                for row in np.asarray(a, dtype=object).reshape(a.shape[0], -1).tolist()]

    doc = {"meta": meta, "texts": res["texts"], "tokens": res["tokens"],
           "positional_heads": pos,
           "arrays": {k: {"shape": list(v.shape), "values": np.where(
               np.isnan(v.astype(float)), None, v).tolist() if v.dtype != bool else v.tolist()}
               for k, v in arrays.items()}}
    (out / "frequencies.json").write_text(json.dumps(doc))
    plot_heatmaps(out / "heatmaps.png", res, title)
    plot_heads(out / "heads.png", res, pos, title)
    lines = [f"# Frequency usage: {title}", "",
             f"{res['texts']} texts, {res['tokens']} tokens. Per layer, the pairs with the largest "
             "mean query / key chunk norm (k = 0 is the fastest frequency; * = a q/k pair this "
             "model does not rotate; values are never rotated):", "",
             "| layer | top q pairs | top k pairs | top v pairs (control) |", "|---|---|---|---|"]
    for i in range(res["q"].shape[0]):
        cells = []
        for n in ("q", "k", "v"):
            row = np.nan_to_num(res[n][i], nan=-1)
            top = np.argsort(-row)[:4]
            cells.append(", ".join(f"{j}{'' if res['rotated'][i, j] or n == 'v' else '*'} "
                                   f"({row[j]:.2f})" for j in top))
        lines.append(f"| {i} | " + " | ".join(cells) + " |")
    lines += ["", f"Positional heads (diagonal or previous-token score >= "
              f"{meta['threshold']}): {len(pos)}", ""]
    if pos:
        lines += ["| layer | head | kind | diag | prev | pairs it uses most (q x k norm) |",
                  "|---|---|---|---|---|---|"]
        for p in pos:
            pairs = ", ".join(f"{j}{'' if r else '*'} (freq {f:.2e})" for j, f, r in
                              zip(p["top_pairs"], p["top_freqs"], p["top_pairs_rotated"]))
            lines.append(f"| {p['layer']} | {p['head']} | {p['kind']} | {p['diag']:.2f} | "
                         f"{p['prev']:.2f} | {pairs} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def run(path, out, texts=None, num_texts=32, length=None, threshold=0.5, device="cpu") -> dict:
    device = common.default_device(device)
    m = load_model(path, device)
    if texts:
        from ..data import load_documents
        docs = load_documents(texts)
    else:
        docs = m.default_texts()
    if length is None:
        length = m.train["seq_len"] if getattr(m, "train", None) else 512
    ids = [x for x in m.token_ids(docs, length) if len(x) >= 2][:num_texts]
    res = analyze(m, ids, device)
    pos = positional_heads(res, threshold)
    meta = {"model": m.name, "texts": texts or "default", "length": length,
            "threshold": threshold, "specs": [vars(s) for s in m.specs]}
    write_outputs(Path(out), res, pos, Path(str(path)).name, meta)
    return {"res": res, "positional_heads": pos}


def build_parser():
    ap = argparse.ArgumentParser(prog="prope-experiment frequencies", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a prope-train run folder (config.json + checkpoint/) or "
                    "a local transformers checkpoint (Gemma, Llama)")
    ap.add_argument("--out", default=None, help="output folder (default CHECKPOINT/frequencies, "
                    "or ./frequencies_NAME for a transformers checkpoint)")
    ap.add_argument("--texts", help="input texts: a text file, directory or .jsonl (default: the "
                    "run's held-out documents; the bundled corpus's for transformers models)")
    ap.add_argument("--num-texts", type=int, default=32)
    ap.add_argument("--length", type=int, help="tokens per text (default: the run's training "
                    "length; 512 for transformers models)")
    ap.add_argument("--threshold", type=float, default=0.5,
                    help="diagonal / previous-token score that marks a head positional")
    ap.add_argument("--device", default="auto")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not Path(args.checkpoint).exists():
        print(f"prope-experiment frequencies: error: {args.checkpoint!r} does not exist",
              file=sys.stderr)
        return 2
    out = args.out or (str(Path(args.checkpoint) / "frequencies")
                       if common.is_run_folder(args.checkpoint)
                       else f"frequencies_{Path(args.checkpoint).name}")
    try:
        r = run(args.checkpoint, out, args.texts, args.num_texts, args.length, args.threshold,
                args.device)
    except ValueError as e:
        print(f"prope-experiment frequencies: error: {e}", file=sys.stderr)
        return 2
    print((Path(out) / "summary.md").read_text())
    print(f"wrote {out}/: heatmaps.png, heads.png, frequencies.npz, frequencies.json, summary.md"
          f" ({len(r['positional_heads'])} positional heads)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
