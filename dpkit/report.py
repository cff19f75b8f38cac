"""`dpkit report RUN_DIR [RUN_DIR ...]`: report.md plus PNG plots drawn from metrics.jsonl.

Works on a run still in progress (no summary.json, maybe a half-written last line) and overlays
several runs on one set of plots, one colour per run. Plots use matplotlib's Agg canvas directly
(no pyplot): no global figure state, no display needed, safe to call from a training process.
The model card (`dpkit.model_card`) embeds the loss plot drawn by `write_loss_plot`.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from dpkit import run_files
from dpkit.errors import RecipeError
from dpkit.eval import present
from dpkit.run_files import METRICS, REPORT, SAMPLES, SUMMARY
from dpkit.rundir import MARKER, files_problem, make_dir, refuse_links_out

PLOT_SIZE = (8.0, 4.5)  # inches; at 100 dpi an 800×450 PNG
PLOT_DPI = 100


# ------------------------------------------------------------------------------------ reading
@dataclass
class RunRecord:
    """What one run directory records (its metrics and summary), read back for a report or a
    model card. Not dpkit.run.Run, the run being trained."""
    path: Path
    name: str
    train: list[dict]
    """Train-step records (those with a `loss`), in file order."""
    evals: list[dict]
    """Eval records (those with an `eval_loss`), in file order."""
    summary: dict | None
    """summary.json, or None while the run is in progress (or if it stopped early)."""
    skipped_lines: int = 0
    """Lines of metrics.jsonl that could not be read (a half-written last line, usually)."""

    @property
    def finished(self) -> bool:
        return self.summary is not None

    @property
    def final_loss(self) -> float | None:
        return self.train[-1]["loss"] if self.train else None

    @property
    def final_eval_loss(self) -> float | None:
        if self.evals:
            return self.evals[-1]["eval_loss"]
        return (self.summary or {}).get("final_eval_loss")

    @property
    def memory_keys(self) -> list[str]:
        keys = {k for r in self.train for k in r if k.startswith("memory_")}
        return sorted(keys)


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict], int]:
    """(train records, eval records, unreadable lines) of the run's metrics.jsonl. A writer may
    be appending right now, so a line that does not parse is counted and skipped instead of
    failing the report (dpkit/run_files.py reads it)."""
    records, skipped = run_files.read_metrics(run_dir)
    evals = [r for r in records if "eval_loss" in r]
    train = [r for r in records if "loss" in r and "eval_loss" not in r]
    return train, evals, skipped


RUN_FILES = [METRICS, SUMMARY, SAMPLES]
"""What a report (and a model card) reads from a run directory."""


def load_run(run_dir: str | Path, name: str | None = None) -> RunRecord:
    path = Path(run_dir)
    if not path.is_dir():
        raise RecipeError.one(str(run_dir), "run directory not found", "check the path")
    refuse_links_out(path, [path / n for n in RUN_FILES], "dpkit reads no file from outside a run "
                     "directory (it would end up in a report or a model card)")
    train, evals, skipped = read_metrics(path)
    summary = run_files.read_summary(path)  # None: in progress (or stopped early)
    return RunRecord(path, name or path.resolve().name, train, evals, summary, skipped)


def load_runs(run_dirs: list[str | Path]) -> list[RunRecord]:
    """Load runs, naming each by its directory; clashing names get their parent's name too."""
    paths = [Path(p) for p in run_dirs]
    base = [p.resolve().name for p in paths]
    names = [f"{p.resolve().parent.name}/{b}" if base.count(b) > 1 else b
             for p, b in zip(paths, base)]
    return [load_run(p, n) for p, n in zip(paths, names)]


# ----------------------------------------------------------------------------------- plotting
def _tokens_axis(runs: list[RunRecord]) -> bool:
    """Plot against tokens when every train record has `tokens_seen`, else against steps."""
    return all("tokens_seen" in r for run in runs for r in run.train)


