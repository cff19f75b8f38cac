"""Checkpoint bookkeeping on directories built on disk as dpkit writes them (no ranks): which
checkpoint resume=auto and export pick after a rewind, pruning, the refusal of a resume whose
data order would shift, and stale JIT-build locks that would hang a launch.

The expectations are written out by hand (which step, which key), not read back from dpkit."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_recipe, write_recipe

from dpkit import checkpoint as C
from dpkit.cli import main
from dpkit.errors import RecipeError
from dpkit.export import resolve_checkpoint
from dpkit.recipe import recipe_from_dict
from dpkit.rundir import mark, prepare_output_dir


def checkpoint(run: Path, step: int, settings: dict | None = None) -> Path:
    """A complete checkpoint with the files dpkit's checks read (torch.save like DeepSpeed's)."""
    ckpt = run / "checkpoints" / f"step-{step:08d}"
    (ckpt / "ds").mkdir(parents=True)
    torch.save({"module": {"w": torch.ones(2)}}, ckpt / "ds" / "mp_rank_00_model_states.pt")
    torch.save({"torch": torch.get_rng_state(), "cuda": None}, ckpt / "rng-rank0.pt")
    (ckpt / "dpkit.json").write_text(json.dumps(
        {"step": step, "tokens_seen": 1, "world_size": 1, "zero_stage": 2, "seed": 42,
         "steps_per_epoch": 4, "data": {}, **({"settings": settings} if settings else {})}))
    (ckpt / "COMPLETE").write_text(f"{step}\n")
    return ckpt


def point(run: Path, name: str) -> None:
    (run / "checkpoints" / "latest").write_text(name + "\n")


@pytest.fixture
def rewound(tmp_path) -> Path:
    """A run that saved steps 4 and 8, then was rewound to step 4: `latest` names step 4."""
    run = tmp_path / "run"
    run.mkdir()
    mark(run, "run")
    checkpoint(run, 4)
    checkpoint(run, 8)
    point(run, "step-00000004")
    return run


# ------------------------------------------------------------------------- lineage (latest)
def test_resume_auto_and_export_follow_latest_after_a_rewind(rewound):
    step4 = rewound / "checkpoints" / "step-00000004"
    assert C.find_resume("auto", rewound) == step4
    assert C.find_resume(str(rewound), rewound) == step4  # resume=<run directory>
    assert resolve_checkpoint(rewound) == step4  # dpkit export RUN


def test_latest_missing_or_naming_a_removed_checkpoint_falls_back(rewound):
    ckpts = rewound / "checkpoints"
    point(rewound, "step-00000006")  # removed by hand: the same lineage's earlier one
    assert C.latest_complete(rewound) == ckpts / "step-00000004"
    point(rewound, "step-00000002")  # nothing at or before it: the newest complete one
    assert C.latest_complete(rewound) == ckpts / "step-00000008"
    (ckpts / "latest").unlink()  # a run made before `latest` existed: the newest
    assert C.latest_complete(rewound) == ckpts / "step-00000008"


def test_resuming_from_an_earlier_checkpoint_moves_latest_to_it(tmp_path, rewound):
    ckpts = rewound / "checkpoints"
    point(rewound, "step-00000008")  # before the rewind
    C.point_latest(rewound, ckpts / "step-00000004")
    assert (ckpts / "latest").read_text().strip() == "step-00000004"
    C.point_latest(rewound, checkpoint(tmp_path / "other", 2))  # another run's: not this lineage
    assert (ckpts / "latest").read_text().strip() == "step-00000004"


def test_prune_keeps_the_checkpoint_just_saved_after_a_rewind(rewound):
    checkpoint(rewound, 6)  # the rewound run saved step 6 and moved latest to it
    point(rewound, "step-00000006")
    C.prune(rewound, keep=1)
    left = sorted(p.name for p in (rewound / "checkpoints").iterdir())
    assert left == ["latest", "step-00000006", "step-00000008"]  # 8: replaced when reached


# ---------------------------------------------------------------- data order on resume
def resumable(tmp_path) -> tuple[Path, dict]:
    """A run directory whose step-4 checkpoint recorded the recipe's data-order settings."""
    run = tmp_path / "run"
    run.mkdir()
    mark(run, "run")
    raw = {**tiny_recipe(run), "resume": "auto"}
    checkpoint(run, 4, settings=C.data_settings(recipe_from_dict(raw)))
    return run, raw


