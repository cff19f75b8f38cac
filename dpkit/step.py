"""One optimizer step, and eval: the hot path, kept apart from run orchestration (run.py).

The loss of a step is the objective's loss summed over the whole global batch divided by its
number of units (target tokens for supervised fine-tuning, pairs for preference objectives) —
counted over all ranks and accumulation micro-batches before the backward passes. So the step is
the same whatever the world size and accumulation split: exactly what one process would compute
on the same rows.

A mixture-of-experts model's router loss (dpkit/moe.py RouterAuxLoss) is not a sum over units:
the model computes it per forward, as a mean over that forward's tokens, so it is not linear in
the batch. It is taken per micro-batch and averaged over the micro-batches of the global batch
that hold rows (all ranks), weighted by its coefficient — equal to one process whenever the
micro-batches are the same rows, which is how the equivalence runs compare.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from dpkit import distributed
from dpkit.data.load import IGNORE
from dpkit.data.packing import row_lengths
from dpkit.objectives import Objective
from dpkit.objectives.sft import SFT


@dataclass
class StepResult:
    loss: float               # global: sum of unit losses / units
    targets: int              # units the loss was computed on (target tokens, pairs), all ranks
    tokens: int               # non-padding input tokens, all ranks
    samples: int              # rows (not packed sequences), all ranks
    row_lengths: list[int]    # this rank's row lengths (attention FLOPs grow with their squares)
    applied: bool             # False when DeepSpeed skipped the update (non-finite gradients)
    times: dict[str, float] = field(default_factory=dict)  # seconds per phase
    metrics: dict[str, float] = field(default_factory=dict)  # the objective's, per unit
    grad_norm: float | None = None  # measured here where DeepSpeed keeps none (plain_grad_norm)
    stop: bool = False        # some rank was asked to stop (SIGTERM) before this step ended
    aux_loss: float | None = None  # router loss, mean over the step's micro-batches with rows
    counts: list[int] = field(default_factory=list)  # `counts` summed over ranks


def plain_grad_norm(engine) -> float | None:
    """The global gradient norm where DeepSpeed does not record one: ZeRO-0 without bf16/fp16
    steps torch's optimizer on the reduced gradients (whole on every rank) and clips without
    keeping the norm. Read after the last backward of a step, before the update. None elsewhere
    (the engine's get_global_grad_norm has it)."""
    if engine.zero_optimization_stage() != 0 or engine.bfloat16_enabled() or engine.fp16_enabled():
        return None
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float())
                                                       for g in grads]))) if grads else 0.0


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _has_targets(batch: dict) -> bool:
    if "real" in batch:  # a sequence-parallel slice: whether its whole micro-batch has targets
        return batch["real"]
    return bool((batch["labels"] != IGNORE).any())


