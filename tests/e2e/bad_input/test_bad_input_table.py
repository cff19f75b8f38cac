"""Every bad input in cases.py, in-process through `dpkit.cli.main`: exit code 2, no traceback,
at most three lines naming the key, file or value, nothing on disk changed, no run directory."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml
from cases import CASES, Case, base

from dpkit.cli import main


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No hub here: hub ids are checked from the shipped configs, as with HF_HUB_OFFLINE=1."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def prepare(case: Case, d: Path) -> list[str]:
    """The case's files and recipe in `d`; returns its command line."""
    recipe = d / "recipe.yaml"
    if case.recipe_text is not None:
        text = case.recipe_text
        recipe.write_bytes(text if isinstance(text, bytes) else text.encode())
    else:
        r = base(d)
        if case.edit:
            case.edit(r, d)
        recipe.write_text(yaml.safe_dump(r, sort_keys=False))
    if case.files:
        case.files(d)
    return case.argv_in(d, recipe)


def check(case: Case, code, output: str, before: dict, d: Path, run_existed: bool) -> None:
    lines = [line for line in output.splitlines() if line.strip()]
    assert "Traceback" not in output, output
    assert code == 2, f"exit code {code}:\n{output}"
    assert 1 <= len(lines) <= 3, f"{len(lines)} lines:\n{output}"
    assert case.needle in output, f"{case.needle!r} not named in:\n{output}"
    assert snapshot(d) == before, "a file that existed before was changed, or one was added"
    assert run_existed or not (d / "run").exists(), "the run directory was created"


def test_at_least_80_distinct_cases():
    assert len(CASES) >= 80
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # relative paths in the cases are read from here
    argv = prepare(case, tmp_path)
    before, run_existed = snapshot(tmp_path), (tmp_path / "run").exists()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own exits
        code = e.code
    out, err = capsys.readouterr()
    check(case, code, out + err, before, tmp_path, run_existed)
