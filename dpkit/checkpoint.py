"""Checkpoints that survive crashes: complete-or-ignored, exact resume, resume elsewhere.

Layout of `<run>/checkpoints/`:

    step-00000004/            one checkpoint (DeepSpeed's per-rank files live in step-00000004/ds/)
        ds/                   engine, optimizer and ZeRO partitions, LR scheduler (DeepSpeed)
        rng-rank{r}.pt        each rank's RNG states
        objective.pt          the objective's own state, when it has one (GRPO's rollout
                              batch between its μ optimizer steps)
        dpkit.json            data position, world size, ZeRO stage, tokens seen
        hf/                   config + tokenizer, so `dpkit export` needs nothing else
        universal/            cached universal conversion (made when resuming elsewhere)
        COMPLETE              written last, by rank 0, after every rank has finished writing
    latest                    the checkpoint this run continues from: the newest complete one
                              it saved (moved only after COMPLETE), or the one it resumed from

A checkpoint without COMPLETE is never resumed from; the next save removes it. After a rewind
(`resume=<an earlier checkpoint of this run>`) the later checkpoints of the abandoned run stay on
disk until this run's saves replace them: `latest`, not the highest step, names this run's lineage
for resume=auto, export and pruning.

Security: DeepSpeed checkpoints are pickles, which can run code when loaded. dpkit loads them
only from the run's own directory or from a path the user names (`resume=PATH`, with a warning
when it lies outside output.dir); its own tensor-only files (rng-rank*.pt) are read with
`weights_only=True`. Before loading, `verify` checks every file cheaply (each torch file must be
a whole zip archive), so a truncated shard is named once, before anything is written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from dpkit import distributed
from dpkit.errors import RecipeError
from dpkit.methods import spec
from dpkit.run_files import CHECKPOINTS, LATEST, PREEMPTED, read_metrics, write_text

MARKER = "COMPLETE"
OBJECTIVE_STATE = "objective.pt"
STEP_DIR = re.compile(r"^step-(\d{8})$")


@dataclass
class TrainState:
    """What the loop needs to continue exactly where it stopped."""
    step: int                 # optimizer steps completed
    tokens_seen: int
    world_size: int
    zero_stage: int
    seed: int
    steps_per_epoch: int
    data: dict = field(default_factory=dict)  # a stream's position (in-memory rows: empty)
    settings: dict = field(default_factory=dict)  # data_settings(): what fixes the data order
    source_counts: list = field(default_factory=list)  # tokens, then rows, seen per data source
    expert_parallel: int = 1  # moe.expert_parallel: >1 is AutoEP's layout (dpkit/moe_layout.py)


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def is_complete(ckpt: Path) -> bool:
    return (ckpt / MARKER).is_file()


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and is_complete(p)]
    return sorted(found, key=lambda p: p.name)


def latest_complete(run_dir: Path) -> Path | None:
    """The checkpoint this run continues from (resume=auto, export, "last complete checkpoint"):
    the one `latest` names. The highest step is not it after a rewind, when an abandoned run's
    later checkpoints are still on disk. If `latest` is missing (a run made before it existed) or
    names a checkpoint that is gone or incomplete (removed by hand): the newest complete one at or
    before that step (same lineage), else the newest complete one."""
    found = complete_checkpoints(run_dir)
    try:
        pointer = (checkpoints_dir(run_dir) / LATEST).read_text().strip()
    except OSError:
        pointer = ""
    if STEP_DIR.match(pointer):
        lineage = [p for p in found if p.name <= pointer]
        if lineage:
            return lineage[-1]
    return found[-1] if found else None


def point_latest(run_dir: Path, ckpt: Path) -> None:
    """Rank 0, after resuming from `ckpt`: if it is one of this run's own checkpoints, `latest`
    names it, so a crash before the next save resumes (and export reads) this lineage, not the
    later checkpoints of the run that was rewound."""
    root = checkpoints_dir(run_dir)
    if Path(ckpt).resolve().parent == root.resolve() and is_complete(ckpt):
        write_text(root / LATEST, Path(ckpt).name + "\n")


def save(engine, run_dir: Path, state: TrainState, tokenizer, env, keep: int | None,
         objective_state: dict | None = None) -> Path:
    """Write a checkpoint on every rank; it counts only once COMPLETE is written (rank 0, last).
    `objective_state`: what the objective needs to continue (Objective.state_dict, gathered
    onto rank 0; tensors, numbers, strings and lists only), or None.
    With DeepSpeed's decoupled writer (output.async_save) the engine's files are still being
    written when this returns: `complete` marks the checkpoint once they are committed."""
    ckpt = checkpoints_dir(run_dir) / step_name(state.step)
    if env.is_main and ckpt.exists():  # an incomplete leftover of a crashed save
        shutil.rmtree(ckpt)
    distributed.barrier()
    engine.save_checkpoint(str(ckpt), tag="ds", save_latest=False)
    torch.save({"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
               ckpt / f"rng-rank{env.rank}.pt")
    if env.is_main:
        if objective_state is not None:
            torch.save(objective_state, ckpt / OBJECTIVE_STATE)
        (ckpt / "dpkit.json").write_text(json.dumps(asdict(state), indent=2) + "\n")
        module = engine.module
        model = module.get_base_model() if hasattr(module, "get_base_model") else module
        # named as save_pretrained names it: `dpkit export` builds the head it was trained with
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(ckpt / "hf")
        tokenizer.save_pretrained(ckpt / "hf")
    fault_point("save", state.step, env.rank)
    if not decoupled(engine):
        complete(engine, run_dir, ckpt, env, keep)
    return ckpt


def complete(engine, run_dir: Path, ckpt: Path, env, keep: int | None) -> None:
    """Every rank: wait until the engine's files of `ckpt` are on disk (the decoupled writer's
    commit; DeepSpeed also commits it in the next optimizer step, then this does not wait), then
    rank 0 writes COMPLETE, moves `latest` and prunes."""
    if decoupled(engine):
        engine._commit_decoupled_checkpoint()  # DeepSpeed's commit (no-op if step() did it)
    distributed.barrier()  # every rank has written everything
    if env.is_main:
        write_text(ckpt / MARKER, f"{read_state(ckpt).step}\n")
        write_text(checkpoints_dir(run_dir) / LATEST, ckpt.name + "\n")
        prune(run_dir, keep)
    distributed.barrier()


# ---------------------------------------------------------------- the decoupled writer (async)
def decoupled(engine) -> bool:
    ce = getattr(engine, "checkpoint_engine", None)
    return ce is not None and ce.is_decoupled()


def prepare_writer() -> None:
    """Before deepspeed.initialize with the decoupled writer (on every rank).

    DeepSpeed reads the node rank and count from CROSS_RANK / CROSS_SIZE, which only its own
    launcher sets (KeyError under torchrun): set from the launcher's own names. And the writer
    it spawns would outlive a rank killed with SIGKILL (out of memory, a scheduler), blocked
    forever on its queue: it is started through `_writer_main`, which asks the kernel to kill it
    when its rank dies."""
    from deepspeed.runtime.checkpoint_engine import decoupled_checkpoint_engine as dce

    info = distributed.launcher_info()
    os.environ.setdefault("CROSS_RANK", str(info.node_rank))
    os.environ.setdefault("CROSS_SIZE", str(info.nodes))
    if dce.init_decoupled_checkpoint is not _writer_main:
        dce.dpkit_original_writer = dce.init_decoupled_checkpoint
        dce.init_decoupled_checkpoint = _writer_main


def _writer_main(*args) -> None:
    """The decoupled writer's process (spawned: a fresh interpreter, DeepSpeed unpatched)."""
    die_with_parent()
    from deepspeed.runtime.checkpoint_engine import decoupled_checkpoint_engine as dce

    getattr(dce, "dpkit_original_writer", dce.init_decoupled_checkpoint)(*args)