def _new_figure(title: str, xlabel: str, ylabel: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=PLOT_SIZE, dpi=PLOT_DPI)
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _colour(i: int) -> str:
    return f"C{i % 10}"


def loss_figure(runs: list[RunRecord]):
    """Train loss (line) and eval loss (dashed, dots) against tokens seen, one colour per run."""
    by_tokens = _tokens_axis(runs)
    key = "tokens_seen" if by_tokens else "step"
    fig, ax = _new_figure("Loss", "tokens seen" if by_tokens else "step", "loss")
    for i, run in enumerate(runs):
        ax.plot([r[key] for r in run.train], [r["loss"] for r in run.train],
                color=_colour(i), label=f"{run.name} train")
        evals = [r for r in run.evals if key in r]
        if evals:
            ax.plot([r[key] for r in evals], [r["eval_loss"] for r in evals], color=_colour(i),
                    linestyle="--", marker="o", markersize=4, label=f"{run.name} eval")
    ax.legend(fontsize="small")
    return fig


def _series_figure(runs: list[RunRecord], key: str, title: str, ylabel: str):
    fig, ax = _new_figure(title, "step", ylabel)
    for i, run in enumerate(runs):
        points = [(r["step"], r[key]) for r in run.train if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), color=_colour(i), label=run.name)
    ax.legend(fontsize="small")
    return fig


def memory_figure(runs: list[RunRecord]):
    """Every `memory_*` key against step. A list value holds one reading per rank; each rank is
    its own line, so an imbalanced ZeRO partition shows up."""
    fig, ax = _new_figure("Memory", "step", "MB")
    styles = ["-", "--", ":", "-."]
    for i, run in enumerate(runs):
        for j, key in enumerate(run.memory_keys):
            records = [r for r in run.train if r.get(key) is not None]
            label = key.removeprefix("memory_")
            first = records[0][key] if records else None
            if isinstance(first, list):
                for rank in range(len(first)):
                    ax.plot([r["step"] for r in records if len(r[key]) > rank],
                            [r[key][rank] for r in records if len(r[key]) > rank],
                            color=_colour(i), linestyle=styles[j % 4],
                            alpha=1.0 - 0.6 * rank / max(1, len(first)),
                            label=f"{run.name} {label} rank {rank}")
            elif records:
                ax.plot([r["step"] for r in records], [r[key] for r in records],
                        color=_colour(i), linestyle=styles[j % 4], label=f"{run.name} {label}")
    ax.legend(fontsize="small")
    return fig


def source_names(run: Run) -> list[str]:
    """The data sources' names (summary.json's paths; `source i` while in progress)."""
    k = max((len(r.get("source_tokens_seen") or ()) for r in run.train), default=0)
    paths = [s.get("path") for s in ((run.summary or {}).get("data") or {}).get("sources") or ()]
    names = [Path(p).name if p else None for p in paths]
    return [(names[i] if i < len(names) and names[i] else f"source {i}") + f" [{i}]"
            for i in range(k)]


def source_tokens_figure(runs: list[Run]):
    """Tokens trained from each data source (cumulative) against step: one colour per run, one
    line style per source, so a mixture's shares show as the lines' slopes."""
    fig, ax = _new_figure("Tokens per data source", "step", "tokens seen (cumulative)")
    styles = ["-", "--", ":", "-."]
    for i, run in enumerate(runs):
        records = [r for r in run.train if r.get("source_tokens_seen")]
        for j, name in enumerate(source_names(run)):
            points = [(r["step"], r["source_tokens_seen"][j]) for r in records
                      if len(r["source_tokens_seen"]) > j]
            if points:
                ax.plot(*zip(*points), color=_colour(i), linestyle=styles[j % 4],
                        label=f"{run.name} {name}")
    ax.legend(fontsize="small")
    return fig


def _save(fig, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)  # attach the raster canvas: no pyplot, no backend switch
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def write_loss_plot(runs: list[RunRecord], path: Path) -> Path | None:
    """The loss plot alone (for the model card); None when no step has been logged yet."""
    if not any(run.train for run in runs):
        return None
    return _save(loss_figure(runs), path)


