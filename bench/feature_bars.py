"""The speed bars of the attention features (sliding window, logit softcap), from a run's rows.

Each feature preset (bench.cases.FEATURE_PRESETS) is the gemma-2b shape with one feature on; its
bar is a ratio to the plain gemma-2b time of the same provider in the same run:

* window (4095, 0) at seqlen 8192: at most 0.6x the full-causal time (the kernels skip the
  blocks outside the window, so the work is ~44% of causal attention's);
* softcap 50: at most 1.10x the time without it.

``python -m bench`` writes them to ``feature_bars.json`` and appends a section to ``report.md``.
"""

from __future__ import annotations

import json
from pathlib import Path

BASE_CASE = "gemma-2b"
# (case, what, max ratio to BASE_CASE)
FEATURE_BARS = [
    ("gemma-2b-window", "sliding window 4096 at seqlen 8192 vs full causal", 0.60),
    ("gemma-2b-softcap", "softcap 50 vs no softcap", 1.10),
]
MODES = ("fwd", "fwd_bwd")


def bars(rows):
    """[{provider, case, mode, bar, value, target, ratio, limit, passed}] for every provider with
    ok rows in both the feature case and the base case."""
    idx = {(r["case"], r["provider"], r["mode"]): r for r in rows if r.get("status") == "ok"}
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    out = []
    for case, what, limit in FEATURE_BARS:
        for prov in providers:
            for mode in MODES:
                feat, base = idx.get((case, prov, mode)), idx.get((BASE_CASE, prov, mode))
                if feat is None or base is None:
                    continue
                ratio = feat["ms_median"] / base["ms_median"]
                out.append(dict(provider=prov, case=case, mode=mode, bar=what,
                                value=feat["ms_median"], target=base["ms_median"],
                                ratio=ratio, limit=limit, passed=bool(ratio <= limit)))
    return out


def markdown(bs) -> str:
    lines = ["", "## Feature bars (sliding window, softcap; ratio to the gemma-2b time of the "
             "same provider, this run)", ""]
    if not bs:
        return "\n".join(lines + ["No feature preset ran next to gemma-2b in this run.", ""])
    lines += ["| provider | bar | mode | ms | gemma-2b ms | ratio | limit | |",
              "|---|---|---|---|---|---|---|---|"]
    for b in bs:
        mode = "fwd+bwd" if b["mode"] == "fwd_bwd" else b["mode"]
        lines.append(f"| {b['provider']} | {b['bar']} | {mode} | {b['value']:.4g} | "
                     f"{b['target']:.4g} | {b['ratio']:.3f} | {b['limit']:.2f} | "
                     f"{'pass' if b['passed'] else 'FAIL'} |")
    return "\n".join(lines + [""])


def write(out_dir, rows, md_path=None):
    """feature_bars.json in ``out_dir``; the markdown section appended to ``md_path``."""
    bs = bars(rows)
    Path(out_dir, "feature_bars.json").write_text(json.dumps(bs, indent=1))
    if md_path is not None and any(r["case"] in {c for c, _, _ in FEATURE_BARS} for r in rows):
        with open(md_path, "a") as f:
            f.write(markdown(bs))
    return bs
