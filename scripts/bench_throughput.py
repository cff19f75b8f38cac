"""Throughput benchmark: dpkit (packed) against transformers' Trainer and a bare DeepSpeed loop,
on the same model, rows, global batches, sequence limit, ZeRO stage and steps. Prints useful
tokens/s (non-padding input tokens of the rows trained on, counted from the rows themselves, the
same way for every variant) and the ratios; medians of --reps repetitions, warm-up steps excluded.

    python scripts/bench_throughput.py                  # a b c d × 3 repetitions, 2 CPU ranks
    python scripts/bench_throughput.py --variants a,e   # what per-row attention gains
    python scripts/bench_throughput.py --eval-curve     # packed vs unpacked eval loss per token

Variants (each one torchrun launch of 2 ranks per repetition, interleaved a b c d a b c d …):
  a  dpkit: `dpkit.train.run` with data.packing=true (the real loop: metrics, logging, progress bar)
  b  transformers Trainer + the same DeepSpeed config (dpkit's resolved ds_config), padding collator
     DataCollatorForSeq2Seq(padding=True, label_pad_token_id=-100): what SFT scripts pass to
     Trainer for causal LM rows with labels. (Trainer's automatic default, DataCollatorWithPadding,
     pads input_ids/attention_mask only and fails on rows whose `labels` differ in length.)
  c  the same Trainer with the padding-free DataCollatorWithFlattening (each micro-batch's rows
     flattened into one sequence with position ids restarting per row)
  d  a bare loop: deepspeed.initialize + dpkit's own packed micro-batches (collated before timing),
     dpkit.objectives.sft.loss_sum, engine.backward/step — no metrics, logging or per-step collectives
  e  (not run by default) dpkit with transformers' own packed sdpa (a dense block-diagonal mask
     over the whole sequence) instead of its per-row attention (dpkit/attention.py): what
     per-row attention gains

Same rows: dpkit packs the shuffled rows into sequences of max_seq_len and the global batch counts
sequences; the schedule of every step (which rows on which rank in which micro-batch) is derived
from dpkit's own functions (pack, step_micro_batches) and replayed by b, c and d: b pads exactly the
rows dpkit packed into one micro-batch, c flattens them, d uses dpkit's collated tensors. The
Trainer gets this schedule as a batch sampler (accelerate deals the batches round-robin to the
ranks); its loop, collators, loss and optimizer are untouched. The step-1 losses of all variants
are printed: equal rows and weights give equal losses.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from dpkit.shipped import TOKENIZERS, DATA as SHIPPED_DATA

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# A small Llama (GQA, SwiGLU, RoPE) sized for the bundled tokenizer (vocab 2048): 4.2M parameters,
# ~1 s per step of 4 packed sequences of 1024 tokens on 2 CPU ranks.
MODEL = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 688,
         "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
         "vocab_size": 2048, "max_position_embeddings": 2048}
# The bundled Self-Instruct seed tasks in both shipped formats: 350 real instruction rows, 69.5k
# tokens (median 160, longest truncated to max_seq_len).
SOURCES = [(SHIPPED_DATA / "self_instruct_seed.alpaca.jsonl", "alpaca"),
           (SHIPPED_DATA / "self_instruct_seed.messages.jsonl", "messages")]
TOKENIZER = TOKENIZERS / "tiny-bpe"
VARIANTS = {"a": "dpkit (packed)", "b": "Trainer + DataCollatorForSeq2Seq (padding)",
            "c": "Trainer + DataCollatorWithFlattening", "d": "bare deepspeed loop, dpkit batches",
            "e": "dpkit (packed), sdpa under a dense block mask"}


def base_recipe(out: Path, args, packing: bool = True) -> dict:
    return {
        "model": {"config": dict(MODEL), "tokenizer": str(TOKENIZER), "dtype": "float32"},
        "data": {"sources": [{"path": str(p), "format": f} for _ in range(args.copies)
                             for p, f in SOURCES],
                 "max_seq_len": args.max_seq_len, "packing": packing},
        "train": {"global_batch_size": args.global_batch, "micro_batch_size": args.micro_batch,
                  "max_steps": args.steps, "lr": args.lr, "lr_schedule": "constant",
                  "seed": args.seed},
        "zero": {"stage": args.stage},
        "output": {"dir": str(out), "save_model": False, "overwrite": True, "log_steps": 1},
    }


# ================================================================================ the schedule
def packed_groups(rows, max_len: int, seed: int) -> list[list[int]]:
    """Which rows dpkit's packer puts into each sequence, in order: pack stand-in rows of the same
    lengths whose tokens are their own row index (pack only looks at lengths and the seed)."""
    from dpkit.data import Example
    from dpkit.data.packing import pack

    marked = [Example([i] * len(r.input_ids), [i] * len(r.labels)) for i, r in enumerate(rows)]
    groups = []
    for seq in pack(marked, max_len, seed):
        ids = seq.input_ids
        groups.append([t for k, t in enumerate(ids) if k == 0 or ids[k - 1] != t])
    return groups


def plan(recipe, world: int) -> dict:
    """The rows (tokenized by dpkit), dpkit's packed sequences and the schedule:
    schedule[step][rank][micro] = row indices, exactly the rows dpkit trains on at that step
    (packed sequences expanded to their rows); seq_schedule the same in packed sequences."""
    from dpkit import data as D
    from dpkit.model import load_tokenizer
    from dpkit.data.packing import pack
    from dpkit.zero import batch_arithmetic

    tokenizer = load_tokenizer(recipe.model)
    rows, _, _ = D.load_datasets(recipe.data, tokenizer, recipe.train.seed)
    seqs = pack(rows, recipe.data.max_seq_len, recipe.train.seed)
    groups = packed_groups(rows, recipe.data.max_seq_len, recipe.train.seed)
    assert [sum(len(rows[i].input_ids) for i in g) for g in groups] == \
        [len(s.input_ids) for s in seqs], "packed_groups no longer mirrors dpkit.packing.pack"
    batch = batch_arithmetic(recipe, world)
    per_epoch = D.steps_per_epoch(len(seqs), batch.global_batch_size)
    schedule, seq_schedule = [], []
    for step in range(recipe.train.max_steps):
        epoch, s = divmod(step, per_epoch)
        by_rank = [D.step_micro_batches(len(seqs), recipe.train.seed, epoch, s, r, world,
                                        batch.micro_batch_size, batch.grad_accum)
                   for r in range(world)]
        if any(not idx for mbs in by_rank for idx in mbs):
            raise SystemExit(f"step {step + 1} ends an epoch with a short global batch; the "
                             f"Trainer can't replay it: use --steps <= {per_epoch} or a multiple")
        seq_schedule.append(by_rank)
        schedule.append([[[i for q in idx for i in groups[q]] for idx in mbs] for mbs in by_rank])
    return {"rows": rows, "seqs": seqs, "schedule": schedule, "seq_schedule": seq_schedule,
            "batch": batch, "world": world}


def save_plan(recipe_path: Path, world: int) -> Path:
    """Computed once by the driver (tokenizing is slow), read by every rank of every launch."""
    from dpkit.recipe import load_recipe

    out = recipe_path.with_suffix(".plan.pkl")
    out.write_bytes(pickle.dumps(plan(load_recipe(str(recipe_path)), world)))
    return out


def load_plan(args, world: int) -> dict:
    p = pickle.loads(Path(args.plan).read_bytes())
    assert p["world"] == world, f"plan made for {p['world']} ranks, running {world}"
    return p


def useful_tokens(rows, schedule) -> list[int]:
    """Non-padding input tokens of the rows of each step, all ranks."""
    return [sum(len(rows[i].input_ids) for mbs in step for idx in mbs for i in idx)
            for step in schedule]


# ================================================================================= the workers
def use_dense_mask() -> None:
    """Packed sdpa under transformers' dense block mask instead of dpkit's per-row attention (the
    baseline per-row attention is measured against). dpkit.model looks `implementation_for` up
    when it builds the model, so replacing it here, before the build, is enough."""
    import dpkit.attention

    dpkit.attention.implementation_for = lambda requested, *rest: requested


def worker(args) -> None:
    from dpkit.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    if args.worker == "e":  # dpkit as it was before per-row attention: sdpa under a dense mask
        use_dense_mask()
    result = {"a": run_dpkit, "b": run_trainer, "c": run_trainer, "d": run_bare,
              "e": run_dpkit, "curve": run_curve}[args.worker](recipe, args)
    if int(os.environ.get("RANK", "0")) == 0 and result is not None:
        Path(args.result).write_text(json.dumps(result) + "\n")


def run_dpkit(recipe, args):
    from dpkit.run import run

    run(recipe)
    if int(os.environ["RANK"]) != 0:
        return None
    p = load_plan(args, int(os.environ["WORLD_SIZE"]))
    rows, schedule = p["rows"], p["schedule"]
    lines = [json.loads(x) for x in (Path(recipe.output.dir) / "metrics.jsonl").read_text()
             .splitlines() if x.strip()]
    steps = [m for m in lines if "loss" in m]
    tokens = useful_tokens(rows, schedule)
    logged = [m["tokens"] for m in steps]
    assert logged == tokens, f"dpkit trained other rows than planned: {logged} vs {tokens}"
    return {"times": [m["time"] for m in steps], "tokens": tokens,
            "losses": [m["loss"] for m in steps]}


def run_bare(recipe, args):
    """deepspeed.initialize + dpkit's micro-batches, nothing else in the loop."""
    import deepspeed
    import torch

    from dpkit import data as D
    from dpkit import distributed
    from dpkit.attention import NAME as ROWS_ATTENTION
    from dpkit.model import build_model, load_model_config, load_tokenizer
    from dpkit.objectives.sft import loss_sum
    from dpkit.step import to_device
    from dpkit.engine import build_optimizer, lr_lambda
    from dpkit.zero import resolve_ds_config

    env = distributed.setup(recipe.train.collective_timeout_s)
    p = load_plan(args, env.world_size)
    rows, seqs, schedule, seq_schedule, batch = (p["rows"], p["seqs"], p["schedule"],
                                                 p["seq_schedule"], p["batch"])
    tokenizer = load_tokenizer(recipe.model)
    hidden = load_model_config(recipe.model).hidden_size
    ds_config = resolve_ds_config(recipe, env.world_size, hidden, on_cpu=env.backend == "gloo")
    model = build_model(recipe.model, recipe.train.seed, recipe.zero.stage, ds_config,
                        packed_len=recipe.data.max_seq_len)  # the attention dpkit trains with
    optimizer = build_optimizer(model, recipe)
    steps = recipe.train.max_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(recipe, steps))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           lr_scheduler=scheduler, config=ds_config)
    pad = tokenizer.pad_token_id
    # collated as dpkit.train collates: end to end when the model attends per row
    flat = engine.module.config._attn_implementation == ROWS_ATTENTION
    work = []  # (this rank's collated micro-batches, loss scale) per step, built before timing
    for by_rank in seq_schedule:
        collated = [[to_device(D.collate([seqs[i] for i in idx], pad, flatten=flat), env.device)
                     for idx in mbs] for mbs in by_rank]
        targets = sum(D.target_tokens(b) for mbs in collated for b in mbs)
        work.append((collated[env.rank], batch.grad_accum * env.world_size / targets))
    times, losses = [], []
    for micro_batches, scale in work:
        step_loss = 0.0
        for micro in micro_batches:
            loss = loss_sum(engine, micro)
            engine.backward(loss * scale)
            engine.step()
            step_loss = step_loss + loss.detach()
        if env.device.type == "cuda":
            torch.cuda.synchronize(env.device)
        times.append(time.time())
        losses.append(step_loss)
    (total,) = distributed.all_reduce_sum([float(losses[0])], env.device)
    engine.destroy()
    first_targets = sum(D.target_tokens(D.collate([seqs[i] for i in idx], pad))
                        for mbs in seq_schedule[0] for idx in mbs)
    return {"times": times, "tokens": useful_tokens(rows, schedule),
            "losses": [total / first_targets]}


