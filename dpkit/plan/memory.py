"""The memory model behind `dpkit plan`: a model's shape, then pure arithmetic.

`model_shape` counts parameters on the meta device (torch and transformers imported there only);
everything else is arithmetic, without torch or DeepSpeed.

Every number is "elements × bytes per element" on one rank, tagged with where it lives (GPU, CPU,
NVMe) and when (during forward/backward, during the optimizer step, or always). Which tensors
DeepSpeed 0.19 actually allocates per stage was read from its source and checked by counting the
tensors a real engine holds (tests/distributed/test_plan_measured.py); docs/plan.md explains each
line and where it differs from DeepSpeed's own estimators.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

GiB = 2**30
FRAGMENTATION = 0.10  # allocator fragmentation margin, a fraction of the peak allocated bytes
RUNTIME_RESERVE = 1 * GiB  # GPU memory no tensor accounts for: CUDA context, NCCL, cuBLAS
CPU_PER_RANK = 2 * GiB  # host memory of a rank's process itself (Python, torch, CUDA, data)
SHARD_BYTES = 5 * 10**9  # under ZeRO-3 a rank loads the checkpoint one shard at a time
STAGE0_ALLREDUCE = 500_000_000  # ZeRO-0's flattened all-reduce bucket (MEMORY_OPT_ALLREDUCE_SIZE)
DROPOUT_MASK = 1  # bytes per element of CUDA dropout's saved mask (bool); the CPU kernel keeps 4
BACKWARD, STEP = "backward", "step"
ALWAYS = frozenset({BACKWARD, STEP})

ACTIVATION_EXTRA = {"relu": 0, "gelu_new": 4, "gelu_fast": 7, "quick_gelu": 2}
"""Tensors an activation function saves beyond its input (1 for silu, gelu, gelu_pytorch_tanh:
measured; the composite tanh approximations save their intermediates)."""


@dataclass(frozen=True)
class ModelShape:
    """What the memory model needs to know about a model (counted on the meta device)."""

    param_numels: tuple[int, ...]  # every distinct parameter (tied once), LoRA adapters included
    trainable_numels: tuple[int, ...]  # what the optimizer updates: all, or LoRA's adapters
    largest_layer: int  # most elements owned directly by one module (DeepSpeed's "largest layer")
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    mlp_factor: int = 4  # intermediate-size tensors the MLP saves per token (4: SwiGLU)
    norms_per_layer: int = 2
    norm_out_fp32: bool = False  # Gemma's RMSNorm returns its fp32 product: 8h, not (4 + b)·h
    attn_softcap: bool = False  # Gemma-2 soft-caps attention scores: one more score tensor
    logit_softcap: bool = False  # ...and the logits: one more b·V tensor per token
    lora_rank: int = 0
    lora_targets_per_layer: int = 0
    lora_inputs_per_layer: int = 0  # the adapted linear layers' input features, summed
    lora_dropout: bool = False
    matmul_params: int | None = None  # base parameters in matmuls (metrics.matmul_parameters)

    @property
    def total(self) -> int:
        return sum(self.param_numels)

    @property
    def trainable(self) -> int:
        return sum(self.trainable_numels)

    @property
    def largest_trainable(self) -> int:
        return max(self.trainable_numels, default=0)

    def overlapping_partition(self, n: int) -> int:
        """Most gradient elements one ZeRO-1/2 rank buffers: the whole gradient of every trainable
        parameter that overlaps its 1/n of the flattened parameters (`grads_in_partition`)."""
        size, most, start = math.ceil(self.trainable / n), 0, 0
        spans = []
        for numel in self.trainable_numels:
            spans.append((start, start + numel))
            start += numel
        for r in range(n):
            lo, hi = r * size, (r + 1) * size
            most = max(most, sum(b - a for a, b in spans if a < hi and b > lo))
        return most

    def persistent(self, threshold: int) -> int:
        """Elements ZeRO-3 keeps whole on every rank (parameters of at most `threshold` elements)."""
        return sum(n for n in self.param_numels if n <= threshold)


def model_shape(config, lora_rank: int = 0, lora_targets: list[str] | None = None,
                trust_remote_code: bool = False, lora_dropout: float = 0.0) -> ModelShape:
    """Count parameters on the meta device: no memory, no weights, any size.

    `lora_targets`: module names to adapt, matched like PEFT against the end of each module path
    (`q_proj`, `self_attn.q_proj`); None adapts every linear layer except the output head (PEFT's
    "all-linear"). With `lora_rank` 0 it is full fine-tuning.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from dpkit.metrics import matmul_parameters

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    numels = [p.numel() for p in model.parameters()]  # shared (tied) parameters once
    largest_layer = max(sum(p.numel() for p in m.parameters(recurse=False))
                        for m in model.modules())
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    block = next((m[0] for m in model.modules() if isinstance(m, torch.nn.ModuleList)), model)
    act = next((getattr(text, k) for k in ("hidden_activation", "hidden_act",
                                           "activation_function") if getattr(text, k, None)), "")
    h, heads = text.hidden_size, text.num_attention_heads
    layers = text.num_hidden_layers
    adapters: list[int] = []
    inputs = 0
    if lora_rank:
        head = model.get_output_embeddings()
        for name, m in model.named_modules():
            is_linear = isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"
            if not is_linear or m is head or (lora_targets and not any(
                    name == t or name.endswith("." + t) for t in lora_targets)):
                continue
            w = m.weight.shape  # Conv1D stores in × out
            fan_in, fan_out = (w[0], w[1]) if type(m).__name__ == "Conv1D" else (w[1], w[0])
            adapters += [lora_rank * fan_in, lora_rank * fan_out]  # A: r×in, B: out×r
            inputs += fan_in
        if not adapters:
            from dpkit.errors import RecipeError

            raise RecipeError.one("peft.target_modules", f"no linear layer named {lora_targets}"
                                  " in the model", f"choose among {sorted(names)}")
    return ModelShape(
        param_numels=tuple(numels + adapters),
        trainable_numels=tuple(adapters or numels),
        largest_layer=largest_layer,
        hidden=h, layers=layers, heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or h // heads,
        intermediate=(getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None)
                      or 4 * h),
        vocab=text.vocab_size,
        mlp_factor=(3 if names & {"gate_proj", "gate_up_proj", "w1", "w3"} else 1)
        + ACTIVATION_EXTRA.get(act, 1),
        norms_per_layer=sum("norm" in type(m).__name__.lower() for m in block.modules()),
        norm_out_fp32=text.model_type.startswith("gemma"),
        attn_softcap=bool(getattr(text, "attn_logit_softcapping", None)),
        logit_softcap=bool(getattr(text, "final_logit_softcapping", None)),
        lora_rank=lora_rank if adapters else 0,
        lora_targets_per_layer=len(adapters) // 2 // max(layers, 1),
        lora_inputs_per_layer=inputs // max(layers, 1), lora_dropout=lora_dropout > 0,
        matmul_params=matmul_parameters(model)[0])


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
        return max(sum(self.on("gpu", phase, c) for c in categories) for phase in (BACKWARD, STEP))

    @property
    def peak_phase(self) -> str:
        return BACKWARD if self.on("gpu", BACKWARD) >= self.on("gpu", STEP) else STEP

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
        steady = max(self.on("cpu", BACKWARD), self.on("cpu", STEP))
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
    tokens = setup.micro_batch * setup.seq_len
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
    logits = (4 + (b if shape.logit_softcap else 0)) * shape.vocab
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
    block, outside = _activation_terms(shape, setup, mask_bytes)
    if setup.gradient_checkpointing:
        tokens = setup.micro_batch * setup.seq_len
        return tokens * setup.dtype_bytes * shape.hidden * shape.layers + outside
    return block * shape.layers + outside


