"""What a training method is to the loop: a batch in, a loss and its metrics out.

The loop (dpkit/step.py) computes every step as one process would: each objective says how many
*units* a batch holds (target tokens for supervised fine-tuning, pairs for preference objectives)
and returns the SUM of its loss over them. The loop all-reduces the units over ranks and
accumulation micro-batches before the backward passes and scales so that the gradient is
"sum over the global batch / global units" — whatever the world size and accumulation split.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dpkit.data.feed import plain_examples


@dataclass
class LossOut:
    loss: torch.Tensor
    """Sum of the loss over the micro-batch's units (a differentiable scalar)."""
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    """Sums over the same units (detached scalars); the loop divides by the global units."""


class Objective:
    """Base class: supervised next-token loss is the default behaviour of every hook."""

    name = "base"
    unit = "target tokens"
    metric_names: tuple[str, ...] = ()
    """Keys of LossOut.metrics, in a fixed order (every rank reduces the same list)."""
    rows_per_item = 1
    """Sequences one batch item puts through the model (the planner's memory and time)."""
    packs_rows = True
    """With `data.packing`, rows are packed into sequences before batching (dpkit/data/packing.py);
    False: the method lays its rows end to end per batch itself (its collate's `flatten`)."""
    reference = None
    """How a frozen reference model is evaluated: None, "adapter_off" (one more forward without
    gradient per micro-batch), "precomputed" (one forward per item before step 1) or
    "frozen_copy" (a frozen copy of the initial model, partitioned like the policy: one more
    forward per micro-batch, and its weights' memory)."""
    steps_per_batch = 1
    """Optimizer steps each global batch of rows is trained on (GRPO's μ, `grpo.iterations`):
    the loop serves every batch this many times in a row (dpkit/data/feed.py RepeatedFeed), so
    an epoch has this many times the steps, and the LR schedule counts every one."""
    rollout_load = None
    """What the objective generates per optimizer step, for the planner: the fields of a
    dpkit.plan.memory.Rollout (GRPO's completions), or None."""

    def setup(self, run) -> None:
        """Called once on every rank after the engine exists and before the first step (for
        example: reference log-probabilities). `run` is the dpkit.run.Run."""

    def step_examples(self, rows, picks: list[list[int]], step_rows: list[int], step: int
                      ) -> list[list]:
        """The examples of this rank's micro-batches: `picks` are row indices per micro-batch,
        `step_rows` every row index of the step's global batch (the same on any world size),
        `step` the optimizer step (-1: an eval pass, whose `step_rows` are all eval rows).
        Default: the picked rows. Override to pair a row with others of its global batch."""
        return plain_examples(rows, picks, step_rows, step)

    def rollout(self, engine, micro_batches: list[dict], env) -> list[dict]:
        """Called with this rank's collated CPU micro-batches of a step (or all its eval batches)
        before anything in them is counted: an online method turns its prompts into the
        sequences it trains on here (GRPO generates completions and scores them), so units,
        tokens and rows are counted on what is trained. Every rank calls it, with as many
        micro-batches as the others (collectives allowed). Default: unchanged."""
        return micro_batches

    def step_metrics(self) -> dict[str, float]:
        """Metrics of the last step (or eval pass) as a whole, already reduced over the ranks
        (a rollout's reward mean and std, its longest completion): merged into the step's
        metrics as they are, not divided by the units. Default: none."""
        return {}

    def state_dict(self, env) -> dict | None:
        """What the objective must keep across a checkpoint to continue bitwise (GRPO's rollout
        batch between its μ steps), gathered onto the main rank; None: nothing. Called on every
        rank when a checkpoint is saved (collectives allowed)."""
        return None

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`'s value when resuming (on every rank, any world size)."""

    def prepare(self, engine, micro_batches: list[dict], env) -> None:
        """Called with this rank's device micro-batches of a step (or all its eval batches)
        before any forward of the loss: a quantity of the whole global batch (KTO's KL
        reference point) is computed here, without gradients, and all-reduced, so it is the
        same on any world size. Every rank calls it (collectives allowed)."""

    def collate(self, examples: list, pad_id: int, flatten: bool = False) -> dict:
        """Examples → one CPU batch (tensors)."""
        from dpkit.data import collate

        return collate(examples, pad_id, flatten=flatten)

    def count(self, batch: dict) -> int:
        """Units in a CPU batch (counted before moving it: no device readback)."""
        raise NotImplementedError

    def loss(self, engine, batch: dict) -> LossOut:
        """Forward the device batch through `engine`; the loss summed over the batch's units."""
        raise NotImplementedError

    def per_unit(self, metrics: dict[str, float]) -> dict[str, float]:
        """The metrics as logged, from the reduced sums of `metric_names` divided by the global
        units (what the loop computes). A method whose metric is a mean over some units only
        (KTO's desirable rows) returns their count as a metric too and divides here. Default:
        unchanged."""
        return metrics

    @property
    def forwards_without_grad(self) -> int:
        """Forwards without gradient per micro-batch besides the loss's own, each of the batch's
        size (the planner's step time and ZeRO-3 gathers): an adapter-off reference is one."""
        return 1 if self.reference in ("adapter_off", "frozen_copy") else 0

    def progress(self, metrics: dict[str, float]) -> dict[str, str]:
        """Short readings for the progress bar, from a step's metrics (per unit)."""
        return {}

    def describe(self) -> str:
        return self.name

    def card(self) -> dict:
        """What summary.json says about the objective: its name and settings."""
        return {"objective": self.name}

    def card_rows(self) -> list[tuple[str, object]]:
        """(label, value) rows of the model card's training table, after the objective's name:
        the settings a reader needs to reproduce the run (default: every `card()` entry)."""
        return [(k, v) for k, v in self.card().items() if k != "objective"]
