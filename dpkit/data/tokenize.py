"""Tokenization with prompt masking, batched, and the tokenized rows as a lazy sequence.

Masking works on the rendered text (dpkit/data/formats.py): each row becomes text plus the
character spans that are trained on. The whole text is tokenized at once — so the model sees
exactly what it will see at inference — and a token is trained on when it starts inside a trained
span. Labels are -100 everywhere else (prompt, template markup, padding).

`encode_batch` is the one tokenization function: `datasets.map` calls it (batched, in several
processes, written to Arrow), the stream calls it per window, `tokenize_row` on one row. Rows
that can't be trained on are kept with a status and no tokens, so the counts in the data report
come from the Arrow column, not from state shared between processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from dpkit.data import formats

IGNORE = -100
KEPT, TRUNCATED, TOO_LONG, NO_TARGET = 0, 1, 2, 3


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
    seconds: float = 0.0
    cached: bool = False
    rss_before_mb: float = 0.0  # this process, when data setup began
    peak_rss_mb: float = 0.0    # this process's peak resident set size after data setup
    per_source: dict[str, int] = field(default_factory=dict)
    prompt_truncated: int = 0
    """Preference pairs whose prompt was cut to `preference.max_prompt_len`."""
    dropped_identical: int = 0
    """Preference pairs left out because chosen and rejected are the same."""
    prompts_extracted: int = 0
    """Preference pairs without a `prompt` column whose prompt is the shared beginning of chosen
    and rejected (dpkit/data/preference.render_pair)."""
    notes: list[str] = field(default_factory=list)
    """What data setup repaired on its way (a damaged cache entry rebuilt)."""
    sources: list[dict] = field(default_factory=list)
    """Per train source (dpkit/data/mixture.describe_sources): path, items available, drawn per
    epoch, expected share of an epoch's tokens, unit (rows or packed sequences)."""

    def describe(self) -> str:
        where = "from the cache" if self.cached else "tokenized"
        pairs = (f"; pairs: {self.prompt_truncated} prompts cut to max_prompt_len, "
                 f"{self.dropped_identical} dropped with chosen == rejected, "
                 f"{self.prompts_extracted} prompts extracted from chosen/rejected (no prompt "
                 "column)" if self.prompt_truncated or self.dropped_identical or
                 self.prompts_extracted else "")
        notes = "".join(f"; note: {n}" for n in self.notes)
        return (f"{self.rows} rows, {self.tokens} tokens ({where} in {self.seconds:.1f} s); "
                f"longer than max_seq_len: {self.truncated} truncated, {self.dropped_too_long} "
                f"dropped; {self.dropped_no_target} dropped with no trained token{pairs}{notes}"
                f"{self.describe_sources()}")

    def describe_sources(self) -> str:
        """Per source, when there are several or some are not drawn once per epoch."""
        if len(self.sources) < 2 and all(s["available"] == s["per_epoch"] for s in self.sources):
            return ""
        return "; per source: " + ", ".join(
            f"[{i}] {s['path']} {s['available']} {s['unit']}, {s['per_epoch']} drawn per epoch "
            f"({100 * s['token_share']:.1f}% of an epoch's tokens)"
            for i, s in enumerate(self.sources))

    def add(self, status: np.ndarray, lengths: np.ndarray, path: str) -> None:
        kept = status <= TRUNCATED
        self.rows += int(kept.sum())
        self.truncated += int((status == TRUNCATED).sum())
        self.dropped_too_long += int((status == TOO_LONG).sum())
        self.dropped_no_target += int((status == NO_TARGET).sum())
        self.tokens += int(lengths[kept].sum())
        self.per_source[path] = self.per_source.get(path, 0) + int(kept.sum())


def _untrain_specials(labels: list, specials: list, start: int = 0) -> None:
    """Label -100 on the tokens the post-processor added (bos): the only ones with an empty
    character span in plain text, found at C speed (count, index)."""
    k = 0
    for _ in range(specials.count(1)):
        k = specials.index(1, k)
        if k >= start:
            labels[k] = IGNORE
        k += 1