def run_trainer(recipe, args):
    """transformers' Trainer with dpkit's resolved DeepSpeed config, on the planned rows."""
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # CPU + DeepSpeed: see CPU_DEEPSPEED.md
    import torch
    from accelerate import PartialState

    state = PartialState(backend="nccl" if torch.cuda.is_available() else "gloo")
    from torch.utils.data import DataLoader
    from transformers import (DataCollatorForSeq2Seq, DataCollatorWithFlattening, Trainer,
                              TrainerCallback, TrainingArguments)

    from dpkit.model import build_model, load_model_config, load_tokenizer
    from dpkit.zero import resolve_ds_config

    world, rank = state.num_processes, state.process_index
    p = load_plan(args, world)
    rows, schedule, batch = p["rows"], p["schedule"], p["batch"]
    tokenizer = load_tokenizer(recipe.model)
    hidden = load_model_config(recipe.model).hidden_size
    ds_config = resolve_ds_config(recipe, world, hidden, on_cpu=True)
    model = build_model(recipe.model, recipe.train.seed, recipe.zero.stage, ds_config)
    dataset = [{"input_ids": r.input_ids, "attention_mask": [1] * len(r.input_ids),
                "labels": r.labels} for r in rows]
    if args.worker == "b":
        inner = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    else:
        inner = DataCollatorWithFlattening()
    seen = []

    def collator(features):
        seen.append([len(f["input_ids"]) for f in features])
        return inner(features)

    # Micro-batch a of step s for rank r sits at position (s·GA + a)·W + r: accelerate's batch
    # sampler shard deals batches round-robin, so rank r gets exactly its planned micro-batches.
    order = [step[r][a] for step in schedule for a in range(batch.grad_accum)
             for r in range(world)]

    class PlannedTrainer(Trainer):
        def get_train_dataloader(self):
            return self.accelerator.prepare(DataLoader(dataset, batch_sampler=order,
                                                       collate_fn=self.data_collator))

    times = []

    class Clock(TrainerCallback):
        def on_step_end(self, a, s, c, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # the step's kernels are done before it is timed
            times.append(time.time())

    targs = TrainingArguments(
        output_dir=str(Path(recipe.output.dir)), per_device_train_batch_size=batch.micro_batch_size,
        gradient_accumulation_steps=batch.grad_accum, max_steps=recipe.train.max_steps,
        learning_rate=recipe.train.lr, lr_scheduler_type="constant", weight_decay=0.0,
        max_grad_norm=recipe.train.max_grad_norm, adam_beta1=recipe.train.adam_betas[0],
        adam_beta2=recipe.train.adam_betas[1], adam_epsilon=recipe.train.adam_eps,
        bf16=recipe.model.dtype == "bfloat16", logging_steps=1, save_strategy="no", report_to=[],
        seed=recipe.train.seed,
        deepspeed=ds_config, accelerator_config={"use_configured_state": True})
    trainer = PlannedTrainer(model=model, args=targs, train_dataset=dataset,
                             data_collator=collator, callbacks=[Clock()])
    trainer.train()
    mine = [[len(rows[i].input_ids) for i in step[rank][a]] for step in schedule
            for a in range(batch.grad_accum)]
    assert seen[:len(mine)] == mine, "the Trainer did not get the planned micro-batches"
    if rank != 0:
        return None
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"times": times, "tokens": useful_tokens(rows, schedule), "losses": losses,
            "optim": str(targs.optim), "collator": type(inner).__name__}