def write_plots(runs: list[RunRecord], out_dir: Path) -> dict[str, Path]:
    """Draw every plot the metrics allow; returns {title: path}."""
    plots: dict[str, Path] = {}
    if not any(run.train for run in runs):
        return plots
    plots["Loss"] = _save(loss_figure(runs), out_dir / "loss.png")
    if any(r.get("tokens_per_s") is not None for run in runs for r in run.train):
        plots["Throughput"] = _save(
            _series_figure(runs, "tokens_per_s", "Throughput", "tokens/s (all ranks)"),
            out_dir / "throughput.png")
    if any(run.memory_keys for run in runs):
        plots["Memory"] = _save(memory_figure(runs), out_dir / "memory.png")
    if any(r.get("rewards/margins") is not None for run in runs for r in run.train):
        # Preference objectives (docs/preference.md): the implicit rewards, per step.
        plots["Reward margin"] = _save(_series_figure(
            runs, "rewards/margins", "Reward margin (chosen - rejected)", "margin"),
            out_dir / "reward_margin.png")
    if any(r.get("rewards/accuracies") is not None for run in runs for r in run.train):
        # Paired objectives only: KTO's rows have no pair to compare within.
        plots["Reward accuracy"] = _save(_series_figure(
            runs, "rewards/accuracies", "Reward accuracy (chosen above rejected)", "fraction"),
            out_dir / "reward_accuracy.png")
    if any(r.get("source_tokens_seen") for run in runs for r in run.train):
        plots["Tokens per data source"] = _save(source_tokens_figure(runs),
                                                out_dir / "source_tokens.png")
    if any(r.get("lr") is not None for run in runs for r in run.train):
        plots["Learning rate"] = _save(_series_figure(runs, "lr", "Learning rate", "lr"),
                                       out_dir / "lr.png")
    return plots


