"""What a method declaration holds (dpkit/methods/__init__.py reads them): a leaf."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class FormatSpec:
    columns: tuple[str, ...]
    """Canonical columns it reads (what a source's `columns:` may map)."""
    rows: str = "dpkit.data.rows:SEQUENCES"
    """`module:attribute` of the `RowKind` that checks, tokenizes and assembles its rows
    (dpkit/data/rows.py); resolved when data is loaded (it imports the data stack)."""
    trained: str | None = None
    """The column whose text is trained on (preflight refuses a source where it is empty in every
    row); None: not checked."""
    lists: tuple[str, ...] = ()
    """Columns holding message lists rather than text."""
    text_or_list: bool = False
    """Its columns may hold text or message lists (TRL's standard and conversational layouts)."""
    booleans: tuple[str, ...] = ()
    """Columns holding true/false rather than text (an unpaired row's `label`)."""
    doc: str = ""


@dataclass(frozen=True)
class MethodSpec:
    runtime: str
    """`module:Class` of its `dpkit.objectives.base.Objective`, imported when a run starts."""
    formats: tuple[str, ...]
    """The data formats it trains on; every source of a recipe naming it must have one of them."""
    section: str | None = None
    """The recipe key of its settings (None: it has none)."""
    settings: type | None = None
    """The pydantic class of that section (a leaf: the schema imports it)."""
    head: str = "causal_lm"
    """The model it trains: `causal_lm` (AutoModelForCausalLM) or `sequence_classification`
    (AutoModelForSequenceClassification, one score per row)."""
    problems: Callable | None = None
    """(recipe) -> list of one-line problems: checks between its settings, the data and the rest
    of the recipe (validate prints them before any rank starts)."""
    data_options: Callable | None = None
    """(recipe) -> dict of settings that change its tokenized rows (part of the tokenized-data
    cache key and of the keys a resume must not change)."""
    streams: bool = True
    """Whether its rows can be read as a stream (`data.streaming`)."""
    notes: Callable | None = None
    """(recipe) -> list of lines validate and train print before any rank starts (a warning that
    the recipe names Python code the run will execute)."""
    doc: str = ""

    def options(self, recipe) -> dict:
        return dict(self.data_options(recipe)) if self.data_options else {}


# Formats every supervised method reads (the preference and other methods add their own).
SEQUENCE_FORMATS: dict[str, FormatSpec] = {
    "alpaca": FormatSpec(("instruction", "input", "output"), trained="output"),
    "messages": FormatSpec(("messages",), trained="messages", lists=("messages",)),
    "text": FormatSpec(("text",), trained="text"),
    "prompt_completion": FormatSpec(("prompt", "completion"), trained="completion",
                                    text_or_list=True),
}
