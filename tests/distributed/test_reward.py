"""Reward models on real ranks (2 CPU ranks, gloo), in two launches: a new score layer starts
the same under ZeRO stages 0-3; a full fine-tune under ZeRO-3 and a LoRA one under ZeRO-2 (with
a margin column and the centring term) are exported (`dpkit export`, `--merge` for LoRA), loaded
with transformers' AutoModelForSequenceClassification, and score the held-out pairs as the
engine did at its last eval — loss by the formula, mean scores, accuracy — with the chosen answer
above the rejected one; then the full run again with rank 1 SIGKILLed at step 13 and restarted
by `dpkit train` itself, bitwise equal to the uninterrupted run. The matrix
(tests/distributed/test_matrix.py) holds 2 ranks = 1 process for every stage, full and LoRA.

The pairs: the bundled Self-Instruct seed tasks whose answer has at least 8 words, each answer
chosen over its own first third (an unfinished answer), those that fit 256 tokens — what a tiny
model can learn from ~80 pairs and tell apart on ~20 held-out ones."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ALPACA, ROOT, TINY_LLAMA, TOKENIZER, rank_env, read_metrics, torchrun
from conftest import write_recipe
from safetensors.torch import load_file

from dpkit.cli import main
from dpkit.data import load_datasets
from dpkit.methods import METHODS
from dpkit.model import build_model, load_tokenizer
from dpkit.recipe import ModelSection, load_recipe

pytestmark = pytest.mark.distributed
DRIVER = ROOT / "tests" / "distributed" / "reward_runs.py"
SEED, TOL, KILLED_AT = 5, 1e-5, 13


def cut_pairs(path: Path) -> Path:
    """Each seed answer (≥ 8 words) chosen over its first third; `gap` a number per pair."""
    rows = [json.loads(line) for line in ALPACA.read_text().splitlines()]
    with path.open("w") as f:
        for i, row in enumerate(r for r in rows if len(r["output"].split()) >= 8):
            prompt = row["instruction"] + (f"\n\n{row['input']}" if row["input"].strip() else "")
            words = row["output"].split(" ")
            user = {"role": "user", "content": prompt}
            f.write(json.dumps({"prompt": prompt, "gap": (i % 3) / 2,
                                "chosen": [user, {"role": "assistant", "content": row["output"]}],
                                "rejected": [user, {"role": "assistant", "content":
                                                    " ".join(words[:len(words) // 3])}]}) + "\n")
    return path


def recipe(tmp: Path, name: str, data: Path, **sections) -> Path:
    r = {"model": {"config": dict(TINY_LLAMA), "tokenizer": str(TOKENIZER), "dtype": "float32"},
         "data": {"sources": [{"path": str(data), "format": "preference"}], "max_seq_len": 256,
                  "overflow": "drop", "eval_fraction": 0.2},
         "train": {"global_batch_size": 8, "micro_batch_size": 2, "epochs": 2, "lr": 3e-3,
                   "lr_schedule": "constant", "seed": SEED},
         "objective": "reward",
         "output": {"dir": str(tmp / name), "save_model": True, "save_steps": 12,
                    "eval_steps": 12}}
    for key, values in sections.items():
        r.setdefault(key, {}).update(values)
    return write_recipe(tmp / f"{name}.yaml", r)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reward")
    data = cut_pairs(tmp / "pairs.jsonl")
    section = ModelSection(config=dict(TINY_LLAMA), tokenizer=str(TOKENIZER), dtype="float32")
    build_model(section, 3, 0).save_pretrained(tmp / "causal")  # a causal LM: no score layer
    full = recipe(tmp, "U", data, zero={"stage": 3})
    lora = recipe(tmp, "L", data, zero={"stage": 2}, train={"lr": 1e-2},
                  peft={"r": 4, "alpha": 8, "dropout": 0.0},
                  reward={"margin_column": "gap", "center_rewards_coefficient": 0.01})
    torchrun(2, [str(tmp / "causal"), str(tmp), str(full), str(lora)], script=DRIVER, timeout=600)
    killed = recipe(tmp, "K", data, zero={"stage": 3})
    proc = subprocess.run([sys.executable, "-m", "dpkit.cli", "train", str(killed),
                           "train.max_restarts=1"], cwd=ROOT, capture_output=True, text=True,
                          env={**rank_env(), "DPKIT_FAULT": f"kill@step:{KILLED_AT}:1"},
                          timeout=600)
    return tmp, proc


# ------------------------------------------------------------------------------------ helpers
def last_eval(run: Path) -> dict:
    return [m for m in read_metrics(run) if "eval_loss" in m][-1]


def held_out(run: Path):
    """The run's eval pairs, split and tokenized as the run did."""
    r = load_recipe(run.parent / f"{run.name}.yaml")
    tok = load_tokenizer(r.model)
    _, evals, _ = load_datasets(r.data, tok, r.train.seed, options=METHODS["reward"].options(r))
    return evals, tok


