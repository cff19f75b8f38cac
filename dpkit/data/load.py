"""Data: load sources (hub or local), check their columns, tokenize them into rows, shard per
rank, collate. Formats are in formats.py, tokenization in tokenize.py, the tokenize-once cache in
cache.py, streams in stream.py.

Sharding: each epoch has one global order (a permutation seeded by `train.seed + epoch`); rank r
reads rows r, r+W, r+2W, … of it. Step s of the epoch takes the next micro × accumulation rows of
every rank's shard, which together are exactly rows [s·B, (s+1)·B) of the global order — the same
batch a single process would see. When the row count isn't divisible by the global batch B, the
last step of the epoch is smaller (nothing dropped, nothing repeated); a rank whose shard is used
up feeds an all-masked micro-batch so that the collectives stay in step and it adds no gradient.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from dpkit.data import formats, mixture
from dpkit.data.checks import bad_json_line, row_problems
from dpkit.data.packing import row_boundaries
from dpkit.data.formats import ALPACA_NO_INPUT, ALPACA_WITH_INPUT, FORMATS  # noqa: F401
from dpkit.data.tokenize import (  # noqa: F401
    IGNORE,
    TRUNCATED,
    ArrowRows,
    DataStats,
    Example,
    status_and_lengths,
    tokenize_dataset,
    tokenize_row,
)
from dpkit.errors import Problem, RecipeError

if TYPE_CHECKING:  # the schema imports dpkit.data.formats: no runtime import back
    from dpkit.recipe import DataSection, DataSource

LOCAL_SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
# Local files are read again, not from datasets' own Arrow copy: that copy is keyed on the
# file's path and mtime, so an edit keeping the mtime (`cp -p`, `touch -r`) read stale rows.
FRESH = "force_redownload"

# ------------------------------------------------------------------------------------ loading
# Suffixes of data files (read or not): a path ending in one is a file, never a hub dataset name.
FILE_SUFFIXES = {*LOCAL_SUFFIXES, ".txt", ".tsv", ".gz", ".zst", ".bz2", ".xz", ".zip", ".arrow",
                 ".xlsx", ".yaml", ".yml"}


def is_local_source(source: DataSource) -> bool:
    """A local file or directory: it exists, or it is written like a path (a data file suffix,
    `./`, `/`, more than one `/`) rather than a hub dataset name."""
    from dpkit.shipped import looks_local

    path = Path(source.path).expanduser()
    return path.suffix in FILE_SUFFIXES or looks_local(source.path)


def load_source(source: DataSource, where: str):
    """A `datasets.Dataset` for one source: a local file or a hub dataset."""
    import datasets

    path = Path(source.path).expanduser()
    if path.is_dir():  # a dataset repository cloned or saved locally: the hub code path
        return _hub_or_dir(source, where)
    if is_local_source(source):
        if not path.is_file():
            raise RecipeError.one(f"{where}.path", f"file '{source.path}' not found (relative paths "
                                  f"are read from {Path.cwd()})", "check the path")
        builder = LOCAL_SUFFIXES.get(path.suffix)
        if builder is None:
            raise RecipeError.one(f"{where}.path", f"unsupported file type '{path.suffix}'",
                                  f"use one of {sorted(LOCAL_SUFFIXES)}")
        if path.stat().st_size == 0:
            raise RecipeError.one(f"{where}.path", f"dataset '{source.path}' is empty",
                                  "point it at a file with rows")
        try:
            with _quiet_datasets():  # its own log line would repeat the one error we print
                ds = datasets.load_dataset(builder, data_files=str(path), split="train",
                                           download_mode=FRESH)
        except Exception as e:  # datasets raises many types for a malformed file
            detail = (bad_json_line(path) if builder == "json" else None) or _first_line(e)
            raise RecipeError.one(f"{where}.path", f"could not read '{source.path}' as "
                                  f"{builder}: {detail}", "check the file's format") from None
        if source.max_rows is not None:
            ds = ds.select(range(min(source.max_rows, len(ds))))
        return ds
    return _hub_or_dir(source, where)


def _hub_or_dir(source: DataSource, where: str):
    """`datasets.load_dataset(name)`: a hub dataset, or a local directory laid out like one."""
    import datasets

    local = Path(source.path).expanduser().is_dir()
    try:
        ds = datasets.load_dataset(source.path, source.name, split=source.split,
                                  revision=source.revision, download_mode=FRESH if local else None)
    except Exception as e:  # unknown name, no network, wrong split or config name
        raise RecipeError.one(f"{where}.path", f"could not load dataset '{source.path}': "
                              f"{_first_line(e)}", "check the name, `name` and `split` (a "
                              "local file needs a .json/.jsonl/.parquet/.csv suffix)") from e
    if source.max_rows is not None:
        ds = ds.select(range(min(source.max_rows, len(ds))))
    return ds


@contextmanager
def _quiet_datasets():
    from datasets.utils import logging as ds_logging

    level = ds_logging.get_verbosity()
    ds_logging.set_verbosity(ds_logging.CRITICAL)
    try:
        yield
    finally:
        ds_logging.set_verbosity(level)


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def column_problems(ds, source: DataSource, where: str) -> list[Problem]:
    problems = []
    fmt = formats.get(source.format)
    for canonical in fmt.columns:
        col = source.column(canonical)
        if col not in ds.column_names and canonical not in fmt.optional:
            mapped = f" (mapped from `{canonical}`)" if col != canonical else ""
            problems.append(Problem(
                f"{where}", f"dataset '{source.path}' has no column '{col}'{mapped} for format "
                f"`{source.format}`; its columns are {ds.column_names}",
                f"map it with `{where}.columns: {{{canonical}: <column>}}` or change `format`"))
    if len(ds) == 0:
        problems.append(Problem(f"{where}.path", f"dataset '{source.path}' is empty",
                                "point it at a file with rows"))
    return problems or row_problems(ds, source, where)


# ------------------------------------------------------------------------------- tokenizing
def load_raw(section: DataSection, tokenizer, kinds=("sources", "eval_sources"),
             only: set | None = None) -> list:
    """[(kind, source, datasets.Dataset)] for every source (`only`: those whose (kind, index)
    it holds); every problem is raised at once."""
    raw, problems = [], []
    for kind in kinds:
        for i, source in enumerate(getattr(section, kind)):
            if only is not None and (kind, i) not in only:
                continue
            where = f"data.{kind}[{i}]"
            try:
                ds = load_source(source, where)
            except RecipeError as e:
                problems.extend(e.problems)
                continue
            found = column_problems(ds, source, where)
            found = found or format_problems(ds, source, tokenizer, where)
            problems.extend(found)
            if not found:
                raw.append((kind, source, ds))
    if problems:
        raise RecipeError(problems)
    return raw


def format_problems(ds, source: DataSource, tokenizer, where: str) -> list[Problem]:
    """The format's own check of the first row (e.g. a chat template is needed)."""
    check = formats.get(source.format).problem
    if check is None or len(ds) == 0 or column_problems(ds, source, where):
        return []
    found = check(ds[0], source, tokenizer)
    return [Problem(f"{where}.format", *found)] if found else []


