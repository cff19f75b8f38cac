"""DeepSpeed config: pick a template, resolve every "auto" from the recipe, refuse what's wrong.

The recipe is the one source of truth for batch sizes, precision and clipping; templates carry
ZeRO knobs and "auto". A number written in both places must agree, or the run is refused.
The batch arithmetic itself lives in dpkit/batch.py.
"""

from __future__ import annotations

import copy
import difflib
import json
from pathlib import Path
from typing import Any

from dpkit.batch import BatchPlan, batch_arithmetic  # noqa: F401  (re-exported)
from dpkit.errors import Problem, RecipeError
from dpkit.recipe import Recipe
from dpkit.shipped import DS_CONFIGS


# Top-level keys a template may hold. DeepSpeed silently ignores unknown top-level keys, so a
# typo there ("gradient_clipping_" or "zero_optimisation") would change nothing and say nothing.
TEMPLATE_TOP_LEVEL = {
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
    "gradient_clipping", "bf16", "fp16", "zero_optimization", "steps_per_print",
    "wall_clock_breakdown", "aio", "activation_checkpointing", "communication_data_type",
    "prescale_gradients", "gradient_predivide_factor", "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer", "flops_profiler", "comms_logger", "checkpoint",
    "data_types", "memory_breakdown", "dump_state", "seq_parallel_communication_data_type",
}
# Optimizer and schedule come from the recipe's `train` section, never from a template.
REFUSED_TOP_LEVEL = {"optimizer": "train.lr / train.adam_betas / train.weight_decay",
                     "scheduler": "train.lr_schedule / train.warmup_ratio"}


# The shipped template for each (stage, optimizer offload, parameter offload) the schema accepts:
# the one registry of templates (dpkit plan and the checks before launch look here too).
# Parameter offload and NVMe need stage 3 (refused by dpkit/recipe.py ZeroSection otherwise).
TEMPLATES: dict[tuple[int, str, str], str] = {
    (0, "none", "none"): "zero0",
    (1, "none", "none"): "zero1", (1, "cpu", "none"): "zero1_offload",
    (2, "none", "none"): "zero2", (2, "cpu", "none"): "zero2_offload",
    **{(3, opt, par): ("zero3_nvme" if "nvme" in (opt, par) else
                       "zero3" if (opt, par) == ("none", "none") else "zero3_offload")
       for opt in ("none", "cpu", "nvme") for par in ("none", "cpu", "nvme")},
}


def template_name(stage: int, offload_optimizer: str, offload_params: str) -> str:
    return TEMPLATES[(stage, offload_optimizer, offload_params)]


def template_path(recipe: Recipe) -> Path:
    if recipe.zero.template:
        return Path(recipe.zero.template)
    z = recipe.zero
    return DS_CONFIGS / f"{template_name(z.stage, z.offload_optimizer, z.offload_params)}.json"


def load_template(path: Path) -> dict:
    where = "zero.template"
    if not path.is_file():
        raise RecipeError.one(where, f"DeepSpeed template '{path}' not found",
                              f"use one of {sorted(p.name for p in DS_CONFIGS.glob('*.json'))} "
                              "or a path to your own")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RecipeError.one(str(path), f"is not valid JSON: {e}", "fix the syntax") from None


MIN_COMM_BUCKET = 50_000_000  # elements; see resolve_ds_config


def resolve_ds_config(recipe: Recipe, world_size: int, hidden_size: int | None,
                      on_cpu: bool = False) -> dict:
    """The DeepSpeed config for this recipe and world size, with no "auto" left.

    `hidden_size` sizes the communication buckets as transformers' integration does.
    Raises `RecipeError` listing every unknown key, conflict and unresolvable "auto".
    """
    path = template_path(recipe)
    cfg = copy.deepcopy(load_template(path))
    problems: list[Problem] = []
    src = f"{path.name}"

    for key in cfg:
        if key in REFUSED_TOP_LEVEL:
            problems.append(Problem(f"{src}: {key}", "optimizer and scheduler come from the recipe",
                                    f"remove it from the template and set {REFUSED_TOP_LEVEL[key]}"))
        elif key not in TEMPLATE_TOP_LEVEL:
            close = difflib.get_close_matches(key, TEMPLATE_TOP_LEVEL, n=1)
            problems.append(Problem(f"{src}: {key}", "unknown DeepSpeed key",
                                    f"did you mean `{close[0]}`?" if close else "remove it"))

    batch = batch_arithmetic(recipe, world_size)
    precision = recipe.model.dtype
    wanted: dict[str, Any] = {
        "train_batch_size": batch.global_batch_size,
        "train_micro_batch_size_per_gpu": batch.micro_batch_size,
        "gradient_accumulation_steps": batch.grad_accum,
        "gradient_clipping": recipe.train.max_grad_norm,
        "bf16.enabled": precision == "bfloat16",
        "fp16.enabled": precision == "float16",
    }
    recipe_key = {"train_batch_size": "train.global_batch_size",
                  "train_micro_batch_size_per_gpu": "train.micro_batch_size",
                  "gradient_accumulation_steps": "train.global_batch_size",
                  "gradient_clipping": "train.max_grad_norm",
                  "bf16.enabled": "model.dtype", "fp16.enabled": "model.dtype"}
    for dotted, value in wanted.items():
        _set_or_check(cfg, dotted, value, src, recipe_key[dotted], problems, create=True)

    zo = cfg.setdefault("zero_optimization", {})
    _set_or_check(cfg, "zero_optimization.stage", recipe.zero.stage, src, "zero.stage", problems,
                  create=True)
    if hidden_size:
        # transformers sizes buckets hidden² (1M elements for hidden 1024: ~470 buckets a
        # backward for 0.5B parameters, each one a launch and a wait). Measured on one H200
        # (docs/benchmarks.md): at least 5e7 elements (100 MB in bf16) keeps that cost off the
        # step; DeepSpeed's own default is 5e8.
        comm = max(hidden_size * hidden_size, MIN_COMM_BUCKET)
        buckets = {"reduce_bucket_size": comm,
                   "allgather_bucket_size": comm,
                   "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
                   "stage3_param_persistence_threshold": 10 * hidden_size}
        for key, value in buckets.items():
            if zo.get(key) == "auto":
                zo[key] = value
    _resolve_offload(recipe, zo, src, problems)
    if recipe.zero.stage == 3 and recipe.train.sequence_parallel > 1 \
            and zo.get("reduce_scatter", True) is False:
        problems.append(Problem(f"{src}: zero_optimization.reduce_scatter", "false under ZeRO-3 "
                                "with sequence parallelism: DeepSpeed then averages some gradient "
                                "buckets over every rank and others over the data-parallel ranks",
                                "remove it (true is DeepSpeed's default)"))

    if recipe.output.async_save:
        _async_writer(recipe, cfg, src, problems)

    leftover = list(_autos(cfg))
    for dotted in leftover:
        problems.append(Problem(f"{src}: {dotted}", "is \"auto\" but dpkit cannot resolve it",
                                "write a value in the template"))
    if not problems:
        problems.extend(_deepspeed_schema_problems(cfg, src))
    if on_cpu and precision == "float16":
        problems.append(Problem("model.dtype", "float16 is not supported by DeepSpeed on CPU",
                                "use bfloat16 or float32"))
    if problems:
        raise RecipeError(problems)
    return cfg