def die_with_parent() -> None:
    """Linux: this process gets SIGKILL when the process (thread) that started it ends."""
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the writer may outlive a killed rank
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


def clock_commits(engine) -> list[float]:
    """The seconds each commit of the decoupled writer kept the ranks waiting for the writer
    (DeepSpeed commits inside the next optimizer step, before it updates the weights the writer
    is still reading): a list the caller reads and clears."""
    ce = engine.checkpoint_engine
    waits: list[float] = []
    commit = ce.commit

    def timed(info):
        start = time.perf_counter()
        try:
            return commit(info)
        finally:
            waits.append(time.perf_counter() - start)

    ce.commit = timed
    return waits


def stop_writer(engine) -> None:
    """At a rank's exit (atexit, registered after the engine is built): end the decoupled writer.
    multiprocessing's own exit hook would otherwise join it while it waits for work, forever.
    A save still uncommitted there was never marked COMPLETE: its writer is killed, not waited
    for (DeepSpeed's cleanup would commit it, with a barrier the other ranks may never reach)."""
    ce = getattr(engine, "checkpoint_engine", None)
    if ce is None or not ce.is_decoupled():
        return
    process = getattr(ce, "ckpt_process", None)
    if ce.get_commit_info() is not None and process is not None:
        process.kill()
        process.join(timeout=10)
        ce.commit_info = None
    ce.cleanup()


