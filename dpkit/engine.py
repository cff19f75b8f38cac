"""The DeepSpeed engine of a run: optimizer, LR schedule, `deepspeed.initialize`, final save.

The recipe decides the optimizer and schedule (never the DeepSpeed template); DeepSpeed wraps
them. dpkit/run.py calls `build_engine` once per rank.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from dpkit import distributed
from dpkit.recipe import Recipe
from dpkit.run_files import publish_dir, stage_dir


def lr_lambda(recipe: Recipe, total_steps: int):
    warmup = int(recipe.train.warmup_ratio * total_steps)
    schedule = recipe.train.lr_schedule

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress

    return factor


def build_optimizer(model, recipe: Recipe, expert_groups: bool = False):
    """AdamW with no decay on biases and norm weights. CPU offload needs DeepSpeed's CPU Adam.
    `expert_groups` (expert parallelism): each group split into dense and expert parameters, as
    DeepSpeed's ZeRO needs (the expert ones are reduced over the ranks holding the same
    experts)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": recipe.train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]  # LoRA has no norms: ZeRO-3 drops empty groups
    if expert_groups:
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        named = [{**g, "name": f"group{i}"} for i, g in enumerate(groups)]
        groups = [g for g in split_params_into_different_moe_groups_for_optimizer(named)
                  if g["params"]]
    t = recipe.train
    if recipe.zero.offload_optimizer != "none":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        _remember_cpu_info()

        return DeepSpeedCPUAdam(groups, lr=t.lr, betas=t.adam_betas, eps=t.adam_eps,
                                adamw_mode=True)
    # On GPU under ZeRO 0-2 the parameters are already on the device (see build_engine): torch's
    # fused AdamW kernel then updates the flat fp32 partitions in one launch per group.
    fused = all(p.is_cuda for g in groups for p in g["params"]) and recipe.zero.stage < 3
    return torch.optim.AdamW(groups, lr=t.lr, betas=t.adam_betas, eps=t.adam_eps,
                             fused=fused or None)


def _remember_cpu_info() -> None:
    """DeepSpeedCPUAdam asks py-cpuinfo for the CPU vendor on every construction, and py-cpuinfo
    answers by starting a Python subprocess (~1.2 s on 2 cores). The CPU does not change within a
    process: ask once. (A process that builds several engines, as the test drivers and a resume in
    the same job do, paid it each time.)"""
    import functools

    import cpuinfo

    if not hasattr(cpuinfo.get_cpu_info, "cache_info"):
        cpuinfo.get_cpu_info = functools.cache(cpuinfo.get_cpu_info)


def build_engine(model, recipe: Recipe, ds_config: dict, total_steps: int, env, say, mpu=None):
    """(engine, optimizer, scheduler) from DeepSpeed, with the recipe's optimizer and schedule.
    `mpu`: DeepSpeed's sequence-parallel state (dpkit/parallel/sequence.py), or None."""
    import deepspeed

    if env.device.type == "cuda" and recipe.zero.stage < 3 and recipe.peft is None:
        model.to(env.device)  # lets the optimizer use fused CUDA kernels
    if ds_config.get("expert_parallel", {}).get("enabled"):
        # AutoEP replaces the MoE layers inside initialize: optimizer and schedule are built
        # after that (DeepSpeed calls these), over the parameters that then exist.
        def optimizer(_params):
            return build_optimizer(model, recipe, expert_groups=True)

        def scheduler(opt):
            return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(recipe, total_steps))
    else:
        optimizer = build_optimizer(model, recipe)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(recipe, total_steps))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, mpu=mpu)
    if recipe.train.compile:  # after initialize, in place: DeepSpeed's hooks stay on the path
        from accelerate.utils import compile_regions_deepspeed

        compile_regions_deepspeed(engine.module)
        compiled = sum(getattr(m, "_compiled_call_impl", None) is not None
                       for m in engine.module.modules())
        say(f"[dpkit] compile: {compiled} modules (each decoder layer, then the rest) compiled "
            "by torch.compile on first use; the first steps are slower")
    return engine, optimizer, scheduler


def lr_now(scheduler) -> float:
    return scheduler.get_last_lr()[0]


def save_model(engine, tokenizer, out_dir: Path, env, layout, bound_s: float,
               max_shard_size: int | str = "50GB") -> None:
    """Hugging Face format (safetensors), written to a temporary name and renamed when complete;
    rank 0 writes while the others wait up to `bound_s` (train.single_rank_work_timeout_s).

    The files save_pretrained would write (names, tied weights, shards and index at its default
    `max_shard_size`, config), written one tensor at a time by dpkit/consolidate.py: ZeRO-3
    parameters (`layout`, dpkit/layout.py) are gathered one at a time on every rank and only
    rank 0 keeps a CPU copy, until its bytes are written — never the whole model, as DeepSpeed's
    consolidated state dict was; under ZeRO 0-2 the model's own tensors are written as they are,
    one at a time (safetensors' save_file, under save_pretrained, held a copy of a whole shard:
    50GB by default, the model). An expert-parallel model is put back into the model's own
    layout first (`save_expert_parallel`)."""
    if layout.expert_parallel > 1:
        return save_expert_parallel(engine, tokenizer, out_dir, env, bound_s)
    from dpkit.consolidate import live_weights
    from dpkit.consolidate import save_model as write_model

    partitioned = layout.partitions_parameters
    if not (env.is_main or partitioned):  # nothing to gather: rank 0 writes alone
        distributed.wait_for_main("write the final model", bound_s)
        return
    module = engine.module
    optimizer = engine.optimizer if partitioned else None
    if hasattr(optimizer, "checkpoint_event_prologue"):  # as DeepSpeed before a consolidation:
        optimizer.checkpoint_event_prologue()  # every parameter partitioned, none left gathered
    tmp = stage_dir(out_dir) if env.is_main else None
    write_model(module, live_weights(module, keep=env.is_main), tmp, None, max_shard_size,
                write=env.is_main)
    if hasattr(optimizer, "checkpoint_event_epilogue"):  # the persistent ones gathered again
        optimizer.checkpoint_event_epilogue()
    if env.is_main:
        tokenizer.save_pretrained(tmp)
        publish_dir(tmp, out_dir)
    distributed.wait_for_main("write the final model", bound_s)


def save_expert_parallel(engine, tokenizer, out_dir: Path, env, bound_s: float) -> None:
    """The final save of an expert-parallel run: DeepSpeed AutoEP keeps each rank's experts in
    its own layer, which save_pretrained would write as a model transformers can't load. Every
    rank gathers the weights one MoE layer at a time into the model's own layout
    (dpkit/moe_layout.py); rank 0 keeps them and writes them as `dpkit export` does
    (dpkit/consolidate.py: the names, shards and config transformers would write)."""
    import copy

    from dpkit import moe, moe_layout
    from dpkit.consolidate import save_model as write_model

    module = engine.module
    config = copy.deepcopy(module.config)
    model = moe_layout.meta_model(config)
    model.generation_config = copy.deepcopy(module.generation_config)
    dtype = next(p.dtype for p in module.parameters() if p.is_floating_point())
    state = dict(moe_layout.gather_model_state(engine, model, moe.autoep_preset(config),
                                               keep=env.is_main))
    if env.is_main:
        tmp = stage_dir(out_dir)
        write_model(model, state, tmp, dtype, "50GB")  # save_pretrained's default
        tokenizer.save_pretrained(tmp)
        publish_dir(tmp, out_dir)
    distributed.wait_for_main("write the final model", bound_s)
