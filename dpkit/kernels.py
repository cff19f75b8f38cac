"""The recipe's `compute:` switches applied to a built model: Liger kernels (CUDA only), tiled
MLP (DeepSpeed's TiledMLP), activations offloaded to CPU. The loss head is dpkit/objectives/head.py.
"""

from __future__ import annotations

import importlib.util
import math

import torch


def liger_active(recipe, device) -> bool:
    """compute.liger on a CUDA device with liger-kernel installed (its kernels are Triton)."""
    return (recipe.compute.liger and device.type == "cuda"
            and importlib.util.find_spec("liger_kernel") is not None)


def apply(model, recipe, env, say) -> None:
    c = recipe.compute
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if c.liger and liger_active(recipe, env.device):
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        # The model's forward stays transformers' (dpkit computes the loss itself: the fused
        # linear cross-entropy is used by the loss head, dpkit/objectives/head.py).
        _apply_liger_kernel_to_instance(model=base, rope=True, rms_norm=True, swiglu=True,
                                        cross_entropy=False, fused_linear_cross_entropy=False)
        say("[dpkit] compute.liger: Liger RoPE, RMSNorm, SwiGLU and fused linear cross-entropy")
    elif c.liger:
        say("[dpkit] compute.liger: not used here (needs a CUDA GPU and `pip install dpkit[gpu]`)")
    if c.tiled_mlp:
        n = tile_mlps(base)
        say(f"[dpkit] compute.tiled_mlp: {n} MLPs run over sequence tiles (DeepSpeed TiledMLP)")
    if c.offload_activations:
        offload_saved_tensors(base, pin=env.device.type == "cuda")
        say("[dpkit] compute.offload_activations: tensors saved for the backward kept in CPU "
            "memory" + ("" if recipe.model.gradient_checkpointing else
                        " (all of them: turn on model.gradient_checkpointing to keep only "
                        "each layer's input)"))


def tile_mlps(model) -> int:
    """Every gated MLP (gate/up/down projections) runs through DeepSpeed's TiledMLP: tiles of
    about `hidden` tokens, recomputed in the backward."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    count = 0
    for module in model.modules():
        if not all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj")):
            continue
        original = module.forward  # bound method: the module's own MLP computation

        def mlp(self, x, original=original):
            return original(x)

        def tiled(x, module=module, mlp=mlp):
            shards = _agreed_shards(x)
            params = [p for p in module.parameters() if p.requires_grad]
            return TiledMLP.apply(mlp, module, x, shards, params)

        module.forward = tiled
        count += 1
    return count


def _agreed_shards(x) -> int:
    """Tiles of about `hidden` tokens, the same count on every rank: ZeRO-3 gathers the MLP's
    weights per tile call, and every rank must make the same collectives."""
    n = torch.tensor(max(1, math.ceil(x.shape[-2] / x.shape[-1])), device=x.device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.MAX)
    return int(n)


def offload_saved_tensors(model, pin: bool) -> None:
    """Wrap the model's forward in torch's save_on_cpu: saved tensors move to host memory in the
    forward and come back in the backward."""
    contexts = []

    def enter(module, args):
        contexts.append(torch.autograd.graph.save_on_cpu(pin_memory=pin))
        contexts[-1].__enter__()

    def leave(module, args, output):
        contexts.pop().__exit__(None, None, None)

    model.register_forward_pre_hook(enter)
    model.register_forward_hook(leave)
