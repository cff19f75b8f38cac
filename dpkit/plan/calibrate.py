"""`dpkit plan --calibrate RUN_DIR`: measure the time model's free numbers on a real run.

A run directory holds what is needed: recipe.yaml (the model and batch), ds_config.json (bucket
sizes), summary.json (hardware, world size, ZeRO stage, micro batch, accumulation) and
metrics.jsonl (per step: step_time_s, forward_backward_s, optimizer_s, flops, tokens). Fitted:

- `efficiency`: the model FLOPs each rank ran (the `flops` field, dpkit.metrics.model_flops over
  the real rows) over the forward/backward time less the communication the model says it did not
  hide ((1 − overlap) × communication: right while compute outlasts the hidden part, as in any
  run worth calibrating on), over the device's peak. On a CPU the peak is nominal, so only the
  ratio means anything. The FLOP fill (FLOPs done / FLOPs of full rows) comes from the same
  counts, so predicting the run itself gives its step time back.
- `optimizer_s_per_param`: optimizer_s over the parameters this rank's optimizer updates.
- `overhead_s`: step time not in forward/backward or the optimizer (data, collation, logging).

Medians over the steps after WARMUP_STEPS, so a slow first step or a load spike does not count.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace
from pathlib import Path

from dpkit.errors import RecipeError
from dpkit.plan.recommend import DTYPE_BYTES, knobs, objective_load, recipe_shape
from dpkit.plan.time import DEVICES, LINKS, Cluster, Device, Job, comm_time, flops_per_rank
from dpkit.run_files import DS_CONFIG, METRICS, RECIPE, SUMMARY, read_json, read_metrics

WARMUP_STEPS = 2
"""Logged steps skipped: the first steps build buckets, warm allocators and caches."""


@dataclass(frozen=True)
class Calibration:
    cluster: Cluster  # the input cluster with efficiency, optimizer rate and overhead fitted
    job: Job  # the run as the time model sees it
    global_batch: int  # rows (packed: sequences) per step
    step_s: float  # measured medians
    forward_backward_s: float
    optimizer_s: float
    tokens: float
    steps_used: int
    hardware: str


def device_for(hardware: str) -> Device:
    """The DEVICES entry of a summary.json `hardware` string ("8 × NVIDIA H100 80GB HBM3", "1 CPU
    ranks on x86_64 (2 cores)")."""
    h = hardware.upper()
    if "CPU" in h:
        return DEVICES["cpu-core"]
    order = [("H200", "H200"), ("H100 PCIE", "H100-PCIE"), ("H100", "H100"), ("A100", None),
             ("L40S", "L40S"), ("A10G", "A10G"), ("L4", "L4"), ("V100", "V100")]
    for needle, key in order:
        if needle in h:
            return DEVICES[key or ("A100-40" if "40GB" in h else "A100-80")]
    raise RecipeError.one(SUMMARY, f"hardware {hardware!r} is not a known device",
                          f"pass --gpu (one of {', '.join(DEVICES)})")


def read_run(run_dir: Path) -> tuple[dict, list[dict]]:
    """summary.json and the metrics.jsonl records that timed a training step."""
    files = [run_dir / SUMMARY, run_dir / METRICS, run_dir / RECIPE, run_dir / DS_CONFIG]
    for f in files:
        if not f.is_file():
            raise RecipeError.one(str(f), "is missing", "pass the directory of a finished "
                                  "`dpkit train` run (its output.dir)")
    summary = _json(files[0])
    records = [r for r in read_metrics(run_dir)[0]  # a line torn by a crash is skipped
               if r.get("step_time_s") and r.get("flops")]
    if len(records) <= WARMUP_STEPS:
        raise RecipeError.one(str(files[1]), f"has {len(records)} timed steps, calibration "
                              f"needs more than {WARMUP_STEPS}",
                              "train longer with output.log_steps=1")
    return summary, records


def _json(path: Path) -> dict:
    if (data := read_json(path)) is None:
        raise RecipeError.one(str(path), "is not a readable JSON object", "pass the directory of "
                              "a finished `dpkit train` run (its output.dir)")
    return data


def job_of_run(run_dir: Path, summary: dict, shape=None) -> Job:
    from dpkit.recipe import load_recipe

    recipe = load_recipe(run_dir / RECIPE)
    shape = shape or recipe_shape(recipe)
    ds = _json(run_dir / DS_CONFIG)
    z = recipe.zero
    world = int(summary["world_size"])
    return Job(shape, int(summary["zero_stage"]), z.offload_optimizer, z.offload_params, world,
               world, int(summary["micro_batch_size"]), int(summary["grad_accum"]),
               recipe.data.max_seq_len, DTYPE_BYTES[summary["dtype"]],
               knobs(ds).reduce_bucket_size, **objective_load(recipe))


def fit(job: Job, global_batch: int, records: list[dict], cluster: Cluster,
        hardware: str = "") -> Calibration:
    """Fit efficiency, optimizer rate and overhead of `cluster` to the run's timed steps."""
    used = records[WARMUP_STEPS:]
    med = {k: statistics.median(r[k] for r in used)
           for k in ("step_time_s", "forward_backward_s", "optimizer_s", "tokens")}
    # the logged FLOPs count forward and backward only; a reference forward is in the time too
    with_reference = flops_per_rank(job) / flops_per_rank(replace(job, reference_forwards=0))
    flops = statistics.median(r["flops"] for r in used) / job.world_size * with_reference
    rows = global_batch * job.rows_per_item
    job = replace(job, fill=med["tokens"] / (rows * job.seq_len),
                  flop_fill=flops / flops_per_rank(replace(job, fill=1.0)))
    exposed = (1 - cluster.overlap) * comm_time(job, cluster)  # not hidden: in the measured time
    peak = cluster.device.peak(job.dtype_bytes)
    eff = statistics.median(r["flops"] * with_reference / job.world_size
                            / max(r["forward_backward_s"] - exposed, 1e-9) / peak for r in used)
    shard = job.shape.trainable / (job.world_size if job.stage >= 1 else 1)
    fitted = replace(cluster, efficiency=eff, optimizer_s_per_param=med["optimizer_s"] / shard,
                     overhead_s=max(0.0, med["step_time_s"] - med["forward_backward_s"]
                                    - med["optimizer_s"]))
    return Calibration(fitted, job, global_batch, med["step_time_s"], med["forward_backward_s"],
                       med["optimizer_s"], med["tokens"], len(used), hardware)


def calibrate(run_dir: Path, cluster: Cluster | None = None, shape=None) -> Calibration:
    """Read a run directory and fit. `cluster`: links and overlap to assume (default: the run's
    device with NVLink inside the node; gloo over loopback for CPU runs)."""
    summary, records = read_run(Path(run_dir))
    device = device_for(summary.get("hardware", ""))
    if cluster is None:
        cluster = Cluster(device=device)
        if device.name == "cpu-core":
            cluster = replace(cluster, intra=LINKS["gloo-loopback"], inter=LINKS["eth25"])
    else:
        cluster = replace(cluster, device=device)
    return fit(job_of_run(Path(run_dir), summary, shape), int(summary["global_batch_size"]),
               records, cluster, summary.get("hardware", ""))


def describe(c: Calibration) -> str:
    k, j = c.cluster, c.job
    return (f"calibrated on {c.hardware or 'the run'}: ZeRO-{j.stage}, world {j.world_size}, micro "
            f"{j.micro_batch} × accumulation {j.grad_accum}, {c.tokens:,.0f} tokens per step "
            f"({j.fill:.0%} of micro × seq_len); medians of {c.steps_used} steps: step "
            f"{c.step_s:.3f} s, forward/backward {c.forward_backward_s:.3f} s, optimizer "
            f"{c.optimizer_s:.3f} s\n  fitted: efficiency {k.efficiency:.1%} of "
            f"{k.device.name}'s peak {k.device.peak(j.dtype_bytes) / 1e12:.3g} TFLOP/s, optimizer "
            f"{k.optimizer_s_per_param * 1e9:.2f} ns per parameter, overhead {k.overhead_s:.3f} s "
            f"per step")