def run_curve(recipe, args):
    """dpkit packed, then unpacked, on the same rows; eval loss against tokens seen."""
    from dpkit.recipe import load_recipe
    from dpkit.run import run

    out = {}
    for name, path in (("packed", args.recipe), ("unpacked", args.recipe2)):
        r = load_recipe(path)
        run(r)
        if int(os.environ["RANK"]) == 0:
            lines = [json.loads(x) for x in (Path(r.output.dir) / "metrics.jsonl").read_text()
                     .splitlines() if x.strip()]
            out[name] = {"eval": [(m["tokens_seen"], m["eval_loss"]) for m in lines
                                  if "eval_loss" in m],
                         "train": [(m["tokens_seen"], m["loss"], m["samples"]) for m in lines
                                   if "loss" in m],
                         "global_batch": r.train.global_batch_size}
    return out


# ================================================================================== the driver
def rank_env() -> dict[str, str]:
    env = dict(os.environ)
    # the repository first, then what the caller had (a GPU machine's carried wheels)
    path = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1", PYTHONPATH=path)
    import torch

    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
        # DeepSpeed's CPU collectives op, built once for the project (see CPU_DEEPSPEED.md).
        env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
    return env


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine since boot (Linux /proc/stat)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    except OSError:
        return 0, 0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


