"""The benchmark suite (prope_kernels.bench) works end to end on a CPU: `python -m bench --smoke`
from the repository root (the same command as `prope-bench`).

Runs the smoke mode in a subprocess with the GPU hidden (reference backend, Triton interpreter,
tiny shapes; ~15 s) and checks every output: JSON, CSV, markdown, PNG plots, the providers and
fields they record, and that the run is labelled a CPU smoke run, never GPU figures, whose speed
bars are computed but not judged. Also checks that the correctness guard rejects a wrong
provider.
"""

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent

ROW_FIELDS = {"case", "group", "provider", "label", "kind", "mode", "status", "reason", "batch",
              "seqlen", "q_heads", "kv_heads", "head_dim", "causal", "p", "dtype", "varlen",
              "flops", "ms_median", "ms_p20", "ms_p80", "n_runs", "tflops", "peak_mib",
              "check_err_out", "check_err_grad", "wall_s"}
META_FIELDS = {"run_kind", "gpu", "driver", "torch", "torch_cuda", "triton", "date_utc",
               "git_commit"}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "smoke"
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    env.pop("PROPE_POISON", None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in
                                                       [os.environ.get("PYTHONPATH")] if p])
    proc = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--no-progress",
                           "--out", str(out)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return out, proc


def _have_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


PNGS = ("tflops_vs_seqlen.png", "time_vs_p.png", "presets_tflops.png")


