"""Benchmarks after training: EleutherAI's lm-eval harness on the saved model (optional extra).

`pip install 'dpkit[eval]'` brings lm-eval; a recipe naming `eval.tasks` without it is refused
before any rank starts. The harness runs on rank 0 alone, on the model the run wrote
(`<run>/model`; for LoRA the merged model, or the base with the adapter merged in memory), after
the last collective of training; the other ranks wait for it without a collective pending
(dpkit.distributed.wait_for_main), up to `train.single_rank_work_timeout_s`, not
`train.collective_timeout_s`.

Tasks are looked up in `eval.task_dirs` first (lm-eval task YAML files; dpkit ships
`dpkit:lm_eval_tasks`), then among lm-eval's own. lm-eval reads a local task's `data_files`
from the current directory; dpkit reads a relative one from the task file's folder, so a task
folder can be moved or shipped.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import yaml

from dpkit.errors import Problem
from dpkit.recipe import Recipe
from dpkit.run_files import MERGED, MODEL


def installed() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


def problems(recipe: Recipe) -> list[Problem]:
    """Preflight: what stops the benchmarks from running at the end of this recipe."""
    section = recipe.eval
    if not section.tasks:
        return []
    if not installed():
        return [Problem("eval.tasks", "needs EleutherAI's lm-eval harness, which is not installed",
                        "pip install 'dpkit[eval]' (or lm-eval), or remove eval.tasks")]
    out = []
    if not recipe.output.save_model:
        out.append(Problem("eval.tasks", "are run on the saved model, and output.save_model is "
                           "false", "set output.save_model: true, or remove eval.tasks"))
    for i, folder in enumerate(section.task_dirs):
        if not Path(folder).is_dir():
            out.append(Problem(f"eval.task_dirs[{i}]", f"folder '{folder}' not found",
                               "point it at a folder of lm-eval task YAML files"))
    return out


# ------------------------------------------------------------------------------------- tasks
class _Tolerant(yaml.SafeLoader):
    """Reads task files that use lm-eval's `!function` tags, just to find their names."""


_Tolerant.add_multi_constructor("!", lambda loader, suffix, node: None)


def local_tasks(folders: list[str]) -> dict[str, Path]:
    """{task name: its YAML file} for every task defined in the folders (recursively)."""
    found: dict[str, Path] = {}
    for folder in folders:
        for path in sorted(Path(folder).rglob("*.yaml")):
            try:
                cfg = yaml.load(path.read_text(), Loader=_Tolerant)
            except yaml.YAMLError:
                continue
            if isinstance(cfg, dict) and isinstance(cfg.get("task"), str):
                found.setdefault(cfg["task"], path)
    return found


def task_config(path: Path) -> dict:
    """A local task's config (lm-eval's own loader: `include`, `!function`), with relative
    `data_files` made absolute against the task file's folder."""
    try:  # lm-eval's loader (private; 0.4.13) follows `include:` and `!function`
        from lm_eval.tasks._yaml_loader import load_yaml

        cfg = load_yaml(path, resolve_func=True)
    except ImportError:
        cfg = yaml.load(path.read_text(), Loader=_Tolerant)
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if files is not None:
        def absolute(value):
            if isinstance(value, list):
                return [absolute(v) for v in value]
            p = Path(value)
            return value if p.is_absolute() or "://" in str(value) else str(path.parent / p)

        cfg["dataset_kwargs"]["data_files"] = (
            {k: absolute(v) for k, v in files.items()} if isinstance(files, dict)
            else absolute(files))
    return cfg


# ------------------------------------------------------------------------------------- model
def load_model(run_dir: Path, recipe: Recipe, device):
    """(model, tokenizer) this run saved, loaded here rather than by lm-eval: given a model
    object, lm-eval stays a single process. Given a path inside a multi-rank job it would start
    accelerate, see the job's world size and wait for ranks that are not running it."""
    from transformers import AutoTokenizer

    from dpkit import heads
    from dpkit.model import DTYPES

    options = {"dtype": DTYPES[recipe.model.dtype],
               "trust_remote_code": recipe.model.trust_remote_code}
    path = run_dir / MODEL
    if recipe.peft is not None and (run_dir / MERGED / "config.json").is_file():
        path = run_dir / MERGED
    elif recipe.peft is not None:  # base + adapter, merged in memory
        from peft import PeftModel

        from dpkit.lora import adapter_base

        base = heads.auto_class(heads.of_recipe(recipe)).from_pretrained(
            adapter_base(recipe, run_dir), **options)
        model = PeftModel.from_pretrained(base, path).merge_and_unload()
        return model.to(device).eval(), AutoTokenizer.from_pretrained(path)
    model = heads.auto_class(heads.of_recipe(recipe)).from_pretrained(path, **options)
    return model.to(device).eval(), AutoTokenizer.from_pretrained(path)


def scores(results: dict) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from lm-eval's results, without stderr and the `,none` filter
    suffix (a named filter stays: `exact_match (strict-match)`)."""
    out: dict[str, dict[str, float]] = {}
    for task, values in results.get("results", {}).items():
        metrics = {}
        for key, value in values.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            metrics[metric if filt == "none" else f"{metric} ({filt})"] = float(value)
        out[task] = metrics
    return out


def run_benchmarks(run_dir: Path, recipe: Recipe, device) -> dict:
    """Run the recipe's tasks; never raises: a failure is reported in the result (training's
    result stands, the model is on disk) as {"error": ...}."""
    section = recipe.eval
    t0 = time.perf_counter()
    try:
        import lm_eval
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        local = local_tasks(section.task_dirs)
        tasks = [task_config(local[name]) if name in local else name for name in section.tasks]
        manager = TaskManager(include_path=section.task_dirs or None,
                              include_defaults=any(isinstance(t, str) for t in tasks))
        model, tokenizer = load_model(run_dir, recipe, device)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=section.batch_size)
        results = simple_evaluate(
            model=lm, tasks=tasks, task_manager=manager, limit=section.limit,
            num_fewshot=section.num_fewshot, log_samples=False, bootstrap_iters=0,
            random_seed=recipe.train.seed)

        return {"tasks": scores(results or {}), "n_samples": {
                    t: v.get("effective") for t, v in (results or {}).get("n-samples", {}).items()},
                "lm_eval_version": getattr(lm_eval, "__version__", None),
                "limit": section.limit, "num_fewshot": section.num_fewshot,
                "wall_s": time.perf_counter() - t0}
    except Exception as e:  # noqa: BLE001 — a task that needs the network, a bad task file
        text = str(e).strip().splitlines()
        return {"error": f"{type(e).__name__}: {text[0] if text else ''}",
                "wall_s": time.perf_counter() - t0}
