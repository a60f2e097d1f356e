"""The benchmark as installed by ``pip install ".[bench]"``: ``prope_kernels.bench`` inside the
package, the ``prope-bench`` console script, runnable from any folder.

Fast: no build. The package's files are copied into a folder of their own (as they land in
site-packages: no pyproject.toml, csrc/ or bench/ beside them) and the console script that pip
writes for ``prope-bench`` (pyproject.toml's entry point) runs from another folder, with only
that copy importable. The real wheel's entry points are checked by test_packaging.py's slow
wheel build.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _entry_point() -> str:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    return meta["project"]["scripts"]["prope-bench"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(site folder holding a copy of prope_kernels, the prope-bench script, a working folder
    outside the repository)."""
    root = tmp_path_factory.mktemp("installed")
    site = root / "site"
    shutil.copytree(REPO / "prope_kernels", site / "prope_kernels",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "_build_info.json"))
    module, func = _entry_point().split(":")
    script = root / "bin" / "prope-bench"
    script.parent.mkdir()
    # what pip writes for a [project.scripts] entry
    script.write_text(f"import re\nimport sys\nfrom {module} import {func}\n"
                      "if __name__ == '__main__':\n"
                      "    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])\n"
                      f"    sys.exit({func}())\n")
    work = root / "work"
    work.mkdir()
    return site, script, work


def _run(installed, *args, code=None):
    site, script, work = installed
    env = dict(os.environ, PYTHONPATH=str(site), CUDA_VISIBLE_DEVICES="")
    env.pop("PROPE_BENCH_COMMIT", None)
    cmd = [sys.executable, "-c", code] if code else [sys.executable, str(script), *args]
    return subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=300)


def test_entry_point_is_the_package_cli():
    assert _entry_point() == "prope_kernels.bench.cli:main"


def test_prope_bench_help_from_another_folder(installed):
    proc = _run(installed, "--help")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("usage: prope-bench")
    for text in ("--preset", "--smoke", "gemma-2b", "prope-bench-results/"):
        assert text in proc.stdout, text


def test_installed_copy_needs_no_checkout(installed, tmp_path):
    site, _, work = installed
    code = (
        "import importlib.util, json\n"
        "from prope_kernels.bench import env\n"
        "print(json.dumps(dict(repo=env.REPO and str(env.REPO), out=str(env.results_root()),\n"
        "    tree=env.tree_sha256(), bench=importlib.util.find_spec('bench') is not None,\n"
        "    commit=env.collect(True)['git_commit'])))\n")
    proc = _run(installed, code=code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    # no source tree: runs go where the user is, never into site-packages; no git is asked (the
    # folder above site-packages may be another project's repository)
    assert got["repo"] is None and got["tree"] is None and got["commit"] is None
    assert got["out"] == str(work / "prope-bench-results")
    assert not got["bench"]  # no top-level `bench` module is involved
    # the package's own dispatch table is written from a checkout only
    raw = REPO / "bench" / "results" / "2026-11-26_nvidia-h100-80gb-hbm3_validate" / "bench.json"
    proc = _run(installed, "--render", str(raw), "--write-dispatch")
    assert proc.returncode != 0 and "from a prope_kernels checkout only" in proc.stderr
    assert (site / "prope_kernels" / "dispatch.json").read_text() == \
        (REPO / "prope_kernels" / "dispatch.json").read_text()


def test_checkout_defaults():
    # from the repository's root, runs go to bench/results/ (where committed runs live and
    # bench/publish.py reads them); anywhere else, to ./prope-bench-results/
    from prope_kernels.bench import env
    assert env.REPO == REPO
    here = os.getcwd()
    try:
        os.chdir(REPO)
        assert env.results_root() == REPO / "bench" / "results"
        os.chdir(REPO / "tests")
        assert env.results_root() == REPO / "tests" / "prope-bench-results"
    finally:
        os.chdir(here)


def test_no_tracker_numbers_in_the_benchmark_code():
    # report text is written by this code: it speaks of the project alone
    for path in sorted((REPO / "prope_kernels" / "bench").glob("*.py")) + \
            sorted((REPO / "bench").glob("*.py")):
        text = path.read_text()
        assert not re.search(r"\bissue\s*#?\d", text, re.I), path
