"""Data at scale on real ranks, in as few launches as possible:

- tokenize once per node: two ranks started by torchrun (no preflight) on a 2,000-row set;
  local rank 0 builds the cache, rank 1 waits for its file; a second run with the same data
  reuses it (tokenize.log counts builds);
- a 3-source weighted mixture streamed (packed on the fly), rank 1 SIGKILLed as step 5 starts
  and the group restarted by `dpkit train` (train.max_restarts) from the step-4 checkpoint:
  bitwise the losses, weights and per-source counts of the uninterrupted run. (The same in
  memory: tests/distributed/test_checkpoint.py's crash chain trains on a mixture.)"""

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


def mixture_recipe(tmp: Path, name: str, sources: list[dict], **data) -> Path:
    """Three sources weighted 5:3:2, drawn until each has run out (the small ones again)."""
    weighted = [{**s, "weight": w} for s, w in zip(sources, (5, 3, 2))]
    r = tiny_recipe(tmp / name,
                    data={"sources": weighted, "mixture": "all_exhausted", "max_seq_len": 64,
                          **data},
                    train={"max_steps": 8, "global_batch_size": 8, "micro_batch_size": 2,
                           "lr_schedule": "cosine", "warmup_ratio": 0.2},
                    output={"save_steps": 2, "save_model": True})
    return write_recipe(tmp / f"{name}.yaml", r)


def text_rows(path: Path, name: str, n: int) -> Path:
    path.write_text("".join(json.dumps({"text": f"{name} {i}: " + "word " * (i % 9)}) + "\n"
                            for i in range(n)))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("data_scale")
    data = alpaca_rows(tmp / "rows.jsonl", 2000)
    cache = tmp / "cache"
    cached = [write_recipe(tmp / f"{name}.yaml", tiny_recipe(
        tmp / name, data={"sources": [{"path": str(data), "format": "alpaca"}],
                          "max_seq_len": 64, "cache_dir": str(cache), "num_proc": 2},
        train={"max_steps": 2})) for name in ("C1", "C2")]
    streamed = [{"path": str(text_rows(tmp / f"{x}.jsonl", x, n)), "format": "text"}
                for x, n in (("a", 200), ("b", 30), ("c", 7))]
    stream = dict(streaming=True, shuffle_buffer=16, packing=True)
    su, sk = (mixture_recipe(tmp, n, streamed, **stream) for n in ("SU", "SK"))
    first = torchrun(2, [str(p) for p in cached + [su]], script=DRIVER, timeout=400)
    chain = dpkit_train(sk, "train.max_restarts=1", fault="kill@step:5:1")
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


def test_streamed_mixture_killed_and_resumed_is_bitwise_the_uninterrupted_run(runs):
    tmp, _, _, proc = runs
    killed, whole = "SK", "SU"
    assert proc.returncode == 0, proc.stderr[-3000:]
    step4 = tmp / killed / "checkpoints" / "step-00000004"
    assert "restart 1 of 1 (train.max_restarts)" in proc.stderr
    assert f"[dpkit] restart 1: resumed from {step4} at step 4" in proc.stdout
    assert train_losses(tmp / killed) == train_losses(tmp / whole)
    a, b = (load_file(tmp / n / "model" / "model.safetensors") for n in (killed, whole))
    assert a.keys() == b.keys() and all(torch.equal(a[x], b[x]) for x in a)
    sources = [json.loads((tmp / n / "summary.json").read_text())["data"]["sources"]
               for n in (killed, whole)]
    assert sources[0] == sources[1]  # what each source gave, kept across the restart
    assert all(s["rows_seen"] > 0 for s in sources[0])
    state = json.loads((step4 / "dpkit.json").read_text())  # the stream's position: global
    assert len(state["data"]["position"]["start"]["cursors"]) == 3 and state["data"]["version"] == 2
