"""The performance tables of README.md, csrc/README.md and bench/README.md are their raw rows.

`python -m bench.publish` generates them from committed runs (bench/publish.json names the rows);
these tests fail when a figure was edited by hand, a run named is not committed, a dirty run is
shown without its exception, or a legacy row's stated switches are not in its notes.
"""

import copy
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import publish  # noqa: E402  (the repository's tool: bench/publish.py)
from prope_kernels.bench import env as benv  # noqa: E402

SPEC = json.loads(publish.SPEC.read_text())


def _errors(spec, name="readme-h100", out="README.md"):
    pub = publish.Publisher(spec)
    pub.table(name, REPO / out)
    return pub.errors


def test_published_tables_equal_their_raw_rows():
    errors, changed = publish.publish(check=True)
    assert not errors, errors
    assert not changed, (f"{[str(p.relative_to(REPO)) for p in changed]} differ from the raw "
                         "runs: run python -m bench.publish")


def test_every_table_has_its_block_and_names_its_runs():
    for name, t in SPEC["tables"].items():
        for f in t["files"]:
            text = (REPO / f).read_text()
            assert f"<!-- bench.publish {name}:" in text and f"<!-- /bench.publish {name} -->" \
                in text, (f, name)
    readme = (REPO / "README.md").read_text()
    block = readme[readme.index("<!-- bench.publish readme-h100:"):
                   readme.index("<!-- /bench.publish readme-h100 -->")]
    rows = [ln for ln in block.splitlines() if ln.startswith("| ") and "(TF/s)" not in ln]
    assert rows and all("bench/results/2026-" in ln for ln in rows)


@pytest.mark.parametrize("old,new", [("| 0.944 (582) |", "| 0.940 (582) |"),
                                     ("| 5.53 (348) |", "| 5.35 (348) |"),
                                     ("| 740 |", "| 704 |")])
def test_a_hand_edited_figure_fails(old, new):
    path = REPO / "README.md"
    text = path.read_text()
    assert old in text
    edited = text.replace(old, new, 1)
    pub = publish.Publisher(SPEC)
    regenerated = publish.sync_text(edited, path, pub)
    assert not pub.errors
    assert regenerated != edited          # the check reports the file as differing
    assert regenerated == text            # and the publisher puts the raw figure back


def test_a_run_that_is_not_committed_is_refused(monkeypatch):
    spec = copy.deepcopy(SPEC)
    spec["runs"]["validate"] = "2026-01-01_no-such-run"
    assert any("no raw results" in e for e in _errors(spec))
    assert not publish.committed(REPO / "bench" / "results" / "2026-01-01_x" / "bench.json")
    monkeypatch.setattr(publish, "committed", lambda path: "quick" not in path.parent.name)
    assert any("is not committed" in e for e in _errors(SPEC))


def test_a_dirty_run_needs_a_visible_exception():
    spec = copy.deepcopy(SPEC)
    del spec["dirty_runs"]["2026-11-26_nvidia-h100-80gb-hbm3_quick"]
    errors = _errors(spec)
    assert any("dirty tree" in e and "refused" in e for e in errors), errors
    # allowed: every row of such a run says so
    table = publish.Publisher(SPEC).table("readme-h100", REPO / "README.md")
    rows = [ln for ln in table.splitlines() if "[quick]" in ln or "[validate]" in ln]
    assert rows and all(ln.endswith("**dirty tree** |") for ln in rows)


def test_legacy_switches_need_their_evidence():
    spec = copy.deepcopy(SPEC)
    spec["legacy_switches"]["validate llama-gqa prope-cuda-sm90-atomic"]["evidence"] = \
        "PROPE_CUDA_SM90_BWD=split"
    assert any("do not contain" in e for e in _errors(spec))
    spec = copy.deepcopy(SPEC)
    del spec["legacy_switches"]["validate gemma-2b prope-triton"]
    assert any("must state what it ran" in e for e in _errors(spec))


def test_read_back_switches_are_shown_as_recorded():
    pub = publish.Publisher(SPEC)
    rows = [dict(kind="ours", mode="fwd", switches="fwd: cuda sm90 overlap+lpt"),
            dict(kind="ours", mode="fwd_bwd",
                 switches="fwd: cuda sm90 overlap+lpt; bwd: cuda sm90 split")]
    assert pub.ran("new", "gemma-2b", "prope-cuda", rows) == rows[1]["switches"]
    assert not pub.errors
    # a run that records them must not have them restated in publish.json
    pub.spec = dict(SPEC, legacy_switches={"new gemma-2b prope-cuda": {"as_run": "x",
                                                                        "evidence": "y"}})
    pub.ran("new", "gemma-2b", "prope-cuda", rows)
    assert any("must not state them" in e for e in pub.errors)


def test_clean_means_the_commit_ran():
    assert benv.clean({"git_diff_sha256": ""})
    head = benv.tree_sha256("HEAD")
    if head is None:
        pytest.skip("no git checkout here (a copy of the tree): commits cannot be read")
    assert head and benv.clean({"git_diff_sha256": None, "source_sha256": head,
                                "git_commit": "HEAD"})
    assert not benv.clean({"git_diff_sha256": "ab" * 32, "source_sha256": "0" * 64,
                           "git_commit": "HEAD"})
    assert not benv.clean({"git_commit": "26ed02ec708eac506cfdb403bf509a30063ec492",
                           "git_dirty": True})
