"""The recipe's `preference:` section and the checks between the objective, its section, the
data and LoRA (the objectives themselves are dpkit/objectives/preference.py).

Its own module to keep dpkit/recipe.py short; recipe.py imports it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from dpkit.names import methods_with


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True,
                              validate_assignment=True)


class PreferenceSection(_Section):
    beta: float | None = Field(default=None, gt=0)
    """Strength of the preference: DPO/IPO's KL-penalty coefficient β (default 0.1), SimPO's
    reward scale β (default 2.0). ORPO weighs its odds-ratio term with `orpo_lambda` instead."""
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=0.5)
    """DPO/SimPO: assumed probability that a pair's labels are flipped (conservative DPO);
    0 is the plain sigmoid loss."""
    simpo_gamma: float = Field(default=1.0, ge=0.0)
    """SimPO's target reward margin γ (subtracted inside the sigmoid)."""
    orpo_lambda: float = Field(default=0.1, gt=0)
    """ORPO: weight λ of the odds-ratio term added to the chosen answers' NLL."""
    reference: Literal["auto", "adapter_off", "precomputed"] = "auto"
    """DPO/IPO's reference model. `adapter_off`: with LoRA, the base model with the adapter turned
    off (one more forward per step, no second copy); `precomputed`: the untouched model's
    log-probs of every pair computed once before step 1 and cached in the run directory
    (`ref_logps.pt`). `auto`: adapter_off with LoRA, precomputed for full fine-tuning."""
    max_prompt_len: int | None = Field(default=None, gt=0)
    """Keep at most this many prompt tokens (the last ones); the answers are then cut to
    `data.max_seq_len`. Cut pairs are counted and reported at start."""

    def resolved_beta(self, objective: str) -> float:
        return self.beta if self.beta is not None else (2.0 if objective == "simpo" else 0.1)

    def resolved_reference(self, lora: bool) -> str:
        if self.reference != "auto":
            return self.reference
        return "adapter_off" if lora else "precomputed"


PREFERENCE_OBJECTIVES = methods_with("preference")
_LISTED = ", ".join(PREFERENCE_OBJECTIVES)


def preference_problems(recipe) -> list[str]:
    """Cross-field checks between the objective, its section, the data and LoRA."""
    name, pref = recipe.objective, recipe.preference
    formats = {s.format for s in [*recipe.data.sources, *recipe.data.eval_sources]}
    if name not in PREFERENCE_OBJECTIVES:
        if pref is not None:
            return [f"a `preference` section needs a preference `objective` ({_LISTED}); "
                    "remove the section or set `objective`"]
        if "preference" in formats:
            return [f"data format `preference` needs a preference `objective` ({_LISTED})"]
        return []
    if formats != {"preference"}:
        return [f"`objective: {name}` trains on pairs: every data source needs "
                f"`format: preference` (got {sorted(formats)})"]
    if recipe.train.sequence_parallel > 1:  # refused, not silently wrong: every rank crashed
        return [f"`train.sequence_parallel: {recipe.train.sequence_parallel}` does not work with "
                f"`objective: {name}`: a pair's log-probs are summed over its whole sequence and "
                "the split loses which pair a slice belongs to; set `train.sequence_parallel: 1` "
                "(the tiled loss, `compute.loss`, keeps long pairs' logits small)"]
    if recipe.data.streaming:
        return [f"`data.streaming` does not work with `objective: {name}`: preference pairs are "
                "tokenized whole and held in memory (dpkit/data/preference.py), not streamed; "
                "set `data.streaming: false`"]
    pref = pref or PreferenceSection()
    if pref.reference == "adapter_off" and recipe.peft is None:
        return ["`preference.reference: adapter_off` needs LoRA (a `peft` section); use "
                "`precomputed` for full fine-tuning"]
    if pref.label_smoothing and name in ("ipo", "orpo"):
        return [f"`preference.label_smoothing` has no meaning for `objective: {name}`; remove it"]
    return []


def check_objective(recipe):
    """The Recipe's validator (pydantic "after" mode): the first problem, raised."""
    for problem in preference_problems(recipe):
        raise ValueError(problem)
    return recipe
