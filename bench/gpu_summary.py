"""The summary of `.ci/gpu_check.sh quick` (markdown): steps, test counts (junit XML, or the -v
lines of a step killed before pytest wrote it), headline ratios and bars of the benchmark's
results.json. Standard library only, the provider list aside. Exit 1 when a step or a test
failed or our kernels were found wrong.

    python -m bench.gpu_summary --out summary.md --log quick.log --junit tests=tests.xml \\
        --bench bench.json --step tests=0:212:235 ...
    python -m bench.gpu_summary --quick-providers     # the providers quick benchmarks
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

PRESET = "gemma-2b"
MODES = ("fwd", "fwd_bwd")


def quick_providers() -> list:
    """Every backend of ours the benchmark knows (the pure-PyTorch reference aside: a definition,
    not a kernel) and the peers. The default kernels and the peers first; the opt-in kernel sets
    (Triton's Hopper kernels, the CUDA SM80 kernels on an sm_90 GPU) and auto last, so a spent
    budget, or a crash (which takes the process's CUDA context with it), costs only their rows."""
    from prope_kernels.bench.providers import PROVIDERS, QUICK_PEER_PROVIDERS
    late = ["prope-auto", "prope-triton-hopper", "prope-cuda-sm80", "prope-cuda-sm90-split",
            "prope-cuda-sm90-basic", "prope-cuda-sm90-rotpairs"]
    # prope-triton runs the portable kernels by default, prope-cuda the SM90 ones on sm_90: the
    # forced variants would time the same kernels twice
    ours = [n for n, p in PROVIDERS.items() if p.kind == "ours" and p.backend != "reference"
            and n not in late and n not in ("prope-triton-portable", "prope-cuda-sm90")]
    peers = [n for n in QUICK_PEER_PROVIDERS if n in PROVIDERS]
    return ours + peers + [n for n in late if n in PROVIDERS]


# --- tests ---------------------------------------------------------------------------------------

def _counts(status: dict) -> dict:
    """{passed, failed, errors, skipped, failed_names} from {test name: pytest -v status}."""
    c = dict(passed=0, failed=0, errors=0, skipped=0, failed_names=[])
    for name, st in status.items():
        if st in ("PASSED", "XFAIL", "XPASS"):
            c["passed"] += 1
        elif st == "SKIPPED":
            c["skipped"] += 1
        else:
            c["failed" if st == "FAILED" else "errors"] += 1
            c["failed_names"].append(name + (" (error)" if st == "ERROR" else ""))
    return c


def junit_counts(path: Path) -> dict:
    """The counts of a pytest junit XML file."""
    tags = {"failure": "FAILED", "error": "ERROR", "skipped": "SKIPPED"}
    return _counts({case.get("classname", "").replace(".", "/") + ".py::" + case.get("name", ""):
                    next((st for t, st in tags.items() if case.find(t) is not None), "PASSED")
                    for case in ET.parse(path).getroot().iter("testcase")})


# pytest -v result lines: "tests/x.py::t[a b] PASSED [ 1%]"; with xdist "[gw0] [ 1%] PASSED
# tests/x.py::t[a b]"; the -rfE recap "FAILED tests/x.py::t[a b] - AssertionError..."
_STATUS = "PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS"
_RESULT_A = re.compile(rf"^(?P<name>\S+\.py::.+?) (?P<st>{_STATUS})(?:\s|$)")
_RESULT_B = re.compile(rf"(?:^|\] )(?P<st>{_STATUS}) (?P<name>\S+\.py::.+?)(?: - .*)?\s*$")


def log_counts(text: str) -> dict:
    """The same counts from the -v lines of one step's log (pytest killed before its junit)."""
    seen = {}
    for line in text.splitlines():
        m = _RESULT_A.match(line) or _RESULT_B.search(line)
        if m:
            seen[m.group("name")] = m.group("st")
    return _counts(seen)


def step_log(log: str, name: str) -> str:
    """The lines of quick.log between '=== step NAME: cap' and '=== step NAME: exit'."""
    m = re.search(rf"^=== step {re.escape(name)}: cap .*?$(.*?)(?:^=== step {re.escape(name)}: "
                  r"exit|\Z)", log, re.M | re.S)
    return m.group(1) if m else ""


# --- steps ---------------------------------------------------------------------------------------

def parse_step(s: str) -> tuple:
    """'NAME=RC:SECONDS:CAP' -> (name, rc or 'skipped', seconds, cap)."""
    name, _, rest = s.partition("=")
    rc, sec, cap = (rest.split(":") + ["", "", ""])[:3]
    return name, (int(rc) if rc.lstrip("-").isdigit() else rc), sec, cap


# timeout: the cap was reached (137: killed after the grace period)
VERDICTS = {0: "ok", 124: "**TIMED OUT** (killed at its cap)", 137: "**TIMED OUT** (killed at "
            "its cap)", "skipped": "**NOT RUN**"}


# --- benchmark -----------------------------------------------------------------------------------

def bench_tables(data: dict) -> tuple:
    """(lines of markdown, our rows found wrong) from a bench results.json."""
    rows = [r for r in data.get("results", []) if r.get("case") == PRESET]
    meta = data.get("meta", {})
    lines = [f"GPU: {meta.get('gpu')}, torch {meta.get('torch')}, Triton {meta.get('triton')}, "
             f"commit {meta.get('git_commit')}; bench {meta.get('elapsed_s')} s", ""]
    ok = {(r["provider"], r["mode"]): r for r in rows if r.get("status") == "ok"}
    provs = list(dict.fromkeys(r["provider"] for r in rows))
    ours = [p for p in provs if any(r["provider"] == p and r.get("kind") == "ours" for r in rows)]
    peers = [p for p in provs if p not in ours]
    labels = {r["provider"]: r.get("label", r["provider"]) for r in rows}

    lines += ["| provider | fwd ms (TF/s) | fwd+bwd ms (TF/s) | peak MiB (fwd+bwd) |",
              "|---|---|---|---|"]
    for p in ours + peers:
        cells = []
        for mode in MODES:
            r = ok.get((p, mode))
            why = [x for x in rows if x["provider"] == p and x["mode"] == mode]
            cells.append(f"{r['ms_median']:.3f} ({r['tflops']:.0f})" if r else
                         f"{why[0]['status']}: {why[0].get('reason', '')[:60]}" if why else "-")
        r = ok.get((p, "fwd_bwd"))
        peak = f"{r['peak_mib']:.0f}" if r and r.get("peak_mib") is not None else "-"
        name = f"**{labels[p]}**" if p in ours else labels[p]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {peak} |")

    lines += ["", "Headline ratios, our time / the peer's (below 1: ours is faster); peak "
              "memory ours / the peer's, fwd+bwd:", "",
              "| ours | peer | fwd | fwd+bwd | peak memory |", "|---|---|---|---|---|"]
    for o in ours:
        for p in peers:
            cells = [f"{a['ms_median'] / b['ms_median']:.2f}x" if a and b else "-"
                     for a, b in ((ok.get((o, m)), ok.get((p, m))) for m in MODES)]
            a, b = ok.get((o, "fwd_bwd")), ok.get((p, "fwd_bwd"))
            mem = (f"{a['peak_mib'] / b['peak_mib']:.2f}x" if a and b and a.get("peak_mib")
                   and b.get("peak_mib") else "-")
            lines.append(f"| {o} | {p} | {cells[0]} | {cells[1]} | {mem} |")

    bars = data.get("bars") or []
    if bars:
        lines += ["", "Speed and memory bars (the benchmark's, from this run's rows):", ""]
        for b in bars:
            verdict = {True: "pass", False: "FAIL"}.get(b.get("passed"),
                                                         b.get("verdict") or "n/a")
            lines.append(f"- {verdict} ({b.get('level')}) "
                         f"{b.get('provider')}: {b.get('bar')}: {b.get('value', 0):.3g} vs "
                         f"{b.get('target', 0):.3g} {b.get('unit', '')}")
    wrong = [r for r in data.get("results", []) if r.get("kind") == "ours"
             and r.get("status") == "wrong"]
    for r in wrong:
        lines.append(f"- **WRONG**: {r['provider']} {r['mode']} on {r['case']}: {r.get('reason')}")
    return lines, wrong


# --- the summary ---------------------------------------------------------------------------------

def summarize(steps, junits, log_text, bench_path, deadline=None, elapsed=None) -> tuple:
    """(markdown, ok)."""
    ok = True
    md = ["# GPU check (quick)", ""]
    if elapsed is not None:
        md += [f"Elapsed {elapsed} s of a {deadline} s deadline.", ""]
    md += ["| step | result | seconds | cap s |", "|---|---|---|---|"]
    for s in steps:
        name, rc, sec, cap = parse_step(s)
        md.append(f"| {name} | {VERDICTS.get(rc, f'**FAILED** (exit {rc})')} | {sec} | {cap} |")
        ok &= rc == 0

    md += ["", "## Tests", ""]
    for name, path in junits:
        path, c = Path(path), None
        if path.is_file():
            try:
                c, src = junit_counts(path), path.name
            except ET.ParseError:  # cut short while pytest was writing it
                c = None
        if c is None:
            text = step_log(log_text, name)
            if not text:
                md.append(f"- {name}: not run")
                continue
            c, src = log_counts(text), "the log's -v lines: no junit file, pytest was cut short"
            if not any(c[k] for k in ("passed", "failed", "errors", "skipped")):
                md.append(f"- {name}: **no results** (no junit file, no result lines in the log)")
                ok = False
                continue
        md.append(f"- {name}: **{c['passed']} passed, {c['failed']} failed, {c['errors']} "
                  f"errors**, {c['skipped']} skipped (from {src})")
        for n in c["failed_names"][:40]:
            md.append(f"  - FAILED {n}")
        if len(c["failed_names"]) > 40:
            md.append(f"  - ... and {len(c['failed_names']) - 40} more")
        ok &= not c["failed"] and not c["errors"]

    md += ["", f"## Benchmark ({PRESET})", ""]
    bench_path = Path(bench_path) if bench_path else None
    if bench_path and bench_path.is_file():
        lines, wrong = bench_tables(json.loads(bench_path.read_text()))
        md += lines
        ok &= not wrong
    else:
        md.append("no results (the bench step did not finish)")
    md += ["", f"**{'PASS' if ok else 'FAIL'}**", ""]
    return "\n".join(md), ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_summary", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick-providers", action="store_true",
                    help="print the providers quick benchmarks (comma-separated) and exit")
    ap.add_argument("--out", help="markdown file to write (also printed)")
    ap.add_argument("--log", help="quick.log (the -v lines of a step killed before its junit)")
    ap.add_argument("--junit", action="append", default=[], metavar="STEP=FILE")
    ap.add_argument("--bench", help="the benchmark's results.json")
    ap.add_argument("--step", action="append", default=[], metavar="NAME=RC:SECONDS:CAP")
    ap.add_argument("--deadline", type=int)
    ap.add_argument("--elapsed", type=int)
    args = ap.parse_args(argv)
    if args.quick_providers:
        print(",".join(quick_providers()))
        return 0
    junits = [j.partition("=")[::2] for j in args.junit]
    log_text = Path(args.log).read_text(errors="replace") if args.log and Path(args.log).is_file() \
        else ""
    md, ok = summarize(args.step, junits, log_text, args.bench, args.deadline, args.elapsed)
    if args.out:
        Path(args.out).write_text(md)
    else:
        print(md)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