def test_outputs_exist(smoke_run):
    out, _ = smoke_run
    for name in ("results.json", "results.csv", "report.md"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    if not _have_matplotlib():
        # the suite still runs; it says why there are no plots
        assert "matplotlib is not installed" in (out / "report.md").read_text()
        pytest.skip("matplotlib is not installed: PNG plots not checked "
                    "(pip install matplotlib)")
    for name in PNGS:
        png = out / name
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_json_labels_cpu_smoke_and_records_versions(smoke_run):
    out, _ = smoke_run
    data = json.loads((out / "results.json").read_text())
    meta = data["meta"]
    assert META_FIELDS <= set(meta)
    assert meta["run_kind"] == "cpu-smoke"
    assert meta["gpu"] is None and meta["torch"] == torch.__version__
    assert data["settings"]["smoke"] is True
    # what code ran: the diff against the commit ("" when clean), a hash of the sources as they
    # ran (checkable against the commit without .git), each backend's kernel version
    from prope_kernels.backends import kernel_hashes
    from prope_kernels.bench import env as benv
    assert meta["git_diff_sha256"] is None or len(meta["git_diff_sha256"]) in (0, 64)
    assert meta["source_sha256"] == benv.tree_sha256()
    assert meta["kernel_hashes"] == kernel_hashes()


def test_json_rows(smoke_run):
    from prope_kernels.reference import attention_flops
    out, _ = smoke_run
    rows = json.loads((out / "results.json").read_text())["results"]
    assert rows and all(ROW_FIELDS <= set(r) for r in rows)
    ok = [r for r in rows if r["status"] == "ok"]
    # our op under the interpreter and the reference, and an eager-RoPE peer, really ran
    for prov in ("prope-triton", "prope-sdpa", "prope-auto", "prope-reference",
                 "sdpa-math+rope-eager", "sdpa-math-norope"):
        assert any(r["provider"] == prov for r in ok), prov
    # the sdpa backend records its PyTorch kernel; auto records what it chose (CPU: reference)
    for r in ok:
        if r["provider"] == "prope-sdpa":
            assert "PyTorch kernel: cpu_flash" in r["notes"], r["notes"]
        if r["provider"] == "prope-auto":
            assert "auto -> reference (default)" in r["notes"], r["notes"]
    # ours: what the backend launched, read back after the timed calls; the switches set ({}:
    # the defaults); peers have neither
    ran = {"prope-triton": "triton portable", "prope-sdpa": "sdpa cpu_flash",
           "prope-reference": "reference", "prope-auto": "reference"}
    for r in ok:
        if r["kind"] != "ours":
            assert r["switches"] == "" and r["switches_set"] is None, r
            continue
        assert r["switches_set"] == {} and "PROPE_" not in r["notes"], r
        want = ran[r["provider"]]
        assert r["switches"] == {"fwd": f"fwd: {want}", "bwd": f"fwd: {want}; bwd: {want}",
                                 "fwd_bwd": f"fwd: {want}; bwd: {want}"}[r["mode"]], r
    assert {r["mode"] for r in ok} == {"fwd", "bwd", "fwd_bwd"}
    assert {r["group"] for r in ok} >= {"preset", "seqlen", "p", "varlen"}
    assert {r["p"] for r in ok if r["group"] == "p"} == {0.0, 0.25, 0.75, 1.0}
    for r in ok:
        assert r["ms_median"] > 0 and r["tflops"] > 0
        assert r["check_err_out"] is not None and r["check_err_out"] < 0.05
        if not r["varlen"]:
            assert r["flops"] == attention_flops(r["batch"], r["seqlen"], r["q_heads"],
                                                 r["head_dim"], r["causal"], r["mode"],
                                                 tuple(r.get("window", (-1, -1))))
    assert not [r for r in rows if r["status"] in ("wrong", "failed")]
    # each Triton row records the kernel configs it ran with (which table rows the tuner picks)
    want = {"fwd": ["fwd "], "bwd": ["dkdv ", "dq "], "fwd_bwd": ["fwd ", "dkdv ", "dq "]}
    for r in ok:
        if r["provider"] == "prope-triton":
            assert "configs " in r["notes"], r["notes"]
            assert all(k in r["notes"] for k in want[r["mode"]]), (r["mode"], r["notes"])
    # GPU-only peers are reported missing with a reason, never timed on the CPU
    missing = {r["provider"]: r["reason"] for r in rows if r["status"] == "missing"}
    for prov in ("prope-cuda", "sdpa-cudnn-norope", "sdpa-cudnn+rope-compiled",
                 "flex+rope-compiled"):
        assert missing.get(prov), prov


def test_csv_matches_json(smoke_run):
    out, _ = smoke_run
    rows = json.loads((out / "results.json").read_text())["results"]
    with open(out / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows)
    assert ROW_FIELDS | META_FIELDS <= set(table[0])
    assert {r["run_kind"] for r in table} == {"cpu-smoke"}
    assert {r["provider"] for r in table} == {r["provider"] for r in rows}


def test_markdown_report(smoke_run):
    out, _ = smoke_run
    md = (out / "report.md").read_text()
    assert "CPU SMOKE RUN" in md and "not GPU figures" in md
    # the command as typed (the interpreter's own name: python, python3 or python3.11)
    assert re.search(r"`python[0-9.]* -m bench --smoke --no-progress --out", md), md[:600]
    for text in ("prope_attention (triton)", "prope_attention (reference, PyTorch)",
                 "SDPA math + RoPE eager", "The cost of the identity", "seqlen sweep",
                 "varlen", "Not run", "sdpa-cudnn-norope", "Triton configs the autotuner picked",
                 "| smoke-mqa | fwd 32x16 w4 s1 q1, dkdv 16x32 w4 s1, dq 32x16 w4 s1 |"):
        assert text in md, text
    if _have_matplotlib():
        assert all(f"({name})" in md for name in PNGS)


def _bench_env():
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    env.pop("PROPE_POISON", None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in
                                                       [os.environ.get("PYTHONPATH")] if p])
    return env


