"""The README.md model card pushed with a run: Hub metadata plus the training story.

Everything comes from the run directory (recipe.yaml, ds_config.json, summary.json,
metrics.jsonl), so a card can be rebuilt for any run, finished or still in progress. Nothing here
reads the environment, so no credential can end up in a card.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from dpkit import report
from dpkit.eval import present
from dpkit.hub_schema import is_hub_id  # the schema's rule for repo_id, the card's for base_model
from dpkit.run_files import DS_CONFIG, RECIPE, read_json

LOSS_PLOT = "training/loss_curve.png"
"""Where the loss plot sits in the pushed repo (and, relative to the card, in <run>/hub/)."""


def _run_facts(run_dir: Path) -> dict:
    """The numbers a card shows, from summary.json when the run finished, else from metrics."""
    run = report.load_run(run_dir)
    summary = run.summary or {}
    recipe_path = run_dir / RECIPE
    recipe_text = recipe_path.read_text() if recipe_path.is_file() else ""
    recipe = (yaml.safe_load(recipe_text) or {}) if recipe_text else {}
    last = run.train[-1] if run.train else {}
    model = recipe.get("model") or {}
    return {
        "run": run, "summary": summary, "recipe_text": recipe_text, "recipe": recipe,
        "steps": summary.get("steps", last.get("step")),
        "tokens_seen": summary.get("tokens_seen", last.get("tokens_seen")),
        "final_loss": summary.get("final_loss", run.final_loss),
        "final_eval_loss": summary.get("final_eval_loss", run.final_eval_loss),
        "base_model": summary.get("base_model") or model.get("name_or_path") or "inline config",
        "datasets": summary.get("datasets") or [s.get("path") for s in
                                                (recipe.get("data") or {}).get("sources", [])],
        "zero_stage": summary.get("zero_stage", (recipe.get("zero") or {}).get("stage")),
    }


# The Hub's pipeline tag per model head (dpkit/heads.py).
PIPELINES = {"causal_lm": "text-generation", "sequence_classification": "text-classification"}


def card_metadata(facts: dict, *, base_model: str | None, adapter: bool, license: str | None,
                  tags: list[str]) -> dict:
    """YAML front matter. Only Hub ids go in `base_model` / `datasets` (local paths would be
    refused by the Hub's metadata check); local ones are named in the card's text instead."""
    stage = facts["zero_stage"]
    task = PIPELINES[(facts["summary"] or {}).get("head", "causal_lm")]
    all_tags = ["dpkit", "deepspeed", *([f"zero-stage-{stage}"] if stage is not None else []),
                *(["lora", "peft"] if adapter else []), task, *tags]
    meta = {
        "library_name": "peft" if adapter else "transformers",
        "pipeline_tag": task,
        "tags": list(dict.fromkeys(all_tags)),
    }
    if is_hub_id(base_model):
        meta["base_model"] = base_model
    datasets = [d for d in facts["datasets"] if is_hub_id(d)]
    if datasets:
        meta["datasets"] = datasets
    if license:
        meta["license"] = license
    return meta


def _cell(value, spec: str = ".4f") -> str:
    return report.fmt(value, spec)


def render_card(run_dir: Path, *, repo_id: str, base_model: str | None, adapter: bool,
                license: str | None, tags: list[str], has_plot: bool,
                step: int | None = None) -> str:
    """The full README.md text. `step` marks a card pushed with a checkpoint mid-run."""
    from huggingface_hub import ModelCardData

    facts = _run_facts(run_dir)
    s = facts["summary"]
    base = base_model or facts["base_model"]
    meta = card_metadata(facts, base_model=base, adapter=adapter, license=license, tags=tags)
    base_text = f"[{base}](https://huggingface.co/{base})" if is_hub_id(base) else f"`{base}`"
    if base == "inline config":  # a model built from a config in the recipe: random init
        what = "a model initialised at random from an inline config in the recipe"
    else:
        what = f"{'a LoRA adapter for' if adapter else 'a full fine-tune of'} {base_text}"
    params = s.get("parameters")
    params_text = "—" if params is None else (
        f"{params:,} (trainable: {s.get('trainable_parameters', params):,})")
    status = "" if s and step is None else (
        f"\n\n> Checkpoint at step {step}; training was still running when it was pushed."
        if step is not None else "\n\n> summary.json was missing: the run may not have finished.")
    ds = json.dumps(read_json(run_dir / DS_CONFIG) or {}, indent=2)
    versions = s.get("versions") or {}
    gb, mb, ga, ws = (s.get(k) for k in ("global_batch_size", "micro_batch_size", "grad_accum",
                                          "world_size"))
    batch = f"{gb} rows = micro batch {mb} × gradient accumulation {ga} × world size {ws}" \
        if gb is not None else "—"
    data_list = "\n".join(f"- `{d}`" if not is_hub_id(d) else
                          f"- [{d}](https://huggingface.co/datasets/{d})"
                          for d in facts["datasets"]) or "- —"
    usage = _usage(repo_id, adapter, s.get("head", "causal_lm"))
    wall = f"{s['wall_time_s']:.0f} s" if s.get("wall_time_s") is not None else "—"
    dtype = s.get("dtype") or (facts["recipe"].get("model") or {}).get("dtype")

    lines = [
        f"# {repo_id.split('/')[-1]}", "",
        f"`{repo_id}` is {what}, trained with dpkit on DeepSpeed ZeRO stage "
        f"{facts['zero_stage']}.{status}", "",
        "## Results", "",
        "| | |", "|---|---|",
        f"| optimizer steps | {_cell(facts['steps'])} |",
        f"| tokens seen (non-padding tokens, all ranks) | {_cell(facts['tokens_seen'])} |",
        f"| final train loss | {_cell(facts['final_loss'])} |",
        f"| final eval loss | {_cell(facts['final_eval_loss'])} |",
        f"| wall time | {wall} |", "",
    ]
    if has_plot:
        lines += [f"![Training and eval loss against tokens seen]({LOSS_PLOT})", ""]
    lines += present.benchmarks_section(s)  # lm-eval scores, each prompt's answers (dpkit/eval)
    lines += present.before_after(run_dir)
    lines += [
        "## Training setup", "",
        "| | |", "|---|---|",
        f"| parameters | {params_text} |",
        f"| world size (data-parallel ranks) | {_cell(ws)} |",
        f"| effective batch | {batch} |",
        f"| ZeRO stage | {_cell(facts['zero_stage'])} |",
        f"| precision | {_cell(dtype)} |",
        *_objective_rows(s),
        f"| hardware | {_cell(s.get('hardware'))} |", "",
        "Training data:", "", data_list, "",
        "## How to use", "", "```python", usage, "```", "",
        "## Recipe", "",
        "The resolved dpkit recipe (`training/recipe.yaml`); with `training/ds_config.json` it "
        "reproduces this run.", "",
        "```yaml", facts["recipe_text"].rstrip() or "# recipe.yaml missing", "```", "",
        "## Resolved DeepSpeed config", "", "```json", ds, "```", "",
        "## Framework versions", "",
        *[f"- {name}: {versions.get(name, '—')}" for name in
          ("torch", "deepspeed", "transformers", "accelerate", "peft", "python")], "",
        "`training/` also holds `summary.json` and `metrics.jsonl` (one JSON line per logged "
        "step).", "",
    ]
    return f"---\n{ModelCardData(**meta).to_yaml()}\n---\n\n" + "\n".join(lines)


def _objective_rows(summary: dict) -> list[str]:
    """The training objective and the settings its method shows (`Objective.card_rows`)."""
    rows = [f"| objective | {_cell(summary.get('objective', 'sft'))} |"]
    for label, value in summary.get("method_card", []):
        rows.append(f"| {label} | {_cell(value, 'g')} |")
    return rows


def _usage(repo_id: str, adapter: bool, head: str = "causal_lm") -> str:
    if head == "sequence_classification":  # a reward model: one score per text
        cls = "AutoPeftModelForSequenceClassification" if adapter else \
            "AutoModelForSequenceClassification"
        lib = "peft" if adapter else "transformers"
        return (f'from {lib} import {cls}\nfrom transformers import AutoTokenizer\n'
                f'model = {cls}.from_pretrained("{repo_id}")\n'
                f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")\n'
                'inputs = tokenizer("Question: ...\\nAnswer: ...", return_tensors="pt")\n'
                'score = model(**inputs).logits[0, 0].item()  # higher: preferred')
    if adapter:
        load = (f'from peft import AutoPeftModelForCausalLM\n'
                f'model = AutoPeftModelForCausalLM.from_pretrained("{repo_id}")')
    else:
        load = (f'from transformers import AutoModelForCausalLM\n'
                f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")')
    return (f'{load}\nfrom transformers import AutoTokenizer\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")\n'
            'messages = [{"role": "user", "content": "Give me three names for a cat."}]\n'
            'inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True,\n'
            '                                       return_tensors="pt", return_dict=True)\n'
            'output = model.generate(**inputs, max_new_tokens=64)\n'
            'print(tokenizer.decode(output[0][inputs["input_ids"].shape[1]:], '
            'skip_special_tokens=True))')


def write_card(run_dir: Path, out_dir: Path, **kwargs) -> tuple[Path, Path | None]:
    """Write `out_dir/README.md` and `out_dir/training/loss_curve.png` (when there are metrics);
    returns both paths. They stay in the run directory whether or not a push succeeds."""
    plot = report.write_loss_plot([report.load_run(run_dir)], out_dir / LOSS_PLOT)
    out_dir.mkdir(parents=True, exist_ok=True)  # a run without metrics has no plot to make it
    readme = out_dir / "README.md"
    readme.write_text(render_card(run_dir, has_plot=plot is not None, **kwargs))
    return readme, plot
