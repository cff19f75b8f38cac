"""The recipe's `moe:` section: what a mixture-of-experts model needs beyond a dense one — the
router's load-balancing loss, ZeRO-3 leaf modules, expert parallelism (docs/moe.md). A dense
model ignores it. The runtime is dpkit/moe.py.

Its own module to keep dpkit/recipe.py a list of sections.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class MoeSection(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True,
                              validate_assignment=True)

    aux_loss_coef: float | None = Field(default=None, ge=0)
    """Weight of the router's load-balancing loss added to the objective's (computed per
    micro-batch, averaged over the step's micro-batches, logged as `aux_loss`). Default: the
    model's own `router_aux_loss_coef`; 0 turns it off."""
    zero3_leaf_modules: list[str] | None = None
    """ZeRO-3: class names of the modules gathered whole when entered (DeepSpeed leaf modules).
    Default: found from the model — every block holding one module per expert (its experts
    run data-dependently, so without this ranks disagree on what to gather and hang) plus
    DeepSpeed's own list; a list replaces that, `[]` declares none."""
    expert_parallel: int = Field(default=1, gt=0)
    """Ranks each MoE layer's experts are split over (DeepSpeed AutoEP: tokens go to their
    experts' rank all-to-all); the ranks still read different rows. 1: every rank holds every
    expert."""
