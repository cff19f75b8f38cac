"""GPU check: tokens/s and MFU of a ~0.5B Llama trained packed (bf16, sequences of 2048 tokens,
ZeRO-2, one GPU) through dpkit, and the same rows through transformers' Trainer with the
padding-free DataCollatorWithFlattening. Prints ONE JSON line. Started by scripts/gpu_check.sh.

    python scripts/gpu_mfu.py [--steps 30] [--warmup 5] [--out DIR]
    python scripts/gpu_mfu.py --variants dpkit,trainer_flattening,dpkit_dense  # + ~1 min
    python scripts/gpu_mfu.py --smoke          # tiny sizes, 2 steps, all variants: runs on CPU

Variants: dpkit (sdpa recipe: per-row attention, flash varlen on CUDA — dpkit/attention.py),
trainer_flattening (Trainer + DataCollatorWithFlattening, the model's sdpa), dpkit_dense (dpkit
with transformers' packed sdpa under a dense block-diagonal mask: what per-row attention gains).

Model: built from an inline config (random weights) — hidden 1024, 24 layers, 16 heads,
intermediate 4096, vocab 32000: 0.47B parameters. Data: the bundled instruction rows (alpaca +
messages, repeated to fill enough 2048-token sequences), tokenized by the bundled tiny-bpe
tokenizer. Its 2048 ids index a 32000-row embedding: the compute (embedding, lm head over 32000
logits, loss) is that of a 32000-token vocabulary; only which ids occur differs.

Same rows: both variants replay the schedule dpkit builds (see scripts/bench_throughput.py):
the Trainer flattens exactly the rows dpkit packed into each micro-batch, so both compute the same
tokens in the same [1, ≤2048] layout per sequence.

MFU = model FLOPs (dpkit.metrics.model_flops: 6N per token for matmuls plus attention within each
row, 12·L·d·len²) / (step time × peak_flops of the GPU in bf16). Warm-up steps are left out.
Needs on the GPU machine: torch (CUDA), transformers, accelerate, deepspeed, datasets, pydantic,
pyyaml, and this repository (imported from its root; no install needed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import bench_throughput as B  # noqa: E402  (schedule replay, the dpkit and Trainer workers)
from dpkit.shipped import DATA as SHIPPED_DATA

MODEL = {"model_type": "llama", "hidden_size": 1024, "intermediate_size": 4096,
         "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 16,
         "vocab_size": 32000, "max_position_embeddings": 4096, "tie_word_embeddings": False}
SMOKE_MODEL = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "vocab_size": 2048, "max_position_embeddings": 512}
SOURCES = [(SHIPPED_DATA / "self_instruct_seed.alpaca.jsonl", "alpaca", 40_375),
           (SHIPPED_DATA / "self_instruct_seed.messages.jsonl", "messages", 29_100)]
# bench_throughput's worker names
VARIANTS = {"dpkit": "a", "trainer_flattening": "c", "dpkit_dense": "e"}


def recipe(args, out: Path, dtype: str) -> dict:
    """The recipe: sources repeated until there are enough packed sequences for every step."""
    needed = args.steps * args.global_batch * args.seq_len * 1.15  # packing leaves ~5-10% empty
    copies = max(1, math.ceil(needed / sum(tokens for _, _, tokens in SOURCES)))
    return {
        "model": {"config": dict(SMOKE_MODEL if args.smoke else MODEL),
                  "tokenizer": str(B.TOKENIZER), "dtype": dtype},
        "data": {"sources": [{"path": str(p), "format": f} for p, f, _ in SOURCES] * copies,
                 "max_seq_len": args.seq_len, "packing": True},
        "train": {"global_batch_size": args.global_batch, "micro_batch_size": args.micro_batch,
                  "max_steps": args.steps, "lr": 1e-4, "lr_schedule": "constant",
                  "seed": 42},
        "zero": {"stage": 2},
        "output": {"dir": str(out), "save_model": False, "overwrite": True, "log_steps": 1},
    }


def worker(args) -> None:
    """One variant on this job's rank(s); rank 0 adds FLOPs and peak to the result."""
    import torch

    from dpkit.metrics import matmul_parameters, model_flops, peak_flops
    from dpkit.model import load_model_config
    from dpkit.recipe import load_recipe

    rec = load_recipe(args.recipe)
    ns = argparse.Namespace(worker=VARIANTS[args.worker], plan=args.plan)
    if args.worker == "dpkit_dense":
        B.use_dense_mask()
    result = (B.run_trainer if args.worker == "trainer_flattening" else B.run_dpkit)(rec, ns)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    config = load_model_config(rec.model)
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    n_params, n_train = matmul_parameters(meta)
    p = B.load_plan(ns, int(os.environ.get("WORLD_SIZE", "1")))
    rows, schedule = p["rows"], p["schedule"]
    result["flops"] = [model_flops(n_params, n_train, config.num_hidden_layers,
                                   config.hidden_size,
                                   [len(rows[i].input_ids) for mbs in step for idx in mbs
                                    for i in idx])
                       for step in schedule]
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    result["peak_flops"] = peak_flops(device, rec.model.dtype)
    result["device"] = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    result["parameters"] = sum(p.numel() for p in meta.parameters())
    result["peak_memory_gb"] = (torch.cuda.max_memory_allocated() / 2**30
                                if device.type == "cuda" else None)
    Path(args.result).write_text(json.dumps(result) + "\n")


