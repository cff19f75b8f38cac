"""Count the elements a real DeepSpeed engine holds per rank, for test_plan_measured.py.

Run under `python -m torch.distributed.run --standalone --nproc_per_node 2 plan_measure.py
SCENARIOS.json OUT.json`. Each scenario (a model config, a dtype, a DeepSpeed config, optionally
LoRA) gets its own engine, in sequence in this one launch; each does one forward, backward and
step on random tokens. Counted per rank, by tensor storage (a tensor viewed twice counts once):
  params.*   parameters the module holds (ZeRO-3: its `ds_tensor` partitions, the persistent
             parameters kept whole, and the most elements gathered at once during forward/backward)
  grads.*    gradients, sampled after every gradient accumulation and at the end of backward:
             the partition buffer ZeRO-2/3 reduce into, the largest total of the other `.grad`s
             (awaiting reduction: "in flight"), and the largest total of both ("peak")
  comm       DeepSpeed's reduction bucket buffers
  optim.*    the optimizer's own fp32 copy of the weights (when not the module's tensor) and
             Adam's exp_avg + exp_avg_sq
  step.*     fp32 gradients handed to the torch optimizer at step time (when a new tensor)
"""

import json
import os
import sys

import deepspeed
import torch
import torch.distributed as dist
from transformers import AutoConfig, AutoModelForCausalLM

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def storages(tensors):
    """{storage pointer: elements} for the given tensors (views of one storage count once)."""
    out = {}
    for t in tensors:
        if t is not None and t.numel():
            s = t.untyped_storage()
            out[s.data_ptr()] = s.nbytes() // t.element_size()
    return out


def buffers(opt):
    """Storages of DeepSpeed's bucket buffers and of its gradient-partition buffer."""
    comm = []
    for bucket in getattr(opt, "ipg_buckets", {}).values():
        buf = bucket.buffer
        comm += buf if isinstance(buf, list) else [buf]
    part = [getattr(opt, name, None) for name in ("grads_in_partition",
                                                  "grad_partitions_flat_buffer")]
    return storages(comm), storages([p for p in part if isinstance(p, torch.Tensor)])


def measure(scn, rank):
    torch.manual_seed(0)
    config = AutoConfig.for_model(**scn["model_config"])
    model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[scn["dtype"]])
    if scn.get("lora_rank"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=scn["lora_rank"], target_modules="all-linear"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    engine, zopt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=scn["ds_config"])
    params = list(engine.module.parameters())
    stage3 = scn["ds_config"]["zero_optimization"]["stage"] == 3
    got = {"grads.peak": 0, "grads.in_flight": 0, "grads.partition": 0, "comm": 0,
           "params.gathered": 0}

    def sample_params(*_):
        if stage3:
            live = sum(p.numel() for p in params if p.data.numel() and not p.ds_persist)
            got["params.gathered"] = max(got["params.gathered"], live)

    def sample_grads(*_):
        comm, part = buffers(zopt)
        grads = storages([p.grad for p in params])
        other = sum(v for k, v in grads.items() if k not in comm and k not in part)
        got["comm"] = max(got["comm"], sum(comm.values()))
        averaged = [t for ts in getattr(zopt, "averaged_gradients", {}).values() if ts
                    for t in ts]  # the partition's gradients, when not in one flat buffer
        held = max(sum(part.values()), sum(t.numel() for t in averaged))
        got["grads.partition"] = max(got["grads.partition"], held)
        got["grads.in_flight"] = max(got["grads.in_flight"], other)
        got["grads.peak"] = max(got["grads.peak"], other + held)

    for m in engine.module.modules():
        m.register_forward_pre_hook(sample_params)
        m.register_forward_hook(sample_params)
        m.register_full_backward_hook(sample_params)
    for p in params:
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(sample_grads)

    basic = engine.basic_optimizer
    own = set(storages(params)) | set(storages([getattr(p, "ds_tensor", None) for p in params]))
    inner_step = basic.step

    def step(*args, **kwargs):
        grads = [p.grad for g in basic.param_groups for p in g["params"]]
        held = set(storages([p.grad for p in params]))
        got["step.fp32_grads"] = sum(v for k, v in storages(grads).items() if k not in held)
        masters = [p for g in basic.param_groups for p in g["params"]]
        got["optim.master"] = sum(v for k, v in storages(masters).items() if k not in own)
        return inner_step(*args, **kwargs)

    basic.step = step
    x = torch.randint(0, config.vocab_size, (scn["micro_batch"], scn["seq_len"]),
                      generator=torch.Generator().manual_seed(rank))
    loss = engine(input_ids=x, labels=x).loss
    engine.backward(loss)
    sample_grads()
    engine.step()

    if stage3:
        got["params.partition"] = sum(p.ds_tensor.numel() for p in params)
        got["params.persistent"] = sum(p.numel() for p in params if p.ds_persist)
    else:
        got["params.weights"] = sum(storages(params).values())
    got["optim.adam"] = sum(v.numel() for s in basic.state.values() for k, v in s.items()
                            if k in ("exp_avg", "exp_avg_sq"))
    got["loss"] = float(loss)
    engine.destroy()
    return got


def main():
    scenarios = json.loads(open(sys.argv[1]).read())
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    results = []
    for scn in scenarios:
        mine = measure(scn, rank)
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
        results.append({"name": scn["name"], "ranks": every})
    if rank == 0:
        with open(sys.argv[2], "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
