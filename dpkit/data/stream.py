"""Streams: corpora larger than memory, read in order with a position that checkpoints keep.

Rows of the sources are read one after another (a .jsonl file line by line from a byte offset;
anything else through `datasets` streaming, skipping to a row count only when a run resumes: the
windows of one epoch read on from one open stream), and numbered globally:
data-parallel rank r keeps rows r, r+W, r+2W, … — disjoint across ranks, together the whole
stream, and only its own rows are parsed and tokenized. A rank's rows come in windows of
`data.shuffle_buffer`: each window is tokenized in one batch, shuffled with a seed made of
(train.seed, epoch, rank, window) and, with packing, packed within the window. Memory is one
window, whatever the size of the corpus. When the stream ends the next epoch starts it again
with new window seeds.

The position is (epoch, window, where the window's first row is read from, items taken of it):
a window is rebuilt exactly from it, so a run resumed from a checkpoint — also after SIGKILL —
sees the same batches as one that never stopped. `state_dict` gathers every rank's position
(rank 0 writes the checkpoint's dpkit.json).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from dpkit.data.checks import bad_json_line
from dpkit.data.packing import pack
from dpkit.data.tokenize import TRUNCATED, Example, encode_batch
from dpkit.errors import RecipeError

ORIGIN = {"source": 0, "row": 0, "byte": 0, "g": 0}
HEAD_BYTES = 32 << 20  # of a streamed .jsonl checked by validate: well under a second to parse


class Reader:
    """Raw rows of the sources in order from a position; `pos` is where the next row is."""

    def __init__(self, sources, pos: dict, keep):
        self.sources, self.pos, self.keep = sources, dict(pos), keep
        self._it = self._rows()

    def close(self) -> None:
        """Close the open file or stream now (the generator and this object form a cycle that
        only the cyclic garbage collector would otherwise end)."""
        self._it.close()

    def take(self, n: int) -> list[tuple[int, dict]]:
        """Up to n (source index, row) pairs of this rank's rows; fewer at the end."""
        out = []
        for item in self._it:
            out.append(item)
            if len(out) == n:
                break
        return out

    def _rows(self):
        while self.pos["source"] < len(self.sources):
            i = self.pos["source"]
            yield from self._rows_of(i, self.sources[i])
            self.pos = {"source": i + 1, "row": 0, "byte": 0, "g": self.pos["g"]}

    def _advance(self, byte: int = 0) -> bool:
        g = self.pos["g"]
        self.pos = {**self.pos, "row": self.pos["row"] + 1, "byte": byte, "g": g + 1}
        return self.keep(g)

    def _rows_of(self, i: int, source):
        limit = source.max_rows
        path = Path(source.path).expanduser()
        if path.suffix == ".jsonl" and path.is_file():  # our own line reader: seekable
            with open(path, "rb") as f:
                f.seek(self.pos["byte"])
                byte = self.pos["byte"]
                for line in f:
                    start, byte = byte, byte + len(line)
                    if limit is not None and self.pos["row"] >= limit:
                        return
                    if not line.strip():
                        self.pos = {**self.pos, "byte": byte}
                        continue
                    if self._advance(byte):
                        yield i, parse_line(line, path, start)
            return
        ds = open_stream(source)
        skip = self.pos["row"]
        for row in (ds.skip(skip) if skip else ds):
            if limit is not None and self.pos["row"] >= limit:
                return
            if self._advance():
                yield i, row


def parse_line(line: bytes, path: Path, start: int) -> dict:
    """One JSON Lines row; a line that is not a JSON object is the user's to fix: one line
    naming the file and line number (counted only then), not a traceback on every rank."""
    try:
        row = json.loads(line)
    except ValueError as e:
        what = f"is not valid JSON ({getattr(e, 'msg', e)})"
    else:
        if isinstance(row, dict):
            return row
        what = f"is a JSON {type(row).__name__}, not an object"
    number, left = 1, start
    with open(path, "rb") as f:
        while left > 0 and (chunk := f.read(min(left, 1 << 24))):
            number, left = number + chunk.count(b"\n"), left - len(chunk)
    raise RecipeError.one(f"'{path}'", f"line {number} {what}", "fix or remove the line")


def open_stream(source):
    import datasets

    from dpkit.data.load import LOCAL_SUFFIXES

    path = Path(source.path).expanduser()
    if path.is_file():
        return datasets.load_dataset(LOCAL_SUFFIXES.get(path.suffix, "json"),
                                     data_files=str(path), split="train", streaming=True)
    return datasets.load_dataset(source.path, source.name, split=source.split,
                                 revision=source.revision, streaming=True)


def first_row(source) -> dict | None:
    """The first row of a source, read as the stream will read it (for preflight's checks, which
    say what this raises as a problem of the source); a local .jsonl has its first HEAD_BYTES
    checked line by line too (a bad line further on stops the ranks, named, when they reach it)."""
    path = Path(source.path).expanduser()
    if path.suffix == ".jsonl" and path.is_file() and (bad := bad_json_line(path, HEAD_BYTES)):
        raise ValueError(bad)
    got = Reader([source], ORIGIN, keep=lambda g: True).take(1)
    return got[0][1] if got else None


