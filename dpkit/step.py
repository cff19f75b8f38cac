"""One optimizer step, and eval: the hot path, kept apart from run orchestration (train.py).

The loss of a step is the sum of per-token losses over the whole global batch divided by its
number of target tokens — counted over all ranks and accumulation micro-batches before the
backward passes. So the step is the same whatever the world size and accumulation split: exactly
what one process would compute on the same rows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from dpkit import data as D
from dpkit import distributed
from dpkit.data.packing import row_lengths


@dataclass
class StepResult:
    loss: float               # global: sum of token losses / target tokens
    targets: int              # tokens the loss was computed on, all ranks
    tokens: int               # non-padding input tokens, all ranks
    samples: int              # rows (not packed sequences), all ranks
    row_lengths: list[int]    # this rank's row lengths (attention FLOPs grow with their squares)
    applied: bool             # False when DeepSpeed skipped the update (non-finite gradients)
    times: dict[str, float] = field(default_factory=dict)  # seconds per phase


def loss_sum(engine, batch: dict) -> torch.Tensor:
    """Sum (not mean) of next-token losses over the batch's target tokens, in fp32."""
    if "position_ids" in batch:  # packed: rows from the restarting position ids, no mask
        # The boundaries also go as flash-attention keywords: dpkit's per-row attention and
        # flash_attention_2 use them directly; sdpa/eager build their mask from the positions.
        inputs = {"position_ids": batch["position_ids"], "attention_mask": None,
                  "cu_seq_lens_q": batch["cu_seq_lens"], "cu_seq_lens_k": batch["cu_seq_lens"],
                  "max_length_q": batch["max_length"], "max_length_k": batch["max_length"]}
    else:
        inputs = {"attention_mask": batch["attention_mask"]}
    # use_cache=False is load-bearing for packing: with the cache on, transformers 5 ignores
    # the restarting positions and rows attend to each other (see dpkit/packing.py).
    logits = engine(input_ids=batch["input_ids"], use_cache=False, **inputs).logits
    logits = logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=D.IGNORE, reduction="sum")


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(engine, micro_batches: list[dict], env, grad_accum: int,
               poison_loss: bool = False) -> StepResult:
    """Forward/backward every micro-batch of this rank, then DeepSpeed's optimizer step.

    `micro_batches` are collated CPU batches: everything counted is counted there, so the GPU
    queue is never drained to read a number back. `poison_loss` turns this rank's loss into NaN
    (fault injection for the NaN tests).
    """
    t0 = time.perf_counter()
    real = [b for b in micro_batches if (b["labels"] != D.IGNORE).any()]
    lengths = [n for b in real for n in row_lengths(b)]  # rows, also inside packed sequences
    local = [sum(D.target_tokens(b) for b in micro_batches),
             sum(int(b["attention_mask"].sum()) for b in real), len(lengths)]
    targets, tokens, samples = distributed.all_reduce_sum(local, env.device)
    # engine.backward divides by the accumulation steps and the gradient all-reduce averages
    # over ranks; multiplying by both turns the sum into "sum over the global batch / targets".
    scale = grad_accum * env.world_size / max(targets, 1)
    micro_batches = [to_device(b, env.device) for b in micro_batches]
    t1 = time.perf_counter()
    step_loss, optimizer_s = torch.zeros((), device=env.device, dtype=torch.float64), 0.0
    for i, micro in enumerate(micro_batches):
        loss = loss_sum(engine, micro)
        if poison_loss:
            loss = loss * float("nan")
        engine.backward(loss * scale)
        if i == len(micro_batches) - 1:  # the boundary: gradient reduction + optimizer update
            _sync(env.device)
            t_opt = time.perf_counter()
            engine.step()
            _sync(env.device)
            optimizer_s = time.perf_counter() - t_opt
        else:
            engine.step()
        step_loss += loss.detach()  # stays on the device: no sync between micro-batches
    (loss_total,) = distributed.all_reduce_sum([float(step_loss)], env.device)
    t2 = time.perf_counter()
    applied = engine.was_step_applied() if hasattr(engine, "was_step_applied") else True
    times = {"data_s": t1 - t0, "forward_backward_s": t2 - t1 - optimizer_s,
             "optimizer_s": optimizer_s, "step_time_s": t2 - t0}
    return StepResult(loss_total / max(targets, 1), int(targets), int(tokens), int(samples),
                      lengths, applied, times)


def evaluate(engine, examples, env, micro: int, pad_id: int) -> tuple[float, int]:
    """Token-weighted eval loss over all ranks' shards of the eval set."""
    engine.eval()
    total, count = torch.zeros((), device=env.device, dtype=torch.float64), 0
    with torch.no_grad():
        for idx in D.eval_micro_batches(len(examples), env.rank, env.world_size, micro):
            batch = D.collate([examples[i] for i in idx], pad_id)
            count += D.target_tokens(batch)  # on the CPU copy: no device readback per batch
            total += loss_sum(engine, to_device(batch, env.device))
    engine.train()
    total, count = distributed.all_reduce_sum([float(total), count], env.device)
    return total / max(count, 1), int(count)