def _trained_from_start(text: str, spans) -> bool:
    """One trained span covering the whole text: labels need no character offsets."""
    return len(spans) == 1 and spans[0][0] <= 0 and spans[0][1] >= len(text)


def _labels(enc, spans, text_len):
    """Labels for one encoding: a token is trained when it starts inside a trained span."""
    ids = enc.ids
    if len(spans) == 1 and spans[0][1] >= text_len:  # one span to the end: a suffix is trained
        a = spans[0][0]
        k = 0
        if a > 0:
            offsets = enc.offsets
            while k < len(offsets) and (offsets[k][0] < a or offsets[k][1] <= offsets[k][0]):
                k += 1
        labels = [IGNORE] * k + ids[k:]
        _untrain_specials(labels, enc.special_tokens_mask, k)
        return labels
    return [t if e > s and any(a <= s < b for a, b in spans) else IGNORE
            for t, (s, e) in zip(ids, enc.offsets)]


class _Encoding:
    """A slow tokenizer's output in the shape of a fast one's `Encoding`."""

    def __init__(self, ids, offsets):
        self.ids, self.offsets = list(ids), offsets
        self.special_tokens_mask = [int(e <= s) for s, e in offsets]


def _encode(tokenizer, texts: list[str], add_special_tokens: bool, offsets: bool = True) -> list:
    """Encodings (ids, offsets, special_tokens_mask). A fast tokenizer's Rust backend is called
    directly, as the transformers wrapper does, without building dicts nobody reads; offsets are
    only converted to Python where a row needs them. `offsets=False`: rows trained from their
    first character on (plain text) need none, and `encode_batch_fast` skips tracking them
    (about a quarter of the tokenizer's time); their offsets read (0, 0)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        enc = tokenizer(texts, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        return [_Encoding(i, o) for i, o in zip(enc["input_ids"], enc["offset_mapping"])]
    if backend.truncation is not None or backend.padding is not None:
        backend.no_truncation()  # what the wrapper does for a call without truncation/padding
        backend.no_padding()
    if not offsets and hasattr(backend, "encode_batch_fast"):  # tokenizers >= 0.20
        return backend.encode_batch_fast(texts, add_special_tokens=add_special_tokens)
    return backend.encode_batch(texts, add_special_tokens=add_special_tokens)


def encode_batch(batch: dict[str, list], source, tokenizer, max_seq_len: int | None,
                 overflow: str = "truncate", completion_only: bool = True) -> dict[str, list]:
    """Columns input_ids, labels, status for a batch of raw rows (a dict of columns)."""
    render = formats.get(source.format).render
    keys = list(batch)
    n = len(batch[keys[0]]) if keys else 0
    rendered = [render({k: batch[k][i] for k in keys}, source, tokenizer, completion_only)
                for i in range(n)]
    eos = tokenizer.eos_token_id  # a property lookup in transformers: once per batch
    ids_out: list = [None] * n
    labels_out: list = [None] * n
    for plain in (True, False):  # alpaca/text get bos from the tokenizer; templates carry theirs
        which = [i for i in range(n) if rendered[i][2] is plain]
        if not which:
            continue
        texts = [rendered[i][0] for i in which]
        offsets = not all(_trained_from_start(*rendered[i][:2]) for i in which)
        for i, enc in zip(which, _encode(tokenizer, texts, plain, offsets)):
            text, spans, _ = rendered[i]
            labels = _labels(enc, spans, len(text))
            ids = enc.ids
            if plain:  # eos appended and trained on, so the model learns to stop
                ids.append(eos)
                labels.append(eos)
            ids_out[i], labels_out[i] = ids, labels
    status = [KEPT] * n
    for i in range(n):
        ids, labels = ids_out[i], labels_out[i]
        if max_seq_len is not None and len(ids) > max_seq_len:
            if overflow == "drop":
                status[i], ids_out[i], labels_out[i] = TOO_LONG, [], []
                continue
            ids_out[i], labels_out[i] = ids[:max_seq_len], labels[:max_seq_len]
            status[i] = TRUNCATED
        if all(label == IGNORE for label in labels_out[i][1:]):
            # e.g. a prompt so long that truncation cut the answer
            status[i], ids_out[i], labels_out[i] = NO_TARGET, [], []
    return {"input_ids": ids_out, "labels": labels_out, "status": status}


def tokenize_row(row: dict, source, tokenizer, completion_only: bool) -> Example:
    """One row, untruncated (for tests and tools)."""
    out = encode_batch({k: [v] for k, v in row.items()}, source, tokenizer, None,
                       completion_only=completion_only)
    if out["status"][0] == NO_TARGET:
        enc = encode_batch({k: [v] for k, v in row.items()}, source, tokenizer, None,
                           completion_only=False)
        return Example(enc["input_ids"][0], [IGNORE] * len(enc["input_ids"][0]))
    return Example(out["input_ids"][0], out["labels"][0])


FEATURES = None


def features():
    global FEATURES
    if FEATURES is None:
        from datasets import Features, Value
        from datasets import Sequence as Seq

        FEATURES = Features({"input_ids": Seq(Value("int32")), "labels": Seq(Value("int32")),
                             "status": Value("int8")})
    return FEATURES


def tokenize_dataset(ds, source, tokenizer, section, num_proc: int, fingerprint: str,
                     cache_file: str | None = None):
    """`encode_batch` over a whole source (see `map_source`)."""
    return map_source(ds, encode_batch, source, features(), f"tokenizing {source.path}",
                      dict(source=source, tokenizer=tokenizer, max_seq_len=section.max_seq_len,
                           overflow=section.overflow,
                           completion_only=section.completion_only_loss),
                      num_proc=num_proc, fingerprint=fingerprint, cache_file=cache_file)


def map_source(ds, encode, source, features, desc: str, fn_kwargs: dict, num_proc: int = 1,
               fingerprint: str | None = None, cache_file: str | None = None,
               with_indices: bool = False, layouts: str | None = None):
    """`datasets.map` of a row kind's batched `encode` over a whole source: in several processes
    (large sources only: forking costs more on small ones) and written to `cache_file` (Arrow, the
    tokenized-data cache) when given, else in memory. `fingerprint` (the cache key) stands in for
    datasets' own hash of the function, which would pickle and hash the whole tokenizer.
    `layouts`: where the docs show the row layouts; a row `encode` refuses (ValueError) is then
    one line naming the source and that page."""
    import uuid

    kwargs = dict(batched=True, batch_size=1000, with_indices=with_indices, features=features,
                  remove_columns=ds.column_names, desc=desc,
                  new_fingerprint=fingerprint or uuid.uuid4().hex, fn_kwargs=fn_kwargs,
                  num_proc=num_proc if len(ds) >= 20_000 * num_proc and num_proc > 1 else None)
    where = dict(keep_in_memory=True) if cache_file is None else dict(cache_file_name=cache_file)
    try:
        return ds.map(encode, **where, **kwargs)
    except ValueError as e:
        if layouts is None:
            raise
        from dpkit.errors import RecipeError

        raise RecipeError.one(f"data source {source.path}", str(e).splitlines()[0],
                              f"see {layouts}") from None


def status_and_lengths(ds) -> tuple[np.ndarray, np.ndarray]:
    import pyarrow.compute as pc

    table = ds.data.table if hasattr(ds.data, "table") else ds.data
    status = table.column("status").to_numpy()
    lengths = pc.list_value_length(table.column("input_ids")).to_numpy(zero_copy_only=False)
    return status, lengths.astype(np.int64)


class ArrowRows(Sequence):
    """Tokenized rows read on demand from an Arrow table (memory-mapped when it comes from the
    cache, so every rank of a node shares one copy in the page cache)."""

    def __init__(self, table, index: np.ndarray, lengths: np.ndarray):
        self.table, self.index = table, np.asarray(index, dtype=np.int64)
        self.lengths = np.asarray(lengths, dtype=np.int64)  # of the rows in `index`, in order
        self._ids, self._labels = table.column("input_ids"), table.column("labels")

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        j = int(self.index[i])
        return Example(self._ids[j].as_py(), self._labels[j].as_py())

    def select(self, positions: np.ndarray) -> ArrowRows:
        return ArrowRows(self.table, self.index[positions], self.lengths[positions])
