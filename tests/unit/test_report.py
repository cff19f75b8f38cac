"""dpkit report: plots are real PNGs of the fixture's numbers; report.md states each run's final
losses, computed here straight from the fixture lines (not from dpkit's reader)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from dpkit import report
from dpkit.cli import report as report_cli
from dpkit.errors import RecipeError


def make_run(path: Path, *, steps: int, seed: float, finished: bool, memory: bool = False,
             evals_every: int | None = 5, torn_tail: bool = False) -> list[str]:
    """Write a run directory's metrics.jsonl (and summary.json if finished); returns the lines."""
    path.mkdir(parents=True)
    lines, tokens_seen, t0 = [], 0, 1_700_000_000.0
    for step in range(1, steps + 1):
        tokens = 900 + 13 * (step % 7)
        tokens_seen += tokens
        loss = round(2.5 * math.exp(-step / (10 * seed)) + 0.3, 6)
        rec = {"step": step, "epoch": 0, "loss": loss,
               "lr": 1e-4 * min(1.0, step / 3), "grad_norm": 1.0 / step, "tokens": tokens,
               "tokens_seen": tokens_seen, "samples": 8, "step_time_s": 0.5,
               "tokens_per_s": tokens / 0.5 * seed, "time": t0 + step}
        if memory:
            rec["memory_peak_mb"] = [1000.0 + step, 1100.0 + 2 * step]  # one reading per rank
            rec["memory_rss_mb"] = 3000.0 + step
        lines.append(json.dumps(rec))
        if evals_every and step % evals_every == 0:
            lines.append(json.dumps({"step": step, "eval_loss": round(rec["loss"] + 0.05, 6),
                                     "eval_tokens": 400, "tokens_seen": tokens_seen,
                                     "time": t0 + step}))
    text = "\n".join(lines) + "\n"
    if torn_tail:  # a writer caught mid-line
        text += '{"step": %d, "epoch": 0, "loss": 0.1' % (steps + 1)
    (path / "metrics.jsonl").write_text(text)
    if finished:
        last = json.loads([ln for ln in lines if '"loss"' in ln][-1])
        (path / "summary.json").write_text(json.dumps({
            "steps": steps, "tokens_seen": tokens_seen, "final_loss": last["loss"],
            "final_eval_loss": None, "world_size": 2, "global_batch_size": 8,
            "micro_batch_size": 2, "grad_accum": 2, "zero_stage": 2, "dtype": "bfloat16",
            "base_model": "inline config", "datasets": ["data/x.jsonl"], "wall_time_s": 75.0,
            "versions": {}, "hardware": "2× CPU"}))
    return lines


def final_losses(lines: list[str]) -> tuple[float, float | None]:
    """Independent reference: the last train loss and last eval loss in the written lines."""
    records = [json.loads(ln) for ln in lines]
    train = [r["loss"] for r in records if "loss" in r]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    return train[-1], (evals[-1] if evals else None)


def assert_real_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 1000, path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(path)
    height, width = image.shape[:2]
    assert (width, height) == (800, 450)
    assert not np.all(image == image[0, 0]), f"{path.name} is a blank image"


@pytest.fixture()
def two_runs(tmp_path):
    a_lines = make_run(tmp_path / "run-a", steps=20, seed=1.0, finished=True, memory=True)
    b_lines = make_run(tmp_path / "run-b", steps=13, seed=2.0, finished=False, evals_every=None,
                       torn_tail=True)
    return tmp_path, a_lines, b_lines


def test_report_overlays_runs_and_states_final_losses(two_runs):
    tmp, a_lines, b_lines = two_runs
    out = tmp / "out"
    md_path = report.write_report([tmp / "run-a", tmp / "run-b"], out)
    assert md_path == out / "report.md"
    for name in ("loss.png", "throughput.png", "lr.png", "memory.png"):
        assert_real_png(out / name)
    md = md_path.read_text()
    for run, lines in (("run-a", a_lines), ("run-b", b_lines)):
        train, evaluation = final_losses(lines)
        row = next(ln for ln in md.splitlines() if ln.startswith(f"| {run} |"))
        assert f"{train:.4f}" in row
        if evaluation is not None:
            assert f"{evaluation:.4f}" in row
    assert "![Loss](loss.png)" in md
    assert "in progress" in next(ln for ln in md.splitlines() if ln.startswith("| run-b |"))
    assert "1 unreadable line" in md  # the torn tail of run-b was skipped, not fatal
    # memory per rank: the peak of rank 1 at step 20 is 1100 + 40
    assert "`memory_peak_mb`: 1,140 at its highest" in md


