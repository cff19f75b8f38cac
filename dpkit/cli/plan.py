"""`dpkit plan RECIPE_OR_MODEL`: per-GPU memory of every ZeRO stage × offload, how long and how
much each that fits takes, and the fastest (the model is dpkit/plan/: recommend for what fits
and what to choose, time for how long, calibrate for --calibrate, cost for how much and
--scaling). This module only turns flags into Hardware/Cluster and prints."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

from dpkit.errors import RecipeError
from dpkit.plan.recommend import (DTYPE_BYTES, PLAN_FILES, Hardware, _check, plan, recipe_shape,
                                  render, write)
from dpkit.plan.time import DEVICES, LINKS, Cluster, Link
from dpkit.recipe import Recipe, apply_overrides, load_recipe, recipe_from_dict
from dpkit.rundir import files_problem


def parse_size(text: str) -> int:
    """`80GB`, `80G`, `80GiB`, `1TB`, `1.5T` → bytes (GB and GiB both mean 2**30: GPU vendors'
    "80GB" cards hold ~80 GiB)."""
    m = re.fullmatch(r"\s*([-+]?[0-9]*\.?[0-9]+)\s*([kmgt]?)(?:i?b)?\s*", text, re.IGNORECASE)
    if not m:
        raise RecipeError.one(text, "is not a memory size", "write it like 80GB or 1TB")
    size = int(float(m.group(1)) * 1024 ** (" kmgt".index(m.group(2).lower() or " ")))
    if size <= 0:
        raise RecipeError.one(text, "is not a positive memory size", "write it like 80GB or 1TB")
    return size


def register(subparsers) -> None:
    sp = subparsers.add_parser(
        "plan", help="will it fit: memory per GPU for each ZeRO stage and offload",
        description="Per-GPU memory of every ZeRO stage × offload, and the fastest that fits.")
    sp.add_argument("target", nargs="?", default=None,
                    help="a recipe (.yaml), or a hub id, model directory, config.json")
    sp.add_argument("overrides", nargs="*", help="recipe overrides, `section.key=value`")
    sp.add_argument("--gpus-per-node", type=int, default=8)
    sp.add_argument("--nodes", type=int, default=1)
    # `--gpu-memory -80GB` is a (bad) value, not an unknown option: parse_size names it
    sp._negative_number_matcher = re.compile(r"^-\d*\.?\d+\s*[a-zA-Z]*$")
    sp.add_argument("--gpu-memory", type=parse_size, default=None,
                    help="per GPU, e.g. 80GB (default: the --gpu's)")
    sp.add_argument("--cpu-memory", type=parse_size, default=None, help="per node, e.g. 1TB")
    sp.add_argument("--nvme", action="store_true", help="also plan NVMe offload (ZeRO-3)")
    sp.add_argument("--nvme-path", default=None, help="NVMe directory for --write "
                    "(default: the recipe's zero.nvme_path, else /local_nvme)")
    sp.add_argument("--lora-rank", type=int, default=None,
                    help="plan LoRA of this rank (default: the recipe's peft.r, else full)")
    sp.add_argument("--lora-targets", default=None, help="comma-separated module names "
                    "(default: the recipe's, else every linear layer but the output head)")
    sp.add_argument("--lora-dropout", type=float, default=None,
                    help="adapter dropout (default: the recipe's, else 0.05)")
    g = sp.add_argument_group("without a recipe")
    g.add_argument("--seq-len", type=int, default=2048)
    g.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="bfloat16")
    g.add_argument("--global-batch-size", type=int, default=None,
                   help="default: micro batch × world size (no accumulation)")
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--attn", choices=["eager", "sdpa", "flash_attention_2"], default="sdpa")
    sp.add_argument("--find-max-seq-len", action="store_true",
                    help="the longest sequence that fits, with and without each memory saver")
    sp.add_argument("--write", type=Path, default=None, metavar="DIR",
                    help="write the recommended recipe, DeepSpeed config and launch command")
    add_time_arguments(sp)
    sp.set_defaults(func=run_plan)


def add_time_arguments(sp) -> None:
    t = sp.add_argument_group("how long and how much (docs/plan.md)")
    t.add_argument("--gpu", choices=list(DEVICES), default="H100",
                   help="device: dense peak FLOP/s, HBM bandwidth, memory (default H100)")
    t.add_argument("--intra-node", choices=list(LINKS), default=None,
                   help="link between GPUs of a node (default nvlink4; gloo-loopback on cpu-core)")
    t.add_argument("--inter-node", choices=list(LINKS), default=None,
                   help="link between nodes, per NIC (default ib400; eth25 on cpu-core)")
    t.add_argument("--intra-node-gbps", type=float, default=None,
                   help="GB/s per GPU, one way, overriding --intra-node's")
    t.add_argument("--inter-node-gbps", type=float, default=None,
                   help="GB/s per NIC, one way, overriding --inter-node's")
    t.add_argument("--nics-per-node", type=int, default=None, help="default: one per GPU")
    t.add_argument("--pcie", choices=[k for k in LINKS if k.startswith("pcie")], default="pcie5",
                   help="host link for offload traffic")
    t.add_argument("--efficiency", type=float, default=None,
                   help="assumed fraction of peak FLOP/s (default 0.40, or calibrated)")
    t.add_argument("--overlap", type=float, default=None,
                   help="assumed fraction of communication hidden behind compute (default 0.5)")
    t.add_argument("--dataset-tokens", type=int, default=None,
                   help="training tokens per epoch, for the run's length and cost")
    t.add_argument("--price-per-gpu-hour", type=float, default=None, help="for the run's cost")
    t.add_argument("--calibrate", type=Path, default=None, metavar="RUN_DIR",
                   help="fit efficiency, optimizer and overhead to a finished run's metrics")
    t.add_argument("--predict-worlds", default=None, help="with --calibrate and no target: "
                   "world sizes to predict, e.g. 1,2,8 (default: the run's and 2×)")
    t.add_argument("--predict-seq-lens", default=None, help="with --calibrate: e.g. 512,2048")
    t.add_argument("--scaling", default=None, metavar="GPUS",
                   help="predict tokens/s for each stage at these GPU counts, e.g. 1,8,64,512")
    t.add_argument("--scaling-plot", type=Path, default=Path("plan_scaling.png"),
                   help="where --scaling writes its PNG")


def ints(text: str | None, flag: str) -> list[int] | None:
    if text is None:
        return None
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise RecipeError.one(flag, f"{text!r} is not a list of positive integers",
                              "write it like 1,8,64")
    return values


def cluster_from_args(args, base: Cluster | None = None) -> Cluster:
    """The Cluster the flags describe, over `base` (a calibrated one) or the defaults."""
    device = DEVICES[args.gpu]
    c = base or Cluster(device=device)
    cpu = c.device.name == "cpu-core"
    intra = LINKS[args.intra_node] if args.intra_node else (
        c.intra if base else LINKS["gloo-loopback" if cpu else "nvlink4"])
    inter = LINKS[args.inter_node] if args.inter_node else (
        c.inter if base else LINKS["eth25" if cpu else "ib400"])
    if args.intra_node_gbps:
        intra = Link(f"{intra.name} at {args.intra_node_gbps:g} GB/s", args.intra_node_gbps * 1e9,
                     intra.latency)
    if args.inter_node_gbps:
        inter = Link(f"{inter.name} at {args.inter_node_gbps:g} GB/s", args.inter_node_gbps * 1e9,
                     inter.latency)
    for flag, v in (("--efficiency", args.efficiency), ("--overlap", args.overlap)):
        if v is not None and not 0 < v <= 1 and not (flag == "--overlap" and v == 0):
            raise RecipeError.one(flag, f"{v} is not a fraction", "use a number in (0, 1]")
    return replace(c, intra=intra, inter=inter, nics_per_node=args.nics_per_node,
                   pcie=LINKS[args.pcie],
                   efficiency=args.efficiency if args.efficiency else c.efficiency,
                   overlap=c.overlap if args.overlap is None else args.overlap)


def recipe_for_model(target: str, args, world_size: int, overrides: list[str]) -> Recipe:
    """A stand-in recipe for planning a bare model (placeholder data and output)."""
    from dpkit.model import looks_local

    path = Path(target).expanduser()
    if path.is_file():
        if path.name == "config.json":
            model = {"name_or_path": str(path.parent)}
        else:
            model = {"config": json.loads(path.read_text()), "tokenizer": str(path.parent)}
    else:
        model = {"name_or_path": target} if looks_local(target) or "/" in target else None
        if model is None:
            raise RecipeError.one(target, "is neither a recipe, a config.json nor a hub id",
                                  "pass a recipe .yaml, a model directory, a config.json or "
                                  "an org/name hub id")
    model.update(dtype=args.dtype, attn_implementation=args.attn,
                 gradient_checkpointing=args.gradient_checkpointing)
    raw = {"model": model,
           "data": {"sources": [{"path": "YOUR_DATA.jsonl"}], "max_seq_len": args.seq_len},
           "train": {"global_batch_size": args.global_batch_size or world_size},
           "output": {"dir": "runs/planned"}}
    return recipe_from_dict(apply_overrides(raw, overrides + args.overrides))


def run_plan(args) -> int:
    if min(args.gpus_per_node, args.nodes) < 1:
        raise RecipeError.one("--gpus-per-node/--nodes", "must be at least 1")
    if args.write and (problem := files_problem(args.write, PLAN_FILES, "plan", "--write")):
        raise RecipeError(problem)  # before any planning is printed
    base = None
    if args.calibrate is not None:
        from dpkit.plan.calibrate import calibrate, describe

        cal = calibrate(args.calibrate, cluster_from_args(args))
        print(describe(cal) + "\n")
        base = cal.cluster
        if args.target is None:
            return print_predictions(cal, args)
    elif args.target is None:
        raise RecipeError.one("dpkit plan", "needs a recipe or model, or --calibrate RUN_DIR",
                              "e.g. dpkit plan recipe.yaml --gpus-per-node 8 --nodes 2")
    cluster = cluster_from_args(args, base)
    memory = args.gpu_memory or int(cluster.device.memory_gib * 2**30)
    hw = Hardware(args.gpus_per_node * args.nodes, args.gpus_per_node, memory, args.cpu_memory)
    is_recipe = args.target.endswith((".yaml", ".yml"))
    extra = [f"zero.nvme_path={args.nvme_path}"] if args.nvme_path else []
    recipe = (load_recipe(args.target, extra + args.overrides) if is_recipe
              else recipe_for_model(args.target, args, hw.world_size, extra))
    free = not is_recipe and args.global_batch_size is None
    raw = recipe.model_dump(mode="json")
    peft = {**(raw["peft"] or {}), **{k: v for k, v in (
        ("r", args.lora_rank), ("dropout", args.lora_dropout),
        ("target_modules", args.lora_targets and args.lora_targets.split(","))) if v is not None}}
    if peft != (raw["peft"] or {}):  # the --lora flags become the recipe's peft section
        recipe = recipe_from_dict({**raw, "peft": peft if peft.get("r", 1) else None})
    try:
        shape = recipe_shape(recipe)
    except OSError as e:  # a hub id whose config is neither shipped nor reachable
        raise RecipeError.one(args.target, f"cannot read the model config offline ({e})",
                              "pass a local directory or config.json") from None
    if args.find_max_seq_len:
        from dpkit.plan.long import render_max_seq_len

        print(render_max_seq_len(recipe, hw, shape))
        return 0
    p = plan(recipe, hw, bool(args.nvme), shape, free, cluster)
    from dpkit.plan.cost import run_length

    length = run_length(recipe, args.dataset_tokens)
    print(render(p, free, length, args.price_per_gpu_hour))
    if args.scaling and p.recommended is not None:
        print_scaling(p.recommended, p, args)
    if is_recipe:
        problems = _check(recipe, hw, shape)
        print("\nrecipe as written: " + ("\n  ".join(map(str, problems)) or "fits"))
    for path in write(p, args.write, free) if args.write else []:
        print(f"wrote {path}")
    return 0


def print_scaling(o, p, args) -> None:
    from dpkit.plan.cost import scaling, scaling_lines, scaling_plot
    from dpkit.plan.recommend import objective_load
    from dpkit.plan.time import Job

    hw, r = p.hw, p.recipe
    job = Job(p.shape, o.stage, "none", "none", hw.world_size, hw.gpus_per_node,
              o.batch.micro_batch_size, o.batch.grad_accum, r.data.max_seq_len,
              DTYPE_BYTES[r.model.dtype], o.breakdown.setup.knobs.reduce_bucket_size,
              **objective_load(r))
    table = scaling(job, p.cluster, ints(args.scaling, "--scaling"), [0, 1, 2, 3],
                    o.batch.global_batch_size)
    print("\nscaling (no offload; memory not checked at other sizes): global batch "
          f"{o.batch.global_batch_size} kept where it splits, else micro {o.micro_batch} per GPU")
    print("\n".join(scaling_lines(table)))
    path = scaling_plot(table, args.scaling_plot, f"{r.model.name_or_path or 'model'}: "
                        f"{p.cluster.device.name}, {hw.gpus_per_node} per node, "
                        f"{p.cluster.inter.name} across nodes")
    print(f"wrote {path}")


def print_predictions(cal, args) -> int:
    """Without a target: the calibrated run's recipe at other world sizes, stages, lengths."""
    from dataclasses import replace as rep

    from dpkit.plan.time import step_time, with_world

    job = cal.job
    worlds = ints(args.predict_worlds, "--predict-worlds") or sorted({job.world_size,
                                                                      2 * job.world_size})
    seqs = ints(args.predict_seq_lens, "--predict-seq-lens") or [job.seq_len]
    gbs = cal.global_batch
    print(f"{'stage':<6}{'world':>6}{'seq':>7}{'micro×acc':>10}{'step s':>9}{'tokens/s':>11}")
    for stage in (0, 1, 2, 3):
        for seq in seqs:
            for w in worlds:
                j = with_world(rep(job, stage=stage, seq_len=seq, gpus_per_node=max(
                    w, job.gpus_per_node) if args.nodes == 1 else args.gpus_per_node), w, gbs)
                st = step_time(j, cal.cluster)
                print(f"{stage:<6}{w:>6}{seq:>7}{f'{j.micro_batch}×{j.grad_accum}':>10}"
                      f"{st.step_s:>9.3f}{st.tokens_per_s:>11,.0f}")
    return 0
