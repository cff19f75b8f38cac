"""Data: load (hub or local file), format, tokenize with prompt masking, shard per rank, collate.

Masking works on the rendered text: each row becomes text plus the character spans that are
trained on (the alpaca response, each assistant turn). The whole text is tokenized at once — so
the model sees exactly what it will see at inference — and a token is trained on when it starts
inside a trained span. Labels are -100 everywhere else (prompt, template markup, padding).

Sharding: each epoch has one global order (a permutation seeded by `train.seed + epoch`); rank r
reads rows r, r+W, r+2W, … of it. Step s of the epoch takes the next micro × accumulation rows of
every rank's shard, which together are exactly rows [s·B, (s+1)·B) of the global order — the same
batch a single process would see. When the row count isn't divisible by the global batch B, the
last step of the epoch is smaller (nothing dropped, nothing repeated); a rank whose shard is used
up feeds an all-masked micro-batch so that the collectives stay in step and it adds no gradient.
"""

from __future__ import annotations

import os
import random
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dpkit.attention import row_boundaries
from dpkit.data.checks import bad_json_line, place, row_problems
from dpkit.errors import Problem, RecipeError
from dpkit.recipe import FORMAT_COLUMNS, OPTIONAL_COLUMNS, DataSection, DataSource

IGNORE = -100
LOCAL_SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int] | None = None
    """Set for packed sequences (restarting at 0 for every row); None for a plain row."""


@dataclass
class DataStats:
    rows: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_target: int = 0
    tokens: int = 0
    per_source: dict[str, int] = field(default_factory=dict)
    prompt_truncated: int = 0
    """Preference pairs whose prompt was cut to `preference.max_prompt_len`."""
    dropped_identical: int = 0
    """Preference pairs left out because chosen and rejected are the same."""

    def describe(self) -> str:
        pairs = (f"; pairs: {self.prompt_truncated} prompts cut to max_prompt_len, "
                 f"{self.dropped_identical} dropped with chosen == rejected"
                 if self.prompt_truncated or self.dropped_identical else "")
        return (f"{self.rows} rows, {self.tokens} tokens; longer than max_seq_len: "
                f"{self.truncated} truncated, {self.dropped_too_long} dropped; "
                f"{self.dropped_no_target} dropped with no trained token{pairs}")


# ------------------------------------------------------------------------------------ loading
# Suffixes of data files (read or not): a path ending in one is a file, never a hub dataset name.
FILE_SUFFIXES = {*LOCAL_SUFFIXES, ".txt", ".tsv", ".gz", ".zst", ".bz2", ".xz", ".zip", ".arrow",
                 ".xlsx", ".yaml", ".yml"}


def is_local_source(source: DataSource) -> bool:
    """A local file or directory: it exists, or it is written like a path (a data file suffix,
    `./`, `/`, more than one `/`) rather than a hub dataset name."""
    from dpkit.model import looks_local

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
                ds = datasets.load_dataset(builder, data_files=str(path), split="train")
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

    try:
        ds = datasets.load_dataset(source.path, source.name, split=source.split)
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
    for canonical in FORMAT_COLUMNS[source.format]:
        col = source.column(canonical)
        optional = OPTIONAL_COLUMNS.get(source.format, set())
        if col not in ds.column_names and canonical not in optional:
            mapped = f" (mapped from `{canonical}`)" if col != canonical else ""
            problems.append(Problem(
                f"{where}", f"dataset '{source.path}' has no column '{col}'{mapped} for format "
                f"`{source.format}`; its columns are {ds.column_names}",
                f"map it with `{where}.columns: {{{canonical}: <column>}}` or change `format`"))
    if len(ds) == 0:
        problems.append(Problem(f"{where}.path", f"dataset '{source.path}' is empty",
                                "point it at a file with rows"))
    return problems or row_problems(ds, source, where)


# --------------------------------------------------------------------------------- formatting
def render(row: dict, source: DataSource, tokenizer, completion_only: bool):
    """(text, trained character spans) for one row. Specials like bos come from the template."""
    if source.format == "text":
        text = row[source.column("text")]
        return text, [(0, len(text))], True
    if source.format == "alpaca":
        inp = row.get(source.column("input")) or ""
        template = ALPACA_WITH_INPUT if inp.strip() else ALPACA_NO_INPUT
        prompt = template.format(instruction=row[source.column("instruction")], input=inp)
        text = prompt + row[source.column("output")]
        span = (len(prompt) if completion_only else 0, len(text))
        return text, [span], True
    messages = row[source.column("messages")]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    if not completion_only:
        return text, [(0, len(text))], False
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(tokenizer.apply_chat_template(messages[:i], tokenize=False,
                                                  add_generation_prompt=True))
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        # Some templates end the last turn differently (Phi-3.5 adds eos only after it): the
        # turn ends where this rendering stops agreeing with the whole conversation's.
        end = len(os.path.commonprefix([upto, text]))
        spans.append((start, end))
    return text, spans, False