def prune(run_dir: Path, keep: int | None) -> None:
    """Remove incomplete checkpoints before the current one (`latest`) and all but the newest
    `keep` complete ones of this lineage. Checkpoints after `latest` (an abandoned run's, after a
    rewind) don't count against `keep`: else they would push out the ones this run just saved."""
    root = checkpoints_dir(run_dir)
    current = latest_complete(run_dir)
    for p in root.iterdir():
        if STEP_DIR.match(p.name) and not is_complete(p) and (current is None or
                                                              p.name < current.name):
            shutil.rmtree(p, ignore_errors=True)
    if keep:
        lineage = [p for p in complete_checkpoints(run_dir)
                   if current is None or p.name <= current.name]
        for p in lineage[:-keep]:
            shutil.rmtree(p, ignore_errors=True)


def find_resume(resume: str | None, run_dir: Path) -> Path | None:
    """The checkpoint to resume from: newest complete one for "auto", or the path given."""
    if resume is None:
        return None
    if resume == "auto":
        return latest_complete(run_dir)
    path = Path(resume)
    if path.is_dir() and not STEP_DIR.match(path.name):
        path = latest_complete(path) or path  # a run directory: its newest checkpoint
    if not path.is_dir() or not is_complete(path):
        raise RecipeError.one("resume", f"'{resume}' is not a complete dpkit checkpoint (no "
                              f"{MARKER} marker)", "use resume=auto or a checkpoints/step-* path")
    return path


def resume_after_restart(resume: str | None, run_dir: Path) -> str | None:
    """What an automatically restarted group resumes from (a restart by `dpkit train`, or by
    torchrun's agent in an elastic launch): this run's newest complete checkpoint (resume=auto,
    following `latest`). Before this run saved any, a `resume=PATH` it started from still
    applies; without one, resume=auto starts anew in the directory the failed start made."""
    if resume is not None and resume != "auto" and latest_complete(run_dir) is None:
        return resume
    return "auto"


