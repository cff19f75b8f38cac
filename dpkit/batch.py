"""The batch rule, in one place: global = micro × accumulation × data-parallel world.

Every caller — the checks before launch, each rank, the DeepSpeed config, the planner — asks
`batch_arithmetic` (or `plan_batch` for numbers not in a recipe) and never multiplies on its own.
With sequence parallelism the ranks of one sequence-parallel group share each row, so only
world / sequence_parallel ranks add rows to the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

from dpkit.errors import RecipeError


@dataclass(frozen=True)
class BatchPlan:
    global_batch_size: int
    """Rows (packed: sequences) per optimizer step over all ranks."""
    micro_batch_size: int
    """Rows per forward pass on one data-parallel rank."""
    grad_accum: int
    """Micro-batches per optimizer step on each rank (derived, never written in a recipe)."""
    world_size: int
    """All ranks of the job."""
    sequence_parallel: int = 1
    """Ranks that split each row's sequence between them (1: no sequence parallelism)."""
    unit: str = "rows"
    """What the batch counts: rows, or packed sequences."""

    @property
    def data_parallel(self) -> int:
        """Ranks that read different rows."""
        return self.world_size // self.sequence_parallel

    def describe(self) -> str:
        world = (f"data-parallel {self.data_parallel} (world {self.world_size} / sequence-parallel "
                 f"{self.sequence_parallel})" if self.sequence_parallel > 1
                 else f"world {self.world_size}")
        unit = "" if self.unit == "rows" else f" {self.unit}"
        sp = self.sequence_parallel
        # dpkit/parallel/sequence.py pads each micro-batch to a multiple of sp (rows have any
        # length, so no recipe value could make them all divisible)
        split = (f"; each row's sequence split over {sp} ranks (DeepSpeed Ulysses: attention heads "
                 f"exchanged all-to-all), micro-batches padded to a multiple of {sp} tokens"
                 if sp > 1 else "")
        return (f"global batch {self.global_batch_size}{unit} = micro {self.micro_batch_size} × "
                f"accumulation {self.grad_accum} × {world}{split}")


def plan_batch(global_batch: int, micro: int, world_size: int, sequence_parallel: int = 1,
               unit: str = "rows") -> BatchPlan:
    """Derive gradient accumulation; refuse a global batch that doesn't split evenly."""
    if world_size % sequence_parallel:
        raise RecipeError.one("train.sequence_parallel",
                              f"{sequence_parallel} does not divide the world size {world_size}",
                              "use a divisor of the number of ranks")
    dp = world_size // sequence_parallel
    per_step = micro * dp
    if global_batch % per_step:
        lower, upper = (global_batch // per_step) * per_step, (global_batch // per_step + 1) * per_step
        options = " or ".join(str(v) for v in (lower, upper) if v > 0)
        world = (f"data-parallel ranks = {micro} × {dp} (world {world_size} / sequence-parallel "
                 f"{sequence_parallel})" if sequence_parallel > 1 else f"world size = {micro} × "
                 f"{world_size}")
        raise RecipeError.one(
            "train.global_batch_size",
            f"{global_batch} is not divisible by micro_batch_size × {world} = {per_step}",
            f"set it to {options}, or change train.micro_batch_size")
    return BatchPlan(global_batch, micro, global_batch // per_step, world_size, sequence_parallel,
                     unit)


def without_accumulation(micro: int, world_size: int, sequence_parallel: int = 1,
                         unit: str = "rows") -> BatchPlan:
    """The batch of one micro-batch per data-parallel rank (the planner's "free" global batch
    and weak scaling): micro × data-parallel ranks, never micro × world — the ranks of a
    sequence-parallel group share their rows."""
    dp = world_size // sequence_parallel
    return plan_batch(micro * dp, micro, world_size, sequence_parallel, unit)


def batch_arithmetic(recipe, world_size: int) -> BatchPlan:
    """The recipe's batch on `world_size` ranks."""
    t = recipe.train
    return plan_batch(t.global_batch_size, t.micro_batch_size, world_size,
                      getattr(t, "sequence_parallel", 1),
                      "sequences" if recipe.data.packing else "rows")