def test_resume_with_another_global_batch_is_refused_before_ranks_start(tmp_path, capsys):
    run, raw = resumable(tmp_path)
    path = write_recipe(tmp_path / "r.yaml", raw)
    assert main(["train", str(path), "--dry-run", "train.global_batch_size=16"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: resume:") and "train.global_batch_size 8 -> 16" in err, err
    assert "train.lr" not in err
    assert main(["train", str(path), "--dry-run", "train.lr=1e-4"]) == 0  # not data order


def test_ranks_refuse_a_changed_data_source_too(tmp_path):
    """The same check on every rank (prepare_output_dir), for launches that skip the CLI."""
    run, raw = resumable(tmp_path)
    raw["data"]["sources"][0]["max_rows"] = 10
    raw["data"]["packing"] = True
    env = SimpleNamespace(is_main=True, rank=0, world_size=1)
    with pytest.raises(RecipeError) as e:
        prepare_output_dir(recipe_from_dict(raw), env)
    text = str(e.value)
    assert "data.sources[0].max_rows None -> 10" in text and "data.packing False -> True" in text


def test_a_checkpoint_from_before_mixtures_resumes_and_a_new_weight_is_refused(tmp_path):
    """A checkpoint whose settings predate data.mixture and the per-source weights trained with
    concat: resuming it with concat is fine; drawing the sources by weight is another order."""
    run, raw = resumable(tmp_path)
    ckpt = run / "checkpoints" / "step-00000004"
    state = json.loads((ckpt / "dpkit.json").read_text())
    state["settings"] = {k: v for k, v in state["settings"].items()
                         if k != "data.mixture" and not k.endswith(
                             (".weight", ".rows_per_epoch", ".epochs"))}
    (ckpt / "dpkit.json").write_text(json.dumps(state))
    assert C.settings_problem(recipe_from_dict(raw), ckpt) is None
    raw["data"]["mixture"] = "all_exhausted"
    raw["data"]["sources"][0]["weight"] = 2
    problem = str(C.settings_problem(recipe_from_dict(raw), ckpt))
    assert "data.mixture 'concat' -> 'all_exhausted'" in problem
    assert "data.sources[0].weight None -> 2.0" in problem


def test_micro_batch_size_does_not_change_the_data_order(tmp_path):
    _, raw = resumable(tmp_path)
    raw["train"]["micro_batch_size"] = 4
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000004"
    assert C.settings_problem(recipe_from_dict(raw), ckpt) is None


# ------------------------------------------------------------------ stale JIT op build locks
def test_a_stale_op_build_lock_is_named_by_doctor_and_validate(tmp_path, monkeypatch, capsys):
    from dpkit.distributed import free_port
    from dpkit.doctor import run_checks

    root = tmp_path / "extensions"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(root))
    stale, fresh, building = (root / op / "lock" for op in ("cpu_adam", "fused_adam", "shm"))
    for lock in (stale, fresh, building):
        lock.parent.mkdir(parents=True)
        lock.touch()
    old = time.time() - 20 * 60  # a build killed 20 minutes ago
    os.utime(stale, (old, old))
    os.utime(building, (old, old))
    # A long build still running in its folder (ninja and the compilers work there): not stale.
    builder = subprocess.Popen(["sleep", "60"], cwd=building.parent)
    try:
        lines: list[str] = []
        assert run_checks(None, free_port(), "gloo", 60, allreduce_check=False,
                          out=lines.append) == 1
        named = [line for line in lines if "lock" in line and "FAIL" in line]
        assert len(named) == 1 and str(stale) in named[0] and f"rm {stale}" in named[0], lines
        recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path / "run"))
        assert main(["validate", str(recipe)]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"error: {named[0].split('FAIL', 1)[1].strip()}", err  # the same one line
    finally:
        builder.kill()
        builder.wait()


def _state(pid: int) -> str:
    """A process's state letter ('' once it is gone; 'Z' a zombie: dead, not yet reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


@pytest.mark.parametrize("dies", [True, False])
def test_background_writer_dies_with_its_rank(dies):
    """output.async_save's writer process (started through checkpoint._writer_main, which calls
    die_with_parent) ends when its rank is SIGKILLed (out of memory, a scheduler) instead of
    waiting on its queue forever. Without die_with_parent the child outlives its parent: the
    check can fail."""
    import signal
    import sys

    child = ("import time; from dpkit.checkpoint import die_with_parent; "
             f"{'die_with_parent(); ' if dies else ''}print('ready', flush=True); time.sleep(60)")
    parent = ("import subprocess, sys, time; "
              f"p = subprocess.Popen([sys.executable, '-c', {child!r}]); "
              "print(p.pid, flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    pid = int(proc.stdout.readline())
    try:
        assert proc.stdout.readline().strip() == "ready"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + (10 if dies else 1)  # the control: it stays alive
        while _state(pid) not in ("", "Z", "X") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (_state(pid) in ("", "Z", "X")) == dies
    finally:
        if _state(pid) not in ("", "Z", "X"):
            os.kill(pid, signal.SIGKILL)


def test_async_save_starts_deepspeeds_writer_through_dpkit(monkeypatch):
    """prepare_writer: the names DeepSpeed's decoupled engine reads (only its own launcher sets
    them), and its writer process entered through _writer_main (which dies with its rank)."""
    from deepspeed.runtime.checkpoint_engine import decoupled_checkpoint_engine as dce

    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items()
                                        if k not in ("CROSS_RANK", "CROSS_SIZE")})
    monkeypatch.setattr(dce, "init_decoupled_checkpoint", dce.init_decoupled_checkpoint)
    monkeypatch.setattr(dce, "dpkit_original_writer", None, raising=False)
    original = dce.init_decoupled_checkpoint
    C.prepare_writer()
    C.prepare_writer()  # twice: still DeepSpeed's own function underneath
    assert os.environ["CROSS_RANK"] == "0" and os.environ["CROSS_SIZE"] == "1"
    assert dce.init_decoupled_checkpoint is C._writer_main
    assert dce.dpkit_original_writer is original