def test_loss_plot_draws_the_fixture_numbers(two_runs):
    tmp, a_lines, b_lines = two_runs
    runs = report.load_runs([tmp / "run-a", tmp / "run-b"])
    fig = report.loss_figure(runs)
    lines = {ln.get_label(): ln for ln in fig.axes[0].get_lines()}
    assert set(lines) == {"run-a train", "run-a eval", "run-b train"}
    for run, raw in (("run-a", a_lines), ("run-b", b_lines)):
        records = [json.loads(ln) for ln in raw]
        train = [r for r in records if "loss" in r]
        np.testing.assert_allclose(lines[f"{run} train"].get_xdata(),
                                   [r["tokens_seen"] for r in train])
        np.testing.assert_allclose(lines[f"{run} train"].get_ydata(), [r["loss"] for r in train])
    evals = [json.loads(ln) for ln in a_lines if "eval_loss" in ln]
    np.testing.assert_allclose(lines["run-a eval"].get_ydata(), [r["eval_loss"] for r in evals])


def test_memory_plot_has_a_line_per_rank(two_runs):
    tmp, *_ = two_runs
    fig = report.memory_figure(report.load_runs([tmp / "run-a"]))
    labels = sorted(ln.get_label() for ln in fig.axes[0].get_lines())
    assert labels == ["run-a peak_mb rank 0", "run-a peak_mb rank 1", "run-a rss_mb"]


def test_single_run_in_progress_defaults_next_to_it_and_skips_memory(tmp_path):
    lines = make_run(tmp_path / "live", steps=4, seed=1.0, finished=False, torn_tail=True,
                     evals_every=2)
    md_path = report.write_report([tmp_path / "live"])
    assert md_path == tmp_path / "live" / "report" / "report.md"
    assert_real_png(md_path.parent / "loss.png")
    assert not (md_path.parent / "memory.png").exists()  # no memory_* keys in these metrics
    train, evaluation = final_losses(lines)
    assert f"{train:.4f}" in md_path.read_text() and f"{evaluation:.4f}" in md_path.read_text()


def test_run_without_metrics_yet_and_missing_dir(tmp_path):
    (tmp_path / "fresh").mkdir()
    md = report.write_report([tmp_path / "fresh"], tmp_path / "out").read_text()
    assert "No train step has been logged yet" in md
    assert not list((tmp_path / "out").glob("*.png"))
    with pytest.raises(RecipeError, match="run directory not found"):
        report.write_report([tmp_path / "nope"])


def test_same_named_runs_are_told_apart(tmp_path):
    make_run(tmp_path / "x" / "run", steps=3, seed=1.0, finished=True)
    make_run(tmp_path / "y" / "run", steps=3, seed=2.0, finished=True)
    md = report.write_report([tmp_path / "x" / "run", tmp_path / "y" / "run"],
                             tmp_path / "out").read_text()
    assert "| x/run |" in md and "| y/run |" in md


def test_cli_subcommand(two_runs):
    tmp, *_ = two_runs
    parser = argparse.ArgumentParser(prog="dpkit")
    report_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["report", str(tmp / "run-a"), str(tmp / "run-b"),
                              "--out", str(tmp / "cli")])
    assert args.func(args) == 0
    assert (tmp / "cli" / "report.md").is_file()
    assert_real_png(tmp / "cli" / "loss.png")


def test_tokens_per_source_are_plotted_and_listed(tmp_path):
    """A mixture run's cumulative tokens per source: a plot, and report.md's line per source
    written from summary.json (the fixture's numbers, not dpkit's reader)."""
    run = tmp_path / "mix"
    lines = make_run(run, steps=12, seed=1.0, finished=True)
    records = [json.loads(ln) for ln in lines]
    seen = [0, 0, 0]
    for r in records:
        if "loss" in r:  # 50/30/20 of each step's tokens
            seen = [seen[0] + r["tokens"] // 2, seen[1] + 3 * r["tokens"] // 10,
                    seen[2] + r["tokens"] - r["tokens"] // 2 - 3 * r["tokens"] // 10]
            r["source_tokens_seen"] = list(seen)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = json.loads((run / "summary.json").read_text())
    summary["data"] = {"mixture": "all_exhausted", "sources": [
        {"path": f"data/{n}.jsonl", "format": "text", "weight": w, "rows_available": 10 * w,
         "rows_per_epoch": 20 * w, "unit": "rows", "rows_seen": 30 * w, "tokens_seen": t,
         "token_share": t / sum(seen)} for n, w, t in zip("abc", (5, 3, 2), seen)]}
    (run / "summary.json").write_text(json.dumps(summary))
    path = report.write_report([run])
    assert_real_png(path.parent / "source_tokens.png")
    text = path.read_text()
    assert "## Tokens per data source" in text
    share = 100 * seen[0] / sum(seen)
    assert (f"- data source [0] `data/a.jsonl` (text, weight 5): 50 rows available, 100 drawn "
            f"per epoch; the run took 150 of them, {seen[0]:,} tokens ({share:.1f}%") in text
    assert report.source_names(report.load_run(run)) == ["a.jsonl [0]", "b.jsonl [1]",
                                                          "c.jsonl [2]"]