def summarize(r: dict, warmup: int) -> dict:
    t, tok, fl = r["times"], r["tokens"], r["flops"]
    elapsed = t[-1] - t[warmup - 1]
    n = len(t) - warmup
    flops_per_s = sum(fl[warmup:len(t)]) / elapsed
    return {"tokens_per_s": round(sum(tok[warmup:len(t)]) / elapsed, 1),
            "step_s": round(elapsed / n, 4),
            "mfu": round(flops_per_s / r["peak_flops"], 4) if r["peak_flops"] else None,
            "model_tflops_per_s": round(flops_per_s / 1e12, 3),
            "step1_loss": r["losses"][0] if r["losses"] else None,
            "peak_memory_gb": round(r["peak_memory_gb"], 2) if r["peak_memory_gb"] else None}


def last_error(log: Path) -> str | None:
    """The exception line a failed rank printed (e.g. `[rank0]: ValueError: ...`)."""
    if not log.is_file():
        return None
    lines = [x for x in log.read_text(errors="replace").splitlines()
             if "Error" in x.split(":", 2)[-1][:60] and "ChildFailedError" not in x]
    return lines[-1].strip()[:300] if lines else None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--recipe", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--plan", help=argparse.SUPPRESS)
    p.add_argument("--smoke", action="store_true", help="tiny model, 256 tokens, 2 steps (CPU)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5, help="first steps left out of the timing")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--global-batch", type=int, default=8, help="packed sequences per step")
    p.add_argument("--micro-batch", type=int, default=1,
                   help="packed sequences per forward (1: the Trainer's flattened micro-batch "
                   "has exactly dpkit's layout, so the ratio compares the loops)")
    p.add_argument("--variants", default="dpkit,trainer_flattening",
                   help=f"some of {','.join(VARIANTS)} (--smoke runs all)")
    p.add_argument("--timeout", type=int, default=170, help="per variant, seconds")
    p.add_argument("--out", help="work directory (default: a new temporary one)")
    args = p.parse_args()
    if args.worker:
        worker(args)
        return 0
    if args.smoke:
        args.steps, args.warmup, args.seq_len = 2, 1, 256
        args.global_batch, args.micro_batch = 2, 1
        args.variants = ",".join(VARIANTS)
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    work = Path(args.out or tempfile.mkdtemp(prefix="dpkit-gpu-mfu-"))
    work.mkdir(parents=True, exist_ok=True)
    import yaml

    import torch

    # bf16 on the GPU. A CPU smoke run trains in fp32: Trainer refuses bf16 without a GPU unless
    # use_cpu is set, and use_cpu with DeepSpeed breaks the CPU rank setup.
    dtype = "bfloat16" if torch.cuda.is_available() or not args.smoke else "float32"
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe(args, work / "run", dtype), sort_keys=False))
    plan_path = B.save_plan(path, 1)  # tokenize once here, not in every launch
    line: dict = {"check": "gpu_mfu", "smoke": args.smoke, "seq_len": args.seq_len,
                  "global_batch_sequences": args.global_batch, "micro_batch": args.micro_batch,
                  "steps": args.steps, "warmup_steps": args.warmup, "zero_stage": 2,
                  "dtype": dtype, "model": dict(SMOKE_MODEL if args.smoke else MODEL)}
    ok = True
    for name in variants:
        res, log = work / f"{name}.json", work / f"{name}.log"
        t0 = time.time()
        try:
            B.launch(["--worker", name, "--recipe", str(path), "--plan", str(plan_path),
                      "--result", str(res)], log,
                     args.timeout, nproc=1, script=Path(__file__).resolve())
            r = json.loads(res.read_text())
            line[name] = summarize(r, args.warmup) | {"wall_s": round(time.time() - t0, 1)}
            line.update(device=r["device"], parameters=r["parameters"],
                        peak_flops=r["peak_flops"])
        except (SystemExit, Exception) as e:  # report, keep going, fail at the end
            ok = False
            line[name] = {"error": last_error(log) or str(e).strip().splitlines()[0][:300],
                          "log": str(log)}
    if ok and "trainer_flattening" in variants:
        base = line["trainer_flattening"]
        for name in variants:
            if name != "trainer_flattening":
                line[f"{name}_over_trainer"] = round(line[name]["tokens_per_s"] /
                                                     base["tokens_per_s"], 3)
    if ok and len(variants) > 1:  # same rows and weights: same first loss (bf16 kernels differ)
        first = [line[v]["step1_loss"] for v in variants]
        line["same_step1_loss"] = max(first) - min(first) <= 2e-2 * abs(first[0])
        ok = line["same_step1_loss"]
    line["ok"] = ok
    line["work_dir"] = str(work)
    print(json.dumps(line), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
