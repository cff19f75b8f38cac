"""`dpkit` command line: thin wrappers over the library.

    dpkit validate RECIPE [key=value ...]     check everything before paying for GPUs
    dpkit train RECIPE [key=value ...]        validate, then launch the ranks
"""

from __future__ import annotations

import argparse
import importlib
import sys

import torch

from dpkit.errors import EXIT_USER_ERROR, RecipeError, format_errors
from dpkit.launch import LAUNCHERS, LaunchPlan, launch
from dpkit.preflight import check_recipe, raise_if_problems
from dpkit.recipe import load_recipe

# Sub-commands that live in their own modules register themselves (module, function).
PLUGINS = [("dpkit.plan", "register"), ("dpkit.hub", "register"), ("dpkit.report", "register"),
           ("dpkit.doctor", "register"), ("dpkit.export", "register")]


def _add_launch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="path to a recipe YAML")
    p.add_argument("overrides", nargs="*", help="recipe overrides, e.g. train.lr=1e-4")
    p.add_argument("--nproc-per-node", type=int, default=0,
                   help="ranks per node (default: one per GPU; 2 on a machine without GPUs)")
    p.add_argument("--nnodes", type=int, default=1, help="number of nodes")


def _plan_from_args(args) -> LaunchPlan:
    return LaunchPlan(launcher=getattr(args, "launcher", "torchrun"),
                      nproc_per_node=args.nproc_per_node, nnodes=args.nnodes,
                      node_rank=getattr(args, "node_rank", 0),
                      master_addr=getattr(args, "master_addr", "127.0.0.1"),
                      master_port=getattr(args, "master_port", 0),
                      hostfile=getattr(args, "hostfile", None))


def _preflight(args):
    recipe = load_recipe(args.recipe, args.overrides)
    plan = _plan_from_args(args)
    report = check_recipe(recipe, plan.world_size(), on_cpu=not torch.cuda.is_available())
    raise_if_problems(report)
    return recipe, plan, report


def cmd_validate(args) -> int:
    recipe, plan, report = _preflight(args)
    print(f"{args.recipe}: OK for {plan.world_size()} ranks")
    for note in report.notes:
        print(f"  {note}")
    return 0


def cmd_train(args) -> int:
    recipe, plan, report = _preflight(args)
    for note in report.notes:
        print(f"[dpkit] {note}")
    return launch(plan, args.recipe, args.overrides, args.dry_run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpkit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check a recipe, its data, model and DeepSpeed config")
    _add_launch_args(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("train", help="validate, then launch training on all ranks")
    _add_launch_args(p)
    p.add_argument("--launcher", choices=LAUNCHERS, default="torchrun",
                   help="what starts the ranks (default: torchrun)")
    p.add_argument("--node-rank", type=int, default=0, help="this node's rank (multi-node)")
    p.add_argument("--master-addr", default="127.0.0.1", help="address of node 0")
    p.add_argument("--master-port", type=int, default=0, help="port on node 0 (0: a free one)")
    p.add_argument("--hostfile", help="deepspeed hostfile (with --launcher deepspeed)")
    p.add_argument("--dry-run", action="store_true", help="print the launch command, run nothing")
    p.set_defaults(func=cmd_train)

    for module, function in PLUGINS:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue
        getattr(mod, function)(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except RecipeError as e:
        print(format_errors(e), file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
