"""The run directory's files: the name of every file dpkit keeps there, one reader and one
writer per file, and the one way dpkit writes a file or a folder whole.

    <output.dir>/
        .dpkit-run        MARKER: dpkit made this directory, and for what (dpkit/rundir.py)
        recipe.yaml       RECIPE: the resolved recipe           (setup; write_text)
        ds_config.json    DS_CONFIG: the resolved DeepSpeed config  (setup; write_json)
        metrics.jsonl     METRICS: a JSON line per logged step, eval, restart  (append_jsonl)
        samples.jsonl     SAMPLES: a JSON line per prompt per eval (dpkit/eval; append_jsonl)
        summary.json      SUMMARY: written last; the run finished  (write_json)
        ref_logps.pt      REF_LOGPS: reference log-probs a method precomputes before step 1
                          (preference pairs; KTO's rows and mismatched rows) (write_atomic)
        PREEMPTED         the checkpoint the ranks wrote when stopped by SIGTERM
        checkpoints/      CHECKPOINTS: step-NNNNNNNN/ each, and LATEST (dpkit/checkpoint.py
                          owns what is inside a checkpoint)
        model/            MODEL: the final model, or the LoRA adapter (publish_dir)
        merged/           MERGED: adapter merged into its base (peft.merge)
        base/             BASE: an inline-config model's initial weights, under its adapter
        logs/             LOGS: rank{r}.log per rank
        tensorboard/      TENSORBOARD: output.report_to: [tensorboard]
        hub/              HUB: the model card and push.json (dpkit push; dpkit/hub.py)
        report/           REPORT: where `dpkit report RUN` writes by default

Files are written whole or not at all (`write_atomic`: a temporary name in the same folder,
fsync, rename), so a crash leaves the old file or the new one, never half of one, and a reader
never sees summary.json half-written. The two files that grow during a run (metrics.jsonl,
samples.jsonl) are appended a line at a time: a crash can tear the last line, so their one
reader (`read_jsonl`) skips a line that does not parse, and a resume drops it
(`truncate_jsonl`). A folder (a model, an export, a cache entry) is filled under a temporary
name and appears whole (`stage_dir`, `publish_dir`), with its completion marker written last.

A leaf (test_imports' base layer): it imports nothing of dpkit and no torch; the checks before
launch, the ranks, `dpkit report` and the planner all name and read run directories through it.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

# --------------------------------------------------------------------------------- the layout
MARKER = ".dpkit-run"
RECIPE = "recipe.yaml"
DS_CONFIG = "ds_config.json"
METRICS = "metrics.jsonl"
SAMPLES = "samples.jsonl"
"""One line per prompt per eval: {step, index, prompt, completion, completion_ids}."""
SUMMARY = "summary.json"
REF_LOGPS = "ref_logps.pt"
PREEMPTED = "PREEMPTED"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
"""In checkpoints/: the name of the checkpoint this run continues from."""
MODEL = "model"
MERGED = "merged"
BASE = "base"
LOGS = "logs"
TENSORBOARD = "tensorboard"
HUB = "hub"
REPORT = "report"


# ------------------------------------------------------------------------ writing whole files
def write_atomic(path: Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Write `path` whole or not at all. `write(f)` fills a new file beside it (same folder, so
    same file system), which is flushed, fsynced and renamed over `path`; the folder is fsynced
    so the rename survives a power cut. If `write` raises (or the process dies), `path` is as it
    was (the old file, or none) and the temporary file is removed (dies: left, hidden, named
    `.<name>.*.tmp`). A link at `path` is replaced by the file, never written through."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def write_text(path: Path, text: str) -> Path:
    return write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def write_json(path: Path, data) -> Path:
    return write_text(path, json.dumps(data, indent=2) + "\n")


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems can't sync a folder; the rename stands regardless
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------- writing whole folders
def staged_path(out: Path) -> Path:
    """Where `stage_dir(out)` fills `out` (and where a failed write is left to look at)."""
    return Path(out).with_name(Path(out).name + ".partial")


def stage_dir(out: Path, unique: str | None = None) -> Path:
    """A new, empty folder beside `out` to fill, then `publish_dir`. By default `<out>.partial`
    (a leftover of a crashed write there is removed first: use it inside dpkit's own folders);
    with `unique`, a folder named `<unique>…` that no one else has, so nothing of anyone's is
    removed, with the umask's permissions (mkdtemp's 0700 would hide a model from the group)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if unique is None:
        tmp = staged_path(out)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        return tmp
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=unique))
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o777 & ~mask)
    return tmp


def publish_dir(tmp: Path, out: Path, marker: tuple[str, str] | None = None,
                replace: Callable[[Path], None] | None = shutil.rmtree) -> bool:
    """Make the filled folder `tmp` appear as `out`, whole: every file in it is fsynced, then
    the completion marker (`marker`: name, text) is written last inside it, then what is at
    `out` is removed by `replace` and `tmp` renamed to `out`. With `replace=None` an existing
    `out` is kept: another writer got there first; returns False and leaves `tmp` to the caller.
    (A folder can't be swapped in one step: a crash between removing the old `out` and the
    rename leaves no `out`, and the whole new one at `tmp`.)"""
    tmp, out = Path(tmp), Path(out)
    for folder, _, files in os.walk(tmp):
        for name in files:
            with open(Path(folder) / name, "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(folder))
    if marker is not None:
        write_text(tmp / marker[0], marker[1])
    if replace is not None and (out.exists() or out.is_symlink()):
        replace(out)
    try:
        os.rename(tmp, out)
    except OSError:
        if replace is not None:
            raise
        return False
    _fsync_dir(out.parent)
    return True


# ----------------------------------------------------------------------- JSON lines, JSON files
def _lines(path: Path):
    """(line, its object or None) for each non-blank line; none if the file is missing."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        yield line, record if isinstance(record, dict) else None


def read_jsonl(path: Path) -> tuple[list[dict], int]:
    """(records, unreadable lines) of a JSON-lines file; none if it is missing. A writer may be
    appending right now, or have died mid-line: a line that does not parse to an object is
    counted and skipped, never fatal."""
    parsed = [record for _, record in _lines(path)]
    records = [r for r in parsed if r is not None]
    return records, len(parsed) - len(records)


def append_jsonl(path: Path, *records: dict) -> None:
    """Append one line per record (rank 0; metrics.jsonl, samples.jsonl). One write per call,
    so a reader sees whole lines; a crash can tear only the last one (read_jsonl skips it)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))


def truncate_jsonl(path: Path, step: int) -> None:
    """Drop the records written after `step` (a resumed run writes them again) and any line a
    crash tore, keeping the others as they were; rewritten whole. No step counts as step 0."""
    if not Path(path).is_file():
        return
    kept = [line for line, record in _lines(path)
            if record is not None and record.get("step", 0) <= step]
    write_text(path, "".join(line + "\n" for line in kept))


def read_json(path: Path) -> dict | None:
    """A JSON object file, or None when it is missing or not a readable JSON object."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# --------------------------------------------------------------------- one reader per run file
def read_metrics(run_dir: Path) -> tuple[list[dict], int]:
    """metrics.jsonl's records (train steps have `loss`, evals `eval_loss`, restarts `restart`)
    and how many lines could not be read."""
    return read_jsonl(Path(run_dir) / METRICS)


def read_summary(run_dir: Path) -> dict | None:
    """summary.json, or None: the run is in progress, or stopped before the end."""
    return read_json(Path(run_dir) / SUMMARY)
