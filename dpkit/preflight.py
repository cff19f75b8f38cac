"""Everything checkable before a rank starts, gathered into one list of problems.

`dpkit validate` and `dpkit train` run this in the parent process, so a typo costs seconds, not a
GPU allocation and a traceback from rank 3 of 64.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from dpkit.errors import Problem, RecipeError
from dpkit.methods import method_notes, spec
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


def check_recipe(recipe: Recipe, world_size: int, on_cpu: bool, check_data: bool = True,
                 gpus_per_node: int | None = None, gpu_memory_bytes: int | None = None,
                 hub_user=None) -> PreflightReport:
    """Every problem with the recipe for this world size. With `gpu_memory_bytes` (the
    launching machine's GPUs), also whether it fits them, by dpkit plan's memory model.
    `hub_user`: the Hub endpoint / token variable the command line named (dpkit.hub_schema).

    Never runs a model repository's own code: with `model.trust_remote_code` the checks load
    what transformers can load without it, and the notes warn which repository training will
    run code from."""
    import datasets

    from dpkit.batch import batch_arithmetic
    from dpkit.model import load_model_config, load_tokenizer, looks_local, shipped_tokenizer_dir
    from dpkit.rundir import output_dir_problem, resume_checks
    from dpkit.zero import resolve_ds_config

    datasets.disable_progress_bars()  # the parent prints problems and notes, not load bars
    problems: list[Problem] = []
    notes: list[str] = []
    if recipe.model.trust_remote_code:
        notes.append(remote_code_warning(recipe))
        recipe = recipe.model_copy(update={"model": recipe.model.model_copy(
            update={"trust_remote_code": False})})
    notes.extend(method_notes(recipe))  # e.g. reward code a GRPO recipe names: said first
    offline = hub_offline()
    batch = _collect(problems, batch_arithmetic, recipe, world_size)
    if batch:
        notes.append(batch.describe())
    model_key = "model.config" if recipe.model.config is not None else "model.name_or_path"
    tokenizer_key = "model.tokenizer" if recipe.model.tokenizer else "model.name_or_path"
    config = _collect_model(problems, load_model_config, recipe.model, model_key)
    hidden = getattr(config, "hidden_size", None) if config is not None else None
    if recipe.peft is not None:  # QLoRA needs CUDA; LoRA targets must exist in the model
        from dpkit.lora import preflight_problems

        problems.extend(preflight_problems(recipe, config, on_cpu))
    if batch and config is not None:  # else the DeepSpeed config would only repeat the error
        _collect(problems, resolve_ds_config, recipe, world_size, hidden, on_cpu)
    if offline and not looks_local(recipe.model.tokenizer_path) and \
            shipped_tokenizer_dir(recipe.model.tokenizer_path) is None:
        tokenizer = None
        notes.append(f"offline: tokenizer '{recipe.model.tokenizer_path}' not checked "
                     "(token counts and masking are checked at launch)")
    else:
        tokenizer = _collect_model(problems, load_tokenizer, recipe.model, tokenizer_key)
    if tokenizer is not None and tokenizer.pad_token == tokenizer.eos_token:
        notes.append(f"tokenizer pads with its eos token '{tokenizer.eos_token}' (padding is "
                     "masked by the attention mask, so real eos tokens are still trained on)")
    if check_data:
        _check_data(recipe, tokenizer, offline, problems, notes)
    problems.extend(_observability_problems(recipe))
    from dpkit.doctor import stale_lock_problems

    problems.extend(stale_lock_problems())  # a killed op build's lock: the ranks would hang
    from dpkit.eval.harness import problems as eval_problems

    problems.extend(eval_problems(recipe))  # lm-eval installed, task folders exist
    if recipe.train.compile and recipe.zero.stage == 3:
        problems.append(Problem("train.compile", "is not supported with ZeRO-3: torch.compile "
                                "traces DeepSpeed's parameter-gathering hooks and recompiles "
                                "around every module", "use zero.stage 0-2, or set it to false"))
    if config is not None and gpu_memory_bytes and not recipe.train.skip_memory_check:
        from dpkit.plan.recommend import check_fits

        problems.extend(check_fits(recipe, world_size, gpus_per_node or world_size,
                                   gpu_memory_bytes))
    if config is not None:
        from dpkit.parallel.sequence import problems as sequence_problems

        problems.extend(sequence_problems(recipe, config))
        from dpkit.moe import experts_of, leaf_problems
        from dpkit.moe import problems as moe_problems

        problems.extend(moe_problems(recipe, config, world_size))
        if recipe.moe.zero3_leaf_modules and experts_of(config) is not None:
            from dpkit.lora import meta_model

            problems.extend(leaf_problems(meta_model(config), recipe.moe.zero3_leaf_modules))
        problems.extend(_build_problems(recipe, config, model_key))
        problems.extend(_position_problems(recipe, config))
    if recipe.model.name_or_path and Path(recipe.model.name_or_path).expanduser().is_dir() \
            and config is not None:
        from dpkit.model import weight_problems

        problems.extend(weight_problems(Path(recipe.model.name_or_path).expanduser()))
    if recipe.hub is not None:
        from dpkit.hub import check_hub

        problems.extend(check_hub(recipe.hub, hub_user))
        if recipe.hub.push_checkpoints and recipe.peft is not None:
            problems.append(Problem("hub.push_checkpoints", "is not supported for LoRA runs yet "
                                    "(the final adapter is pushed)", "set it to false"))
    unwritable = _output_dir_unwritable(recipe.output.dir)  # before the rules for what is in it
    problem = None if unwritable else output_dir_problem(recipe)
    if unwritable or problem is not None:
        problems.extend([unwritable] if unwritable else problem.problems)
    elif recipe.resume is not None:
        resume_problems, resume_notes = resume_checks(recipe, world_size)
        problems.extend(resume_problems)
        notes.extend(resume_notes)
    return PreflightReport(problems, notes)


def remote_code_warning(recipe: Recipe) -> str:
    m = recipe.model
    repos = sorted({r for r in (m.name_or_path, m.tokenizer_path) if r})
    at = f" at revision {m.revision}" if m.revision else ""
    return (f"warning: model.trust_remote_code is true: training will download and run Python "
            f"code from {' and '.join(repos)}{at} on every rank (validate did not run it); "
            "keep it only for a repository you trust, pinned with model.revision")


def _output_dir_unwritable(directory: str) -> Problem | None:
    """`output.dir` must be a directory, or creatable. Permission bits can't tell (root may write
    everywhere by them, yet not under /proc or on a read-only mount), so this tries: it creates
    the missing directories, or a temporary one inside an existing `output.dir`, and removes
    exactly what it created, leaving the disk as it was."""
    out = Path(directory).expanduser()
    if out.exists() and not out.is_dir():
        return Problem("output.dir", f"'{directory}' is a file, not a directory",
                       "choose a directory for the run")
    ancestor = out if out.exists() else next(p for p in out.absolute().parents if p.exists())
    if not ancestor.is_dir():
        return Problem("output.dir", f"'{directory}' can't be created: '{ancestor}' is a file",
                       "choose a directory for the run")
    created: list[Path] = []
    path = out
    try:
        if out.is_dir():
            created.append(Path(tempfile.mkdtemp(prefix=".dpkit-validate-", dir=out)))
        else:
            for path in reversed([out, *out.absolute().parents]):
                if not path.exists():
                    path.mkdir()
                    created.append(path)
    except OSError as e:
        what = "written in" if out.is_dir() else f"created (making '{path}')"
        return Problem("output.dir", f"'{directory}' can't be {what}: {e.strerror or e}",
                       "choose a directory you can write to")
    finally:
        for made in reversed(created):
            with contextlib.suppress(OSError):  # another process wrote into it meanwhile
                made.rmdir()
    return None


def _position_problems(recipe: Recipe, config) -> list[Problem]:
    """Rows longer than the model's position table fail inside the first forward pass."""
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and recipe.data.max_seq_len > limit:
        return [Problem("data.max_seq_len", f"{recipe.data.max_seq_len} is longer than the "
                        f"model's position limit {limit} (max_position_embeddings)",
                        f"set data.max_seq_len to {limit} or less")]
    return []


