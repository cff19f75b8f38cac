"""The entry point every launcher starts on each rank (the loop itself is dpkit/run.py).

    torchrun --nproc_per_node N -m dpkit.train RECIPE [key=value ...]
    accelerate launch --config_file ds_configs/accelerate/<x>.yaml -m dpkit.train RECIPE
    deepspeed --num_gpus N --module dpkit.train RECIPE

Every rank prints nothing but through rank 0: a user error is one line (exit 2), not a traceback
per rank.
"""

from __future__ import annotations

import sys
import time

from dpkit import distributed
from dpkit.errors import EXIT_USER_ERROR, RecipeError, format_errors
from dpkit.hub_schema import user_choice_from_overrides
from dpkit.recipe import load_recipe
from dpkit.run import NonFiniteLoss, Preempted, run
from dpkit.rundir import RunFinished


def main(argv: list[str] | None = None) -> int:
    argv = distributed.strip_launcher_args(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else EXIT_USER_ERROR
    # From the start: a rank still setting up when SIGTERM comes stops after its first step
    # instead of dying while the others wait for it in a collective.
    distributed.STOP.install()
    try:
        run(load_recipe(argv[0], argv[1:]), hub_user=user_choice_from_overrides(argv[1:]))
        distributed.shutdown()
    except RunFinished as e:  # nothing to do: every rank knows, rank 0 says it
        if distributed.is_main_process():
            print(e, file=sys.stderr if e.code else sys.stdout, flush=True)
        return e.code
    except RecipeError as e:
        if distributed.is_main_process():
            print(format_errors(e), file=sys.stderr)
        return EXIT_USER_ERROR
    except Preempted:  # each rank wrote its part of the checkpoint and said so (run.preempt)
        distributed.shutdown()
        return distributed.EXIT_REQUEUE
    except NonFiniteLoss as e:  # every rank sees the same global loss: rank 0 speaks
        if distributed.is_main_process():
            print(f"error: {e}", file=sys.stderr, flush=True)
        return distributed.EXIT_NONFINITE  # not 1: the supervisor must not restart into it
    except distributed.MainWorkTimeout as e:  # the waiting rank's one line, not a traceback
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    except distributed.RendezvousError as e:  # one line per node, not a traceback per rank
        if distributed.launcher_info().local_rank == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        else:  # the launcher stops a node's ranks when the first one exits: let rank 0 speak
            time.sleep(15)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
