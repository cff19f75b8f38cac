"""The GPU check scripts, run small on CPU: GPU time is scarce, so a script that broke since it
last ran must show here, not on the GPU machine. Both compare real runs with each other."""

import json
import os
import subprocess
import sys

from conftest import ROOT, rank_env


def test_gpu_check_smoke_replays_the_same_rows_through_dpkit_and_trainer():
    """scripts/gpu_check.sh --smoke: dpkit, Trainer + flattening and dpkit with the dense mask on
    the same planned rows and weights; their step-1 losses must agree."""
    env = {**rank_env(), "PYTHON": sys.executable}
    run = subprocess.run(["bash", str(ROOT / "scripts/gpu_check.sh"), "--smoke"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    line = json.loads(run.stdout.strip().splitlines()[-1])
    assert line["ok"] and line["same_step1_loss"], line
    for name in ("dpkit", "trainer_flattening", "dpkit_dense"):
        assert line[name]["tokens_per_s"] > 0, line
    losses = [line[name]["step1_loss"] for name in ("dpkit", "trainer_flattening", "dpkit_dense")]
    assert max(losses) - min(losses) < 1e-5, losses  # fp32 on CPU: the same computation
    # scripts/gpu_long_seq.py --smoke ran first: every probed length trained with both loss
    # heads, and their losses agree (bf16, ZeRO-3)
    long = [json.loads(x) for x in run.stdout.splitlines() if x.startswith('{"long_seq"')]
    assert long and long[0]["same_losses"], run.stdout[-3000:]
    assert long[0]["long_seq"]["tiny"] == {"full": 512, "tiled": 512}, long


def test_rows_check_dry_run_on_cpu():
    """scripts/gpu_rows_check.py --device cpu: per-row attention against masked sdpa, the
    script's own comparison (its CUDA kernel path needs a GPU)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(ROOT / "scripts/gpu_rows_check.py"), "--device",
                          "cpu", "--layers", "1", "--micro", "2", "--seq-len", "256",
                          "--iters", "1", "--hidden", "256", "--vocab", "2048"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lines = [json.loads(x) for x in run.stdout.splitlines() if x.startswith("{")]
    assert [x["kv_heads"] for x in lines] == [16, 4]  # multi-head and grouped-query
    for x in lines:
        assert x["ok"] and x["loss_rel_diff"] < 1e-6 and x["grad_rel_err_max"] < 1e-4, x
