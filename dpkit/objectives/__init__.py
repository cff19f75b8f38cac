"""Training objectives, registered by name: the one place a recipe's `objective` is looked up.

A new training method is a module here with an `Objective` subclass, one line in `OBJECTIVES`,
and (where its data differs) a data format in dpkit/data/.
"""

from __future__ import annotations

from dpkit.objectives.base import LossOut, Objective  # noqa: F401
from dpkit.objectives.sft import SFT

OBJECTIVES: dict[str, type[Objective]] = {"sft": SFT}


def build_objective(recipe) -> Objective:
    """The recipe's objective (by `recipe.objective`, default supervised fine-tuning)."""
    name = getattr(recipe, "objective", "sft") or "sft"
    cls = OBJECTIVES[name]
    return cls.from_recipe(recipe) if hasattr(cls, "from_recipe") else cls()
