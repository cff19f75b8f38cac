"""The memory model behind `dpkit plan`: a model's shape (dpkit/plan/shape.py), then pure
arithmetic, without torch or DeepSpeed.

Every number is "elements × bytes per element" on one rank, tagged with where it lives (GPU, CPU,
NVMe) and when (during forward/backward, during the optimizer step, or always). Which tensors
DeepSpeed 0.19 actually allocates per stage was read from its source and checked by counting the
tensors a real engine holds (tests/distributed/test_plan_measured.py); docs/plan.md explains each
line and where it differs from DeepSpeed's own estimators.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from dpkit.plan.shape import ACTIVATION_EXTRA, ModelShape, model_shape  # noqa: F401

GiB = 2**30
FRAGMENTATION = 0.10  # allocator fragmentation margin, a fraction of the peak allocated bytes
RUNTIME_RESERVE = 1 * GiB  # GPU memory no tensor accounts for: CUDA context, NCCL, cuBLAS
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
CPU_PER_RANK = 2 * GiB  # host memory of a rank's process itself (Python, torch, CUDA, data)
SHARD_BYTES = 5 * 10**9  # under ZeRO-3 a rank loads the checkpoint one shard at a time
STAGE0_ALLREDUCE = 500_000_000  # ZeRO-0's flattened all-reduce bucket (MEMORY_OPT_ALLREDUCE_SIZE)
DROPOUT_MASK = 1  # bytes per element of CUDA dropout's saved mask (bool); the CPU kernel keeps 4
BACKWARD, STEP, ROLLOUT = "backward", "step", "rollout"
PHASES = (BACKWARD, STEP, ROLLOUT)  # ROLLOUT: an online method's generation (GRPO), no backward
ALWAYS = frozenset(PHASES)

@dataclass(frozen=True)
class Knobs:
    """The DeepSpeed `zero_optimization` values the memory depends on (DeepSpeed's defaults)."""

    reduce_bucket_size: int = 500_000_000
    overlap_comm: bool = False
    prefetch_bucket_size: int = 50_000_000
    param_persistence_threshold: int = 100_000
    max_live_parameters: int = 1_000_000_000
    sub_group_size: int = 1_000_000_000
    optimizer_buffer_count: int = 4
    param_buffer_count: int = 5
    param_buffer_size: int = 100_000_000


def long_fields(recipe) -> dict:
    """The Setup fields a recipe's long-sequence keys decide."""
    c = recipe.compute
    return dict(sequence_parallel=recipe.train.sequence_parallel,
                loss_tile=None if c.loss == "full" else c.loss_tile_tokens,
                loss_auto=c.loss == "auto",
                tiled_mlp=c.tiled_mlp, offload_activations=c.offload_activations)


@dataclass(frozen=True)
class Rollout:
    """An online method's generation (GRPO, dpkit/objectives/grpo.py) per rank and optimizer
    step: G completions of each of the rank's prompts, up to `completion_len` tokens after a
    prompt of up to `prompt_len`. `batched` (`rollout: fast`): one generate call with every
    prompt of the rank's step; else (`reproducible`) one call per prompt of its G sequences.
    `every`: optimizer steps per rollout (GRPO's μ: its steps share one rollout)."""
    group: int
    prompt_len: int
    completion_len: int
    batched: bool
    every: int = 1

    def calls(self, prompts: int) -> int:
        return 1 if self.batched else prompts

    def sequences(self, prompts: int) -> int:
        """Sequences generated at once (one call)."""
        return self.group * (prompts if self.batched else 1)


def kv_cache_bytes(shape: ModelShape, sequences: int, tokens: int, dtype_bytes: int) -> int:
    """Keys and values of every layer for `sequences` × `tokens` positions."""
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * sequences * tokens * dtype_bytes


def rollout_parts(shape: ModelShape, setup: Setup, P: int, persist: int) -> list[Part]:
    """What generation holds besides the model states (phase ROLLOUT: no activations are
    saved then): the KV cache of one call's sequences at full length; one decode step's logits (model dtype, fp32 for the
    temperature and top-p, fp64 for the Gumbel noise and the noisy scores: GumbelSampler); the
    prefill's largest transient (one layer's MLP: two intermediate-size tensors per prompt
    token); under ZeRO-3 every partitioned weight gathered at once for the whole phase
    (eval/generate.py full_weights)."""
    r, b = setup.rollout, setup.dtype_bytes
    seqs, only = r.sequences(setup.rollout_prompts), frozenset({ROLLOUT})
    parts = [Part("rollout", "KV cache",
                  kv_cache_bytes(shape, seqs, r.prompt_len + r.completion_len, b), 1,
                  phases=only),
             Part("rollout", "logits", seqs * shape.vocab, b + 4 + 2 * 8, phases=only),
             Part("rollout", "prefill", seqs * r.prompt_len * 2 * shape.intermediate, b,
                  phases=only)]
    if setup.stage == 3:
        parts.append(Part("rollout", "gathered weights", P - persist, b, phases=only))
    return parts


@dataclass(frozen=True)
class Setup:
    stage: int
    offload_optimizer: str  # none | cpu | nvme
    offload_params: str  # none | cpu | nvme (stage 3 only)
    world_size: int
    gpus_per_node: int
    dtype_bytes: int  # 2 for bf16/fp16 (mixed precision), 4 for fp32
    micro_batch: int
    seq_len: int
    gradient_checkpointing: bool = False
    attn_implementation: str = "sdpa"
    knobs: Knobs = field(default_factory=Knobs)
    sequence_parallel: int = 1  # ranks splitting each sequence (DeepSpeed Ulysses)
    loss_tile: int | None = None  # tokens per tile of the tiled loss; None: full logits
    loss_auto: bool = False  # compute.loss: auto, tiles only where they hold less
    tiled_mlp: bool = False
    offload_activations: bool = False  # saved activations in CPU memory
    expert_parallel: int = 1  # ranks a MoE layer's experts are split over (moe.expert_parallel)
    reference_copy: bool = False  # a frozen copy of the model as a reference (GRPO's β > 0, full)
    rollout: Rollout | None = None  # what an online method generates (GRPO), if any
    rollout_prompts: int = 0  # prompts per rank and optimizer step (global batch / ranks)

    @property
    def tokens(self) -> int:
        """Tokens one rank holds activations for: its slice of each sequence (Ulysses gives
        each rank the whole sequence inside attention, but for heads/S heads: the same bytes)."""
        return self.micro_batch * -(-self.seq_len // self.sequence_parallel)

    @property
    def mixed(self) -> bool:
        return self.dtype_bytes < 4

    @property
    def label(self) -> str:
        if self.offload_optimizer == "none":
            return "none"
        if self.offload_params == "none":
            return f"optimizer→{self.offload_optimizer}"
        return f"optimizer+params→{self.offload_optimizer}"


@dataclass(frozen=True)
class Part:
    category: str  # params | grads | optim | step | activations | comm
    item: str
    elements: int
    bytes_per: int
    device: str = "gpu"  # gpu | cpu | nvme
    phases: frozenset = ALWAYS
    state: bool = False  # a "model state" in the ZeRO paper's sense (params, grads, optimizer)

    @property
    def bytes(self) -> int:
        return self.elements * self.bytes_per


@dataclass
class Breakdown:
    setup: Setup
    parts: list[Part]
    cpu_loading: int = 0
    """Host bytes one rank needs while it loads the weights (before training state exists)."""

    def on(self, device: str, phase: str, category: str | None = None) -> int:
        return sum(p.bytes for p in self.parts if p.device == device and phase in p.phases
                   and (category is None or p.category == category))

    def gpu(self, *categories: str) -> int:
        """The categories' GPU bytes at their own largest (forward/backward or optimizer step)."""
        return max(sum(self.on("gpu", phase, c) for c in categories) for phase in PHASES)

    @property
    def peak_phase(self) -> str:
        return max(PHASES, key=lambda phase: self.on("gpu", phase))  # ties: the first

    @property
    def gpu_allocated(self) -> int:
        """Peak bytes of live tensors on one GPU (what torch.cuda.max_memory_allocated reports)."""
        return self.on("gpu", self.peak_phase)

    @property
    def gpu_margin(self) -> int:
        return int(self.gpu_allocated * FRAGMENTATION) + RUNTIME_RESERVE

    @property
    def gpu_total(self) -> int:
        return self.gpu_allocated + self.gpu_margin

    @property
    def cpu_per_rank(self) -> int:
        steady = max(self.on("cpu", phase) for phase in PHASES)
        return CPU_PER_RANK + max(steady, self.cpu_loading)

    @property
    def cpu_per_node(self) -> int:
        return self.cpu_per_rank * min(self.setup.gpus_per_node, self.setup.world_size)

    @property
    def model_states(self) -> int:
        """Parameters + gradients + optimizer states, wherever they live (the ZeRO paper's sum)."""
        return sum(p.bytes for p in self.parts if p.state)

    def elements(self, category: str, item: str | None = None) -> int:
        return sum(p.elements for p in self.parts
                   if p.category == category and (item is None or p.item == item))


def _activation_terms(shape: ModelShape, setup: Setup, mask_bytes: int = 1) -> tuple[int, int]:
    """(bytes one block saves, bytes saved outside the blocks) for one micro batch."""
    b, h = setup.dtype_bytes, shape.hidden
    mlp = shape.mlp_factor * shape.intermediate
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    tokens = setup.tokens
    if setup.tiled_mlp:  # DeepSpeed's TiledMLP keeps the MLP's input, recomputes the rest
        mlp = h
    if setup.attn_implementation == "eager":  # K and V repeated to every head, scores kept
        per_token = b * (4 * h + 4 * q + mlp) + 8 * h + 8
        per_score = 4 + (b if b < 4 else 0) + (b if shape.attn_softcap else 0)
        scores = shape.heads * setup.seq_len ** 2 * per_score * setup.micro_batch
    else:  # sdpa / flash attention: memory linear in the sequence length
        per_token = b * (4 * h + 2 * q + 2 * kv + mlp) + 8 * h + 8 + 4 * shape.heads
        scores = 0
    norm = 8 * h if shape.norm_out_fp32 else (4 + b) * h  # two are in the terms above
    per_token += shape.norms_per_layer * norm - 2 * (4 + b) * h
    if shape.lora_rank:  # PEFT's adapters compute in fp32 on their own (cast) input copies
        ins, frozen = shape.lora_inputs_per_layer, 2 * h + shape.intermediate
        if shape.lora_dropout:
            saved_inputs = (4 + mask_bytes) * ins  # dropout output and its mask per adapter
        else:
            saved_inputs = 4 * ins if b < 4 else 4 * min(ins, frozen)
        per_token += (4 * shape.lora_rank * shape.lora_targets_per_layer + saved_inputs
                      - b * frozen  # frozen linears no longer keep their inputs for weight grads
                      - b * h * shape.norms_per_layer)  # nor frozen norms their outputs
    # the loss's fp32 log-softmax (none kept by the tiled loss: it recomputes its tiles)
    softcap = b if shape.logit_softcap else 0
    logits = 0 if tiled_loss(shape, setup) else (4 + softcap) * shape.vocab
    outside = tokens * (b * (h + 2 * shape.head_dim) + norm + 16 + logits)
    return tokens * per_token + scores, outside


def saved_activations(shape: ModelShape, setup: Setup, mask_bytes: int = DROPOUT_MASK) -> int:
    """Bytes autograd saves for backward over one micro batch (weights excluded).

    Per token and block (b = dtype bytes, q = heads·head_dim, kv = kv_heads·head_dim), with
    sdpa/flash attention: b·(4h + 2q + 2kv + m·I) + 8h + 8 + 4·heads, where m·I is the MLP (m = 3
    gated or 1 plain, plus ACTIVATION_EXTRA), 8h the fp32 upcasts of two RMSNorms (each further
    norm (4 + b)·h, Gemma's 8h), 8 + 4·heads bytes of per-token statistics. Eager attention keeps
    K/V repeated to every head (4q for 2q + 2kv, no statistics) and the softmax: heads·s² per
    sequence, fp32 plus a b-byte copy (plus b for Gemma-2's soft-capping). LoRA: frozen linears
    and norms stop keeping inputs (b·(2h + I)) and outputs (b·h per norm) for weight gradients;
    each adapter keeps an fp32 copy of its input (or, with dropout, its dropout output and mask)
    and its fp32 rank-r intermediate. Outside the blocks: b·(h + 2·head_dim) + a norm + 16 per token
    and the loss's fp32 log-softmax (4·V). With gradient checkpointing a block keeps only its
    input (b·h). Fitted on autograd's saved tensors of HF models (tests/unit/test_plan.py
    re-measures other shapes and architectures; docs/plan.md lists the known gaps).
    """
    return sum(_saved(shape, setup, mask_bytes))


def _saved(shape: ModelShape, setup: Setup, mask_bytes: int = DROPOUT_MASK) -> tuple[int, int]:
    """(saved by the blocks, saved outside them): the first is what activation offload moves."""
    block, outside = _activation_terms(shape, setup, mask_bytes)
    if setup.gradient_checkpointing:
        return setup.tokens * setup.dtype_bytes * shape.hidden * shape.layers, outside
    return block * shape.layers, outside


def tiled_loss(shape: ModelShape, setup: Setup) -> bool:
    """Whether the loss goes over tiles, as dpkit/objectives/head.py decides: never for a
    micro-batch of at most one tile, and with `compute.loss: auto` only from the size where tiles
    hold less than the full logits (`tiling_threshold`: a trained head adds its fp32 gradient).
    Every objective goes through that head: preference pairs as 2 rows per pair (setup_for), the
    same tokens their log-probs are tiled over (tests/unit/test_tiled_loss.py)."""
    from dpkit.objectives.head import tiling_threshold

    if setup.loss_tile is None or setup.tokens <= setup.loss_tile:
        return False
    return not setup.loss_auto or setup.tokens >= tiling_threshold(
        setup.loss_tile, shape.hidden, setup.dtype_bytes, not shape.lora_rank,
        bool(shape.logit_softcap))


def activation_bytes(shape: ModelShape, setup: Setup) -> int:
    """Peak GPU activation bytes: what autograd saves (less what is offloaded), the logits the
    forward returns (b·V per token), d(loss)/d(logits) opening the backward ((4 + b)·V per
    token), and with gradient checkpointing the one block being recomputed. The tiled loss holds
    one tile's logits, fp32 copy, softmax gradient and its cast ((8 + 2b)·V per token of a tile)
    and the head's fp32 weight gradient it sums over tiles (4·V·h); a micro-batch of at most one
    tile goes through the full logits (dpkit/objectives/head.py: token_nll)."""
    blocks, outside = _saved(shape, setup)
    total = outside + (0 if setup.offload_activations else blocks)
    if tiled_loss(shape, setup):
        tile = setup.loss_tile
        b = setup.dtype_bytes
        total += tile * (8 + 2 * b) * shape.vocab + 4 * shape.vocab * shape.hidden
    else:
        total += setup.tokens * (4 + 2 * setup.dtype_bytes) * shape.vocab
    if setup.gradient_checkpointing:
        total += _activation_terms(shape, setup)[0]
    return total


def estimate(shape: ModelShape, setup: Setup) -> Breakdown:
    """Per-rank memory of one (stage, offload, micro batch) choice, as DeepSpeed 0.19 allocates it."""
    s, n, b, k = setup.stage, setup.world_size, setup.dtype_bytes, setup.knobs
    # Expert parallelism: a rank holds 1/ep of the routed experts (P, T: what one rank holds
    # whole); ZeRO partitions those over the n/ep ranks holding the same experts, so a
    # partition stays 1/n of the model's (the Tn and P/n below).
    ep = setup.expert_parallel
    P, T = shape.local(shape.total, ep), shape.local(shape.trainable, ep)
    Tn = math.ceil(shape.trainable / n) if s >= 1 else T  # optimizer partition (stage 1+)
    opt_dev = "gpu" if setup.offload_optimizer == "none" else setup.offload_optimizer
    par_dev = "gpu" if setup.offload_params == "none" else setup.offload_params
    parts: list[Part] = []
    add = parts.append
    bwd, stp = frozenset({BACKWARD}), frozenset({STEP})

    # Parameters, in the model dtype
    if s < 3:
        add(Part("params", "weights", P, b, state=True))
    else:
        add(Part("params", "partition", math.ceil(shape.total / n), b, par_dev, state=True))
        persist = shape.persistent(k.param_persistence_threshold)
        add(Part("params", "persistent", persist, b))
        gathered = min(k.max_live_parameters,
                       shape.largest_local_layer(ep) + k.prefetch_bucket_size)
        add(Part("params", "gathered", min(gathered, P - persist), b, phases=bwd))

    # A frozen reference copy (dpkit/objectives/reference.py), in the model dtype: partitioned
    # like the policy under ZeRO-3 (a second engine: its partition and persistent parameters;
    # its gathered layers live only while it runs, before the step's first forward with
    # gradients, so not at the peak), whole on every rank under ZeRO 0–2. No gradients, no
    # optimizer state.
    if setup.reference_copy and s < 3:
        add(Part("params", "reference copy", P, b))
    elif setup.reference_copy:
        add(Part("params", "reference partition", math.ceil(shape.total / n), b, par_dev))
        add(Part("params", "reference persistent", persist, b))

    # Gradients, in the model dtype (DeepSpeed's default gradient accumulation dtype)
    inflight = shape.largest_trainable if shape.largest_trainable > k.reduce_bucket_size else 0
    if s == 0:
        add(Part("grads", "full", T, b, state=True))
    elif s == 1:
        add(Part("grads", "full", T, b, phases=bwd, state=True))
        if opt_dev == "gpu":
            add(Part("grads", "partition", shape.overlapping_partition(n), b, phases=stp))
    elif opt_dev == "gpu" and s == 2:
        add(Part("grads", "partition", Tn, b, state=True))
        # A parameter straddling the partition edge is buffered whole when buckets are reduced
        # during backward; a bucket that holds every gradient is reduced once, at the end, into
        # the partition alone (both measured: tests/distributed/test_plan_measured.py).
        boundary = shape.overlapping_partition(n) - Tn if k.reduce_bucket_size < T else 0
        add(Part("grads", "partition boundary", boundary, b))
        add(Part("grads", "in flight", inflight, b, phases=bwd))
    elif opt_dev == "gpu":
        add(Part("grads", "partition", Tn, b, state=True))
        add(Part("grads", "in flight", inflight, b, phases=bwd))
    else:
        if s == 3:  # grad_partitions_flat_buffer lives with the optimizer
            add(Part("grads", "partition", Tn, b, "cpu", state=True))
        add(Part("grads", "in flight", inflight, b, phases=bwd))

    # Optimizer: fp32 master weights plus Adam's two moments. Only ZeRO-0 in fp32 steps the
    # model's own tensors; ZeRO-1/2/3 always clone an fp32 partition (stage 3 means to alias an
    # fp32 model's partition, but compares a torch.device to a str, which is never equal).
    master = 0 if (s == 0 and not setup.mixed) else Tn
    add(Part("optim", "master", master, 4, opt_dev, state=True))
    add(Part("optim", "adam", 2 * Tn, 4, opt_dev, state=True))

    # fp32 copy of the gradient the optimizer steps on
    if opt_dev == "gpu":
        if s == 0:
            step_grads = T if setup.mixed else 0
        elif s == 3:
            step_grads = min(k.sub_group_size, Tn)
        else:
            step_grads = Tn
        add(Part("step", "fp32 grads", step_grads, 4, phases=stp))
    elif opt_dev == "cpu":
        add(Part("step", "fp32 grads", Tn, 4, "cpu"))
        if s < 3:  # bit16 staging of the updated partition; one parameter's gradient staging
            add(Part("step", "bit16 staging", Tn, b, "cpu"))
            for where in ("gpu", "cpu"):
                add(Part("comm", "offload staging", shape.largest_trainable, b, where))
    else:  # NVMe: pinned swap buffers in host memory
        add(Part("step", "swap buffers", k.optimizer_buffer_count * min(k.sub_group_size, Tn), 4,
                 "cpu"))
    if par_dev == "nvme":
        add(Part("params", "swap buffers", k.param_buffer_count * k.param_buffer_size, b, "cpu"))

    # Activations
    add(Part("activations", "saved + loss grad", activation_bytes(shape, setup), 1, phases=bwd))
    if setup.offload_activations:
        add(Part("activations", "offloaded", _saved(shape, setup)[0], 1, "cpu", phases=bwd))

    # Communication buffers
    if s == 0:
        add(Part("comm", "all-reduce bucket", min(STAGE0_ALLREDUCE, T), b, phases=bwd))
    elif s in (1, 2):
        copies = 2 if setup.knobs.overlap_comm else 1
        add(Part("comm", "reduce buckets", copies * k.reduce_bucket_size, b, phases=bwd))
    else:
        add(Part("comm", "reduce bucket", k.reduce_bucket_size, b))
        add(Part("comm", "reduce-scatter", k.reduce_bucket_size, b, phases=bwd))

    if setup.rollout is not None:
        persistent = 0 if s < 3 else shape.persistent(k.param_persistence_threshold)
        parts += rollout_parts(shape, setup, P, persistent)

    loading = P * b if s < 3 else min(P * b, SHARD_BYTES)
    return Breakdown(setup, [p for p in parts if p.elements], cpu_loading=loading)
