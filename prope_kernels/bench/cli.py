"""``prope-bench`` (also ``python -m prope_kernels.bench``, and ``python -m bench`` from the
repository root): the standard report, or chosen presets/sweeps/providers/modes."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

from prope_kernels import env as prope_env
from prope_kernels.dispatch import TABLE as DISPATCH_TABLE

from . import cases as C
from . import providers as P
from .env import REPO, results_root

STANDARD_BUDGET_MIN = 7.0

EPILOG = f"""\
presets:   {', '.join(C.PRESET_ORDER)}
sweeps:    {', '.join(C.SWEEPS)}
providers: {', '.join(P.PROVIDERS)}
modes:     fwd, bwd, fwd+bwd (or fwd_bwd)

The standard report (no --preset/--sweep) on a GPU runs the presets gemma-2b, its sliding-window
and softcap variants, llama-gqa and mha-d64, the time-vs-p sweep at the gemma-2b shape, the seqlen
sweep, then the presets gemma-7b, gemma4-global and gemma-2b-varlen; it stops starting new work
after --budget-min minutes (default {STANDARD_BUDGET_MIN:g}) and reports the rest as skipped.
Without a GPU the same pipeline runs at tiny shapes and is labelled a CPU smoke run (set
TRITON_INTERPRET=1 to include the Triton kernels, interpreted); --smoke on a GPU gives tiny shapes
labelled a GPU smoke run.

Output: --out DIR, by default <date>_<gpu>/ under prope-bench-results/ in the current folder
(from the root of a prope_kernels checkout: under bench/results/, where committed runs live;
smoke runs there go to the git-ignored tmp_* folders). `python -m bench` from the repository
root is the same command as prope-bench.

examples:
  prope-bench                                       # standard report
  prope-bench --preset gemma-2b --modes fwd,fwd+bwd
  prope-bench --sweep seqlen --providers 'prope-*,sdpa-cudnn*' --seqlens 1024,4096,16384
  prope-bench --sweep p --preset gemma-2b           # presets and sweeps can be combined
  TRITON_INTERPRET=1 prope-bench --smoke --out /tmp/bench-smoke
  prope-bench --write-dispatch                      # GPU, in a checkout: every preset, our
                                                    # backends -> the backend="auto" table
                                                    # (commit it)
