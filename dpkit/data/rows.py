"""Row kinds: how a data format's rows are checked, tokenized and assembled into examples.

A format's declaration (dpkit/methods/: `FormatSpec.rows`) names its row kind. The loaders —
in memory (dpkit/data/load.py) and through the tokenize-once cache (dpkit/data/cache.py) — ask
the row kind and never test a format's name, so a method with rows of its own shape (pairs,
unpaired labelled rows, prompts) brings a `RowKind` in its own module.

A row kind's tokenized form is an Arrow dataset (what the cache stores, one per source); its
examples are what the method's collate reads.
"""

from __future__ import annotations

import time
import uuid

from dpkit import methods
from dpkit.data.load import assemble, load_raw, tokenize_or_explain


class RowKind:
    """Sequences: one tokenized row per data row, trained on its target tokens (every
    supervised format). Subclasses override all four."""

    format = None
    """A `dpkit.data.formats.Format` for a format the data format registry does not hold
    (rendering, generation prompts, the first-row check), or None."""

    def check(self, raw: list, tokenizer) -> None:
        """Raise RecipeError for layout problems of the loaded sources [(kind, source, ds)]
        (beyond the columns and the format's first-row check, done for every format)."""

    def tokenize(self, ds, source, tokenizer, section, options: dict, num_proc: int,
                 fingerprint: str | None = None, cache_file: str | None = None):
        """One source's tokenized Arrow dataset (written to `cache_file` when given)."""
        return tokenize_or_explain(ds, source, tokenizer, section, num_proc,
                                   fingerprint=fingerprint, cache_file=cache_file)

    def assemble(self, parts: list, section, seed: int, need_train: bool = True):
        """(train examples, eval examples, DataStats) from [(kind, source, tokenized ds)]."""
        return assemble(parts, section, seed, need_train=need_train)


SEQUENCES = RowKind()


def row_kind(section) -> RowKind:
    """The row kind of a data section's sources (the recipe's method allows one kind: its
    formats all share it — tests/unit/test_imports.py checks every method)."""
    paths = {methods.FORMATS[s.format].rows for s in (*section.sources, *section.eval_sources)}
    if len(paths) > 1:
        raise ValueError(f"sources of different row kinds: {sorted(paths)}")
    return methods.load(paths.pop()) if paths else SEQUENCES


def load_datasets(section, tokenizer, seed: int, num_proc: int = 1,
                  options: dict | None = None):
    """(train rows, eval rows, stats), tokenized in memory (no cache: see cache.py for that).
    Rows are read on demand where they can be. Every problem is raised at once. The sources'
    row kind (dpkit/data/rows.py) tokenizes them; `options`: its method's settings that change
    the tokens (`MethodSpec.options`)."""
    t0 = time.perf_counter()
    raw = load_raw(section, tokenizer)
    rows = row_kind(section)
    rows.check(raw, tokenizer)
    parts = [(kind, source, rows.tokenize(ds, source, tokenizer, section, options or {},
                                          num_proc, fingerprint=uuid.uuid4().hex))
             for kind, source, ds in raw]
    train, evals, stats = rows.assemble(parts, section, seed)
    stats.seconds = time.perf_counter() - t0
    return train, evals, stats
