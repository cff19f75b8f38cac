"""A feed hands each rank its micro-batches for a step: the seam between data and the loop.

`RowFeed` serves rows held in memory (the tokenized dataset, possibly packed) with the seeded
per-epoch order of dpkit/data/load.py: its position is the step itself, so a checkpoint needs no
data state. A feed for data that does not fit in memory (a stream) keeps its own position and
returns it from `state_dict()`, which the checkpoint stores with the run.

Feeds are indexed by *data-parallel* rank: with sequence parallelism the ranks of one
sequence-parallel group read the same rows (and split each row's sequence between them).
"""

from __future__ import annotations

from dpkit.data import load as D


class RowFeed:
    def __init__(self, rows: list, seed: int, micro: int, accum: int, dp_rank: int,
                 dp_world: int, global_batch: int, collate, pad_id: int, flatten: bool = False,
                 group_by_length: bool = False):
        self.rows, self.seed, self.micro, self.accum = rows, seed, micro, accum
        self.dp_rank, self.dp_world, self.collate = dp_rank, dp_world, collate
        self.pad_id, self.flatten = pad_id, flatten
        self.lengths = [len(r.input_ids) for r in rows] if group_by_length else None
        self.steps_per_epoch = D.steps_per_epoch(len(rows), global_batch)

    def micro_batches(self, step: int) -> list[dict]:
        """This rank's collated CPU micro-batches for optimizer step `step` (0-based)."""
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        picks = D.step_micro_batches(len(self.rows), self.seed, epoch, in_epoch, self.dp_rank,
                                     self.dp_world, self.micro, self.accum, self.lengths)
        return [self.collate([self.rows[i] for i in idx], self.pad_id, flatten=self.flatten)
                for idx in picks]

    def epoch(self, step: int) -> int:
        return step // self.steps_per_epoch

    def state_dict(self) -> dict:
        return {}  # the position is the step

    def load_state_dict(self, state: dict) -> None:
        pass


def eval_batches(rows: list, dp_rank: int, dp_world: int, micro: int, collate,
                 pad_id: int) -> list[dict]:
    """This rank's collated eval batches (every rank gets the same number)."""
    return [collate([rows[i] for i in idx], pad_id)
            for idx in D.eval_micro_batches(len(rows), dp_rank, dp_world, micro)]
