"""Does `dpkit plan --calibrate` predict a 2-rank step from a 1-rank run? (issue 20)

On this CPU machine, in one invocation:
  1. measures the gloo "network" between 2 ranks (all_reduce of 4 B to 16 MB, least squares
     for latency α and bandwidth β of the ring model) — the link the predictions use;
  2. trains the recipe below on 1 rank with ZeRO-2 and with ZeRO-3, each while an identical 1-rank
     job runs next to it ("twin": the machine's other core busy, as it is when 2 ranks share the
     node), each followed at once by the 2-rank run of the same stage (with --solo, also a
     1-rank ZeRO-2 run alone);
  3. calibrates the time model on each 1-rank run directory, predicts the 2-rank step time of
     the same recipe for ZeRO-2 and ZeRO-3 from every calibration, and prints predicted vs
     measured (median step_time_s after warm-up) and the error; with --reps, the median error
     over repetitions too.

    python scripts/plan_time_check.py [--steps 14] [--reps 1] [--solo] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import yaml

from dpkit.shipped import DATA, TOKENIZERS

# scripts/bench_throughput.py's model: a 4-layer Llama, hidden 256, vocabulary 2048 (4M params).
MODEL = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 688,
         "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
         "vocab_size": 2048, "max_position_embeddings": 2048}
LINK_SIZES = [1, 256, 16_384, 262_144, 1_048_576, 4_194_304]  # fp32 elements


def recipe(out: Path, stage: int, steps: int) -> Path:
    raw = {"model": {"config": MODEL, "tokenizer": str(TOKENIZERS / "tiny-bpe"),
                     "dtype": "float32"},
           "data": {"sources": [{"path": str(DATA / "self_instruct_seed.alpaca.jsonl"),
                                 "format": "alpaca"}], "max_seq_len": 512, "packing": True},
           "train": {"global_batch_size": 4, "micro_batch_size": 2, "max_steps": steps,
                     "lr": 1e-4, "lr_schedule": "constant"},
           "zero": {"stage": stage},
           "output": {"dir": str(out), "save_model": False, "overwrite": True, "log_steps": 1}}
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(raw))
    return path


def torchrun(ranks: int, *args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node", str(ranks), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait(*procs: subprocess.Popen) -> None:
    for p in procs:
        _, err = p.communicate(timeout=900)
        if p.returncode:
            raise SystemExit(f"a launch failed ({p.returncode}):\n{err[-3000:]}")


REUSE = False  # --reuse: keep finished run directories, recompute the predictions only


def train(out: Path, stage: int, ranks: int, steps: int, twin: bool = False) -> Path:
    if REUSE and (out / "summary.json").is_file():
        return out
    print(f"  {out.name}: load average before {os.getloadavg()[0]:.1f}", flush=True)
    procs = [torchrun(ranks, "-m", "dpkit.train", str(recipe(out, stage, steps)))]
    if twin:  # an identical job next to it, on its own output directory
        procs.append(torchrun(ranks, "-m", "dpkit.train",
                              str(recipe(out.with_name(out.name + "_twin"), stage, steps))))
    wait(*procs)
    return out


def link_bench() -> None:
    """Under torchrun, 2 ranks: time all_reduce per size, print "bytes seconds" on rank 0."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    for n in LINK_SIZES:
        x = torch.ones(n)
        for _ in range(3):
            dist.all_reduce(x)
        times = []
        for _ in range(15):
            dist.barrier()
            t = time.perf_counter()
            dist.all_reduce(x)
            times.append(time.perf_counter() - t)
        if dist.get_rank() == 0:
            print(n * 4, statistics.median(times), flush=True)
    dist.destroy_process_group()


def measure_link():
    """(bandwidth B/s, latency s per ring step) of gloo between 2 local ranks: an all-reduce on
    N=2 sends S bytes (2(N−1)/N·S) in 2 passes of 1 step, so t = S/β + 2α."""
    from dpkit.plan.time import Link

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node", "2", __file__, "--link-bench"], env=env,
                         capture_output=True, text=True, timeout=600, check=True)
    pts = [tuple(map(float, line.split())) for line in res.stdout.splitlines() if line.strip()]
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x in xs)
    alpha = max((my - slope * mx) / 2, 1e-6)
    return Link(f"gloo over loopback, measured ({1 / slope / 1e9:.2f} GB/s, "
                f"{alpha * 1e6:.0f} µs)", 1 / slope, alpha), pts


