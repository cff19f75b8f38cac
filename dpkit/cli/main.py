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
PLUGINS = [("dpkit.plan.cli", "register"), ("dpkit.hub", "register"), ("dpkit.report", "register"),
           ("dpkit.doctor", "register"), ("dpkit.export", "register")]


def _add_launch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="path to a recipe YAML")
    p.add_argument("overrides", nargs="*", help="recipe overrides, e.g. train.lr=1e-4")
    p.add_argument("--nproc-per-node", type=int, default=0,
                   help="ranks per node (default: the hostfile's slots, else one per GPU; 2 on a "
                        "machine without GPUs)")
    p.add_argument("--nodes", "--nnodes", dest="nodes", type=int, default=0,
                   help="number of nodes (default: the hostfile's hosts, else 1)")


def _plan_from_args(args) -> LaunchPlan:
    return LaunchPlan(launcher=getattr(args, "launcher", "torchrun"),
                      nproc_per_node=args.nproc_per_node, nodes=args.nodes,
                      node_rank=getattr(args, "node_rank", None),
                      master_addr=getattr(args, "master_addr", None),
                      master_port=getattr(args, "master_port", 0),
                      hostfile=getattr(args, "hostfile", None)).check()


def _preflight(args):
    recipe = load_recipe(args.recipe, args.overrides)
    plan = _plan_from_args(args)
    plan.rendezvous_timeout_s = recipe.train.collective_timeout_s
    on_gpu = torch.cuda.is_available()
    report = check_recipe(recipe, plan.world_size(), on_cpu=not on_gpu,
                          gpus_per_node=plan.ranks_per_node(),
                          gpu_memory_bytes=torch.cuda.get_device_properties(0).total_memory
                          if on_gpu else None)
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
    code = launch(plan, args.recipe, args.overrides, args.dry_run)
    if code != 0:
        print(failure_summary(recipe, args, code), file=sys.stderr)
    return code


def failure_summary(recipe, args, code: int) -> str:
    """After a failed launch: where to pick up. (The launcher's own report above names the
    rank that failed first.)"""
    from pathlib import Path

    from dpkit.checkpoint import latest_complete

    latest = latest_complete(Path(recipe.output.dir))
    where = f"last complete checkpoint: {latest}" if latest else "no complete checkpoint yet"
    resume = (f"; resume with: dpkit train {args.recipe} {' '.join(args.overrides)} resume=auto"
              if latest else "")
    return f"[dpkit] training failed (launcher exit code {code}); {where}{resume}".replace("  ", " ")


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
    p.add_argument("--node-rank", type=int, default=None,
                   help="this node's rank, 0..nodes-1 (multi-node: run the command on every "
                        "node; with the deepspeed CLI it means no ssh)")
    p.add_argument("--master-addr", default=None,
                   help="address of node 0, the same on every node (default: the hostfile's "
                        "first host; 127.0.0.1 on one node; required across nodes otherwise)")
    p.add_argument("--master-port", type=int, default=0,
                   help="port on node 0 (default: a free one; 29500 across nodes)")
    p.add_argument("--hostfile", help="`host slots=N` per line (deepspeed's format): nodes, ranks "
                                      "per node and node 0's address, for every launcher")
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
