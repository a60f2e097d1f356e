"""CI runs what the README tells a new user to run, in the environment that user gets."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands():
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return [ln.strip() for ln in block.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def test_readme_opens_with_the_two_commands():
    cmds = _readme_commands()
    assert len(cmds) == 2, cmds
    assert cmds[0].startswith("pip install") and "prope-train" in cmds[0]
    assert cmds[1] == 'pip install ".[test]" && pytest'


def test_ci_runs_the_readme_test_command_in_a_fresh_venv():
    lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    test_cmd = _readme_commands()[1]
    assert test_cmd in lines, "the README's test command must be a line of .ci/run, as written"
    before = lines[:lines.index(test_cmd)]
    # nothing installed into the venv before the README's command (no CPU torch preinstalled)
    assert not [ln for ln in before if re.search(r"\bpip\b.*\binstall\b", ln)], before
    assert any("python3 -m venv" in ln for ln in before)
    assert "set -euo pipefail" in lines