def data_settings(recipe) -> dict:
    """The recipe keys that decide which rows each step trains on, flat (`data.sources[0].path`):
    stored in every checkpoint, so a resume with any of them changed is refused instead of
    silently training on shifted data. Not micro_batch_size: a step's rows don't depend on how
    they are split into micro-batches."""
    d, t = recipe.data, recipe.train
    method = spec(recipe)
    section = method.section or recipe.objective
    out = {"train.global_batch_size": t.global_batch_size, "train.seed": t.seed,
           "objective": recipe.objective, "data.max_seq_len": d.max_seq_len,
           "data.overflow": d.overflow, "data.packing": d.packing,
           "data.completion_only_loss": d.completion_only_loss,  # rows with no target drop out
           "data.eval_fraction": d.eval_fraction, "data.streaming": d.streaming,
           "data.mixture": d.mixture,
           "data.shuffle_buffer": d.shuffle_buffer,
           # the method's settings that change its tokenized rows, under its section's key
           **{f"{section}.{k}": v for k, v in method.options(recipe).items()}}
    for i, s in enumerate(d.sources):
        for key in ("path", "name", "split", "revision", "format", "columns", "max_rows",
                    "weight", "rows_per_epoch", "epochs"):
            out[f"data.sources[{i}].{key}"] = getattr(s, key)
    return json.loads(json.dumps(out))  # as dpkit.json gives it back (tuples as lists)


SETTINGS_BEFORE = {"data.mixture": "concat"}
"""Data-order settings added after checkpoints stored them, with the value every run had before
(a missing per-source key — weight, rows_per_epoch, epochs — reads None, its default)."""


def settings_problem(recipe, ckpt: Path) -> RecipeError | None:
    """A resume whose data-order settings differ from the checkpoint's, naming every key that
    differs. (Checkpoints from before these were stored: the ranks compare steps per epoch and
    seed.)"""
    saved = read_state(ckpt).settings
    if not saved:
        return None
    now = data_settings(recipe)
    # Keys a checkpoint may predate: read as the value that kept the order it was trained with
    saved = {**{k: v for k, v in SETTINGS_BEFORE.items() if k in now}, **saved}
    differ = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    if not differ:
        return None
    what = ", ".join(f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in differ)
    return RecipeError.one("resume", f"checkpoint {ckpt} was trained with other data-order "
                           f"settings ({what}): its remaining steps would train on shifted rows",
                           "resume with the checkpoint's values, or train anew without resume")


def damaged_files(ckpt: Path) -> list[Path]:
    """Files of a checkpoint that can't be whole: a torch file (*.pt) that is not a complete zip
    archive (torch.save writes zip archives, whose directory is at the very end: a truncated file
    has none), an empty file, or an unreadable dpkit.json. Reads only each archive's directory."""
    ckpt = Path(ckpt)
    parts = [ckpt / "ds", *ckpt.glob("rng-rank*.pt"), *ckpt.glob(OBJECTIVE_STATE)]
    if is_complete(ckpt / "universal"):  # a cached conversion is used as it is
        parts.append(ckpt / "universal")
    files = sorted(f for p in parts for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file())
    bad = []
    for f in files:
        if f.suffix in (".pt", ".pth"):
            try:
                with zipfile.ZipFile(f) as z:
                    z.infolist()
            except (zipfile.BadZipFile, OSError, EOFError):
                bad.append(f)
    try:
        read_state(ckpt)
    except (OSError, ValueError, TypeError):
        bad.append(ckpt / "dpkit.json")
    return bad


def verify(ckpt: Path) -> None:
    """Refuse, naming the first broken file, a checkpoint that would fail half way through
    loading (on every rank at once)."""
    bad = damaged_files(ckpt)
    if not bad:
        return
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    earlier = [p for p in complete_checkpoints(ckpt.parent.parent) if p.name < ckpt.name]
    fix = (f"resume from an earlier one: resume={earlier[-1]}" if earlier else
           "no earlier complete checkpoint: start a new run")
    raise RecipeError.one("resume", f"checkpoint file {bad[0]} is damaged (truncated or not a "
                          f"torch file){more}; nothing was loaded or changed", fix)


def read_state(ckpt: Path) -> TrainState:
    return TrainState(**json.loads((ckpt / "dpkit.json").read_text()))


def needs_universal(ckpt: Path, layout) -> bool:
    """Whether `layout` (dpkit/layout.py) differs from the checkpoint's world size, stage or
    expert-parallel degree."""
    saved = read_state(ckpt)
    return (saved.world_size != layout.world_size or saved.zero_stage != layout.stage
            or saved.expert_parallel != layout.expert_parallel)


