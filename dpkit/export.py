"""`dpkit export`: a Hugging Face model (safetensors) from any stage's checkpoint, on one process.

DeepSpeed's own consolidation does the work: `zero_to_fp32` merges the fp32 master partitions
of ZeRO 1–3 checkpoints, whatever the number of ranks that wrote them; a ZeRO-0 checkpoint holds
the whole module in its model-states file. Only complete checkpoints (COMPLETE marker) are read,
and only from a path the user names: DeepSpeed checkpoints are pickles.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from dpkit import checkpoint as C
from dpkit.errors import RecipeError

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
        # Our own run's file, written by DeepSpeed; it is a pickle, hence weights_only=False.
        states = torch.load(ds_dir / "mp_rank_00_model_states.pt", map_location="cpu",
                            weights_only=False)
        return {k: v.float() for k, v in states["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="ds")


def export(path: Path, out: Path, dtype: str = "float32", max_shard_size: str = "5GB",
           overwrite: bool = False) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    ckpt = resolve_checkpoint(Path(path))
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise RecipeError.one("--out", f"'{out}' exists and is not empty",
                              "choose another directory or pass --overwrite")
    config = AutoConfig.from_pretrained(ckpt / "hf")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
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
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size=max_shard_size)
    AutoTokenizer.from_pretrained(ckpt / "hf").save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


