"""Everything checkable before a rank starts, gathered into one list of problems.

`dpkit validate` and `dpkit train` run this in the parent process, so a typo costs seconds, not a
GPU allocation and a traceback from rank 3 of 64.
"""

from __future__ import annotations

from dataclasses import dataclass

from dpkit.errors import Problem, RecipeError
from dpkit.recipe import Recipe


@dataclass
class PreflightReport:
    problems: list[Problem]
    notes: list[str]


def _collect(problems: list[Problem], fn, *args):
    try:
        return fn(*args)
    except RecipeError as e:
        problems.extend(e.problems)
    return None


def check_recipe(recipe: Recipe, world_size: int, on_cpu: bool, check_data: bool = True
                 ) -> PreflightReport:
    from dpkit.data import load_datasets
    from dpkit.model import load_model_config, load_tokenizer
    from dpkit.train import output_dir_problem
    from dpkit.zero import batch_arithmetic, resolve_ds_config

    problems: list[Problem] = []
    notes: list[str] = []
    batch = _collect(problems, batch_arithmetic, recipe, world_size)
    if batch:
        notes.append(batch.describe())
    model_key = "model.config" if recipe.model.config is not None else "model.name_or_path"
    tokenizer_key = "model.tokenizer" if recipe.model.tokenizer else "model.name_or_path"
    config = _collect_model(problems, load_model_config, recipe.model, model_key)
    hidden = getattr(config, "hidden_size", None) if config is not None else None
    if batch:  # without a valid split the DeepSpeed config would only repeat that error
        _collect(problems, resolve_ds_config, recipe, world_size, hidden, on_cpu)
    tokenizer = _collect_model(problems, load_tokenizer, recipe.model, tokenizer_key)
    if tokenizer is not None and tokenizer.pad_token == tokenizer.eos_token:
        notes.append(f"tokenizer pads with its eos token '{tokenizer.eos_token}' (padding is "
                     "masked by the attention mask, so real eos tokens are still trained on)")
    if check_data and tokenizer is not None:
        result = _collect(problems, load_datasets, recipe.data, tokenizer, recipe.train.seed)
        if result is not None:
            train, evals, stats = result
            notes.append(f"data: {stats.describe()}; eval rows: {len(evals)}")
    problem = output_dir_problem(recipe)
    if problem is not None:
        problems.extend(problem.problems)
    return PreflightReport(problems, notes)


def _collect_model(problems: list[Problem], fn, section, key: str):
    """Model/tokenizer loading errors from transformers become one line naming the key."""
    try:
        return fn(section)
    except RecipeError as e:
        problems.extend(e.problems)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        problems.append(Problem(key, f"could not be loaded: {first}",
                                "check the hub id / directory (offline? the hub can't be reached)"))
    return None


def raise_if_problems(report: PreflightReport) -> None:
    if report.problems:
        raise RecipeError(report.problems)
