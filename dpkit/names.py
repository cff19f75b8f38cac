"""The names a recipe may give a training method (`objective`) and a data format (`format`).

A leaf: it imports nothing, so the recipe schema can list the names without importing torch or
the code that runs them. The runtime registries are keyed by exactly these names —
`dpkit.objectives.OBJECTIVES` and `dpkit.data.formats.FORMATS` — and
tests/unit/test_imports.py fails when a name is in one and not the other.
"""

from __future__ import annotations

METHODS: dict[str, str | None] = {
    "sft": None,
    "dpo": "preference",
    "ipo": "preference",
    "simpo": "preference",
    "orpo": "preference",
}
"""Method name → the recipe section holding its settings (None: it has none)."""

FORMAT_COLUMNS: dict[str, tuple[str, ...]] = {
    "alpaca": ("instruction", "input", "output"),
    "messages": ("messages",),
    "text": ("text",),
    "prompt_completion": ("prompt", "completion"),
    "preference": ("prompt", "chosen", "rejected"),
}
"""Data format name → the canonical columns it reads (what a source's `columns:` may map)."""


def methods_with(section: str) -> tuple[str, ...]:
    """The methods whose settings live in `section`, in registry order."""
    return tuple(name for name, s in METHODS.items() if s == section)
