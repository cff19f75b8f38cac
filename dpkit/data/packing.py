"""Packing: rows concatenated into sequences of up to `max_seq_len` tokens, kept apart.

Each packed sequence carries position ids that restart at 0 for every row, and its row boundaries
(collate's `cu_seq_lens`). With sdpa, dpkit's per-row attention uses the boundaries
(dpkit/attention.py); other kernels get transformers' own packed path, which detects the rows
from the position ids when the forward gets `position_ids`, no attention mask and
`use_cache=False` (eager and sdpa build a block-diagonal mask; flash-attention 2 runs varlen).
With the default `use_cache=True` transformers 5 does not detect the packing and rows silently
attend to each other — dpkit always passes `use_cache=False`, and a test proves packed loss equals
unpacked loss. The first token of every row gets label -100: it is never predicted from the
previous row's last token.

Rows are packed greedily in a seeded shuffled order (one pass, O(rows)): with instruction data
much shorter than `max_seq_len` that fills ~90-98% of every sequence (reported at start).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import torch

from dpkit.data.tokenize import IGNORE, Example


def pack_plan(lengths, max_len: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(order, starts): sequence k holds rows order[starts[k]:starts[k+1]]. Only lengths are
    read, so a million lazily read rows are planned without being materialized."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    starts, used = [], 0
    for pos, i in enumerate(order):
        n = int(lengths[i])
        if not starts or used + n > max_len:
            starts.append(pos)
            used = 0
        used += n
    starts.append(len(order))
    return np.asarray(order, dtype=np.int64), np.asarray(starts, dtype=np.int64)


def pack_rows(rows: list[Example]) -> Example:
    ids, labels, positions = [], [], []
    for ex in rows:
        ids += ex.input_ids
        labels += [IGNORE] + ex.labels[1:]
        positions += list(range(len(ex.input_ids)))
    return Example(ids, labels, positions)


class PackedRows(Sequence):
    """Packed sequences built on demand from (lazily read) rows and a pack plan."""

    def __init__(self, rows, order: np.ndarray, starts: np.ndarray, lengths):
        self.rows, self.order, self.starts = rows, order, starts
        sizes = np.add.reduceat(np.asarray(lengths, dtype=np.int64)[order], starts[:-1]) \
            if len(order) else np.zeros(0, dtype=np.int64)
        self.lengths = sizes

    def __len__(self) -> int:
        return len(self.starts) - 1

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[j] for j in range(*k.indices(len(self)))]
        a, b = int(self.starts[k]), int(self.starts[k + 1])
        return pack_rows([self.rows[int(i)] for i in self.order[a:b]])


def pack(examples, max_len: int, seed: int):
    """Greedy packing in a seeded shuffled order: a list for a list, a lazy sequence for lazily
    read rows (dpkit/data/tokenize.py ArrowRows)."""
    lengths = getattr(examples, "lengths", None)
    if lengths is None:
        lengths = [len(ex.input_ids) for ex in examples]
    order, starts = pack_plan(lengths, max_len, seed)
    packed = PackedRows(examples, order, starts, lengths)
    return packed[:] if isinstance(examples, list) else packed


def fill_ratio(packed, max_len: int) -> float:
    lengths = getattr(packed, "lengths", None)
    total = int(np.sum(lengths)) if lengths is not None else sum(len(p.input_ids) for p in packed)
    return total / max(1, len(packed) * max_len)


def row_lengths(batch: dict[str, torch.Tensor]) -> list[int]:
    """Lengths of the real rows in a batch: segments of restarting position ids when packed,
    else non-padding tokens per row. A sequence-parallel slice carries its micro-batch's."""
    if "row_lengths" in batch:
        return batch["row_lengths"]
    if "position_ids" not in batch:
        return [int(n) for n in batch["attention_mask"].sum(dim=1).tolist() if n]
    lengths = []
    for pos, mask in zip(batch["position_ids"].tolist(), batch["attention_mask"].tolist()):
        starts = [i for i, p in enumerate(pos) if p == 0 and mask[i]]
        end = sum(mask)
        lengths += [b - a for a, b in zip(starts, starts[1:] + [end])]
    return lengths


def row_boundaries(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Offsets of the rows in the flattened batch (int32, ending with its size) and the longest
    row, from CPU position ids that restart at 0 for every row (padding is a segment too)."""
    flat = position_ids.reshape(-1)
    starts = (flat == 0).nonzero().flatten()
    cu = torch.cat([starts, torch.tensor([flat.numel()])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def flatten_padded(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A right-padded batch's real tokens laid end to end in one row, as a packed batch
    (`input_ids`, `labels`, `position_ids` restarting per row, `cu_seq_lens`, `max_length`) plus
    `index`: where each flat token sits in the padded batch (flattened), for `spread` to put
    per-token results back. For objectives that build their rows per step (GRPO's completions):
    the forward then computes no padding. A row's first token is unlabelled (never predicted
    from the previous row's last token)."""
    mask = batch["attention_mask"].bool()
    lengths = [int(n) for n in mask.sum(dim=1).tolist() if n]
    index = mask.reshape(-1).nonzero().flatten()
    ids = batch["input_ids"].reshape(-1)[index].unsqueeze(0)
    labels = batch["labels"].reshape(-1)[index].clone()
    starts = torch.tensor([0] + lengths[:-1]).cumsum(0)
    labels[starts] = IGNORE
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    cu, longest = row_boundaries(positions)
    return {"input_ids": ids, "labels": labels.unsqueeze(0), "position_ids": positions,
            "cu_seq_lens": cu, "max_length": longest, "index": index}


def spread(values: torch.Tensor, flat: dict, shape: torch.Size) -> torch.Tensor:
    """Per-token values of a flattened batch ([1, n] or its first n − k) back in the padded
    layout `shape` ([B, T]), 0 where there was padding."""
    values = values.reshape(-1)
    out = values.new_zeros(shape[0] * shape[1])
    out = out.index_put((flat["index"][:values.numel()],), values)
    return out.view(shape)