def wait_quiet(max_wait: float, idle_needed: float = 0.9) -> float:
    """Wait (up to max_wait s) until the machine is at least `idle_needed` idle over 3 s: other
    people's work on a shared 2-core machine otherwise ends up in the timings. Returns the idle
    fraction last seen."""
    deadline = time.time() + max_wait
    while True:
        b0, t0 = cpu_jiffies()
        time.sleep(3)
        b1, t1 = cpu_jiffies()
        idle = 1 - (b1 - b0) / max(t1 - t0, 1)
        if idle >= idle_needed or time.time() > deadline:
            return idle


def launch(worker_args: list[str], log: Path, timeout: int, nproc: int = 2,
           script: Path | None = None) -> float:
    """Run one torchrun job; returns the share of the machine's CPU that OTHER processes used
    while it ran (busy ticks of the machine minus this job's CPU time)."""
    import resource

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(nproc), str(script or Path(__file__).resolve()), *worker_args]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    b0, t0 = cpu_jiffies()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, env=rank_env(), cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                              timeout=timeout)
    b1, t1 = cpu_jiffies()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        tail = log.read_text()[-4000:]
        raise SystemExit(f"launch failed ({proc.returncode}), log {log}:\n{tail}")
    tick = os.sysconf("SC_CLK_TCK")
    ours = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return max(0.0, ((b1 - b0) / tick - ours) / max((t1 - t0) / tick, 1e-9))


