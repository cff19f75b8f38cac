"""The README's quickstart through the real `dpkit train` command: 2 ranks, ZeRO-2, a run
directory with everything promised, and a saved model that reproduces the reported eval loss.
Run as the README's variant with the shipped lm-eval task: its score reaches summary.json and the
model card, equal to the score computed here by hand from the saved model."""

import json
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import ROOT, by_hand_accuracy, rank_env, read_metrics, seed_mc_docs

from dpkit.data import IGNORE, load_datasets
from dpkit.recipe import load_recipe

pytestmark = pytest.mark.distributed
QUICKSTART = ROOT / "recipes" / "quickstart" / "instruct-full-zero2.yaml"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart") / "run"
    proc = subprocess.run([sys.executable, "-m", "dpkit.cli", "train", str(QUICKSTART),
                           f"output.dir={out}", "eval.tasks=[dpkit_seed_mc]",
                           "eval.task_dirs=[dpkit:lm_eval_tasks]"], cwd=ROOT, env=rank_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out, proc


def test_run_directory_is_complete(run):
    out, proc = run
    for name in ("recipe.yaml", "ds_config.json", "metrics.jsonl", "summary.json",
                 "model/config.json", "model/model.safetensors", "model/tokenizer.json"):
        assert (out / name).is_file(), name
    ds = json.loads((out / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 2 and "auto" not in json.dumps(ds)
    assert ds["train_batch_size"] == 16 and ds["gradient_accumulation_steps"] == 2
    resolved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert resolved["train"]["global_batch_size"] == 16
    summary = json.loads((out / "summary.json").read_text())
    steps = [m for m in read_metrics(out) if "loss" in m]
    assert len(steps) == summary["steps"] > 0 and summary["world_size"] == 2
    assert [m["step"] for m in steps] == list(range(1, summary["steps"] + 1))
    assert steps[-1]["loss"] < steps[0]["loss"]
    # Progress bar on rank 0 with step, loss and tokens/s.
    assert "loss=" in proc.stderr and "tok_s=" in proc.stderr


def test_saved_model_reproduces_the_reported_eval_loss(run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = run
    summary = json.loads((out / "summary.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    recipe = load_recipe(out / "recipe.yaml")
    _, evals, _ = load_datasets(recipe.data, tokenizer, recipe.train.seed)
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in evals:  # one row at a time, no padding, transformers' own loss
            ids = torch.tensor([ex.input_ids])
            labels = torch.tensor([ex.labels])
            n = int((labels[:, 1:] != IGNORE).sum())
            total += float(model(input_ids=ids, labels=labels).loss) * n
            count += n
    assert abs(total / count - summary["final_eval_loss"]) <= 1e-5


def test_benchmark_score_reaches_summary_and_model_card(run):
    from dpkit import model_card

    out, _ = run
    bench = json.loads((out / "summary.json").read_text())["benchmarks"]
    assert "error" not in bench, bench
    acc = bench["tasks"]["dpkit_seed_mc"]["acc"]
    docs = seed_mc_docs()
    assert bench["n_samples"] == {"dpkit_seed_mc": len(docs)}
    assert acc == pytest.approx(by_hand_accuracy(out / "model", docs))
    print(f"lm-eval dpkit_seed_mc: acc {acc:.4f} in {bench['wall_s']:.1f} s")
    card = model_card.render_card(out, repo_id="me/quickstart", base_model=None, adapter=False,
                                  license=None, tags=[], has_plot=False)
    assert f"| dpkit_seed_mc | acc | {acc:.4f} | {len(docs)} |" in card
    # each prompt's answer before training (step 0) and after (the last eval), as generated
    steps = sorted({json.loads(line)["step"] for line in
                    (out / "samples.jsonl").read_text().splitlines()})
    assert steps[0] == 0 and f"| prompt | step 0 | step {steps[-1]} |" in card
