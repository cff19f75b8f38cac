"""KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization")
declared: its recipe section `kto:`, the `unpaired` data format (TRL's layout: `prompt`,
`completion`, a boolean `label`) and its checks. The runtime — rows, the reference point z₀, the
loss — is dpkit/objectives/kto.py.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from dpkit.methods.spec import FormatSpec, MethodSpec


class KTOSection(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True,
                              validate_assignment=True)

    beta: float = Field(default=0.1, gt=0)
    """β: scales the implied reward β·(log π(y|x) − log ρ(y|x)) inside the sigmoid (TRL's default
    0.1)."""
    desirable_weight: float = Field(default=1.0, gt=0)
    """λ_D: weight of the rows labelled true. With unequal classes the paper advises
    λ_D·n_D / (λ_U·n_U) in [1, 4/3]; the start-up report says where the data puts it."""
    undesirable_weight: float = Field(default=1.0, gt=0)
    """λ_U: weight of the rows labelled false."""
    reference: Literal["auto", "adapter_off", "precomputed"] = "auto"
    """The reference model ρ. `adapter_off`: with LoRA, the base model with the adapter turned
    off (more forwards without gradient per step, no second copy); `precomputed`: the untouched
    model's log-probs of every row, and of every mismatched row z₀ uses in every planned step,
    computed once before step 1 and cached in the run directory (`ref_logps.pt`, reused on
    resume). `auto`: adapter_off with LoRA, precomputed for full fine-tuning."""
    max_prompt_len: int | None = Field(default=None, gt=0)
    """Keep at most this many prompt tokens (the last ones); the completion is then cut to
    `data.max_seq_len`. Cut rows are counted and reported at start."""

    def resolved_reference(self, lora: bool) -> str:
        if self.reference != "auto":
            return self.reference
        return "adapter_off" if lora else "precomputed"


def kto_problems(recipe) -> list[str]:
    """Checks between KTO, its section and the rest of the recipe (the registry's own — formats,
    streaming, a section without its method — come first)."""
    kto = recipe.kto or KTOSection()
    if recipe.train.sequence_parallel > 1:
        return [f"`train.sequence_parallel: {recipe.train.sequence_parallel}` does not work with "
                "`objective: kto`: a row's log-prob is summed over its whole sequence and the "
                "split loses which row a slice belongs to; set `train.sequence_parallel: 1`"]
    if kto.reference == "adapter_off" and recipe.peft is None:
        return ["`kto.reference: adapter_off` needs LoRA (a `peft` section); use `precomputed` "
                "for full fine-tuning"]
    if recipe.train.global_batch_size < 2:
        return ["`train.global_batch_size: 1` does not work with `objective: kto`: its reference "
                "point z₀ pairs each row with another row's completion of the same global batch; "
                "set `train.global_batch_size` to 2 or more"]
    return []


def _options(recipe) -> dict:
    return {"max_prompt_len": (recipe.kto or KTOSection()).max_prompt_len}


FORMATS = {"unpaired": FormatSpec(("prompt", "completion", "label"),
                                  rows="dpkit.objectives.kto:UNPAIRED", trained="completion",
                                  text_or_list=True, booleans=("label",),
                                  doc="prompt/completion (strings or message lists) with a "
                                      "boolean label: desirable or not (KTO)")}

METHODS = {"kto": MethodSpec("dpkit.objectives.kto:KTO", formats=("unpaired",), section="kto",
                             settings=KTOSection, problems=kto_problems, data_options=_options,
                             streams=False,
                             doc="Kahneman-Tversky optimisation on unpaired rows "
                                 "(Ethayarajh et al. 2024)")}
