"""Samples and benchmark scores as Markdown: `dpkit report` shows every eval's answers side by
side, the model card each prompt's answer before and after training, both the lm-eval scores."""

from __future__ import annotations

from pathlib import Path

from dpkit.run_files import SAMPLES, read_jsonl


def read_samples(run_dir: Path) -> list[dict]:
    """samples.jsonl's records (a half-written last line is skipped)."""
    records, _ = read_jsonl(Path(run_dir) / SAMPLES)
    return [r for r in records if {"step", "index", "completion"} <= r.keys()]


def by_prompt(records: list[dict]) -> list[tuple[str, dict[int, str]]]:
    """[(prompt, {step: completion})] in prompt order."""
    prompts: dict[int, tuple[str, dict[int, str]]] = {}
    for r in records:
        _, answers = prompts.setdefault(r["index"], (r.get("prompt", ""), {}))
        answers[r["step"]] = r["completion"]
    return [prompts[i] for i in sorted(prompts)]


def cell(text: str, limit: int = 400) -> str:
    """Text for one Markdown table cell: pipes escaped, newlines as <br>, long text cut."""
    text = text if len(text) <= limit else text[:limit] + "…"
    return (text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", "")
            .replace("\n", "<br>")) or "*(empty)*"


def quote(prompt: str) -> list[str]:
    return [f"> {line}" if line else ">" for line in prompt.splitlines()] or [">"]


def samples_section(run_dir: Path, eval_losses: dict[int, float] | None = None) -> list[str]:
    """For report.md: per prompt, its answer at every eval (one row per eval step)."""
    prompts = by_prompt(read_samples(run_dir))
    if not prompts:
        return []
    losses = eval_losses or {}
    lines = ["#### Sample answers at each eval", "",
             ("Greedy decoding from the same prompts at every eval (samples.jsonl); step 0 is "
              "the untouched model."), ""]
    for i, (prompt, answers) in enumerate(prompts, 1):
        lines += [f"Prompt {i}:", "", *quote(prompt), "",
                  "| step | eval loss | answer |", "|---|---|---|"]
        for step in sorted(answers):
            loss = losses.get(step)
            lines.append(f"| {step} | {'—' if loss is None else f'{loss:.4f}'} | "
                         f"{cell(answers[step])} |")
        lines.append("")
    return lines


def before_after(run_dir: Path) -> list[str]:
    """For the model card: each prompt's first and last answer."""
    prompts = by_prompt(read_samples(run_dir))
    if not prompts:
        return []
    first = min(min(a) for _, a in prompts)
    last = max(max(a) for _, a in prompts)
    lines = ["## Sample answers", "",
             (f"Greedy answers to the same prompts at step {first} (before training when 0) and "
              f"at step {last}, written during training to `training/samples.jsonl`."), "",
             f"| prompt | step {first} | step {last} |", "|---|---|---|"]
    for prompt, answers in prompts:
        lines.append(f"| {cell(prompt, 200)} | {cell(answers.get(first, ''))} | "
                     f"{cell(answers.get(last, ''))} |")
    return lines + [""]


def benchmarks_section(summary: dict | None, heading: str = "## Benchmarks") -> list[str]:
    """lm-eval scores from summary.json (or the error that stopped them)."""
    bench = (summary or {}).get("benchmarks")
    if not bench:
        return []
    lines = [heading, ""]
    if bench.get("error"):
        return lines + [f"lm-eval did not finish: `{bench['error']}`", ""]
    limit = f", at most {bench['limit']} documents per task" if bench.get("limit") else ""
    lines += [(f"EleutherAI lm-eval {bench.get('lm_eval_version') or ''} on the saved model "
               f"after training{limit} ({bench.get('wall_s', 0):.0f} s)."), "",
              "| task | metric | value | documents |", "|---|---|---|---|"]
    for task, metrics in (bench.get("tasks") or {}).items():
        n = (bench.get("n_samples") or {}).get(task)
        for metric, value in metrics.items():
            lines.append(f"| {task} | {metric} | {value:.4f} | {'—' if n is None else n} |")
    return lines + [""]
