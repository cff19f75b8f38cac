"""The preference methods (DPO, IPO, SimPO, ORPO) declared: their recipe section `preference:`,
the `preference` data format, and the checks between the objective, its section, the data and
LoRA. The runtime is dpkit/objectives/preference.py; the pairs' tokenizer dpkit/data/preference.py.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from dpkit.methods.spec import FormatSpec, MethodSpec


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


def preference_problems(recipe) -> list[str]:
    """Checks between the objective, its section, the data and the rest of the recipe (the
    registry's own — formats, streaming, a section without its method — come first)."""
    name, pref = recipe.objective, recipe.preference
    if recipe.train.sequence_parallel > 1:  # refused, not silently wrong: every rank crashed
        return [f"`train.sequence_parallel: {recipe.train.sequence_parallel}` does not work with "
                f"`objective: {name}`: a pair's log-probs are summed over its whole sequence and "
                "the split loses which pair a slice belongs to; set `train.sequence_parallel: 1` "
                "(the tiled loss, `compute.loss`, keeps long pairs' logits small)"]
    pref = pref or PreferenceSection()
    if pref.reference == "adapter_off" and recipe.peft is None:
        return ["`preference.reference: adapter_off` needs LoRA (a `peft` section); use "
                "`precomputed` for full fine-tuning"]
    if pref.label_smoothing and name in ("ipo", "orpo"):
        return [f"`preference.label_smoothing` has no meaning for `objective: {name}`; remove it"]
    return []


def _options(recipe) -> dict:
    pref = recipe.preference or PreferenceSection()
    return {"max_prompt_len": pref.max_prompt_len}


FORMATS = {"preference": FormatSpec(("prompt", "chosen", "rejected"),
                                    rows="dpkit.data.preference:PAIRS", trained="chosen",
                                    text_or_list=True,
                                    doc="prompt/chosen/rejected pairs (strings or message lists)")}

_PAIRS = dict(formats=("preference",), section="preference", settings=PreferenceSection,
              problems=preference_problems, data_options=_options, streams=False)
METHODS = {name: MethodSpec("dpkit.objectives.preference:Preference", doc=doc, **_PAIRS)
           for name, doc in [("dpo", "direct preference optimisation (Rafailov et al. 2023)"),
                             ("ipo", "identity preference optimisation (Azar et al. 2023)"),
                             ("simpo", "simple preference optimisation (Meng et al. 2024)"),
                             ("orpo", "odds-ratio preference optimisation (Hong et al. 2024)")]}
