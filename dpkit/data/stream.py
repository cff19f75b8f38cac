"""Streams: corpora larger than memory, read in order with a position that checkpoints keep.

One global stream, the same on any world size. The sources' rows are drawn as `data.mixture`
says — `concat`: one source after another; otherwise dpkit/data/mixture.py's quota schedule —
and cut into windows of `data.shuffle_buffer` draws. Each window's draws are put in an order
seeded by (train.seed, epoch, window): a permutation of positions, known before any row is
parsed. Step s takes the items s·B … (s+1)·B-1 of the windows laid end to end (B: the global
batch), and data-parallel rank r takes the items r, r+W, r+2W, … of them:
- unpacked, the items are the draws in that order; a rank parses and tokenizes only its own, and
  a row tokenization leaves out (too long with `overflow: drop`, no trained token) leaves its
  place empty, so a step has the same rows on any world size;
- packed, every rank tokenizes the whole window (packing needs every row's length) and packs it
  with the window's seed: the items are the packed sequences, the same on every rank.

A source is read through a cursor (its pass, the row in it and, for a local .jsonl, the byte
offset: `seek`); one that runs out starts its next pass from its beginning. The epoch ends
(`concat`) after the last source, (`first_exhausted`) when a source runs out, (`all_exhausted`)
once every source has run out in it, (`fixed`) after the sources' rows_per_epoch draws.

The position is (epoch, window, draws of the epoch before the window, each source's cursor and
whether it ran out this epoch, the global item the window starts at, items taken of it): the same
on every rank, so a run resumes on any world size, and a resume opens each source at its cursor
and reads one window — no row before it is read again (a source that is not a local .jsonl is
skipped to its row by `datasets`, which reads the rows it skips).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from dpkit.data import mixture as M
from dpkit.data.checks import bad_json_line
from dpkit.data.packing import pack, pack_plan
from dpkit.data.tokenize import TRUNCATED, Example, encode_batch
from dpkit.errors import RecipeError

HEAD_BYTES = 32 << 20  # of a streamed .jsonl checked by validate: well under a second to parse
START = {"pass": 0, "row": 0, "byte": 0}


class SourceReader:
    """One source's raw rows from a cursor on; `cursor` is where the next row is. A local
    .jsonl gives its lines unparsed (`parse` parses one), anything else `datasets` rows."""

    def __init__(self, source, cursor: dict):
        self.source, self.cursor = source, dict(cursor)
        self.path = Path(source.path).expanduser()
        self.lines = self.path.suffix == ".jsonl" and self.path.is_file()
        self._it = self._rows()

    def close(self) -> None:
        """Close the open file or stream now (the generator and this object form a cycle that
        only the cyclic garbage collector would otherwise end)."""
        self._it.close()

    def next(self):
        """The next raw row, or None at the end of the pass (the cursor stays at its end)."""
        return next(self._it, None)

    def next_pass(self) -> None:
        self.close()
        self.cursor = {"pass": self.cursor["pass"] + 1, "row": 0, "byte": 0}
        self._it = self._rows()

    def parse(self, raw) -> dict:
        return parse_line(*raw) if self.lines else raw

    def _rows(self):
        limit = self.source.max_rows
        if self.lines:  # our own line reader: seekable
            with open(self.path, "rb") as f:
                f.seek(self.cursor["byte"])
                byte = self.cursor["byte"]
                for line in f:
                    start, byte = byte, byte + len(line)
                    if limit is not None and self.cursor["row"] >= limit:
                        return
                    if not line.strip():
                        self.cursor["byte"] = byte
                        continue
                    self.cursor = {**self.cursor, "row": self.cursor["row"] + 1, "byte": byte}
                    yield line, self.path, start
            return
        ds = open_stream(self.source)
        skip = self.cursor["row"]
        for row in (ds.skip(skip) if skip else ds):
            if limit is not None and self.cursor["row"] >= limit:
                return
            self.cursor = {**self.cursor, "row": self.cursor["row"] + 1}
            yield row


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
    reader = SourceReader(source, START)
    try:
        raw = reader.next()
        return None if raw is None else reader.parse(raw)
    finally:
        reader.close()


def check_stream(run) -> None:
    """On a rank, before the engine is built: a stream needs max_steps (preflight says so too,
    but ranks may be started without it). The run gets no rows: its feed reads the stream."""
    recipe, say = run.recipe, run.say
    run.train_rows = None
    if recipe.train.max_steps is None:
        raise RecipeError.one("train.max_steps", "a stream has no known length",
                              "set train.max_steps with data.streaming: true")
    say(f"[dpkit] data: streaming {[s.path for s in recipe.data.sources]} (mixture "
        f"{recipe.data.mixture}; shuffled in windows of {recipe.data.shuffle_buffer} rows, the "
        "same on any world size)")


# -------------------------------------------------------------------------------- the draws
class Draws:
    """The global sequence of draws (source, raw row), epoch by epoch, from a position."""

    def __init__(self, section, seed: int, batch: int, state: dict):
        self.sources, self.strategy = list(section.sources), section.mixture
        spec = M.MixSpec.of(self.strategy, self.sources)
        self.schedule = None
        if self.strategy in M.WEIGHTED:
            self.schedule = M.Schedule(M.integer_shares(spec.weights), batch)
        elif self.strategy == "fixed":
            self.schedule = M.Schedule(tuple(spec.rows), batch, sum(spec.rows))
        self.seed = seed
        self.epoch, self.t = state["epoch"], state["t"]
        self.done = list(state["done"])
        self.readers = [SourceReader(s, c) for s, c in zip(self.sources, state["cursors"])]

    def close(self) -> None:
        for r in self.readers:
            r.close()

    def state(self) -> dict:
        return {"epoch": self.epoch, "t": self.t, "done": list(self.done),
                "cursors": [dict(r.cursor) for r in self.readers]}

    def take(self, n: int) -> tuple[list[tuple[int, object]], bool]:
        """Up to n draws of this epoch and whether the epoch ended after them."""
        out: list[tuple[int, object]] = []
        while len(out) < n:
            i = self._next_source()
            if i is None:
                return out, True
            raw = self.readers[i].next()
            if raw is None:  # source i ran out: its next pass, and maybe the epoch's end
                if self.readers[i].cursor["row"] == 0:
                    raise RecipeError.one(f"data.sources[{i}]", f"'{self.sources[i].path}' has "
                                          "no rows to stream", "point it at a file with rows")
                self.readers[i].next_pass()
                self.done[i] = True
                if self._ends_epoch(i):
                    return out, True
                continue
            out.append((i, raw))
            self.t += 1
        return out, False

    def _next_source(self) -> int | None:
        """The source of the epoch's next draw (None: the epoch is over)."""
        if self.strategy == "concat":
            return next((i for i, d in enumerate(self.done) if not d), None)
        if self.schedule.total is not None and self.t >= self.schedule.total:
            return None
        b, k = divmod(self.t, self.schedule.block)
        return M.block_draws(self.schedule, b, f"{self.seed}:{self.epoch}")[k][0]

    def _ends_epoch(self, i: int) -> bool:
        if self.strategy == "first_exhausted":
            return True
        if self.strategy in ("all_exhausted", "concat"):
            return all(self.done)
        return False  # fixed: a count of draws ends it

    def next_epoch(self) -> None:
        self.epoch, self.t, self.done = self.epoch + 1, 0, [False] * len(self.sources)