def test_write_dispatch(tmp_path):
    # `--write-dispatch PATH` alone: every (smoke) preset with our backends, fwd+bwd, and per case
    # the fastest into PATH (CPU figures here: arch "cpu", never read on a GPU)
    table = tmp_path / "dispatch.json"
    proc = subprocess.run([sys.executable, "-m", "bench", "--write-dispatch", str(table),
                           "--no-progress", "--no-plots", "--out", str(tmp_path / "run")],
                          cwd=REPO, env=_bench_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    data = json.loads(table.read_text())
    rows = json.loads((tmp_path / "run" / "results.json").read_text())["results"]
    assert {r["provider"] for r in rows} == {"prope-triton", "prope-cuda", "prope-sdpa",
                                             "prope-auto"}
    assert {r["mode"] for r in rows} == {"fwd_bwd"}
    from prope_kernels.bench.cases import SMOKE_PRESETS
    # one entry per preset without window/softcap (the table's key has no features)
    plain = [c for c in SMOKE_PRESETS.values() if not (c.has_window or c.softcap)]
    assert len(data["entries"]) == len(plain) < len(SMOKE_PRESETS)
    # the whole table from this run alone, naming it; each entry with its kernels' versions
    meta = json.loads((tmp_path / "run" / "results.json").read_text())["meta"]
    assert data["run"]["name"] == "run" and data["run"]["date_utc"] == meta["date_utc"]
    for e in data["entries"]:
        assert e["kernels"] == {b: meta["kernel_hashes"][b] for b in e["source"]["fwd_bwd_ms"]}
        ran = {r["backend"]: r["ms_median"] for r in rows
               if r["case"] == e["source"]["case"] and r["status"] == "ok"
               and r["backend"] in ("triton", "sdpa", "cuda")}
        assert set(e["source"]["fwd_bwd_ms"]) == set(ran) == {"triton", "sdpa"}
        assert e["backend"] == min(ran, key=ran.get) and e["arch"] == "cpu"
        assert e["source"]["run_kind"] == "cpu-smoke"
    # the package's own table takes only GPU runs
    proc = subprocess.run([sys.executable, "-m", "bench", "--write-dispatch", "--no-progress",
                           "--out", str(tmp_path / "refused")], cwd=REPO, env=_bench_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "only GPU runs" in proc.stderr


def test_write_dispatch_from_a_committed_run(tmp_path):
    # `--render RUN --write-dispatch`: the table of a committed run from its raw file alone; the
    # package's table is exactly what its run gives, and a dirty run needs --allow-dirty there
    table = json.loads((REPO / "prope_kernels" / "dispatch.json").read_text())
    raw = REPO / "bench" / "results" / table["run"]["name"] / "bench.json"
    out = tmp_path / "dispatch.json"
    proc = subprocess.run([sys.executable, "-m", "bench", "--render", str(raw),
                           "--write-dispatch", str(out)], cwd=REPO, env=_bench_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(out.read_text()) == table
    if not table["run"]["git_dirty"]:
        return
    proc = subprocess.run([sys.executable, "-m", "bench", "--render", str(raw),
                           "--write-dispatch"], cwd=REPO, env=_bench_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "uncommitted code" in proc.stderr, proc.stderr[-2000:]


def test_spot_check_rejects_a_wrong_provider():
    """The guard: a provider that rotates the wrong fraction of pairs is caught before timing."""
    from prope_kernels import prope_attention
    from prope_kernels.bench.cases import Case
    from prope_kernels.bench.check import spot_check
    from prope_kernels.bench.runner import make_ctx, make_inputs

    case = Case("t", "preset", 2, 64, 4, 2, 32, causal=True, p=0.75, dtype="float32")
    ctx = make_ctx(case, "cpu")

    def right(q, k, v):
        return prope_attention(q, k, v, p=0.75, backend="reference")

    def wrong_p(q, k, v):
        return prope_attention(q, k, v, p=0.25, backend="reference")

    def no_mask(q, k, v):
        return prope_attention(q, k, v, p=0.75, causal=False, backend="reference")

    assert spot_check(right, case, ctx, *make_inputs(case, "cpu", 0), 0.75, True)["ok"]
    for bad in (wrong_p, no_mask):
        res = spot_check(bad, case, ctx, *make_inputs(case, "cpu", 0), 0.75, True)
        assert not res["ok"], (bad.__name__, res)


def test_breakdown_smoke(tmp_path):
    # `python -m bench.breakdown` (GPU time per kernel of one call) runs end to end on the CPU:
    # there it profiles CPU ops of an interpreter-sized case and says it is not a measurement.
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in
                                                       [os.environ.get("PYTHONPATH")] if p])
    out = tmp_path / "breakdown.json"
    proc = subprocess.run([sys.executable, "-m", "bench.breakdown", "--smoke", "--iters", "1",
                           "--json", str(out)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "CPU (not a measurement)" in proc.stdout
    res = json.loads(out.read_text())
    assert res["gpu"] is False and set(res["modes"]) == {"fwd", "fwd+bwd"}
    ops = {row["kernel"] for row in res["modes"]["fwd+bwd"]}
    assert "prope_kernels::attn_bwd" in ops, sorted(ops)[:20]


def test_bars_of_the_sdpa_backend_and_auto():
    # the bars from synthetic rows of one run: the sdpa backend vs the peers, auto vs our best
    from prope_kernels.bench.bars import bars
    from prope_kernels.bench.report import markdown

    def row(case, prov, ms, mib=100.0, kind="ours"):
        return dict(case=case, group="preset", provider=prov, mode="fwd_bwd", status="ok",
                    kind=kind, ms_median=ms, peak_mib=mib, tflops=1.0)
    rows = [row("llama-gqa", "prope-sdpa", 4.5, 300), row("llama-gqa", "prope-triton", 9.0),
            row("llama-gqa", "prope-auto", 4.55),
            row("llama-gqa", "sdpa-cudnn+rope-compiled", 4.4, 996, "peer"),
            row("llama-gqa", "sdpa-flash+rope-compiled", 7.0, 996, "peer"),
            row("llama-gqa", "sdpa-cudnn-norope", 4.1, 400, "no-rope")]
    got = {(b["provider"], b["bar"][:20]): b["passed"] for b in bars(rows, "gpu")
           if b["set"] == "sdpa-auto"}
    assert got == {("prope-sdpa", "fwd+bwd within 1.05x"): True,
                   ("prope-sdpa", "fwd+bwd faster than "): True,
                   ("prope-sdpa", "peak memory no highe"): True,
                   ("prope-sdpa", "fwd+bwd within 1.03x"): False,   # 4.5 > 1.03 * 4.1
                   ("prope-auto", "auto's fwd+bwd withi"): True}    # 4.55 <= 1.02 * 4.5
    meta = dict(run_kind="gpu", gpu="G", sm_count=1, capability="9.0", gpu_memory_gib=80,
                torch="t", date_utc="2026-11-26T00:00:00Z")
    md = markdown(meta, {}, [dict(r, batch=1, seqlen=1, q_heads=1, kv_heads=1, head_dim=1,
                                  causal=True, p=0.75, dtype="bf16", varlen=False, reason="",
                                  notes="", ms_p20=1, ms_p80=1) for r in rows])
    assert "| sdpa-auto | llama-gqa | prope-auto | must |" in md
    assert "| fwd+bwd within 1.03x of cuDNN SDPA without RoPE | 4.5 ms | 4.223 ms | 1.07 | FAIL |" \
        in md
    assert "n/a (CPU timings)" not in md and "Issue " not in md
    # the same rows timed on a CPU: every bar computed, none judged, and the report says why
    cpu = bars(rows, "cpu-smoke")
    assert [b["bar"] for b in cpu] == [b["bar"] for b in bars(rows, "gpu")]
    assert {(b["passed"], b["verdict"]) for b in cpu} == {(None, "n/a (CPU timings)")}
    md = markdown(dict(meta, run_kind="cpu-smoke", gpu=None, cpu="x86_64", cpu_count=2),
                  {"cpu_reps": 1}, [dict(r, batch=1, seqlen=1, q_heads=1, kv_heads=1,
                                         head_dim=1, causal=True, p=0.75, dtype="bf16",
                                         varlen=False, reason="", notes="", ms_p20=1, ms_p80=1)
                                    for r in rows])
    assert "| 1.07 | n/a (CPU timings) |" in md and "| FAIL |" not in md
    assert "timed tiny shapes on a CPU" in md


def test_kernel_switches_do_not_leak_between_providers(monkeypatch):
    # Each provider sets the CUDA kernel switches at every call; a provider built after another
    # one ran must still get the user's settings (here: unset), not the earlier provider's.
    from prope_kernels.bench import providers as P
    for var in ("PROPE_CUDA_SM90", "PROPE_CUDA_SM90_FWD", "PROPE_CUDA_SM90_BWD",
                "PROPE_CUDA_ROT"):
        monkeypatch.delenv(var, raising=False)
        monkeypatch.setitem(P.USER_ENV, var, None)
    seen = []

    def call(q, k, v):
        seen.append({var: os.environ.get(var) for var in P.USER_ENV if "CUDA" in var})

    forced = P.with_switches(P.PROVIDERS["prope-cuda-sm80"], call, [])
    forced.fn(None, None, None)
    default = P.with_switches(P.PROVIDERS["prope-cuda"], call, [])
    default.fn(None, None, None)
    assert seen[0]["PROPE_CUDA_SM90"] == "0"
    assert seen[1] == {"PROPE_CUDA_SM90": None, "PROPE_CUDA_SM90_FWD": None,
                       "PROPE_CUDA_SM90_BWD": None, "PROPE_CUDA_ROT": None}, seen
    assert forced.switches_set == {"PROPE_CUDA_SM90": "0"} and default.switches_set == {}
    # every prope provider sets them, auto and sdpa included (auto may run the CUDA backend)
    forced.fn(None, None, None)
    P.with_switches(P.PROVIDERS["prope-auto"], call, []).fn(None, None, None)
    assert seen[-1] == seen[1], seen
    split = P.with_switches(P.PROVIDERS["prope-cuda-sm90-split"], call, [])
    assert split.switches_set == {"PROPE_CUDA_SM90": "1", "PROPE_CUDA_SM90_BWD": "split"}
    pairs = P.with_switches(P.PROVIDERS["prope-cuda-sm90-rotpairs"], call, [])
    pairs.fn(None, None, None)
    assert pairs.switches_set == {"PROPE_CUDA_SM90": "1", "PROPE_CUDA_ROT": "pairs"}
    default.fn(None, None, None)
    assert seen[-1] == seen[1], seen  # the forced pairs do not stay on for the next provider


def test_default_lists_follow_backend_capabilities(monkeypatch):
    # the window/softcap presets take every provider of the preset list whose backend (ours: the
    # registry's features) can run them; a backend that gains a feature joins with no bench edit
    import dataclasses

    from prope_kernels import backends
    from prope_kernels.bench import providers as P
    from prope_kernels.bench.cases import PRESETS
    win, plain, varlen = (PRESETS[n] for n in ("gemma-2b-window", "gemma-2b", "gemma-2b-varlen"))
    assert P.default("P", plain) == P.in_set("P")
    got = P.default("P", win)
    assert "prope-triton" in got and not any(n.startswith("sdpa-") for n in got), got
    assert {"flash-attn+rope-compiled", "fa3+rope-compiled", "flex+rope-compiled"} <= set(got)
    cuda = backends.get("cuda")
    for feats in (cuda.features - {"window", "softcap"}, cuda.features | {"window", "softcap"}):
        monkeypatch.setitem(backends.REGISTRY, "cuda", dataclasses.replace(cuda, features=feats))
        cuda_rows = [n for n in P.default("P", win) if P.PROVIDERS[n].backend == "cuda"]
        assert bool(cuda_rows) == ("window" in feats), (feats, cuda_rows)
    assert "flex-norope" in P.default("V", varlen)
    # every registered backend has a provider, one registered later included
    monkeypatch.setitem(backends.REGISTRY, "newbe", dataclasses.replace(cuda, name="newbe"))
    table = P._table()
    assert {f"prope-{b}" for b in backends.names()} <= set(table)
    assert table["prope-newbe"].kind == "ours" and table["prope-newbe"].sets == ""


def test_default_lists_ask_the_device_check(monkeypatch):
    # the cuda backend lists window/softcap statically, but has them on sm_90 only: on another
    # GPU the window/softcap presets must not take its rows (they would be refused at run time),
    # and a row named by hand is reported missing with the reason, not run
    from prope_kernels.backends import cuda
    from prope_kernels.bench import providers as P
    from prope_kernels.bench.cases import PRESETS
    win, plain = PRESETS["gemma-2b-window"], PRESETS["gemma-2b"]
    gpu = torch.device("cuda")
    cap = {"now": (8, 0)}
    monkeypatch.setattr(cuda, "available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: cap["now"])
    monkeypatch.setattr(cuda, "sm90_runs", lambda d: torch.cuda.get_device_capability(d) == (9, 0))
    cuda_rows = lambda case: [n for n in P.default("P", case, gpu)  # noqa: E731
                              if P.PROVIDERS[n].backend == "cuda"]
    assert cuda_rows(win) == [] and "prope-triton" in P.default("P", win, gpu)
    assert "prope-cuda" in cuda_rows(plain)  # no feature needed: no device question
    why = P.lacks(P.PROVIDERS["prope-cuda"], win, gpu)
    assert "window" in why and "sm_90" in why, why
    cap["now"] = (9, 0)
    assert "prope-cuda" in cuda_rows(win)
    assert P.lacks(P.PROVIDERS["prope-cuda"], win, gpu) is None
    # the CPU lists are unchanged: a backend that cannot run there is reported missing by build
    assert "prope-cuda" in P.default("s", PRESETS["gemma-2b-window"], torch.device("cpu"))


def test_cpu_smoke_bars_are_not_judged(smoke_run):
    # interpreter timings on a CPU cannot pass or fail a GPU speed bar: each bar of the smoke run
    # is computed (the pipeline works) but reads "n/a (CPU timings)", and the report says why
    out, _ = smoke_run
    data = json.loads((out / "results.json").read_text())
    assert data["bars"], "the smoke run computes some bars (p sweep, auto vs our backends)"
    for b in data["bars"]:
        assert b["passed"] is None and b["verdict"] == "n/a (CPU timings)", b
        assert b["set"] in ("fused-op", "sdpa-auto", "features") and "issue" not in b
    md = (out / "report.md").read_text()
    bars_md = md[md.index("## Speed bars"):md.index("## Presets")]
    assert "Not judged" in bars_md and "timed tiny shapes on a CPU" in bars_md
    rows = [ln for ln in bars_md.splitlines() if ln.startswith("| ") and "| set |" not in ln]
    assert len(rows) == len(data["bars"])
    assert all(ln.endswith("| n/a (CPU timings) |") for ln in rows), rows
    assert "PASS" not in bars_md and "FAIL" not in bars_md


def test_reports_name_no_tracker_numbers(smoke_run):
    # the reports speak of the project alone: no "Issue 10" (internal tracker numbers)
    out, _ = smoke_run
    for name in ("report.md", "results.json", "results.csv"):
        text = (out / name).read_text()
        assert not re.search(r"\bissue\s*#?\d", text, re.I), name


def test_driver_query_runs_outside_a_checkout(monkeypatch):
    # an installed package has no checkout: git commands give nothing there, but nvidia-smi (the
    # driver version of a GPU run) must still run
    from prope_kernels.bench import env as E
    monkeypatch.setattr(E, "REPO", None)
    assert E._run([sys.executable, "-c", "print('560.35')"]) == ""
    assert E._run([sys.executable, "-c", "print('560.35')"], anywhere=True) == "560.35"
