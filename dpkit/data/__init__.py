"""Data: formats, tokenization with prompt masking, packing, per-rank sharding, collate.

    load.py      sources (hub or local), rendering of each format, tokenization, sharding, collate
    packing.py   rows concatenated into sequences of max_seq_len, kept apart by position ids

The names most callers need are re-exported here (`from dpkit import data as D`).
"""

from dpkit.data.load import (ALPACA_NO_INPUT, ALPACA_WITH_INPUT, IGNORE, LOCAL_SUFFIXES,  # noqa: F401
                             DataStats, Example, collate, column_problems, epoch_order,
                             eval_micro_batches, is_local_source, load_datasets, load_source,
                             render, shard, step_micro_batches, steps_per_epoch, target_tokens,
                             tokenize_row, tokenize_source)
