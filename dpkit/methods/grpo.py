"""GRPO declared: online RL with verifiable rewards (Shao et al. 2024, DeepSeekMath), its recipe
section `grpo:`, the `prompts` data format (prompt-only rows; their other columns reach the reward
functions) and the checks between them and the rest of the recipe. The runtime — rollouts,
rewards, the loss — is dpkit/objectives/grpo.py; the shipped rewards dpkit/objectives/
grpo_rewards.py; docs/grpo.md describes the method.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from dpkit.methods.spec import FormatSpec, MethodSpec


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True,
                              validate_assignment=True)


SHIPPED_REWARDS = {
    "math_answer": "1 when the completion's final number equals the answer column's (GSM8K's "
                   "`#### n`, or a `\\boxed{}` answer), else 0",
    "format": "1 when the completion matches `pattern` (a regular expression, searched), else 0",
    "length": "−|completion tokens − `target`| / `target`: 0 at the target length, lower away "
              "from it",
    "char_share": "the share of the completion's characters that are in the answer column's "
                  "text (a dense toy reward: the quickstart's)",
}
"""The reward functions dpkit ships, by name → what they give each completion."""


class RewardSpec(_Section):
    function: str
    """A shipped reward by name (`math_answer`, `format`, `length`, `char_share`) or your own as
    `path/to/file.py:function` (called with `completions`, `prompts`, `completion_ids` and every
    other column of the rows as lists, one entry per completion; returns one float each). A
    recipe naming a file runs its code: validate and train say so in one line first."""
    weight: float = 1.0
    """Its weight in the total reward (the weighted sum of every function's)."""
    column: str = "answer"
    """`math_answer`, `char_share`: the data column holding the answer."""
    pattern: str | None = None
    """`format`: the regular expression a completion must contain (Python `re.search`, DOTALL)."""
    target: int | None = Field(default=None, gt=0)
    """`length`: the target completion length in tokens."""

    @field_validator("function")
    @classmethod
    def _known(cls, value: str) -> str:
        if value in SHIPPED_REWARDS or user_reward(value):
            return value
        raise ValueError(f"`{value}` is neither a shipped reward ({', '.join(SHIPPED_REWARDS)}) "
                         "nor `path/to/file.py:function`")

    @property
    def file(self) -> str | None:
        return user_reward(self.function)


def user_reward(function: str) -> str | None:
    """The file of a user's reward (`path.py:function`), or None for a shipped name."""
    path, sep, name = function.rpartition(":")
    return path if sep and path.endswith(".py") and name.isidentifier() else None


class GRPOSection(_Section):
    group_size: int = Field(default=8, ge=2)
    """G: completions sampled per prompt. Advantages compare a completion with its group's."""
    max_completion_len: int = Field(default=256, gt=0)
    """Most tokens generated per completion (a completion without eos by then is truncated)."""
    max_prompt_len: int | None = Field(default=None, gt=0)
    """Keep at most this many prompt tokens (the last ones); cut prompts are counted. Default:
    `data.max_seq_len` − `max_completion_len`."""
    temperature: float = Field(default=1.0, gt=0)
    """Sampling temperature; the loss's log-probs use the same temperature (as TRL's)."""
    top_p: float = Field(default=1.0, gt=0, le=1)
    """Nucleus sampling: sample among the most likely tokens whose probabilities sum to top_p."""
    loss_type: Literal["dapo", "grpo", "dr_grpo"] = "dapo"
    """`dapo`: token-level, the sum over every completion token of the global batch divided by
    their number (TRL's default); `grpo`: each completion's mean over its tokens, averaged over
    completions; `dr_grpo`: each completion's sum divided by `max_completion_len`, averaged."""
    epsilon: float = Field(default=0.2, gt=0, lt=1)
    """Clip ε (low): the ratio π/π_old is clipped below at 1 − ε."""
    epsilon_high: float | None = Field(default=None, gt=0)
    """Clip ε high: clipped above at 1 + ε_high (DAPO's clip-higher); default `epsilon`."""
    beta: float = Field(default=0.0, ge=0)
    """KL weight β: β·(ρ/π − log(ρ/π) − 1) per completion token (the k3 estimator, TRL's),
    logged as `kl`. 0: no reference model. β > 0: the reference is the base model with the
    adapter off under LoRA (one more forward per micro-batch), else a frozen copy of the initial
    model partitioned like the policy (under ZeRO-3 over the ranks; `dpkit plan` counts it)."""
    iterations: int = Field(default=1, ge=1)
    """μ: optimizer steps per rollout batch. Each batch is trained on μ steps in a row against
    the old log-probs computed once after its rollout (the clip bounds the ratio); steps,
    epochs and the LR schedule count optimizer steps (an epoch is μ × its rollout batches, as
    TRL's `num_iterations`). A checkpoint between them keeps the batch: resume is bitwise."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Advantage = (reward − group mean) / std, the std of its group (`group`), of the whole
    global batch (`batch`), or not divided (`none`, Dr. GRPO)."""
    mask_truncated: bool = False
    """Completions that reach `max_completion_len` without eos add nothing to the loss (DAPO)."""
    rollout: Literal["reproducible", "fast"] = "reproducible"
    """`reproducible`: each prompt's G samples generated as their own batch, each sample drawn
    from a generator seeded by (train.seed, step, prompt, sample): the same completions on any
    number of ranks. `fast`: a rank's prompts generated in one padded batch from the same
    generators (padding changes rounding, so the completions may differ with the world size)."""
    rewards: list[RewardSpec] = Field(default_factory=list, min_length=1)
    """The reward functions and their weights (at least one)."""
    log_completions: int = Field(default=1, ge=0)
    """Prompts (with their G completions and rewards) written to samples.jsonl per logged step."""

    def resolved_epsilon_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    def resolved_max_prompt_len(self, max_seq_len: int) -> int:
        return self.max_prompt_len or max(1, max_seq_len - self.max_completion_len)


def _section(recipe) -> GRPOSection | None:
    return recipe.grpo


def grpo_problems(recipe) -> list[str]:
    g = _section(recipe)
    if g is None:
        return ["`objective: grpo` needs a `grpo` section with its `rewards` (for example "
                "`grpo: {rewards: [{function: math_answer}]}`)"]
    if recipe.train.sequence_parallel > 1:
        return [f"`train.sequence_parallel: {recipe.train.sequence_parallel}` does not work with "
                "`objective: grpo`: rollouts generate whole sequences per rank; set "
                "`train.sequence_parallel: 1`"]
    if recipe.data.packing:
        return ["`data.packing` does not work with `objective: grpo`: its rows are prompts "
                "whose completions are generated per step; set `data.packing: false`"]
    if g.resolved_max_prompt_len(recipe.data.max_seq_len) + g.max_completion_len > \
            recipe.data.max_seq_len:
        return [f"`grpo.max_prompt_len` + `grpo.max_completion_len` exceed `data.max_seq_len` "
                f"({recipe.data.max_seq_len}); lower them or raise data.max_seq_len"]
    for i, r in enumerate(g.rewards):
        if r.function == "format" and not r.pattern:
            return [f"`grpo.rewards[{i}]` (format) needs a `pattern`"]
        if r.function == "length" and not r.target:
            return [f"`grpo.rewards[{i}]` (length) needs a `target`"]
    return []


def reward_code_notes(recipe) -> list[str]:
    """One visible line per Python file a recipe's rewards name: training imports and runs it."""
    g = _section(recipe)
    files = sorted({r.file for r in (g.rewards if g else []) if r.file})
    return [f"warning: grpo.rewards runs Python code from {Path(f).expanduser()} on every rank "
            "(validate did not run it); keep it only for code you trust" for f in files]


def _options(recipe) -> dict:
    g = recipe.grpo or GRPOSection()
    return {"max_prompt_len": g.resolved_max_prompt_len(recipe.data.max_seq_len)}


FORMATS = {"prompts": FormatSpec(("prompt",), rows="dpkit.objectives.grpo:PROMPTS",
                                 text_or_list=True,
                                 doc="prompts alone (strings or message lists); their other "
                                     "columns (an answer, tests) reach the reward functions")}

METHODS = {"grpo": MethodSpec("dpkit.objectives.grpo:GRPO", formats=("prompts",),
                              section="grpo", settings=GRPOSection, problems=grpo_problems,
                              data_options=_options, streams=False, notes=reward_code_notes,
                              doc="group relative policy optimisation, online RL with verifiable "
                                  "rewards (Shao et al. 2024)")}
