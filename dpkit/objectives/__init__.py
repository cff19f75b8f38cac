"""Training objectives, registered by name: the one place a recipe's `objective` is looked up.

A new training method is a module here with an `Objective` subclass, one line in `OBJECTIVES`,
and (where its data differs) a data format in dpkit/data/.
"""

from __future__ import annotations

from dpkit.objectives.base import LossOut, Objective  # noqa: F401
from dpkit.objectives.preference import Preference
from dpkit.objectives.sft import SFT

# name → class, keyed by the names the recipe accepts (dpkit/names.METHODS, a leaf the schema
# reads without torch; tests/unit/test_imports.py ties the two). A class with `from_recipe` reads
# its settings from the recipe. The preference objectives share one class (formula by name).
OBJECTIVES: dict[str, type[Objective]] = {"sft": SFT, "dpo": Preference, "ipo": Preference,
                                          "simpo": Preference, "orpo": Preference}


def build_objective(recipe) -> Objective:
    """The recipe's objective (by `recipe.objective`, default supervised fine-tuning)."""
    name = getattr(recipe, "objective", "sft") or "sft"
    cls = OBJECTIVES[name]
    return cls.from_recipe(recipe) if hasattr(cls, "from_recipe") else cls()