def train_step(engine, micro_batches: list[dict], env, grad_accum: int,
               poison_loss: bool = False, objective: Objective | None = None,
               gradient_divisor: int | None = None, stop_vote: bool = False,
               aux=None, counts: list[int] = ()) -> StepResult:
    """Forward/backward every micro-batch of this rank, then DeepSpeed's optimizer step.

    `micro_batches` are collated CPU batches: everything counted is counted there, so the GPU
    queue is never drained to read a number back. `poison_loss` turns this rank's loss into NaN
    (fault injection for the NaN tests). `gradient_divisor`: the number of ranks DeepSpeed divides
    the summed gradients by (default the world size; under sequence parallelism see
    dpkit.parallel.sequence.gradient_divisor). `stop_vote`: this rank got SIGTERM; summed with
    the loss after the update, so every rank learns whether any was asked to stop, at the same
    step, without a collective of its own. `aux`: the run's dpkit.moe.RouterAuxLoss, or None.
    `counts`: numbers of this rank's rows (tokens and rows per data source) summed over the ranks
    in the collective that counts the step's units.
    """
    objective = objective or SFT()
    t0 = time.perf_counter()
    micro_batches = objective.rollout(engine, micro_batches, env)  # online methods generate
    real = [b for b in micro_batches if _has_targets(b)]
    lengths = [n for b in real for n in row_lengths(b)]  # rows, also inside packed sequences
    local = [sum(objective.count(b) for b in micro_batches),
             sum(int(b["attention_mask"].sum()) for b in real), len(lengths), len(real)]
    units, tokens, samples, filled, *summed = distributed.all_reduce_sum([*local, *counts],
                                                                         env.device)
    # engine.backward divides by the accumulation steps and the gradient reduction divides by
    # the ranks; multiplying by both turns the sum into "sum over the global batch / units".
    scale = grad_accum * (gradient_divisor or env.world_size) / max(units, 1)
    # The router loss: the same undoing of both divisions, over the micro-batches with rows
    # (`filled`, all ranks) — an empty micro-batch (an uneven epoch tail) weighs nothing, as it
    # does not exist in one process.
    aux_scale = grad_accum * (gradient_divisor or env.world_size) / max(filled, 1)
    micro_batches = [to_device(b, env.device) for b in micro_batches]
    objective.prepare(engine, micro_batches, env)  # global-batch quantities, before any backward
    if aux is not None:
        aux.take(env.device)  # a router loss belongs to a micro-batch's own forward, not these
    t1 = time.perf_counter()
    zero = torch.zeros((), device=env.device, dtype=torch.float64)
    step_loss, optimizer_s, grad_norm = zero.clone(), 0.0, None
    sums = {name: zero.clone() for name in objective.metric_names}
    aux_sum = zero.clone()
    for i, micro in enumerate(micro_batches):
        out = objective.loss(engine, micro)
        loss = out.loss * float("nan") if poison_loss else out.loss
        total = loss * scale
        if aux is not None:
            router = aux.take(env.device) * float(_has_targets(micro))
            total = total + router * (aux.coef * aux_scale)
            aux_sum += router.detach()
        engine.backward(total)
        if i == len(micro_batches) - 1:  # the boundary: gradient reduction + optimizer update
            grad_norm = plain_grad_norm(engine)
            _sync(env.device)
            t_opt = time.perf_counter()
            engine.step()
            _sync(env.device)
            optimizer_s = time.perf_counter() - t_opt
        else:
            engine.step()
        step_loss += loss.detach()  # stays on the device: no sync between micro-batches
        for name in objective.metric_names:
            sums[name] += out.metrics[name].detach()
    reduced = distributed.all_reduce_sum([float(step_loss), float(stop_vote), float(aux_sum),
                                          *(float(sums[n]) for n in sums)], env.device)
    t2 = time.perf_counter()
    applied = engine.was_step_applied() if hasattr(engine, "was_step_applied") else True
    times = {"data_s": t1 - t0, "forward_backward_s": t2 - t1 - optimizer_s,
             "optimizer_s": optimizer_s, "step_time_s": t2 - t0}
    metrics = objective.per_unit({n: v / max(units, 1)
                                  for n, v in zip(objective.metric_names, reduced[3:])})
    metrics.update(objective.step_metrics())
    return StepResult(reduced[0] / max(units, 1), int(units), int(tokens), int(samples),
                      lengths, applied, times, metrics, grad_norm,
                      stop=distributed.StopFlag.agreed(reduced[1]),
                      aux_loss=reduced[2] / max(filled, 1) if aux is not None else None,
                      counts=[int(c) for c in summed])


def evaluate(engine, batches, env, objective: Objective | None = None
             ) -> tuple[float, int, dict[str, float]]:
    """Unit-weighted eval loss (and the objective's metrics) over all ranks' eval batches.

    `batches` are this rank's collated CPU eval batches; every rank passes the same number."""
    objective = objective or SFT()
    engine.eval()
    total = torch.zeros((), device=env.device, dtype=torch.float64)
    sums = {name: total.clone() for name in objective.metric_names}
    count = 0
    with torch.no_grad():
        batches = objective.rollout(engine, batches, env)
        objective.prepare(engine, [to_device(b, env.device) for b in batches], env)
        for batch in batches:
            count += objective.count(batch)  # on the CPU copy: no device readback per batch
            out = objective.loss(engine, to_device(batch, env.device))
            total += out.loss
            for name in objective.metric_names:
                sums[name] += out.metrics[name]
    engine.train()
    reduced = distributed.all_reduce_sum([float(total), count, *(float(v) for v in sums.values())],
                                         env.device)
    count = int(reduced[1])
    metrics = objective.per_unit({n: v / max(count, 1)
                                  for n, v in zip(objective.metric_names, reduced[2:])})
    metrics.update(objective.step_metrics())
    return reduced[0] / max(count, 1), count, metrics