def assemble(parts: list, section: DataSection, seed: int, need_train: bool = True):
    """(train rows, eval rows, stats) from tokenized sources [(kind, source, tokenized ds)]."""
    import pyarrow as pa

    stats, eval_stats = DataStats(), DataStats()
    by_kind: dict[str, list] = {"sources": [], "eval_sources": []}
    for kind, source, tds in parts:
        status, lengths = status_and_lengths(tds)
        (stats if kind == "sources" else eval_stats).add(status, lengths, source.path)
        table = tds.data.table if hasattr(tds.data, "table") else tds.data
        by_kind[kind].append((table, status, lengths))

    def rows_of(kind):
        found = by_kind[kind]
        if not found:
            return [], []
        table = pa.concat_tables([t.select(["input_ids", "labels"]) for t, _, _ in found])
        status = np.concatenate([s for _, s, _ in found])
        lengths = np.concatenate([n for _, _, n in found])
        kept = np.nonzero(status <= TRUNCATED)[0]
        return ArrowRows(table, kept, lengths[kept]), [int((s <= TRUNCATED).sum())
                                                       for _, s, _ in found]

    (train, sizes), (evals, eval_sizes) = rows_of("sources"), rows_of("eval_sources")
    if section.eval_fraction > 0 and len(train) and section.mixture != "concat":
        train, sizes, evals = mixture.hold_out(train, sizes, section.eval_fraction, seed)
    elif section.eval_fraction > 0 and len(train):
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, round(len(train) * section.eval_fraction))
        held = np.zeros(len(train), dtype=bool)
        held[order[:n_eval]] = True
        sizes = mixture.sizes_left(sizes, ~held)
        evals, train = train.select(np.nonzero(held)[0]), train.select(np.nonzero(~held)[0])
    if need_train and not len(train):
        raise RecipeError.one("data.sources", "no training rows left after tokenization "
                              f"({stats.describe()})",
                              "raise data.max_seq_len, use overflow: truncate, or check the data")
    train, evals = mixture.arrange(train, sizes, evals, eval_sizes, section, seed, stats)
    return train, evals, stats


