"""A frozen copy of the initial model, partitioned like the policy: the reference of GRPO's KL
term (β > 0) under full fine-tuning, where there is no adapter to turn off.

Under ZeRO-3 it is a second DeepSpeed engine without an optimizer (DeepSpeed's ZeRO-3 inference:
each rank holds 1/N of the copy, gathered layer by layer for its forward, as the policy's; TRL's
`prepare_deepspeed` does the same); under ZeRO 0–2, whose ranks hold the whole policy anyway, a
plain frozen copy on each rank's device. It is built exactly as the policy was (dpkit.model
`build_model`: the same seed for an inline config, the same files for a pretrained model, the
same compute kernels), so its weights are the policy's before step 1 — the KL of step 1 is 0 —
and it is rebuilt the same way on resume rather than saved. The planner counts its memory
(dpkit/plan/memory.py, `Setup.reference_copy`).
"""

from __future__ import annotations

from dpkit import kernels
from dpkit.methods import spec as method_spec
from dpkit.model import build_model
from dpkit.objectives.head import LossHead


def inference_config(ds_config: dict) -> dict:
    """The run's DeepSpeed config for an engine that only runs forwards: no optimizer, no
    scheduler, no optimizer offload; the same ZeRO stage, parameter offload, precision and
    batch sizes (DeepSpeed checks those)."""
    config = {k: v for k, v in ds_config.items()
              if k not in ("optimizer", "scheduler", "checkpoint")}
    zero = dict(config.get("zero_optimization", {}))
    zero.pop("offload_optimizer", None)
    config["zero_optimization"] = zero
    return config


def frozen_copy(run):
    """(the reference to forward through — a DeepSpeed engine or a module —, its loss head, a
    line saying what it is) for the Run `run`, built on every rank."""
    r, env = run.recipe, run.env
    model = build_model(r.model, r.train.seed, run.layout.stage, run.ds_config,
                        head=method_spec(r).head, pad_token_id=run.tokenizer.pad_token_id)
    kernels.apply(model, r, env, lambda _line: None)  # the policy's numerics (said once)
    model.requires_grad_(False)
    head, _ = LossHead.for_run(r, model, model.config,
                               liger=kernels.liger_active(r, env.device))
    if run.layout.partitions_parameters:
        import deepspeed

        engine, *_ = deepspeed.initialize(model=model, config=inference_config(run.ds_config))
        engine.eval()
        return engine, head, ("reference: a frozen copy of the initial model, partitioned over "
                              f"the {env.world_size} ranks (a ZeRO-3 engine without optimizer)")
    model.to(env.device).eval()
    return model, head, (f"reference: a frozen copy of the initial model on every rank "
                         f"(ZeRO-{run.layout.stage} keeps the whole model per rank)")
