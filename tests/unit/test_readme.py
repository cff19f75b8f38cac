"""README.md stays true: its recipe reference is what the schema says."""

import subprocess
import sys

from conftest import ROOT


def test_recipe_reference_matches_schema():
    generated = subprocess.run([sys.executable, str(ROOT / "scripts" / "recipe_reference.py")],
                               capture_output=True, text=True, check=True).stdout
    readme = (ROOT / "README.md").read_text()
    begin, end = "<!-- recipe-reference:begin -->\n", "<!-- recipe-reference:end -->"
    embedded = readme.split(begin, 1)[1].split(end, 1)[0]
    assert embedded == generated, "run: python scripts/recipe_reference.py --write"


def test_readme_commands_match_ci():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    setup = 'python3 -m venv .venv && .venv/bin/pip install -c constraints.txt -e ".[dev,eval]"'
    for command in (setup,
                    ".venv/bin/python -m pytest"):
        assert command in readme and command in ci
