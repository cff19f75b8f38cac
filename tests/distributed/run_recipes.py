"""Test driver: train several recipes one after another in ONE launch (imports cost ~10 s, a
training run of a tiny model ~1 s), sharing the process group. Usage: run_recipes.py R1 R2 ..."""

import sys

from dpkit import distributed
from dpkit.recipe import load_recipe
from dpkit.run import run

if __name__ == "__main__":
    for path in sys.argv[1:]:
        run(load_recipe(path))
    distributed.shutdown()
