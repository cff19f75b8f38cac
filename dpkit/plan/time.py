"""The step-time model behind `dpkit plan`: how long a step takes, and what the whole run costs.

A step is compute + the optimizer update + the communication compute does not hide + a fixed
overhead. Every term is arithmetic over named, documented assumptions (docs/plan.md, "How long"):

- **Compute**: model FLOPs — the same count as the MFU metric (`dpkit.metrics.model_flops` over
  `matmul_parameters`) — at `efficiency` × the device's dense peak (`dpkit.metrics.PEAK_FLOPS`).
  The efficiency is an assumption (DEFAULT_EFFICIENCY) until `--calibrate` measures it.
- **Communication** per ZeRO stage, bytes each rank sends (Rajbhandari et al. 2020, §7): stages
  0–1 all-reduce the gradients once per step (2Ψ), stage 2 reduce-scatters them every micro-batch
  and all-gathers the updated weights once (2Ψ at accumulation 1), stage 3 all-gathers the weights
  in forward and again in backward and reduce-scatters the gradients, every micro-batch (3Ψ). Each
  collective is a ring: (N−1)/N of the tensor per pass, on the slowest link the ring crosses, plus
  a latency per ring step (α–β model; steps counted hierarchically: inside, then across nodes).
- **Overlap**: the fraction of communication hidden behind compute is a stated assumption
  (`Cluster.overlap`), never inferred.
- **Offload**: gradients down and weights up over PCIe each step, Adam on the host's cores;
  parameters on CPU also cross PCIe on every gather.
- **Mixture of experts**: compute from the active parameters (metrics.matmul_parameters counts
  routed experts at top-k / experts). With expert parallelism (`moe.expert_parallel` = ep) a rank
  holds 1/ep of the experts, so it reduces and gathers that much less, and every MoE layer sends
  each token's hidden state to its k experts' ranks and back, forward and backward: 4 all-to-alls
  of tokens·k·hidden per layer, (ep−1)/ep of it leaving the rank. Nothing computes while they
  run (the experts wait for their tokens), so none of it is counted as hidden.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from dpkit.metrics import PEAK_FLOPS, forward_flops, model_flops
from dpkit.plan.memory import ModelShape, Rollout, kv_cache_bytes

DEFAULT_EFFICIENCY = 0.40
"""Assumed fraction of the dense peak a training step's model FLOPs reach (MFU) when nothing is
calibrated: torchtitan reports 33–39% for Llama 3.1 8B with FSDP on H100s (docs/plan.md)."""
DEFAULT_OVERLAP = 0.5
"""Assumed fraction of communication hidden behind compute (DeepSpeed's overlap_comm buckets
overlap the backward; the boundary all-reduce/all-gather and stage 3's first gathers do not)."""
ADAM_BYTES = 32
"""HBM bytes an Adam update moves per parameter: fp32 master, m and v read and written (24), the
fp32 gradient read (4), the bf16/fp16 weight written (2) and its gradient read (2)."""
CPU_ADAM_PARAMS_PER_S = 1.0e9
"""DeepSpeedCPUAdam updates per second per node (all cores, AVX-512): an assumption, not a
measurement; Cluster.cpu_adam_rate changes it."""


@dataclass(frozen=True)
class Device:
    name: str
    peak_flops: float  # dense bf16/fp16 tensor peak (tf32 for fp32 training), FLOP/s
    memory_bandwidth: float  # bytes/s (HBM)
    memory_gib: float
    peak_fp32_flops: float | None = None  # TF32 tensor peak: what fp32 training runs at

    def peak(self, dtype_bytes: int) -> float:
        return (self.peak_fp32_flops or self.peak_flops) if dtype_bytes == 4 else self.peak_flops


def _gpu(key: str, bandwidth: float, gib: float) -> Device:
    return Device(key, PEAK_FLOPS[key]["bf16"], bandwidth, gib, PEAK_FLOPS[key]["tf32"])


DEVICES: dict[str, Device] = {
    "H200": _gpu("H200", 4.8e12, 141),
    "H100": _gpu("H100", 3.35e12, 80),
    "H100-PCIE": _gpu("H100 PCIe", 2.0e12, 80),
    "A100-80": _gpu("A100", 2.04e12, 80),
    "A100-40": _gpu("A100", 1.56e12, 40),
    "L40S": _gpu("L40S", 0.864e12, 48),
    "A10G": _gpu("A10G", 0.6e12, 24),
    "L4": _gpu("L4", 0.3e12, 24),
    "V100": _gpu("V100", 0.9e12, 32),
    # One CPU core, fp32: a nominal peak (2 AVX-512 FMA units × 16 lanes × 2 × 3 GHz); only the
    # calibrated efficiency against it means anything.
    "cpu-core": Device("cpu-core", 192e9, 20e9, 0),
}


@dataclass(frozen=True)
class Link:
    name: str
    bandwidth: float  # bytes/s one way, per GPU (per NIC for inter-node links)
    latency: float  # seconds per ring step


LINKS: dict[str, Link] = {
    "nvlink4": Link("NVLink 4 (H100/H200 SXM, NVSwitch)", 450e9, 3e-6),
    "nvlink3": Link("NVLink 3 (A100 SXM, NVSwitch)", 300e9, 3e-6),
    "nvlink2": Link("NVLink 2 (V100 SXM, DGX-2 NVSwitch)", 150e9, 5e-6),
    "pcie5": Link("PCIe 5.0 x16", 50e9, 5e-6),
    "pcie4": Link("PCIe 4.0 x16", 25e9, 5e-6),
    "pcie3": Link("PCIe 3.0 x16", 12e9, 5e-6),
    "ib400": Link("InfiniBand NDR 400 Gb/s", 50e9, 5e-6),
    "ib200": Link("InfiniBand HDR 200 Gb/s", 25e9, 5e-6),
    "ib100": Link("InfiniBand EDR 100 Gb/s", 12.5e9, 5e-6),
    "eth100": Link("Ethernet 100 Gb/s (RoCE)", 12.5e9, 15e-6),
    "eth25": Link("Ethernet 25 Gb/s (TCP)", 3.125e9, 50e-6),
    # gloo between processes of one CPU machine (loopback TCP), measured on the 2-core dev VM
    # (all_reduce of 4 B to 16 MB between 2 ranks, as scripts/plan_time_check.py does on every
    # run): ~0.8 GB/s and ~80 µs per ring step when the VM is quiet, down to 0.3 GB/s and ~0.9 ms
    # under load. Other machines: measure, then pass --intra-node-gbps.
    "gloo-loopback": Link("gloo over loopback (one CPU machine)", 0.8e9, 80e-6),
}


@dataclass(frozen=True)
class Cluster:
    """Hardware and assumptions of the time model. Bandwidths per GPU, one way."""

    device: Device = DEVICES["H100"]
    intra: Link = LINKS["nvlink4"]
    inter: Link = LINKS["ib400"]
    nics_per_node: int | None = None  # None: one per GPU (rail-optimized clusters)
    pcie: Link = LINKS["pcie5"]
    efficiency: float = DEFAULT_EFFICIENCY
    overlap: float = DEFAULT_OVERLAP
    optimizer_s_per_param: float | None = None  # calibrated; None: Adam at HBM bandwidth
    overhead_s: float = 0.0  # per step: data, logging, launch gaps (calibrated)
    cpu_adam_rate: float = CPU_ADAM_PARAMS_PER_S
    nvme_bandwidth: float = 6e9  # bytes/s per node, read or write

    def ring(self, world: int, gpus_per_node: int) -> tuple[float, float]:
        """(bandwidth, latency of one pass) of a collective over `world` ranks.

        Bandwidth: each rank sends its 2(N−1)/N (or (N−1)/N) share over its ring link. NCCL runs
        one ring per NIC, each ring crossing a node boundary once, so the node's NICs together
        carry what leaves the node: min(intra-node link, NICs × NIC bandwidth) per rank (the
        "bus bandwidth" nccl-tests reports across nodes). Latency: hierarchical, g−1 steps inside
        a node and nodes−1 across, per pass.
        """
        g = min(world, gpus_per_node)
        nodes = -(-world // gpus_per_node)
        latency = (g - 1) * self.intra.latency + (nodes - 1) * self.inter.latency
        if nodes == 1:
            return self.intra.bandwidth, latency
        nics = self.nics_per_node or gpus_per_node
        return min(self.intra.bandwidth, self.inter.bandwidth * nics), latency


@dataclass(frozen=True)
class Job:
    """One option to time: a model, a ZeRO choice and its batch."""

    shape: ModelShape
    stage: int
    offload_optimizer: str  # none | cpu | nvme
    offload_params: str
    world_size: int
    gpus_per_node: int
    micro_batch: int
    grad_accum: int
    seq_len: int
    dtype_bytes: int
    reduce_bucket: int = 500_000_000  # elements per gradient collective
    gathers_per_pass: int | None = None  # stage 3 all-gathers per forward; None: from the shape
    fill: float = 1.0  # tokens present / micro × seq_len (padding or packing leaves gaps)
    flop_fill: float | None = None  # FLOPs done / FLOPs of full rows (None: fill); packed rows
    # attend within each original row, so their attention costs less than the token fill says
    rows_per_item: int = 1  # sequences per batch item: 2 for preference pairs
    reference_forwards: int = 0  # forwards without gradient per micro-batch (DPO adapter_off)
    expert_parallel: int = 1  # ranks a MoE layer's experts are split over
    rollout: Rollout | None = None  # an online method's generation per rank and step (GRPO)

    @property
    def rows_per_rank(self) -> int:
        return self.micro_batch * self.rows_per_item * self.grad_accum

    @property
    def tokens_per_rank(self) -> float:
        return self.fill * self.rows_per_rank * self.seq_len


@dataclass(frozen=True)
class Collective:
    kind: str  # all-reduce | reduce-scatter | all-gather
    elements: int  # the full (unpartitioned) tensor, summed over the calls
    calls: int  # how many collectives (each pays the ring's latency)
    when: str  # what it moves


@dataclass(frozen=True)
class StepTime:
    compute_s: float
    optimizer_s: float
    comm_s: float  # all of it, hidden or not
    exposed_comm_s: float
    offload_s: float
    overhead_s: float
    tokens: float  # per step, all ranks
    rollout_s: float = 0.0  # generation before the forwards (GRPO), its weight gather included

    @property
    def step_s(self) -> float:
        return (self.compute_s + self.optimizer_s + self.exposed_comm_s + self.offload_s
                + self.overhead_s + self.rollout_s)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.step_s


def matmul_params(shape: ModelShape) -> tuple[int, int]:
    """(all, trainable) matmul parameters, as `metrics.matmul_parameters` counts them on a model."""
    adapters = sum(shape.trainable_numels) if shape.lora_rank else 0
    base = shape.matmul_params if shape.matmul_params is not None else shape.total - adapters
    return base + adapters, adapters if shape.lora_rank else base


def flops_per_rank(job: Job) -> float:
    """Model FLOPs of one rank's step: micro × rows per item × accumulation rows of seq_len
    tokens, forward and backward, plus any reference forwards over the same rows."""
    n, t = matmul_params(job.shape)
    rows = [job.seq_len] * job.rows_per_rank
    train = model_flops(n, t, job.shape.layers, job.shape.hidden, rows)
    return train + job.reference_forwards * forward_flops(n, job.shape.layers, job.shape.hidden,
                                                          rows)


def gathers_per_pass(job: Job) -> int:
    """Stage 3 fetches per forward: each weight-owning linear layer of every block, the embedding
    and the head (norms stay whole on every rank: under the persistence threshold)."""
    if job.gathers_per_pass is not None:
        return job.gathers_per_pass
    per_block = 7 if job.shape.mlp_factor >= 3 else 4  # q k v o gate up down | qkv o fc proj
    return per_block * job.shape.layers + 2


def collectives(job: Job) -> list[Collective]:
    """What a step communicates (the ZeRO paper's volumes; DeepSpeed's schedule per micro-batch)."""
    if job.world_size == 1:
        return []
    ep = job.expert_parallel  # each rank holds, reduces and gathers 1/ep of the experts
    psi, trained = job.shape.local(job.shape.total, ep), job.shape.local(job.shape.trainable, ep)
    buckets = max(1, math.ceil(trained / job.reduce_bucket))
    a = job.grad_accum
    if job.stage <= 1:  # gradients reduced once, at the accumulation boundary
        return [Collective("all-reduce", trained, buckets, "gradients")]
    if job.stage == 2:  # reduced into partitions every micro-batch; weights gathered after step
        return [Collective("reduce-scatter", trained * a, buckets * a, "gradients"),
                Collective("all-gather", trained, buckets, "updated weights")]
    g = gathers_per_pass(job)
    f = 1 + job.reference_forwards  # the reference forward gathers the weights again
    return [Collective("all-gather", psi * a * f, g * a * f, "weights, forward"),
            Collective("all-gather", psi * a, g * a, "weights, backward"),
            Collective("reduce-scatter", trained * a, buckets * a, "gradients")]


def bytes_sent(c: Collective, world: int, dtype_bytes: int) -> float:
    """Bytes each rank sends in a ring: 2(N−1)/N of the tensor for an all-reduce, (N−1)/N for a
    reduce-scatter or an all-gather."""
    passes = 2 if c.kind == "all-reduce" else 1
    return passes * (world - 1) / world * c.elements * dtype_bytes


def comm_volume(job: Job) -> float:
    return sum(bytes_sent(c, job.world_size, job.dtype_bytes) for c in collectives(job))


def all_to_all_bytes(job: Job) -> float:
    """Bytes one rank sends in a step's expert-parallel all-to-alls: per MoE layer and
    micro-batch, forward dispatch and combine and their two backward mirrors, each moving
    tokens·k hidden states of which (ep−1)/ep go to other ranks (gradient checkpointing's
    recomputed forward, two more, is not counted)."""
    ep, s = job.expert_parallel, job.shape
    if ep <= 1 or not s.experts:
        return 0.0
    routed = job.tokens_per_rank * s.experts_per_token * s.hidden * job.dtype_bytes
    return 4 * s.moe_layers * routed * (ep - 1) / ep


def all_to_all_time(job: Job, cluster: Cluster) -> float:
    """The all-to-alls over the ep ranks of an expert group (inside a node when ep fits)."""
    if job.expert_parallel <= 1 or not job.shape.experts:
        return 0.0
    bandwidth, latency = cluster.ring(job.expert_parallel, job.gpus_per_node)
    calls = 4 * job.shape.moe_layers * job.grad_accum
    return all_to_all_bytes(job) / bandwidth + calls * latency


def comm_time(job: Job, cluster: Cluster) -> float:
    bandwidth, latency = cluster.ring(job.world_size, job.gpus_per_node)
    total = 0.0
    for c in collectives(job):
        passes = 2 if c.kind == "all-reduce" else 1
        total += bytes_sent(c, job.world_size, job.dtype_bytes) / bandwidth
        total += c.calls * passes * latency
    return total


def optimizer_time(job: Job, cluster: Cluster) -> float:
    """Adam over this rank's partition (stages 1–3 partition the optimizer; stage 0 does not)."""
    shard = (job.shape.trainable / job.world_size if job.stage >= 1
             else job.shape.local(job.shape.trainable, job.expert_parallel))
    if job.offload_optimizer != "none":
        ranks_per_node = min(job.world_size, job.gpus_per_node)
        return shard * ranks_per_node / cluster.cpu_adam_rate
    if cluster.optimizer_s_per_param is not None:
        return shard * cluster.optimizer_s_per_param
    return shard * ADAM_BYTES / cluster.device.memory_bandwidth


def offload_time(job: Job, cluster: Cluster) -> float:
    """PCIe (and NVMe) traffic of offloading, not hidden: DeepSpeed waits for it at the step."""
    n, b = job.world_size, job.dtype_bytes
    shard = job.shape.trainable / n if job.stage >= 1 else job.shape.trainable
    seconds = 0.0
    if job.offload_optimizer != "none":  # fp32 gradients down, updated weights up
        seconds += shard * (4 + b) / cluster.pcie.bandwidth
    if job.offload_params != "none":  # the partition up on every gather, forward and backward
        seconds += 2 * job.grad_accum * job.shape.total / n * b / cluster.pcie.bandwidth
    ranks_per_node = min(n, job.gpus_per_node)
    if job.offload_optimizer == "nvme":  # master, m, v (12 bytes) read and written
        seconds += 2 * 12 * shard * ranks_per_node / cluster.nvme_bandwidth
    if job.offload_params == "nvme":
        seconds += 2 * job.grad_accum * job.shape.total / n * b * ranks_per_node \
            / cluster.nvme_bandwidth
    return seconds


DECODE_STEP_OVERHEAD_S_PER_LAYER = 2e-4
"""Host time per generated token per layer that no FLOP or byte accounts for: transformers'
eager `generate` launches each layer's kernels from Python (~a dozen, ~15 µs each). An
assumption (CUDA graphs or vLLM remove most of it), stated in docs/plan.md."""


def rollout_time(job: Job, cluster: Cluster) -> float:
    """One rank's generation per step (GRPO): its prompts' calls (Rollout) one after another:

    - prefill: 2·N FLOPs per prompt token of each call's sequences, compute-bound at the
      training efficiency;
    - decode, `completion_len` steps per call: each reads every weight (N_all·b bytes) and the
      KV cache written so far at the memory bandwidth, or does 2·N FLOPs per sequence at the
      dense peak, whichever is slower (at small batches the read: decode is memory-bound), plus
      the per-layer launch overhead;
    - under ZeRO-3 one all-gather of the weights per rollout phase (never per token);
    divided by the optimizer steps that share one rollout (GRPO's μ).
    Σ over decode steps t = 1…C of the cache read = S·kv·(C·P + C(C+1)/2) per call (kv: cache
    bytes per token). Sampling stops early only at eos: a completion is counted at its full
    length (an upper bound)."""
    r = job.rollout
    if r is None:
        return 0.0
    d, b = cluster.device, job.dtype_bytes
    n, _ = matmul_params(job.shape)
    weights = job.shape.total * b
    kv_token = kv_cache_bytes(job.shape, 1, 1, b)
    prompts = job.micro_batch * job.grad_accum  # the rank's prompts of the step
    c, p, seqs = r.completion_len, r.prompt_len, r.sequences(prompts)
    prefill = 2 * n * seqs * p / (cluster.efficiency * d.peak(b))
    reads = (c * weights + seqs * kv_token * (c * p + c * (c + 1) / 2)) / d.memory_bandwidth
    flops = c * 2 * n * seqs / d.peak(b)
    overhead = c * job.shape.layers * DECODE_STEP_OVERHEAD_S_PER_LAYER
    gather = 0.0
    if job.stage == 3 and job.world_size > 1:
        bandwidth, latency = cluster.ring(job.world_size, job.gpus_per_node)
        gather = bytes_sent(Collective("all-gather", job.shape.total, 1, "weights, rollout"),
                            job.world_size, b) / bandwidth + latency
    return (r.calls(prompts) * (prefill + max(reads, flops) + overhead) + gather) / r.every


def step_time(job: Job, cluster: Cluster) -> StepTime:
    peak = cluster.device.peak(job.dtype_bytes)
    fill = job.fill if job.flop_fill is None else job.flop_fill
    compute = fill * flops_per_rank(job) / (cluster.efficiency * peak)
    comm = comm_time(job, cluster)
    hidden = min(cluster.overlap * comm, compute)
    a2a = all_to_all_time(job, cluster)  # on the critical path: never hidden
    comm, exposed = comm + a2a, comm - hidden + a2a
    return StepTime(compute, optimizer_time(job, cluster), comm, exposed,
                    offload_time(job, cluster), cluster.overhead_s,
                    job.tokens_per_rank * job.world_size, rollout_time(job, cluster))


def with_world(job: Job, world: int, global_batch: int) -> Job:
    """The same job on another world size: the global batch kept (accumulation absorbs it) when
    it splits evenly, else the micro batch kept with no accumulation (weak scaling)."""
    from dpkit.batch import plan_batch, without_accumulation
    from dpkit.errors import RecipeError

    try:
        b = plan_batch(global_batch, job.micro_batch, world)
    except RecipeError:
        b = without_accumulation(job.micro_batch, world)
    return replace(job, world_size=world, grad_accum=b.grad_accum)
