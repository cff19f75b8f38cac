"""`dpkit train RECIPE [key=value ...]`: validate, then launch the ranks (each runs dpkit.train)."""

from __future__ import annotations

import sys
from pathlib import Path

from dpkit.checkpoint import latest_complete, preempted_checkpoint
from dpkit.distributed import EXIT_REQUEUE
from dpkit.cli.common import add_launch_args, preflight
from dpkit.launch import LAUNCHERS, launch, supervise


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="validate, then launch training on all ranks")
    add_launch_args(p)
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
    p.add_argument("--rdzv-conf", default="",
                   help="with --nodes MIN:MAX: more settings for torchrun's c10d rendezvous, "
                        "key=value,... (e.g. last_call_timeout=10: how long the nodes that are "
                        "there wait for more before starting; torch's default is 30 s)")
    p.add_argument("--dry-run", action="store_true", help="print the launch command, run nothing")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    recipe, plan, report = preflight(args)
    plan.preemption_grace_s = recipe.train.preemption_grace_s  # torchrun's --shutdown_timeout
    for note in report.notes:
        print(f"[dpkit] {note}")
    if args.dry_run:
        return launch(plan, args.recipe, args.overrides, dry_run=True)
    t = recipe.train
    # Elastic: torchrun's agent restarts the ranks (they must meet the other nodes' again);
    # this process only passes SIGTERM on and reports.
    code = supervise(plan, args.recipe, args.overrides, Path(recipe.output.dir),
                     max_restarts=0 if plan.elastic() else t.max_restarts,
                     grace_s=plan.preemption_grace_s, recipe_resume=recipe.resume)
    if code == EXIT_REQUEUE:
        print(preempted_summary(recipe, args), file=sys.stderr)
    elif code != 0:
        print(failure_summary(recipe, args, code), file=sys.stderr)
    return code


def preempted_summary(recipe, args) -> str:
    """After SIGTERM: what was saved, and the exit code a job script requeues on."""
    run_dir = Path(recipe.output.dir)
    ckpt = preempted_checkpoint(run_dir, 0)
    latest = latest_complete(run_dir)
    again = [o for o in args.overrides if not o.startswith("resume=")]
    saved = (f"checkpoint {ckpt} written" if ckpt is not None and ckpt == latest else
             "no checkpoint written in time; " + (f"last complete checkpoint: {latest}" if latest
                                                   else "no complete checkpoint yet"))
    return (f"[dpkit] preempted (SIGTERM): {saved}; exit code {EXIT_REQUEUE} asks for a requeue, "
            f"which continues with: dpkit train {args.recipe} {' '.join(again)} "
            "resume=auto").replace("  ", " ")


def failure_summary(recipe, args, code: int) -> str:
    """After a failed launch: where to pick up. (The launcher's own report above names the
    rank that failed first.)"""
    latest = latest_complete(Path(recipe.output.dir))
    where = f"last complete checkpoint: {latest}" if latest else "no complete checkpoint yet"
    resume = (f"; resume with: dpkit train {args.recipe} {' '.join(args.overrides)} resume=auto"
              if latest else "")
    return f"[dpkit] training failed (launcher exit code {code}); {where}{resume}".replace("  ", " ")
