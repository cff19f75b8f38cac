"""`dpkit plan`: will it fit, and the fastest ZeRO setup that does.

From the model's config alone (parameters counted on the meta device, no weights loaded) and the
DeepSpeed config dpkit would resolve for each choice, every ZeRO stage × offload gets a per-GPU
memory breakdown (dpkit.plan.memory), the largest micro batch that fits and a predicted step time
(dpkit.plan.time); the fitting choice with the most tokens per second is recommended. `dpkit train`
calls `check_fits` before launch. The command line lives in dpkit.cli.plan. See docs/plan.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from dpkit import heads
from dpkit.batch import BatchPlan, plan_batch, without_accumulation
from dpkit.errors import Problem, RecipeError
from dpkit.plan.cost import run_length, time_lines
from dpkit.plan.memory import (DTYPE_BYTES, Breakdown, GiB, Knobs, ModelShape, Rollout, Setup,
                               estimate, long_fields, model_shape)
from dpkit.plan.time import Cluster, Job, StepTime, step_time
from dpkit.recipe import Recipe, recipe_from_dict, recipe_to_yaml
from dpkit.run_files import DS_CONFIG, RECIPE
from dpkit.rundir import files_problem, make_dir

PLAN_FILES = [RECIPE, DS_CONFIG, "launch.sh"]  # named as in a run directory

MAX_MICRO_BATCH = 64
"""Largest micro batch tried when the global batch does not bound it."""

# (stage, offload_optimizer, offload_params): the options planned, in the order ties are broken
# (less offload first). ZeRO-0 cannot offload, and ZeRO-1 offload is never better than ZeRO-2's
# (same traffic, more GPU memory).
CHOICES: list[tuple[int, str, str]] = [
    (0, "none", "none"), (1, "none", "none"), (2, "none", "none"), (3, "none", "none"),
    (2, "cpu", "none"), (3, "cpu", "none"), (3, "cpu", "cpu"), (3, "nvme", "none"),
    (3, "nvme", "nvme")]


# ---------------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class Hardware:
    world_size: int
    gpus_per_node: int
    gpu_memory: int
    cpu_memory: int | None = None  # per node; None: not checked


@dataclass
class Option:
    stage: int
    offload_optimizer: str
    offload_params: str
    micro_batch: int | None  # largest that fits; None: not even the smallest
    breakdown: Breakdown  # at micro_batch, or at the smallest candidate if nothing fits
    why_not: str = ""
    batch: BatchPlan | None = None  # when it fits
    time: StepTime | None = None  # predicted, when it fits
    expert_parallel: int = 1  # ranks each MoE layer's experts are split over
    moe: bool = False  # the model is a mixture of experts: its overrides name moe.expert_parallel
    time_job: Job | None = None  # what was timed (when it fits)

    @property
    def fits(self) -> bool:
        return self.micro_batch is not None

    @property
    def overrides(self) -> list[str]:
        return [f"zero.stage={self.stage}", f"zero.offload_optimizer={self.offload_optimizer}",
                f"zero.offload_params={self.offload_params}",
                f"train.micro_batch_size={self.micro_batch}",
                *([f"moe.expert_parallel={self.expert_parallel}"] if self.moe else [])]


@dataclass
class Plan:
    recipe: Recipe
    shape: ModelShape
    hw: Hardware
    options: list[Option]
    recommended: Option | None
    cluster: Cluster | None = None


def variant(recipe: Recipe, stage: int, offload_optimizer: str, offload_params: str,
            micro_batch: int | None = None, global_batch: int | None = None,
            expert_parallel: int | None = None) -> Recipe:
    raw, z = recipe.model_dump(mode="json"), recipe.zero
    if expert_parallel is not None:
        raw["moe"]["expert_parallel"] = expert_parallel
    if (stage, offload_optimizer, offload_params) != (z.stage, z.offload_optimizer,
                                                      z.offload_params):
        raw["zero"]["template"] = None  # a custom template belongs to the recipe's own choice
    raw["zero"].update(stage=stage, offload_optimizer=offload_optimizer,
                       offload_params=offload_params)
    if "nvme" in (offload_optimizer, offload_params) and not raw["zero"].get("nvme_path"):
        raw["zero"]["nvme_path"] = "/local_nvme"
    raw["train"]["micro_batch_size"] = micro_batch or raw["train"]["micro_batch_size"]
    raw["train"]["global_batch_size"] = global_batch or raw["train"]["global_batch_size"]
    return recipe_from_dict(raw)


def resolved_ds_config(recipe: Recipe, world_size: int, hidden_size: int) -> dict:
    from dpkit.zero import resolve_ds_config

    return resolve_ds_config(recipe, world_size, hidden_size)


def knobs(ds_config: dict) -> Knobs:
    """Memory-relevant ZeRO values, with DeepSpeed's own defaults for what the config leaves out."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    z = DeepSpeedZeroConfig(**ds_config.get("zero_optimization", {}))
    opt, par = z.offload_optimizer, z.offload_param
    return Knobs(
        reduce_bucket_size=int(z.reduce_bucket_size), overlap_comm=bool(z.overlap_comm),
        prefetch_bucket_size=int(z.prefetch_bucket_size),
        param_persistence_threshold=int(z.param_persistence_threshold),
        max_live_parameters=int(z.max_live_parameters), sub_group_size=int(z.sub_group_size),
        optimizer_buffer_count=int(opt.buffer_count) if opt else 4,
        param_buffer_count=int(par.buffer_count) if par else 5,
        param_buffer_size=int(par.buffer_size) if par else 100_000_000)