def throughput(result: dict, warmup: int) -> float:
    t, tok = result["times"], result["tokens"]
    return sum(tok[warmup:len(t)]) / (t[-1] - t[warmup - 1])


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def bench(args) -> dict:
    work = Path(args.out or tempfile.mkdtemp(prefix="dpkit-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    import yaml

    recipe_path = work / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(base_recipe(work / "run", args), sort_keys=False))
    plan_path = save_plan(recipe_path, 2)
    variants = args.variants.split(",")
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    loads, discarded = [], []
    for rep in range(args.reps):
        for v in variants:
            for attempt in range(1 + args.retries):
                res = work / f"{v}{rep}-{attempt}.json"
                idle = wait_quiet(args.wait_quiet) if args.wait_quiet else None
                t0 = time.time()
                other = launch(["--worker", v, "--recipe", str(recipe_path), "--plan",
                                str(plan_path), "--result", str(res)],
                               work / f"{v}{rep}-{attempt}.log", args.timeout)
                if other <= args.max_other:
                    break
                discarded.append({"variant": v, "rep": rep, "other_cpu_share": other})
                print(f"rep {rep + 1} {v}: other processes used {100 * other:.0f}% of the CPU "
                      f"during the run; discarded, trying again", flush=True)
            r = json.loads(res.read_text())
            r["other_cpu_share"], r["idle_before"] = other, idle
            r["tokens_per_s"] = throughput(r, args.warmup)
            r["step_s"] = (r["times"][-1] - r["times"][args.warmup - 1]) / \
                (len(r["times"]) - args.warmup)
            runs[v].append(r)
            loads.append(load_avg())
            print(f"rep {rep + 1} {v} {VARIANTS[v]:45s} {r['tokens_per_s']:8.0f} useful tok/s "
                  f"{r['step_s']:.3f} s/step  step-1 loss {r['losses'][0]:.6f}  "
                  f"(launch {time.time() - t0:.0f} s, other processes used "
                  f"{100 * other:.0f}% of the CPU)", flush=True)
    med = {v: statistics.median(r["tokens_per_s"] for r in runs[v]) for v in variants}
    step_s = {v: statistics.median(r["step_s"] for r in runs[v]) for v in variants}
    summary = {"median_tokens_per_s": med, "median_step_s": step_s,
               "all_tokens_per_s": {v: [r["tokens_per_s"] for r in runs[v]] for v in variants},
               "step1_loss": {v: runs[v][0]["losses"][0] for v in variants},
               "useful_tokens_per_step": runs[variants[0]][0]["tokens"],
               "other_cpu_share": {v: [r["other_cpu_share"] for r in runs[v]] for v in variants},
               "discarded_runs": discarded,
               "load_averages": loads, "config": vars(args), "model": MODEL,
               "versions": versions(), "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
    if "a" in med:
        summary["ratios"] = {f"a/{v}": med["a"] / med[v] for v in variants if v != "a"}
    print("\nmedian useful tokens/s (warm-up steps excluded):")
    for v in variants:
        print(f"  {v} {VARIANTS[v]:45s} {med[v]:8.0f}  ({step_s[v]:.3f} s/step)  all: "
              + ", ".join(f"{x:.0f}" for x in summary["all_tokens_per_s"][v]))
    for k, x in summary.get("ratios", {}).items():
        print(f"  {k} = {x:.3f}")
    (work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nresults: {work / 'summary.json'}")
    return summary


def eval_curve(args) -> dict:
    """dpkit packed vs unpacked on the same data: eval loss against useful tokens seen."""
    import yaml

    args.copies = 1  # held-out rows must not also be training rows
    work = Path(args.out or tempfile.mkdtemp(prefix="dpkit-curve-"))
    work.mkdir(parents=True, exist_ok=True)
    packed = base_recipe(work / "packed", args, packing=True)
    unpacked = base_recipe(work / "unpacked", args, packing=False)
    for r in (packed, unpacked):
        r["data"]["eval_fraction"] = args.eval_fraction
        r["output"]["eval_steps"] = args.eval_every
        r["train"].pop("max_steps")
        r["train"]["epochs"] = args.epochs
    # The unpacked global batch holds about as many rows (so tokens) as a packed one.
    unpacked["train"]["global_batch_size"] = args.unpacked_global_batch
    unpacked["train"]["micro_batch_size"] = args.unpacked_micro_batch
    p1, p2 = work / "packed.yaml", work / "unpacked.yaml"
    p1.write_text(yaml.safe_dump(packed, sort_keys=False))
    p2.write_text(yaml.safe_dump(unpacked, sort_keys=False))
    res = work / "curve.json"
    launch(["--worker", "curve", "--recipe", str(p1), "--recipe2", str(p2), "--result", str(res)],
           work / "curve.log", args.timeout * 4)
    out = json.loads(res.read_text())
    plot(out, Path(args.png))
    for name, r in out.items():
        print(f"{name} (global batch {r['global_batch']}): samples/step (sequences when packed) "
              f"{statistics.mean(s for _, _, s in r['train']):.1f}, useful tokens/step "
              f"{r['train'][-1][0] / len(r['train']):.0f}")
        print("  tokens_seen eval_loss: " + ", ".join(f"{t}:{l:.4f}" for t, l in r["eval"]))
    print(f"plot: {args.png}; data: {res}")
    return out


def plot(out: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for name, style in (("unpacked", "o-"), ("packed", "s--")):
        pts = out[name]["eval"]
        ax.plot([t for t, _ in pts], [l for _, l in pts], style, ms=3,
                label=f"{name} (global batch {out[name]['global_batch']} "
                f"{'sequences' if name == 'packed' else 'rows'})")
    ax.set_xlabel("useful (non-padding) training tokens seen")
    ax.set_ylabel("eval loss (held-out rows)")
    ax.set_title("dpkit: packed vs unpacked, same data, 2 CPU ranks, ZeRO-2")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)


def versions() -> dict:
    from importlib.metadata import version

    return {p: version(p) for p in ("torch", "deepspeed", "transformers", "accelerate")} | \
        {"python": platform.python_version()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--recipe", help=argparse.SUPPRESS)
    p.add_argument("--recipe2", help=argparse.SUPPRESS)
    p.add_argument("--plan", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--variants", default="a,b,c,d")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=33, help="optimizer steps per run")
    p.add_argument("--copies", type=int, default=2,
                   help="each source this many times (more steps in one epoch; the Trainer "
                   "can't replay dpkit's short last step of an epoch)")
    p.add_argument("--warmup", type=int, default=3, help="first steps left out of the timing")
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument("--global-batch", type=int, default=4, help="packed sequences per step")
    p.add_argument("--micro-batch", type=int, default=2, help="packed sequences per forward")
    p.add_argument("--stage", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--timeout", type=int, default=600, help="per launch, seconds")
    p.add_argument("--wait-quiet", type=float, default=300,
                   help="before each launch wait up to this many seconds for an idle machine "
                   "(0: don't wait)")
    p.add_argument("--max-other", type=float, default=0.10,
                   help="a run during which other processes used more than this share of the "
                   "machine's CPU is discarded and run again (up to --retries times)")
    p.add_argument("--retries", type=int, default=3)
    p.add_argument("--out", help="work directory (default: a new temporary one)")
    p.add_argument("--eval-curve", action="store_true",
                   help="instead: dpkit packed vs unpacked eval loss per useful token")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--eval-fraction", type=float, default=0.1)
    p.add_argument("--eval-every", type=int, default=2)
    p.add_argument("--unpacked-global-batch", type=int, default=20,
                   help="rows per step of the unpacked run (~ the tokens of a packed step)")
    p.add_argument("--unpacked-micro-batch", type=int, default=5)
    p.add_argument("--png", default=str(ROOT / "docs" / "img" / "packing_eval_loss.png"))
    args = p.parse_args()
    if args.worker:
        worker(args)
    elif args.eval_curve:
        eval_curve(args)
    else:
        bench(args)


if __name__ == "__main__":
    main()
