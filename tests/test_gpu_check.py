"""`.ci/gpu_check.sh quick`, the one call for a lent GPU: the parts a CPU can check.

The script runs with GPU_CHECK_FAKE=1, which swaps each step's command for a stand-in (sleeps,
echoes, copies of synthetic results) so that its argument handling, deadline arithmetic, file
count and summary are exercised in seconds on any machine; bench/gpu_summary.py is also checked
directly on synthetic junit XML and benchmark JSON.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # bench/ is not an installed package

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
    env.update({f"GPU_CHECK_FAKE_{k.upper()}": v for k, v in fakes.items()})
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(SCRIPT), "quick"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    return proc, out, time.monotonic() - t0


def _files(out):
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())


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
    proc, out, secs = _quick(
        tmp_path, 470,
        tests=f"cp {tmp_path / 't.xml'} \"$OUT/tests.xml\"",
        cuda_tests=f"cp {tmp_path / 't.xml'} \"$OUT/cuda_tests.xml\"",
        bench=f"cp {tmp_path / 'bench.json'} \"$OUT/bench.json\"")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert secs < 30, secs  # nothing waits for the deadline
    files = _files(out)
    assert len(files) <= 8 and {"quick.log", "summary.md", "tests.xml", "bench.json"} <= set(files)
    md = (out / "summary.md").read_text()
    assert "tests: **2 passed, 0 failed, 0 errors**" in md
    assert "cuda_tests: **2 passed, 0 failed, 0 errors**" in md
    assert md.rstrip().endswith("**PASS**")
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
    from bench.providers import PROVIDERS
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
               QUICK_SHARES="30 62 95", QUICK_PROVIDERS="prope-cuda,sdpa-cudnn-norope")
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
