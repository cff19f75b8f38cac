"""Data: formats, tokenization with prompt masking, packing, per-rank sharding, collate.

    formats.py   the format registry: name -> columns, rendering (alpaca, messages, text, ...)
    tokenize.py  batched tokenization with masking; tokenized rows read lazily from Arrow
    load.py      sources (hub or local), column checks, sharding, collate
    rows.py      row kinds: how a format's rows are tokenized and assembled; `load_datasets`
    cache.py     tokenize once per node into an on-disk cache keyed by what changes the tokens
    mixture.py   data mixtures: sources drawn by weight or count by a deterministic quota schedule
    stream.py    `StreamFeed`: corpora larger than memory, read as streams with a saved position
    packing.py   rows concatenated into sequences of max_seq_len, kept apart by position ids
    feed.py      `RowFeed`, `MixtureFeed`: a rank's micro-batches for a step

The names most callers need are re-exported here (`from dpkit import data as D`).
"""

from dpkit.data.formats import ALPACA_NO_INPUT, ALPACA_WITH_INPUT, FORMATS, render  # noqa: F401
from dpkit.data.load import (  # noqa: F401
                             LOCAL_SUFFIXES,
                             collate,
                             column_problems,
                             epoch_order,
                             eval_micro_batches,
                             is_local_source,
                             load_source,
                             shard,
                             step_micro_batches,
                             steps_per_epoch,
                             target_tokens,
)
from dpkit.data.rows import load_datasets  # noqa: F401
from dpkit.data.tokenize import IGNORE, DataStats, Example, tokenize_row  # noqa: F401
