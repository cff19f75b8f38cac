"""A few of the bad inputs through the real command line (`python -m dpkit.cli` in a fresh
process): the same exit code 2, the same short message, no traceback, nothing changed."""

from __future__ import annotations

import subprocess
import sys

from cases import CASES
from conftest import ROOT, rank_env
from test_bad_input_table import prepare, snapshot

REAL = ["train-options-between", "plan-size-unit", "data-row-missing-column"]


def test_real_processes_behave_like_in_process(tmp_path):
    env = {**rank_env(), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    runs = []
    for name in REAL:  # started together: each pays the imports, the machine has spare time
        case = next(c for c in CASES if c.id == name)
        d = tmp_path / name
        d.mkdir()
        argv = prepare(case, d)
        before = snapshot(d)
        proc = subprocess.Popen([sys.executable, "-m", "dpkit.cli", *argv], cwd=d, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        runs.append((case, d, before, proc))
    for case, d, before, proc in runs:
        output, _ = proc.communicate(timeout=600)
        errors = [line for line in output.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2, f"{case.id}: exit {proc.returncode}\n{output}"
        assert "Traceback" not in output, f"{case.id}:\n{output}"
        assert len(errors) == 1 and case.needle in errors[0], f"{case.id}:\n{output}"
        assert len([line for line in output.splitlines() if line.strip()]) <= 3, output
        assert snapshot(d) == before and not (d / "run").exists(), case.id
