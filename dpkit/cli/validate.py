"""`dpkit validate RECIPE [key=value ...]`: check everything before paying for GPUs; start nothing."""

from __future__ import annotations

from dpkit.cli.common import add_launch_args, preflight


def register(subparsers) -> None:
    p = subparsers.add_parser("validate", help="check a recipe, its data, model and DeepSpeed config")
    add_launch_args(p)
    p.set_defaults(func=cmd_validate)


def cmd_validate(args) -> int:
    recipe, plan, report = preflight(args)
    sizes = plan.world_sizes()
    ranks = f"{sizes[0]}-{sizes[-1]}" if len(sizes) > 1 else f"{sizes[0]}"
    print(f"{args.recipe}: OK for {ranks} ranks")
    for note in report.notes:
        print(f"  {note}")
    return 0
