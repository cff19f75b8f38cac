"""A checkpoint's full weights written as Hugging Face safetensors one tensor at a time.

`dpkit export` used to merge every ZeRO partition into one in-memory state dict and hand it to
`save_pretrained`: peak CPU memory was the whole model in fp32 (more with a cast). Here each
tensor is gathered from the partitions, cast, written into its shard file and dropped before the
next one, so the peak is about the largest tensor (the embedding), whatever the model or shard
size. The partition math stays DeepSpeed's: its lazy `zero_to_fp32` (`lazy_mode=True`) maps
the ranks' fp32 flat groups from disk (mmap: file-backed pages the kernel can drop) and gathers
one parameter on `.contiguous()`.

What save_pretrained decides is taken from transformers itself, on the model built on the meta
device (no weights): which names are written (tied weights removed), the shard plan
(huggingface_hub's split, same order and sizes, so the same files and index), config.json's
`dtype` and `architectures`. Only the file writing is dpkit's, because safetensors writes a file
from tensors that are all in memory: `write_safetensors` writes its header (the safetensors
format: 8-byte length, JSON, data) and then the tensors' bytes one by one. A model whose classes
rename or merge weights on save (transformers' conversion mapping, e.g. Mixtral's experts)
is converted by transformers on the whole state dict, in memory, as before.

ZeRO-3 and ZeRO-0 (one memory-mapped file) stream; ZeRO 1/2 go through DeepSpeed's merge, which
concatenates each parameter group's partitions in memory (about the model's size).
"""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path
from typing import Any

import torch

from dpkit.errors import RecipeError

SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
                      torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32",
                      torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def checkpoint_weights(ckpt: Path) -> dict[str, Any]:
    """Name → full weight of a dpkit checkpoint, not yet in memory where the stage allows:
    a tensor, or DeepSpeed's lazy tensor (`.shape`, `.dtype`, `.contiguous()` gathers it).
    Names sharing one weight (tied embeddings) map to the same object."""
    from dpkit.checkpoint import read_state

    stage = read_state(ckpt).zero_stage
    ds_dir = Path(ckpt) / "ds"
    if stage == 0:
        # DeepSpeed's ZeRO-0 file holds tensors, numbers, strings and dicts: weights_only=True
        # reads it without running any pickled code (ZeRO 1-3 go through DeepSpeed's loader).
        # mmap: the tensors stay in the file until each is written.
        path = ds_dir / "mp_rank_00_model_states.pt"
        try:
            states = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as e:
            first = (str(e).strip().splitlines() or ["?"])[0]
            raise RecipeError.one(str(path), f"holds more than tensors ({first}); dpkit does not "
                                  "unpickle it", "export only checkpoints you made") from None
        return dict(states["module"])
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # ZeRO-3: lazy. ZeRO 1/2: DeepSpeed builds the tensors whatever lazy_mode says.
    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="ds", lazy_mode=True)


def materialize(weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """One weight in memory; floating point ones as fp32 (the master weights), then `dtype`:
    the same two casts the in-memory export made (fp32 state dict, then model.to(dtype))."""
    tensor = weight.contiguous()
    if tensor.is_floating_point():
        tensor = tensor.float()
        if dtype is not None:
            tensor = tensor.to(dtype)
    return tensor


def save_model(model, weights: dict[str, Any], out: Path, dtype: torch.dtype,
               max_shard_size: int | str) -> None:
    """Write `weights` (checkpoint_weights) as `model` would save them: config.json,
    generation_config.json, model.safetensors or shards + model.safetensors.index.json.
    `model`: its class built from the checkpoint's config on the meta device."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    shapes = {k: v for k, v in model.state_dict().items()
              if k not in (model._keys_to_ignore_on_save or [])}
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in shapes if k not in weights and k not in tied]
    unexpected = [k for k in weights if k not in shapes]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint does not match its config: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    names = list(remove_tied_weights_from_state_dict(dict(shapes), model))
    meta = {k: torch.empty(shapes[k].shape, device="meta",
                           dtype=dtype if shapes[k].is_floating_point() else shapes[k].dtype)
            for k in names}
    reverted = revert_weight_conversion(model, dict(meta))
    if list(reverted) == names and all(reverted[k] is meta[k] for k in names):
        sources = {k: (lambda k=k: materialize(weights[k], dtype)) for k in names}
        plan = meta
    else:  # names change on save: transformers converts the whole state dict, in memory
        plan = revert_weight_conversion(model, {k: materialize(weights[k], dtype)
                                                for k in names})
        meta = {k: torch.empty(v.shape, device="meta", dtype=v.dtype) for k, v in plan.items()}
        sources = {k: (lambda k=k: plan[k]) for k in meta}

    model.config.dtype = str(dtype).split(".")[1]  # as save_pretrained records them
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(out)
    if model.can_generate():
        model.generation_config.save_pretrained(out)

    # the plan of real tensors keeps views of one storage (split experts) in one shard, as
    # save_pretrained does
    split = split_torch_state_dict_into_shards(plan, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    for filename, tensor_names in split.filename_to_tensors.items():
        write_safetensors(Path(out) / filename, {k: meta[k] for k in tensor_names},
                          {k: sources[k] for k in tensor_names}, {"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_parameters": model.num_parameters(), **split.metadata},
                 "weight_map": split.tensor_to_filename}
        (Path(out) / "model.safetensors.index.json").write_text(
            json.dumps(index, indent=2, sort_keys=True) + "\n")


def write_safetensors(path: Path, layout: dict[str, torch.Tensor], sources: dict[str, Any],
                      metadata: dict[str, str]) -> None:
    """A safetensors file from tensors made one at a time: `layout` gives each name's shape and
    dtype (meta tensors), `sources[name]()` the tensor, called when its bytes are due.

    The format (github.com/huggingface/safetensors): an 8-byte little-endian header length, a
    JSON header ({name: {dtype, shape, data_offsets}}, "__metadata__"), padded with spaces to a
    multiple of 8, then the data. Tensors are laid out as the safetensors library orders them
    (larger element sizes first, then by name), which keeps each one aligned to its type.
    """
    order = sorted(layout, key=lambda k: (-layout[k].element_size(), k))
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name in order:
        t = layout[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in order:
            tensor = sources[name]()
            want = layout[name]
            if tensor.shape != want.shape or tensor.dtype != want.dtype:
                raise RuntimeError(f"{name}: got {tuple(tensor.shape)} {tensor.dtype}, the "
                                   f"header says {tuple(want.shape)} {want.dtype}")
            f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
            del tensor  # before the next one is gathered
