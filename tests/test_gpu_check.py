"""`.ci/gpu_check.sh quick`, the one call for a lent GPU: the parts a CPU can check.

The script runs with GPU_CHECK_FAKE=1, which swaps each step's command for a stand-in (sleeps,
echoes, copies of synthetic results) so that its argument handling, deadline arithmetic, file
count, summary and coverage report (which tests did not run) are exercised in seconds on any
machine; bench/gpu_summary.py is also checked directly on synthetic junit XML and benchmark JSON.
Its `plan` stage prints the steps' commands: the pytest selections of its three test steps are
collected here and must hold, between them, every test of tests/ exactly once.
"""

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the repository's bench/ (gpu_summary) is not installed

from bench.gpu_summary import junit_counts, log_counts, main as summary_main  # noqa: E402
from bench.gpu_summary import quick_providers  # noqa: E402

SCRIPT = REPO / ".ci" / "gpu_check.sh"

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="1" failures="1" skipped="1" tests="5">
<testcase classname="tests.test_a" name="test_ok[1]" time="0.1"/>
<testcase classname="tests.test_a" name="test_ok[2]" time="0.1"/>
<testcase classname="tests.test_a" name="test_bad" time="0.1"><failure message="x">x</failure>
</testcase>
<testcase classname="tests.test_b" name="test_err" time="0.1"><error message="y">y</error>
</testcase>
<testcase classname="tests.test_b" name="test_skip" time="0.0"><skipped message="z"/></testcase>
</testsuite></testsuites>
"""
JUNIT_GREEN = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="2">
<testcase classname="tests.test_c" name="test_one" time="0.1"/>
<testcase classname="tests.test_c" name="test_two" time="0.1"/>
</testsuite></testsuites>
"""


def _row(provider, kind, mode, ms, peak, status="ok", label=None):
    return dict(case="gemma-2b", provider=provider, kind=kind, mode=mode, status=status,
                reason="" if status == "ok" else "no such backend here", ms_median=ms,
                tflops=100.0 / ms if ms else None, peak_mib=peak, label=label or provider)


BENCH = {
    "meta": {"gpu": "Fake GPU", "torch": "2.11", "triton": "3.6", "git_commit": "abc",
             "elapsed_s": 1.0},
    "bars": [{"provider": "prope-triton", "level": "must", "bar": "fwd+bwd faster than X",
              "value": 8.0, "target": 4.0, "unit": "ms", "passed": False}],
    "results": [
        _row("prope-triton", "ours", "fwd", 1.5, 70.0),
        _row("prope-triton", "ours", "fwd_bwd", 8.0, 180.0),
        _row("sdpa-cudnn+rope-compiled", "peer", "fwd", 1.0, 130.0),
        _row("sdpa-cudnn+rope-compiled", "peer", "fwd_bwd", 4.0, 450.0),
        _row("sdpa-flash-norope", "no-rope", "fwd", 3.0, 60.0),
        _row("sdpa-flash-norope", "no-rope", "fwd_bwd", 16.0, 400.0),
        _row("prope-cuda", "ours", "fwd", None, None, status="missing"),
    ],
}


def _quick(tmp_path, deadline, **fakes):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), GPU_CHECK_FAKE="1", QUICK_DEADLINE_S=str(deadline),
               PYTHON=sys.executable)
    env.update({k if k.isupper() else f"GPU_CHECK_FAKE_{k.upper()}": v for k, v in fakes.items()})
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(SCRIPT), "quick"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    return proc, out, time.monotonic() - t0


def _files(out):
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())


OFFSETS = "tests/test_attention.py::test_gpu_64bit_offsets"
BACKENDS = ("triton", "cuda")


def _junit(results):
    """A junit file of {test id: passed | failed | skipped:REASON}."""
    cases = []
    for tid, st in results.items():
        path, _, name = tid.partition("::")
        cls = path[:-len(".py")].replace("/", ".")
        body = ('<failure message="x">x</failure>' if st == "failed" else
                f'<skipped message="{st.partition(":")[2]}"/>' if st.startswith("skipped")
                else "")
        cases.append(f'<testcase classname="{cls}" name="{name}" time="0.1">{body}</testcase>')
    return ('<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">'
            + "".join(cases) + "</testsuite></testsuites>")


