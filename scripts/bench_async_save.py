"""How long the ranks stop for a checkpoint, with and without the background writer
(`output.async_save`, DeepSpeed's decoupled checkpoint engine), in one invocation:

    python scripts/bench_async_save.py [--size 125m] [--steps 8] [--save-steps 2] [--reps 2]

The same ZeRO-3 run (a llama-like model saved once with random weights, fp32, AdamW, 2 CPU
ranks) with `output.async_save` false and true, interleaved `--reps` times. dpkit logs what each
save cost the ranks (rank 0's log):

- foreground: the time in `checkpoint.save` (every rank writes its engine files, RNG, then the
  barrier and the COMPLETE marker);
- background: the hand-off (DeepSpeed queues the state to each rank's writer process, through
  shared memory), plus the time the next optimizer step waited in DeepSpeed's commit for the
  writer to finish, plus marking COMPLETE after it.

The last save of a run is reported apart: at the end of training nothing is left to overlap
with, so the ranks wait for the writer there. Step times come from metrics.jsonl: the mean over
steps that follow a save and over the others (the writer competes with the ranks for the CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_consolidate import SIZES, make_base  # noqa: E402

WAITED = re.compile(r"step (\d+): checkpoint \S+ (?:\(the ranks waited ([\d.]+) s|complete; the "
                    r"ranks waited ([\d.]+) s for it \(hand-off ([\d.]+) s, writer ([\d.]+) s)")


def run(size: str, work: Path, name: str, async_save: bool, steps: int, save_steps: int) -> dict:
    import yaml

    from dpkit.shipped import DATA, TOKENIZERS

    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    recipe = {"model": {"name_or_path": str(make_base(size, work)),
                        "tokenizer": str(TOKENIZERS / "tiny-bpe"), "dtype": "float32"},
              "data": {"sources": [{"path": str(DATA / "self_instruct_seed.messages.jsonl"),
                                    "format": "messages"}], "max_seq_len": 64},
              "train": {"global_batch_size": 2, "micro_batch_size": 1, "max_steps": steps},
              "zero": {"stage": 3},
              "output": {"dir": str(out), "save_steps": save_steps, "save_model": False,
                         "async_save": async_save},
              "eval": {"num_prompts": 0}}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    subprocess.run([sys.executable, "-m", "dpkit.cli", "train", str(path), "--nproc-per-node",
                    "2"], env=env, check=True, cwd=ROOT, capture_output=True)
    saves = {}
    for m in WAITED.finditer((out / "logs" / "rank0.log").read_text()):
        step = int(m.group(1))
        if m.group(2):
            saves[step] = {"blocked": float(m.group(2))}
        else:
            saves[step] = {"blocked": float(m.group(3)), "hand_off": float(m.group(4)),
                           "writer": float(m.group(5))}
    times = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "step_time_s" in record:
            times[record["step"]] = record["step_time_s"]
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return {"saves": saves, "step_times": times}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="125m", choices=sorted(SIZES))
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--save-steps", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--work", default="/tmp/bench-async-save")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = {False: [], True: []}
    for rep in range(args.reps):
        for async_save in (False, True):
            name = f"{'async' if async_save else 'sync'}-{rep}"
            r = run(args.size, work, name, async_save, args.steps, args.save_steps)
            results[async_save].append(r)
            print(name, json.dumps(r), flush=True)

    print(f"\n| writer | saves (not the last) | ranks blocked per save: median (all) | hand-off "
          "| waiting for the writer | step after a save / other steps | last save (end) |")
    print("|---|---|---|---|---|---|---|")
    for async_save in (False, True):
        blocked, hand, wait, last, after, other = [], [], [], [], [], []
        for r in results[async_save]:
            final = max(r["saves"])
            for step, s in sorted(r["saves"].items()):
                if step == final:
                    last.append(s["blocked"])
                    continue
                blocked.append(s["blocked"])
                hand.append(s.get("hand_off", s["blocked"]))
                wait.append(s.get("writer", 0.0))
                if step + 1 in r["step_times"]:
                    after.append(r["step_times"][step + 1])
            saved = set(r["saves"])
            other += [t for st, t in r["step_times"].items() if st - 1 not in saved and st > 1]
        label = "background (async_save)" if async_save else "foreground"
        print(f"| {label} | {len(blocked)} | {statistics.median(blocked):.2f} s "
              f"({', '.join(f'{b:.2f}' for b in blocked)}) | {statistics.median(hand):.2f} s | "
              f"{statistics.median(wait):.2f} s | {statistics.mean(after):.2f} s / "
              f"{statistics.mean(other):.2f} s | {', '.join(f'{b:.2f}' for b in last)} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