def torch_version() -> str:
    import deepspeed
    import torch

    return f"{torch.__version__}, deepspeed {deepspeed.__version__}"


def measured_step(run: Path) -> float:
    from dpkit.plan.calibrate import WARMUP_STEPS, read_run

    _, records = read_run(run)
    return statistics.median(r["step_time_s"] for r in records[WARMUP_STEPS:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=14)
    ap.add_argument("--solo", action="store_true", help="also calibrate on a 1-rank run alone")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "plan_time_check")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse the run directories already in --out (predictions only)")
    ap.add_argument("--link", default=None, metavar="GBPS,US",
                    help="the link's bandwidth and latency instead of measuring it")
    ap.add_argument("--link-bench", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    global REUSE
    REUSE = args.reuse
    if args.link_bench:
        return link_bench()
    from dpkit.plan.calibrate import calibrate, describe
    from dpkit.plan.time import LINKS, step_time, with_world

    args.out.mkdir(parents=True, exist_ok=True)
    print(f"{platform.node()}, {os.cpu_count()} cores, torch {torch_version()}; load average "
          f"{os.getloadavg()[0]:.1f}")
    if args.link:
        from dpkit.plan.time import Link

        gbps, us = map(float, args.link.split(","))
        link = Link(f"gloo over loopback, given ({gbps} GB/s, {us:.0f} µs)", gbps * 1e9, us * 1e-6)
    else:
        link, pts = measure_link()
        print("gloo all_reduce, 2 ranks: "
              + ", ".join(f"{int(b)} B {t * 1e3:.2f} ms" for b, t in pts))
    print(f"link: {link.name}; named default gloo-loopback: "
          f"{LINKS['gloo-loopback'].bandwidth / 1e9:.2f} GB/s, "
          f"{LINKS['gloo-loopback'].latency * 1e6:.0f} µs")
    rows = []
    for rep in range(args.reps):
        print(f"repetition {rep}", flush=True)
        # each 1-rank calibration right before the 2-rank run of its stage: the machine's
        # background load drifts over minutes, and this keeps a pair under the same load
        cals, measured = {}, {}
        if args.solo:
            cals["solo ZeRO-2"] = train(args.out / f"r{rep}_cal_solo", 2, 1, args.steps)
        for s in (2, 3):
            cals[f"twin ZeRO-{s}"] = train(args.out / f"r{rep}_cal_z{s}", s, 1, args.steps,
                                           twin=True)
            measured[s] = measured_step(train(args.out / f"r{rep}_z{s}", s, 2, args.steps))
        for name, run in cals.items():
            cal = calibrate(run)
            cluster = replace(cal.cluster, intra=link)
            print(f"\n[{name}] {describe(cal)}", flush=True)
            for s in (2, 3):
                job = with_world(replace(cal.job, stage=s, gpus_per_node=2), 2,
                                 cal.global_batch)
                st = step_time(job, cluster)
                err = st.step_s / measured[s] - 1
                rows.append((rep, name, s, st.step_s, measured[s], err))
                print(f"  ZeRO-{s} on 2 ranks: predicted {st.step_s:.3f} s (compute "
                      f"{st.compute_s:.3f}, optimizer {st.optimizer_s:.3f}, communication "
                      f"{st.comm_s:.3f} of which exposed {st.exposed_comm_s:.3f}, overhead "
                      f"{st.overhead_s:.3f}); measured {measured[s]:.3f} s; error {err:+.0%}")
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")
    print("rep  calibrated on   2-rank stage  predicted s  measured s  error")
    for rep, name, s, p, m, e in rows:
        print(f"{rep:<5}{name:<16}{s:<14}{p:<13.3f}{m:<12.3f}{e:+.0%}")
    for name in dict.fromkeys(r[1] for r in rows):
        for s in (2, 3):
            errs = [e for _, n, st, _, _, e in rows if n == name and st == s]
            print(f"median error over {len(errs)} repetition(s), calibrated on {name}, 2-rank "
                  f"ZeRO-{s}: {statistics.median(errs):+.0%}")


if __name__ == "__main__":
    main()