def _collected(ids):
    """What `pytest --collect-only -q` prints."""
    return "\n".join(ids) + f"\n\n{len(ids)} tests collected in 1.00s\n"


def test_unknown_stage_exits_2(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(SCRIPT), "nope"], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, OUT=str(out)))
    assert proc.returncode == 2, proc.stderr
    assert "unknown stage nope" in proc.stderr and "quick" in proc.stderr
    assert not out.exists()  # refused before doing anything


def test_quick_overrunning_step_is_killed_and_the_next_runs(tmp_path):
    (tmp_path / "bench.json").write_text(json.dumps(BENCH))
    proc, out, secs = _quick(
        tmp_path, 12,
        cuda_build="sleep 1; echo built",
        # pytest -v result lines, then exit 1 without a junit file: the log is the record
        tests="echo 'tests/test_x.py::test_a PASSED [ 50%]'; "
              "echo '[gw1] [100%] FAILED tests/test_x.py::test_b'; exit 1",
        cuda_tests="echo cuda tests start; sleep 60",  # overruns: killed at 62% of 12 s
        bench=f"cp {tmp_path / 'bench.json'} \"$OUT/bench.json\"")
    log = (out / "quick.log").read_text()
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert secs < 12 + 10, secs  # the 60 s sleep did not run out
    assert "=== step cuda_build: exit 0" in log and "built" in log
    assert "=== step cuda_tests: exit 124" in log  # timeout's status: killed at the cap
    assert "=== step bench: exit 0" in log  # the step after the overrun still ran
    md = (out / "summary.md").read_text()
    assert "| cuda_tests | **TIMED OUT** (killed at its cap) |" in md
    assert "tests: **1 passed, 1 failed, 0 errors**" in md
    assert "FAILED tests/test_x.py::test_b" in md
    assert "no junit file" in md  # counted from the -v lines
    assert "1.50x" in md and "**FAIL**" in md  # bench read, overall verdict
    assert len(_files(out)) <= 8, _files(out)
    assert "cuda_build.log" not in _files(out)  # merged into quick.log


def test_quick_green_run(tmp_path):
    (tmp_path / "bench.json").write_text(json.dumps(BENCH))
    (tmp_path / "t.xml").write_text(JUNIT_GREEN)
    (tmp_path / "c.xml").write_text(_junit({"tests/test_cuda_backend.py::test_c": "passed"}))
    (tmp_path / "o.xml").write_text(_junit({f"{OFFSETS}[{b}]": "passed" for b in BACKENDS}))
    (tmp_path / "ids.txt").write_text(_collected(
        ["tests/test_c.py::test_one", "tests/test_c.py::test_two",
         "tests/test_cuda_backend.py::test_c"] + [f"{OFFSETS}[{b}]" for b in BACKENDS]))
    proc, out, secs = _quick(
        tmp_path, 470, QUICK_TESTS="tests/test_c.py",
        collect=f"cat {tmp_path / 'ids.txt'}",
        tests=f"cp {tmp_path / 't.xml'} \"$OUT/tests.xml\"",
        cuda_tests=f"cp {tmp_path / 'c.xml'} \"$OUT/cuda_tests.xml\"",
        offsets64=f"cp {tmp_path / 'o.xml'} \"$OUT/offsets64.xml\"",
        bench=f"cp {tmp_path / 'bench.json'} \"$OUT/bench.json\"")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert secs < 30, secs  # nothing waits for the deadline
    files = _files(out)
    assert len(files) <= 8 and {"quick.log", "summary.md", "tests.xml", "offsets64.xml",
                                "bench.json"} <= set(files)
    md = (out / "summary.md").read_text()
    assert "tests: **2 passed, 0 failed, 0 errors**" in md
    assert "cuda_tests: **1 passed, 0 failed, 0 errors**" in md
    assert "offsets64: **2 passed, 0 failed, 0 errors**" in md
    assert "- tests: 2 of 2 tests ran (2 passed, 0 failed, 0 errors, 0 skipped)" in md
    assert "- offsets64: 2 of 2 tests ran (2 passed" in md
    assert "- the suite: 5 tests in tests/, every one in a step of this run" in md
    assert "did not run" not in md
    assert md.rstrip().endswith("**PASS**")  # the coverage goes in before the verdict
    assert "# GPU check (quick)" in proc.stdout  # printed at the end of the call


