"""GRPO benchmark: dpkit's GRPO (fast and reproducible rollouts) against TRL's GRPOTrainer on the
same prompts, model, group size G, completion length, batch and DeepSpeed config (dpkit's
resolved ds_config, ZeRO stage of --stage, default 3) on 2 CPU ranks, in one invocation. Prints
optimizer steps per second of each, medians of --reps interleaved repetitions (warm-up steps
excluded), and the ratios.

    PYTHONPATH=$PWD:/path/to/trl-target python scripts/bench_grpo.py --reps 2

Both sides: the bundled self-instruct seed's instructions (with their input) as prompts, one user
turn of the tiny tokenizer's chat template, those of ≤ 128 tokens (15–128: varied lengths, as
real prompt sets have), the shared tiny Llama (scripts/trl_harness.py),
G completions per prompt sampled at temperature 1 (top-p 1, no top-k) up to
--completion-len tokens, the `char_share` reward (dpkit's shipped function, given to TRL as its
reward function; against the seed's reference output), `dapo` loss, β 0 (no reference model), μ 1, group-scaled advantages, one
rollout per optimizer step (TRL: steps_per_generation = gradient accumulation), parameters
gathered once per rollout under ZeRO-3 (TRL: ds3_gather_for_generation). A randomly initialised
model rarely samples eos: nearly every completion runs to the limit on both sides, so both
generate the same number of tokens.

What differs is the method: TRL generates a rank's prompts in one left-padded batch and trains
on completions padded to the longest; dpkit `rollout: fast` generates the same padded batch and
lays each micro-batch's prompt + completion sequences end to end for the forward and backward
(no padding, per-row attention); `rollout: reproducible` generates each prompt's G samples as
their own batch (a rank's prompts one after another) and trains on padded rows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trl_harness as H  # noqa: E402

SEED = "dpkit:data/self_instruct_seed.alpaca.jsonl"
MAX_PROMPT = 128  # chat-rendered prompt tokens kept (TRL 1.16 has no prompt cut): rows above out
CONFIGS = ("trl", "fast", "reproducible")


def write_prompts(path: Path) -> int:
    """The bundled self-instruct seed as prompt rows (instruction and input; `answer` the
    reference output), those of at most MAX_PROMPT tokens as rendered: prompts of varied length
    (15–128 tokens), as real prompt sets have."""
    from dpkit.model import load_tokenizer
    from dpkit.recipe import ModelSection
    from dpkit.shipped import resolve

    tok = load_tokenizer(ModelSection(config=H.MODEL, tokenizer=H.TOKENIZER))
    rows = []
    for line in Path(resolve(SEED)).read_text().splitlines():
        r = json.loads(line)
        prompt = r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "")
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True,
                                      add_generation_prompt=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        if len(ids) <= MAX_PROMPT:
            rows.append({"prompt": prompt, "answer": r["output"]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def recipe(work: Path, args, rollout: str) -> dict:
    return {
        "objective": "grpo",
        "grpo": {"group_size": args.group, "max_completion_len": args.completion_len,
                 "loss_type": "dapo", "rollout": rollout, "log_completions": 0,
                 "rewards": [{"function": "char_share", "column": "answer"}]},
        "model": {"name_or_path": str(work / "init"), "tokenizer": H.TOKENIZER,
                  "dtype": "float32"},
        "data": {"sources": [{"path": str(work / "prompts.jsonl"), "format": "prompts"}],
                 "max_seq_len": MAX_PROMPT + args.completion_len},
        "train": {"global_batch_size": args.global_batch, "micro_batch_size": args.micro,
                  "max_steps": args.steps, "lr": 1e-5, "lr_schedule": "constant", "seed": 0},
        "zero": {"stage": args.stage},
        "eval": {"num_prompts": 0},
        "output": {"dir": str(work / f"dpkit-{rollout}"), "overwrite": True,
                   "save_model": False},
    }


# ================================================================================ the workers
def run_trl(recipe_path: str) -> dict | None:
    import datasets
    from trl import GRPOConfig, GRPOTrainer

    from dpkit.objectives.grpo_rewards import char_share
    from dpkit.shipped import resolve

    side = H.trl_side(recipe_path)
    r, b, g = side.recipe, side.batch, side.recipe.grpo
    # TRL counts completions where dpkit counts prompts: the same global batch of G × prompts
    completions = b.micro_batch_size * g.group_size
    ds = dict(side.ds_config, train_micro_batch_size_per_gpu=completions,
              train_batch_size=b.global_batch_size * g.group_size)
    side.ds_config = ds
    data = datasets.load_dataset("json", data_files=str(resolve(r.data.sources[0].path)),
                                 split="train")
    # a string prompt is rendered by dpkit as one user turn of the chat template: the same here
    data = data.map(lambda row: {"prompt": [{"role": "user", "content": row["prompt"]}]})

    def share(completions, answer, **kw):
        return char_share([c[-1]["content"] for c in completions], answer=answer)

    args = GRPOConfig(
        **{**side.common_args(), "per_device_train_batch_size": completions},
        num_generations=g.group_size, max_completion_length=g.max_completion_len,
        temperature=1.0, top_p=1.0, top_k=0, loss_type="dapo", beta=0.0, num_iterations=1,
        scale_rewards="group", epsilon=0.2, max_steps=r.train.max_steps,
        ds3_gather_for_generation=True, log_completions=False, disable_dropout=True)
    trainer = GRPOTrainer(model=side.model, reward_funcs=[share], args=args,
                          train_dataset=data, processing_class=side.tokenizer,
                          callbacks=[side.clock()])
    trainer.train()
    if side.state.process_index != 0:
        return None
    lengths = [h.get("completions/mean_length") for h in trainer.state.log_history]
    return {"times": side.times, "counts": [1] * len(side.times),
            "mean_length": statistics.mean(x for x in lengths if x is not None)}


def run_dpkit(recipe_path: str) -> dict | None:
    from dpkit.recipe import load_recipe

    res = H.run_dpkit(recipe_path, count_key="loss")
    if res is None:
        return None
    out = Path(load_recipe(recipe_path).output.dir)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    lengths = [m["completions/mean_length"] for m in lines if "completions/mean_length" in m]
    return {**res, "counts": [1] * len(res["times"]), "mean_length": statistics.mean(lengths)}


def worker(args) -> None:
    result = (run_trl if args.worker == "trl" else run_dpkit)(args.recipe)
    if result is not None:
        Path(args.result).write_text(json.dumps(result))


# ================================================================================= the driver
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", choices=["dpkit", "trl"])
    p.add_argument("--recipe")
    p.add_argument("--result")
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--stage", type=int, default=3)
    p.add_argument("--global-batch", type=int, default=4, help="prompts per optimizer step")
    p.add_argument("--micro", type=int, default=1, help="prompts per micro-batch")
    p.add_argument("--group", type=int, default=8, help="G, completions per prompt")
    p.add_argument("--completion-len", type=int, default=32)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out")
    args = p.parse_args()
    if args.worker:
        return worker(args)
    import yaml

    H.require_trl("GRPOTrainer")
    work = Path(args.out or tempfile.mkdtemp(prefix="dpkit-bench-grpo-"))
    work.mkdir(parents=True, exist_ok=True)
    H.save_init(work)
    print(f"{write_prompts(work / 'prompts.jsonl')} prompts of ≤ {MAX_PROMPT} tokens", flush=True)
    paths = {}
    for rollout in ("fast", "reproducible"):
        paths[rollout] = work / f"recipe-{rollout}.yaml"
        paths[rollout].write_text(yaml.safe_dump(recipe(work, args, rollout), sort_keys=False))
    paths["trl"] = paths["fast"]  # TRL reads the shared settings from it
    runs: dict[str, list[dict]] = {k: [] for k in CONFIGS}
    loads = [os.getloadavg()[0]]
    for rep in range(args.reps):
        for which in CONFIGS:  # interleaved, so drifting machine load hits all alike
            res = H.launch(__file__, "trl" if which == "trl" else "dpkit", paths[which],
                           work / f"{which}-{rep}.json", work / f"{which}-{rep}.log",
                           timeout=1800)
            runs[which].append(res)
            loads.append(os.getloadavg()[0])
            print(f"rep {rep} {which}: {H.per_second(res['times'], res['counts'], args.warmup, False):.3f} "
                  f"steps/s, mean completion length {res['mean_length']:.1f}, "
                  f"load {loads[-1]:.2f}", flush=True)
    speed = {k: statistics.median(H.per_second(r["times"], r["counts"], args.warmup, False)
                                  for r in v) for k, v in runs.items()}
    out = {"steps_per_s": speed, "fast_over_trl": speed["fast"] / speed["trl"],
           "reproducible_over_trl": speed["reproducible"] / speed["trl"],
           "reproducible_over_fast": speed["reproducible"] / speed["fast"],
           "stage": args.stage, "global_batch_prompts": args.global_batch, "micro": args.micro,
           "group": args.group, "completion_len": args.completion_len, "steps": args.steps,
           "reps": args.reps, "load_1min": loads, "versions": H.versions()}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
