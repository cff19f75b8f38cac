"""Data at scale on real ranks, in as few launches as possible:

- tokenize once per node: two ranks started by torchrun (no preflight) on a 2,000-row set;
  local rank 0 builds the cache, rank 1 waits for its file; a second run with the same data
  reuses it (tokenize.log counts builds);
- a stream (data.streaming, packed on the fly) killed with SIGKILL at step 5 and resumed gives
  bitwise the weights of the uninterrupted run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, rank_env, tiny_recipe, torchrun, train_losses, write_recipe
from safetensors.torch import load_file

pytestmark = pytest.mark.distributed
DRIVER = ROOT / "tests" / "distributed" / "run_recipes.py"


def dpkit_train(path: Path, *overrides: str, fault: str | None = None):
    env = {**rank_env(), **({"DPKIT_FAULT": fault} if fault else {})}
    return subprocess.run([sys.executable, "-m", "dpkit.cli", "train", str(path), *overrides],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def alpaca_rows(path: Path, n: int) -> Path:
    with open(path, "w") as f:
        f.writelines(json.dumps({"instruction": f"Add {i} and {i % 7}.", "input": "",
                                "output": f"{i} plus {i % 7} is {i + i % 7}."}) + "\n" for i in range(n))
    return path


def stream_recipe(tmp: Path, name: str, data: Path) -> Path:
    r = tiny_recipe(tmp / name,
                    data={"sources": [{"path": str(data), "format": "text"}], "max_seq_len": 64,
                          "streaming": True, "shuffle_buffer": 16, "packing": True},
                    train={"max_steps": 8, "global_batch_size": 8, "micro_batch_size": 2,
                           "lr_schedule": "cosine", "warmup_ratio": 0.2},
                    output={"save_steps": 2, "save_model": True})
    return write_recipe(tmp / f"{name}.yaml", r)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("data_scale")
    data = alpaca_rows(tmp / "rows.jsonl", 2000)
    cache = tmp / "cache"
    cached = [write_recipe(tmp / f"{name}.yaml", tiny_recipe(
        tmp / name, data={"sources": [{"path": str(data), "format": "alpaca"}],
                          "max_seq_len": 64, "cache_dir": str(cache), "num_proc": 2},
        train={"max_steps": 2})) for name in ("C1", "C2")]
    text = tmp / "stream.jsonl"
    text.write_text("".join(json.dumps({"text": f"line {i}: " + "word " * (i % 9)}) + "\n"
                            for i in range(200)))
    u, k = stream_recipe(tmp, "SU", text), stream_recipe(tmp, "SK", text)
    first = torchrun(2, [str(p) for p in cached + [u]], script=DRIVER, timeout=400)
    chain = [dpkit_train(k, fault="kill@step:5:1"), dpkit_train(k, "resume=auto")]
    return tmp, cache, first, chain


def test_tokenized_once_per_node_and_reused(runs):
    tmp, cache, first, _ = runs
    builds = (cache / "tokenize.log").read_text().splitlines()
    assert len(builds) == 1 and " rank 0 built " in builds[0], builds
    assert len(list(cache.glob("tok-*/COMPLETE"))) == 1
    assert not list(cache.glob(".tmp-*"))
    assert "tokenizing into" in first.stdout and "from the cache" in first.stdout
    rank1 = (tmp / "C1" / "logs" / "rank1.log").read_text()
    assert "waiting for local rank 0 to tokenize" in rank1 or "from the cache" in rank1
    assert train_losses(tmp / "C2") == train_losses(tmp / "C1")  # the same rows, read back


def test_stream_killed_and_resumed_is_bitwise_the_uninterrupted_run(runs):
    tmp, _, _, chain = runs
    killed, resumed = chain
    assert killed.returncode != 0
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    assert train_losses(tmp / "SK") == train_losses(tmp / "SU")
    a, b = (load_file(tmp / n / "model" / "model.safetensors") for n in ("SK", "SU"))
    assert a.keys() == b.keys() and all(torch.equal(a[x], b[x]) for x in a)
    state = json.loads((tmp / "SK" / "checkpoints" / "step-00000008" / "dpkit.json").read_text())
    assert set(state["data"]["ranks"]) == {"0", "1"} and state["data"]["dp_world"] == 2