def expert_parallel_problem(ckpt: Path, layout) -> RecipeError | None:
    """Which changes of expert parallelism a resume can take. An expert-parallel checkpoint
    (DeepSpeed AutoEP's layout) resumes as it was written (same degree, world and stage), or
    without expert parallelism on any world and stage: its universal conversion also gets the
    model's own names (`convert_to_universal`). Other changes are refused: into AutoEP's layout
    from the model's own nothing converts, and DeepSpeed's re-sharding of experts over another
    degree or world is not tested here."""
    saved, wanted = read_state(ckpt), layout.expert_parallel
    same = (saved.expert_parallel, saved.world_size, saved.zero_stage) == (
        wanted, layout.world_size, layout.stage)
    if same or saved.expert_parallel == 1 == wanted:
        return None
    if wanted == 1 and saved.zero_stage > 0:
        return None
    was = (f"expert parallelism {saved.expert_parallel} on {saved.world_size} ranks, ZeRO "
           f"{saved.zero_stage}")
    if wanted == 1:  # a ZeRO-0 one: DeepSpeed's universal conversion needs ZeRO's partitions
        return RecipeError.one("moe.expert_parallel", f"is 1, but checkpoint {ckpt} was trained "
                               f"with {was}: its experts convert to another layout only from "
                               "ZeRO 1-3 checkpoints (DeepSpeed's universal conversion)",
                               "resume with the checkpoint's degree, world size and stage")
    return RecipeError.one("moe.expert_parallel", f"is {wanted} on {layout.world_size} ranks, "
                           f"ZeRO {layout.stage}, but checkpoint {ckpt} was trained with {was}: "
                           "dpkit resumes an expert-parallel checkpoint only as it was written "
                           "or without expert parallelism",
                           "set moe.expert_parallel: 1, or resume with the checkpoint's "
                           "degree, world size and stage")


def convert_to_universal(ckpt: Path, env, bound_s: float) -> Path:
    """DeepSpeed's universal format (any world size / stage), made once, cached in the checkpoint.
    Rank 0 converts; the others wait up to `bound_s` (train.single_rank_work_timeout_s), not the
    collective timeout: a conversion cut short leaves no marker and would be redone, and cut
    short again, on every retry."""
    target = ckpt / "universal"
    if env.is_main and not (target / MARKER).is_file():
        from argparse import Namespace

        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        shutil.rmtree(target, ignore_errors=True)
        print(f"[dpkit] converting {ckpt} to a universal checkpoint (another world size, stage "
              "or expert-parallel degree reads it); cached for next time", flush=True)
        # Stage 1/2 checkpoints lack some state the converter wants: inject_missing_state.
        ds_to_universal(Namespace(input_folder=str(ckpt / "ds"), output_folder=str(target / "ds"),
                                  num_extract_workers=1, num_merge_workers=1,
                                  keep_temp_folder=False, strict=True, inject_missing_state=True))
        _alias_model_states(target / "ds")
        _add_stage3_optimizer_state(target / "ds" / "zero")
        if read_state(ckpt).expert_parallel > 1:  # AutoEP's names, and the model's own
            from dpkit import moe, moe_layout

            model = moe_layout.meta_model(ckpt / "hf")
            moe_layout.add_model_layout(target / "ds" / "zero", model,
                                        moe.autoep_preset(model.config))
        write_text(target / MARKER, "universal\n")
    distributed.wait_for_main("convert the checkpoint to the universal format", bound_s)
    return target


def _alias_model_states(folder: Path) -> None:
    """DeepSpeed's loader looks for `mp_rank_00_model_states.pt` under ZeRO 0-2 and
    `zero_pp_rank_0_mp_rank_00_model_states.pt` under ZeRO-3 (DeepSpeed 0.19), while the converter
    writes whichever the source stage used. The universal loader reads the parameters from
    `zero/`, so the same small file under both names lets any stage resume any other."""
    names = ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"]
    present = [n for n in names if (folder / n).is_file()]
    for name in names:
        if present and not (folder / name).exists():
            shutil.copyfile(folder / present[0], folder / name)


