"""`dpkit export`: a Hugging Face model (safetensors) from any stage's checkpoint, on one process.

DeepSpeed's own consolidation does the work: `zero_to_fp32` merges the fp32 master partitions
of ZeRO 1–3 checkpoints, whatever the number of ranks that wrote them; a ZeRO-0 checkpoint holds
the whole module in its model-states file. Only complete checkpoints (COMPLETE marker) are read,
and only from a path the user names: DeepSpeed checkpoints are pickles.
"""

from __future__ import annotations

import pickle
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

from dpkit import checkpoint as C
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
    """Full (unpartitioned) weights of a checkpoint: fp32 master weights for ZeRO 1–3."""
    stage = C.read_state(ckpt).zero_stage
    ds_dir = ckpt / "ds"
    if stage == 0:
        # DeepSpeed's ZeRO-0 file holds tensors, numbers, strings and dicts: weights_only=True
        # reads it without running any pickled code (ZeRO 1-3 go through DeepSpeed's loader).
        path = ds_dir / "mp_rank_00_model_states.pt"
        try:
            states = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            first = (str(e).strip().splitlines() or ["?"])[0]
            raise RecipeError.one(str(path), f"holds more than tensors ({first}); dpkit does not "
                                  "unpickle it", "export only checkpoints you made") from None
        return {k: v.float() for k, v in states["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="ds")


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
    state = consolidated_state_dict(ckpt)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {ckpt} does not match its config: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model = model.to(DTYPES[dtype])
    model.generation_config = GenerationConfig.from_model_config(config)
    with staging(out) as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
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

