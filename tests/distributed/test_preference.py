"""Preference tuning on real ranks: 2 ranks give the per-step losses and rewards of 1 process
(fp32) under ZeRO 0-3, full fine-tuning (precomputed reference) and LoRA (adapter-off reference,
also under ZeRO-3), for IPO, SimPO and ORPO, and with pairs laid end to end (no padding); LoRA DPO
over 16-token tiles of the loss head equals one process on the full logits; accumulation splits
don't matter; ORPO stays finite where a rank's micro-batches run empty at the epoch's tail and in
eval; a run SIGKILLed mid-way resumes bit for bit (reading its cached reference log-probs).

Four launches in all: the 1-process list, the 2-rank list, and the kill/resume pair."""

from __future__ import annotations

import math
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
    single = {  # one process, the whole global batch in one micro-batch
        "full": pref(tmp, "full", micro=8),
        # full logits, the reference of the tiled run below (16 rows may exceed one tile)
        "lora": pref(tmp, "lora", micro=8, lora=True, compute={"loss": "full"}),
        "ipo": pref(tmp, "ipo", "ipo", micro=8), "simpo": pref(tmp, "simpo", "simpo", micro=8),
        "orpo": pref(tmp, "orpo", "orpo", micro=8),
        "ga_a": pref(tmp, "ga_a", stage=2, micro=4, global_batch=4),
        "ga_b": pref(tmp, "ga_b", stage=2, micro=1, global_batch=4),
    }
    double = {f"full{s}": pref(tmp, f"full{s}", stage=s) for s in (0, 1, 2, 3)}
    double.update({f"lora{s}": pref(tmp, f"lora{s}", stage=s, lora=True) for s in (0, 1, 2, 3)})
    double.update(ipo1=pref(tmp, "ipo1", "ipo", stage=1),
                  simpo2=pref(tmp, "simpo2", "simpo", stage=2),
                  orpo3=pref(tmp, "orpo3", "orpo", stage=3),
                  # log-probs over tiles of 16 tokens (the others fit one tile: full logits)
                  lora3_tiled=pref(tmp, "lora3_tiled", stage=3, lora=True,
                                   compute={"loss_tile_tokens": 16}),
                  # pairs laid end to end (per-row attention, no padding) against padded "full"
                  packed2=pref(tmp, "packed2", stage=2, data={"packing": True}),
                  # 49 train pairs: the epoch's last step has 1 pair, so rank 1's micro-batches
                  # are both empty (and rank 0's second); 5 eval pairs: rank 1's second eval
                  # batch is empty. ORPO's log-odds of an empty pair were log(0): NaN.
                  orpo_tail=pref(tmp, "orpo_tail", "orpo", stage=1,
                                 data={"sources": [{"path": PREF, "format": "preference",
                                                    "max_rows": 56}], "eval_fraction": 0.1},
                                 train={"max_steps": 7}, output={"eval_steps": 4}),
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


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("kind", ["full", "lora"])
def test_two_ranks_match_one_process(runs, kind, stage):
    assert_same(runs / kind, runs / f"{kind}{stage}")
    got = steps(runs / f"{kind}{stage}")
    # The policy must move away from the reference, or equal losses would prove nothing:
    # step 1 is exactly log 2 (policy = reference), later steps are not.
    assert abs(got[0]["loss"] - 0.6931471805599453) <= 1e-6
    assert max(abs(m["loss"] - 0.6931471805599453) for m in got[1:]) > 1e-3, got
    assert all(abs(m["rewards/chosen"]) > 1e-5 for m in got[1:]), got


@pytest.mark.parametrize("single, double", [("ipo", "ipo1"), ("simpo", "simpo2"),
                                            ("orpo", "orpo3"), ("lora", "lora3_tiled")])
def test_other_objectives_two_ranks_match_one_process(runs, single, double):
    assert_same(runs / single, runs / double)


def test_tiled_run_really_tiled_and_its_reference_did_not(runs):
    """lora3_tiled equals one process (above) only means something if the two differ in path:
    the rank logs say which head computed the pairs' log-probs (tests/unit/test_preference.py
    checks that pairs go through that head without ever building the full logits)."""
    tiled = (runs / "lora3_tiled" / "logs" / "rank0.log").read_text()
    full = (runs / "lora" / "logs" / "rank0.log").read_text()
    assert "loss: tiled: 16 tokens of logits at a time" in tiled
    assert "loss: full logits (compute.loss: full)" in full


def test_orpo_stays_finite_with_empty_micro_batches(runs):
    got = read_metrics(runs / "orpo_tail")
    train = [m for m in got if "loss" in m]
    evals = [m for m in got if "eval_loss" in m]
    # the tail really happened: 7 steps of 8 pairs but the last, with at most 5 (2 ranks × 2
    # micro-batches of 2: one rank then holds at most 2 pairs, leaving a micro-batch empty)
    assert len(train) == 7 and all(m["target_tokens"] == 8 for m in train[:-1]), train
    assert train[-1]["target_tokens"] <= 5, train[-1]
    # n eval pairs over 2 ranks in batches of 2 leave a rank an empty batch when n % 4 == 1
    assert evals and all(m["eval_tokens"] % 4 == 1 for m in evals), evals
    for m in train + evals:
        values = {k: v for k, v in m.items() if isinstance(v, float)}
        assert all(math.isfinite(v) for v in values.values()), m
    assert all(m["grad_norm"] > 0 for m in train)


def test_pairs_laid_end_to_end_match_padded_pairs(runs):
    assert_same(runs / "full", runs / "packed2")
    assert "packing: attention" in (runs / "packed2" / "logs" / "rank0.log").read_text()


def test_gradient_accumulation_split_does_not_matter(runs):
    assert_same(runs / "ga_a", runs / "ga_b")


def test_references_are_what_the_recipe_asks_for(runs):
    full = (runs / "full0" / "logs" / "rank0.log").read_text()
    lora = (runs / "lora3" / "logs" / "rank0.log").read_text()
    assert "reference precomputed" in full and "reference log-probs of" in full
    assert (runs / "full0" / "ref_logps.pt").is_file()
    assert "reference adapter_off" in lora and not (runs / "lora3" / "ref_logps.pt").exists()
    assert "no reference model" in (runs / "simpo2" / "logs" / "rank0.log").read_text()


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