ASYNC_WRITER = {"type": "python", "decoupled": True}
"""output.async_save: DeepSpeed 0.19's decoupled checkpoint engine (one writer process per rank,
fed through shared memory) with plain Python file writes; its "fast" writer needs the async I/O
op (libaio), which CPU machines lack."""


def _async_writer(recipe: Recipe, cfg: dict, src: str, problems: list[Problem]) -> None:
    if recipe.zero.stage != 3:
        problems.append(Problem("output.async_save", f"needs zero.stage 3 (got "
                                f"{recipe.zero.stage}): under ZeRO-1/2 DeepSpeed's decoupled "
                                "writer makes every rank write the same model-states file at "
                                "once, and ZeRO-0 is not tested with it",
                                "set zero.stage: 3, or output.async_save: false"))
        return
    section = cfg.setdefault("checkpoint", {})
    if section.get("writer") not in (None, ASYNC_WRITER):
        problems.append(Problem(f"{src}: checkpoint.writer", f"is {section['writer']!r}, but "
                                "output.async_save sets DeepSpeed's writer",
                                "remove it from the template"))
    section["writer"] = dict(ASYNC_WRITER)


def _resolve_offload(recipe: Recipe, zo: dict, src: str, problems: list[Problem]) -> None:
    for section, field in (("offload_optimizer", "offload_optimizer"),
                           ("offload_param", "offload_params")):
        wanted = getattr(recipe.zero, field)
        block = zo.get(section)
        if block is None:
            if wanted != "none":
                problems.append(Problem(f"zero.{field}", f"is {wanted}, but template {src} has no "
                                        f"`zero_optimization.{section}` block",
                                        "leave zero.template unset to get the matching template"))
            continue
        device = block.get("device")
        if device == "auto":
            block["device"] = wanted
        elif device != wanted and not (device is None and wanted == "none"):
            problems.append(Problem(f"zero.{field}", f"is {wanted}, but template {src} sets "
                                    f"`{section}.device: {device}`",
                                    "make them agree (or set the template's device to \"auto\")"))
        if block.get("nvme_path") == "auto":
            if recipe.zero.nvme_path:
                block["nvme_path"] = recipe.zero.nvme_path
            elif block.get("device") != "nvme":
                block.pop("nvme_path")
        if block.get("device") == "none":
            zo.pop(section)


def _set_or_check(cfg: dict, dotted: str, value: Any, src: str, recipe_key: str,
                  problems: list[Problem], create: bool) -> None:
    *parents, leaf = dotted.split(".")
    node = cfg
    for p in parents:
        node = node.setdefault(p, {}) if create else node.get(p, {})
    current = node.get(leaf, "auto")
    if current == "auto":
        node[leaf] = value
    elif current != value:
        problems.append(Problem(f"{src}: {dotted}", f"is {current!r} but the recipe gives {value!r}",
                                f"write \"auto\" in the template and set {recipe_key} in the recipe"))


def _autos(node: Any, prefix: str = ""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _autos(v, f"{prefix}{k}.")
    elif node == "auto":
        yield prefix.rstrip(".")


def _deepspeed_schema_problems(cfg: dict, src: str) -> list[Problem]:
    """Unknown or mistyped keys inside `zero_optimization`, judged by DeepSpeed's own schema."""
    from pydantic import ValidationError

    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    try:
        DeepSpeedZeroConfig(**cfg.get("zero_optimization", {}))
    except ValidationError as e:
        out = []
        valid = sorted({*DeepSpeedZeroConfig.model_fields,
                        *(f.alias for f in DeepSpeedZeroConfig.model_fields.values() if f.alias)})
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                close = difflib.get_close_matches(str(err["loc"][-1]), valid, n=1)
                fix = f"did you mean `{close[0]}`?" if close else "remove it"
                out.append(Problem(f"{src}: zero_optimization.{key}", "unknown DeepSpeed key", fix))
            else:
                out.append(Problem(f"{src}: zero_optimization.{key}", err["msg"],
                                   "see DeepSpeed's ZeRO configuration docs"))
        return out
    return []
