"""`dpkit plan RECIPE_OR_MODEL`: per-GPU memory of every ZeRO stage × offload, and the fastest
option that fits (the model is dpkit/plan/)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from dpkit.errors import RecipeError
from dpkit.plan.recommend import (DTYPE_BYTES, PLAN_FILES, Hardware, _check, plan, recipe_shape,
                                  render, write)
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
    sp.add_argument("target", help="a recipe (.yaml), or a hub id, model directory, config.json")
    sp.add_argument("overrides", nargs="*", help="recipe overrides, `section.key=value`")
    sp.add_argument("--gpus-per-node", type=int, default=8)
    sp.add_argument("--nodes", type=int, default=1)
    # `--gpu-memory -80GB` is a (bad) value, not an unknown option: parse_size names it
    sp._negative_number_matcher = re.compile(r"^-\d*\.?\d+\s*[a-zA-Z]*$")
    sp.add_argument("--gpu-memory", type=parse_size, default="80GB", help="per GPU, e.g. 80GB")
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
    sp.add_argument("--write", type=Path, default=None, metavar="DIR",
                    help="write the recommended recipe, DeepSpeed config and launch command")
    sp.set_defaults(func=run_plan)


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
    hw = Hardware(args.gpus_per_node * args.nodes, args.gpus_per_node, args.gpu_memory,
                  args.cpu_memory)
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
    p = plan(recipe, hw, bool(args.nvme), shape, free)
    print(render(p, free))
    if is_recipe:
        problems = _check(recipe, hw, shape)
        print("\nrecipe as written: " + ("\n  ".join(map(str, problems)) or "fits"))
    for path in write(p, args.write, free) if args.write else []:
        print(f"wrote {path}")
    return 0
