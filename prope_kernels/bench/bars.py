"""The speed bars, from the rows of one run only (never another run's figures).

Sets: ``fused-op`` (each of our backends at gemma-2b against FlashAttention-2 + compiled RoPE,
cuDNN SDPA without RoPE, 500 TFLOP/s forward, p=0.25 vs p=1); ``sdpa-auto`` (``prope-sdpa`` and
``prope-auto`` at every preset against cuDNN and our fastest backend); ``features`` (window and
softcap presets against gemma-2b, same backend). A CPU smoke run computes them but does not judge
them (``passed`` None, verdict "n/a (CPU timings)").
"""

from __future__ import annotations

from .cases import MODE_LABELS
from .providers import FLOOR, OUR_BACKENDS

BAR_CASE = "gemma-2b"
FUSED, SDPA_AUTO, FEATURES = "fused-op", "sdpa-auto", "features"  # the sets
SETS = {  # set -> what it holds, as the report says it
    FUSED: f"the fused op at the {BAR_CASE} shape, each of our backends",
    SDPA_AUTO: "the sdpa backend and auto at every preset",
    FEATURES: f"sliding window and softcap against plain {BAR_CASE}, each of our backends",
}
NOT_JUDGED = "n/a (CPU timings)"
NOISE = 0.01  # "no higher" comparisons of medians allow 1% of timing noise
CUDNN_ROPE = "sdpa-cudnn+rope-compiled"
FLASH_ROPE = "sdpa-flash+rope-compiled"


def index(rows):  # (case, provider, mode) -> row
    return {(r["case"], r["provider"], r["mode"]): r for r in rows}


def ordered(seq):  # unique items in first-seen order
    return list(dict.fromkeys(seq))


def judged(run_kind) -> bool:  # a CPU smoke run's timings cannot judge the bars
    return run_kind != "cpu-smoke"


def bars(rows, run_kind=None):
    """One dict per bar whose rows ran: set, case, provider, level, bar, value, target, unit,
    ratio, passed, verdict (on a CPU smoke run: passed None, verdict NOT_JUDGED)."""
    idx = index(rows)

    def get(case, prov, mode, key="ms_median"):
        r = idx.get((case, prov, mode))
        return r[key] if r and r["status"] == "ok" else None

    checks = []  # (set, case, provider, level, what, value, target, unit, op)
    ours = ordered(r["provider"] for r in rows if r["kind"] == "ours")
    for p in ours:
        fb = get(BAR_CASE, p, "fwd_bwd")
        checks += [
            (FUSED, BAR_CASE, p, "must", "fwd+bwd faster than FlashAttention-2 (SDPA flash) + RoPE "
             "compiled", fb, get(BAR_CASE, FLASH_ROPE, "fwd_bwd"), "ms", "lt"),
            (FUSED, BAR_CASE, p, "must", "peak memory (fwd+bwd) no higher than cuDNN SDPA without "
             "RoPE", get(BAR_CASE, p, "fwd_bwd", "peak_mib"),
             get(BAR_CASE, FLOOR, "fwd_bwd", "peak_mib"), "MiB", "le"),
            (FUSED, BAR_CASE, p, "goal", "fwd+bwd at or below cuDNN SDPA without RoPE", fb,
             get(BAR_CASE, FLOOR, "fwd_bwd"), "ms", "le"),
            (FUSED, BAR_CASE, p, "goal", "forward above 500 TFLOP/s",
             get(BAR_CASE, p, "fwd", "tflops"), 500.0, "TFLOP/s", "gt"),
        ]
        for mode in ("fwd_bwd", "fwd"):
            checks.append((FUSED, "p-0.25", p, "must", f"{MODE_LABELS[mode]} time at p=0.25 no "
                           "higher than at p=1", get("p-0.25", p, mode), get("p-1", p, mode),
                           "ms", "le"))
    for case in ordered(r["case"] for r in rows if r["group"] == "preset"):
        fb = get(case, "prope-sdpa", "fwd_bwd")
        checks += [
            (SDPA_AUTO, case, "prope-sdpa", "must", "fwd+bwd within 1.05x of cuDNN SDPA + RoPE "
             "compiled", fb, _times(get(case, CUDNN_ROPE, "fwd_bwd"), 1.05), "ms", "le0"),
            (SDPA_AUTO, case, "prope-sdpa", "must", "fwd+bwd faster than FlashAttention-2 + RoPE "
             "compiled", fb, get(case, FLASH_ROPE, "fwd_bwd"), "ms", "lt"),
            (SDPA_AUTO, case, "prope-sdpa", "must", "peak memory no higher than cuDNN SDPA + RoPE "
             "compiled", get(case, "prope-sdpa", "fwd_bwd", "peak_mib"),
             get(case, CUDNN_ROPE, "fwd_bwd", "peak_mib"), "MiB", "le"),
            (SDPA_AUTO, case, "prope-sdpa", "goal", "fwd+bwd within 1.03x of cuDNN SDPA without "
             "RoPE", fb, _times(get(case, FLOOR, "fwd_bwd"), 1.03), "ms", "le0"),
        ]
        best = [t for t in (get(case, b, "fwd_bwd") for b in OUR_BACKENDS) if t is not None]
        checks.append((SDPA_AUTO, case, "prope-auto", "must", "auto's fwd+bwd within 1.02x of the "
                       "fastest of our backends", get(case, "prope-auto", "fwd_bwd"),
                       _times(min(best), 1.02) if best else None, "ms", "le0"))
    # the attention features at the gemma-2b shape, against gemma-2b of the same backend in
    # this run (window (4095, 0): the kernels skip the blocks outside it)
    for p in ours:
        for mode in ("fwd_bwd", "fwd"):
            base = get(BAR_CASE, p, mode)
            checks += [
                (FEATURES, "gemma-2b-window", p, "must", f"{MODE_LABELS[mode]} with sliding window "
                 "4096 at most 0.6x full causal (gemma-2b)", get("gemma-2b-window", p, mode),
                 _times(base, 0.6), "ms", "le0"),
                (FEATURES, "gemma-2b-softcap", p, "must", f"{MODE_LABELS[mode]} with softcap 50 at "
                 "most 1.10x without (gemma-2b)", get("gemma-2b-softcap", p, mode),
                 _times(base, 1.10), "ms", "le0"),
            ]
    out = []
    for group, case, p, level, what, val, ref, unit, op in checks:
        if val is None or ref is None:
            continue
        ok = bool({"lt": val < ref, "gt": val > ref, "le": val <= ref * (1 + NOISE),
                   "le0": val <= ref}[op]) if judged(run_kind) else None
        out.append({"set": group, "case": case, "provider": p, "level": level, "bar": what,
                    "value": val, "target": ref, "unit": unit,
                    "ratio": val / ref if ref else None, "passed": ok,
                    "verdict": NOT_JUDGED if ok is None else ("PASS" if ok else "FAIL")})
    return out


def _times(x, f):
    return None if x is None else x * f
