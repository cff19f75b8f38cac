"""Trains the GRPO quickstart (recipes/quickstart/grpo-letters-zero2.yaml) through `dpkit train`
on 2 CPU ranks and prints the mean reward of its first 3 and last 3 steps; exits 1 unless the last
exceed the first. The issue's "the quickstart's reward climbs", run as a script because its
minutes do not fit the test suite's budget.

    python scripts/grpo_quickstart_check.py [OUTPUT_DIR]
"""

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "quickstart" / "grpo-letters-zero2.yaml"


def main() -> int:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp()) / "run"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "dpkit.cli", "train", str(RECIPE),
                           f"output.dir={out}"], cwd=ROOT)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        return proc.returncode
    steps = [m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if "reward" in m and "eval_loss" not in m]
    rewards = [m["reward"] for m in steps]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    print(f"GRPO quickstart: {len(steps)} steps in {seconds:.0f} s (dpkit train, 2 ranks); "
          f"mean reward of the first 3 steps {first:.4f}, of the last 3 {last:.4f}; "
          f"group reward std at step 1 {steps[0]['reward_std']:.4f}")
    print("rewards per step:", " ".join(f"{r:.3f}" for r in rewards))
    return 0 if last > first else 1


if __name__ == "__main__":
    sys.exit(main())
