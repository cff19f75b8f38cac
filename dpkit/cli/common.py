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
    p.add_argument("--nodes", "--nnodes", dest="nodes", type=node_range, default=(0, 0),
                   metavar="N|MIN:MAX",
                   help="number of nodes (default: the hostfile's hosts, else 1); MIN:MAX "
                        "(torchrun): go on with at least MIN when nodes die (c10d rendezvous, "
                        "restarts by train.max_restarts, resume through the universal format)")


def node_range(text: str) -> tuple[int, int]:
    """`--nodes N` or `MIN:MAX` as (min, max); min 0: a fixed count."""
    from dpkit.errors import RecipeError

    low, sep, high = text.partition(":")
    try:
        return (int(low), int(high)) if sep else (0, int(text))
    except ValueError:
        raise RecipeError.one("--nodes", f"'{text}' is not a node count",
                              "give N, or MIN:MAX to go on with fewer nodes (e.g. 1:2)") from None


def plan_from_args(args, recipe=None) -> LaunchPlan:
    min_nodes, nodes = args.nodes if isinstance(args.nodes, tuple) else (0, args.nodes)
    return LaunchPlan(launcher=getattr(args, "launcher", "torchrun"),
                      nproc_per_node=args.nproc_per_node, nodes=nodes, min_nodes=min_nodes,
                      node_rank=getattr(args, "node_rank", None),
                      master_addr=getattr(args, "master_addr", None),
                      master_port=getattr(args, "master_port", 0),
                      hostfile=getattr(args, "hostfile", None),
                      max_restarts=recipe.train.max_restarts if recipe is not None else 0,
                      rdzv_conf=getattr(args, "rdzv_conf", "") or "").check()


def preflight(args):
    """(recipe, launch plan, report): every check that needs no rank, raised at once."""
    recipe = load_recipe(args.recipe, args.overrides)
    done = finished(recipe)
    if done is not None:  # a resume of a finished run: say so, change nothing, check nothing
        raise done
    plan = plan_from_args(args, recipe)
    plan.rendezvous_timeout_s = recipe.train.collective_timeout_s
    on_gpu = torch.cuda.is_available()
    report = check_recipe(recipe, plan.world_size(), on_cpu=not on_gpu,
                          gpus_per_node=plan.ranks_per_node(),
                          gpu_memory_bytes=torch.cuda.get_device_properties(0).total_memory
                          if on_gpu else None,
                          hub_user=user_choice_from_overrides(args.overrides))
    report.problems.extend(fewer_nodes_problems(recipe, plan))
    raise_if_problems(report)
    return recipe, plan, report


def fewer_nodes_problems(recipe, plan: LaunchPlan) -> list:
    """An elastic launch goes on with fewer nodes after a death: the global batch must split
    over every world size it can run on (the full one is checked with the rest)."""
    from dpkit.batch import batch_arithmetic
    from dpkit.errors import Problem, RecipeError

    out = []
    ep = recipe.moe.expert_parallel
    if ep > 1 and plan.elastic():
        out.append(Problem("--nodes", f"{plan.min_nodes}:{plan.num_nodes()} would resume on fewer "
                           f"ranks after a node dies, and an expert-parallel checkpoint "
                           f"(moe.expert_parallel: {ep}) resumes only on its own layout or one "
                           "process (docs/moe.md)", f"use a fixed count: --nodes "
                           f"{plan.num_nodes()} (train.max_restarts still restarts the group)"))
        return out
    for world in plan.world_sizes()[:-1]:
        try:
            batch_arithmetic(recipe, world)
        except RecipeError as e:
            nodes = world // plan.ranks_per_node()
            out += [Problem(p.where, f"{p.message} (on {nodes} node{'s' * (nodes > 1)}, which "
                            f"--nodes {plan.min_nodes}:{plan.num_nodes()} allows)", p.fix)
                    for p in e.problems]
    return out
