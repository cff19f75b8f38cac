"""The recipe's `eval` section. Kept apart from recipe.py (which imports it) like hub_schema."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from dpkit import shipped


class EvalSection(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)

    baseline: bool = True
    """Compute eval loss (and generations) before the first step: the step-0 baseline every curve
    is read against. Not repeated when a run resumes past step 0."""
    prompts: list[str] = Field(default_factory=list)
    """Prompts to generate from at every eval, written as a user would ask; the first source's
    format renders them as it renders its training rows up to the answer: the alpaca template; the
    chat template (one user turn) for `messages`, for `prompt_completion` when the tokenizer has a
    template and for `preference` message lists; else plain text. Empty: the prompts of the first
    `num_prompts` eval rows."""
    num_prompts: int = Field(default=3, ge=0)
    """Without `prompts`: how many eval rows' prompts to generate from (0 turns generations off)."""
    max_new_tokens: int = Field(default=48, gt=0)
    """Longest generated answer, in tokens (greedy decoding, stops early at eos)."""
    tasks: list[str] = Field(default_factory=list)
    """lm-eval (EleutherAI's harness) tasks run on the saved model after training: names found in
    `task_dirs`, or lm-eval's own (those download their data). Needs `pip install 'dpkit[eval]'`."""
    task_dirs: list[str] = Field(default_factory=list)
    """Folders of lm-eval task YAML files (lm-eval's `include_path`); `dpkit:lm_eval_tasks` is
    shipped (task `dpkit_seed_mc`). Relative `data_files` in a task are read from its folder."""
    limit: int | None = Field(default=None, gt=0)
    """Score at most this many documents per task (for a quick look; scores are then partial)."""
    num_fewshot: int | None = Field(default=None, ge=0)
    """Few-shot examples per prompt (default: each task's own setting)."""
    batch_size: int = Field(default=8, gt=0)
    """lm-eval batch size."""

    @field_validator("task_dirs")
    @classmethod
    def _shipped_dirs(cls, dirs: list[str]) -> list[str]:
        out = []
        for value in dirs:
            path = shipped.resolve(value)
            if shipped.is_shipped(value) and not Path(path).is_dir():
                raise ValueError(f"`{value}` is not a folder shipped with dpkit; shipped: "
                                 f"{shipped.PREFIX}lm_eval_tasks")
            out.append(path)
        return out

    @property
    def generates(self) -> bool:
        return bool(self.prompts) or self.num_prompts > 0
