"""Tokenize once per node: an on-disk cache of tokenized data, keyed by what changes the tokens.

One entry per source: a source named again (in another recipe, as train and eval data, with
another weight or mixture: dpkit/data/mixture.py) is read from the entry it was tokenized into,
and `dpkit prepare` tokenizes each source once. An entry's key hashes the data file's content
(resolved path, size and a BLAKE2b digest of the bytes: an edit that keeps size and mtime,
`cp -p` or `touch -r`, is seen; a `touch` alone rebuilds nothing), a hub dataset id with its
revision and the commit it resolves to now (an unpinned dataset that changed upstream gets a new
entry; global rank 0 asks the hub, once, and sends the answer to every rank), the tokenizer (its
whole fast-tokenizer JSON and special tokens), the chat template, the source's format, column
mapping and max_rows, max_seq_len, overflow, masking, the method's data options
(preference.max_prompt_len), and the source of the tokenization code itself (formats.py,
tokenize.py, preference.py and the module of the sources' row kind). The eval split, the seed
and the mixture (weights, rows or epochs per epoch) are not in it: they are cheap and applied
when the cache is read.
Rows and preference pairs (dpkit/data/preference.py) both go through it.

On each node local rank 0 builds an entry (`datasets.map` in several processes, Arrow files),
in a private temporary directory: its files synced to disk, the COMPLETE marker written last,
then renamed into place in one step (dpkit/run_files.publish_dir). The other ranks wait for
that FILE — not for a collective, whose timeout a long tokenization would trip with no hint
why — and say what they are waiting for. Several nodes on a shared file system each build; the
first rename wins and the others use it. Every build appends one line to `tokenize.log` in the
cache directory.

The cache directory may come from an untrusted recipe: dpkit only ever deletes its own
temporary build directory, by the exact name it created, inside that directory. An entry whose
meta.json can't be read (a torn write) is renamed aside (`.damaged-…`, never deleted) by local
rank 0 and built again, with a note in the data report; the other ranks wait for the new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import socket
import sys
import time
from functools import partial
from pathlib import Path

import dpkit
from dpkit.data import load as L
from dpkit.distributed import broadcast_object
from dpkit.errors import RecipeError
from dpkit.run_files import publish_dir, stage_dir, write_text

MARKER = "COMPLETE"
CODE = ("formats.py", "tokenize.py", "preference.py")  # the code whose every change changes tokens
WAIT_SAY_EVERY_S = 60


def cache_root(section) -> Path:
    if section.cache_dir:
        return Path(section.cache_dir).expanduser()
    if os.environ.get("DPKIT_CACHE"):
        return Path(os.environ["DPKIT_CACHE"]).expanduser()
    return Path.home() / ".cache" / "dpkit" / "data"


def num_proc(section) -> int:
    return section.num_proc or max(1, min(os.cpu_count() or 1, 8))


def _file_identity(path: Path) -> list:
    if path.is_dir():  # a dataset repository laid out locally: every file in it
        return [_file_identity(p) for p in sorted(path.rglob("*")) if p.is_file()]
    with open(path, "rb") as f:  # the content, not the mtime, which `cp -p`/`touch -r` keep
        digest = hashlib.file_digest(f, "blake2b").hexdigest()  # ~1 GB/s
    return [str(path.resolve()), path.stat().st_size, digest]


_RESOLVED: dict[tuple[str, str | None], str | None] = {}
"""(dataset, revision) -> the commit, asked once per process (on the ranks: rank 0's answers)."""


def resolved_revision(source) -> str | None:
    """The commit a hub dataset's revision (None: the default branch) resolves to now, as
    `datasets` resolves it to download; None where the hub can't be asked (offline: the key is
    then the name and revision as written)."""
    import re

    if source.revision and re.fullmatch(r"[0-9a-f]{40}", source.revision):
        return source.revision  # pinned already
    asked = (source.path, source.revision)
    if asked not in _RESOLVED:
        try:
            from huggingface_hub import HfApi

            _RESOLVED[asked] = HfApi().dataset_info(source.path, revision=source.revision).sha
        except Exception:  # offline, unreachable, private without a token: datasets says why
            _RESOLVED[asked] = None
    return _RESOLVED[asked]


def is_hub_source(source) -> bool:
    return not Path(source.path).expanduser().exists() and not L.is_local_source(source)


def agree_on_hub_revisions(section, kinds, rank: int = 0, broadcast=broadcast_object) -> None:
    """Global rank 0 asks the hub what each hub dataset's revision resolves to, and every rank
    keys the cache with its answers (`broadcast`: rank 0's value on every rank). One hub call
    per run, not one per rank: ranks the hub answered differently (a timeout on some) would key
    different entries and wait for each other's forever. Every rank calls it, at the same point."""
    answers = None
    if rank == 0:
        for kind in kinds:
            for source in getattr(section, kind):
                if is_hub_source(source):
                    resolved_revision(source)
        answers = dict(_RESOLVED)
    _RESOLVED.update(broadcast(answers))


MIXTURE_KEYS = ("weight", "rows_per_epoch", "epochs")
"""Source keys that choose how often rows are drawn, not what their tokens are: not in the key,
so changing a weight reuses every source's entry."""


def source_identity(source) -> dict:
    ident = source.model_dump(mode="json", exclude=set(MIXTURE_KEYS))
    path = Path(source.path).expanduser()
    if path.exists():
        ident["file"] = _file_identity(path)
    elif not L.is_local_source(source):  # on the ranks, rank 0's answer: agree_on_hub_revisions
        ident["resolved_revision"] = resolved_revision(source)
    return ident


def tokenizer_identity(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else repr(tokenizer.get_vocab())
    return {"class": type(tokenizer).__name__, "tokenizer": hashlib.sha256(body.encode()).hexdigest(),
            "specials": repr(sorted(tokenizer.special_tokens_map.items())),
            "eos": tokenizer.eos_token_id, "chat_template": tokenizer.chat_template,
            "probe": tokenizer("a b", add_special_tokens=True)["input_ids"]}


def row_kind_code(section) -> bytes:
    """The source of the modules holding the sources' row kind (`FormatSpec.rows`): a method
    whose rows have their own shape tokenizes them in its own module (dpkit/objectives/<name>.py),
    so an edit there must change the key as an edit of CODE does."""
    from importlib.util import find_spec

    from dpkit import methods

    modules = sorted({methods.FORMATS[s.format].rows.partition(":")[0]
                      for s in (*section.sources, *section.eval_sources)})
    return b"".join(Path(find_spec(m).origin).read_bytes() for m in modules)


def cache_key(section, tokenizer, source, options: dict | None = None,
              shared: dict | None = None) -> tuple[str, dict]:
    """The key of one source's entry: its identity and what every source shares (`shared`:
    computed once per section by `shared_material`)."""
    shared = shared if shared is not None else shared_material(section, tokenizer, options)
    material = {**shared, "source": source_identity(source)}
    blob = json.dumps(material, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest(), material


def shared_material(section, tokenizer, options: dict | None = None) -> dict:
    here = Path(__file__).parent
    code = hashlib.sha256(b"".join((here / f).read_bytes() for f in CODE)
                          + row_kind_code(section)).hexdigest()
    return {"dpkit": dpkit.__version__, "code": code, "tokenizer": tokenizer_identity(tokenizer),
            "max_seq_len": section.max_seq_len, "overflow": section.overflow,
            "completion_only_loss": section.completion_only_loss,
            "options": dict(options or {})}


def entry_dir(section, tokenizer, source, options: dict | None = None,
              shared: dict | None = None) -> tuple[Path, dict]:
    key, material = cache_key(section, tokenizer, source, options, shared)
    return cache_root(section) / f"tok-{key[:32]}", material


def entries(section, tokenizer, kinds, options: dict | None = None) -> list[tuple]:
    """[(kind, index, source, entry, material)]: one entry per source, tokenized once however
    many times and under whichever kind it is named (`dpkit prepare` builds each once)."""
    shared = shared_material(section, tokenizer, options)
    return [(kind, i, source, *entry_dir(section, tokenizer, source, options, shared))
            for kind in kinds for i, source in enumerate(getattr(section, kind))]


def _distinct(found: list[tuple]) -> list[tuple]:
    """The first (kind, index, source, entry, material) of each entry."""
    seen: dict[Path, tuple] = {}
    for item in found:
        seen.setdefault(item[3], item)
    return list(seen.values())


def is_complete(entry: Path) -> bool:
    return (entry / MARKER).is_file()


def damaged(entry: Path) -> str | None:
    """Why an entry that is there can't be read (None: it can, or it is not there)."""
    if not entry.is_dir():
        return None
    try:
        meta = json.loads((entry / "meta.json").read_text())
        missing = [f for part in meta["parts"] for f in part["files"] if not (entry / f).is_file()]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"its meta.json can't be read ({type(e).__name__})"
    return f"its {missing[0]} is missing" if missing else None


def usable(entry: Path) -> bool:
    return is_complete(entry) and damaged(entry) is None


def set_aside(entry: Path, why: str) -> str:
    """Rename a damaged entry out of the way (the next build takes its place); the note says so."""
    aside = entry.parent / f".damaged-{entry.name}-{socket.gethostname()}-{time.time_ns()}"
    try:
        os.rename(entry, aside)
    except FileNotFoundError:  # another node's rank 0 set it aside first
        pass
    return f"cache entry {entry.name} was damaged ({why}): tokenized again; the old one is {aside}"


def build(section, tokenizer, kinds, found: list[tuple], rank: int = 0, say=print,
          progress: bool = True) -> None:
    """Tokenize each source of `found` [(kind, index, source, entry, material)] into its entry
    (local rank 0 of a node, or `dpkit prepare`). Every source of `kinds` is loaded and checked
    first (the row kind's checks name sources by their place in the recipe): bad data raises
    RecipeError before anything is written."""
    from dpkit.data.rows import row_kind

    raw = L.load_raw(section, tokenizer, kinds)
    rows = row_kind(section)
    rows.check(raw, tokenizer)
    places = [(k, i) for k in kinds for i in range(len(getattr(section, k)))]
    loaded = {place: ds for place, (_, _, ds) in zip(places, raw)}
    for kind, i, source, entry, material in found:
        _build_one(section, tokenizer, rows, source, loaded[(kind, i)], entry, material, rank,
                   say, progress)


def _build_one(section, tokenizer, rows, source, ds, entry: Path, material: dict, rank: int,
               say, progress: bool) -> None:
    import datasets

    tmp = stage_dir(entry, unique=f".tmp-{entry.name}-{socket.gethostname()}-{os.getpid()}-")
    t0 = time.perf_counter()
    bars_were_off = datasets.utils.are_progress_bars_disabled()
    if progress:
        datasets.enable_progress_bars()  # tokenizing a large set shows its progress
    else:
        datasets.disable_progress_bars()
    try:
        procs = num_proc(section)
        where = dict(fingerprint=entry.name, cache_file=str(tmp / "rows.arrow"))
        out = rows.tokenize(ds, source, tokenizer, section, material["options"], procs, **where)
        files = [{"path": source.path, "files": [Path(f["filename"]).name
                                                 for f in out.cache_files]}]
        del out
        seconds = time.perf_counter() - t0
        meta = {"material": material, "parts": files, "seconds": seconds,
                "built_by": {"host": socket.gethostname(), "pid": os.getpid(), "rank": rank}}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
        # atomic: the entry is whole (COMPLETE in it) or absent
        if not publish_dir(tmp, entry, marker=(MARKER, "ok\n"), replace=None):
            # another node (shared file system) or process got there first
            shutil.rmtree(tmp, ignore_errors=True)
            say(f"[dpkit] data: {entry} was built meanwhile by another process; using it")
        else:
            with open(entry.parent / "tokenize.log", "a") as log:
                log.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {socket.gethostname()} pid "
                          f"{os.getpid()} rank {rank} built {entry.name} ({source.path}) in "
                          f"{seconds:.1f} s\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # only the directory made above
        raise
    finally:
        (datasets.disable_progress_bars if bars_were_off else datasets.enable_progress_bars)()
    if (entry / "meta.json").is_file() and not is_complete(entry):  # renamed by older dpkit
        write_text(entry / MARKER, "ok\n")


def wait_for(entry: Path, say_wait, timeout_s: float | None = None) -> float:
    """Wait for local rank 0's COMPLETE marker (on an entry that can be read: a damaged one is
    being set aside and built again); returns the seconds waited."""
    t0 = time.monotonic()
    said = None
    while not usable(entry):
        waited = time.monotonic() - t0
        if said is None or waited - said >= WAIT_SAY_EVERY_S:
            say_wait(f"waiting for local rank 0 to tokenize the data into {entry} "
                     f"({waited:.0f} s so far; the file {MARKER} ends the wait; `dpkit prepare` "
                     "builds it ahead of a job)")
            said = waited
        if timeout_s is not None and waited > timeout_s:
            raise RecipeError.one("data.cache_dir", f"{entry}/{MARKER} did not appear within "
                                  f"{timeout_s:.0f} s", "check local rank 0's log, or run "
                                  "`dpkit prepare RECIPE` first")
        time.sleep(0.2)
    return time.monotonic() - t0


def read(found: list[tuple], section, seed: int, need_train: bool = True):
    """(train rows, eval rows, stats) from complete entries, memory-mapped."""
    import datasets

    parts = []
    for kind, _, source, entry, _ in found:
        meta = json.loads((entry / "meta.json").read_text())
        shards = [datasets.Dataset.from_file(str(entry / f)) for part in meta["parts"]
                  for f in part["files"]]
        parts.append((kind, source, datasets.concatenate_datasets(shards)
                      if len(shards) > 1 else shards[0]))
    from dpkit.data.rows import row_kind

    return row_kind(section).assemble(parts, section, seed, need_train=need_train)


def load_cached(section, tokenizer, seed: int, env=None, say=print, streaming: bool = False,
                log=None, progress: bool = True, say_wait=None, options: dict | None = None):
    """(train rows, eval rows, stats): built here on local rank 0 if missing, waited for on the
    other ranks of the node (`env`: this rank; None: one process), then read. One entry per
    source. Streaming: only the eval sources go through the cache. `log`: this rank's log.
    Preference pairs go through it too; `options`: the method's settings that change the tokens
    (`MethodSpec.options`)."""
    local_rank, rank = (env.local_rank, env.rank) if env is not None else (0, 0)
    kinds = ("eval_sources",) if streaming else ("sources", "eval_sources")
    if not any(getattr(section, k) for k in kinds):
        return [], [], L.DataStats()
    agree_on_hub_revisions(section, kinds, rank)
    found = entries(section, tokenizer, kinds, options)
    distinct = _distinct(found)
    t0, rss_before = time.perf_counter(), _rss_mb()
    notes = []
    for *_, entry, _ in distinct:
        if local_rank == 0 and (why := damaged(entry)):
            notes.append(set_aside(entry, why))
            say(f"[dpkit] data: {notes[-1]}")
        if local_rank == 0 and (entry / "meta.json").is_file() and not is_complete(entry):
            write_text(entry / MARKER, "ok\n")  # renamed into place, marker not yet written
    missing = [item for item in distinct if not usable(item[3])]
    if missing and local_rank == 0:
        names = ", ".join(item[3].name for item in missing)
        say(f"[dpkit] data: tokenizing into {cache_root(section)}: {len(missing)} of "
            f"{len(distinct)} source(s) ({names}) on local rank 0 of each node (the other ranks "
            f"wait for each one's {MARKER} file)")
        build(section, tokenizer, kinds, missing, rank, say, progress)
    elif missing:
        for *_, entry, _ in missing:
            wait_for(entry, say_wait or partial(_say_waiting, log, local_rank, rank))
    train, evals, stats = read(found, section, seed, need_train=not streaming)
    stats.seconds, stats.cached = time.perf_counter() - t0, not missing
    stats.notes += notes
    stats.rss_before_mb = rss_before
    stats.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    if log is not None:  # every rank's log: how long data setup took and what it cost
        how = "cache hit" if not missing else "built or waited for"
        log(f"data setup: {stats.seconds:.2f} s ({how}), RSS {stats.rss_before_mb:.0f} MB "
            f"before, peak {stats.peak_rss_mb:.0f} MB")
    return train, evals, stats


def _say_waiting(log, local_rank: int, rank: int, message: str) -> None:
    """A rank waiting for its node's tokenization: in its log, and once per node on screen."""
    if log is not None:
        log(message)
    if local_rank == 1 or log is None:
        print(f"[dpkit] rank {rank}: {message}", file=sys.stderr, flush=True)


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20
