"""Preference tuning on real ranks, for what the combination matrix (test_matrix.py: every method ×
ZeRO layout × LoRA × packing × uneven tail against one process) does not vary: LoRA DPO over
16-token tiles of the loss head equals one process on the full logits, pairs laid end to end equal
padded pairs, the references are what the recipe asks for, accumulation splits don't matter, and a
run SIGKILLed mid-way resumes bit for bit (reading its cached reference log-probs).

Four launches in all: the 1-process list, the 2-rank list, and the kill/resume pair."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, rank_env, read_metrics, tiny_recipe, torchrun, write_recipe
from safetensors.torch import load_file

pytestmark = pytest.mark.distributed
DRIVER = ROOT / "tests" / "distributed" / "run_recipes.py"
PREF = "dpkit:data/self_instruct_seed.preference.jsonl"
STEPS = 4
TOL = 1e-5
KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen")
LORA = {"r": 8, "alpha": 16, "dropout": 0.0}


def pref(tmp: Path, name: str, objective="dpo", stage=0, micro=2, global_batch=8, lora=False,
         **extra) -> dict:
    r = tiny_recipe(tmp / name, zero={"stage": stage},
                    data={"sources": [{"path": PREF, "format": "preference", "max_rows": 32}],
                          "max_seq_len": 80},
                    train={"max_steps": STEPS, "global_batch_size": global_batch,
                           "micro_batch_size": micro, "lr": 1e-2 if lora else 3e-3})
    r["objective"] = objective
    r["preference"] = {"max_prompt_len": 32}
    if lora:
        r["peft"] = dict(LORA)
    for section, values in extra.items():
        r.setdefault(section, {}).update(values)
    return r


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("preference")
    # Every method × ZeRO layout × LoRA × packing × uneven tail against one process is in the
    # combination matrix (test_matrix.py); here what it does not vary.
    single = {  # one process, the whole global batch in one micro-batch
        "full": pref(tmp, "full", micro=8),
        # full logits, the reference of the tiled run below (16 rows may exceed one tile)
        "lora": pref(tmp, "lora", micro=8, lora=True, compute={"loss": "full"}),
        "ga_a": pref(tmp, "ga_a", stage=2, micro=4, global_batch=4),
        "ga_b": pref(tmp, "ga_b", stage=2, micro=1, global_batch=4),
    }
    double = dict(
        # log-probs over tiles of 16 tokens (the others fit one tile: full logits)
        lora3_tiled=pref(tmp, "lora3_tiled", stage=3, lora=True,
                         compute={"loss_tile_tokens": 16}),
        # pairs laid end to end (per-row attention, no padding) against padded "full"
        packed2=pref(tmp, "packed2", stage=2, data={"packing": True}),
        # the uninterrupted twin of the crash chain below
        U=pref(tmp, "U", stage=2, output={"save_steps": 2, "save_model": True}))
    for group, nproc in ((single, 1), (double, 2)):
        paths = [str(write_recipe(tmp / f"{name}.yaml", r)) for name, r in group.items()]
        torchrun(nproc, paths, script=DRIVER, timeout=900)
    # The crash chain: rank 1 SIGKILLed as it starts step 3, then resumed to the end.
    k = write_recipe(tmp / "K.yaml", pref(tmp, "K", stage=2,
                                          output={"save_steps": 2, "save_model": True}))
    for fault, overrides in (("kill@step:3:1", []), (None, ["resume=auto"])):
        env = {**rank_env(), **({"DPKIT_FAULT": fault} if fault else {})}
        proc = subprocess.run([sys.executable, "-m", "dpkit.cli", "train", str(k), *overrides],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
        (tmp / f"K.{'killed' if fault else 'resumed'}.log").write_text(
            f"{proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return tmp


def steps(run: Path) -> list[dict]:
    return [m for m in read_metrics(run) if "loss" in m]


def assert_same(a: Path, b: Path) -> None:
    x, y = steps(a), steps(b)
    assert len(x) == len(y) == STEPS, (len(x), len(y))
    for key in KEYS:  # log-probs are sums of ~100 tokens' (~-300): fp32 resolves ~3e-5 there
        tol = TOL if not key.startswith("logps") else 1e-6 * max(abs(p[key]) for p in x)
        diff = max(abs(p[key] - q[key]) for p, q in zip(x, y))
        assert diff <= tol, (key, [p[key] for p in x], [q[key] for q in y])


def test_tiled_pairs_two_ranks_match_one_process(runs):
    assert_same(runs / "lora", runs / "lora3_tiled")
    got = steps(runs / "lora3_tiled")
    # The policy must move away from the reference, or equal losses would prove nothing:
    # step 1 is exactly log 2 (policy = reference), later steps are not.
    assert abs(got[0]["loss"] - 0.6931471805599453) <= 1e-6
    assert max(abs(m["loss"] - 0.6931471805599453) for m in got[1:]) > 1e-3, got
    assert all(abs(m["rewards/chosen"]) > 1e-5 for m in got[1:]), got


def test_tiled_run_really_tiled_and_its_reference_did_not(runs):
    """lora3_tiled equals one process (above) only means something if the two differ in path:
    the rank logs say which head computed the pairs' log-probs (tests/unit/test_preference.py
    checks that pairs go through that head without ever building the full logits)."""
    tiled = (runs / "lora3_tiled" / "logs" / "rank0.log").read_text()
    full = (runs / "lora" / "logs" / "rank0.log").read_text()
    assert "loss: tiled: 16 tokens of logits at a time" in tiled
    assert "loss: full logits (compute.loss: full)" in full


def test_pairs_laid_end_to_end_match_padded_pairs(runs):
    assert_same(runs / "full", runs / "packed2")
    assert "packing: attention" in (runs / "packed2" / "logs" / "rank0.log").read_text()


def test_gradient_accumulation_split_does_not_matter(runs):
    assert_same(runs / "ga_a", runs / "ga_b")


def test_references_are_what_the_recipe_asks_for(runs):
    full = (runs / "packed2" / "logs" / "rank0.log").read_text()
    lora = (runs / "lora3_tiled" / "logs" / "rank0.log").read_text()
    assert "reference precomputed" in full and "reference log-probs of" in full
    assert (runs / "packed2" / "ref_logps.pt").is_file()
    assert "reference adapter_off" in lora and not (runs / "lora3_tiled" / "ref_logps.pt").exists()


def test_resume_after_sigkill_is_bitwise(runs):
    killed = (runs / "K.killed.log").read_text()
    resumed = (runs / "K.resumed.log").read_text()
    assert not killed.startswith("0\n") and "SIGKILL" in killed
    assert resumed.startswith("0\n"), resumed[-3000:]
    assert "resumed from" in resumed and "read from" in resumed  # cached reference reused
    assert [m["loss"] for m in steps(runs / "K")] == [m["loss"] for m in steps(runs / "U")]
    assert [m["rewards/margins"] for m in steps(runs / "K")] == \
        [m["rewards/margins"] for m in steps(runs / "U")]
    a = load_file(runs / "K" / "model" / "model.safetensors")
    b = load_file(runs / "U" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
