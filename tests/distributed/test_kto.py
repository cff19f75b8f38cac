"""KTO on real ranks, for what the combination matrix (test_matrix.py: KTO × every ZeRO layout ×
LoRA × packing × uneven tail against one process, z₀ included) does not vary: a run SIGKILLed
mid-way (rank 1, as it starts step 3) and restarted by `dpkit train` itself (train.max_restarts)
resumes bit for bit, reading its cached reference log-probs — of the rows and of the mismatched
rows of every planned step — instead of computing them again; and the start-up report.

Two launches: the uninterrupted twin, and `dpkit train` with its killed attempt and restart."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, rank_env, read_metrics, tiny_recipe, torchrun, write_recipe
from safetensors.torch import load_file

from dpkit.shipped import DATA

pytestmark = pytest.mark.distributed
DRIVER = ROOT / "tests" / "distributed" / "run_recipes.py"
DATA_FILE = "dpkit:data/self_instruct_seed.unpaired.jsonl"
ROWS, STEPS, GLOBAL = 40, 4, 8


def kto(tmp: Path, name: str, **train) -> dict:
    r = tiny_recipe(tmp / name, zero={"stage": 2},
                    data={"sources": [{"path": DATA_FILE, "format": "unpaired",
                                       "max_rows": ROWS}], "max_seq_len": 80},
                    train={"max_steps": STEPS, "global_batch_size": GLOBAL,
                           "micro_batch_size": 2, "lr": 1e-2, **train},
                    output={"save_steps": 2, "save_model": True})
    r["objective"] = "kto"
    r["kto"] = {"max_prompt_len": 32}
    return r


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("kto")
    torchrun(2, [str(write_recipe(tmp / "U.yaml", kto(tmp, "U")))], script=DRIVER, timeout=600)
    k = write_recipe(tmp / "K.yaml", kto(tmp, "K", max_restarts=1))
    proc = subprocess.run([sys.executable, "-m", "dpkit.cli", "train", str(k)], cwd=ROOT,
                          env={**rank_env(), "DPKIT_FAULT": "kill@step:3:1"},
                          capture_output=True, text=True, timeout=600)
    (tmp / "K.log").write_text(f"{proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return tmp


def steps(run: Path) -> list[dict]:
    return [m for m in read_metrics(run) if "loss" in m]


def test_resume_after_sigkill_is_bitwise_and_reads_the_cached_reference(runs):
    log = (runs / "K.log").read_text()
    assert log.startswith("0\n"), log[-3000:]
    assert "a rank failed" in log and "restart 1 of 1" in log  # the kill happened
    assert "resumed from" in log and "read from" in log  # the cached reference was reused
    for key in ("loss", "kl", "rewards/chosen", "rewards/rejected", "grad_norm"):
        assert [m.get(key) for m in steps(runs / "K")] == [m.get(key) for m in steps(runs / "U")]
    assert any(m["kl"] > 0 for m in steps(runs / "U"))  # z₀ took part
    a = load_file(runs / "K" / "model" / "model.safetensors")
    b = load_file(runs / "U" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_start_up_report_counts_the_classes_and_the_planned_reference_rows(runs):
    labels = [json.loads(line)["label"] for line in
              (DATA / "self_instruct_seed.unpaired.jsonl").read_text().splitlines()[:ROWS]]
    good = sum(labels)
    log = (runs / "U" / "logs" / "rank0.log").read_text()
    assert f"kto: {good} desirable and {ROWS - good} undesirable training rows" in log
    # every row once, and each row's mismatched row in each of the planned steps
    assert f"reference log-probs of {ROWS + STEPS * GLOBAL} rows" in log
    assert "reference precomputed" in log