"""

# (flags, keywords) of each option, by group
OPTIONS = {
    "what to run": [
        ("--preset", dict(action="append", default=[], metavar="NAME[,NAME]",
                          help="named shape(s) (see --list), or 'all'")),
        ("--sweep", dict(action="append", default=[], metavar="NAME[,NAME]",
                         help="seqlen, head_dim, causal, heads, p, varlen, or 'all'")),
        ("--providers", dict(metavar="PATTERNS", help="comma-separated provider names or shell "
                             "patterns, e.g. 'prope-*,sdpa-cudnn*' (default: a set per section, "
                             "see README)")),
        ("--modes", dict(metavar="MODES", help="comma-separated fwd, bwd, fwd+bwd (default: all "
                         "three for presets, fwd and fwd+bwd for sweeps)")),
        ("--dtype", dict(choices=["bf16", "fp16"], default="bf16")),
        ("--seqlens", dict(metavar="N,N", help="seqlen sweep points (default 512..32768)")),
        ("--head-dims", dict(metavar="D,D", help="head_dim sweep points (default 64,128,256)")),
        ("--p-values", dict(metavar="P,P", help="p sweep points (default 0,0.25,0.75,1)")),
        ("--smoke", dict(action="store_true", help="tiny shapes (automatic without a GPU); "
                         "results are labelled smoke"))],
    "measurement": [
        ("--warmup-ms", dict(type=int, default=25, help="do_bench warm-up (ms)")),
        ("--rep-ms", dict(type=int, default=200, help="do_bench timed window (ms)")),
        ("--budget-min", dict(type=float, default=None, help="stop starting new runs after this "
                              f"many minutes (default {STANDARD_BUDGET_MIN:g} for the standard "
                              "report, none otherwise; 0: no limit)")),
        ("--no-check", dict(action="store_true", help="skip the spot check against the "
                            "reference before timing")),
        ("--no-memory", dict(action="store_true", help="skip the peak-memory call"))],
    "output": [
        ("--out", dict(metavar="DIR", help="output folder (default: prope-bench-results/<date>_"
                       "<gpu>/ here; from the root of a checkout bench/results/<date>_<gpu>/; "
                       "smoke runs: tmp_<date>_... there)")),
        ("--no-plots", dict(action="store_true")),
        ("--write-dispatch", dict(nargs="?", const=str(DISPATCH_TABLE), metavar="PATH",
                                  help="write the backend='auto' dispatch table (per case, the "
                                  "fastest of our backends in fwd+bwd) from this run alone into "
                                  "PATH, replacing it (default: the package's table prope_kernels"
                                  "/dispatch.json; a GPU run of a clean checkout only). Alone it "
                                  "runs every preset with our backends, fwd+bwd")),
        ("--allow-dirty", dict(action="store_true", help="let --write-dispatch write the "
                               "package's table from a run of uncommitted code (the table then "
                               "says so)")),
        ("--no-progress", dict(action="store_true", help="no tqdm progress bar")),
        ("-v --verbose", dict(action="store_true", help="log missing providers too")),
        ("--list", dict(action="store_true", help="list presets, sweeps, providers; exit")),
        ("--resume", dict(metavar="RESULTS_JSON", help="finish a run whose time budget ran out: "
                          "rerun only the pairs it marked skipped, on the same kind of GPU, and "
                          "write the merged report")),
        ("--render", dict(metavar="RESULTS_JSON", help="only rewrite report.md, CSV and plots "
                          "from a results.json (e.g. on a machine with matplotlib after a GPU "
                          "run without it); into --out or the JSON's folder")),
        ("--dry-run", dict(action="store_true", help="print the planned cases, providers and "
                           "modes; run nothing"))],
}


def parser():
    ap = argparse.ArgumentParser(
        prog="prope-bench", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Benchmark p-RoPE fused attention (prope_kernels) against SDPA (cuDNN, "
                    "flash, memory-efficient), FlexAttention and flash-attn with p-RoPE applied "
                    "eagerly or compiled: ms, TFLOP/s and peak memory for fwd, bwd and fwd+bwd.",
        epilog=EPILOG)
    for title, opts in OPTIONS.items():
        g = ap.add_argument_group(title)
        for flags, kw in opts:
            g.add_argument(*flags.split(), **kw)
    return ap


def _csv(s, cast=str):
    return [cast(x.strip()) for x in (s or "").split(",") if x.strip()]


def _names(values, known, what):
    names = []
    for n in (n for v in values for n in _csv(v)):
        if n != "all" and n not in known:
            raise SystemExit(f"unknown {what} {n!r}; choose from: {', '.join(known)}")
        names += [k for k in (known if n == "all" else [n]) if k not in names]
    return names


def _modes(s):
    out = [{"fwd+bwd": "fwd_bwd", "fwdbwd": "fwd_bwd"}.get(m, m) for m in _csv(s)]
    bad = [m for m in out if m not in C.MODES]
    if bad:
        raise SystemExit(f"unknown mode {bad[0]!r}; choose from fwd, bwd, fwd+bwd")
    return tuple(dict.fromkeys(out)) or None


def plan(args, smoke: bool):
    """The jobs of this run, in order (the most important first: the budget cuts the tail)."""
    from .runner import Job
    dtype = {v: k for k, v in C.SHORT_DTYPE.items()}[args.dtype]
    modes = _modes(args.modes)
    try:
        user_provs = P.select(args.providers) if args.providers else None
    except ValueError as e:
        raise SystemExit(str(e)) from None
    p_values = tuple(_csv(args.p_values, float)) or C.P_VALUES
    presets = _names(args.preset, list(C.SMOKE_PRESETS) + C.PRESET_ORDER, "preset")
    big = [n for n in presets if n not in C.SMOKE_PRESETS]
    if smoke and big:
        raise SystemExit(f"preset(s) {', '.join(big)} are GPU shapes; a smoke run (no GPU, or "
                         f"--smoke) takes only the tiny presets: {', '.join(C.SMOKE_PRESETS)}")
    sweeps = _names(args.sweep, C.SWEEPS, "sweep")
    import torch  # the rows of a default list: those whose backend has the case's features here
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def preset_case(name):
        c = C.SMOKE_PRESETS.get(name) or C.PRESETS[name]
        return c if c.dtype == dtype else C.replace(c, dtype=dtype)

    def job(group, case):  # the default provider list of the table, by capability
        if smoke:
            letter = ("s" if group == "preset" else "v" if case.varlen else
                      "q" if group == "p" else "w")
        else:
            letter = "V" if case.varlen else {"preset": "P", "p": "p"}.get(group, "S")
        mode = modes or (C.MODES if group == "preset" else
                         ("fwd",) if smoke and group == "p" else ("fwd", "fwd_bwd"))
        return Job(case, user_provs or P.default(letter, case, device), mode)

    def jobs_of(names=(), sweep=None):
        if sweep is not None:
            return [job(sweep, c) for c in C.build_sweep(sweep, dtype, tuple(_csv(
                args.seqlens, int)) or None, tuple(_csv(args.head_dims, int)) or None,
                p_values, smoke=smoke)]
        return [job("preset", preset_case(n)) for n in names]

    if not presets and not sweeps:
        if getattr(args, "write_dispatch", None):
            # the dispatch run: every preset but window/softcap (the table's key has no
            # features), our backends (and auto, to see it), fwd+bwd
            names = [n for n in (list(C.SMOKE_PRESETS) if smoke else C.PRESET_ORDER)
                     if not (preset_case(n).has_window or preset_case(n).softcap)]
            return [Job(preset_case(n), user_provs or P.OUR_BACKENDS + ["prope-auto"],
                        modes or ("fwd_bwd",)) for n in names]
        if smoke:
            return (jobs_of(C.SMOKE_PRESETS) + jobs_of(sweep="seqlen") + jobs_of(sweep="p")
                    + jobs_of(sweep="varlen"))
        # the feature presets right after gemma-2b: their bars are ratios to its times
        return (jobs_of(["gemma-2b"] + C.FEATURE_PRESETS + ["llama-gqa", "mha-d64"])
                + jobs_of(sweep="p") + jobs_of(sweep="seqlen")
                + jobs_of(["gemma-7b", "gemma4-global", "gemma-2b-varlen"]))
    jobs = jobs_of(presets)
    for s in sweeps:
        if s in ("p", "causal") and presets and not smoke:
            # sweep p / causality around the first named preset instead of the default shape
            base = preset_case(presets[0])
            jobs += [job(s, c) for c in (C.sweep_p(base, p_values) if s == "p"
                                         else C.sweep_causal(base))]
        else:
            jobs += jobs_of(sweep=s)
    return jobs


def resume_jobs(old):
    """Jobs for the (case, provider) pairs a previous run skipped, in its order."""
    from .runner import Job
    cases = {c["name"]: C.from_dict(c) for c in old["settings"]["cases"]}
    todo = {}
    for r in old["results"]:
        if r["status"] == "skipped":
            todo.setdefault(r["case"], {}).setdefault(r["provider"], []).append(r["mode"])
    return [Job(cases[c], list(provs), tuple(dict.fromkeys(m for ms in provs.values()
                                                           for m in ms)))
            for c, provs in todo.items()]


def merge_rows(old_rows, new_rows):
    key = lambda r: (r["case"], r["provider"], r["mode"])  # noqa: E731
    new = {key(r): r for r in new_rows}
    return [new.pop(key(r), r) for r in old_rows] + list(new.values())


def _default_out(meta):
    from .env import slug
    # smoke output: git-ignored (bench/results/tmp*), never committed
    base = results_root() / (("" if meta["run_kind"] == "gpu" else "tmp_") + slug(meta))
    out, i = base, 2
    while out.exists():
        out, i = base.with_name(f"{base.name}-{i}"), i + 1
    return out


def _package_table(path) -> bool:
    """Whether ``path`` is the package's own table; outside a source checkout that is refused
    (the table is committed together with its run, never written into an installed package)."""
    if Path(path).resolve() != DISPATCH_TABLE.resolve():
        return False
    if REPO is None:
        raise SystemExit("--write-dispatch: the package's table is written from a prope_kernels "
                         "checkout only (it is committed with the run it comes from); give a "
                         "PATH to write the table elsewhere")
    return True


NOT_GPU = ("--write-dispatch: the package's table takes only GPU runs (not smoke runs); give a "
           "PATH to write a smoke run's entries elsewhere")


def write_dispatch(args, meta, rows, run: str) -> int:
    """The backend="auto" table from one run's rows alone, into args.write_dispatch (replaced);
    the package's table takes only a GPU run of committed code (or --allow-dirty)."""
    from prope_kernels import dispatch

    from . import env
    if _package_table(args.write_dispatch):
        if meta.get("run_kind") != "gpu":
            raise SystemExit(NOT_GPU)
        if not env.clean(meta) and not args.allow_dirty:
            print(f"--write-dispatch: not written: {run} ran uncommitted code (commit "
                  f"{meta.get('git_commit')}, diff {meta.get('git_diff_sha256')}); commit it and "
                  "rerun, or pass --allow-dirty", file=sys.stderr)
            return 1
    table = dispatch.write(args.write_dispatch, dispatch.table_from_rows(rows, meta, run))
    print(f"dispatch: {len(table['entries'])} entries from {run} -> {args.write_dispatch}",
          file=sys.stderr)
    for e in table["entries"]:
        print(f"  {e['arch']} d{e['head_dim']} group {e['group']} "
              f"{'causal' if e['causal'] else 'non-causal'}{' varlen' if e['varlen'] else ''}"
              f" seqlen<={e['seqlen']}: {e['backend']} {e['source']['fwd_bwd_ms']}",
              file=sys.stderr)
    return 0


