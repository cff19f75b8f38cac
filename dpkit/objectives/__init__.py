"""Training objectives: the runtime half of a method, looked up through the method registry.

A method's declaration (dpkit/methods/<name>.py, a leaf) names its `Objective` class as
`module:Class`; this module imports it when a run starts. See docs/methods.md, "How to add a
method".
"""

from __future__ import annotations

from dpkit.methods import METHODS, load
from dpkit.objectives.base import LossOut, Objective  # noqa: F401


def objective_class(name: str) -> type[Objective]:
    return load(METHODS[name].runtime)


def build_objective(recipe) -> Objective:
    """The recipe's objective (by `recipe.objective`, default supervised fine-tuning)."""
    name = getattr(recipe, "objective", "sft") or "sft"
    cls = objective_class(name)
    return cls.from_recipe(recipe) if hasattr(cls, "from_recipe") else cls()
