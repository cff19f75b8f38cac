"""Peak memory of the loss step (forward + backward of the output layer and cross-entropy) with
the full logits and with dpkit's tiled loss head, each in a fresh process, measured as the rise of
the process's peak RSS over its state just before the step. Also checks the two agree.

    python scripts/bench_tiled_loss.py [--seq 8192] [--vocab 49152] [--hidden 960] [--tile 1024]

Prints one JSON line per mode and a summary line with the ratio (full / tiled).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def child(args) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from dpkit.objectives.head import plain_token_nll, token_nll

    torch.manual_seed(0)
    hidden = torch.randn(1, args.seq, args.hidden, requires_grad=True)
    head = torch.nn.Linear(args.hidden, args.vocab, bias=False)
    labels = torch.randint(0, args.vocab, (1, args.seq))
    labels[:, : args.seq // 4] = -100  # a prompt
    # warm up the kernels on a small slice so one-off allocations don't count
    token_nll(hidden[:, :8].detach(), head, labels[:, :8], args.tile).sum()
    before = peak_rss()
    t0 = time.perf_counter()
    if args.mode == "tiled":
        loss = token_nll(hidden, head, labels, args.tile).sum()
    else:
        loss = plain_token_nll(hidden, head, labels).sum()
    loss.backward()
    seconds = time.perf_counter() - t0
    return {"mode": args.mode, "loss": float(loss), "peak_rise_mib": (peak_rss() - before) / 2**20,
            "grad_norm": float(hidden.grad.norm()), "seconds": seconds,
            "logits_mib_full": args.seq * args.vocab * 4 / 2**20}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--hidden", type=int, default=960)
    p.add_argument("--tile", type=int, default=1024)
    p.add_argument("--mode", choices=["full", "tiled"], default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode:
        print(json.dumps(child(args)), flush=True)
        return 0
    results = {}
    for mode in ("full", "tiled"):
        cmd = [sys.executable, __file__, "--mode", mode, "--seq", str(args.seq), "--vocab",
               str(args.vocab), "--hidden", str(args.hidden), "--tile", str(args.tile)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        results[mode] = json.loads(out.strip().splitlines()[-1])
        print(json.dumps(results[mode]), flush=True)
    full, tiled = results["full"], results["tiled"]
    print(json.dumps({"seq": args.seq, "vocab": args.vocab, "hidden": args.hidden,
                      "tile": args.tile, "memory_ratio_full_over_tiled":
                      full["peak_rise_mib"] / max(tiled["peak_rise_mib"], 1e-9),
                      "loss_rel_diff": abs(full["loss"] - tiled["loss"]) / abs(full["loss"]),
                      "grad_norm_rel_diff": abs(full["grad_norm"] - tiled["grad_norm"])
                      / full["grad_norm"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
