"""The run directory's rules: when it may be created, reused or replaced.

Used by the checks before launch (dpkit.preflight) and by the ranks (dpkit.run) alike, so the
checks never import the training loop.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from dpkit import distributed
from dpkit.errors import RecipeError
from dpkit.recipe import Recipe


def output_dir_problem(recipe: Recipe):
    """The run directory may not exist unless the recipe says to overwrite or resume it."""
    out = Path(recipe.output.dir)
    if recipe.resume is not None:
        return None
    if out.exists() and any(out.iterdir()) and not recipe.output.overwrite:
        return RecipeError.one("output.dir", f"'{out}' already exists and is not empty",
                               "choose another directory, or set output.overwrite=true to replace it")
    return None


def prepare_output_dir(recipe: Recipe, env) -> Path:
    out = Path(recipe.output.dir)
    problem = output_dir_problem(recipe)  # every rank checks before any rank creates it
    distributed.barrier()
    if problem is not None:
        raise problem
    if env.is_main:
        if out.exists() and recipe.output.overwrite and recipe.resume is None:
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    return out
