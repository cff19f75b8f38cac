"""DPO benchmark: dpkit's DPO against TRL's DPOTrainer on the same pairs, model, DeepSpeed config
(dpkit's resolved ds_config, ZeRO stage of --stage) and 2 CPU ranks, in one invocation. Prints
pairs per second of each and the ratio; medians of --reps repetitions, warm-up steps excluded.

    python scripts/bench_dpo.py                      # needs `trl` importable (a test-time tool)
    PYTHONPATH=/path/to/trl-target python scripts/bench_dpo.py --reps 3

dpkit lays each micro-batch's chosen and rejected rows end to end (`data.packing: true`: per-row
attention, no padding); TRL pads them to the longest row (its default; its padding-free mode needs
flash-attention). Both sides train full fine-tuning DPO (sigmoid loss, beta 0.1) with the
reference log-probs computed in a first pass before step 1 (dpkit: `reference: precomputed`;
TRL: `precompute_ref_log_probs=True`), so each step is one forward of chosen + rejected and one
backward on both; dpkit's reference pass is timed apart and printed. Pairs per second = pairs of
the timed steps / their wall time (from the end of the warm-up step to the end of the last full
step; an epoch's partial last step is left out), on rank 0 after a GPU sync where there is one.

Same pairs: the bundled 60 preference pairs (dpkit/resources/data/), rendered with the tiny
tokenizer's chat template by each library itself; same global batch, micro batch, learning rate,
seed and initial weights (a small Llama built once from an inline config and saved, loaded by
both). Tokenization may differ by a token at the prompt/answer boundary between the two.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import trl_harness as H  # noqa: E402  (the harness the TRL benchmarks share)

MODEL = H.MODEL  # the shared tiny Llama
PAIRS = "dpkit:data/self_instruct_seed.preference.jsonl"


def recipe(work: Path, args) -> dict:
    return {
        "objective": "dpo", "preference": {"beta": 0.1, "reference": "precomputed"},
        "model": {"name_or_path": str(work / "init"), "tokenizer": "dpkit:tokenizers/tiny-bpe",
                  "dtype": "float32"},
        "data": {"sources": [{"path": PAIRS, "format": "preference"}],
                 "max_seq_len": args.max_seq_len, "packing": True},
        "train": {"global_batch_size": args.global_batch, "micro_batch_size": args.micro,
                  "epochs": 1, "lr": 1e-5, "lr_schedule": "constant", "seed": 0},
        "zero": {"stage": args.stage},
        "output": {"dir": str(work / "dpkit-run"), "overwrite": True, "save_model": False},
    }


# ================================================================================ the workers
def run_dpkit(recipe_path: str) -> dict | None:
    from dpkit.recipe import load_recipe
    from dpkit.run import Run

    run = Run(load_recipe(recipe_path))
    setup, timing = run.objective.setup, {}

    def timed_setup(r):
        t = time.perf_counter()
        setup(r)
        timing["reference_s"] = time.perf_counter() - t

    run.objective.setup = timed_setup
    run.setup()
    run.train()
    if run.env.rank != 0:
        return None
    lines = [json.loads(x) for x in (run.out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in lines if "loss" in m]
    return {"times": [m["time"] for m in steps], "pairs": [m["target_tokens"] for m in steps],
            "loss1": steps[0]["loss"], "reference_s": timing["reference_s"]}


def run_trl(recipe_path: str) -> dict | None:
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # CPU + DeepSpeed: see CPU_DEEPSPEED.md
    import datasets
    import torch
    from accelerate import PartialState

    state = PartialState(backend="nccl" if torch.cuda.is_available() else "gloo")
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from dpkit.batch import batch_arithmetic
    from dpkit.model import load_model_config, load_tokenizer
    from dpkit.recipe import load_recipe
    from dpkit.zero import resolve_ds_config

    r = load_recipe(recipe_path)
    world = state.num_processes
    b = batch_arithmetic(r, world)
    ds_config = resolve_ds_config(r, world, load_model_config(r.model).hidden_size, on_cpu=True)
    tokenizer = load_tokenizer(r.model)
    model = AutoModelForCausalLM.from_pretrained(r.model.name_or_path, dtype=torch.float32)
    data = datasets.load_dataset("json", data_files=r.data.sources[0].path, split="train")
    # TRL reads a string prompt as the standard layout: give it the conversational one with an
    # explicit prompt (the same turns dpkit takes from chosen[:-1]).
    data = data.map(lambda row: {"prompt": row["chosen"][:-1], "chosen": row["chosen"][-1:],
                                 "rejected": row["rejected"][-1:]})
    times = []

    class Clock(TrainerCallback):
        def on_step_end(self, a, s, c, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.time())

    args = DPOConfig(
        output_dir=str(Path(r.output.dir).parent / "trl-run"), beta=0.1, loss_type=["sigmoid"],
        precompute_ref_log_probs=True, max_length=r.data.max_seq_len,
        per_device_train_batch_size=b.micro_batch_size,
        gradient_accumulation_steps=b.grad_accum, num_train_epochs=1, learning_rate=1e-5,
        lr_scheduler_type="constant", max_grad_norm=r.train.max_grad_norm, logging_steps=1,
        save_strategy="no", report_to=[], seed=0, deepspeed=ds_config, bf16=False,
        accelerator_config={"use_configured_state": True}, dataloader_drop_last=False)
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                         callbacks=[Clock()])
    t = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t
    if state.process_index != 0:
        return None
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"times": times, "pairs": [b.global_batch_size] * len(times),
            "loss1": losses[0] if losses else None,
            "total_s": total}


def worker(args) -> None:
    result = (run_dpkit if args.worker == "dpkit" else run_trl)(args.recipe)
    if result is not None:
        Path(args.result).write_text(json.dumps(result))


# ================================================================================= the driver
def pairs_per_s(result: dict, warmup: int) -> float:
    """Full steps after the warm-up (an epoch's last step may be partial: left out)."""
    return H.per_second(result["times"], result["pairs"], warmup)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", choices=["dpkit", "trl"])
    p.add_argument("--recipe")
    p.add_argument("--result")
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--stage", type=int, default=2)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--micro", type=int, default=2)
    p.add_argument("--max-seq-len", type=int, default=384)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out")
    args = p.parse_args()
    if args.worker:
        return worker(args)
    import yaml

    H.require_trl("DPOTrainer")
    from dpkit.model import build_model, load_tokenizer
    from dpkit.recipe import ModelSection

    work = Path(args.out or tempfile.mkdtemp(prefix="dpkit-bench-dpo-"))
    work.mkdir(parents=True, exist_ok=True)
    section = ModelSection(config=MODEL, tokenizer="dpkit:tokenizers/tiny-bpe", dtype="float32")
    build_model(section, 0, 0).save_pretrained(work / "init")  # the same weights for both
    load_tokenizer(section).save_pretrained(work / "init")
    recipe_path = work / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe(work, args), sort_keys=False))
    runs: dict[str, list[dict]] = {"dpkit": [], "trl": []}
    for rep in range(args.reps):
        for which in runs:  # interleaved, so drifting machine load hits both alike
            res = H.launch(__file__, which, recipe_path, work / f"{which}-{rep}.json",
                           work / f"{which}-{rep}.log", timeout=1800)
            runs[which].append(res)
            print(f"rep {rep} {which}: {pairs_per_s(res, args.warmup):.2f} pairs/s, "
                  f"step-1 loss {res['loss1']}", flush=True)
    speed = {k: statistics.median(pairs_per_s(r, args.warmup) for r in v)
             for k, v in runs.items()}
    out = {"pairs_per_s": speed, "ratio": speed["dpkit"] / speed["trl"],
           "dpkit_reference_s": statistics.median(r["reference_s"] for r in runs["dpkit"]),
           "stage": args.stage, "global_batch": args.global_batch, "micro": args.micro,
           "max_seq_len": args.max_seq_len, "reps": args.reps, "load_avg": os.getloadavg(),
           "versions": H.versions()}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
