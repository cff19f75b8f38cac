"""The run directory's one home (dpkit/run_files.py): files and folders written whole even when
the writer dies, one tolerant reader of metrics.jsonl for every user, and no run-directory file
name or hand-written temporary-then-rename anywhere else in dpkit."""

from __future__ import annotations

import ast
import functools
import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import dpkit
from dpkit import checkpoint as C
from dpkit import report
from dpkit import run_files as F
from dpkit.eval.evaluator import baseline_from_metrics

ROOT = Path(dpkit.__file__).parent
OLD = '{"steps": 4, "final_loss": 2.25}\n'
NEW = b'{"steps": 8, "final_loss": 1.5, "wall_time_s": 12.0}\n'


# ----------------------------------------------------------------------- files written whole
@pytest.mark.parametrize("old", [None, OLD], ids=["no-old-file", "old-file"])
def test_a_writer_that_fails_midway_leaves_the_old_file(tmp_path, old):
    path = tmp_path / F.SUMMARY
    if old is not None:
        path.write_text(old)

    def half_then_fail(f):
        f.write(NEW[:12])
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space"):
        F.write_atomic(path, half_then_fail)
    assert (path.read_text() if path.exists() else None) == old
    assert [p.name for p in tmp_path.iterdir()] == ([] if old is None else [F.SUMMARY])
    F.write_atomic(path, lambda f: f.write(NEW))
    assert path.read_bytes() == NEW and [p.name for p in tmp_path.iterdir()] == [F.SUMMARY]


# A process killed mid-write: the helper, and a plain write as the control (what it prevents).
DIE_WHILE_WRITING = """
import os, signal, sys
from pathlib import Path
from dpkit.run_files import write_atomic
path, how, new = Path(sys.argv[1]), sys.argv[2], sys.argv[3].encode()
def half_then_die(f):
    f.write(new[:12])
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
if how == "helper":
    write_atomic(path, half_then_die)
else:
    with open(path, "wb") as f:
        half_then_die(f)
"""


def die_while_writing(path: Path, how: str) -> None:
    proc = subprocess.run([sys.executable, "-c", DIE_WHILE_WRITING, str(path), how, NEW.decode()],
                          env={**os.environ, "PYTHONPATH": str(ROOT.parent)})
    assert proc.returncode == -signal.SIGKILL


def test_a_writer_killed_midway_leaves_the_old_file_never_half_of_the_new(tmp_path):
    plain, safe = tmp_path / "plain", tmp_path / "safe"
    for run in (plain, safe):
        run.mkdir()
        (run / F.SUMMARY).write_text(OLD)
    die_while_writing(plain / F.SUMMARY, "plain")
    assert (plain / F.SUMMARY).read_bytes() == NEW[:12]  # the control: half a file
    assert F.read_summary(plain) is None
    die_while_writing(safe / F.SUMMARY, "helper")
    assert (safe / F.SUMMARY).read_text() == OLD
    assert F.read_summary(safe) == json.loads(OLD)
    # what the killed writer left is hidden beside it, under a name no reader looks for
    assert [p.name.startswith(f".{F.SUMMARY}.") and p.name.endswith(".tmp")
            for p in safe.iterdir() if p.name != F.SUMMARY] == [True]


