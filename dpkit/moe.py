"""Mixture-of-experts models: what dpkit does beyond a dense model (docs/moe.md).

- `experts_of(config)`: how many experts a layer has and how many each token runs (the planner's
  total vs active parameters come from here and `expert_parameters`).
- ZeRO-3 leaf modules: ZeRO-3 gathers a module's parameters when the module is called. A block
  keeping one module per expert calls only the experts its tokens were routed to, so ranks
  disagree on what to gather and wait for each other forever. Declared a DeepSpeed leaf module,
  the whole block is gathered when entered. transformers 5 fuses a layer's experts into one
  module of 3-D parameters (always called, gathered whole): only remote code and older classes
  need it, found here from the model (`per_expert_blocks`) or named in `moe.zero3_leaf_modules`.
- `RouterAuxLoss`: the router's load-balancing loss of each training forward, from the model's
  own `aux_loss` output; dpkit/step.py adds it to every objective's loss and scales it.
- Expert parallelism through DeepSpeed's AutoEP (`moe.expert_parallel`): `autoep_section` for
  the DeepSpeed config, `autoep_problems` for validate.

Imports torch and DeepSpeed inside functions: the planner and validate import this module.
"""

from __future__ import annotations

from dataclasses import dataclass

from dpkit.errors import Problem

EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")
"""Config attributes holding the number of routed experts (Qwen/OLMoE, Mixtral/gpt-oss,
DeepSeek)."""


@dataclass(frozen=True)
class Experts:
    routed: int     # experts per MoE layer
    active: int     # experts each token runs (top-k)
    shared: int = 0  # experts every token runs besides (DeepSeek, Qwen2-MoE)


def experts_of(config) -> Experts | None:
    """The model's experts from its config; None for a dense model."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    routed = next((getattr(text, k) for k in EXPERT_COUNT_KEYS
                   if isinstance(getattr(text, k, None), int)), 0)
    active = getattr(text, "num_experts_per_tok", None)
    if not routed or routed < 2 or not isinstance(active, int) or active < 1:
        return None
    shared = getattr(text, "n_shared_experts", None) or 0
    return Experts(routed, active, int(shared))


def is_expert_parameter(name: str) -> bool:
    """A routed expert's weight: a path through a module named `experts` (not shared experts)."""
    return "experts" in name.split(".")[:-1]


def expert_parameters(model) -> int:
    """Elements of the routed experts' weights (all experts, every layer)."""
    return sum(p.numel() for n, p in model.named_parameters() if is_expert_parameter(n))


# ------------------------------------------------------------------------ ZeRO-3 leaf modules
def per_expert_blocks(model) -> list[str]:
    """Class names of the blocks that keep one module per expert: a child named like `experts`
    that is a list of two or more modules of one class."""
    import torch

    found = set()
    for module in model.modules():
        for name, child in module.named_children():
            if "expert" not in name.lower() or "shared" in name.lower():
                continue
            if isinstance(child, (torch.nn.ModuleList, torch.nn.ModuleDict)) and len(child) > 1 \
                    and len({type(c) for c in child.children()}) == 1:
                found.add(type(module).__name__)
    return sorted(found)


def leaf_classes(model, wanted: list[str] | None) -> tuple[list[str] | None, str]:
    """The leaf classes to write into the DeepSpeed config (None: leave DeepSpeed's own list)
    and a line saying which and why."""
    if wanted is not None:
        return list(wanted), (f"ZeRO-3 leaf modules {wanted} (moe.zero3_leaf_modules)" if wanted
                              else "no ZeRO-3 leaf modules (moe.zero3_leaf_modules: [])")
    found = per_expert_blocks(model)
    if not found:
        return None, ("ZeRO-3: the experts are fused into one module per layer, gathered whole; "
                      "no leaf module needed")
    from deepspeed.runtime.zero.leaf_module_config import DEFAULT_LEAF_MODULE_CLASSES

    return [*DEFAULT_LEAF_MODULE_CLASSES, *found], (
        f"ZeRO-3 leaf modules {found}: one module per expert, so each block is gathered whole "
        "when entered (ranks route to different experts)")