def test_quick_build_failure_skips_cuda_tests(tmp_path):
    proc, out, _ = _quick(tmp_path, 470, cuda_build="echo nvcc error; exit 3")
    log = (out / "quick.log").read_text()
    assert proc.returncode == 1
    assert "=== step cuda_build: exit 3" in log and "nvcc error" in log
    assert "cuda_tests: not run, the build failed" in log
    md = (out / "summary.md").read_text()
    assert "| cuda_build | **FAILED** (exit 3) |" in md and "| cuda_tests | **NOT RUN** |" in md
    assert "no results (the bench step did not finish)" in md
    # no ids collected (the fake collection prints none): said, not passed over
    assert "the suite's collection gave no test ids" in md


def test_quick_names_every_test_a_cut_step_did_not_run(tmp_path):
    # the tests step is killed at its cap after one result: the other tests of its selection are
    # named as not run (quick.log: all of them; summary.md: before the verdict), the offsets64
    # step's skip is shown with its reason, and a build failure leaves cuda_tests' tests not run
    configs = [f"tests/test_triton_configs.py::test_every_tuned_config[fwd-64-{i}]"
               for i in range(3)]
    rest = ["tests/test_train.py::test_gloo", "tests/test_rope.py::test_r[a b]",
            "tests/test_gpu_check.py::test_plan"]
    cuda = ["tests/test_cuda_backend.py::test_basic[basic]"]
    offsets = [f"{OFFSETS}[{b}]" for b in BACKENDS]
    (tmp_path / "ids.txt").write_text(_collected(configs + rest + cuda + offsets))
    (tmp_path / "o.xml").write_text(_junit({offsets[0]: "passed",
                                            offsets[1]: "skipped:backend unavailable"}))
    proc, out, secs = _quick(
        tmp_path, 20, QUICK_SHARES="25 30 60 90",
        collect=f"cat {tmp_path / 'ids.txt'}",
        cuda_build="echo nvcc error; exit 3",
        tests=f"echo '[gw0] [ 10%] PASSED {configs[0]} '; "
              f"echo '[gw1] [ 20%] SKIPPED {configs[1]} '; sleep 60",
        offsets64=f"cp {tmp_path / 'o.xml'} \"$OUT/offsets64.xml\"")
    log = (out / "quick.log").read_text()
    md = (out / "summary.md").read_text()
    assert proc.returncode == 1
    assert secs < 20 + 15, secs
    assert "=== step tests: exit 124" in log
    for text in (log, md):
        assert ("- tests: 2 of 6 tests ran (1 passed, 0 failed, 0 errors, 1 skipped); **4 did not "
                "run**: the step was cut at its cap") in text, text[-3000:]
        for t in configs[2:] + rest:
            assert f"  - {t}\n" in text, t
        assert ("- cuda_tests: 0 of 1 tests ran (0 passed, 0 failed, 0 errors, 0 skipped); "
                "**1 did not run**: the step did not start") in text
        assert f"  - {cuda[0]}\n" in text
        assert "- offsets64: 2 of 2 tests ran (1 passed, 0 failed, 0 errors, 1 skipped)" in text
        assert "  - skipped 1: backend unavailable" in text
        assert "- the suite: 9 tests in tests/, every one in a step of this run" in text
    assert md.rstrip().endswith("**FAIL**")
    assert md.index("## Coverage of the test suite") > md.index("## Benchmark")


def _plan(**env):
    proc = subprocess.run(["bash", str(SCRIPT), "plan"], cwd=REPO, capture_output=True,
                          text=True, timeout=60,
                          env=dict(os.environ, PYTHON=sys.executable, OUT="/nonexistent", **env))
    assert proc.returncode == 0, proc.stderr
    steps = {}
    for line in proc.stdout.splitlines():
        m = re.match(r"step (\w+): (?:background, )?(?:[^:]*?ends by (\d+) s[^:]*)?[^:]*: (.*)$",
                     line)
        if m:
            steps[m.group(1)] = (int(m.group(2)) if m.group(2) else None, m.group(3))
    return proc.stdout, steps


