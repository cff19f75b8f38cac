"""Data mixtures: several sources drawn in chosen proportions (`data.mixture`, `weight`).

Strategies (the recipe's `data.mixture`; docs/data.md):

    concat           every row of every source once per epoch, shuffled together (the default;
                     dpkit/data/load.py's epoch order, no schedule)
    first_exhausted  draws in proportion to each source's `weight`; the epoch ends when the
                     first source has given all its rows
    all_exhausted    the same, until every source has given all its rows at least once: the
                     smaller ones are drawn again (oversampled), each pass in a new order
    fixed            each source gives `rows_per_epoch` rows, or `epochs` × its rows, per epoch

The draws come from a deterministic quota schedule, not from random picks: an epoch's draws are
cut into blocks (the global batch, or the smallest multiple of it in which every source has at
least one draw) and after b blocks source i has had C_i(b) draws, the largest-remainder
apportionment of b × block by the shares. So every source is within one row of its share at
every block boundary, C_i never decreases (a block holds at least one draw of each source, so
the Alabama paradox of largest remainders cannot happen), and nothing depends on the world size.
A block's draws are shuffled (seeded by train.seed, epoch and block) so the sources mix within
it. Source i's k-th draw of the run reads its rows in passes: pass k // n_i, each pass a fresh
permutation seeded by (train.seed, source, pass), so a source drawn past its end is read again
in a new order and one drawn less than its size per epoch goes on where the last epoch stopped.

Everything here is arithmetic on counts and seeds: the position of a run is its step (in memory)
or a few integers (a stream, dpkit/data/stream.py), and a resume computes the schedule at that
point without reading or replaying a row.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache

import numpy as np

from dpkit.errors import RecipeError

WEIGHTED = ("first_exhausted", "all_exhausted")


# ------------------------------------------------------------------------- the quota schedule
def integer_shares(weights: Sequence[float]) -> tuple[int, ...]:
    """Weights as exact integers in the same ratio (0.3, 0.7 → 3, 7): the schedule then needs
    no floating point, so every machine computes the same draws."""
    fractions = [Fraction(str(w)) for w in weights]
    den = math.lcm(*(f.denominator for f in fractions))
    ints = [int(f * den) for f in fractions]
    g = math.gcd(*ints)
    return tuple(i // g for i in ints)


def apportion(total: int, shares: Sequence[int]) -> list[int]:
    """Largest remainder (Hamilton): `total` draws split in proportion to `shares`, each within
    one of its exact share; ties of the remainders go to the lower source index."""
    whole = sum(shares)
    quota = [divmod(s * total, whole) for s in shares]
    out = [q for q, _ in quota]
    left = total - sum(out)
    for i in sorted(range(len(shares)), key=lambda i: (-quota[i][1], i))[:left]:
        out[i] += 1
    return out


@dataclass(frozen=True)
class Schedule:
    """Which source each draw of an epoch comes from (see the module doc).

    `shares`: integers in the ratio of the sources' shares (0 for a source never drawn);
    `batch`: the global batch (a block is a multiple of it); `total`: draws per epoch, or None
    for a stream (no known end)."""

    shares: tuple[int, ...]
    batch: int
    total: int | None = None

    @property
    def block(self) -> int:
        """The global batch, or its smallest multiple giving every drawn source ≥ 1 draw."""
        least = min(s for s in self.shares if s > 0)
        return self.batch * max(1, -(-sum(self.shares) // (self.batch * least)))

    def blocks(self) -> int | None:
        return None if self.total is None else -(-self.total // self.block)

    def before(self, b: int) -> list[int]:
        """Draws of each source in blocks 0 … b-1."""
        t = b * self.block
        return apportion(t if self.total is None else min(t, self.total), self.shares)

    def block_counts(self, b: int) -> list[int]:
        return [y - x for x, y in zip(self.before(b), self.before(b + 1))]

    def block_sources(self, b: int, seed: str) -> list[int]:
        """The source of each draw of block b, shuffled by `seed`."""
        return [i for i, _ in block_draws(self, b, seed)]

    def draws(self, start: int, stop: int, seed: str) -> list[tuple[int, int]]:
        """(source, its draw number in the epoch) for the epoch's draws start … stop-1."""
        out: list[tuple[int, int]] = []
        block = self.block
        for b in range(start // block, -(-stop // block)):
            first = b * block
            out += block_draws(self, b, seed)[max(start - first, 0):stop - first]
        return out


@lru_cache(maxsize=4)
def block_draws(schedule: Schedule, b: int, seed: str) -> list[tuple[int, int]]:
    """(source, draw number in the epoch) of every draw of block b: computed once per block,
    which a step or a stream window reads a slice of."""
    before = schedule.before(b)
    sources = [i for i, n in enumerate(schedule.block_counts(b)) for _ in range(n)]
    random.Random(f"{seed}:block{b}").shuffle(sources)
    out = []
    for i in sources:
        out.append((i, before[i]))
        before[i] += 1
    return out


def source_permutation(n: int, seed: int, source: int, rotation: int) -> np.ndarray:
    """The order of source `source`'s n items in its pass `rotation` (a fresh one per pass)."""
    return _permutation(n, seed, source, rotation)


@lru_cache(maxsize=16)
def _permutation(n: int, seed: int, source: int, rotation: int) -> np.ndarray:
    order = list(range(n))
    random.Random(f"{seed}:source{source}:pass{rotation}").shuffle(order)
    return np.asarray(order, dtype=np.int64)


# ------------------------------------------------------------------- rows per epoch per source
def epoch_counts(strategy: str, available: Sequence[int], weights: Sequence[float],
                 rows: Sequence[int | None] = (), epochs: Sequence[float | None] = ()) -> list[int]:
    """Draws per epoch of each source: `available` items each, drawn by `strategy`."""
    if strategy == "concat":
        return list(available)
    if strategy == "fixed":
        return [r if r is not None else max(1, round(e * n))
                for n, r, e in zip(available, rows, epochs)]
    shares = integer_shares(weights)
    whole = sum(shares)
    if strategy == "first_exhausted":  # the most draws no source runs out in
        total = min((n + 1) * whole // s for n, s in zip(available, shares)) + 1
        while any(c > n for c, n in zip(apportion(total, shares), available)):
            total -= 1
    else:  # all_exhausted: the fewest draws every source is read whole in
        total = max(max(0, (n - 1) * whole // s - 1) for n, s in zip(available, shares))
        while any(c < n for c, n in zip(apportion(total, shares), available)):
            total += 1
    return apportion(total, shares)


# -------------------------------------------------------------------------- rows in memory
class Mixture(Sequence):
    """A run's training items in memory (rows, packed sequences or preference pairs) with the
    draws of each epoch.

    Indexing reads the distinct items, source after source (item j of source i is
    `self[offsets[i] + j]`), as the preference reference pass and the packer need;
    `per_epoch` is the number of draws of one epoch, `counts` each source's."""

    def __init__(self, items: Sequence, sizes: Sequence[int], spec: MixSpec):
        self.items, self.sizes, self.spec = items, list(sizes), spec
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.counts = spec.counts(self.sizes)
        self.per_epoch = sum(self.counts)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]

    @property
    def lengths(self):
        return getattr(self.items, "lengths", None)

    def item(self, source: int, draw: int, seed: int) -> int:
        """The index (into self) of source `source`'s `draw`-th draw of the run."""
        n = self.sizes[source]
        rotation, k = divmod(draw, n)
        return int(self.offsets[source] + source_permutation(n, seed, source, rotation)[k])

    def epoch_items(self, epoch: int, seed: int, batch: int, start: int, stop: int) -> list[int]:
        """Indices of the epoch's draws start … stop-1, in schedule order."""
        schedule = self.schedule(batch)
        return [self.item(i, epoch * self.counts[i] + k, seed)
                for i, k in schedule.draws(start, stop, f"{seed}:{epoch}")]

    def schedule(self, batch: int) -> Schedule:
        return Schedule(tuple(self.counts), batch, self.per_epoch)

    def packed(self, max_len: int, seed: int) -> Mixture:
        """Each source packed on its own (a sequence never mixes sources, so the shares are of
        sequences, about tokens); the counts per epoch follow from the sequences' numbers."""
        from dpkit.data.packing import PackedRows, pack_plan

        lengths = self.lengths
        if lengths is None:
            lengths = np.asarray([len(ex.input_ids) for ex in self.items], dtype=np.int64)
        orders, starts, sizes, at = [], [], [], 0
        for i in range(len(self.sizes)):
            a, b = int(self.offsets[i]), int(self.offsets[i + 1])
            order, start = pack_plan(lengths[a:b], max_len, seed + i)
            orders.append(order + a)
            starts.append(start[:-1] + at)
            sizes.append(len(start) - 1)
            at += b - a
        order = np.concatenate(orders)
        starts_all = np.concatenate([*starts, [len(order)]]).astype(np.int64)
        items = PackedRows(self.items, order, starts_all, lengths)
        if isinstance(self.items, list):
            items = items[:]
        return Mixture(items, sizes, self.spec)

    def first_epoch(self, seed: int) -> list[int]:
        """Indices of epoch 0's draws, source after source (eval rows of an eval mixture)."""
        return [self.item(i, k, seed) for i in range(len(self.sizes))
                for k in range(self.counts[i])]


@dataclass(frozen=True)
class MixSpec:
    """The recipe's mixture for one kind of sources: strategy and per-source keys."""
    strategy: str
    weights: tuple[float, ...]
    rows: tuple[int | None, ...]
    epochs: tuple[float | None, ...]

    @classmethod
    def of(cls, strategy: str, sources) -> MixSpec:
        return cls(strategy, tuple(s.weight if s.weight is not None else 1.0 for s in sources),
                   tuple(s.rows_per_epoch for s in sources), tuple(s.epochs for s in sources))

    def counts(self, sizes: Sequence[int]) -> list[int]:
        return epoch_counts(self.strategy, sizes, self.weights, self.rows, self.epochs)


def mix(items: Sequence, sizes: Sequence[int], strategy: str, sources, kind: str = "sources"):
    """Items of several sources (concatenated, `sizes` each) as a `Mixture`, or as they are for
    `concat`. A source with no rows left can't be drawn from: one line naming it."""
    if strategy == "concat":
        return items
    empty = [i for i, n in enumerate(sizes) if n == 0]
    if empty:
        raise RecipeError.one(f"data.{kind}[{empty[0]}]", f"'{sources[empty[0]].path}' has no "
                              "rows left after tokenization, and the mixture draws from it",
                              "check its data, max_seq_len and overflow, or remove the source")
    return Mixture(items, sizes, MixSpec.of(strategy, sources))


def select(items: Sequence, indices: Sequence[int]):
    """items[indices] for a lazily read Arrow sequence or a list."""
    if hasattr(items, "select"):
        return items.select(np.asarray(indices, dtype=np.int64))
    return [items[int(i)] for i in indices]


def hold_out(items: Sequence, sizes: Sequence[int], fraction: float, seed: int):
    """(train items, their sizes per source, eval items): `fraction` of each source held out
    (at least one row of each), chosen with `seed`, so a mixture's shares apply to what is left."""
    train, held, new_sizes, at = [], [], [], 0
    for i, n in enumerate(sizes):
        order = list(range(at, at + n))
        random.Random(f"{seed}:holdout{i}").shuffle(order)
        k = min(n - 1, max(1, round(n * fraction))) if n > 1 else 0
        held += sorted(order[:k])
        train += sorted(order[k:])
        new_sizes.append(n - k)
        at += n
    return select(items, train), new_sizes, select(items, held)


def eval_split(train: list, sizes: list[int], evals: list, section, seed: int):
    """(train, sizes, evals) after `data.eval_fraction`, for examples held in lists (pairs,
    unpaired rows, prompts: every row kind's `assemble` calls it): a mixture holds out of each
    source (`hold_out`), concat one seeded draw over all rows, as before mixtures."""
    if section.eval_fraction <= 0 or not train:
        return train, sizes, evals
    if section.mixture != "concat":
        return hold_out(train, sizes, section.eval_fraction, seed)
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    held = set(order[:max(1, round(len(train) * section.eval_fraction))])
    kept = [i not in held for i in range(len(train))]
    return ([x for x, k in zip(train, kept) if k], sizes_left(sizes, kept),
            [train[i] for i in sorted(held)])


def sizes_left(sizes: Sequence[int], kept) -> list[int]:
    """Items left of each source where `kept` (one flag per item, source after source) is true."""
    kept = np.asarray(kept, dtype=bool)
    bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    return [int(kept[a:b].sum()) for a, b in zip(bounds[:-1], bounds[1:])]


def arrange(train, sizes, evals, eval_sizes, section, seed: int, stats):
    """(train, eval) items after the mixtures: train a `Mixture` (or the concatenated items for
    `concat`), eval one epoch of `data.eval_mixture`; `stats.sources` says per source what it
    has and gives per epoch. (A stream reads its train sources itself: none here.)"""
    if section.eval_mixture != "concat" and len(evals):
        chosen = mix(evals, eval_sizes, section.eval_mixture, section.eval_sources,
                     "eval_sources")
        evals = select(evals, chosen.first_epoch(seed))
    if sizes:
        train = mix(train, sizes, section.mixture, section.sources)
        describe_sources(stats, train, sizes, section.sources)
    return train, evals


def describe_sources(stats, train, sizes, sources, unit: str = "rows") -> None:
    """Per train source: items available, drawn per epoch, its share of an epoch's tokens."""
    bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    lengths = item_lengths(train.items if isinstance(train, Mixture) else train)
    counts = train.counts if isinstance(train, Mixture) else list(sizes)
    tokens = [int(lengths[a:b].sum()) * c / max(b - a, 1)
              for a, b, c in zip(bounds[:-1], bounds[1:], counts)]
    stats.sources = [{"path": s.path, "available": int(n), "per_epoch": int(c),
                      "token_share": t / max(sum(tokens), 1), "unit": unit}
                     for s, n, c, t in zip(sources, sizes, counts, tokens)]


# ------------------------------------------------------------------ what each source gave
def item_lengths(items) -> np.ndarray:
    lengths = getattr(items, "lengths", None)
    if lengths is None:
        lengths = [_tokens(ex) for ex in items]
    return np.asarray(lengths, dtype=np.int64)


def _tokens(ex) -> int:
    """Tokens an item puts through the model: both sides of a preference pair, an unpaired row's
    prompt and completion."""
    if hasattr(ex, "chosen_ids"):
        return len(ex.chosen_ids) + len(ex.rejected_ids)
    if hasattr(ex, "completion_ids"):
        return len(ex.prompt_ids) + len(ex.completion_ids)
    return len(ex.input_ids)


class SourceCounter:
    """Tokens and rows per source of a list of item indices: `count` returns
    [tokens of source 0, …, tokens of source K-1, rows of source 0, …]. `offsets`: where each
    source starts among the items, or (`within_packed`, packed sequences that may mix sources:
    concat with packing) among the rows the sequences are packed from, counted row by row."""

    def __init__(self, items, offsets, within_packed: bool = False):
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.k = len(self.offsets) - 1
        self.packed = items if within_packed else None
        self.base = items.rows if within_packed else items
        self._lengths = getattr(self.base, "lengths", None)

    def _length(self, row: int) -> int:
        if self._lengths is not None:
            return int(self._lengths[row])
        return _tokens(self.base[row])

    def rows_of(self, index: int) -> list[int]:
        if self.packed is None:
            return [index]
        a, b = int(self.packed.starts[index]), int(self.packed.starts[index + 1])
        return [int(r) for r in self.packed.order[a:b]]

    def count(self, indices) -> list[int]:
        out = [0] * (2 * self.k)
        for index in indices:
            for row in self.rows_of(index):
                i = int(np.searchsorted(self.offsets, row, side="right")) - 1
                out[i] += self._length(row)
                out[self.k + i] += 1
        return out


def source_summary(sources, described: list[dict], counts: list[int]) -> list[dict]:
    """summary.json's line per train source: what it had, what an epoch draws of it (None for
    a stream: unknown, or a `fixed` stream's rows_per_epoch), and what the run took of it."""
    k = len(sources)
    tokens, rows = counts[:k], counts[k:]
    out = []
    for i, source in enumerate(sources):
        d = described[i] if i < len(described) else {}
        out.append({"path": source.path, "format": source.format, "weight": source.weight,
                    "rows_available": d.get("available"),
                    "rows_per_epoch": d.get("per_epoch", source.rows_per_epoch),
                    "unit": d.get("unit", "rows"),
                    "rows_seen": rows[i] if rows else None,
                    "tokens_seen": tokens[i] if tokens else None,
                    "token_share": tokens[i] / max(sum(tokens), 1) if tokens else None})
    return out