def declare_leaves(ds_config: dict, classes: list[str] | None) -> None:
    if classes is not None:
        ds_config.setdefault("zero_optimization", {})["leaf_module"] = {"classes": classes}


def leaf_problems(model, wanted: list[str] | None) -> list[Problem]:
    """Every class named in moe.zero3_leaf_modules must be a module class of the model."""
    if not wanted:
        return []
    from difflib import get_close_matches

    classes = {type(m).__name__ for m in model.modules()}
    out = []
    for name in wanted:
        if name.rsplit(".", 1)[-1] not in classes:
            close = get_close_matches(name, sorted(classes), n=1)
            out.append(Problem("moe.zero3_leaf_modules", f"`{name}` is not a module class of this "
                               f"{model.config.model_type} model",
                               f"did you mean `{close[0]}`?" if close else
                               "name the class of the block that holds the experts"))
    return out


def problems(recipe, config, world_size: int) -> list[Problem]:
    """What validate refuses about the `moe` section for this model and world size (the leaf
    module names are checked on the model: `leaf_problems`)."""
    out = autoep_problems(recipe, config, world_size)
    experts = experts_of(config)
    if experts is None:
        return out
    if recipe.train.sequence_parallel > 1:
        out.append(Problem("train.sequence_parallel", "with a mixture-of-experts model is not "
                           "supported: each rank would compute the router loss on a slice of "
                           "the rows, not on the micro-batch", "set train.sequence_parallel: 1"))
    return out


# ------------------------------------------------------------------------- the router's loss
def model_aux_coef(config) -> float | None:
    """The model's own load-balancing coefficient (None: its class computes no such loss)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(text, "router_aux_loss_coef", None)
    return float(value) if isinstance(value, (int, float)) else None


class RouterAuxLoss:
    """Asks the model for its router loss on every training forward and keeps it.

    A forward pre-hook on the transformers model passes `output_router_logits=True` (only while
    training with gradients: eval and generation are untouched, and config.json is not
    changed); a forward hook keeps the output's `aux_loss`, the model's own load-balancing loss
    of that forward (padding masked by its attention mask). `take()` hands the step loop the
    loss of the forwards since the last call."""

    def __init__(self, model, coef: float):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.coef, self.kept, self.seen = coef, [], False
        self.handles = [base.register_forward_pre_hook(self._ask, with_kwargs=True),
                        base.register_forward_hook(self._keep)]

    @staticmethod
    def _training(module) -> bool:
        import torch

        return module.training and torch.is_grad_enabled()

    def _ask(self, module, args, kwargs):
        if self._training(module):
            return args, {**kwargs, "output_router_logits": True}
        return None

    def _keep(self, module, args, output):
        aux = getattr(output, "aux_loss", None)
        if self._training(module) and aux is not None:
            self.kept.append(aux)
            self.seen = True

    def take(self, device):
        """Mean router loss of the training forwards since the last call (0 if none)."""
        import torch

        kept, self.kept = self.kept, []
        if not kept:
            return torch.zeros((), device=device)
        return torch.stack([a.to(device).float().reshape(()) for a in kept]).mean()


def aux_loss_for(model, config, coef: float | None) -> tuple[RouterAuxLoss | None, str]:
    """The run's router loss (None when off or the model computes none) and a line saying so."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if "output_router_logits" not in inspect.signature(type(base).forward).parameters:
        return None, (f"router loss: none ({type(base).__name__} computes no load-balancing "
                      "loss; moe.aux_loss_coef has nothing to weigh)")
    own = model_aux_coef(config)
    chosen = own if coef is None else coef
    if chosen is None:
        return None, ("router loss: none (the model's config has no router_aux_loss_coef; "
                      "set moe.aux_loss_coef to add one)")
    if chosen == 0:
        return None, "router loss: off (moe.aux_loss_coef: 0)"
    where = "the model's router_aux_loss_coef" if coef is None else "moe.aux_loss_coef"
    return RouterAuxLoss(model, chosen), (
        f"router loss: load-balancing loss × {chosen:g} ({where}) added per micro-batch, "
        "averaged over the step's micro-batches; logged as aux_loss (`loss` is the objective's)")


