"""What `dpkit validate` and `dpkit train` share: the launch options and the checks before launch."""

from __future__ import annotations

import argparse

import torch

from dpkit.hub_schema import user_choice_from_overrides
from dpkit.launch import LaunchPlan
from dpkit.preflight import check_recipe, raise_if_problems
from dpkit.recipe import load_recipe
from dpkit.rundir import finished


def add_launch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="path to a recipe YAML")
    p.add_argument("overrides", nargs="*", help="recipe overrides, e.g. train.lr=1e-4")
    p.add_argument("--nproc-per-node", type=int, default=0,
                   help="ranks per node (default: the hostfile's slots, else one per GPU; 2 on a "
                        "machine without GPUs)")
    p.add_argument("--nodes", "--nnodes", dest="nodes", type=int, default=0,
                   help="number of nodes (default: the hostfile's hosts, else 1)")


def plan_from_args(args) -> LaunchPlan:
    return LaunchPlan(launcher=getattr(args, "launcher", "torchrun"),
                      nproc_per_node=args.nproc_per_node, nodes=args.nodes,
                      node_rank=getattr(args, "node_rank", None),
                      master_addr=getattr(args, "master_addr", None),
                      master_port=getattr(args, "master_port", 0),
                      hostfile=getattr(args, "hostfile", None)).check()


def preflight(args):
    """(recipe, launch plan, report): every check that needs no rank, raised at once."""
    recipe = load_recipe(args.recipe, args.overrides)
    done = finished(recipe)
    if done is not None:  # a resume of a finished run: say so, change nothing, check nothing
        raise done
    plan = plan_from_args(args)
    plan.rendezvous_timeout_s = recipe.train.collective_timeout_s
    on_gpu = torch.cuda.is_available()
    report = check_recipe(recipe, plan.world_size(), on_cpu=not on_gpu,
                          gpus_per_node=plan.ranks_per_node(),
                          gpu_memory_bytes=torch.cuda.get_device_properties(0).total_memory
                          if on_gpu else None,
                          hub_user=user_choice_from_overrides(args.overrides))
    raise_if_problems(report)
    return recipe, plan, report
