"""The recipe's `compute:` section: how each rank computes its forward and backward — the loss
head, tiled MLP, activation offload, fused kernels. None of it changes the numbers a step
computes (tests/unit/test_tiled_loss.py); it changes the memory and time it takes.

Its own module so that recipe.py stays a list of sections.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ComputeSection(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True,
                              validate_assignment=True)

    loss: Literal["auto", "tiled", "full"] = "auto"
    """The output layer's loss. `tiled`: over tiles of `loss_tile_tokens` tokens, never holding
    the [tokens, vocabulary] logits (dpkit/objectives/head.py), wherever that gives the same
    numbers (a plain linear output layer, logits not rescaled by the model), else the full
    logits with a note in the log; `auto`: the same, for the micro-batches where tiles hold less
    than the full logits (a trained head's fp32 weight gradient makes short ones cheaper whole;
    the log names the size); `full`: always through the model's full logits."""
    loss_tile_tokens: int = Field(default=1024, gt=0)
    """Tokens per tile of the tiled loss: the logits held at once are this × vocabulary."""
    tiled_mlp: bool = False
    """Run each decoder MLP over tiles of the sequence (DeepSpeed's TiledMLP, recomputed in the
    backward): for very long sequences, where the MLP's intermediate activations dominate."""
    offload_activations: bool = False
    """Keep the tensors saved for the backward in CPU memory (with
    `model.gradient_checkpointing`: each layer's checkpointed input, as ALST does)."""
    liger: bool = False
    """On CUDA with `liger-kernel` installed (`pip install dpkit[gpu]`): Liger's fused RMSNorm,
    RoPE and SwiGLU kernels and its fused linear cross-entropy replace the model's. Ignored (with
    a note) elsewhere."""