def score(model, ids: list[int]) -> float:
    """One row alone (no padding): the score layer on its last token's final hidden state."""
    with torch.no_grad():
        hidden = model.model(torch.tensor([ids])).last_hidden_state[0, -1]
        return float(hidden @ model.score.weight[0])


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def check_export(export_dir: Path, run: Path, margins: bool, center: float) -> None:
    """The export loads with transformers' Auto class as a one-label model that knows its pad
    token, and scores the held-out pairs as the engine did at the run's last eval."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(export_dir).eval()
    evals, tok = held_out(run)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id
    pairs = [(score(model, e.chosen_ids), score(model, e.rejected_ids),
              e.numbers["margin"] if margins else 0.0) for e in evals]
    n = len(pairs)
    loss = sum(-log_sigmoid(c - r - m) + center * (c + r) ** 2 for c, r, m in pairs) / n
    logged = last_eval(run)
    assert logged["eval_tokens"] == n >= 15  # every held-out pair was scored
    for key, value in (("eval_loss", loss), ("eval_rewards/chosen", sum(p[0] for p in pairs) / n),
                       ("eval_rewards/rejected", sum(p[1] for p in pairs) / n)):
        assert abs(logged[key] - value) <= TOL * max(1.0, abs(value)), (key, logged[key], value)
    accuracy = sum(c > r for c, r, _ in pairs) / n
    assert abs(logged["eval_rewards/accuracies"] - accuracy) <= 1e-9
    first = [m for m in read_metrics(run) if "eval_loss" in m][0]
    assert first["step"] == 0 and accuracy >= 0.9 > first["eval_rewards/accuracies"], \
        (accuracy, first)  # it learned: chosen above rejected on held-out pairs
    # transformers' own pooled score agrees where a row does not end in the pad token (these
    # chat-template rows end in "\n"; docs/methods.md says where it reads another token)
    rows = [ids for e in evals for ids in (e.chosen_ids, e.rejected_ids)
            if ids[-1] != tok.pad_token_id]
    assert len(rows) == 2 * n
    with torch.no_grad():
        pooled = [float(model(input_ids=torch.tensor([ids])).logits[0, 0]) for ids in rows[:6]]
    assert max(abs(a - score(model, ids)) for a, ids in zip(pooled, rows)) <= 1e-6


# -------------------------------------------------------------------------------------- tests
def test_a_new_score_layer_starts_the_same_under_every_stage(runs):
    """Drawn from train.seed alone (normal(0, 0.02), written out here), under ZeRO-3's
    partitioned build as under stages 0-2, where transformers' own init would differ."""
    tmp, _ = runs
    expected = torch.randn((1, 32), generator=torch.Generator().manual_seed(SEED)) * 0.02
    built = {s: torch.load(tmp / f"score-init-z{s}.pt") for s in range(4)}
    assert built[3]["partitioned"] and not built[2]["partitioned"]
    for stage, saved in built.items():
        assert torch.equal(saved["weight"], expected), stage


def test_full_export_scores_held_out_pairs_as_the_engine_did(runs, tmp_path):
    tmp, _ = runs
    out = tmp_path / "export"
    assert main(["export", str(tmp / "U"), "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["architectures"] == \
        ["LlamaForSequenceClassification"]
    assert not (out / "generation_config.json").exists()
    check_export(out, tmp / "U", margins=False, center=0.0)
    summary = json.loads((tmp / "U" / "summary.json").read_text())
    assert summary["head"] == "sequence_classification" and summary["sample_prompts"] == 0
    assert not (tmp / "U" / "samples.jsonl").exists()  # a score model generates nothing


def test_lora_trains_and_saves_the_score_layer_and_the_merge_scores_as_the_engine_did(runs,
                                                                                     tmp_path):
    tmp, _ = runs
    adapter = load_file(tmp / "L" / "model" / "adapter_model.safetensors")
    base = load_file(tmp / "L" / "base" / "model.safetensors")
    trained = adapter["base_model.model.score.weight"]
    assert trained.shape == (1, 32) and (trained - base["score.weight"]).abs().max() > 1e-2
    out = tmp_path / "merged"
    assert main(["export", str(tmp / "L"), "--merge", "--out", str(out)]) == 0
    check_export(out, tmp / "L", margins=True, center=0.01)
    log = (tmp / "L" / "logs" / "rank0.log").read_text()
    assert "margin column 'gap', centring 0.01" in log


def test_sigkilled_rank_restarts_and_continues_bitwise(runs):
    tmp, proc = runs
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "restart 1 of 1 (train.max_restarts)" in proc.stderr
    assert f"[dpkit] restart 1: resumed from {tmp / 'K' / 'checkpoints' / 'step-00000012'} " \
           "at step 12" in proc.stdout
    steps = {run: [(m["step"], m["loss"]) for m in read_metrics(tmp / run) if "loss" in m]
             for run in ("U", "K")}
    assert steps["K"] == steps["U"] and len(steps["U"]) > KILLED_AT
    evals = [{k: v for k, v in last_eval(tmp / run).items() if k != "time"} for run in "UK"]
    assert evals[0] == evals[1]
    u, k = (load_file(tmp / run / "model" / "model.safetensors") for run in ("U", "K"))
    assert u.keys() == k.keys() and all(torch.equal(u[n], k[n]) for n in u)
