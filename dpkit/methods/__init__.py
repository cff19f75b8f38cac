"""The training methods a recipe may name, and what each brings: the method registry.

A method is declared by one leaf module here (dpkit/methods/<name>.py: no torch, no runtime
code, so `dpkit validate` and the schema read it cheaply) and run by one runtime module
(dpkit/objectives/<name>.py, its `Objective`). The declaration holds:
- `METHODS`: method name → `MethodSpec` (its recipe section and settings class, the data formats
  it trains on, its model head, its cross-field checks, where its runtime class lives);
- `FORMATS`: the data formats it brings, name → `FormatSpec` (columns, and which row kind
  tokenizes them).
Adding a method = its two modules and one line in `MODULES` below. The recipe schema
(dpkit/recipe.py) builds its `objective` choices and the method sections from this registry;
nothing else in dpkit names a method.
"""

from __future__ import annotations

from importlib import import_module

from dpkit.methods.spec import SEQUENCE_FORMATS, FormatSpec, MethodSpec  # noqa: F401


MODULES = ("sft", "preference", "grpo", "reward", "kto")
"""The method declarations, in the order `objective:` lists them: one line per method."""

METHODS: dict[str, MethodSpec] = {}
FORMATS: dict[str, FormatSpec] = dict(SEQUENCE_FORMATS)
for _name in MODULES:
    _module = import_module(f"dpkit.methods.{_name}")
    METHODS.update(_module.METHODS)
    FORMATS.update(getattr(_module, "FORMATS", {}))

FORMAT_COLUMNS: dict[str, tuple[str, ...]] = {n: f.columns for n, f in FORMATS.items()}


def sections() -> dict[str, tuple[type, str]]:
    """Recipe section key → (settings class, the methods using it), in registry order."""
    out: dict[str, tuple[type, list[str]]] = {}
    for name, spec in METHODS.items():
        if spec.section is not None:
            out.setdefault(spec.section, (spec.settings, []))[1].append(name)
    return {k: (cls, ", ".join(names)) for k, (cls, names) in out.items()}


def methods_with(section: str) -> tuple[str, ...]:
    """The methods whose settings live in `section`, in registry order."""
    return tuple(name for name, s in METHODS.items() if s.section == section)


def spec(recipe) -> MethodSpec:
    return METHODS[getattr(recipe, "objective", "sft") or "sft"]


def settings(recipe):
    """The recipe's settings of its method (the section's defaults when left out), or None."""
    s = spec(recipe)
    if s.section is None:
        return None
    return getattr(recipe, s.section, None) or s.settings()


def load(path: str):
    """`module:attribute` → the object (a method's runtime class, a row kind)."""
    module, _, attribute = path.partition(":")
    return getattr(import_module(module), attribute)


def method_notes(recipe) -> list[str]:
    """The method's lines for validate and train to print before any rank starts."""
    s = spec(recipe)
    return list(s.notes(recipe)) if s.notes else []


def method_problems(recipe) -> list[str]:
    """Checks every recipe gets from the registry: a method's section without the method, data
    formats the method does not train on, streaming for methods that hold rows in memory; then
    the method's own checks."""
    name, s = recipe.objective, spec(recipe)
    for key, (_, users) in sections().items():
        if getattr(recipe, key, None) is not None and key != s.section:
            return [f"a `{key}` section is for `objective: {users}`; remove the section or set "
                    "`objective`"]
    formats = sorted({src.format for src in [*recipe.data.sources, *recipe.data.eval_sources]})
    wrong = [f for f in formats if f not in s.formats]
    if wrong:
        users = [m for m, ms in METHODS.items() if wrong[0] in ms.formats]
        if len(s.formats) == 1:
            return [f"`objective: {name}` trains on `format: {s.formats[0]}` data: every data "
                    f"source needs it (got {formats})"]
        return [f"data format `{wrong[0]}` is for `objective: {', '.join(users)}`, not "
                f"`{name}` (it reads {', '.join(s.formats)})"]
    if recipe.data.streaming and not s.streams:
        return [f"`data.streaming` does not work with `objective: {name}`: its rows are tokenized "
                "whole and held in memory, not streamed; set `data.streaming: false`"]
    return list(s.problems(recipe)) if s.problems else []
