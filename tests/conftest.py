"""Shared test helpers: tiny recipes, and real multi-rank launches with a hard timeout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dpkit.shipped import TOKENIZERS, DATA as SHIPPED_DATA

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = TOKENIZERS / "tiny-bpe"
ALPACA = SHIPPED_DATA / "self_instruct_seed.alpaca.jsonl"
MESSAGES = SHIPPED_DATA / "self_instruct_seed.messages.jsonl"

TINY_LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "vocab_size": 2048, "max_position_embeddings": 512}


def tiny_recipe(out_dir: Path, **sections) -> dict:
    """A small fp32 recipe on the bundled data; `sections` override keys per section."""
    recipe = {
        "model": {"config": dict(TINY_LLAMA), "tokenizer": str(TOKENIZER), "dtype": "float32"},
        "data": {"sources": [{"path": str(MESSAGES), "format": "messages"}], "max_seq_len": 128},
        "train": {"global_batch_size": 8, "micro_batch_size": 2, "max_steps": 8, "lr": 3e-3,
                  "lr_schedule": "constant"},
        "zero": {"stage": 2},
        "output": {"dir": str(out_dir), "save_model": False},
    }
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    return recipe


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def rank_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    # The op DeepSpeed compiles for CPU collectives lives in the project, built once by .ci/run.
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
    return env


def torchrun(nproc: int, args: list[str], timeout: int = 240, module: str | None = None,
             script: Path | None = None, check: bool = True,
             extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Start `nproc` real ranks with torch.distributed.run; kill them all after `timeout`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node", str(nproc)]
    cmd += ["-m", module] if module else [str(script)]
    proc = subprocess.run(cmd + args, env={**rank_env(), **(extra_env or {})}, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"launch failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


def read_metrics(run_dir: Path) -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def train_losses(run_dir: Path) -> list[float]:
    return [m["loss"] for m in read_metrics(run_dir) if "loss" in m]


def by_hand_accuracy(model_dir, docs) -> float:
    """Multiple choice by log-likelihood, computed here: the choice whose tokens (after the
    prompt's) are most likely, as lm-eval defines `acc` for multiple_choice tasks (trailing
    whitespace of the prompt belongs to the continuation; the tokenizer's own special tokens)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    right = 0
    for doc in docs:
        context = tok(doc["query"].rstrip())["input_ids"]
        scores = []
        for choice in doc["choices"]:
            whole = tok(doc["query"] + choice)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([whole[:-1]])).logits[0].double(), -1)
            scores.append(sum(float(logp[i - 1, whole[i]]) for i in range(len(context),
                                                                               len(whole))))
        right += max(range(len(scores)), key=scores.__getitem__) == doc["gold"]
    return right / len(docs)


def seed_mc_docs() -> list[dict]:
    """The rows of the lm-eval task dpkit ships (dpkit/resources/lm_eval_tasks)."""
    path = ROOT / "dpkit" / "resources" / "lm_eval_tasks" / "dpkit_seed_mc" / "dpkit_seed_mc.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def tmp_run(tmp_path: Path) -> Path:
    return tmp_path / "run"
