"""Data at scale, measured on real ranks (torchrun, no preflight: the ranks do the work).

    python scripts/bench_data.py cache  [--rows 1000000] [--num-proc 2] [--worlds 1,2]
    python scripts/bench_data.py stream [--stream-mb 300] [--steps 200]

cache: a generated alpaca set of --rows rows; for 1 and then 2 ranks, a cold run (empty cache
directory) and a warm one (same recipe), each training one step. Prints how many times the data
was tokenized (lines of the cache's tokenize.log: once per node means 1 per world size), each
run's time to first step (from the rank's first log line to its step-1 line, and the launch's
wall time), the warm/cold ratio, and every rank's peak RSS during data setup.

stream: a generated text file of --stream-mb MB read with data.streaming (packed, 2 ranks) for
--steps steps; prints each rank's RSS at a few steps and the spread over the run, against the
file size.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "dpkit" / "resources" / "tokenizers" / "tiny-bpe"
TINY = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 2048,
        "max_position_embeddings": 512}
WORDS = ["the", "model", "learns", "to", "add", "numbers", "and", "answer", "questions", "about", "the", "data", "it", "reads", "while", "every", "rank", "waits", "for", "nothing"]


def recipe(out: Path, data: dict, train: dict) -> dict:
    return {"model": {"config": TINY, "tokenizer": str(TOKENIZER), "dtype": "float32"},
            "data": data, "train": {"global_batch_size": 8, "micro_batch_size": 2, "lr": 1e-3,
                                    "lr_schedule": "constant", **train},
            "zero": {"stage": 2}, "output": {"dir": str(out), "save_model": False}}


def launch(nproc: int, path: Path) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", str(nproc), "-m", "dpkit.train", str(path)],
                          env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"launch failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return time.perf_counter() - t0


def stamp(line: str) -> float:
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def rank_report(log: Path) -> dict:
    lines = log.read_text().splitlines()
    step = next(stamp(x) for x in lines if re.search(r" step 1: loss", x))
    data = next(x for x in lines if "data setup:" in x)
    peak = float(re.search(r"peak (\d+) MB", data).group(1))
    before = float(re.search(r"RSS (\d+) MB before", data).group(1))
    return {"to_first_step_s": step - stamp(lines[0]), "rss_before_mb": before,
            "peak_rss_mb": peak, "data_setup_s": float(re.search(r"setup: ([\d.]+) s", data)[1])}


def alpaca_file(path: Path, n: int) -> None:
    rng = random.Random(0)
    with open(path, "w") as f:
        f.writelines(json.dumps({"instruction": " ".join(rng.choices(WORDS, k=rng.randint(6, 24))),
                                "input": "", "output": f"{' '.join(rng.choices(WORDS, k=8))} {i}"})
                    + "\n" for i in range(n))


def bench_cache(tmp: Path, rows: int, num_proc: int, worlds: list[int], data: Path | None) -> None:
    if data is None:
        data = tmp / "rows.jsonl"
        t0 = time.perf_counter()
        alpaca_file(data, rows)
        print(f"generated {rows:,} rows ({data.stat().st_size / 2**20:.0f} MB) in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
    for world in worlds:
        cache = tmp / f"cache-{world}"
        results = {}
        for run in ("cold", "warm"):
            out = tmp / f"run-{world}-{run}"
            path = tmp / f"{world}-{run}.yaml"
            path.write_text(yaml.safe_dump(recipe(
                out, {"sources": [{"path": str(data), "format": "alpaca"}], "max_seq_len": 128,
                      "cache_dir": str(cache), "num_proc": num_proc}, {"max_steps": 1})))
            wall = launch(world, path)
            ranks = [rank_report(out / "logs" / f"rank{r}.log") for r in range(world)]
            builds = len((cache / "tokenize.log").read_text().splitlines())
            results[run] = (wall, ranks)
            print(f"ranks={world} {run}: launch wall {wall:.1f} s; tokenized {builds}x so far; "
                  + "; ".join(f"rank {r}: first step after {x['to_first_step_s']:.1f} s, data "
                              f"setup {x['data_setup_s']:.1f} s, RSS before {x['rss_before_mb']:.0f}"
                              f" MB, peak {x['peak_rss_mb']:.0f} MB" for r, x in enumerate(ranks)),
                  flush=True)
        cold = max(x["to_first_step_s"] for x in results["cold"][1])
        warm = max(x["to_first_step_s"] for x in results["warm"][1])
        print(f"ranks={world}: time to first step warm/cold = {warm:.1f}/{cold:.1f} = "
              f"{warm / cold:.3f}; launch wall warm/cold = "
              f"{results['warm'][0]:.1f}/{results['cold'][0]:.1f} = "
              f"{results['warm'][0] / results['cold'][0]:.3f}", flush=True)


def bench_stream(tmp: Path, megabytes: int, steps: int) -> None:
    data = tmp / "stream.jsonl"
    rng = random.Random(0)
    with open(data, "w") as f:
        i = 0
        while f.tell() < megabytes * 2**20:
            f.write(json.dumps({"text": f"{i} " + " ".join(rng.choices(WORDS, k=40))}) + "\n")
            i += 1
    size = data.stat().st_size / 2**20
    print(f"stream file: {i:,} rows, {size:.0f} MB", flush=True)
    out = tmp / "stream-run"
    path = tmp / "stream.yaml"
    path.write_text(yaml.safe_dump(recipe(
        out, {"sources": [{"path": str(data), "format": "text"}], "max_seq_len": 256,
              "streaming": True, "packing": True, "shuffle_buffer": 256,
              "cache_dir": str(tmp / "cache-stream")}, {"max_steps": steps})))
    wall = launch(2, path)
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rss = [m["memory_rss_mb"] for m in metrics if "memory_rss_mb" in m]
    for r in range(2):
        series = [x[r] for x in rss]
        settled = series[len(series) // 10:]
        marks = ", ".join(f"step {k + 1}: {series[k]:.0f}" for k in
                          sorted({0, 9, len(series) // 2, len(series) - 1}) if k < len(series))
        print(f"rank {r}: RSS MB {marks}; after the first 10% of steps: min {min(settled):.0f}, "
              f"max {max(settled):.0f} (spread {max(settled) - min(settled):.0f} MB) vs a "
              f"{size:.0f} MB file", flush=True)
    print(f"{steps} steps in {wall:.0f} s of launch wall time", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["cache", "stream"])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--num-proc", type=int, default=2)
    ap.add_argument("--stream-mb", type=int, default=300)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--worlds", default="1,2", help="rank counts to run, e.g. 1,2")
    ap.add_argument("--data", type=Path, help="an alpaca .jsonl made before (else generated)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-data-{args.what}-"))
    print(f"cpus={os.cpu_count()} load={os.getloadavg()[0]:.1f} tmp={tmp}", flush=True)
    if args.what == "cache":
        bench_cache(tmp, args.rows, args.num_proc, [int(w) for w in args.worlds.split(",")],
                    args.data)
    else:
        bench_stream(tmp, args.stream_mb, args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
