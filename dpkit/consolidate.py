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

Every stage streams: ZeRO-3 through DeepSpeed's lazy tensors, ZeRO 1/2 through zero2_weights
(DeepSpeed's merge would concatenate each parameter group's partitions in memory, the model's
size), ZeRO-0 from its one memory-mapped file. The final save of a run (dpkit/engine.py) writes
the live model the same way: live_weights gathers one ZeRO-3 parameter at a time.
"""

from __future__ import annotations

import functools
import json
import pickle
import struct
from contextlib import contextmanager
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
    if stage in (1, 2):
        return zero2_weights(ds_dir)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="ds", lazy_mode=True)


class Zero2Tensor:
    """One parameter of a ZeRO 1/2 checkpoint: a span of its group's fp32 vector, which the ranks'
    partitions (memory-mapped) hold one after another; `.contiguous()` copies it out."""

    def __init__(self, partitions: list[torch.Tensor], offset: int, shape: torch.Size):
        self.partitions, self.offset, self.shape = partitions, offset, torch.Size(shape)
        self.dtype = partitions[0].dtype

    def contiguous(self) -> torch.Tensor:
        end, start, pieces = self.offset + self.shape.numel(), 0, []
        for part in self.partitions:
            lo, hi = max(self.offset, start), min(end, start + part.numel())
            if lo < hi:
                pieces.append(part[lo - start:hi - start])
            start += part.numel()
        return torch.cat(pieces).view(self.shape)


def zero2_weights(ds_dir: Path) -> dict[str, Any]:
    """checkpoint_weights of a ZeRO 1/2 checkpoint, one parameter read at a time.

    DeepSpeed's zero_to_fp32 concatenates each group's partitions into one vector (the whole
    model in fp32) and returns views of it; its lazy mode is ZeRO-3's only. Here its own
    reconstruction (alignment paddings, frozen and shared parameters, its sanity check) runs on
    meta tensors the partitions' sizes: each parameter comes back as a meta view whose storage
    offset is where it starts in its group's vector, and the bytes stay in the memory-mapped
    optimizer files until Zero2Tensor copies them out."""
    from deepspeed.utils import zero_to_fp32 as z

    with mapped_loads():  # under ZeRO 1/2 the model-states file holds the whole module
        states = z.parse_model_states(z.get_model_state_files(str(ds_dir)))
    _, world, flat, paddings = z.parse_optim_states(z.get_optim_files(str(ds_dir)), str(ds_dir))
    meta = [[torch.empty(g.shape, dtype=g.dtype, device="meta") for g in rank] for rank in flat]
    plan = z._get_fp32_state_dict_from_zero2_checkpoint(world, meta, states, False, paddings)
    group = {name: i for i, shapes in enumerate(states[0].param_shapes) for name in shapes}
    lazy: dict[int, Zero2Tensor] = {}
    weights: dict[str, Any] = {}
    for name, view in plan.items():
        if view.device.type != "meta":  # buffers, frozen parameters: tensors already
            weights[name] = view
        else:  # a shared name comes after its owner, as the same view
            weights[name] = lazy.setdefault(id(view), Zero2Tensor(
                [rank[group[name]] for rank in flat], view.storage_offset(), view.shape))
    return weights


@contextmanager
def mapped_loads():
    """torch.load memory-maps what it reads (DeepSpeed's parse_model_states reads the file whole):
    its tensors stay file-backed pages until copied, as parse_optim_states already reads."""
    load = torch.load
    torch.load = functools.partial(load, mmap=True)
    try:
        yield
    finally:
        torch.load = load


class Gathered:
    """One ZeRO-3 parameter of a live model, whole only while its bytes are written: `.contiguous()`
    gathers it from every rank's partition (a collective: each rank reads the same parameters in
    the same order, save_model's `write=False` on the others), keeps a CPU copy where `keep`
    (the writer) and lets the gathered tensor go. The face of DeepSpeed's lazy checkpoint tensor
    (`.shape`, `.dtype`, `.contiguous()`)."""

    def __init__(self, param, keep: bool):
        self.param, self.keep = param, keep
        self.shape, self.dtype = param.ds_shape, param.dtype

    def contiguous(self) -> torch.Tensor:
        import deepspeed

        with deepspeed.zero.GatheredParameters([self.param], modifier_rank=None):
            if self.keep:
                return self.param.detach().to("cpu", copy=True).contiguous()
        return torch.empty(0, dtype=self.dtype)  # not the writer: nothing kept


def live_weights(module, keep: bool) -> dict[str, Any]:
    """Name → weight of a live (training) model for save_model: its own tensors where the rank
    holds them whole (ZeRO 0-2, buffers, ...), a Gathered where ZeRO-3 partitions them. Names
    sharing one parameter (tied embeddings) map to one object. The step that collects the
    weights: a model whose weights live elsewhere (experts split over ranks) brings its own."""
    gathered: dict[int, Gathered] = {}
    weights: dict[str, Any] = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        if hasattr(tensor, "ds_id"):
            weights[name] = gathered.setdefault(id(tensor), Gathered(tensor, keep))
        else:
            weights[name] = tensor.detach()
    return weights


def materialize(weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """One weight in memory, on the CPU. With `dtype` (an export), floating point ones as fp32
    (the master weights), then `dtype`: the same two casts the in-memory export made (fp32 state
    dict, then model.to(dtype)). Without (the final save), as the live model holds it."""
    tensor = weight.contiguous().to("cpu")
    if tensor.is_floating_point() and dtype is not None:
        tensor = tensor.float().to(dtype)
    return tensor


def full_layout(model) -> dict[str, torch.Tensor]:
    """Name → meta tensor of each entry of `model`'s state dict, with its whole shape: a ZeRO-3
    parameter's own tensor is its partition (or empty); `ds_shape` is the model's."""
    return {k: torch.empty(getattr(v, "ds_shape", v.shape), dtype=v.dtype, device="meta")
            for k, v in model.state_dict(keep_vars=True).items()
            if k not in (model._keys_to_ignore_on_save or [])}


def save_model(model, weights: dict[str, Any], out: Path | None, dtype: torch.dtype | None,
               max_shard_size: int | str, write: bool = True) -> None:
    """Write `weights` (checkpoint_weights, or a live model's: live_weights) as `model` would
    save them: config.json, generation_config.json, model.safetensors or shards +
    model.safetensors.index.json. `model`: its class built from the checkpoint's config on the
    meta device, or the live model itself. `dtype`: cast every floating point weight to it, or
    None: each as it is (save_pretrained's way with a live model).

    `write=False`: read the same weights in the same order as the writer, and write nothing —
    the other ranks of a save whose weights are gathered collectively (every rank must take part
    in each gather, in the same order)."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    shapes = full_layout(model)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in shapes if k not in weights and k not in tied]
    unexpected = [k for k in weights if k not in shapes]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint does not match its config: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    names = list(remove_tied_weights_from_state_dict(dict(shapes), model))
    meta = {k: torch.empty(shapes[k].shape, device="meta",
                           dtype=dtype if dtype is not None and shapes[k].is_floating_point()
                           else shapes[k].dtype)
            for k in names}
    reverted = revert_weight_conversion(model, dict(meta))
    if reverted.keys() == meta.keys() and all(reverted[k] is meta[k] for k in names):
        sources = {k: (lambda k=k: materialize(weights[k], dtype)) for k in names}
        plan = reverted  # its order (sorted, for a model from_pretrained loaded) sets the shards
    else:  # names change on save: transformers converts the whole state dict, in memory
        whole = {k: materialize(weights[k], dtype) for k in names}
        if not write:
            return
        plan = revert_weight_conversion(model, whole)
        meta = {k: torch.empty(v.shape, device="meta", dtype=v.dtype) for k, v in plan.items()}
        sources = {k: (lambda k=k: plan[k]) for k in meta}

    # the plan of real tensors keeps views of one storage (split experts) in one shard, as
    # save_pretrained does
    split = split_torch_state_dict_into_shards(plan, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    if not write:  # the writer's order, file by file: each read is this rank's part of a gather
        for tensor_names in split.filename_to_tensors.values():
            for name in write_order({k: meta[k] for k in tensor_names}):
                sources[name]()
        return
    if model.is_remote_code():  # its modeling files beside the weights, as save_pretrained
        from transformers.dynamic_module_utils import custom_object_save

        custom_object_save(model, out, config=model.config)
    model.config.dtype = str(dtype or model.dtype).split(".")[1]  # as save_pretrained records
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(out)
    if model.can_generate():
        model.generation_config.save_pretrained(out)
    for filename, tensor_names in split.filename_to_tensors.items():
        write_safetensors(Path(out) / filename, {k: meta[k] for k in tensor_names},
                          {k: sources[k] for k in tensor_names}, {"format": "pt"})
    if split.is_sharded:
        total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        index = {"metadata": {"total_parameters": total, **split.metadata},
                 "weight_map": split.tensor_to_filename}
        (Path(out) / "model.safetensors.index.json").write_text(
            json.dumps(index, indent=2, sort_keys=True) + "\n")


def write_order(layout: dict[str, torch.Tensor]) -> list[str]:
    """The order the safetensors library lays tensors out in a file (larger element sizes
    first, then by name), which keeps each one aligned to its type."""
    return sorted(layout, key=lambda k: (-layout[k].element_size(), k))


def write_safetensors(path: Path, layout: dict[str, torch.Tensor], sources: dict[str, Any],
                      metadata: dict[str, str]) -> None:
    """A safetensors file from tensors made one at a time: `layout` gives each name's shape and
    dtype (meta tensors), `sources[name]()` the tensor, called when its bytes are due.

    The format (github.com/huggingface/safetensors): an 8-byte little-endian header length, a
    JSON header ({name: {dtype, shape, data_offsets}}, "__metadata__"), padded with spaces to a
    multiple of 8, then the data. Tensors are laid out as the safetensors library orders them
    (write_order).
    """
    order = write_order(layout)
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
