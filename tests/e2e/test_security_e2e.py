"""Finished runs and damaged checkpoints, with real ranks (docs/security.md).

One 2-rank launch trains two tiny runs, then, in the same ranks, asks the training entry point
(`dpkit.train.main`, what every launcher starts) to resume a finished run and to resume from a
checkpoint whose shard was truncated. Afterwards the command line (the parent process) is asked
the same. References: sha256 of every file read straight from disk before and after, and the
file the test itself truncated.
"""

from __future__ import annotations

import hashlib
import json
import textwrap
from pathlib import Path

import pytest
from conftest import tiny_recipe, torchrun, write_recipe

from dpkit.cli import main

pytestmark = pytest.mark.distributed

DRIVER = textwrap.dedent('''
    import hashlib, json, sys
    from pathlib import Path
    from dpkit import distributed
    from dpkit.recipe import load_recipe
    from dpkit.run import run
    from dpkit.train import main

    finished, trained, broken, shard, sums = sys.argv[1:6]

    def checksums():
        files = [p for d in (Path(finished).parent / "A", Path(trained).parent / "B")
                 for p in sorted(d.rglob("*")) if p.is_file()]
        return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}

    run(load_recipe(finished))
    run(load_recipe(trained))
    env = distributed.setup(600)
    if env.is_main:  # a shard cut short, as by a full disk or a copy that stopped
        data = Path(shard).read_bytes()
        Path(shard).write_bytes(data[: len(data) // 3])
        before = checksums()
    distributed.barrier()
    codes = [main([finished, "resume=auto"]), main([broken])]
    distributed.barrier()
    if env.is_main:
        Path(sums).write_text(json.dumps({"before": before, "after": checksums()}))
    print(f"CODES rank {env.rank}: {codes}", flush=True)
    distributed.shutdown()
''')


def checksums(*dirs: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for d in dirs for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("security")
    # A: finished, model saved, no checkpoint. B: checkpoints at steps 4 and 8.
    a = write_recipe(tmp / "A.yaml", tiny_recipe(tmp / "A", output={"save_model": True}))
    b = write_recipe(tmp / "B.yaml", tiny_recipe(tmp / "B", output={"save_steps": 4}))
    shard = tmp / "B" / "checkpoints" / "step-00000008" / "ds" / \
        "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    # C: a new run continuing from B's newest checkpoint, the one with the truncated shard.
    c = write_recipe(tmp / "C.yaml", {**tiny_recipe(tmp / "C"),
                                      "resume": str(shard.parent.parent)})
    driver = tmp / "driver.py"
    driver.write_text(DRIVER)
    proc = torchrun(2, [str(a), str(b), str(c), str(shard), str(tmp / "sums.json")],
                    script=driver, timeout=600)
    return tmp, proc, shard


def test_ranks_leave_a_finished_run_alone(runs):
    tmp, proc, _ = runs
    sums = json.loads((tmp / "sums.json").read_text())
    assert sums["before"] == sums["after"] and len(sums["before"]) > 10
    assert "CODES rank 0: [0, 2]" in proc.stdout and "CODES rank 1: [0, 2]" in proc.stdout
    said = [line for line in proc.stdout.splitlines() if "is a finished run" in line]
    assert said == [(f"[dpkit] {tmp / 'A'} is a finished run (summary.json is there); its model "
                     f"is in {tmp / 'A' / 'model'}. Nothing to resume, nothing changed.")]


def test_ranks_name_a_truncated_shard_once(runs):
    tmp, proc, shard = runs
    output = proc.stdout + proc.stderr
    assert output.count(str(shard)) == 1, output[-3000:]
    line = next(x for x in proc.stderr.splitlines() if str(shard) in x)
    assert line.startswith("error: resume: checkpoint file") and "is damaged" in line
    assert f"resume={tmp / 'B' / 'checkpoints' / 'step-00000004'}" in line  # the way out
    assert "Traceback" not in output
    assert not (tmp / "C").exists()  # nothing half written


def test_cli_leaves_a_finished_run_alone(runs, capsys):
    tmp, _, shard = runs
    before = checksums(tmp / "A", tmp / "B")
    assert main(["train", str(tmp / "A.yaml"), "resume=auto"]) == 0
    out, err = capsys.readouterr()
    assert "launching" not in out and f"its model is in {tmp / 'A' / 'model'}" in out
    # Asking for more steps would retrain it: refused, naming what differs.
    assert main(["train", str(tmp / "A.yaml"), "resume=auto", "train.max_steps=16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a finished run" in err[0] and "train.max_steps" in err[0]
    # And from the damaged checkpoint: one line, before any rank starts.
    assert main(["train", str(tmp / "C.yaml")]) == 2
    out, err = capsys.readouterr()
    assert "launching" not in out and err.count(str(shard)) == 1
    assert checksums(tmp / "A", tmp / "B") == before and not (tmp / "C").exists()
