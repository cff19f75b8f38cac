"""Sequence parallelism: the ranks of a group split each row's sequence, wired from DeepSpeed's
Ulysses parts (deepspeed.runtime.sequence_parallel: `parallel_state_sp`, `UlyssesSPAttentionHF`).

With `train.sequence_parallel: S` the world is data-parallel D × sequence-parallel S. Ranks
[kS, (k+1)S) form sequence-parallel group k (DeepSpeed's `initialize_sequence_parallel` layout),
so a rank's data-parallel rank is rank // S (dpkit.run.Run.dp_rank): every rank of a group reads
the same rows from the feed and keeps its 1/S slice of each micro-batch's sequence (`shard`).
In each attention layer DeepSpeed's all-to-all trades the sequence split for a head split —
every rank attends over the whole sequence with heads/S heads — and trades back. Everything
else (embeddings, MLPs, norms, the loss) sees only the rank's slice.

What dpkit adds around DeepSpeed's parts, and why:
- labels are shifted before the split (`shift_labels`, as DeepSpeed's UlyssesSPDataLoaderAdapter
  does): the last token of a slice predicts the first token of the next slice;
- a micro-batch is padded to a multiple of S tokens (at most S-1 tokens, label -100, a segment of
  their own): rows have any length, so no recipe value could make every batch divisible;
- the row boundaries of the whole sequence (`cu_seq_lens`) go to every rank: after the
  all-to-all the attention sees the whole sequence, and packed rows stay apart (dpkit's per-row
  attention, or flash-attention varlen) — DeepSpeed drops the attention mask, which is what kept
  them apart in transformers' sdpa path;
- the loss units are counted on the slices (each target token in exactly one slice), so
  dpkit/step.py's "sum over the global batch / global units" stays exact, given the number of
  ranks DeepSpeed divides the summed gradients by (`gradient_divisor`: world / S at ZeRO 1–2,
  the whole world at ZeRO-3), which Run.train_one_step passes to train_step;
- the attention module is told each call's batch size (the last micro-batch of an epoch, a
  flattened packed micro-batch): DeepSpeed's checks assume the one given at construction.

DeepSpeed's data-loader adapter is not used: it makes each rank of a group read a different
batch and all-gathers them; dpkit's feed gives every rank of a group the same rows already, so
the split is a local slice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dpkit.attention import NAME as ROWS
from dpkit.attention import register as register_rows
from dpkit.attention import why_not_rows
from dpkit.data.packing import row_boundaries
from dpkit.errors import Problem

NAME = "dpkit_ulysses"
IGNORE = -100
SUPPORTED = ("sdpa", "flash_attention_2")


# --------------------------------------------------------------------------- before launch
def problems(recipe, config) -> list[Problem]:
    """What stops this recipe from running sequence-parallel (none when it is off). The world
    size is checked with the batch (dpkit/batch.py)."""
    sp = recipe.train.sequence_parallel
    if sp == 1:
        return []
    out = []
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    if heads % sp:
        options = [d for d in range(2, heads + 1) if heads % d == 0 and (kv % d == 0 or
                                                                         d % kv == 0)]
        out.append(Problem("train.sequence_parallel", f"{sp} does not divide the model's {heads} "
                           f"attention heads", f"use one of {options[:6]} (or 1)"))
    elif kv % sp and sp % kv:
        out.append(Problem("train.sequence_parallel", f"{sp} and the model's {kv} key/value heads:"
                           " neither divides the other", "use a divisor or a multiple of " f"{kv}"))
    attn = recipe.model.attn_implementation
    if attn not in SUPPORTED:
        out.append(Problem("model.attn_implementation", f"{attn} does not work with sequence "
                           "parallelism (eager needs a [sequence, sequence] mask; DeepSpeed "
                           "rebuilds flex_attention's as plain causal, so packed rows would mix)",
                           "use sdpa or flash_attention_2"))
    elif attn == "sdpa" and why_not_rows(text, recipe.data.max_seq_len):
        out.append(Problem("model.attn_implementation", "sdpa under sequence parallelism runs "
                           "without a mask, and this model needs one ("
                           f"{why_not_rows(text, recipe.data.max_seq_len)})",
                           "use flash_attention_2"))
    if recipe.zero.stage == 0:
        out.append(Problem("zero.stage", "0 is not supported with sequence parallelism (DeepSpeed "
                           "clips ZeRO-0 gradients with tensor-parallel bookkeeping that "
                           "sequence parallelism would skew)", "use zero.stage 1, 2 or 3"))
    if recipe.peft is not None and recipe.peft.method == "qlora":
        out.append(Problem("peft.method", "qlora is not supported with sequence parallelism",
                           "use lora, or train.sequence_parallel: 1"))
    return out


# ---------------------------------------------------------------------------- on the ranks
def gradient_divisor(ds_config: dict, data_parallel: int, world_size: int) -> int:
    """The number of ranks DeepSpeed divides the summed gradients by; dpkit/step.py multiplies
    the loss by it, so that the update is "sum over the global batch / global units".

    ZeRO 0–2 divide by the data-parallel ranks, world / S: the S ranks of a sequence-parallel
    group each hold part of the same rows' gradient, to be summed. ZeRO-3 reduce-scatters through
    `reduce_scatter_coalesced`, which divides by its whole group — every rank — and does not
    multiply S back (DeepSpeed 0.19 stage3 `__avg_scatter_grads`; only the contiguous path, taken
    with `reduce_scatter: false` and small buckets, does; zero.py refuses that combination). Under
    Adam a gradient S times too small moves the weights almost as far — the ~1e-6 per step this
    once drifted from one process — but gradient clipping and the logged norm were S times off.
    """
    zo = ds_config.get("zero_optimization", {})
    if zo.get("stage", 0) == 3 and zo.get("reduce_scatter", True):
        return world_size
    return data_parallel


def shard(batch: dict, sp: int, rank: int) -> dict:
    """This rank's slice of a collated CPU micro-batch: labels shifted first, padded to a
    multiple of `sp`, global row boundaries and (on the group's first rank) the row lengths
    kept for the step's counters."""
    from dpkit.data.packing import row_lengths

    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    rows, length = ids.shape
    pad = (-length) % sp
    shifted = F.pad(labels[:, 1:], (0, 1 + pad), value=IGNORE)
    if "position_ids" in batch:  # packed: the padding is a row of its own
        tail = torch.arange(pad).expand(rows, pad)
        positions = torch.cat([batch["position_ids"], tail], dim=1)
    else:  # plain right-padded rows: one causal segment each, padding at its end
        positions = torch.arange(length + pad).expand(rows, -1).contiguous()
    cu, longest = row_boundaries(positions)
    full = {"input_ids": F.pad(ids, (0, pad), value=0), "labels": F.pad(labels, (0, pad),
                                                                      value=IGNORE),
            "attention_mask": F.pad(mask, (0, pad), value=0), "shift_labels": shifted,
            "position_ids": positions}
    chunk = (length + pad) // sp
    out = {k: v[:, rank * chunk:(rank + 1) * chunk].contiguous() for k, v in full.items()}
    out.update(cu_seq_lens=cu, max_length=longest,
               real=bool((labels != IGNORE).any()),
               row_lengths=row_lengths(batch) if rank == 0 else [])
    return out


class ShardedFeed:
    """A feed whose micro-batches are this rank's slices (checkpoint state: the inner feed's)."""

    def __init__(self, feed, sp: int, rank: int):
        self.feed, self.sp, self.rank = feed, sp, rank

    def micro_batches(self, step: int) -> list[dict]:
        return [shard(b, self.sp, self.rank) for b in self.feed.micro_batches(step)]

    def __getattr__(self, name):  # epoch, state_dict, load_state_dict, steps_per_epoch
        return getattr(self.feed, name)


class SequenceParallel:
    """The process groups and attention of one sequence-parallel run (`start` once per run,
    `close` at its end: several runs may share a process, as the tests' driver does)."""

    def __init__(self, size: int, rank: int, mpu, core: str):
        self.size, self.rank, self.mpu, self.core = size, rank, mpu, core

    @classmethod
    def start(cls, recipe, model_config) -> SequenceParallel | None:
        size = recipe.train.sequence_parallel
        if size == 1:
            return None
        from deepspeed.runtime.sequence_parallel import parallel_state_sp as mpu

        mpu.initialize_sequence_parallel(sequence_parallel_size=size)
        attn = recipe.model.attn_implementation
        core = ROWS if attn == "sdpa" else attn  # the mask is dropped: rows from cu_seq_lens
        if core == ROWS:
            register_rows()
        _register_attention(model_config, core, recipe.train.micro_batch_size,
                            mpu.get_sequence_parallel_group())
        return cls(size, mpu.get_sequence_parallel_rank(), _deepspeed_mpu(mpu), core)

    @property
    def flat(self) -> bool:
        """Packed sequences can be laid end to end in one row (the core reads cu_seq_lens)."""
        return True

    def install(self, model) -> None:
        """Point the model's attention at the Ulysses wrapper (after it is built; not saved:
        config.json keeps the recipe's implementation)."""
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.set_attn_implementation(NAME)

    def shard(self, batch: dict) -> dict:
        return shard(batch, self.size, self.rank)

    def wrap(self, feed) -> ShardedFeed:
        return ShardedFeed(feed, self.size, self.rank)

    def describe(self) -> str:
        return (f"sequence parallel {self.size} (rank {self.rank} of its group): DeepSpeed "
                f"Ulysses all-to-all around {self.core} attention")

    def close(self) -> None:
        """Forget this run's groups: DeepSpeed keeps them in module globals."""
        from deepspeed.utils import groups

        self.mpu.release()
        if groups.mpu is self.mpu:
            groups.mpu = None


def _deepspeed_mpu(state):
    """DeepSpeed's sequence-parallel state as passed to deepspeed.initialize, saying tensor
    parallel 1. `parallel_state_sp` aliases "model parallel" to the sequence-parallel group;
    DeepSpeed's ZeRO treats it as model-parallel 1 (one model-states file per checkpoint), but the
    checkpoint metadata then records tp_degree = S and ds_to_universal refuses the checkpoint
    ("model-state file count 1 does not match pp_degree=1 * tp_degree=2",
    deepspeed/checkpoint/reshape_3d_utils.py), and a universal load slices by tp rank."""
    from types import SimpleNamespace

    names = [n for n in dir(state) if n.startswith(("get_", "initialize_"))]
    return SimpleNamespace(**{n: getattr(state, n) for n in names},
                           get_tensor_model_parallel_world_size=lambda: 1,
                           get_tensor_model_parallel_rank=lambda: 0,
                           release=state._release_sequence_parallel_groups)


def _register_attention(config, core: str, micro: int, group) -> None:
    """Register `dpkit_ulysses`: DeepSpeed's UlyssesSPAttentionHF around the core kernel."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    uattn = UlyssesSPAttentionHF(
        attn=ALL_ATTENTION_FUNCTIONS[core], batch_size=micro, attn_head_count=heads,
        attn_head_size=getattr(text, "head_dim", None) or text.hidden_size // heads,
        kv_head_count=getattr(text, "num_key_value_heads", None) or heads,
        num_hidden_layers=text.num_hidden_layers, process_group=group,
        seq_length_is_variable=True)
    uattn.core_attn_implementation = core

    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        _fit_batch(uattn, query.shape[0])
        # No mask: it would be the slice's, and [sequence, sequence] in size. Causality comes
        # from the kernel, rows from the whole sequence's cu_seq_lens / position ids.
        return uattn(module, query, key, value, None, *args, **kwargs)

    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, lambda *args, **kwargs: None)


def _fit_batch(uattn, rows: int) -> None:
    """UlyssesSPAttentionHF checks shapes against the batch size it was built with; with
    `seq_length_is_variable` it updates the sequence dimension per call, not the rows."""
    if uattn.batch_size == rows:
        return
    uattn.batch_size = rows
    for name in ("required_query_shape", "required_key_value_shape", "required_context_shape"):
        shape = list(getattr(uattn, name))
        shape[1] = rows
        setattr(uattn, name, torch.Size(shape))
