"""The parallel layout of a job: how its ranks split the work, in one object built once.

ZeRO's stage and offload (what is partitioned over the data-parallel ranks, and where it lives),
the data-parallel × sequence-parallel world, and the batch on it (dpkit/batch.py's rule). The
ranks build it in `Run.setup` and hand it to whatever needs to know — model loading, generation,
the final save, checkpoint conversion, the summary — instead of each branching on the recipe's
`zero.stage` or re-deriving the world; preflight and the planner build the same object from the
recipe and a world size. A checkpoint stores the stage and world it was written with, and a
different layout on resume goes through the universal format (dpkit/checkpoint.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from dpkit.batch import BatchPlan, batch_arithmetic


@dataclass(frozen=True)
class Layout:
    stage: int
    """ZeRO stage: 0 replicates everything; 1 partitions optimizer state, 2 also gradients, 3 also
    parameters over the data-parallel ranks."""
    offload_optimizer: str
    """Where optimizer state lives between steps: none (the accelerator), cpu, nvme."""
    offload_params: str
    """Where stage-3 parameters live between uses: none, cpu, nvme."""
    batch: BatchPlan
    """The batch on this world (global = micro × accumulation × data-parallel ranks)."""
    expert_parallel: int = 1
    """Ranks each mixture-of-experts layer's experts are split over (DeepSpeed AutoEP,
    `moe.expert_parallel`); they still read different rows, so the data-parallel world is
    unchanged, and ZeRO partitions a rank's experts over the ranks holding the same ones."""

    @property
    def world_size(self) -> int:
        return self.batch.world_size

    @property
    def sequence_parallel(self) -> int:
        return self.batch.sequence_parallel

    @property
    def data_parallel(self) -> int:
        return self.batch.data_parallel

    @property
    def expert_data_parallel(self) -> int:
        """Ranks holding the same experts (ZeRO partitions and reduces experts over these)."""
        return self.data_parallel // self.expert_parallel

    @property
    def partitions_parameters(self) -> bool:
        """No rank holds the whole model: a forward gathers each layer, generation gathers once,
        a save consolidates the partitions, a pretrained model loads partitioned."""
        return self.stage == 3

    @property
    def partitions_gradients(self) -> bool:
        return self.stage >= 2

    @property
    def partitions_optimizer(self) -> bool:
        return self.stage >= 1

    def partitioned(self) -> str:
        """What is split over the data-parallel ranks, in words."""
        parts = ["optimizer state", "gradients", "parameters"][:self.stage]
        if not parts:
            return "nothing partitioned: every rank holds everything"
        return f"{', '.join(parts)} partitioned over {self.data_parallel} data-parallel ranks"

    def describe(self) -> str:
        where = [f"optimizer state on {self.offload_optimizer}"
                 if self.offload_optimizer != "none" else "",
                 f"parameters on {self.offload_params}" if self.offload_params != "none" else ""]
        extra = "".join(f", {w}" for w in where if w)
        if self.expert_parallel > 1:
            extra += (f", experts split over {self.expert_parallel} ranks (tokens sent to "
                      f"their experts all-to-all), each expert's states over "
                      f"{self.expert_data_parallel}")
        return f"ZeRO stage {self.stage} ({self.partitioned()}{extra})"


def layout_of(recipe, world_size: int) -> Layout:
    """The recipe's layout on `world_size` ranks (refuses a batch that does not split)."""
    z = recipe.zero
    moe = getattr(recipe, "moe", None)
    return Layout(z.stage, z.offload_optimizer, z.offload_params,
                  batch_arithmetic(recipe, world_size),
                  moe.expert_parallel if moe is not None else 1)
