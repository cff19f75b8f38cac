"""`dpkit export`: a Hugging Face model (safetensors) from any stage's checkpoint, on one process.

DeepSpeed's own consolidation does the work: `zero_to_fp32` knows how the fp32 master partitions
of ZeRO 1–3 checkpoints fit together, whatever the number of ranks that wrote them; a ZeRO-0
checkpoint holds the whole module in its model-states file. dpkit/consolidate.py writes the weights one at a time
(never the whole model in memory). Only complete checkpoints (COMPLETE marker) are read, and only
from a path the user names: DeepSpeed checkpoints are pickles.
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

from dpkit import checkpoint as C
from dpkit.consolidate import checkpoint_weights, materialize, save_model
from dpkit.errors import Problem, RecipeError
from dpkit.run_files import publish_dir, stage_dir
from dpkit.rundir import mark, replace_dir, write_problem

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint directory, or a run directory (its newest complete checkpoint)."""
    if C.is_complete(path):
        return path
    latest = C.latest_complete(path)
    if latest is None:
        raise RecipeError.one(str(path), "is neither a complete dpkit checkpoint nor a run "
                              "directory with one", "pass <run>/checkpoints/step-N or <run>")
    return latest


def consolidated_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """Full (unpartitioned) weights of a checkpoint, all in memory: fp32 master weights for
    ZeRO 1–3. (The export itself writes them one at a time: dpkit/consolidate.py.)"""
    return {k: materialize(v, torch.float32) for k, v in checkpoint_weights(ckpt).items()}


def weights_of(ckpt: Path, model) -> dict:
    """The checkpoint's weights under `model`'s names (lazy where the stage allows). An
    expert-parallel checkpoint (DeepSpeed AutoEP's layout: each rank's experts in its own files)
    goes through DeepSpeed's universal conversion, which gathers every expert (cached in the
    checkpoint, as a resume on another world size does), and is put back into the model's
    layout (dpkit/moe_layout.py)."""
    state = C.read_state(ckpt)
    if state.expert_parallel == 1:
        return checkpoint_weights(ckpt)
    if state.zero_stage == 0:
        raise RecipeError.one(str(ckpt), "is an expert-parallel ZeRO-0 checkpoint: DeepSpeed's "
                              "universal conversion, which gathers the experts from the ranks' "
                              "files, needs ZeRO's partitioned optimizer states (stages 1-3)",
                              "use the run's final model (output.save_model: true), or train "
                              "with zero.stage 1-3")
    from types import SimpleNamespace

    from dpkit import moe, moe_layout

    universal = C.convert_to_universal(ckpt, SimpleNamespace(is_main=True), bound_s=0)
    return moe_layout.universal_weights(universal / "ds" / "zero", model,
                                        moe.autoep_preset(model.config))


def export(path: Path, out: Path, dtype: str = "float32", max_shard_size: str = "5GB",
           overwrite: bool = False) -> Path:
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from dpkit import heads

    ckpt = resolve_checkpoint(Path(path))
    out = Path(out).expanduser()
    check_out(out, overwrite)
    config = AutoConfig.from_pretrained(ckpt / "hf")
    with torch.device("meta"):
        model = heads.auto_class(heads.of_config(config)).from_config(config)
    model.generation_config = GenerationConfig.from_model_config(config)
    with staging(out) as tmp:  # the weights one at a time, never the whole model in memory
        save_model(model, weights_of(ckpt, model), tmp, DTYPES[dtype], max_shard_size)
        AutoTokenizer.from_pretrained(ckpt / "hf").save_pretrained(tmp)
    return out


def check_out(out: Path, overwrite: bool) -> None:
    """--out may be new or empty; replaced (--overwrite) only if dpkit exported into it before."""
    problem = write_problem(out, "export", "--out", overwrite, "pass --overwrite")
    if problem is None and out.is_symlink():  # the export is renamed into place: not a link
        problem = Problem("--out", f"'{out}' is a symbolic link", "name the directory itself")
    if problem is not None:
        raise RecipeError(problem)


@contextmanager
def staging(out: Path):
    """A fresh directory beside `out` (a name no one else has: nothing of theirs is removed),
    marked as an export and renamed to `out` once everything is written; removed on failure."""
    tmp = stage_dir(out, unique=f".{out.name}.partial-")
    try:
        yield tmp
        mark(tmp, "export")
        publish_dir(tmp, out, replace=_replace_export)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _replace_export(out: Path) -> None:
    if any(out.iterdir()):
        replace_dir(out, "export", "--out")  # the rule again, right before deleting
    else:
        out.rmdir()