def micro_candidates(recipe: Recipe, world_size: int) -> list[int]:
    """Micro batches the recipe's global batch splits into on `world_size` ranks (dpkit.batch)."""
    t, unit = recipe.train, "sequences" if recipe.data.packing else "rows"
    sp = getattr(t, "sequence_parallel", 1)
    fits = []
    for m in range(1, t.global_batch_size + 1):
        try:
            plan_batch(t.global_batch_size, m, world_size, sp, unit)
            fits.append(m)
        except RecipeError:
            continue
    if not fits:  # the global batch does not split at all: plan_batch's own message
        plan_batch(t.global_batch_size, 1, world_size, sp, unit)
    return fits


def setup_for(recipe: Recipe, stage: int, opt: str, par: str, hw: Hardware, micro: int,
              kn: Knobs, expert_parallel: int | None = None) -> Setup:
    m = recipe.model
    load = objective_load(recipe)
    rows = micro * load["rows_per_item"]  # pairs: chosen + rejected, 1 forward
    ep = recipe.moe.expert_parallel if expert_parallel is None else expert_parallel
    prompts = -(-recipe.train.global_batch_size // hw.world_size)  # a rank's items per step
    return Setup(stage, opt, par, hw.world_size, hw.gpus_per_node, DTYPE_BYTES[m.dtype], rows,
                 recipe.data.max_seq_len, m.gradient_checkpointing, m.attn_implementation, kn,
                 **long_fields(recipe), expert_parallel=ep,
                 reference_copy=reference_of(recipe) == "frozen_copy", rollout=load["rollout"],
                 rollout_prompts=prompts if load["rollout"] else 0)


def fit(shape: ModelShape, recipe: Recipe, stage: int, opt: str, par: str, hw: Hardware,
        candidates: list[int], expert_parallel: int | None = None) -> Option:
    """The largest micro batch (of ascending `candidates`) this stage/offload (and expert
    parallel degree: default the recipe's) fits with."""
    ep = recipe.moe.expert_parallel if expert_parallel is None else expert_parallel
    cfg = resolved_ds_config(variant(recipe, stage, opt, par, 1, hw.world_size), hw.world_size,
                             shape.hidden)
    kn = knobs(cfg)
    best, why = None, ""
    for micro in candidates:
        b = estimate(shape, setup_for(recipe, stage, opt, par, hw, micro, kn, ep))
        if b.gpu_total > hw.gpu_memory:
            why = f"needs {gib(b.gpu_total)} GiB per GPU"
        elif hw.cpu_memory is not None and b.cpu_per_node > hw.cpu_memory:
            why = f"needs {gib(b.cpu_per_node)} GiB CPU memory per node"
        if why:
            break
        best = (micro, b)
    moe = dict(expert_parallel=ep, moe=bool(shape.experts))
    if best is None:
        b = estimate(shape, setup_for(recipe, stage, opt, par, hw, candidates[0], kn, ep))
        return Option(stage, opt, par, None, b, why, **moe)
    return Option(stage, opt, par, best[0], best[1], **moe)


def expert_parallel_levels(recipe: Recipe, shape: ModelShape, world_size: int) -> list[int]:
    """Expert-parallel degrees worth planning: powers of two above 1 that divide both the world
    and the experts, where validate accepts expert parallelism (full fine-tuning, no sequence
    parallelism; offload is not planned with it: dpkit.moe.autoep_problems)."""
    if not shape.experts or recipe.peft is not None or recipe.train.sequence_parallel > 1:
        return []
    return [d for d in (2 ** i for i in range(1, world_size.bit_length()))
            if d <= world_size and not world_size % d and not shape.experts % d]


def recipe_shape(recipe: Recipe, lora_rank: int | None = None,
                 lora_targets: list[str] | None = None, lora_dropout: float | None = None):
    """The recipe's model; LoRA from the arguments, else from the recipe's `peft` section."""
    from dpkit.model import load_model_config
    from dpkit.recipe import PeftSection

    peft = recipe.peft or PeftSection(r=lora_rank or 1)
    if lora_rank is None:
        lora_rank = recipe.peft.r if recipe.peft else 0
    if lora_targets is None and peft.target_modules != "all-linear":
        lora_targets = peft.target_modules
    return model_shape(load_model_config(recipe.model), lora_rank, lora_targets,
                       recipe.model.trust_remote_code,
                       peft.dropout if lora_dropout is None else lora_dropout,
                       heads.of_recipe(recipe),
                       lora_parameters=peft.target_parameters if lora_rank else None)


def plan(recipe: Recipe, hw: Hardware, nvme: bool = False, shape: ModelShape | None = None,
         free_global_batch: bool = False, cluster: Cluster | None = None) -> Plan:
    """Every stage × offload with its largest fitting micro batch and predicted step time; the
    recommendation is the fitting option with the most tokens per second (dpkit.plan.time).

    With `free_global_batch` the micro batch is not bound by the recipe's global batch (powers of
    two up to MAX_MICRO_BATCH, no accumulation) — for planning without a recipe.
    """
    shape = shape or recipe_shape(recipe)
    cluster = cluster or Cluster()
    if free_global_batch:
        candidates = [2**i for i in range(MAX_MICRO_BATCH.bit_length())]
    else:
        candidates = micro_candidates(recipe, hw.world_size)
    choices = [(*c, 1) for c in CHOICES if nvme or "nvme" not in c]
    # a mixture of experts: every stage without offload also with its experts split over ranks
    choices += [(s, "none", "none", ep) for ep in expert_parallel_levels(recipe, shape,
                                                                         hw.world_size)
                for s in (0, 1, 2, 3)]
    options = [fit(shape, recipe, *choice[:3], hw, candidates, choice[3]) for choice in choices]
    for o in options:
        if o.fits:
            o.batch, o.time, o.time_job = timed(recipe, shape, o, hw, cluster, free_global_batch)
    fitting = [o for o in options if o.fits]
    # fastest first; on a tie (the model says equal) the larger micro batch, then the lower
    # stage and the order of CHOICES (less offload)
    recommended = min(fitting, default=None, key=lambda o: (
        -round(o.time.tokens_per_s, 6), -o.micro_batch, o.stage,
        choices.index((o.stage, o.offload_optimizer, o.offload_params, o.expert_parallel))))
    return Plan(recipe, shape, hw, options, recommended, cluster)


def timed(recipe: Recipe, shape: ModelShape, o: Option, hw: Hardware, cluster: Cluster,
          free_global_batch: bool) -> tuple[BatchPlan, StepTime, Job]:
    t = recipe.train
    sp = getattr(t, "sequence_parallel", 1)
    batch = (without_accumulation(o.micro_batch, hw.world_size, sp) if free_global_batch else
             plan_batch(t.global_batch_size, o.micro_batch, hw.world_size, sp))
    job = Job(shape, o.stage, o.offload_optimizer, o.offload_params, hw.world_size,
              hw.gpus_per_node, batch.micro_batch_size, batch.grad_accum,
              recipe.data.max_seq_len, DTYPE_BYTES[recipe.model.dtype],
              o.breakdown.setup.knobs.reduce_bucket_size, **objective_load(recipe),
              expert_parallel=o.expert_parallel)
    return batch, step_time(job, cluster), job


def reference_of(recipe: Recipe) -> str | None:
    """How the recipe's objective evaluates its reference (`Objective.reference`)."""
    from dpkit.objectives import build_objective

    return build_objective(recipe).reference


def objective_load(recipe: Recipe) -> dict:
    """What the recipe's objective puts through the model per batch item (the time model's Job
    fields): pairs are two rows; DPO with the adapter-off reference adds one forward without
    gradient per micro-batch, as the objective says (`Objective.forwards_without_grad`; a
    precomputed reference runs once before step 1: cost.py)."""
    from dpkit.objectives import build_objective

    o = build_objective(recipe)
    return {"rows_per_item": o.rows_per_item, "reference_forwards": o.forwards_without_grad,
            "rollout": Rollout(**o.rollout_load) if o.rollout_load else None}


# ----------------------------------------------------------------------------------- output
def gib(n: int) -> str:
    return f"{n / GiB:.1f}"


def count(n: int) -> str:  # parameters
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def chosen_recipe(p: Plan, o: Option, free_global_batch: bool) -> Recipe:
    sp = getattr(p.recipe.train, "sequence_parallel", 1)
    gbs = (without_accumulation(o.micro_batch, p.hw.world_size, sp).global_batch_size
           if free_global_batch else None)
    return variant(p.recipe, o.stage, o.offload_optimizer, o.offload_params, o.micro_batch, gbs,
                   o.expert_parallel)


def option_name(o: Option) -> str:
    where = {"none": "no offload"}.get(o.offload_optimizer, f"optimizer on {o.offload_optimizer}")
    if o.offload_params != "none":
        where = f"optimizer and parameters on {o.offload_params}"
    experts = f", experts over {o.expert_parallel} ranks" if o.expert_parallel > 1 else ""
    return f"ZeRO-{o.stage}, {where}{experts}"


def preference_cost(r: Recipe, shape: ModelShape) -> list[str]:
    """What a preference objective adds (docs/preference.md): rows and the reference model, its
    share of the compute from the same FLOP counts as the time model."""
    if r.objective == "sft":
        return []
    from dpkit.metrics import forward_flops, model_flops
    from dpkit.objectives import build_objective
    from dpkit.plan.time import matmul_params

    if build_objective(r).rollout_load is not None:
        return []  # an online method: rollout_lines
    n, t = matmul_params(shape)
    rows = [r.data.max_seq_len]
    share = (forward_flops(n, shape.layers, shape.hidden, rows)
             / model_flops(n, t, shape.layers, shape.hidden, rows))
    ref = build_objective(r).reference
    cost = {None: "no reference model (no extra cost)",
            "adapter_off": "reference = adapter off: +1 forward (no gradient) per micro batch, "
                           f"+{share:.0%} compute per step (in the times below), no extra memory",
            "precomputed": "reference precomputed: +1 forward per pair once before step 1 "
                           f"({share:.0%} of an epoch's compute), no extra memory",
            "frozen_copy": "reference = a frozen copy of the initial model: +1 forward (no "
                           f"gradient) per micro batch, +{share:.0%} compute per step (in the "
                           "times below), its weights in memory above (partitioned under "
                           "ZeRO-3)"}[ref]
    return ["", f"objective {r.objective}: a micro batch of N pairs is 2N rows in one forward "
            f"(memory above counts 2N rows); {cost}"]


def render(p: Plan, free_global_batch: bool = False, length=None, price: float | None = None
           ) -> str:
    from dpkit.zero import batch_arithmetic

    s, r, hw = p.shape, p.recipe, p.hw
    lora = f", LoRA r={s.lora_rank}" if s.lora_rank else ""
    cpu = f", {gib(hw.cpu_memory)} GiB CPU per node" if hw.cpu_memory else ""
    active = (f" ({count(s.active)} active: {s.experts_per_token} of {s.experts} experts per "
              f"token in {s.moe_layers} layers; FLOPs and MFU count the active ones)"
              if s.experts else "")
    ep_col = bool(s.experts)
    lines = [
        f"model: {r.model.name_or_path or r.model.config.get('model_type')}: "
        f"{count(s.total)} parameters{active}, {count(s.trainable)} trained{lora}; "
        f"{r.model.dtype}, {r.data.max_seq_len} tokens, {r.model.attn_implementation}"
        f"{', gradient checkpointing' if r.model.gradient_checkpointing else ''}",
        f"hardware: {hw.world_size // hw.gpus_per_node} node(s) × {hw.gpus_per_node} GPUs × "
        f"{gib(hw.gpu_memory)} GiB{cpu}", "",
        "GiB per GPU at the micro batch shown ('no': at the smallest); each column at its own "
        "peak, total = the larger of the backward and the optimizer step, plus margin",
        f"{'stage':<6}{'offload':<22}" + (f"{'EP':>3}" if ep_col else "")
        + f"{'micro':>6}{'params':>8}{'grads':>8}{'optim':>8}"
        f"{'activ':>8}{'comm':>7}{'margin':>8}{'total':>8}{'CPU/node':>10}  fits"]
    rows_per_item = objective_load(r)["rows_per_item"]  # preference pairs: 2 rows each
    for o in p.options:
        b = o.breakdown
        lines.append(
            f"{o.stage:<6}{b.setup.label:<22}"
            + (f"{o.expert_parallel:>3}" if ep_col else "")
            + f"{b.setup.micro_batch // rows_per_item:>6}"
            f"{gib(b.gpu('params')):>8}"
            f"{gib(b.gpu('grads', 'step')):>8}{gib(b.gpu('optim')):>8}"
            f"{gib(b.gpu('activations')):>8}{gib(b.gpu('comm')):>7}{gib(b.gpu_margin):>8}"
            f"{gib(b.gpu_total):>8}{gib(b.cpu_per_node):>10}  "
            + ("yes" if o.fits else f"no ({o.why_not})"))
    lines += preference_cost(r, s)
    o = p.recommended
    if o is None:
        return "\n".join(lines + ["", "nothing fits: add GPUs, use LoRA (--lora-rank), shorten "
                                   "data.max_seq_len or set model.gradient_checkpointing=true"])
    batch = batch_arithmetic(chosen_recipe(p, o, free_global_batch), hw.world_size)
    length = length or run_length(r, None)
    st = o.time
    return "\n".join(lines + [""] + time_lines(p, length, price) + [
        "", f"recommended: {option_name(o)}, micro batch {o.micro_batch} "
        f"({gib(o.breakdown.gpu_total)} GiB per GPU): the fastest that fits, {st.step_s:.3f} s "
        f"per step, {st.tokens_per_s:,.0f} tokens/s", f"  {batch.describe()}",
        f"  overrides: {' '.join(o.overrides)}"] + rollout_lines(p, o))


def rollout_lines(p: Plan, o: Option) -> list[str]:
    """An online method's generation at the recommended option: what it holds (in the totals
    above, phase `rollout`) and what it adds to each step (in the times above)."""
    b, setup = o.breakdown, o.breakdown.setup
    r = setup.rollout
    if r is None or o.time is None:
        return []
    n = setup.rollout_prompts
    held = {x.item: x.bytes for x in b.parts if x.category == "rollout"}
    gathered = (f", the weights gathered whole for the rollout {gib(held['gathered weights'])} "
                "GiB (ZeRO-3)" if "gathered weights" in held else "")
    phase = "the peak" if b.peak_phase == "rollout" else f"below the {b.peak_phase} peak"
    return [f"rollout ({p.recipe.objective}, {'batched' if r.batched else 'one call per prompt'}):"
            f" {r.calls(n)} generate call(s) of {r.sequences(n)} sequences × ({r.prompt_len} + "
            f"{r.completion_len}) tokens per rank and step; holds the KV cache "
            f"{gib(held['KV cache'])} GiB, logits and prefill "
            f"{gib(held['logits'] + held['prefill'])} GiB{gathered} ({phase}); "
            f"{o.time.rollout_s:.3f} s of the {o.time.step_s:.3f} s step (decode memory-bound: "
            "every weight read per generated token)"]


def write(p: Plan, directory: Path, free_global_batch: bool) -> list[Path]:
    """The recommended recipe, its resolved DeepSpeed config, and the launch command."""
    o, hw = p.recommended, p.hw
    if o is None:
        raise RecipeError.one("--write", "nothing fits, so there is nothing to write",
                              "change the hardware or the recipe first")
    r = chosen_recipe(p, o, free_global_batch)
    names = PLAN_FILES
    problem = files_problem(directory, names, "plan", "--write")
    if problem is not None:  # e.g. a run directory: its recipe.yaml records what was trained
        raise RecipeError(problem)
    make_dir(directory, "plan")
    files = [directory / name for name in names]
    files[0].write_text(recipe_to_yaml(r))
    ds = resolved_ds_config(r, hw.world_size, p.shape.hidden)
    files[1].write_text(json.dumps(ds, indent=2) + "\n")
    nodes = hw.world_size // hw.gpus_per_node
    cmd = f"dpkit train {files[0]}" if nodes == 1 else (
        f"torchrun --nnodes {nodes} --nproc_per_node {hw.gpus_per_node} --node_rank "
        f"${{NODE_RANK:?}} --master_addr ${{MASTER_ADDR:?}} --master_port ${{MASTER_PORT:-29500}} "
        f"-m dpkit.train {files[0]}")
    files[2].write_text(
        f"#!/bin/sh\n# {option_name(o)}, micro batch {o.micro_batch}: "
        f"{gib(o.breakdown.gpu_total)} GiB per GPU of {gib(hw.gpu_memory)} (dpkit plan)\n"
        f"# resolved DeepSpeed config: {files[1]}\n{cmd}\n")
    return files


# ------------------------------------------------------------------------------- train hook
def check_fits(recipe: Recipe, world_size: int, gpus_per_node: int, gpu_memory_bytes: int,
               lora_rank: int | None = None, lora_targets: list[str] | None = None,
               cpu_memory_bytes: int | None = None) -> list[Problem]:
    """Problems if the recipe's own stage/offload/micro batch will not fit; [] if it does.

    `dpkit train` calls this before launch and skips it when `train.skip_memory_check` is set.
    LoRA comes from the recipe's `peft` section unless `lora_rank` / `lora_targets` are given.
    """
    hw = Hardware(world_size, gpus_per_node, gpu_memory_bytes, cpu_memory_bytes)
    return _check(recipe, hw, recipe_shape(recipe, lora_rank, lora_targets))


def _check(recipe: Recipe, hw: Hardware, shape: ModelShape) -> list[Problem]:
    z, mbs = recipe.zero, recipe.train.micro_batch_size
    own = (z.stage, z.offload_optimizer, z.offload_params)
    smaller = [m for m in micro_candidates(recipe, hw.world_size) if m < mbs]
    mine = fit(shape, recipe, *own, hw, smaller + [mbs])
    if mine.micro_batch == mbs:
        return []
    b = estimate(shape, setup_for(recipe, *own, hw, mbs, mine.breakdown.setup.knobs))
    need = (f"needs {gib(b.gpu_total)} GiB per GPU (parameters {gib(b.gpu('params'))}, gradients "
            f"{gib(b.gpu('grads', 'step'))}, optimizer {gib(b.gpu('optim'))}, activations "
            f"{gib(b.gpu('activations'))}) of {gib(hw.gpu_memory)} GiB on {hw.world_size} GPUs")
    if hw.cpu_memory is not None and b.cpu_per_node > hw.cpu_memory:
        need += f", and {gib(b.cpu_per_node)} GiB CPU memory per node"
    skip = "or set train.skip_memory_check=true to launch anyway"
    if mine.fits:  # the smallest change: a smaller micro batch
        return [Problem("train.micro_batch_size", f"will not fit: micro batch {mbs} {need}",
                        f"set train.micro_batch_size={mine.micro_batch} "
                        f"({gib(mine.breakdown.gpu_total)} GiB per GPU), {skip}")]
    o = plan(recipe, hw, nvme=bool(z.nvme_path), shape=shape).recommended
    if o is None:
        return [Problem("zero.stage", f"nothing fits: the recipe {need}",
                        "use more GPUs, LoRA, a shorter data.max_seq_len or "
                        f"model.gradient_checkpointing=true, {skip}")]
    current = Option(*own, mbs, b, expert_parallel=recipe.moe.expert_parallel,
                     moe=bool(shape.experts)).overrides
    changes = " ".join(c for c in o.overrides if c not in current)
    return [Problem("zero.stage", f"will not fit: ZeRO-{z.stage} (offload {z.offload_optimizer}) "
                    f"with micro batch {mbs} {need}",
                    f"set {changes} ({option_name(o)}: {gib(o.breakdown.gpu_total)} GiB per GPU), "
                    f"{skip}")]