# ------------------------------------------------------------------------------------ report.md
def fmt(value, spec: str = ".4f") -> str:
    """A number for a table cell; `—` for missing."""
    if value is None:
        return "—"
    if isinstance(value, float):
        return format(value, spec)
    return format(value, ",") if isinstance(value, int) else str(value)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    hours, rest = divmod(int(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def _row(run: RunRecord) -> list[str]:
    last = run.train[-1] if run.train else {}
    rates = [r["tokens_per_s"] for r in run.train if r.get("tokens_per_s") is not None]
    wall = (run.summary or {}).get("wall_time_s")
    if wall is None and len(run.train) > 1 and "time" in run.train[0]:
        wall = run.train[-1]["time"] - run.train[0]["time"]
    status = "finished" if run.finished else "in progress (no summary.json)"
    return [run.name, status, fmt(last.get("step")), fmt(last.get("tokens_seen")),
            fmt(run.final_loss), fmt(run.final_eval_loss),
            fmt(statistics.median(rates), ",.0f") if rates else "—", _duration(wall)]


def _details(run: RunRecord) -> list[str]:
    s = run.summary or {}
    lines = [f"### {run.name}", "", f"- directory: `{run.path}`"]
    if not run.finished:
        lines.append("- no summary.json yet: the run is in progress or stopped before the end")
    if run.skipped_lines:
        lines.append(f"- {run.skipped_lines} unreadable line(s) in metrics.jsonl skipped "
                     "(a line being written, usually)")
    if s:
        lines.append(f"- world size {s.get('world_size')}, global batch "
                     f"{s.get('global_batch_size')} = micro batch {s.get('micro_batch_size')} × "
                     f"gradient accumulation {s.get('grad_accum')} × world size "
                     f"{s.get('world_size')}; ZeRO stage {s.get('zero_stage')}; {s.get('dtype')}")
        lines.append(f"- base model: {s.get('base_model')}; data: "
                     f"{', '.join(map(str, s.get('datasets') or [])) or '—'}")
        if s.get("hardware"):
            lines.append(f"- hardware: {s['hardware']}")
        data = s.get("data") or {}
        for i, src in enumerate(data.get("sources") or ()):
            share = src.get("token_share")
            lines.append(f"- data source [{i}] `{src.get('path')}` ({src.get('format')}"
                         + (f", weight {src['weight']:g}" if src.get("weight") else "")
                         + f"): {fmt(src.get('rows_available'))} {src.get('unit', 'rows')} "
                         f"available, {fmt(src.get('rows_per_epoch'))} drawn per epoch; the run "
                         f"took {fmt(src.get('rows_seen'))} of them, {fmt(src.get('tokens_seen'))}"
                         f" tokens ({'—' if share is None else f'{100 * share:.1f}%'} of the "
                         f"run's tokens; mixture {data.get('mixture', 'concat')})")
        if s.get("objective", "sft") != "sft":
            last = run.train[-1] if run.train else {}
            lines.append(f"- objective {s['objective']}" + "".join(
                f", {k} {s[k]}" for k in ("beta", "simpo_gamma", "orpo_lambda", "reference")
                if k in s) + f"; last reward accuracy {fmt(last.get('rewards/accuracies'))}, "
                f"margin {fmt(last.get('rewards/margins'))}")
    for key in run.memory_keys:
        values = [v for r in run.train if (v := r.get(key)) is not None]
        peak = max(max(v) if isinstance(v, list) else v for v in values)
        lines.append(f"- `{key}`: {peak:,.0f} at its highest (over steps and ranks)")
    lines.append("")  # then lm-eval scores and every eval's sample answers (dpkit/eval)
    lines += present.benchmarks_section(run.summary, "#### Benchmarks")
    lines += present.samples_section(run.path, {r["step"]: r["eval_loss"] for r in run.evals})
    return lines


REPORT_FILES = ["report.md", "loss.png", "throughput.png", "memory.png", "lr.png",
                "reward_margin.png", "reward_accuracy.png", "source_tokens.png"]


def write_report(run_dirs: list[str | Path], out_dir: str | Path | None = None) -> Path:
    """Write report.md and the plots; returns the path of report.md.

    `out_dir` defaults to `<run>/report` for one run and `./report` for several.
    """
    if not run_dirs:
        raise RecipeError.one("report", "no run directory given", "pass one or more RUN_DIRs")
    runs = load_runs(list(run_dirs))
    out = Path(out_dir) if out_dir is not None else (
        runs[0].path / REPORT if len(runs) == 1 else Path(REPORT))
    # Never write through a link: the default folder must stay inside the run, and no file of
    # the report may lead out of the folder it is written to.
    written = [out / n for n in [*REPORT_FILES, MARKER]]
    if out_dir is None and len(runs) == 1:
        refuse_links_out(runs[0].path, written, "dpkit report would write through it")
    refuse_links_out(out, written, "dpkit report would write through it")
    problem = files_problem(out, REPORT_FILES, "report", "--out")
    if problem is not None:  # another tool's report.md or plots are not ours to replace
        raise RecipeError(problem)
    make_dir(out, "report")
    plots = write_plots(runs, out)

    header = ["run", "status", "step", "tokens seen", "final train loss", "final eval loss",
              "median tokens/s", "wall time"]
    lines = ["# dpkit training report", "",
             f"{len(runs)} run(s), written {time.strftime('%Y-%m-%d %H:%M:%S')}. Final losses are "
             "the last logged values in metrics.jsonl.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_row(run)) + " |" for run in runs]
    lines.append("")
    if not plots:
        lines += ["No train step has been logged yet: no plots.", ""]
    for title, path in plots.items():
        lines += [f"## {title}", "", f"![{title}]({path.name})", ""]
    lines += ["## Runs", ""]
    for run in runs:
        lines += _details(run)
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report


# ---------------------------------------------------------------------------------------- CLI