# ------------------------------------------------------------------------ expert parallelism
def autoep_preset(config) -> str | None:
    """DeepSpeed AutoEP's preset for this model type, or None when it has none."""
    from deepspeed.module_inject.auto_ep_presets.registry import preset_name_for_hf_model_type

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return preset_name_for_hf_model_type(getattr(text, "model_type", None))


def autoep_section(recipe, config) -> dict:
    """The DeepSpeed config's `expert_parallel` block for `moe.expert_parallel`."""
    return {"enabled": True, "autoep_size": recipe.moe.expert_parallel,
            "preset_model": autoep_preset(config)}


def autoep_problems(recipe, config, world_size: int) -> list[Problem]:
    """What expert parallelism cannot take, each in one line naming `moe.expert_parallel`."""
    ep = recipe.moe.expert_parallel
    if ep == 1:
        return []
    key = "moe.expert_parallel"
    experts = experts_of(config) if config is not None else None
    if config is not None and experts is None:
        return [Problem(key, f"is {ep}, but {config.model_type} is not a mixture-of-experts model",
                        "set it to 1")]
    if config is not None and autoep_preset(config) is None:
        from deepspeed.module_inject.auto_ep_presets.registry import PRESET_MODELS

        return [Problem(key, f"DeepSpeed AutoEP has no preset for {config.model_type}",
                        f"set it to 1 (AutoEP presets: {', '.join(sorted(PRESET_MODELS))})")]
    out = []
    if world_size % ep:
        out.append(Problem(key, f"{ep} does not divide the world size {world_size}",
                           "use a divisor of the number of ranks"))
    if experts is not None and experts.routed % ep:
        out.append(Problem(key, f"{ep} does not divide the {experts.routed} experts of a layer",
                           "use a divisor of the number of experts"))
    if recipe.peft is not None:
        out.append(Problem(key, "is not supported with LoRA: AutoEP replaces the expert modules "
                           "PEFT wraps", "set moe.expert_parallel: 1, or fine-tune in full"))
    if recipe.train.sequence_parallel > 1:
        out.append(Problem(key, "with train.sequence_parallel: both split the ranks into groups "
                           "dpkit does not combine yet", "use one of them"))
    if recipe.zero.offload_optimizer != "none" or recipe.zero.offload_params != "none":
        out.append(Problem(key, "with ZeRO offload is not supported (DeepSpeed's expert "
                           "parameter groups are not offloaded)", "set zero.offload_* to none"))
    return out


def allow_autoep_with_transformers() -> None:
    """DeepSpeed 0.19's AutoEP reads and writes transformers' output-recorder registry as a
    plain dict of class-name strings (`get(key, default)`, `registry[key] = ...`); transformers
    5.24 made `get` and item assignment take a model (and key it by its class). Without this,
    AutoEP stops at `_CanRecordRegistry.get() takes 2 positional arguments`. A string key is
    treated as the key itself, a model as transformers does; nothing else changes."""
    from transformers.utils import output_capturing as oc

    registry = getattr(oc, "_CanRecordRegistry", None)
    if registry is None or getattr(registry, "_dpkit_accepts_keys", False):
        return
    get, setitem = registry.get, registry.__setitem__

    def get_either(self, model, *default):
        return dict.get(self, model, *default) if isinstance(model, str) else get(self, model)

    def set_either(self, model, value):
        if isinstance(model, str):
            dict.__setitem__(self, model, value)
        else:
            setitem(self, model, value)

    registry.get, registry.__setitem__ = get_either, set_either
    registry._dpkit_accepts_keys = True
