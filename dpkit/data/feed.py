"""A feed hands each rank its micro-batches for a step: the seam between data and the loop.

`RowFeed` serves rows held in memory (the tokenized dataset, possibly packed) with the seeded
per-epoch order of dpkit/data/load.py, `MixtureFeed` the draws of a data mixture's quota
schedule (dpkit/data/mixture.py): their position is the step itself, so a checkpoint needs no
data state. A feed for data that does not fit in memory (a stream) keeps its own position and
returns it from `state_dict()`, which the checkpoint stores with the run.

Feeds are indexed by *data-parallel* rank: with sequence parallelism the ranks of one
sequence-parallel group read the same rows (and split each row's sequence between them).
"""

from __future__ import annotations

import numpy as np

from dpkit.data import load as D
from dpkit.data import mixture as M


class RowFeed:
    def __init__(self, rows: list, seed: int, micro: int, accum: int, dp_rank: int,
                 dp_world: int, global_batch: int, collate, pad_id: int, flatten: bool = False,
                 group_by_length: bool = False, examples=None, counter=None):
        self.rows, self.seed, self.micro, self.accum = rows, seed, micro, accum
        self.global_batch, self.examples = global_batch, examples or plain_examples
        self.counter = counter  # tokens and rows per source (dpkit/data/mixture.SourceCounter)
        self.last_counts: list[int] = counter.count([]) if counter is not None else []
        self.dp_rank, self.dp_world, self.collate = dp_rank, dp_world, collate
        self.pad_id, self.flatten = pad_id, flatten
        self.lengths = None
        if group_by_length:  # lazily read rows carry their lengths
            lengths = getattr(rows, "lengths", None)
            self.lengths = [len(r.input_ids) for r in rows] if lengths is None else lengths
        self.steps_per_epoch = D.steps_per_epoch(len(rows), global_batch)
        self._order: tuple[int, list[int]] | None = None  # (epoch, its order): shuffled once

    def _epoch_order(self, epoch: int) -> list[int]:
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, D.epoch_order(len(self.rows), self.seed, epoch))
        return self._order[1]

    def step_rows(self, step: int) -> list[int]:
        """Every row index of step `step`'s global batch (the same on any world size): what a
        method precomputing per-step quantities before step 1 reads for every planned step."""
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        return self._epoch_order(epoch)[in_epoch * self.global_batch:
                                        (in_epoch + 1) * self.global_batch]

    def micro_batches(self, step: int) -> list[dict]:
        """This rank's collated CPU micro-batches for optimizer step `step` (0-based)."""
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        picks = D.step_micro_batches(len(self.rows), self.seed, epoch, in_epoch, self.dp_rank,
                                     self.dp_world, self.micro, self.accum, self.lengths,
                                     order=self._epoch_order(epoch))
        if self.counter is not None:
            self.last_counts = self.counter.count([i for idx in picks for i in idx])
        return [self.collate(examples, self.pad_id, flatten=self.flatten)
                for examples in self.examples(self.rows, picks, self.step_rows(step), step)]

    def epoch(self, step: int) -> int:
        return step // self.steps_per_epoch

    def state_dict(self) -> dict:
        return {}  # the position is the step

    def load_state_dict(self, state: dict) -> None:
        pass


class MixtureFeed:
    """This data-parallel rank's micro-batches of a `Mixture` (the position is the step, as for
    RowFeed): step s of an epoch takes the epoch's draws s·B … (s+1)·B-1 and rank r reads draws
    r, r+W, … of them — the same rows on any world size."""

    def __init__(self, mixture: M.Mixture, seed: int, micro: int, accum: int, dp_rank: int,
                 dp_world: int, global_batch: int, collate, pad_id: int, flatten: bool = False,
                 group_by_length: bool = False, examples=None):
        self.mixture, self.seed, self.micro, self.accum = mixture, seed, micro, accum
        self.dp_rank, self.dp_world, self.batch = dp_rank, dp_world, global_batch
        self.collate, self.pad_id, self.flatten = collate, pad_id, flatten
        self.examples = examples or plain_examples
        self.lengths = M.item_lengths(mixture.items) if group_by_length else None
        self.steps_per_epoch = D.steps_per_epoch(mixture.per_epoch, global_batch)
        self.counter = M.SourceCounter(mixture.items, mixture.offsets)
        self.last_counts: list[int] = [0] * (2 * len(mixture.sizes))

    def step_rows(self, step: int) -> list[int]:
        """Every item (index into the mixture) of step `step`'s global batch, in draw order:
        the same on any world size."""
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        start = in_epoch * self.batch
        return self.mixture.epoch_items(epoch, self.seed, self.batch, start,
                                        min(start + self.batch, self.mixture.per_epoch))

    def micro_batches(self, step: int) -> list[dict]:
        order = self.step_rows(step)
        picks = D.step_micro_batches(len(order), self.seed, 0, 0, self.dp_rank, self.dp_world,
                                     self.micro, self.accum,
                                     None if self.lengths is None else
                                     {j: self.lengths[i] for j, i in enumerate(order)},
                                     order=list(range(len(order))))
        mine = [[order[j] for j in idx] for idx in picks]
        self.last_counts = self.counter.count([i for idx in mine for i in idx])
        return [self.collate(examples, self.pad_id, flatten=self.flatten)
                for examples in self.examples(self.mixture, mine, order, step)]

    def epoch(self, step: int) -> int:
        return step // self.steps_per_epoch

    def state_dict(self) -> dict:
        return {}  # the position is the step

    def load_state_dict(self, state: dict) -> None:
        pass