def activation_bytes(shape: ModelShape, setup: Setup) -> int:
    """Peak activation bytes: what autograd saves, the logits the forward returns (b·V per
    token), d(loss)/d(logits) opening the backward ((4 + b)·V per token), and with gradient
    checkpointing the one block being recomputed."""
    tokens = setup.micro_batch * setup.seq_len
    total = saved_activations(shape, setup) + tokens * (4 + 2 * setup.dtype_bytes) * shape.vocab
    if setup.gradient_checkpointing:
        total += _activation_terms(shape, setup)[0]
    return total


def estimate(shape: ModelShape, setup: Setup) -> Breakdown:
    """Per-rank memory of one (stage, offload, micro batch) choice, as DeepSpeed 0.19 allocates it."""
    s, n, b, k = setup.stage, setup.world_size, setup.dtype_bytes, setup.knobs
    P, T = shape.total, shape.trainable
    Tn = math.ceil(T / n) if s >= 1 else T  # optimizer partition (stage 1+), else everything
    opt_dev = "gpu" if setup.offload_optimizer == "none" else setup.offload_optimizer
    par_dev = "gpu" if setup.offload_params == "none" else setup.offload_params
    parts: list[Part] = []
    add = parts.append
    bwd, stp = frozenset({BACKWARD}), frozenset({STEP})

    # Parameters, in the model dtype
    if s < 3:
        add(Part("params", "weights", P, b, state=True))
    else:
        add(Part("params", "partition", math.ceil(P / n), b, par_dev, state=True))
        persist = shape.persistent(k.param_persistence_threshold)
        add(Part("params", "persistent", persist, b))
        gathered = min(k.max_live_parameters, shape.largest_layer + k.prefetch_bucket_size)
        add(Part("params", "gathered", min(gathered, P - persist), b, phases=bwd))

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

    # Communication buffers
    if s == 0:
        add(Part("comm", "all-reduce bucket", min(STAGE0_ALLREDUCE, T), b, phases=bwd))
    elif s in (1, 2):
        copies = 2 if setup.knobs.overlap_comm else 1
        add(Part("comm", "reduce buckets", copies * k.reduce_bucket_size, b, phases=bwd))
    else:
        add(Part("comm", "reduce bucket", k.reduce_bucket_size, b))
        add(Part("comm", "reduce-scatter", k.reduce_bucket_size, b, phases=bwd))

    loading = P * b if s < 3 else min(P * b, SHARD_BYTES)
    return Breakdown(setup, [p for p in parts if p.elements], cpu_loading=loading)