def test_a_written_file_replaces_a_link_not_its_target_and_follows_the_umask(tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    target = tmp_path / "elsewhere"
    target.write_text("theirs")
    (tmp_path / F.SUMMARY).symlink_to(target)
    F.write_json(tmp_path / F.SUMMARY, {"steps": 8})
    assert not (tmp_path / F.SUMMARY).is_symlink() and target.read_text() == "theirs"
    assert F.read_summary(tmp_path) == {"steps": 8}
    assert stat.S_IMODE((tmp_path / F.SUMMARY).stat().st_mode) == 0o666 & ~mask
    folder = F.stage_dir(tmp_path / "export", unique=".export.partial-")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~mask  # not mkdtemp's 0700


def test_a_folder_appears_whole_with_its_marker_or_not_at_all(tmp_path):
    out = tmp_path / F.MODEL
    out.mkdir()
    (out / "weights").write_text("old")
    tmp = F.stage_dir(out)
    (tmp / "weights").write_text("new, half")
    # the writer died here: the old folder is untouched; the next write starts clean
    assert (out / "weights").read_text() == "old"
    tmp = F.stage_dir(out)
    assert tmp == F.staged_path(out) and not any(tmp.iterdir())
    (tmp / "weights").write_text("new")
    assert F.publish_dir(tmp, out, marker=("COMPLETE", "ok\n"))
    assert sorted(p.name for p in out.iterdir()) == ["COMPLETE", "weights"]
    assert (out / "weights").read_text() == "new" and not tmp.exists()
    # replace=None: another writer got there first; theirs stays, ours is the caller's to drop
    mine = F.stage_dir(out, unique=".mine-")
    (mine / "weights").write_text("mine")
    assert F.publish_dir(mine, out, replace=None) is False
    assert (out / "weights").read_text() == "new" and (mine / "weights").is_file()


# -------------------------------------------------------------------- metrics.jsonl, one reader
def torn_metrics(run: Path) -> list[dict]:
    """A metrics.jsonl as a crash leaves it: whole lines, then half of one (no newline)."""
    records = [{"step": 0, "eval_loss": 3.5}, {"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5},
               {"step": 2, "eval_loss": 2.75}, {"step": 3, "loss": 2.0}]
    run.mkdir(exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in records) + "\n"  # and a blank line
    (run / F.METRICS).write_text(text + json.dumps({"step": 4, "loss": 1.5})[:9])
    return records


def test_every_reader_of_metrics_skips_a_half_written_last_line(tmp_path):
    records = torn_metrics(tmp_path)
    assert F.read_metrics(tmp_path) == (records, 1)
    run = report.load_run(tmp_path)
    assert [r["step"] for r in run.train] == [1, 2, 3] and run.skipped_lines == 1
    assert [r["step"] for r in run.evals] == [0, 2] and run.summary is None
    assert C.last_logged_step(tmp_path) == 3
    assert baseline_from_metrics(tmp_path) == 3.5


def test_a_resume_drops_the_torn_line_and_the_steps_after_it(tmp_path):
    """Before, truncate_jsonl parsed every line strictly: a resume after a crash mid-line failed.
    Kept lines are kept as written; the next record appended is a whole line of its own."""
    torn_metrics(tmp_path)
    path = tmp_path / F.METRICS
    before = path.read_text().splitlines()
    F.truncate_jsonl(path, 2)
    assert path.read_text().splitlines() == before[:4]
    F.append_jsonl(path, {"step": 3, "loss": 1.75})
    assert F.read_metrics(tmp_path) == ([json.loads(line) for line in before[:4]]
                                        + [{"step": 3, "loss": 1.75}], 0)


# ------------------------------------------------------------------ one home, checked in source
LAYOUT = {v for k, v in vars(F).items() if k.isupper() and isinstance(v, str)}
FILE_NAMES = {n for n in LAYOUT if "." in n or n.isupper()}  # not plain words ("model")

ALLOWED_NAMES = {
    ("hub.py", "merged"): "a scratch folder in the push's temporary directory, not <run>/merged",
}
"""Layout names spelled outside run_files.py on purpose, with why. What is inside a checkpoint
(ds/, hf/, dpkit.json, COMPLETE) is checkpoint.py's, and the files of a report or a model card
are report.py's and hub.py's: those names are not the run directory's and are not checked."""


@functools.cache
def parsed(source: str) -> ast.Module:
    return ast.parse(source)


def layout_literals(source: str) -> list[tuple[int, str]]:
    """(line, name) where code spells a run-directory name: `path / "summary.json"` (or
    `/ "model/x"`), or a file name ("metrics.jsonl") as a string of its own (docstrings and
    messages that mention a file in a sentence don't count)."""
    found = []
    for node in ast.walk(parsed(source)):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and \
                isinstance(node.right, ast.Constant) and isinstance(node.right.value, str) and \
                node.right.value.split("/")[0] in LAYOUT:
            found.append((node.lineno, node.right.value))
        elif isinstance(node, ast.Constant) and node.value in FILE_NAMES:
            found.append((node.lineno, node.value))
    return sorted(set(found))


def test_the_scan_sees_a_file_name_spelled_in_code():
    code = ('p = run / "metrics.jsonl"\nq = run / "model/config.json"\nfiles = ["summary.json"]\n'
            'x = {"model": 1}\nsay("summary.json is missing")\n')
    assert layout_literals(code) == [(1, "metrics.jsonl"), (2, "model/config.json"),
                                     (3, "summary.json")]


def test_no_run_directory_file_name_outside_its_home():
    assert {"metrics.jsonl", "summary.json", "recipe.yaml", ".dpkit-run", "model"} <= LAYOUT
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        if path.name != "run_files.py":
            for line, name in layout_literals(path.read_text()):
                rel = str(path.relative_to(ROOT))
                if (rel, name) not in ALLOWED_NAMES:
                    found[f"{rel}:{line}"] = name
    assert not found, f"name these through dpkit/run_files.py: {found}"
    gone = [key for key in ALLOWED_NAMES if not any(
        name == key[1] for _, name in layout_literals((ROOT / key[0]).read_text()))]
    assert not gone, f"allowed but no longer there, delete: {gone}"


ALLOWED_RENAMES = {
    ("data/cache.py", "set_aside"): "moves a damaged cache entry aside; writes nothing",
}


def renames(source: str) -> list[tuple[str, int]]:
    """(function, line) of each os.replace / os.rename / `<path>.rename(...)` call."""
    found = []
    for func in ast.walk(parsed(source)):
        if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(func):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and (
                        node.func.attr == "rename" or node.func.attr == "replace" and
                        isinstance(node.func.value, ast.Name) and node.func.value.id == "os"):
                    found.append((func.name, node.lineno))
    return found


def test_every_temporary_then_rename_goes_through_the_helper():
    assert [f for f, _ in renames("def w(p, t):\n    os.replace(t, p)\n    t.rename(p)\n")] \
        == ["w", "w"]
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        if path.name != "run_files.py":
            found.update({f"{rel}:{line}": f for f, line in renames(path.read_text())
                          if (rel, f) not in ALLOWED_RENAMES})
    assert not found, f"use run_files.write_atomic / publish_dir: {found}"