def tokenize_or_explain(ds, source: DataSource, tokenizer, section: DataSection, num_proc: int,
                        **kwargs):
    """`tokenize_dataset`, a malformed row (a turn without role, a template error) named as one
    line rather than a traceback from a map worker."""
    try:
        return tokenize_dataset(ds, source, tokenizer, section, num_proc, **kwargs)
    except Exception as e:
        raise RecipeError.one(f"'{source.path}'", f"a row can't be rendered as "
                              f"`{source.format}`: {_first_line(e)}",
                              "fix or remove the row") from None


# ---------------------------------------------------------------------------------- sharding
def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def shard(order: list[int], rank: int, world_size: int) -> list[int]:
    """This rank's rows of an epoch: disjoint from the other ranks', together all of them."""
    return order[rank::world_size]


def steps_per_epoch(n: int, global_batch_size: int) -> int:
    return -(-n // global_batch_size)


def step_micro_batches(n: int, seed: int, epoch: int, step_in_epoch: int, rank: int,
                       world_size: int, micro: int, accum: int,
                       lengths=None, order: list[int] | None = None) -> list[list[int]]:
    """Row indices of this rank's `accum` micro-batches for one optimizer step (some may be []).

    With `lengths` (group_by_length), the step's global batch — the same rows — is sorted by
    length and cut into micro-batches of similar rows, dealt round-robin to the ranks so each
    gets a mix: less padding, same step. `order`: the epoch's order when already known.
    """
    order = epoch_order(n, seed, epoch) if order is None else order
    if lengths is None:
        rows = shard(order, rank, world_size)
        per_step = micro * accum
        mine = rows[step_in_epoch * per_step:(step_in_epoch + 1) * per_step]
        return [mine[i * micro:(i + 1) * micro] for i in range(accum)]
    per_step = micro * accum * world_size
    rows = order[step_in_epoch * per_step:(step_in_epoch + 1) * per_step]
    rows.sort(key=lambda i: lengths[i])
    chunks = [rows[i * micro:(i + 1) * micro] for i in range(accum * world_size)]
    return chunks[rank::world_size]


def eval_micro_batches(n: int, rank: int, world_size: int, micro: int) -> list[list[int]]:
    """Eval rows of this rank, in micro-batches; every rank gets the same number of batches."""
    rows = list(range(n))[rank::world_size]
    largest_shard = -(-n // world_size)
    count = -(-largest_shard // micro)
    return [rows[i * micro:(i + 1) * micro] for i in range(count)]


# --------------------------------------------------------------------------------- collation
def collate(examples: list[Example], pad_id: int, flatten: bool = False) -> dict:
    """Right-pad to the longest row. An empty list gives one fully masked row (adds nothing).
    Packed sequences also get their position ids and row boundaries (`cu_seq_lens`, int32
    offsets in the flattened batch, and `max_length`, the longest row, an int).

    `flatten` (packed sequences, for attention that reads `cu_seq_lens`): the sequences are
    laid end to end in a single row instead of padded to the longest — no padding at all."""
    if flatten and examples and examples[0].position_ids is not None:
        examples = [Example([t for ex in examples for t in ex.input_ids],
                            [t for ex in examples for t in ex.labels],
                            [p for ex in examples for p in ex.position_ids])]
    if not examples:
        return {"input_ids": torch.full((1, 2), pad_id, dtype=torch.long),
                "attention_mask": torch.ones((1, 2), dtype=torch.long),
                "labels": torch.full((1, 2), IGNORE, dtype=torch.long)}
    width = max(len(ex.input_ids) for ex in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    packed = examples[0].position_ids is not None
    positions = torch.zeros((len(examples), width), dtype=torch.long) if packed else None
    for i, ex in enumerate(examples):
        n = len(ex.input_ids)
        ids[i, :n] = torch.tensor(ex.input_ids)
        labels[i, :n] = torch.tensor(ex.labels)
        mask[i, :n] = 1
        if packed:  # padding gets its own segment of positions: no real row attends to it
            positions[i, :n] = torch.tensor(ex.position_ids)
            positions[i, n:] = torch.arange(width - n)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if packed:  # row boundaries computed here, on the CPU, so no layer reads them off the GPU
        batch["position_ids"] = positions
        batch["cu_seq_lens"], batch["max_length"] = row_boundaries(positions)
    return batch


def target_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens the loss is computed on (labels shifted by one, as the model predicts the next)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())