class RepeatedFeed:
    """Each global batch of `feed` served `times` optimizer steps in a row (GRPO's μ steps per
    rollout batch): step s is the inner feed's step s // times, its micro-batches marked with
    `"iteration": s % times` so the objective knows a repeat from a new batch on every rank
    (also on one that holds no rows this step). Its rows are counted per source once, on the
    first of its steps. The position is the step, as the inner feed's."""

    def __init__(self, feed, times: int):
        self.feed, self.times = feed, times
        self.steps_per_epoch = feed.steps_per_epoch * times
        self.last_counts: list[int] = list(feed.last_counts)

    def step_rows(self, step: int) -> list[int]:
        return self.feed.step_rows(step // self.times)

    def micro_batches(self, step: int) -> list[dict]:
        batches = self.feed.micro_batches(step // self.times)
        iteration = step % self.times
        self.last_counts = (list(self.feed.last_counts) if iteration == 0 else
                            [0] * len(self.feed.last_counts))
        return [{**b, "iteration": iteration} for b in batches]

    def epoch(self, step: int) -> int:
        return self.feed.epoch(step // self.times)

    def state_dict(self) -> dict:
        return self.feed.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.feed.load_state_dict(state)


def plain_examples(rows, picks: list[list[int]], step_rows: list[int], step: int) -> list[list]:
    """The examples of each micro-batch: the picked rows themselves (a method whose examples
    need other rows of the global batch — KTO's mismatched pairs — brings its own function,
    `Objective.step_examples`, with the same arguments)."""
    return [[rows[i] for i in idx] for idx in picks]


EVAL_STEP = -1
"""The `step` an eval pass gives `examples` (its `step_rows` are all eval rows)."""


def eval_batches(rows: list, dp_rank: int, dp_world: int, micro: int, collate,
                 pad_id: int, examples=None) -> list[dict]:
    """This rank's collated eval batches (every rank gets the same number)."""
    picks = D.eval_micro_batches(len(rows), dp_rank, dp_world, micro)
    return [collate(group, pad_id) for group in
            (examples or plain_examples)(rows, picks, list(range(len(rows))), EVAL_STEP)]


def make_feed(recipe, rows, tokenizer, batch, dp_rank: int, collate, flatten: bool,
              examples=None, sizes: list[int] | None = None):
    """The feed of a run: rows in memory (or read lazily from the cache) — a mixture's drawn by
    its schedule (dpkit/data/mixture.py) — or a stream (rows None). `sizes`: rows of each source
    (concatenated in `rows`), for the tokens and rows counted per source."""
    from dpkit.data.packing import PackedRows
    from dpkit.data.stream import StreamFeed

    seed, pad = recipe.train.seed, tokenizer.pad_token_id
    args = (seed, batch.micro_batch_size, batch.grad_accum, dp_rank, batch.data_parallel)
    if rows is None:
        return StreamFeed(recipe.data, tokenizer, *args, collate, pad, flatten=flatten)
    if isinstance(rows, M.Mixture):
        return MixtureFeed(rows, *args, batch.global_batch_size, collate, pad, flatten=flatten,
                           group_by_length=recipe.data.group_by_length, examples=examples)
    counter = None
    if sizes is not None:
        offsets = [0, *np.cumsum(sizes).tolist()]
        counter = M.SourceCounter(rows, offsets, within_packed=isinstance(rows, PackedRows))
    return RowFeed(rows, *args, batch.global_batch_size, collate, pad, flatten=flatten,
                   group_by_length=recipe.data.group_by_length, examples=examples,
                   counter=counter)