def _add_stage3_optimizer_state(zero_dir: Path) -> None:
    """Let ZeRO-3 resume a universal checkpoint converted from ZeRO 1/2 (DeepSpeed 0.19).

    The ZeRO-3 universal loader reads the Adam step and the group hyperparameters from
    `optimizer_state.pt["optimizer_state_dict"]`, which only the ZeRO-3 converter writes. The
    ZeRO 1/2 file has the same facts elsewhere: the step in every parameter's step.pt, the groups
    at the top level. Without "params" in the groups, as the ZeRO-3 loader expects (it would
    otherwise empty the optimizer's parameter lists).
    """
    from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT

    path = zero_dir / "optimizer_state.pt"
    if not path.is_file():
        return
    state = torch.load(path, weights_only=False)  # written by DeepSpeed's converter just now
    if OPTIMIZER_STATE_DICT in state or "param_groups" not in state:
        return
    step_file = next(zero_dir.glob("*/step.pt"), None)
    step = torch.load(step_file, weights_only=True) if step_file else torch.tensor(0.0)
    groups = [{k: v for k, v in g.items() if k != "params"} for g in state["param_groups"]]
    state[OPTIMIZER_STATE_DICT] = {"state": {0: {"step": step}}, "param_groups": groups}
    torch.save(state, path)


def repair_universal_load(optimizer, reference_groups: list[dict]) -> None:
    """Undo two slips of DeepSpeed 0.19's ZeRO-3 universal loader.

    It copies group 0's hyperparameters (weight decay included) onto every group: put each
    group's own back (no decay on norms and biases). And it gives every parameter group the same
    Adam `step` tensor object; torch's Adam increments that tensor in place once per group, so
    from the second group on the bias correction would run ahead. Each state gets its own copy.
    """
    inner = getattr(optimizer, "optimizer", optimizer)
    if len(inner.param_groups) == len(reference_groups):
        for group, ref in zip(inner.param_groups, reference_groups):
            group["weight_decay"] = ref["weight_decay"]
    for state in inner.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()


def repair_schedule(scheduler) -> None:
    """After a resume from an expert-parallel checkpoint without expert parallelism: the LR
    schedule's state has one entry per parameter group of the optimizer that saved it, where
    DeepSpeed had split each group into dense and expert parameters; this optimizer has fewer
    groups. Every group of a dpkit run follows the same schedule (train.lr), so the lists are
    cut to this optimizer's groups."""
    groups = len(scheduler.optimizer.param_groups)
    for key in ("base_lrs", "_last_lr"):
        values = getattr(scheduler, key, None)
        if isinstance(values, list) and values and len(values) != groups:
            assert len(set(values)) == 1, (key, values)  # one schedule for every group
            setattr(scheduler, key, values[:1] * groups)


def load(engine, ckpt: Path, env, universal: bool) -> TrainState:
    """Restore engine, optimizer, scheduler and (same world size) RNG; returns the train state."""
    source = ckpt / "universal" if universal else ckpt
    writer = engine.checkpoint_engine if decoupled(engine) else None
    if writer is not None:  # DeepSpeed 0.19.8's decoupled engine reads with torch.load's default
        # weights_only=True, which refuses DeepSpeed's own pickles: its plain engine reads them
        from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

        engine.checkpoint_engine = TorchCheckpointEngine()
    try:
        path, _ = engine.load_checkpoint(str(source), tag="ds", load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
    finally:
        if writer is not None:
            engine.checkpoint_engine = writer
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {source}")
    rng = ckpt / f"rng-rank{env.rank}.pt"
    if rng.is_file():
        states = torch.load(rng, weights_only=True)  # tensors and None only: no pickled code
        torch.set_rng_state(states["torch"])
        if states.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states["cuda"])
    return read_state(ckpt)


