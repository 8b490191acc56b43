"""The README opens with the two commands a new user types; CI (.ci/run) runs the second one verbatim."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def readme_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block, "README.md: no ```bash block"
    return [line.split("  #")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_readme_opens_with_two_commands_and_ci_runs_the_test_one():
    cmds = readme_commands()
    assert len(cmds) == 2, cmds
    install_and_demo, install_and_test = cmds
    assert install_and_demo.startswith('pip install -e ".[dev]"') and "dtrain demo" in install_and_demo
    assert install_and_test.startswith('pip install -e ".[dev]"') and install_and_test.endswith("pytest -q")
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    ci = [ln for ln in lines if ln.strip() and not ln.startswith(("#", "set ", "cd "))]
    assert ci == [install_and_test]


def test_the_first_block_is_the_first_thing_after_the_title():
    text = (ROOT / "README.md").read_text()
    assert text.index("```bash") < text.index("\n## ")