def _say(*lines):
    for line in lines:
        print(line, file=sys.stderr)


def main(argv=None):
    args = parser().parse_args(argv)
    if args.list:
        print(EPILOG.split("\n\n")[0])
        for n in C.PRESET_ORDER:
            print(f"  {n:16s} {C.PRESETS[n].describe()}")
        for n, pr in P.PROVIDERS.items():
            print(f"  {n:30s} {pr.label}")
        return 0
    if args.render:
        src = Path(args.render)
        data = json.loads(src.read_text())
        if args.write_dispatch:  # the table of a committed run, from its raw file alone
            return write_dispatch(args, data["meta"], data["results"], src.parent.name)
        from . import report
        files = report.write_all(Path(args.out) if args.out else src.parent, data["meta"],
                                 data["settings"], data["results"], plots=not args.no_plots)
        _say(*(f"  {p}" for p in [files["md"], files["json"], files["csv"], *files["png"]]))
        return 0

    import torch

    from . import env, report
    from .runner import Settings, run_jobs, total_pairs

    t0 = time.monotonic()
    gpu = torch.cuda.is_available()
    smoke = args.smoke or not gpu
    if not gpu:
        if not args.smoke:
            _say("no CUDA GPU: running the CPU smoke mode (tiny shapes; not GPU figures)")
        # tiny ops: one thread avoids oversubscribing a shared CPU (figures are meaningless)
        torch.set_num_threads(1)
    if not gpu and not prope_env.interpreting():
        _say("hint: TRITON_INTERPRET=1 adds the Triton kernels (interpreter) to the smoke run")
    if gpu and prope_env.interpreting():
        _say("warning: TRITON_INTERPRET=1 on a GPU machine: the Triton provider is skipped; "
             "unset it to time the kernels")
    if gpu and os.environ.pop("PROPE_POISON", None) == "1":
        _say("note: PROPE_POISON unset for timing (NaN-filling outputs costs time)")
    old = json.loads(Path(args.resume).read_text()) if args.resume else None
    jobs = resume_jobs(old) if old else plan(args, smoke)
    if args.dry_run:
        for j in jobs:
            print(f"{j.case.name:22s} {'/'.join(j.modes):16s} {j.case.describe()}")
            print(f"{'':22s} {', '.join(j.providers)}")
        print(f"{len(jobs)} cases, {total_pairs(jobs)} provider runs")
        return 0
    if args.write_dispatch and _package_table(args.write_dispatch) and env.run_kind(smoke) != "gpu":
        raise SystemExit(NOT_GPU)
    standard = not args.preset and not args.sweep
    budget = args.budget_min
    if budget is None:
        budget = STANDARD_BUDGET_MIN if ((standard or old) and not smoke) else 0
    st = Settings(warmup_ms=args.warmup_ms, rep_ms=args.rep_ms, check=not args.no_check,
                  memory=not args.no_memory, budget_s=budget * 60 if budget > 0 else None,
                  progress=not args.no_progress, verbose=args.verbose)
    meta = env.collect(smoke)
    if old is not None:
        om = old["meta"]
        if (om.get("gpu"), om.get("run_kind")) != (meta["gpu"], meta["run_kind"]):
            raise SystemExit(f"--resume: {args.resume} was run on {om.get('gpu') or 'CPU'} "
                             f"({om.get('run_kind')}), this is {meta['gpu'] or 'CPU'} "
                             f"({meta['run_kind']}): figures would not be comparable")
        meta["resumed_from"] = om.get("resumed_from", []) + [
            {k: om.get(k) for k in ("date_utc", "git_commit", "elapsed_s", "command")}]
    out = Path(args.out) if args.out else _default_out(meta)
    _say(f"{meta['run_kind']}: {len(jobs)} cases, {total_pairs(jobs)} provider runs -> {out}")

    rows = run_jobs(jobs, st)

    meta["elapsed_s"] = round(time.monotonic() - t0, 1)
    if old is not None:
        rows = merge_rows(old["results"], rows)
        settings = dict(old["settings"], resumed=True)
    else:
        settings = dict(warmup_ms=st.warmup_ms, rep_ms=st.rep_ms, cpu_warmup=st.cpu_warmup,
                        cpu_reps=st.cpu_reps, check=st.check, memory=st.memory,
                        budget_s=st.budget_s, smoke=smoke, standard=standard,
                        dtype=args.dtype, cases=[j.case.as_dict() for j in jobs],
                        providers=sorted({p for j in jobs for p in j.providers}))
    files = report.write_all(out, meta, settings, rows, plots=not args.no_plots)
    meta["elapsed_s"] = round(time.monotonic() - t0, 1)
    counts = Counter(r["status"] for r in rows)
    _say(f"done in {meta['elapsed_s']:.0f} s: "
         + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())),
         *(f"  {files[k]}" for k in ("md", "json", "csv")), *(f"  {p}" for p in files["png"]))
    if args.write_dispatch and write_dispatch(args, meta, rows, out.name):
        return 1
    bad = [r for r in rows if r["kind"] == "ours" and r["status"] == "wrong"]
    _say(*(f"WRONG: {r['provider']} on {r['case']}: {r['reason']}" for r in bad))
    return 1 if bad else 0
