"""The report writer: one folder per run with results.json, results.csv, report.md (environment,
speed bars, a table per preset and per sweep, what did not run) and PNG plots."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from .bars import NOISE, NOT_JUDGED, SETS, bars, index, judged, ordered
from .cases import MODE_LABELS, PRESETS, SMOKE_PRESETS, banner
from .providers import FLOOR, PROVIDERS

META_CSV = ("run_kind", "gpu", "driver", "torch", "torch_cuda", "cudnn", "triton", "date_utc",
            "git_commit")


def write_all(out_dir: Path, meta: dict, settings: dict, rows: list, plots: bool = True):
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"png": []}
    if plots:
        try:
            from .plots import write_plots
            files["png"] = write_plots(out_dir, meta, rows)
            meta.pop("plots", None)  # a re-render with matplotlib clears an earlier "skipped"
        except ImportError as e:
            if (e.name or "").split(".")[0] != "matplotlib":
                raise
            meta["plots"] = "skipped: matplotlib is not installed (pip install matplotlib)"
    rows = [{k: (None if isinstance(x, float) and not math.isfinite(x) else x)
             for k, x in r.items()} for r in rows]  # strict JSON: no NaN
    files["json"] = out_dir / "results.json"
    files["json"].write_text(json.dumps(
        {"schema": 1, "meta": meta, "settings": settings,
         "bars": bars(rows, meta.get("run_kind")), "results": rows}, indent=1,
        default=lambda x: None if isinstance(x, float) and not math.isfinite(x) else str(x)))
    files["csv"] = out_dir / "results.csv"
    with open(files["csv"], "w", newline="") as f:
        if rows:  # the rows, each with the meta columns
            w = csv.DictWriter(f, fieldnames=list(rows[0]) + [k for k in META_CSV
                                                              if k not in rows[0]])
            w.writeheader()
            w.writerows({**r, **{k: meta.get(k) for k in META_CSV}} for r in rows)
    files["md"] = out_dir / "report.md"
    files["md"].write_text(markdown(meta, settings, rows, files["png"]))
    return files

def _cell(r):
    """A table cell: "median ms (TFLOP/s)", or the status of a row that was not timed."""
    if r is None or r["status"] != "ok":
        return "" if r is None else r["status"]
    ms, tf = r["ms_median"], r["tflops"]
    ms_s = "" if ms is None else f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"
    tf_s = f"{tf:.0f}" if tf is not None and tf >= 10 else (f"{tf:.2g}" if tf else "-")
    return f"{ms_s} ({tf_s})"


def _env_table(meta, settings):
    def v(x, none="-"):
        return none if x in (None, "") else str(x)
    lines = ["| | |", "|---|---|"]
    if meta.get("gpu"):
        cap = str(meta.get("capability") or "").replace(".", "")
        lines.append(f"| GPU | {meta['gpu']} ({meta['sm_count']} SMs, sm_{cap}, "
                     f"{meta['gpu_memory_gib']} GiB), driver {v(meta.get('driver'))} |")
    else:
        lines.append(f"| device | CPU ({v(meta.get('cpu'))}, {v(meta.get('cpu_count'))} cores): "
                     "no GPU |")
    dirty = " (uncommitted changes)" if meta.get("git_dirty") else ""
    lines += [
        f"| torch | {meta['torch']} (CUDA {v(meta.get('torch_cuda'))}, cuDNN "
        f"{v(meta.get('cudnn'))}) |",
        f"| Triton | {v(meta.get('triton'))}"
        + (" (TRITON_INTERPRET=1: interpreter)" if meta.get("triton_interpret") else "") + " |",
        f"| flash-attn | {v(meta.get('flash_attn'), 'not installed')} |",
        f"| prope_kernels | {v(meta.get('prope_kernels'))}, commit "
        f"{v(meta.get('git_commit'))[:12]}{dirty} |",
        f"| date (UTC) | {meta['date_utc']} |",
        f"| command | `{meta.get('command', '')}` |",
    ]
    for r in meta.get("resumed_from", []):
        lines.append(f"| resumes | the run of {r['date_utc']} (commit "
                     f"{v(r.get('git_commit'))[:12]}, `{r.get('command')}`): its skipped pairs "
                     "were run by this process on the same GPU model |")
    if meta["run_kind"] == "cpu-smoke":
        lines.append(f"| timing | wall clock, {settings.get('cpu_reps')} run(s): meaningless |")
    else:
        lines.append(f"| timing | triton.testing.do_bench, median of all runs in "
                     f"{settings.get('rep_ms')} ms after {settings.get('warmup_ms')} ms warm-up; "
                     "spread = 20th-80th percentile |")
    return "\n".join(lines)


# sweep -> (section title, the row label of a case)
SWEEP_SECTIONS = {
    "seqlen": ("seqlen sweep", lambda r: f"{r['batch']}x{r['seqlen']}"),
    "head_dim": ("head_dim sweep", lambda r: f"d={r['head_dim']}, {r['q_heads']} heads"),
    "causal": ("causal vs non-causal", lambda r: "causal" if r["causal"] else "non-causal"),
    "heads": ("MHA / GQA / MQA", lambda r: f"{r['attn_kind']} {r['q_heads']}/{r['kv_heads']}"),
    "varlen": ("varlen (packed documents of uneven length)",
               lambda r: f"{r['num_docs']} docs, {r['total_tokens']} tok")}


def markdown(meta, settings, rows, pngs=()):
    idx = index(rows)
    title = meta.get("gpu") or "CPU"
    out = [f"# prope_kernels benchmark: {title}, {meta['date_utc'][:10]}", ""]
    b = banner(meta)
    if b:
        out += [f"> **{b}**", ""]
    out += [_env_table(meta, settings), ""]
    out += ["Cells: median ms (TFLOP/s by the standard count: forward 4·b·h·s²·d, halved when "
            "causal; bwd 2.5x, fwd+bwd 3.5x). `missing` / `failed` / `wrong` / `skipped`: see "
            "the list at the end. Peak MiB: extra GPU memory allocated during one fwd+bwd call. "
            "vs floor: fwd+bwd time / cuDNN SDPA without RoPE (below 1 is faster).", ""]

    bs = bars(rows, meta.get("run_kind"))
    if bs:
        out += ["## Speed bars (from this run's rows)", ""]
        if not judged(meta.get("run_kind")):
            out += [f"**Not judged here: every bar reads \"{NOT_JUDGED}\".** The bars are "
                    "about GPU kernels; this run timed tiny shapes on a CPU (the reference "
                    "backend, PyTorch's CPU kernels and the Triton interpreter, by the wall "
                    "clock), which says nothing about them. They are computed here only to show "
                    "that the pipeline works; a run on a GPU judges them.", ""]
        sets = list(dict.fromkeys(b["set"] for b in bs))
        out += ["Sets: " + "; ".join(f"`{s}`: {SETS[s]}" for s in sets) + ".", "",
                "| set | case | backend | level | bar | measured | target | ratio | |",
                "|---|---|---|---|---|---|---|---|---|"]
        for b in bs:
            ratio = "" if b["ratio"] is None else f"{b['ratio']:.2f}"
            out.append(f"| {b['set']} | {b['case']} | {b['provider']} | {b['level']} | "
                       f"{b['bar']} | {b['value']:.4g} {b['unit']} | {b['target']:.4g} "
                       f"{b['unit']} | {ratio} | {b['verdict']} |")
        out += ["", f"(\"no higher\" allows {NOISE:.0%} timing noise between medians)", ""]

    groups = ordered(r["group"] for r in rows)
    if "preset" in groups:
        out += ["## Presets (published model shapes)", ""]
        for case in ordered(r["case"] for r in rows if r["group"] == "preset"):
            out += _case_table(case, rows, idx) + [""]
    if "p" in groups:
        out += ["## The cost of the identity: time vs p", "",
                "Same shape, only the fraction of rotated pairs changes. The claim to check: "
                "p < 1 costs nothing (time at p=0.25 <= time at p=1).", ""]
        out += _sweep_table("p", rows, idx, key=lambda r: f"p={r['p']:g}") + [""]
    for g, (title, key) in SWEEP_SECTIONS.items():
        if g in groups:
            first = next(r for r in rows if r["group"] == g)
            out += [f"## {title}", "", f"Shape: {_shape_note(first, g)}", ""]
            out += _sweep_table(g, rows, idx, key=key) + [""]
    if pngs:
        out += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in pngs] + [""]
    elif meta.get("plots"):
        out += [f"Plots {meta['plots']}", ""]
    out += _triton_configs(rows)
    out += _not_run(rows)
    return "\n".join(out) + "\n"


def _triton_configs(rows):
    """The Triton configs the autotuner picked, per case (prope-triton's fwd+bwd notes)."""
    picked = {r["case"]: n[len("configs "):] for r in rows if r["provider"] == "prope-triton"
              and r["status"] == "ok" and r["mode"] == "fwd_bwd"
              for n in (r["notes"] or "").split("; ") if n.startswith("configs ")}
    if not picked:
        return []
    return (["## Triton configs the autotuner picked (BLOCK_M x BLOCK_N, warps, stages)", "",
             "| case | configs |", "|---|---|"]
            + [f"| {case} | {cfg} |" for case, cfg in picked.items()] + [""])


def _shape_note(r, group):
    """The shape a sweep holds fixed: every part but the swept one."""
    parts = [("seqlen", f"batch {r['batch']}, seqlen {r['seqlen']}" if not r["varlen"]
              else f"longest {r['seqlen']}"),
             ("heads head_dim", f"{r['q_heads']} q / {r['kv_heads']} kv heads"),
             ("head_dim", f"head_dim {r['head_dim']}"),
             ("causal", "causal" if r["causal"] else "non-causal"), ("p", f"p={r['p']:g}")]
    return ", ".join([text for swept, text in parts if group not in swept.split()]
                     + ([f"{r['total_tokens']} tokens per call"] if group == "seqlen" else [])
                     + [r["dtype"]])


def _case_table(case, rows, idx):
    rs = [r for r in rows if r["case"] == case]
    modes = ordered(r["mode"] for r in rs)
    provs = ordered(r["provider"] for r in rs)
    c = PRESETS.get(case) or SMOKE_PRESETS.get(case)
    desc = c.describe() if c else ""
    head = ["provider"] + [f"{MODE_LABELS[m]} ms (TF)" for m in modes]
    has_fb = "fwd_bwd" in modes
    if has_fb:
        head += ["fwd+bwd vs floor", "peak MiB", "spread"]
    lines = [f"### {case}: {desc}", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    floor = idx.get((case, FLOOR, "fwd_bwd"))
    for p in provs:
        cells = [PROVIDERS[p].label if p in PROVIDERS else p]
        cells += [_cell(idx.get((case, p, m))) for m in modes]
        if has_fb:
            r = idx.get((case, p, "fwd_bwd"))
            ok = r is not None and r["status"] == "ok"
            ratio = (f"{r['ms_median'] / floor['ms_median']:.2f}x"
                     if ok and floor and floor["status"] == "ok" else "")
            mem = f"{r['peak_mib']:.0f}" if ok and r["peak_mib"] is not None else ""
            spread = (f"±{50 * (r['ms_p80'] - r['ms_p20']) / r['ms_median']:.1f}%"
                      if ok and r["ms_median"] else "")
            cells += [ratio, mem, spread]
        if all(idx.get((case, p, m), {}).get("status") == "missing" for m in modes):
            continue  # listed under "Not run"
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _sweep_table(group, rows, idx, key):
    rs = [r for r in rows if r["group"] == group]
    cases = ordered(r["case"] for r in rs)
    modes = ordered(r["mode"] for r in rs)
    provs = [p for p in ordered(r["provider"] for r in rs)
             if any(r["provider"] == p and r["status"] != "missing" for r in rs)]
    first = {r["case"]: r for r in rs}
    lines = []  # one table per mode: a row per case, a column per provider
    for m in modes:
        head = [f"{MODE_LABELS[m]}: ms (TF)"] + [PROVIDERS[p].label for p in provs]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for c in cases:
            lines.append("| " + " | ".join([key(first[c])] + [_cell(idx.get((c, p, m)))
                                                                for p in provs]) + " |")
        if group == "p":  # the claim in one line: time at p=0.25 over time at p=1
            lo = next((c for c in cases if first[c]["p"] == 0.25), None)
            hi = next((c for c in cases if first[c]["p"] == 1.0), None)
            if lo and hi:
                cells = []
                for p in provs:
                    a, b = idx.get((lo, p, m)), idx.get((hi, p, m))
                    ok = a and b and a["status"] == b["status"] == "ok"
                    cells.append(f"{a['ms_median'] / b['ms_median']:.3f}x" if ok else "")
                lines.append("| **time p=0.25 / p=1** | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _not_run(rows):
    seen = {}  # (provider, status, reason) -> its cases, in order
    for r in rows:
        if r["status"] != "ok":
            seen.setdefault((r["provider"], r["status"], r["reason"]), {})[r["case"]] = None
    if not seen:
        return []
    out = ["## Not run, failed or wrong", "", "| provider | status | cases | reason |",
           "|---|---|---|---|"]
    for (p, st, reason), cases in seen.items():
        cases = list(cases)
        cs = ", ".join(cases[:4]) + (f" (+{len(cases) - 4})" if len(cases) > 4 else "")
        out.append(f"| {p} | {st} | {cs} | {reason.replace('|', '/')} |")
    return out + [""]