# ------------------------------------------------------------------------------------ the feed
class StreamFeed:
    """This data-parallel rank's micro-batches, read from the stream (see the module doc)."""

    def __init__(self, section, tokenizer, seed: int, micro: int, accum: int, dp_rank: int,
                 dp_world: int, collate, pad_id: int, flatten: bool = False):
        self.section, self.tokenizer, self.seed = section, tokenizer, seed
        self.micro, self.accum, self.dp_rank, self.dp_world = micro, accum, dp_rank, dp_world
        self.batch = micro * accum * dp_world
        self.collate, self.pad_id, self.flatten = collate, pad_id, flatten
        self.sources = list(section.sources)
        k = len(self.sources)
        start = {"epoch": 0, "t": 0, "done": [False] * k, "cursors": [START] * k}
        self.position = {"window": 0, "start": start, "item": 0, "taken": 0}
        self.items: list | None = None   # the window's items (None where not this rank's)
        self.sources_of: list = []       # per item: [(source, tokens), ...] of its rows
        self.next_step: int | None = None
        self.draws: Draws | None = None
        self.last_counts = [0] * (2 * k)

    # ------------------------------------------------------------------------ reading
    def _open_window(self) -> None:
        """Read the window the position names; order, tokenize (and pack) it."""
        p = self.position
        if self.draws is None or self.draws.state() != p["start"]:
            # a resumed position, or the first window; otherwise the window goes on where the last
            # one stopped, from the same open files and streams: reopening one that is not a
            # local .jsonl would skip every row read so far again, for every window
            if self.draws is not None:
                self.draws.close()
            self.draws = Draws(self.section, self.seed, self.batch, p["start"])
        raw, ended = self.draws.take(self.section.shuffle_buffer)
        if not raw and ended:
            if p["start"]["t"] == 0 and p["window"] == 0 and p["start"]["epoch"] == 0:
                raise RecipeError.one("data.sources", "the stream has no rows",
                                      "use more data")
            self.draws.next_epoch()
            self.position = {"window": 0, "start": self.draws.state(), "item": p["item"],
                             "taken": 0}
            return self._open_window()
        epoch = p["start"]["epoch"]
        order = list(range(len(raw)))
        random.Random(f"{self.seed}:{epoch}:{p['window']}").shuffle(order)
        raw = [raw[k] for k in order]
        if self.section.packing:
            self._pack(raw, random.Random(f"{self.seed}:{epoch}:{p['window']}:pack"))
        else:
            self._mine(raw, p["item"])
        if ended:  # the next window starts the next epoch
            self.draws.next_epoch()

    def _mine(self, raw: list, first: int) -> None:
        """Unpacked: this rank's items of the window (global item `first` + k for the k-th)."""
        mine = [k for k in range(len(raw)) if (first + k) % self.dp_world == self.dp_rank]
        examples = self._tokenize([raw[k] for k in mine])
        self.items = [None] * len(raw)
        self.sources_of = [[]] * len(raw)
        for k, ex in zip(mine, examples):
            if ex is not None:
                self.items[k] = ex
                self.sources_of[k] = [(raw[k][0], len(ex.input_ids))]

    def _pack(self, raw: list, rng: random.Random) -> None:
        """Packed: the window's sequences, the same on every rank."""
        examples = self._tokenize(raw)
        kept = [(i, ex) for (i, _), ex in zip(raw, examples) if ex is not None]
        rows = [ex for _, ex in kept]
        seed = rng.randrange(2**31)
        lengths = [len(ex.input_ids) for ex in rows]
        order, starts = pack_plan(lengths, self.section.max_seq_len, seed)
        self.items = pack(rows, self.section.max_seq_len, seed)
        self.sources_of = [[(kept[int(j)][0], lengths[int(j)]) for j in order[a:b]]
                           for a, b in zip(starts[:-1], starts[1:])]

    def _tokenize(self, raw: list) -> list[Example | None]:
        """Examples of raw draws [(source, raw row)] (None: left out by tokenization)."""
        s = self.section
        out: list[Example | None] = [None] * len(raw)
        for i, source in enumerate(self.sources):
            where = [k for k, (src, _) in enumerate(raw) if src == i]
            if not where:
                continue
            rows = [self.draws.readers[i].parse(raw[k][1]) for k in where]
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
        return out

    def _next_item(self) -> tuple[Example | None, list]:
        """The next global item: this rank's (None if another rank's, or left out), and the
        (source, tokens) of its rows."""
        if self.items is None:
            self._open_window()
        while self.position["taken"] >= len(self.items):
            p = self.position
            self.position = {"window": p["window"] + 1 if self.draws.t else 0,
                             "start": self.draws.state(), "item": p["item"] + len(self.items),
                             "taken": 0}
            self._open_window()
        k = self.position["taken"]
        self.position["taken"] += 1
        return self.items[k], self.sources_of[k]

    # --------------------------------------------------------------------------- feed
    def micro_batches(self, step: int) -> list[dict]:
        if self.next_step is not None and step != self.next_step:
            raise RuntimeError(f"a stream is read in order: step {step} after {self.next_step - 1}")
        k = len(self.sources)
        counts = [0] * (2 * k)
        mine = []
        for g in range(self.batch):  # every rank steps through the step's B global items
            item, rows = self._next_item()
            if g % self.dp_world == self.dp_rank:
                mine.append(item)
                for i, n in rows if item is not None else ():
                    counts[i] += n
                    counts[k + i] += 1
        self.next_step = step + 1
        self.last_counts = counts
        parts = [mine[i * self.micro:(i + 1) * self.micro] for i in range(self.accum)]
        return [self.collate([ex for ex in part if ex is not None], self.pad_id,
                             flatten=self.flatten) for part in parts]

    def epoch(self, step: int) -> int:
        return self.position["start"]["epoch"]

    def state_dict(self) -> dict:
        """The stream's position: global, the same on every rank (rank 0 writes it)."""
        return {"stream": True, "version": 2, "position": json.loads(json.dumps(self.position))}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            raise RecipeError.one("resume", "the checkpoint holds no stream position (it was "
                                  "made without data.streaming)", "resume with the same data")
        if state.get("version") != 2:
            raise RecipeError.one("resume", "the checkpoint's stream position is per rank (made "
                                  "by a dpkit that shuffled streams per rank)", "resume with the "
                                  "dpkit that made it, or train anew")
        self.position = json.loads(json.dumps(state["position"]))
        self.items = None
        if self.draws is not None:
            self.draws.close()
            self.draws = None
        if self.position["taken"]:
            self._open_window()  # the window in progress, rebuilt; `taken` of it already used
