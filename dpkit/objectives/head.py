"""The output head without the full logits: next-token losses computed tile by tile.

A causal LM's last step turns hidden states [tokens, hidden] into logits [tokens, vocabulary]
and a log-softmax over them; in fp32 that is 4·V bytes per token (8k tokens × 128k vocabulary:
4 GiB for one row), often the largest tensor of the step. Here the hidden states leave the model
(`forward_hidden`: the model runs with `logits_to_keep` empty) and `token_nll` computes the
loss over tiles of `tile` tokens: a tile's logits exist only while that tile is computed, in the
forward and again in the backward (one extra head matmul per token, as DeepSpeed's ALST does).

Why not DeepSpeed's own `TiledFusedLogitsLoss`: it runs the head's backward inside the forward
with an incoming gradient of 1 and only rescales the hidden-state gradient afterwards
(ulysses_sp.py, its `backward`: `x_grad *= grads[0]`), so the weight gradient of `lm_head` misses
every scale applied to the loss — DeepSpeed's own 1/accumulation and dpkit's 1/global-units
(dpkit/step.py). `sequence_tiled_compute` calls `autograd.backward` once per tile on the real
parameter, so ZeRO's gradient hooks fire per tile and, with tied embeddings, again for the
embedding. This function is one autograd node: it returns the weight gradient like any layer, so
ZeRO, loss scaling and tied weights see nothing unusual. Under ZeRO-3 it runs inside the head
module's own call (`_call_head`), so DeepSpeed gathers the weight for the forward and backward.

`token_nll` returns one number per token (0 where the label is -100): its sum is SFT's loss and
its negation the per-token log-probabilities a preference objective sums per sequence.
`token_nll_entropy` divides the logits by a temperature first (GRPO's sampling temperature) and
also gives each position's entropy, from the same tile's logits (no gradient).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100
DEFAULT_TILE = 1024
"""Tokens per tile: the logits held at once are tile × vocabulary × (4 + dtype bytes)."""


def tiling_threshold(tile: int, hidden: int, dtype_bytes: int, head_trained: bool,
                     softcap: bool = False) -> int:
    """The fewest tokens in a micro-batch (on this rank) for which tiles hold less than the full
    logits. Per vocabulary entry, full: each token's logits, their fp32 log-softmax and its
    gradient, (8 + 2b) bytes ((8 + 3b) soft-capped); tiled: one tile's worth plus, when the head
    is trained, its fp32 weight gradient summed over tiles (4·hidden) — so a trained head gains
    only past tile + 4·hidden / (8 + 2b) tokens (2,390 for a 1024-token tile, hidden 4096, bf16).
    The planner counts the same bytes (dpkit/plan/memory.py)."""
    full = 8 + 2 * dtype_bytes + (dtype_bytes if softcap else 0)
    tiled = tile * (8 + 2 * dtype_bytes) + (4 * hidden if head_trained else 0)
    return max(tile + 1, tiled // full + 1)


def wide(dtype: torch.dtype) -> torch.dtype:
    """The dtype losses and log-probs are computed in: fp32, or the model's when wider (fp64 in
    tests that resolve 1e-6 on sums of hundreds of tokens)."""
    return torch.promote_types(dtype, torch.float32)


def head_transform(config) -> str | None:
    """Why the tiled head would compute something other than the model's own logits, or None.
    Soft-capped logits (Gemma-2) are handled; other post-head rescalings are not."""
    for attr in ("logit_scale", "logits_scaling", "output_multiplier_scale"):
        value = getattr(config, attr, None)
        if value not in (None, 1, 1.0):
            return f"the model rescales its logits ({attr}={value})"
    return None


def plain_head(model):
    """The model's output layer when it is a plain linear layer the tiles can call, else None
    (a PEFT wrapper around the head, a quantized head)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear:
        return None
    return head