def check_stream(run) -> None:
    """On a rank, before the engine is built: a stream needs max_steps (preflight says so too,
    but ranks may be started without it). The run gets no rows: its feed reads the stream."""
    recipe, say = run.recipe, run.say
    run.train_rows = None
    if recipe.train.max_steps is None:
        raise RecipeError.one("train.max_steps", "a stream has no known length",
                              "set train.max_steps with data.streaming: true")
    say(f"[dpkit] data: streaming {[s.path for s in recipe.data.sources]} (shuffled in windows "
        f"of {recipe.data.shuffle_buffer} rows per rank)")


class StreamFeed:
    """This data-parallel rank's micro-batches, read from the stream (see the module doc)."""

    def __init__(self, section, tokenizer, seed: int, micro: int, accum: int, dp_rank: int,
                 dp_world: int, collate, pad_id: int, flatten: bool = False):
        self.section, self.tokenizer, self.seed = section, tokenizer, seed
        self.micro, self.accum, self.dp_rank, self.dp_world = micro, accum, dp_rank, dp_world
        self.collate, self.pad_id, self.flatten = collate, pad_id, flatten
        self.sources = list(section.sources)
        self.position = {"epoch": 0, "window": 0, "start": dict(ORIGIN), "taken": 0}
        self.items: list[Example] | None = None
        self.next_step: int | None = None
        self.reader: Reader | None = None

    # ------------------------------------------------------------------------ reading
    def _keep(self, g: int) -> bool:
        return g % self.dp_world == self.dp_rank

    def _open_window(self) -> None:
        """Read, tokenize, shuffle (and pack) the window the position names."""
        p = self.position
        if self.reader is None or self.reader.pos != p["start"]:
            # a new epoch or a resumed position; otherwise the window goes on where the last
            # one stopped, from the same open file or stream: reopening one that is not a local
            # .jsonl would skip every row read so far again, for every window
            if self.reader is not None:
                self.reader.close()
            self.reader = Reader(self.sources, p["start"], self._keep)
        raw = self.reader.take(self.section.shuffle_buffer)
        if not raw:
            if p["start"] == ORIGIN:
                raise RecipeError.one("data.sources", f"the stream has no rows for data-parallel "
                                      f"rank {self.dp_rank} of {self.dp_world}",
                                      "use more data or fewer ranks")
            self.position = {"epoch": p["epoch"] + 1, "window": 0, "start": dict(ORIGIN),
                             "taken": 0}
            return self._open_window()
        self.items = self._examples(raw, random.Random(
            f"{self.seed}:{p['epoch']}:{self.dp_rank}:{p['window']}"))

    def _examples(self, raw, rng: random.Random) -> list[Example]:
        s = self.section
        out: list[Example | None] = [None] * len(raw)
        for i, source in enumerate(self.sources):
            where = [k for k, (src, _) in enumerate(raw) if src == i]
            if not where:
                continue
            rows = [raw[k][1] for k in where]
            # Every key of the window, not its first row's: a row without an optional column
            # (alpaca's `input`) reads it as None, as the in-memory path does
            keys = dict.fromkeys(key for row in rows for key in row)
            batch = {key: [row.get(key) for row in rows] for key in keys}
            enc = encode_batch(batch, source, self.tokenizer, s.max_seq_len, s.overflow,
                               s.completion_only_loss)
            for k, ids, labels, status in zip(where, enc["input_ids"], enc["labels"],
                                              enc["status"]):
                if status <= TRUNCATED:
                    out[k] = Example(ids, labels)
        examples = [ex for ex in out if ex is not None]
        if s.packing:
            return pack(examples, s.max_seq_len, rng.randrange(2**31))
        rng.shuffle(examples)
        return examples

    def _next_item(self) -> Example:
        if self.items is None:
            self._open_window()
        while self.position["taken"] >= len(self.items):
            p = self.position
            self.position = {"epoch": p["epoch"], "window": p["window"] + 1,
                             "start": dict(self.reader.pos), "taken": 0}
            self._open_window()
        item = self.items[self.position["taken"]]
        self.position["taken"] += 1
        return item

    # --------------------------------------------------------------------------- feed
    def micro_batches(self, step: int) -> list[dict]:
        if self.next_step is not None and step != self.next_step:
            raise RuntimeError(f"a stream is read in order: step {step} after {self.next_step - 1}")
        items = [self._next_item() for _ in range(self.micro * self.accum)]
        self.next_step = step + 1
        return [self.collate(items[i * self.micro:(i + 1) * self.micro], self.pad_id,
                             flatten=self.flatten) for i in range(self.accum)]

    def epoch(self, step: int) -> int:
        return self.position["epoch"]

    def state_dict(self) -> dict:
        """Every data-parallel rank's position (a collective: all ranks call it together)."""
        mine = (self.dp_rank, json.loads(json.dumps(self.position)))
        gathered = [mine]
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            gathered = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, mine)
        return {"stream": True, "dp_world": self.dp_world,
                "ranks": {str(rank): pos for rank, pos in gathered}}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            raise RecipeError.one("resume", "the checkpoint holds no stream position (it was "
                                  "made without data.streaming)", "resume with the same data")
        if state["dp_world"] != self.dp_world:
            raise RecipeError.one("resume", f"a stream is split between {state['dp_world']} "
                                  f"data-parallel ranks in the checkpoint, {self.dp_world} now",
                                  "resume a streaming run on the same number of ranks")
        self.position = dict(state["ranks"][str(self.dp_rank)])
        self.items = None
        if self.position["taken"]:
            self._open_window()  # the window in progress, rebuilt; `taken` of it already used
