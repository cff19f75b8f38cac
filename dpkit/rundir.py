"""The run directory's rules, and the one rule for every path dpkit writes or replaces.

A directory dpkit creates for a purpose (a training run, an export, a report, a plan) gets a
small marker file, `.dpkit-run`, naming that purpose. dpkit replaces or deletes only a directory
carrying the marker for the same purpose, and never the working directory, one of its parents,
$HOME or `/`, nor a symbolic link (whatever it points to). Recipes and run directories are
untrusted input (docs/security.md): a recipe that says `output.overwrite: true` about `.` or `~`
is refused, with one line naming the directory and why, and nothing is touched.

Used by the checks before launch (dpkit.preflight), the ranks (dpkit.run) and every command
with an output option (export, plan --write, report --out), so the rule is written once.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from dpkit.errors import Problem, RecipeError
from dpkit.run_files import MARKER, MODEL, RECIPE, SUMMARY, write_text

if TYPE_CHECKING:  # light to import: report, push and plan use the rule without the schema
    from dpkit.recipe import Recipe

# MARKER (`.dpkit-run`), in each directory dpkit created:
# `{"created_by": "dpkit", "kind": ..., "version": ..., "time": ...}`.


# ------------------------------------------------------------------------------------ markers
def mark(directory: Path, kind: str) -> None:
    """Record that dpkit created `directory` for `kind` (run, export, report, plan)."""
    from dpkit import __version__

    write_text(Path(directory) / MARKER, json.dumps(
        {"created_by": "dpkit", "kind": kind, "version": __version__, "time": time.time()}) + "\n")


def marked_kind(directory: Path) -> str | None:
    """The purpose dpkit created `directory` for, or None (no marker, or not a plain file)."""
    path = Path(directory) / MARKER
    if path.is_symlink() or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data.get("kind") if isinstance(data, dict) and data.get("created_by") == "dpkit" else None


def protected(path: Path) -> str | None:
    """Why dpkit must never replace `path` whatever says so, or None."""
    path = Path(path).expanduser()
    if path.is_symlink():
        return f"is a symbolic link (to {os.readlink(path)}); dpkit does not replace links"
    real = path.resolve()
    if real == Path(real.anchor):
        return "is the root directory"
    home = os.environ.get("HOME")
    if home and real == Path(home).expanduser().resolve():
        return "is your home directory ($HOME)"
    cwd = Path.cwd().resolve()
    if real == cwd:
        return "is the working directory"
    if real in cwd.parents:
        return "is a parent of the working directory"
    return None


def replace_problem(path: Path, kind: str, where: str) -> Problem | None:
    """May dpkit delete the existing directory `path` to write a new `kind` there?"""
    path = Path(path).expanduser()
    reason = protected(path)
    if reason is None and not path.is_dir():
        reason = "is a file, not a directory"
    if reason is None and marked_kind(path) != kind:
        reason = (f"was not created by dpkit as a {kind} directory (no {MARKER} marker), and "
                  "dpkit deletes only what it created")
    if reason is None:
        return None
    return Problem(where, f"'{path}' {reason}; nothing was changed",
                   "choose another directory (or remove it yourself if you mean to)")


def write_problem(path: Path, kind: str, where: str, replace: bool, how: str) -> Problem | None:
    """May dpkit write a new `kind` directory at `path`? It may create it, fill it if empty,
    and replace it only when `replace` is asked for and `replace_problem` allows it. `how` names
    the option that asks for replacing (e.g. `--overwrite`)."""
    path = Path(path).expanduser()
    if path.is_symlink() and replace:
        return replace_problem(path, kind, where)
    if not path.exists():
        return None
    if not path.is_dir():
        return Problem(where, f"'{path}' is a file, not a directory", "name a directory")
    if not any(path.iterdir()):
        return None
    if not replace:
        return Problem(where, f"'{path}' already exists and is not empty",
                       f"choose another directory, or {how} to replace it")
    return replace_problem(path, kind, where)


def files_problem(directory: Path, names: list[str], kind: str, where: str) -> Problem | None:
    """May dpkit write `names` into `directory`? Yes where none of them exists yet, or where
    dpkit made the directory for the same purpose (writing it again is what the user asked)."""
    directory = Path(directory).expanduser()
    if directory.exists() and not directory.is_dir():
        return Problem(where, f"'{directory}' is a file, not a directory", "name a directory")
    present = [n for n in names if (directory / n).exists() or (directory / n).is_symlink()]
    if not present or marked_kind(directory) == kind and not directory.is_symlink():
        return None
    return Problem(where, f"'{directory}' already holds {', '.join(present)}, not written by "
                   f"dpkit {kind}; nothing was changed", "choose another (or a new) directory")


def make_dir(directory: Path, kind: str) -> Path:
    """Create `directory` (or adopt an empty one) and mark it, unless it carries a marker."""
    directory = Path(directory).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    if marked_kind(directory) is None and not any(directory.iterdir()):
        mark(directory, kind)
    return directory


def replace_dir(directory: Path, kind: str, where: str) -> None:
    """Delete `directory` if the rule allows it (checked again right before deleting)."""
    problem = replace_problem(directory, kind, where)
    if problem is not None:
        raise RecipeError(problem)
    shutil.rmtree(directory)


# ------------------------------------------------------------------ links out of a directory
def leads_out(root: Path, path: Path) -> Path | None:
    """The symbolic link through which `path` (named below `root`) leads outside `root`, or
    None when, links followed, it stays inside. `root` itself is what the user typed, so a link
    to it is followed; below it, a run directory someone sent may hold a link to anything
    (a key, ~/.bashrc, another project's files) that reading, writing or uploading would reach."""
    real_root = Path(root).resolve()
    current = Path(root)
    for part in Path(path).relative_to(root).parts:
        current = current / part
        try:
            real = current.resolve()
        except (OSError, RuntimeError):  # a loop of links leads nowhere dpkit should go
            return current
        if real != real_root and real_root not in real.parents:
            return current
    return None


def refuse_links_out(root: Path, paths, action: str) -> None:
    """Raise a RecipeError naming the first of `paths` that leads out of `root` by a link.
    `action` says what dpkit was about to do with it (e.g. "report would write through it")."""
    for path in paths:
        link = leads_out(root, path)
        if link is not None:
            raise RecipeError.one(str(link), f"is a symbolic link to '{os.readlink(link)}', "
                                  f"outside '{root}'; {action}; nothing was changed",
                                  "replace the link by the file itself, or remove it")


# -------------------------------------------------------------------------- the run directory
class RunFinished(Exception):
    """A resume aimed at a run that already finished: nothing to do, nothing changed."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def is_run_dir(out: Path) -> bool:
    """Marked as a run, or (made before markers existed) holding a complete checkpoint."""
    from dpkit.checkpoint import latest_complete

    return marked_kind(out) == "run" or latest_complete(out) is not None


def finished(recipe: Recipe) -> RunFinished | None:
    """`resume` aimed at a run directory with a summary.json: the run is done. resume=auto with
    the recipe it finished with is "make sure this run is trained": already true, exit 0 (so a
    requeued job reports success); anything else would retrain it: exit 2. Either way nothing in
    the directory changes."""
    out = Path(recipe.output.dir).expanduser()
    if recipe.resume is None or not (out / SUMMARY).is_file():
        return None
    model = out / MODEL
    where = f"its model is in {model}" if model.is_dir() else "it saved no model"
    differs = _recipe_differences(recipe, out / RECIPE)
    if recipe.resume == "auto" and not differs:
        return RunFinished(f"[dpkit] {out} is a finished run (summary.json is there); {where}. "
                           "Nothing to resume, nothing changed.", 0)
    why = f"this recipe differs in {', '.join(differs)}" if differs else \
        f"resume={recipe.resume} would train it again"
    return RunFinished(f"error: resume: {out} is a finished run ({where}); {why} — nothing was "
                       "changed; to train further, use a new output.dir with resume=<this run's "
                       "checkpoints/step-N>", 2)


def _recipe_differences(recipe: Recipe, saved: Path) -> list[str]:
    """Top-level keys (section.key) where this recipe differs from the one the run saved."""
    import yaml

    try:
        old = yaml.safe_load(saved.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return ["recipe.yaml (unreadable)"]
    new = recipe.model_dump(mode="json")
    out = []
    for section in sorted((set(old) | set(new)) - {"resume"}):
        a, b = old.get(section), new.get(section)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{section}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        else:
            out.append(section)
    return out[:4]


def output_dir_problem(recipe: Recipe) -> RecipeError | None:
    """The run directory may be created, or reused by a resume of a dpkit run, or replaced
    (output.overwrite) when dpkit created it as a run; nothing else."""
    out = Path(recipe.output.dir).expanduser()
    if recipe.resume is None:
        problem = write_problem(out, "run", "output.dir", recipe.output.overwrite,
                                "set output.overwrite=true")
        return RecipeError(problem) if problem else None
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        return RecipeError.one("output.dir", f"'{out}' is not a directory dpkit can resume into",
                               "name the run directory itself")
    if out.is_dir() and any(out.iterdir()) and not is_run_dir(out):
        return RecipeError.one("output.dir", f"'{out}' is not a dpkit run directory (no {MARKER} "
                               "marker, no checkpoint); resuming would write into it",
                               "point output.dir at the run to resume, or at a new directory")
    return None


def resume_checks(recipe: Recipe, world_size: int | None = None
                  ) -> tuple[list[Problem], list[str]]:
    """Before launch: the checkpoint a resume would load exists, is complete and whole, and (on
    `world_size` ranks) its expert parallelism can change as asked; a note when it lies outside
    output.dir (checkpoints are pickles: load only your own)."""
    from dpkit import checkpoint as C

    out = Path(recipe.output.dir).expanduser()
    try:
        ckpt = C.find_resume(recipe.resume, out)
        if ckpt is not None:
            C.verify(ckpt)
            if (changed := C.settings_problem(recipe, ckpt)) is not None:
                raise changed
            if world_size is not None:
                from dpkit.layout import layout_of

                refused = C.expert_parallel_problem(ckpt, layout_of(recipe, world_size))
                if refused is not None:
                    raise refused
    except RecipeError as e:
        return e.problems, []
    note = outside_warning(ckpt, out) if ckpt is not None else None
    return [], [note] if note else []


def outside_warning(ckpt: Path, out: Path) -> str | None:
    if Path(out).resolve() in Path(ckpt).resolve().parents:
        return None
    return (f"warning: resume loads {ckpt}, outside output.dir: checkpoints are pickles, which "
            "can run code when loaded; resume only from checkpoints you made")


def prepare_output_dir(recipe: Recipe, env) -> tuple[Path, Path | None]:
    """On every rank: the run directory (created, or replaced when allowed) and the checkpoint
    to resume from, checked whole. Any refusal happens before anything is created."""
    from dpkit import checkpoint as C
    from dpkit import distributed

    out = Path(recipe.output.dir).expanduser()
    problem = output_dir_problem(recipe)  # every rank checks before any rank creates it
    done = finished(recipe)
    resume_from = None
    if problem is None and done is None:
        try:
            resume_from = C.find_resume(recipe.resume, out)
            if resume_from is not None:
                C.verify(resume_from)  # a truncated shard: one line from rank 0, not N tracebacks
                problem = C.settings_problem(recipe, resume_from)  # data order changed
        except RecipeError as e:
            problem = e
    distributed.barrier()
    if done is not None:
        raise done
    if problem is not None:
        raise problem
    if env.is_main:
        if out.exists() and recipe.output.overwrite and recipe.resume is None and \
                any(out.iterdir()):
            replace_dir(out, "run", "output.dir")
        make_dir(out, "run")
    distributed.barrier()
    return out, resume_from