def tokenize_row(row: dict, source: DataSource, tokenizer, completion_only: bool) -> Example:
    text, spans, plain_text = render(row, source, tokenizer, completion_only)
    # alpaca/text: the tokenizer adds bos as for any prompt, and we append eos (trained) so the
    # model learns to stop. messages: the chat template already holds every special token.
    enc = tokenizer(text, add_special_tokens=plain_text, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    labels = []
    for tok, (start, end) in zip(ids, offsets):
        trained = end > start and any(a <= start < b for a, b in spans)
        labels.append(tok if trained else IGNORE)
    if plain_text:
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    return Example(ids, labels)


def tokenize_source(ds, source: DataSource, tokenizer, section: DataSection, stats: DataStats):
    examples = []
    for i, row in enumerate(ds):
        try:
            ex = tokenize_row(row, source, tokenizer, section.completion_only_loss)
        except Exception as e:  # a malformed row (a turn without role, a template error)
            raise RecipeError.one(f"'{source.path}'", f"{place(source, i)} can't be rendered "
                                  f"as `{source.format}`: {_first_line(e)}",
                                  "fix or remove the row") from None
        too_long = len(ex.input_ids) > section.max_seq_len
        if too_long and section.overflow == "drop":
            stats.dropped_too_long += 1
            continue
        if too_long:
            ex = Example(ex.input_ids[: section.max_seq_len], ex.labels[: section.max_seq_len])
        if all(label == IGNORE for label in ex.labels[1:]):
            stats.dropped_no_target += 1  # e.g. a prompt so long that truncation cut the answer
            continue
        stats.truncated += too_long
        examples.append(ex)
        stats.tokens += len(ex.input_ids)
    stats.rows += len(examples)
    stats.per_source[source.path] = stats.per_source.get(source.path, 0) + len(examples)
    return examples


def load_datasets(section: DataSection, tokenizer, seed: int, max_prompt_len: int | None = None):
    """(train examples, eval examples, stats). Every problem is raised at once.
    `max_prompt_len` (preference pairs): prompt tokens kept, see dpkit/data/preference.py."""
    raw, problems = [], []
    for kind, sources in (("sources", section.sources), ("eval_sources", section.eval_sources)):
        for i, source in enumerate(sources):
            where = f"data.{kind}[{i}]"
            try:
                ds = load_source(source, where)
            except RecipeError as e:
                problems.extend(e.problems)
                continue
            found = column_problems(ds, source, where)
            if source.format == "preference":
                from dpkit.data.preference import pair_problems

                found.extend(pair_problems(ds, source, tokenizer, where) if not found else [])
            elif source.format == "messages" and not getattr(tokenizer, "chat_template", None):
                found.append(Problem(f"{where}.format", "`messages` needs a chat template and "
                                     "the tokenizer has none", "set model.chat_template (e.g. "
                                     "chatml) or use a tokenizer with one"))
            problems.extend(found)
            if not found:
                raw.append((kind, source, ds))
    if problems:
        raise RecipeError(problems)
    stats, eval_stats = DataStats(), DataStats()
    train, evals = [], []
    for kind, source, ds in raw:
        target, st = (train, stats) if kind == "sources" else (evals, eval_stats)
        if source.format == "preference":
            from dpkit.data.preference import tokenize_pairs

            target.extend(tokenize_pairs(ds, source, tokenizer, section, st, max_prompt_len))
        else:
            target.extend(tokenize_source(ds, source, tokenizer, section, st))
    if section.eval_fraction > 0:
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, round(len(train) * section.eval_fraction))
        held = set(order[:n_eval])
        evals = [train[i] for i in sorted(held)]
        train = [ex for i, ex in enumerate(train) if i not in held]
    if not train:
        raise RecipeError.one("data.sources", "no training rows left after tokenization "
                              f"({stats.describe()})",
                              "raise data.max_seq_len, use overflow: truncate, or check the data")
    return train, evals, stats


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
                       lengths: list[int] | None = None) -> list[list[int]]:
    """Row indices of this rank's `accum` micro-batches for one optimizer step (some may be []).

    With `lengths` (group_by_length), the step's global batch — the same rows — is sorted by
    length and cut into micro-batches of similar rows, dealt round-robin to the ranks so each
    gets a mix: less padding, same step.
    """
    if lengths is None:
        rows = shard(epoch_order(n, seed, epoch), rank, world_size)
        per_step = micro * accum
        mine = rows[step_in_epoch * per_step:(step_in_epoch + 1) * per_step]
        return [mine[i * micro:(i + 1) * micro] for i in range(accum)]
    per_step = micro * accum * world_size
    rows = epoch_order(n, seed, epoch)[step_in_epoch * per_step:(step_in_epoch + 1) * per_step]
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
