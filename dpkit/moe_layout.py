"""An expert-parallel run's weights back in the model's own (transformers) layout.

DeepSpeed's AutoEP (`moe.expert_parallel`, docs/moe.md) replaces each MoE block of a
transformers model by its own layer: the router becomes `router.gate`, each rank keeps its slice
of the experts as three grouped tensors — `experts.w1` (gate) and `experts.w3` (up),
[experts, ffn, hidden], `experts.w2` (down), [experts, hidden, ffn] — and shared experts move to
`shared_experts`. DeepSpeed converts the model's layout into its own
(deepspeed/moe/ep_repack.py); its checkpoints stay in its own (per-expert files, or the universal
format's whole [experts, ...] tensors) and nothing converts back. This module is that inverse,
for the three places an expert-parallel run's weights leave AutoEP's layout:

- the final save (`gather_model_state`): each rank's experts gathered, one MoE layer at a time;
- `dpkit export` (`universal_weights`): the universal checkpoint's whole tensors, renamed;
- resuming without expert parallelism (`add_model_layout`): the universal checkpoint also gets
  the model's own names, for the weights and for Adam's two moments (elementwise states: the
  same rearrangement applies).

`plan(model)` says, for every weight of the model (built on the meta device), which AutoEP
tensors it is made of and how. AutoEP's own detection (`AutoEP.ep_parser`) finds the MoE layers
and their spec (router, experts, storage, names), so every AutoEP preset is covered as DeepSpeed
reads it. tests/unit/test_moe_layout.py checks the inverse against DeepSpeed's own repacking.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROUTER = "router.gate"
EXPERTS = ("w1", "w2", "w3")  # gate, down, up: AutoEP's grouped experts (GroupedExperts)


@dataclass
class Group:
    """Weights of the model made from the same AutoEP tensors (`inputs`, whole: every expert).
    `outputs`: model weight name → function of {input name: tensor}."""
    inputs: list[str]
    outputs: dict[str, Callable[[dict], torch.Tensor]] = field(default_factory=dict)


def layer_specs(model, preset: str):
    """AutoEP's MoE layer specs for a transformers model (meta device is enough), found as
    `deepspeed.initialize` finds them."""
    from deepspeed.module_inject.auto_ep import AutoEP
    from deepspeed.module_inject.auto_ep_presets.base import AutoEPConfig

    from dpkit.moe import allow_autoep_with_transformers

    allow_autoep_with_transformers()  # AutoEP reads transformers' output-recorder registry
    return AutoEP(model, AutoEPConfig(enabled=True, autoep_size=1, preset_model=preset)).ep_parser()


def plan(model, preset: str) -> list[Group]:
    """Every weight of `model` (its state dict's names), grouped by the AutoEP tensors it comes
    from: one group per MoE layer's experts, one per other weight. Raises on a weight of a MoE
    layer that AutoEP has no counterpart for (it would be lost)."""
    names = list(model.state_dict())
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    groups, done = [], set()
    for spec in layer_specs(model, preset):
        prefix = spec.moe_module_name + "."
        inside = [n for n in names if n.startswith(prefix)]
        experts = Group([f"{prefix}experts.{w}" for w in EXPERTS])
        for name in inside:
            rel = name[len(prefix):]
            source = _renamed(rel, spec)
            if source is not None:
                groups.append(Group([prefix + source], {name: _only(prefix + source)}))
            elif rel.startswith(spec.experts_name + "."):
                experts.outputs[name] = _expert_weight(rel[len(spec.experts_name) + 1:], spec,
                                                       prefix, shapes, name)
            else:
                raise RuntimeError(f"{name}: no counterpart in DeepSpeed AutoEP's "
                                   f"{spec.model_family} layer; it would not be saved")
            done.add(name)
        groups.append(experts)
    groups += [Group([n], {n: _only(n)}) for n in names if n not in done]
    return groups


def _only(name: str):
    return lambda tensors: tensors[name]


def _renamed(rel: str, spec) -> str | None:
    """AutoEP's name (relative to the layer) of a router or shared-expert weight, else None."""
    router = spec.router_name + "."
    if rel.startswith(router) and rel[len(router):] in ("weight", "bias"):
        return f"{ROUTER}.{rel[len(router):]}"
    path = spec.e_score_correction_bias_path
    if path is not None and rel == (f"{path}." if path else "") + "e_score_correction_bias":
        return "router.e_score_correction_bias"
    for own, theirs in ((spec.shared_experts_gate_name, "shared_experts_gate"),
                        (spec.shared_experts_name if spec.has_shared_experts else "",
                         "shared_experts")):
        if own and rel.startswith(own + "."):
            return theirs + rel[len(own):]
    return None


def _expert_weight(rel: str, spec, prefix: str, shapes: dict, name: str):
    """The model's expert weight `rel` (relative to the experts module) from the grouped
    w1/w2/w3: the inverse of deepspeed.moe.ep_repack's repacking."""
    w1, w2, w3 = (f"{prefix}experts.{w}" for w in EXPERTS)
    if spec.expert_storage == "fused_3d":
        if spec.expert_w3_name is not None:  # gate, up and down each their own 3-D weight
            direct = {spec.expert_w1_name: w1, spec.expert_w2_name: w2, spec.expert_w3_name: w3}
            if rel in direct:
                return _only(direct[rel])
        else:  # gate and up fused into one weight, in one of two layouts
            from deepspeed.moe.fused_expert_layout import classify_fused_gate_up_layout

            experts = prefix + spec.experts_name + "."
            layout = classify_fused_gate_up_layout(shapes[experts + spec.expert_w1_name],
                                                   shapes[experts + spec.expert_w2_name])
            flip = layout is not None and layout.layout == "hidden_first"
            if rel == spec.expert_w1_name:  # [E, 2·ffn, hidden] (or [E, hidden, 2·ffn])
                return lambda t: (torch.cat([t[w1].transpose(1, 2), t[w3].transpose(1, 2)], 2)
                                  if flip else torch.cat([t[w1], t[w3]], 1))
            if rel == spec.expert_w2_name:
                return lambda t: t[w2].transpose(1, 2) if flip else t[w2]
    elif spec.expert_storage == "module_list":  # experts.<i>.<w1 name>[.weight]
        index, _, rest = rel.partition(".")
        if index.isdigit():
            i, weight = int(index), rest.removesuffix(".weight")
            if weight == spec.expert_w1_name and spec.expert_w3_name is None:
                return lambda t: torch.cat([t[w1][i], t[w3][i]], 0)
            picked = {spec.expert_w1_name: w1, spec.expert_w2_name: w2,
                      spec.expert_w3_name: w3}.get(weight)
            if picked is not None:
                return lambda t: t[picked][i]
    raise RuntimeError(f"{name}: not one of DeepSpeed AutoEP's expert weights "
                       f"({spec.expert_storage}); it would not be saved")


# ------------------------------------------------------------------- the final save (ranks)
def gather_model_state(engine, model, preset: str,
                       keep: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """The trained weights in `model`'s layout (a transformers model of the run's class on the
    meta device), yielded on the rank where `keep` is True (on CPU) and computed on every rank:
    each step is collective, so every rank must run the generator to its end. One group at a
    time: a MoE layer's experts are gathered from the ranks holding them (ZeRO-3: each expert's
    partitions over the ranks sharing it; then each rank's experts over the expert-parallel
    group), turned into the model's weights and dropped before the next layer."""
    import deepspeed
    from deepspeed.utils import groups as ds_groups

    live = dict(engine.module.named_parameters(remove_duplicate=False))  # tied names too
    live.update(engine.module.named_buffers())
    for group in plan(model, preset):
        tensors = {}
        for name in group.inputs:
            t = live[name]
            params = [t] if isinstance(t, torch.nn.Parameter) else []
            with deepspeed.zero.GatheredParameters(params):
                whole = t.detach().clone()
            if name.rsplit(".", 1)[-1] in EXPERTS and hasattr(t, "group_name"):
                whole = _all_gather(whole, ds_groups._get_expert_parallel_group(t.group_name))
            tensors[name] = whole.cpu()
        if keep:
            for out, make in group.outputs.items():
                yield out, make(tensors).contiguous()
        del tensors


def _all_gather(local: torch.Tensor, group) -> torch.Tensor:
    """Each expert-parallel rank's experts, in rank order (AutoEP's placement: rank r holds
    experts r·E_local … (r+1)·E_local − 1)."""
    import torch.distributed as dist

    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.contiguous(), group=group)
    return torch.cat(parts, 0)


# --------------------------------------------------------------------- the universal format
def _universal_file(zero_dir: Path, name: str, state: str = "fp32"):
    """One state of one weight in a universal checkpoint: DeepSpeed writes {"param": tensor, ...}
    (ZeRO 1/2, and every expert's whole [experts, ...] tensor) or, from ZeRO-3, other weights as
    a bare flat tensor. Read from the user's own checkpoint, written by DeepSpeed's converter."""
    return torch.load(zero_dir / name / f"{state}.pt", map_location="cpu", weights_only=False)


def _tensor(saved) -> torch.Tensor:
    from deepspeed.checkpoint.constants import PARAM

    return saved[PARAM] if isinstance(saved, dict) else saved


def universal_weights(zero_dir: Path, model, preset: str) -> dict:
    """Model weight name → a lazy weight (`.contiguous()` makes it) read from a universal
    checkpoint's `zero/` folder of an expert-parallel run, for dpkit/consolidate.py's writer.
    One group's AutoEP tensors are kept in memory at a time."""
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    cache: dict = {}

    def made(group: Group, out: str) -> torch.Tensor:
        if cache.get("group") is not group:
            cache.clear()
            cache.update(group=group, tensors={n: _tensor(_universal_file(zero_dir, n))
                                               for n in group.inputs})
        return group.outputs[out](cache["tensors"]).reshape(shapes[out])  # ZeRO-3's are flat

    return {out: _Lazy(lambda g=g, o=out: made(g, o))
            for g in plan(model, preset) for out in g.outputs}


class _Lazy:
    def __init__(self, make):
        self.make = make

    def contiguous(self) -> torch.Tensor:
        return self.make().contiguous()


def add_model_layout(zero_dir: Path, model, preset: str) -> int:
    """Give a universal checkpoint of an expert-parallel run the model's own names too, so a run
    without expert parallelism resumes from it: each renamed or rearranged weight gets its folder
    (fp32 weights and Adam's moments, rearranged alike; the step), beside AutoEP's (which an
    expert-parallel run still reads), in the form DeepSpeed wrote its source. Returns how many
    folders were written."""
    from deepspeed.checkpoint.constants import CAT_DIM, PARAM

    written = 0
    for group in plan(model, preset):
        if list(group.outputs) == group.inputs:
            continue  # the same name in both layouts
        states = sorted(p.stem for p in (zero_dir / group.inputs[0]).glob("*.pt")
                        if p.stem != "step")
        for state in states:
            saved = {n: _universal_file(zero_dir, n, state) for n in group.inputs}
            whole = all(isinstance(v, dict) for v in saved.values())
            tensors = {n: _tensor(v) for n, v in saved.items()}
            for out, make in group.outputs.items():
                (zero_dir / out).mkdir(exist_ok=True)
                t = make(tensors).contiguous()
                torch.save({PARAM: t, CAT_DIM: 0} if whole else t.reshape(-1),
                           zero_dir / out / f"{state}.pt")
        step = zero_dir / group.inputs[0] / "step.pt"
        for out in group.outputs:
            if step.is_file():
                (zero_dir / out / "step.pt").write_bytes(step.read_bytes())
            written += 1
    return written


def meta_model(config_dir_or_config, head_of=None):
    """The run's model class with no weights (meta device), from a config or its directory."""
    from transformers import AutoConfig

    from dpkit import heads

    config = (AutoConfig.from_pretrained(config_dir_or_config)
              if isinstance(config_dir_or_config, (str, Path)) else config_dir_or_config)
    with torch.device("meta"):
        return heads.auto_class(heads.of_config(config)).from_config(config)
