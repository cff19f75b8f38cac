"""What the planner needs to know about a model, counted on the meta device (torch and
transformers are imported there only): parameters, layers, sizes, what activations it saves."""

from __future__ import annotations

import math
from dataclasses import dataclass

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
    vocab: int  # the output layer's width: the vocabulary, or 1 for a score head
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
    # a mixture of experts (dpkit/moe.py): 0 experts is a dense model
    experts: int = 0  # routed experts per MoE layer
    experts_per_token: int = 0  # of them, run by each token (top-k)
    expert_params: int = 0  # routed experts' weights, all layers (in param_numels)
    moe_layers: int = 0  # layers with routed experts
    largest_expert_layer: int = 0  # most expert elements one module owns (a layer's experts)
    largest_dense_layer: int = 0  # most elements one module owns outside the experts

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

    @property
    def active(self) -> int:
        """Parameters one token runs through: the routed experts at top-k / experts."""
        if not self.experts:
            return self.total
        return self.total - self.expert_params + round(
            self.expert_params * self.experts_per_token / self.experts)

    def local(self, elements: int, expert_parallel: int) -> int:
        """`elements` (the whole model's or all its trained ones) less the routed experts other
        ranks hold under expert parallelism: each rank keeps 1/ep of every layer's experts."""
        if expert_parallel <= 1 or not self.expert_params:
            return elements
        return elements - self.expert_params + self.expert_params // expert_parallel

    def largest_local_layer(self, expert_parallel: int) -> int:
        """The most elements one module owns on a rank (what ZeRO-3 gathers at once)."""
        if not self.expert_params:
            return self.largest_layer
        return max(self.largest_dense_layer, self.largest_expert_layer // expert_parallel)

    def persistent(self, threshold: int) -> int:
        """Elements ZeRO-3 keeps whole on every rank (parameters of at most `threshold` elements)."""
        return sum(n for n in self.param_numels if n <= threshold)


def model_shape(config, lora_rank: int = 0, lora_targets: list[str] | None = None,
                trust_remote_code: bool = False, lora_dropout: float = 0.0,
                head: str = "causal_lm",
                lora_parameters: list[str] | None = None) -> ModelShape:
    """Count parameters on the meta device: no memory, no weights, any size.

    `lora_targets`: module names to adapt, matched like PEFT against the end of each module path
    (`q_proj`, `self_attn.q_proj`); None adapts every linear layer except the output head (PEFT's
    "all-linear"). `lora_parameters`: parameters adapted directly (`peft.target_parameters`: a
    mixture of experts' 3-D weights, one rank-r adapter per expert). With `lora_rank` 0 it is
    full fine-tuning.
    """
    import copy

    import torch

    from dpkit import heads
    from dpkit.metrics import matmul_parameters

    config = heads.configure(copy.deepcopy(config), head)  # a score head: one number per token
    with torch.device("meta"):
        model = heads.auto_class(head).from_config(config, trust_remote_code=trust_remote_code)
    numels = [p.numel() for p in model.parameters()]  # shared (tied) parameters once
    output_layer = (model.get_output_embeddings() if head == "causal_lm"
                    else heads.score_layer(model))
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
        for name, m in model.named_modules():
            is_linear = isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"
            if not is_linear or m is output_layer or (lora_targets and not any(
                    name == t or name.endswith("." + t) for t in lora_targets)):
                continue
            w = m.weight.shape  # Conv1D stores in × out
            fan_in, fan_out = (w[0], w[1]) if type(m).__name__ == "Conv1D" else (w[1], w[0])
            adapters += [lora_rank * fan_in, lora_rank * fan_out]  # A: r×in, B: out×r
            inputs += fan_in
        for name, m in model.named_modules():  # PEFT's ParamWrapper (dpkit/lora.py)
            for pname, p in m.named_parameters(recurse=False):
                if any(f"{name}.{pname}" == t or f"{name}.{pname}".endswith("." + t)
                       for t in lora_parameters or ()):
                    e, out, fan_in = p.shape if p.dim() == 3 else (1, *p.shape)
                    adapters += [lora_rank * e * fan_in, lora_rank * e * out]
        if not adapters:
            from dpkit.errors import RecipeError

            raise RecipeError.one("peft.target_modules", f"no linear layer named {lora_targets}"
                                  " in the model", f"choose among {sorted(names)}")
    from dpkit.moe import experts_of, is_expert_parameter

    experts = experts_of(config)
    expert_owners: dict[str, int] = {}
    for name, p in model.named_parameters():
        if experts is not None and is_expert_parameter(name):
            path = "." + name
            owner = path[1:path.rindex(".experts.") + len(".experts")]
            expert_owners[owner] = expert_owners.get(owner, 0) + p.numel()
    trained_in_full = ([output_layer.weight.numel()] if lora_rank and head != "causal_lm"
                       else [])
    return ModelShape(
        experts=experts.routed if experts else 0,
        experts_per_token=experts.active if experts else 0,
        expert_params=sum(expert_owners.values()), moe_layers=len(expert_owners),
        largest_expert_layer=max(expert_owners.values(), default=0),
        largest_dense_layer=max(sum(p.numel() for n, p in m.named_parameters(recurse=False)
                                    if not is_expert_parameter(f"{name}.{n}"))
                                for name, m in model.named_modules()),
        param_numels=tuple(numels + adapters + trained_in_full),  # PEFT copies the score layer
        trainable_numels=tuple(adapters + trained_in_full or numels),
        largest_layer=largest_layer,
        hidden=h, layers=layers, heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or h // heads,
        intermediate=(getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None)
                      or 4 * h) if experts is None else
        # a mixture of experts: a token's MLP activations are those of the experts it runs
        (experts.active + experts.shared) * (getattr(text, "moe_intermediate_size", None)
                                             or text.intermediate_size),
        vocab=text.vocab_size if head == "causal_lm" else output_layer.out_features,  # score: 1
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
