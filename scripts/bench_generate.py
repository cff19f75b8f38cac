"""Generation during training under ZeRO-3: dpkit's one gather per eval against a plain
`model.generate` on the ZeRO-3 engine, whose every forward pass (one per generated token)
all-gathers each layer's parameters. Same engine, same weights, same prompts, 2 CPU ranks.

    python scripts/bench_generate.py                    # 8 prompts × 32 tokens, 3 repetitions
    python scripts/bench_generate.py --prompts 4 --new 16 --reps 5

One torchrun launch: each rank builds the real dpkit Run (setup only: model, data, ZeRO-3
engine), then, interleaved for --reps repetitions:
  dpkit  dpkit.eval.generate.generate: parameters gathered once, hooks lifted, each rank greedy-
         decodes its share of the prompts, rank 0 collects them
  gather the same single gather, but every rank generates every prompt (no split): what the
         gather alone gains over `plain`, without dpkit's sharing of the prompts between ranks
  plain  engine.module.generate on every rank for every prompt (ranks in lockstep, as ZeRO-3
         requires: each forward is a collective)
Prints the wall time of one eval's generations (median), tokens generated, and the ratio; the
completions of both must be identical token for token (checked, printed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The throughput benchmark's Llama (scripts/bench_throughput.py): 3.95M parameters, vocab 2048.
MODEL = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 688,
         "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
         "vocab_size": 2048, "max_position_embeddings": 2048}


def recipe(out: Path, prompts: int, new: int) -> dict:
    from dpkit.shipped import DATA, TOKENIZERS

    return {"model": {"config": MODEL, "tokenizer": str(TOKENIZERS / "tiny-bpe"),
                      "dtype": "float32"},
            "data": {"sources": [{"path": str(DATA / "self_instruct_seed.alpaca.jsonl"),
                                  "format": "alpaca"}], "max_seq_len": 512,
                     "eval_fraction": 0.1},
            "train": {"global_batch_size": 8, "micro_batch_size": 4, "max_steps": 1},
            "zero": {"stage": 3},
            "eval": {"num_prompts": prompts, "max_new_tokens": new},
            "output": {"dir": str(out), "save_model": False}}


def worker(args) -> None:
    import torch

    from dpkit import distributed
    from dpkit.eval import generate as G
    from dpkit.recipe import recipe_from_dict
    from dpkit.run import Run

    run = Run(recipe_from_dict(recipe(Path(args.out), args.prompts, args.new))).setup()
    env, tok, engine = run.env, run.tokenizer, run.engine
    prompts = run.evals.prompts
    kw = {"eos_id": tok.eos_token_id, "pad_id": tok.pad_token_id}

    def dpkit_eval():
        return G.generate(engine, prompts, env, run.layout, args.new, kw["eos_id"], kw["pad_id"])

    def gather_eval():
        module = engine.module
        with G.full_weights(engine, run.layout) as model, torch.no_grad():
            model.eval()
            out = [G.greedy(model, p.ids, args.new, kw["eos_id"], kw["pad_id"], env.device)
                   for p in prompts]
        module.train()
        return out

    def plain_eval():
        module = engine.module
        module.eval()
        with torch.no_grad():
            out = [G.greedy(module, p.ids, args.new, kw["eos_id"], kw["pad_id"], env.device)
                   for p in prompts]
        module.train()
        return out

    variants = {"dpkit": dpkit_eval, "gather": gather_eval, "plain": plain_eval}
    variants = {k: v for k, v in variants.items() if k in args.variants.split(",")}
    times = {name: [] for name in variants}
    results = {}
    for _ in range(args.reps):
        for name, fn in variants.items():
            distributed.barrier()
            t0 = time.perf_counter()
            results[name] = fn()
            distributed.barrier()
            times[name].append(time.perf_counter() - t0)
    if env.is_main:
        tokens = sum(len(c) for c in next(iter(results.values())))
        Path(args.result).write_text(json.dumps({
            "times": times, "tokens": tokens,
            "same": all(r == next(iter(results.values())) for r in results.values()),
            "prompt_tokens": [len(p.ids) for p in prompts],
            "parameters": run.n_params}))
    distributed.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--new", type=int, default=32, help="max new tokens per prompt")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--variants", default="dpkit,gather,plain")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    import deepspeed
    import torch
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false",
               "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", __file__, "--worker", "--out", f"{tmp}/run",
               "--result", str(result), "--prompts", str(args.prompts), "--new", str(args.new),
               "--reps", str(args.reps), "--variants", args.variants]
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            sys.exit(f"launch failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        r = json.loads(result.read_text())
    med = {name: statistics.median(t) for name, t in r["times"].items()}
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; python "
          f"{platform.python_version()}, torch {torch.__version__}, deepspeed "
          f"{deepspeed.__version__}, transformers {transformers.__version__}")
    print(f"model: {r['parameters']:,} parameters, fp32, ZeRO-3 on 2 CPU ranks (gloo); "
          f"{args.prompts} prompts ({min(r['prompt_tokens'])}-{max(r['prompt_tokens'])} tokens), "
          f"up to {args.new} new tokens each, {r['tokens']} generated; {args.reps} repetitions")
    print(f"identical completions, token for token: {r['same']}")
    for name, t in r["times"].items():
        runs = ", ".join(f"{x:.2f}" for x in t)
        print(f"  {name:6s} median {med[name]:7.2f} s per eval "
              f"({r['tokens'] / med[name]:6.1f} tokens/s)  [{runs}]")
    for name, seconds in med.items():
        if name != "plain" and "plain" in med:
            print(f"{name} is {med['plain'] / seconds:.1f}x faster than plain generate on the "
                  "ZeRO-3 engine")


if __name__ == "__main__":
    main()
