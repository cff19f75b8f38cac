"""Test driver for tests/distributed/test_moe.py: run_recipes.py, plus the trained engine's own
answers. After each run's last step, before its final save, every rank runs the engine forward
(eval mode, no gradients) on a fixed batch — expert parallelism needs every rank's experts —
and rank 0 writes the logits to <run>/engine_logits.pt: what a saved or exported model must
reproduce. And a fault for one recipe of the launch: MOE_FAULT="NAME.yaml=kill@step:3:1" sets
DPKIT_FAULT (dpkit/checkpoint.py) while that recipe runs (the others run unharmed).
Usage: run_moe_recipes.py R1 R2 ..."""

import os
import sys
from pathlib import Path

import torch

from dpkit import distributed
from dpkit.recipe import load_recipe
from dpkit.run import Run

BATCH = torch.randint(0, 2048, (2, 12), generator=torch.Generator().manual_seed(0))


def finish_with_logits(finish):
    def wrapped(self):
        self.engine.eval()
        with torch.no_grad():
            logits = self.engine(input_ids=BATCH.to(self.env.device)).logits.float().cpu()
        if self.env.is_main:
            torch.save(logits, self.out / "engine_logits.pt")
        return finish(self)
    return wrapped


if __name__ == "__main__":
    Run.finish = finish_with_logits(Run.finish)
    faulty, _, fault = os.environ.get("MOE_FAULT", "").partition("=")
    for path in sys.argv[1:]:
        os.environ.pop("DPKIT_FAULT", None)
        if Path(path).name == faulty:
            os.environ["DPKIT_FAULT"] = fault
        Run(load_recipe(path)).setup().train()
    distributed.shutdown()