def _observability_problems(recipe: Recipe) -> list[Problem]:
    out = []
    if recipe.train.nan_policy == "skip" and recipe.model.dtype == "float32" and \
            recipe.zero.stage in (0, 3):
        out.append(Problem("train.nan_policy", f"skip needs DeepSpeed to discard the update, "
                           f"which it does in fp32 only under ZeRO 1-2 (this is stage "
                           f"{recipe.zero.stage})", "use zero.stage 1 or 2, bfloat16, or stop"))
    if "wandb" in recipe.output.report_to:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            out.append(Problem("output.report_to", "wandb is not installed",
                               "pip install wandb (WANDB_MODE=offline works without network)"))
    return out


def _build_problems(recipe: Recipe, config, key: str) -> list[Problem]:
    """Build the model on the meta device (no memory, no weights): catches an attention kernel
    or architecture this transformers can't build, before any rank starts."""
    import torch

    from dpkit import heads
    from dpkit.attention import implementation_for

    try:
        with torch.device("meta"):
            model = heads.auto_class(heads.of_recipe(recipe)).from_config(
                config, attn_implementation=recipe.model.attn_implementation,
                trust_remote_code=recipe.model.trust_remote_code)
            if recipe.data.packing:  # the per-row attention train would switch to
                chosen = implementation_for(recipe.model.attn_implementation, True, model.config,
                                            recipe.data.max_seq_len)
                if chosen != recipe.model.attn_implementation:
                    model.set_attn_implementation(chosen)
    except (ValueError, ImportError, KeyError, TypeError, RuntimeError, ArithmeticError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "attention" in str(e).lower():
            return [Problem("model.attn_implementation", f"'{recipe.model.attn_implementation}' "
                            f"can't be used here: {first}", "use eager or sdpa (or install "
                            "flash-attn on GPU machines)")]
        return [Problem(key, f"can't be built: {first}", "check the model's config")]
    return []


def hub_offline() -> bool:
    """HF_HUB_OFFLINE=1: check what can be checked without the hub, and say what was skipped."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _check_data(recipe: Recipe, tokenizer, offline: bool, problems: list[Problem],
                notes: list[str]) -> None:
    """Columns of every source; with a tokenizer, the full tokenization and its statistics."""
    from dpkit.data import column_problems, is_local_source, load_source
    from dpkit.data.cache import load_cached

    sources = [(f"data.{kind}[{i}]", s) for kind in ("sources", "eval_sources")
               for i, s in enumerate(getattr(recipe.data, kind))]
    skipped = [s.path for _, s in sources if offline and not is_local_source(s)]
    if skipped:
        notes.append(f"offline: hub datasets {skipped} not checked")
    if recipe.data.streaming:
        _check_stream(recipe, tokenizer, skipped, problems, notes)
        return
    if tokenizer is not None and not skipped:
        # Tokenized into the cache here, once: the ranks then start at once (dpkit/data/cache.py)
        # Quiet (problems are this command's output); a progress bar only at a terminal.
        result = _collect(problems, partial(load_cached, say=lambda m: None,
                                            progress=sys.stderr.isatty(),
                                            options=spec(recipe).options(recipe)),
                          recipe.data, tokenizer, recipe.train.seed)
        if result is not None:
            _, evals, stats = result
            notes.append(f"data: {stats.describe()}; eval rows: {len(evals)}")
        return
    for where, source in sources:
        if source.path in skipped:
            continue
        ds = _collect(problems, load_source, source, where)
        if ds is not None:
            problems.extend(column_problems(ds, source, where))


def _check_stream(recipe: Recipe, tokenizer, skipped: list[str], problems: list[Problem],
                  notes: list[str]) -> None:
    """A stream is not read here: its length is unknown (max_steps is needed) and its columns
    are checked on the first row of each source."""
    from datasets import Dataset

    from dpkit.data.load import column_problems, format_problems
    from dpkit.data.stream import first_row

    if recipe.train.max_steps is None:
        problems.append(Problem("train.max_steps", "`data.streaming: true` has no known length, "
                                "so the number of steps must be given", "set train.max_steps"))
    for i, source in enumerate(recipe.data.sources):
        if source.path in skipped:
            continue
        where = f"data.sources[{i}]"
        try:
            row = first_row(source)
        except Exception as e:  # datasets raises many types for a missing or malformed source
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            problems.append(Problem(f"{where}.path", f"could not stream '{source.path}': {first}",
                                    "check the path, `name` and `split`"))
            continue
        ds = Dataset.from_list([row] if row is not None else [])
        found = column_problems(ds, source, where)
        if tokenizer is not None and not found:
            found = format_problems(ds, source, tokenizer, where)
        problems.extend(found)
    notes.append(f"data: streaming {len(recipe.data.sources)} source(s), mixture "
                 f"{recipe.data.mixture}; the same stream on any world size")


def _collect_model(problems: list[Problem], fn, section, key: str):
    """Model/tokenizer loading errors from transformers become one line naming the key."""
    from huggingface_hub.errors import StrictDataclassError

    try:
        return fn(section)
    except RecipeError as e:
        problems.extend(e.problems)
    except (OSError, ValueError, KeyError, TypeError, StrictDataclassError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "trust_remote_code" in str(e) and getattr(section, "name_or_path", None):
            return None  # needs the repository's own code, which the checks never run (noted)
        problems.append(Problem(key, f"could not be loaded: {first}",
                                "check the hub id / directory (offline? the hub can't be reached)"))
    return None


def raise_if_problems(report: PreflightReport) -> None:
    if report.problems:
        raise RecipeError(report.problems)
