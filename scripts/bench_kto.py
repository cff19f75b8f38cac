"""KTO benchmark: dpkit's KTO against TRL's KTOTrainer on the same unpaired rows, model, DeepSpeed
config (dpkit's resolved ds_config, ZeRO stage of --stage) and 2 CPU ranks, in one invocation.
Prints examples (rows) per second of each and the ratio; medians of --reps repetitions, warm-up
steps excluded.

    python scripts/bench_kto.py                      # needs `trl` importable (a test-time tool)
    PYTHONPATH=/path/to/trl-target python scripts/bench_kto.py --reps 3

Both sides train full fine-tuning KTO (beta 0.1, weights 1/1) with the reference log-probs
computed in a first pass before step 1 (dpkit: `kto.reference: precomputed`, which also scores
the mismatched row of every row in every planned step; TRL: `precompute_ref_log_probs=True`,
which scores each row's KL row once), so a step is, on both, a forward without gradient of the
mismatched (KL) rows and one forward and backward of the rows. dpkit lays each micro-batch's rows
end to end (`data.packing: true`: per-row attention, no padding); TRL pads them to the longest
(its collator's only mode). dpkit's reference pass is timed apart and printed. Examples per
second = rows of the timed steps / their wall time (from the end of the warm-up step to the end
of the last full step; an epoch's partial last step is left out), on rank 0 after a GPU sync
where there is one.

Same rows: the 119 bundled unpaired rows (dpkit/resources/data/, conversational), rendered with
the tiny tokenizer's chat template by each library itself; same global batch, micro batch,
learning rate, seed and initial weights (a small Llama built once from an inline config and
saved, loaded by both). The row order differs (dpkit shuffles with its seed; TRL's KTO needs its
sequential sampler) and so do the KL pairings (dpkit: a derangement of the global batch; TRL: a
rotation within each device's batch) — neither changes the work per step.
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
ROWS = "dpkit:data/self_instruct_seed.unpaired.jsonl"


def recipe(work: Path, args) -> dict:
    return {
        "objective": "kto", "kto": {"beta": 0.1, "reference": "precomputed"},
        "model": {"name_or_path": str(work / "init"), "tokenizer": "dpkit:tokenizers/tiny-bpe",
                  "dtype": "float32"},
        "data": {"sources": [{"path": ROWS, "format": "unpaired"}],
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
    return {"times": [m["time"] for m in steps], "rows": [m["target_tokens"] for m in steps],
            "loss1": steps[0]["loss"], "reference_s": timing["reference_s"]}


def run_trl(recipe_path: str) -> dict | None:
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # CPU + DeepSpeed: see CPU_DEEPSPEED.md
    import datasets
    import torch
    from accelerate import PartialState

    state = PartialState(backend="nccl" if torch.cuda.is_available() else "gloo")
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import KTOConfig, KTOTrainer

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
    # The conversational unpaired layout as it is (prompt and completion message lists, a label).
    data = datasets.load_dataset("json", data_files=r.data.sources[0].path, split="train")
    times = []

    class Clock(TrainerCallback):
        def on_step_end(self, a, s, c, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.time())

    args = KTOConfig(
        output_dir=str(Path(r.output.dir).parent / "trl-run"), beta=0.1, desirable_weight=1.0,
        undesirable_weight=1.0, precompute_ref_log_probs=True, max_length=r.data.max_seq_len,
        per_device_train_batch_size=b.micro_batch_size,
        gradient_accumulation_steps=b.grad_accum, num_train_epochs=1, learning_rate=1e-5,
        lr_scheduler_type="constant", max_grad_norm=r.train.max_grad_norm, logging_steps=1,
        save_strategy="no", report_to=[], seed=0, deepspeed=ds_config, bf16=False,
        accelerator_config={"use_configured_state": True}, dataloader_drop_last=False)
    trainer = KTOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                         callbacks=[Clock()])
    t = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t
    if state.process_index != 0:
        return None
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"times": times, "rows": [b.global_batch_size] * len(times),
            "loss1": losses[0] if losses else None,
            "total_s": total}


def worker(args) -> None:
    result = (run_dpkit if args.worker == "dpkit" else run_trl)(args.recipe)
    if result is not None:
        Path(args.result).write_text(json.dumps(result))


# ================================================================================= the driver
def rows_per_s(result: dict, warmup: int) -> float:
    """Full steps after the warm-up (an epoch's last step may be partial: left out)."""
    return H.per_second(result["times"], result["rows"], warmup)


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

    H.require_trl("KTOTrainer")
    from dpkit.model import build_model, load_tokenizer
    from dpkit.recipe import ModelSection

    work = Path(args.out or tempfile.mkdtemp(prefix="dpkit-bench-kto-"))
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
            print(f"rep {rep} {which}: {rows_per_s(res, args.warmup):.2f} examples/s, "
                  f"step-1 loss {res['loss1']}", flush=True)
    speed = {k: statistics.median(rows_per_s(r, args.warmup) for r in v)
             for k, v in runs.items()}
    # Each repetition runs the two back to back, so its ratio sees the same machine load: on a
    # shared machine whose load drifts, the median of these is steadier than the medians' ratio.
    pairs = [rows_per_s(a, args.warmup) / rows_per_s(b, args.warmup)
             for a, b in zip(runs["dpkit"], runs["trl"])]
    out = {"examples_per_s": speed, "ratio": speed["dpkit"] / speed["trl"],
           "ratio_per_rep": pairs, "ratio_median_per_rep": statistics.median(pairs),
           "dpkit_reference_s": statistics.median(r["reference_s"] for r in runs["dpkit"]),
           "stage": args.stage, "global_batch": args.global_batch, "micro": args.micro,
           "max_seq_len": args.max_seq_len, "reps": args.reps, "load_avg": os.getloadavg(),
           "versions": H.versions()}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