def _selection(cmd):
    """The arguments of a pytest command line that choose its tests."""
    args = shlex.split(cmd)
    args = args[args.index("pytest") + 1:]
    sel, skip_next = [], False
    for a in args:
        if skip_next:
            skip_next = False
        elif a in ("-n", "-p"):
            skip_next = True
        elif a in ("-v", "-q", "--collect-only") or a.startswith(("-r", "--junitxml=")):
            continue
        else:
            sel.append(a)
    return sel


def _collect(args):
    return subprocess.Popen([sys.executable, "-m", "pytest", "--collect-only", "-q",
                             "-p", "no:cacheprovider", *args], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _ids(proc):
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    return [ln for ln in out.splitlines() if ln.startswith("tests/") and "::" in ln]


def test_quick_plan_runs_the_whole_suite():
    # quick's three pytest steps, collected with their own selections, hold every test of tests/
    # exactly once: a file or test dropped from the plan fails here
    text, steps = _plan()
    assert {"collect", "cuda_build", "tests", "cuda_tests", "offsets64", "bench"} <= set(steps)
    sels = {n: _selection(steps[n][1]) for n in ("tests", "cuda_tests", "offsets64")}
    procs = {n: _collect(sel) for n, sel in sels.items()}
    procs["suite"] = _collect(_selection(steps["collect"][1]))
    ids = {n: _ids(p) for n, p in procs.items()}
    suite = ids.pop("suite")
    assert len(suite) > 800 and _selection(steps["collect"][1]) == ["tests/"]
    together = [t for n in ids for t in ids[n]]
    assert sorted(together) == sorted(suite), (set(suite) ^ set(together))
    # the 64-bit offsets test alone, without xdist; the CUDA backend's file after the build
    assert sorted(ids["offsets64"]) == [f"{OFFSETS}[{b}]" for b in sorted(BACKENDS)]
    assert " -n " not in steps["offsets64"][1] and " -n " not in steps["cuda_tests"][1]
    assert {t.split("::")[0] for t in ids["cuda_tests"]} == {"tests/test_cuda_backend.py"}
    # every tuned config, the CPU-only checks and this file are in the xdist step
    files = {t.split("::")[0] for t in ids["tests"]}
    assert {"tests/test_triton_configs.py", "tests/test_train.py", "tests/test_attention.py",
            "tests/test_triton_gpu_compile.py", "tests/test_bench_smoke.py",
            "tests/test_gpu_check.py"} <= files
    assert sum(t.startswith("tests/test_triton_configs.py::test_every_tuned_config")
               for t in ids["tests"]) >= 60
    # the files most worth a GPU first: a step cut at its cap loses the end of the list
    order = [a for a in sels["tests"] if a.endswith(".py")]
    assert order[0] == "tests/test_triton_configs.py", order
    assert order.index("tests/test_attention.py") < order.index("tests/test_rope.py")
    assert order[-1] == "tests/test_gpu_check.py"


def test_quick_plan_xdist_and_budget():
    pytest.importorskip("xdist")
    text, steps = _plan(PYTEST_WORKERS="16")
    assert " -n 16 " in steps["tests"][1]  # every core of the lent machine
    # the default deadline and shares: rising step ends; the summary and the coverage (15 s at
    # least each) and a step's 10 s kill grace still end inside the device tool's 600 s a call
    deadline = int(re.search(r"deadline (\d+) s", text).group(1))
    ends = [steps[n][0] for n in ("tests", "cuda_tests", "offsets64", "bench")]
    assert ends == sorted(ends) and ends[-1] < deadline
    assert steps["cuda_build"][0] == steps["tests"][0]
    assert deadline + 15 + 15 + 10 <= 580, deadline
    # enough for what the committed H100 run took (bench/results/2026-11-26_*/quick.log):
    # cuda_tests 57 s, the bench 153 s at most
    assert ends[1] - ends[0] >= 60 and ends[3] - ends[2] >= 100
    text, steps = _plan(QUICK_DEADLINE_S="100", QUICK_SHARES="10 20 30 40")
    assert [steps[n][0] for n in ("tests", "cuda_tests", "offsets64", "bench")] == [10, 20, 30, 40]


# --- the summary script on synthetic inputs ------------------------------------------------------

def test_junit_and_log_counts(tmp_path):
    (tmp_path / "t.xml").write_text(JUNIT)
    c = junit_counts(tmp_path / "t.xml")
    assert (c["passed"], c["failed"], c["errors"], c["skipped"]) == (2, 1, 1, 1)
    assert c["failed_names"] == ["tests/test_a.py::test_bad", "tests/test_b.py::test_err (error)"]
    log = "\n".join([
        "tests/test_a.py::test_ok[1] PASSED                [ 10%]",
        "[gw0] [ 20%] PASSED tests/test_a.py::test_ok[2] ",
        "[gw3] [ 30%] FAILED tests/test_a.py::test_bad[x-1.0] ",
        "tests/test_b.py::test_skip SKIPPED (needs a GPU)  [ 40%]",
        "[gw2] [ 50%] ERROR tests/test_b.py::test_err ",
        "FAILED tests/test_a.py::test_bad[x-1.0] - AssertionError",  # -rfE recap: same test
        "[gw1] [ 60%] PASSED tests/test_v.py::test_in[<lambda>-TypeError-float16 and bfloat16] ",
        "tests/test_v.py::test_id[a b] FAILED                [ 70%]",
        "SKIPPED [1] tests/test_v.py:71: needs a CUDA GPU (none present)",  # -rs recap: no id
    ])
    c = log_counts(log)
    assert (c["passed"], c["failed"], c["errors"], c["skipped"]) == (3, 2, 1, 1)
    assert c["failed_names"] == ["tests/test_a.py::test_bad[x-1.0]",
                                 "tests/test_b.py::test_err (error)",
                                 "tests/test_v.py::test_id[a b]"]


def test_summary_content(tmp_path):
    (tmp_path / "t.xml").write_text(JUNIT)
    (tmp_path / "b.json").write_text(json.dumps(BENCH))
    out = tmp_path / "s.md"
    rc = summary_main(["--out", str(out), "--junit", f"tests={tmp_path / 't.xml'}",
                       "--junit", f"cuda_tests={tmp_path / 'missing.xml'}",
                       "--bench", str(tmp_path / "b.json"), "--step=tests=1:200:235",
                       "--step=cuda_build=0:70:235", "--step=bench=124:180:180",
                       "--deadline", "470", "--elapsed", "450"])
    md = out.read_text()
    assert rc == 1  # a failed test and a timed-out step
    assert "Elapsed 450 s of a 470 s deadline." in md
    assert "| tests | **FAILED** (exit 1) | 200 | 235 |" in md
    assert "| cuda_build | ok | 70 | 235 |" in md
    assert "| bench | **TIMED OUT** (killed at its cap) | 180 | 180 |" in md
    assert "tests: **2 passed, 1 failed, 1 errors**, 1 skipped (from t.xml)" in md
    assert "FAILED tests/test_a.py::test_bad" in md
    assert "- cuda_tests: not run" in md
    # times, TF/s and peak memory per provider; ours first
    assert "| **prope-triton** | 1.500 (67) | 8.000 (12) | 180 |" in md
    assert "| sdpa-cudnn+rope-compiled | 1.000 (100) | 4.000 (25) | 450 |" in md
    assert "| **prope-cuda** | missing: no such backend here | - | - |" in md
    # headline ratios: our time / the peer's, and peak memory
    assert "| prope-triton | sdpa-cudnn+rope-compiled | 1.50x | 2.00x | 0.40x |" in md
    assert "| prope-triton | sdpa-flash-norope | 0.50x | 0.50x | 0.45x |" in md
    assert "| prope-cuda | sdpa-flash-norope | - | - | - |" in md
    assert "- FAIL (must) prope-triton: fwd+bwd faster than X: 8 vs 4 ms" in md
    assert md.rstrip().endswith("**FAIL**")


def test_summary_of_bars_a_cpu_run_did_not_judge(tmp_path):
    # a CPU smoke run's bars carry passed None: the summary says n/a, never FAIL
    bar = dict(BENCH["bars"][0], passed=None, verdict="n/a (CPU timings)")
    (tmp_path / "b.json").write_text(json.dumps(dict(BENCH, bars=[bar])))
    out = tmp_path / "s.md"
    summary_main(["--out", str(out), "--bench", str(tmp_path / "b.json")])
    md = out.read_text()
    assert "- n/a (CPU timings) (must) prope-triton: fwd+bwd faster than X" in md
    assert "FAIL (must)" not in md


def test_summary_passes_a_green_run(tmp_path):
    (tmp_path / "t.xml").write_text(JUNIT_GREEN)
    out = tmp_path / "s.md"
    assert summary_main(["--out", str(out), "--junit", f"tests={tmp_path / 't.xml'}",
                         "--step=tests=0:100:235"]) == 0
    assert "tests: **2 passed, 0 failed, 0 errors**, 0 skipped" in out.read_text()


def test_summary_flags_wrong_kernels(tmp_path):
    data = dict(BENCH, results=BENCH["results"] + [
        _row("prope-triton", "ours", "bwd", 1.0, 1.0, status="wrong")])
    (tmp_path / "b.json").write_text(json.dumps(data))
    out = tmp_path / "s.md"
    assert summary_main(["--out", str(out), "--bench", str(tmp_path / "b.json")]) == 1
    assert "**WRONG**: prope-triton bwd on gemma-2b" in out.read_text()


def test_quick_benchmarks_every_backend_of_ours():
    pytest.importorskip("torch")
    from prope_kernels.bench.providers import PROVIDERS
    provs = quick_providers()
    ours = {n for n, p in PROVIDERS.items() if p.kind == "ours"}
    # the default kernel sets are timed once (prope-triton = portable, prope-cuda = SM90 on sm_90)
    assert ours - {"prope-reference", "prope-triton-portable", "prope-cuda-sm90"} <= set(provs)
    assert not {"prope-reference", "prope-triton-portable", "prope-cuda-sm90"} & set(provs)
    # the opt-in kernel sets run after the peers (a crash or a spent budget costs only them)
    last_peer = max(provs.index(n) for n in provs if PROVIDERS[n].kind != "ours")
    for n in ("prope-triton-hopper", "prope-cuda-sm80"):
        assert provs.index(n) > last_peer
    assert {"sdpa-cudnn-norope", "sdpa-cudnn+rope-compiled", "sdpa-flash-norope",
            "sdpa-flash+rope-compiled"} <= set(provs)


def test_quick_tests_selection_and_shares(tmp_path):
    # QUICK_TESTS replaces the GPU suite in the tests step; QUICK_SHARES moves its cap
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), GPU_CHECK_FAKE="1", QUICK_DEADLINE_S="100",
               PYTHON=sys.executable, QUICK_TESTS="tests/test_hf.py -k gemma",
               QUICK_SHARES="30 62 70 95", QUICK_PROVIDERS="prope-cuda,sdpa-cudnn-norope")
    proc = subprocess.run(["bash", str(SCRIPT), "quick"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    log = (out / "quick.log").read_text()
    line = next(ln for ln in log.splitlines() if ln.startswith("=== step tests: cap"))
    assert "tests/test_hf.py -k gemma" in line and "--ignore" not in line, line
    cap = int(line.split("cap ")[1].split(" s")[0])
    assert 25 <= cap <= 30, line  # 30% of 100 s, less the seconds already spent
    bench = next(ln for ln in log.splitlines() if ln.startswith("=== step bench: cap"))
    assert "prope-cuda,sdpa-cudnn-norope" in bench, bench
    assert proc.returncode in (0, 1), proc.stderr[-2000:]
    # -k is not reproduced by the coverage report: it says so rather than guess
    assert "tests/test_hf.py -k gemma) is not only paths" in log, log[-3000:]


def test_quick_shares_must_be_four_rising_percentages(tmp_path):
    for shares in ("50 62 95", "55 67 77 97 99", "55 50 77 97", "55 67 77 101", "a b c d"):
        env = dict(os.environ, OUT=str(tmp_path / "out"), GPU_CHECK_FAKE="1",
                   PYTHON=sys.executable, QUICK_SHARES=shares)
        proc = subprocess.run(["bash", str(SCRIPT), "quick"], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and "four rising percentages" in proc.stderr, shares


# --- the train stage (the trainer at gemma-2b and the Table 2 GPU preset) ------------------------

def _train(tmp_path, deadline, **fakes):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), GPU_CHECK_FAKE="1", TRAIN_DEADLINE_S=str(deadline),
               PYTHON=sys.executable)
    env.update({f"GPU_CHECK_FAKE_{k.upper()}": v for k, v in fakes.items()})
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(SCRIPT), "train"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    return proc, out, time.monotonic() - t0


# stand-ins writing what the real steps write into $TRAIN_TMP
FAKE_BENCH = ('mkdir -p "$TRAIN_TMP/bench" && echo "| auto | 1 |" > "$TRAIN_TMP/bench/benchmark.md"'
              ' && echo "{}" > "$TRAIN_TMP/bench/benchmark.json"')
FAKE_TABLE2 = ('mkdir -p "$TRAIN_TMP/table2" && echo "| NoPE | 4.8594 |" > '
               '"$TRAIN_TMP/table2/table.md" && echo "{}" > "$TRAIN_TMP/table2/results.json"'
               ' && echo png > "$TRAIN_TMP/table2/curves.png"')


def test_train_stage_green_run_files(tmp_path):
    proc, out, _ = _train(tmp_path, 60, train_bench=FAKE_BENCH, table2=FAKE_TABLE2)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    files = _files(out)
    assert files == ["benchmark.json", "benchmark.md", "env.txt", "table2.json", "table2.md",
                     "table2_curves.png", "train.log"]
    assert len(files) <= 8  # a lent machine's limit
    log = (out / "train.log").read_text()
    assert "step train_bench: exit 0" in log and "step table2: exit 0" in log
    assert "step cuda_build: exit 0" in log  # faked: always started
    assert log.index("step table2:") < log.index("step train_bench:")
    assert "--max-minutes 0.50" in log  # 52% of 60 s less 30 s: under the floor of 0.5 min
    assert "| auto | 1 |" in log and "| NoPE | 4.8594 |" in log  # both reports in the log


def test_train_stage_overrunning_table2_is_cut_and_the_benchmark_still_runs(tmp_path):
    # deadline 20 s: table2's share (52%) is 10 s; a 60 s table2 is killed there, the build
    # beside it has ended, and the benchmark runs in the time left
    proc, out, took = _train(tmp_path, 20, table2="sleep 60", train_bench=FAKE_BENCH,
                             cuda_build="sleep 1")
    assert proc.returncode == 1
    log = (out / "train.log").read_text()
    assert "step table2: exit 124" in log or "step table2: exit 130" in log, log
    assert "table2: no table.md written" in log
    assert "step cuda_build: exit 0" in log
    assert "step train_bench: exit 0" in log and (out / "benchmark.md").is_file()
    assert took < 40


def test_train_stage_build_failure_is_reported_and_the_benchmark_runs(tmp_path):
    proc, out, _ = _train(tmp_path, 60, table2=FAKE_TABLE2, train_bench=FAKE_BENCH,
                          cuda_build="echo nvcc broke; exit 3")
    assert proc.returncode == 1
    log = (out / "train.log").read_text()
    assert "step cuda_build: exit 3" in log and "nvcc broke" in log
    assert "step train_bench: exit 0" in log


def test_train_stage_runs_the_real_commands():
    # the commands the stage runs (not faked): the gemma-2b benchmark and the gpu preset
    text = SCRIPT.read_text()
    body = text[text.index("train() {"):text.index("stage() {")]
    assert "-m prope_kernels.train_main --preset gemma-2b" in body and "--benchmark" in body
    assert "-m prope_kernels.experiments table2 --preset gpu" in body
    assert "--max-minutes" in body  # a cut table2 still tabulates the seeds it finished