class _TiledNLL(torch.autograd.Function):
    """Per-token negative log-likelihood of `labels` under softmax(logits / temperature), logits
    = hidden @ weightᵀ + bias, tile by tile; logits are computed in the weight's dtype and
    soft-capped/upcast to fp32 exactly as the plain path does. Second output: each position's
    entropy (not differentiable; empty unless `entropy`), from the same tile's logits."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, tile, softcap, temperature=1.0,
                entropy=False):
        ctx.tile, ctx.softcap, ctx.temperature = tile, softcap, temperature
        ctx.save_for_backward(hidden, weight, bias, labels)
        out = torch.zeros(labels.shape, dtype=wide(weight.dtype), device=hidden.device)
        ent = torch.zeros(labels.shape if entropy else (0,), dtype=out.dtype, device=out.device)
        with torch.no_grad():
            for lo in range(0, labels.numel(), tile):
                h, y = hidden[lo:lo + tile], labels[lo:lo + tile]
                if entropy:
                    out[lo:lo + tile], ent[lo:lo + tile] = _nll(h, weight, bias, y, softcap,
                                                                temperature, True)
                else:
                    out[lo:lo + tile] = _nll(h, weight, bias, y, softcap, temperature)
        ctx.mark_non_differentiable(ent)
        return out, ent

    @staticmethod
    def backward(ctx, grad_out, _grad_entropy):
        hidden, weight, bias, labels = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=wide(weight.dtype)) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=wide(bias.dtype)) if need_b else None
        w = weight.detach().requires_grad_(need_w)
        b = bias.detach().requires_grad_(need_b) if bias is not None else None
        for lo in range(0, labels.numel(), ctx.tile):
            h = hidden[lo:lo + ctx.tile].detach().requires_grad_(need_h)
            g = grad_out[lo:lo + ctx.tile]
            with torch.enable_grad():
                nll = _nll(h, w, b, labels[lo:lo + ctx.tile], ctx.softcap, ctx.temperature)
            wanted = [t for t, need in ((h, need_h), (w, need_w), (b, need_b)) if need]
            grads = iter(torch.autograd.grad(nll, wanted, g))
            if need_h:
                grad_h[lo:lo + ctx.tile] = next(grads)
            if need_w:
                grad_w += next(grads)  # fp32 sum over tiles, cast once below
            if need_b:
                grad_b += next(grads)
        return (grad_h, grad_w.to(weight.dtype) if need_w else None,
                grad_b.to(bias.dtype) if need_b else None, None, None, None, None, None)


def _nll(hidden, weight, bias, labels, softcap, temperature=1.0, entropy=False):
    logits = F.linear(hidden, weight, bias)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return _from_logits(logits, labels, temperature, entropy)


def _from_logits(logits, labels, temperature=1.0, entropy=False):
    """NLL per position (and, with `entropy`, each position's entropy, without gradient) of
    softmax(logits / temperature), in the wide dtype."""
    logits = logits.to(wide(logits.dtype))
    if temperature != 1.0:  # GRPO's sampling temperature (the loss sees what was sampled)
        logits = logits / temperature
    flat, y = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    nll = F.cross_entropy(flat, y, ignore_index=IGNORE, reduction="none").view(labels.shape)
    if not entropy:
        return nll
    with torch.no_grad():
        logp = F.log_softmax(flat, dim=-1)
        ent = -(logp.exp() * logp).sum(-1).view(labels.shape)
    return nll, ent * (labels != IGNORE)


def token_nll(hidden: torch.Tensor, head: torch.nn.Linear, labels: torch.Tensor,
              tile: int = DEFAULT_TILE, softcap: float | None = None,
              always: bool = True, decide_on: int | None = None) -> torch.Tensor:
    """Per-token NLL [same shape as labels], 0 at label -100, never holding more than `tile`
    tokens' logits. `hidden` [..., hidden] are the final (normed) hidden states, `labels` the
    next-token targets aligned with them (already shifted).

    A batch of at most one tile goes through the full logits: they are no larger than a tile's,
    the numbers are the same, and the backward needs no second head matmul. `always=False`
    (compute.loss: auto) also does so wherever tiling would hold more (`tiling_threshold`).
    `decide_on`: the token count that choice is made on (default: these labels'), so a caller
    passing the labelled positions only chooses as the planner does, on the whole batch."""
    return token_nll_entropy(hidden, head, labels, tile, softcap, always, decide_on)[0]


def token_nll_entropy(hidden: torch.Tensor, head: torch.nn.Linear, labels: torch.Tensor,
                      tile: int = DEFAULT_TILE, softcap: float | None = None,
                      always: bool = True, decide_on: int | None = None,
                      temperature: float = 1.0, entropy: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`token_nll` of softmax(logits / temperature), and with `entropy` each labelled
    position's entropy (no gradient; 0 at label -100) from the same logits, else None."""
    flat_h, flat_y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    n, w = (flat_y.numel() if decide_on is None else decide_on), head.weight
    if n <= tile or not (always or n >= tiling_threshold(tile, head.in_features, w.element_size(),
                                                          w.requires_grad, bool(softcap))):
        out = plain_token_nll(hidden, head, labels, softcap, temperature, entropy)
        return out if entropy else (out, None)
    out, ent = _call_head(head, flat_h, flat_y, tile, softcap, temperature, entropy)
    return out.view(labels.shape), (ent.view(labels.shape) if entropy else None)


def _call_head(head, hidden, labels, tile, softcap, temperature=1.0, entropy=False):
    """Run the tiles as the head module's own forward: DeepSpeed ZeRO-3 gathers a module's
    parameters around its calls (and their backward), not around a bare use of `head.weight`."""
    def tiled(h, y):
        return _TiledNLL.apply(h, head.weight, head.bias, y, tile, softcap, temperature,
                               entropy)

    return _call_module(head, tiled, hidden, labels)


def _call_module(module, fn, *args):
    module.forward = fn  # instance attribute: the class's forward is untouched
    try:
        # the module's hooks (ZeRO-3's gather/release) but not a torch.compile'd call, which
        # would retrace for every new `fn`
        return module._call_impl(*args)
    finally:
        del module.forward


def plain_token_nll(hidden, head, labels, softcap: float | None = None,
                    temperature: float = 1.0, entropy: bool = False):
    """The same numbers through the full logits (reference and fallback): the NLL, or with
    `entropy` (NLL, entropy)."""
    logits = head(hidden)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return _from_logits(logits, labels, temperature, entropy)


def forward_hidden(engine, **inputs) -> torch.Tensor:
    """The model's final hidden states (after the last norm), without computing any logits."""
    out = engine(output_hidden_states=True, use_cache=False,
                 logits_to_keep=torch.zeros(0, dtype=torch.long), **inputs)
    return out.hidden_states[-1]


class LossHead:
    """The output layer as objectives use it: per-token NLL of given next-token labels, tiled or
    through the full logits as `compute.loss` and the model allow. Built once per run
    (`LossHead.for_run`); `LossHead()` is the full path."""

    def __init__(self, head=None, tile: int = DEFAULT_TILE, softcap: float | None = None,
                 liger: bool = False, always: bool = True):
        self.head, self.tile, self.softcap, self.liger = head, tile, softcap, liger
        self.always = always  # compute.loss: tiled; auto tiles where that holds less

    @property
    def tiled(self) -> bool:
        return self.head is not None

    @classmethod
    def for_run(cls, recipe, model, config, liger: bool = False) -> tuple[LossHead, str]:
        """The head for this run and a line saying which path and why. `liger`: Liger's fused
        linear cross-entropy sums SFT's loss (dpkit.kernels.liger_active)."""
        choice = recipe.compute.loss
        if choice == "full":
            return cls(), "full logits (compute.loss: full)"
        head, why = plain_head(model), head_transform(config)
        if head is None:
            why = why or "the output layer is not a plain linear layer (PEFT/quantized head)"
        if why:
            return cls(), f"full logits ({why})"
        softcap = getattr(config, "final_logit_softcapping", None) or None
        tile = recipe.compute.loss_tile_tokens
        if liger:
            return cls(head, tile, softcap, liger=True), "Liger fused linear cross-entropy"
        if choice == "tiled":
            return cls(head, tile, softcap), (f"tiled: {tile} tokens of logits at a time, never "
                                              "the whole [tokens, vocabulary]")
        w = head.weight
        over = tiling_threshold(tile, head.in_features, w.element_size(), w.requires_grad,
                                bool(softcap))
        return cls(head, tile, softcap, always=False), (
            f"tiled: {tile} tokens of logits at a time for micro-batches of {over} tokens or "
            "more (below that the full logits hold less)")

    def token_nll(self, engine, inputs: dict, labels: torch.Tensor) -> torch.Tensor:
        """Forward `inputs` through the engine; NLL per position of `labels` (aligned with the
        inputs, already shifted; -100 where nothing is predicted), 0 where ignored."""
        return self.token_nll_entropy(engine, inputs, labels)[0]

    def token_nll_entropy(self, engine, inputs: dict, labels: torch.Tensor,
                          temperature: float = 1.0, entropy: bool = False
                          ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`token_nll` of softmax(logits / temperature) (GRPO's sampling temperature), and with
        `entropy` each labelled position's entropy (no gradient, 0 where ignored), else None."""
        if self.tiled:
            hidden = forward_hidden(engine, **inputs)
            # Only the positions with a label go through the output layer: prompt, template and
            # padding tokens cost no logits (a preference or KTO batch's prompts are often half
            # its tokens; the head is a quarter of a small model's FLOPs per token).
            scored = labels != IGNORE
            nll, ent = token_nll_entropy(hidden[scored], self.head, labels[scored], self.tile,
                                         self.softcap, self.always, decide_on=labels.numel(),
                                         temperature=temperature, entropy=entropy)

            def placed(values):
                return torch.zeros(labels.shape, dtype=values.dtype,
                                   device=values.device).masked_scatter(scored, values)

            return placed(nll), (placed(ent) if entropy else None)
        logits = engine(use_cache=False, **inputs).logits  # the model applies its own softcap
        out = _from_logits(logits, labels, temperature, entropy)
        return out if entropy else (out, None)

    def loss_sum(self, engine, inputs: dict, labels: torch.Tensor) -> torch.Tensor:
        """Sum of the NLL over the labelled positions (SFT's loss)."""
        if not self.liger:
            return self.token_nll(engine, inputs, labels).sum()
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        hidden = forward_hidden(engine, **inputs)
        flat_h, flat_y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)

        def fused(h, y):  # inside the head's call, for ZeRO-3 (see _call_head)
            return liger_fused_linear_cross_entropy(h, self.head.weight, y, self.head.bias,
                                                    ignore_index=IGNORE, reduction="sum",
                                                    softcap=self.softcap)

        return _call_module(self.head, fused, flat_h, flat_y)


def shifted_labels(batch: dict) -> torch.Tensor:
    """Next-token targets aligned with the inputs: position i holds the label of token i + 1
    (-100 at the end). Sequence-parallel shards carry them already shifted (before the split)."""
    if "shift_labels" in batch:
        return batch["shift_labels"]
    return F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE)
