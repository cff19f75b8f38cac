"""Long sequences in `dpkit plan`: the recipe's sequence parallelism, tiled loss, tiled MLP and
activation offload as memory-model inputs, and `--find-max-seq-len`: the longest sequence that
fits the GPUs for the recipe's ZeRO setup, with and without each memory saver.

The arithmetic is dpkit/plan/memory.py's (Setup.tokens: a rank holds activations for its 1/S of
each sequence; the tiled loss holds one tile of logits). The search is a bisection on the
sequence length over that estimate.
"""

from __future__ import annotations

from dataclasses import replace

from dpkit.plan.memory import GiB, ModelShape, Setup, estimate
from dpkit.plan.recommend import knobs, resolved_ds_config, setup_for

SEARCH_LIMIT = 1 << 24  # 16M tokens: past every published figure (ALST: 15M on 32 H100s)
STEP = 1024  # lengths are reported in multiples of this


def recipe_setup(recipe, hw, shape: ModelShape) -> Setup:
    """The recipe's own ZeRO stage, offload and micro batch on this hardware."""
    z = recipe.zero
    kn = knobs(resolved_ds_config(recipe, hw.world_size, shape.hidden))
    return setup_for(recipe, z.stage, z.offload_optimizer, z.offload_params, hw,
                     recipe.train.micro_batch_size, kn)


def fits(shape: ModelShape, setup: Setup, hw) -> bool:
    b = estimate(shape, setup)
    return b.gpu_total <= hw.gpu_memory and (hw.cpu_memory is None
                                             or b.cpu_per_node <= hw.cpu_memory)


def max_seq_len(shape: ModelShape, setup: Setup, hw) -> int:
    """Longest multiple of STEP (and of the sequence-parallel degree) that fits; 0 if none."""
    unit = STEP * setup.sequence_parallel
    if not fits(shape, replace(setup, seq_len=unit), hw):
        return 0
    lo, hi = 1, SEARCH_LIMIT // unit  # in units; lo fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(shape, replace(setup, seq_len=mid * unit), hw):
            lo = mid
        else:
            hi = mid - 1
    return lo * unit


def variants(setup: Setup, gpus_per_node: int) -> list[tuple[str, Setup]]:
    """The recipe as written, then each memory saver turned on or off."""
    tiled = {"loss_tile": setup.loss_tile or 1024, "loss_auto": False}  # compute.loss=tiled
    out = [("recipe as written", setup),
           ("full logits (compute.loss=full)", replace(setup, loss_tile=None)),
           ("tiled loss", replace(setup, **tiled)),
           ("+ gradient checkpointing", replace(setup, **tiled, gradient_checkpointing=True)),
           ("+ activation offload", replace(setup, **tiled, gradient_checkpointing=True,
                                            offload_activations=True)),
           ("+ tiled MLP", replace(setup, **tiled, gradient_checkpointing=True,
                                   offload_activations=True, tiled_mlp=True))]
    sp = gpus_per_node
    if setup.world_size % sp == 0 and sp != setup.sequence_parallel:
        out.append((f"+ sequence parallel {sp}", replace(out[-1][1], sequence_parallel=sp)))
    return out


def render_max_seq_len(recipe, hw, shape: ModelShape) -> str:
    """`dpkit plan --find-max-seq-len`: one line per variant."""
    setup = recipe_setup(recipe, hw, shape)
    lines = [f"longest sequence per row that fits {hw.world_size} GPU(s) × "
             f"{hw.gpu_memory / GiB:.0f} GiB (ZeRO-{setup.stage}, {setup.label} offload, micro "
             f"batch {setup.micro_batch}, {recipe.model.dtype}; margin included):"]
    for name, s in variants(setup, hw.gpus_per_node):
        n = max_seq_len(shape, s, hw)
        keys = (f"sequence_parallel={s.sequence_parallel}, loss={'tiled' if s.loss_tile else 'full'}"
                f", checkpointing={'on' if s.gradient_checkpointing else 'off'}"
                f", offload={'on' if s.offload_activations else 'off'}"
                f", tiled_mlp={'on' if s.tiled_mlp else 'off'}")
        peak = estimate(shape, replace(s, seq_len=n)).gpu_total / GiB if n else 0.0
        lines.append(f"  {name:<34} {n:>10,} tokens  ({peak:5.1f} GiB; {keys})" if n else
                     f"  {name:<34} {'none':>10}         ({keys})")
    return "\n".join(lines)
