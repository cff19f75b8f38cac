"""Reward modelling declared: a Bradley-Terry score model trained on preference pairs (the
`preference` data format), its recipe section `reward:` and its checks. The runtime is
dpkit/objectives/reward.py; the model is a sequence classifier with one score per row.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from dpkit.methods.spec import MethodSpec


class RewardSection(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True,
                              validate_assignment=True)

    margin_column: str | None = None
    """A column of the preference data holding each pair's margin m, a number: the loss becomes
    −log σ(r_chosen − r_rejected − m), so the chosen answer must win by at least m (Llama 2's
    graded preferences; TRL's `margin` column). None: no margin."""
    center_rewards_coefficient: float = Field(default=0.0, ge=0.0)
    """Weight of (r_chosen + r_rejected)² added to each pair's loss, which keeps the scores
    centred on 0 (Eisenstein et al. 2023; TRL's `center_rewards_coefficient`, e.g. 0.01). 0: off."""


def reward_problems(recipe) -> list[str]:
    """Checks between the reward model and the rest of the recipe (after the registry's own:
    the preference format, no streaming, no other method's section)."""
    if recipe.train.sequence_parallel > 1:  # a row's score is read at its last token
        return [f"`train.sequence_parallel: {recipe.train.sequence_parallel}` does not work with "
                "`objective: reward`: a row's score is read at its last token, which the split "
                "puts on one rank, and a pair's two rows would be cut apart; set "
                "`train.sequence_parallel: 1`"]
    if recipe.eval.prompts or recipe.eval.tasks:
        key = "eval.prompts" if recipe.eval.prompts else "eval.tasks"
        return [f"`{key}` needs a model that writes text (generations, lm-eval); a reward model "
                "gives one score per row; remove it (eval loss and accuracy on the eval pairs "
                "are logged)"]
    if recipe.compute.loss == "tiled":
        return ["`compute.loss: tiled` tiles a vocabulary's logits; a reward model's head gives "
                "one number per token; remove it"]
    return []


def _options(recipe) -> dict:
    """The pairs' tokens are the preference format's; a margin column adds a number per pair."""
    column = (recipe.reward or RewardSection()).margin_column
    return ({"pair_numbers": {"margin": {"column": column, "key": "reward.margin_column"}}}
            if column else {})


METHODS = {"reward": MethodSpec("dpkit.objectives.reward:Reward", formats=("preference",),
                                section="reward", settings=RewardSection, problems=reward_problems,
                                data_options=_options, head="sequence_classification",
                                streams=False,
                                doc="reward model: Bradley-Terry loss on preference pairs, one "
                                    "score per row (a sequence-classification head)")}