def objective_state(ckpt: Path) -> dict | None:
    """The objective's state saved with a checkpoint (read as data: weights_only), or None."""
    path = Path(ckpt) / OBJECTIVE_STATE
    return torch.load(path, weights_only=True) if path.is_file() else None


def fault_requested(what: str, step: int, rank: int) -> bool:
    # Only the first attempt: a fault that fired again after an automatic restart would loop.
    return (os.environ.get("DPKIT_FAULT", "") == f"{what}@step:{step}:{rank}"
            and distributed.restart_count() == 0)


def fault_point(where: str, step: int, rank: int) -> None:
    """Fault injection for the crash tests, in the first attempt of a run only (not after an
    automatic restart). DPKIT_FAULT=kill@step:STEP:RANK SIGKILLs that rank as it starts step
    STEP; kill@save:STEP:RANK after it wrote its files of the step-STEP checkpoint but before the
    checkpoint is marked complete; killnode@step:STEP:RANK kills that rank's whole node as it
    starts step STEP: SIGKILL to its `dpkit train` (DPKIT_SUPERVISOR_PID), torchrun and ranks,
    as when a machine goes away (RANK `*`: any rank that has the variable, for a fault given to
    one node's `dpkit train` only); term@step:STEP:RANK preempts the run as it starts step STEP:
    SIGTERM to `dpkit train` (DPKIT_SUPERVISOR_PID; to this rank when there is none) and to this
    rank, as a scheduler signals every process of a job; nan@step:STEP:RANK (see
    fault_requested) makes that rank's loss NaN. Unset in normal runs: a string compare."""
    import signal

    spec = os.environ.get("DPKIT_FAULT", "")
    if not spec or distributed.restart_count() != 0:
        return
    if spec == f"kill@{where}:{step}:{rank}":
        os.kill(os.getpid(), signal.SIGKILL)
    if spec in (f"killnode@{where}:{step}:{rank}", f"killnode@{where}:{step}:*"):
        _kill_node()
    if spec == f"term@{where}:{step}:{rank}":
        supervisor = int(os.environ.get("DPKIT_SUPERVISOR_PID", "0") or 0)
        if supervisor:
            os.kill(supervisor, signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)


def _kill_node() -> None:
    """SIGKILL every process of this node's launch: `dpkit train` first (it would report and
    stop), then torchrun's agent and the ranks under it, this one last."""
    import psutil

    root = int(os.environ.get("DPKIT_SUPERVISOR_PID", "0") or 0) or os.getppid()
    try:
        top = psutil.Process(root)
        procs = [top, *top.children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        if p.pid != os.getpid():
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
    os.kill(os.getpid(), 9)


# ------------------------------------------------------------------------------- preemption
# PREEMPTED, in the run directory: the ranks stopped on SIGTERM after writing this checkpoint (its
# path inside). `dpkit train` reads it to exit with the requeue code; the next start removes it.


def mark_preempted(run_dir: Path, ckpt: Path) -> None:
    write_text(Path(run_dir) / PREEMPTED, f"{ckpt}\n")


def preempted_checkpoint(run_dir: Path, since: float) -> Path | None:
    """The checkpoint the ranks wrote when they stopped on SIGTERM, if they did after `since`
    (a time.time()); None otherwise."""
    marker = Path(run_dir) / PREEMPTED
    try:
        if marker.stat().st_mtime >= since - 1:
            return Path(marker.read_text().strip())
    except OSError:
        pass
    return None


def last_logged_step(run_dir: Path) -> int:
    """The furthest training step metrics.jsonl records (how far an attempt got before it died;
    a lower bound when output.log_steps > 1)."""
    records, _ = read_metrics(run_dir)  # a line torn by the crash is skipped
    return max((int(r.get("step", 0)) for r in records if "loss" in r), default=0)

