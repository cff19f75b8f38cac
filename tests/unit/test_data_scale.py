"""Data at scale without ranks: the format registry, prompt/completion rendering and masking
against hand-written expectations, the tokenized-data cache key, and how a stream is split
between ranks and its saved position (two feeds in one process stand for two ranks)."""

import json
import os
from types import SimpleNamespace

import pytest
from conftest import MESSAGES, TOKENIZER

from dpkit.data import FORMATS, IGNORE, load_datasets, tokenize_row
from dpkit.data.cache import cache_key, load_cached
from dpkit.data.load import collate
from dpkit.data.stream import StreamFeed
from dpkit.errors import RecipeError
from dpkit.model import load_tokenizer
from dpkit.recipe import DATA_FORMATS, DataSection, DataSource, ModelSection


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ModelSection(config={"model_type": "llama"}, tokenizer=str(TOKENIZER)))


def trained_text(tok, ex) -> str:
    return tok.decode([t for t in ex.labels if t != IGNORE])


def test_one_registry_feeds_the_schema():
    from dpkit import methods

    # the schema lists the declared formats (dpkit/methods/); the data registry renders each
    # (formats a method brings are loaded on first use, so FORMATS' order depends on test order)
    assert DATA_FORMATS == tuple(methods.FORMATS)
    assert set(FORMATS) <= set(methods.FORMATS)
    assert {"alpaca", "messages", "text", "prompt_completion"} <= set(FORMATS)
    DataSource(path="x.jsonl", format="prompt_completion",
               columns={"prompt": "question", "completion": "answer"})
    with pytest.raises(ValueError, match="format `prompt_completion` reads"):
        DataSource(path="x.jsonl", format="prompt_completion", columns={"output": "answer"})
    with pytest.raises(ValueError):
        DataSource(path="x.jsonl", format="nope")


def test_prompt_completion_strings_use_the_chat_template_and_train_on_the_completion(tok):
    source = DataSource(path="gsm8k.jsonl", format="prompt_completion",
                        columns={"prompt": "question", "completion": "answer"})
    row = {"question": "What is 2+3?", "answer": "2+3 = 5."}
    ex = tokenize_row(row, source, tok, completion_only=True)
    by_hand = "<s><|user|>\nWhat is 2+3?</s>\n<|assistant|>\n2+3 = 5.</s>\n"  # the template
    assert tok.decode(ex.input_ids) == by_hand
    assert ex.input_ids == tok.apply_chat_template(
        [{"role": "user", "content": row["question"]},
         {"role": "assistant", "content": row["answer"]}], tokenize=True, return_dict=False)
    head = tok("<s><|user|>\nWhat is 2+3?</s>\n<|assistant|>\n", add_special_tokens=False).input_ids
    assert ex.input_ids[:len(head)] == head
    assert ex.labels == [IGNORE] * len(head) + ex.input_ids[len(head):]
    assert trained_text(tok, ex) == "2+3 = 5.</s>\n"


def test_prompt_completion_conversational(tok):
    source = DataSource(path="x", format="prompt_completion")
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    completion = [{"role": "assistant", "content": "Hello."}]
    ex = tokenize_row({"prompt": prompt, "completion": completion}, source, tok, True)
    assert tok.decode(ex.input_ids) == ("<s><|system|>\nBe brief.</s>\n<|user|>\nHi?</s>\n"
                                        "<|assistant|>\nHello.</s>\n")
    assert trained_text(tok, ex) == "Hello.</s>\n"
    everything = tokenize_row({"prompt": prompt, "completion": completion}, source, tok, False)
    assert everything.input_ids == ex.input_ids and everything.labels[1:] == ex.input_ids[1:]


def test_prompt_completion_without_a_template_is_plain_text(tok):
    bare = load_tokenizer(ModelSection(config={"model_type": "llama"}, tokenizer=str(TOKENIZER)))
    bare.chat_template = None
    source = DataSource(path="x", format="prompt_completion")
    ex = tokenize_row({"prompt": "Question: 2+3?\n", "completion": "Answer: 5"}, source, bare, True)
    prompt_ids = bare("Question: 2+3?\n").input_ids  # <s> + prompt
    assert ex.input_ids == bare("Question: 2+3?\nAnswer: 5").input_ids + [bare.eos_token_id]
    assert ex.input_ids[:len(prompt_ids)] == prompt_ids
    assert ex.labels == [IGNORE] * len(prompt_ids) + ex.input_ids[len(prompt_ids):]
    assert trained_text(bare, ex) == "Answer: 5</s>"


def test_conversational_prompt_completion_without_a_template_is_refused(tmp_path, tok):
    bare = load_tokenizer(ModelSection(config={"model_type": "llama"}, tokenizer=str(TOKENIZER)))
    bare.chat_template = None
    path = tmp_path / "pc.jsonl"
    path.write_text(json.dumps({"prompt": [{"role": "user", "content": "a"}],
                                "completion": [{"role": "assistant", "content": "b"}]}) + "\n")
    section = DataSection(sources=[{"path": str(path), "format": "prompt_completion"}])
    with pytest.raises(RecipeError, match=r"data.sources\[0\].format: `prompt_completion` needs"):
        load_datasets(section, bare, seed=0)


def test_cache_key_follows_what_changes_the_tokens(tmp_path, tok):
    data = tmp_path / "d.jsonl"
    data.write_text(MESSAGES.read_text())
    base = dict(sources=[{"path": str(data), "format": "messages"}], max_seq_len=128)

    def cache_key_of(section, tokenizer):
        return cache_key(section, tokenizer, section.sources[0])[0]

    key = cache_key_of(DataSection(**base), tok)
    assert key == cache_key_of(DataSection(**base, eval_fraction=0.1), tok)  # applied later
    changed = [DataSection(**{**base, "max_seq_len": 64}), DataSection(**base, overflow="drop"),
               DataSection(**base, completion_only_loss=False),
               DataSection(**{**base, "sources": [{"path": str(data), "format": "messages",
                                                    "max_rows": 5}]})]
    assert all(cache_key_of(s, tok) != key for s in changed)
    chatml = load_tokenizer(ModelSection(config={"model_type": "llama"}, tokenizer=str(TOKENIZER),
                                         chat_template="chatml"))
    assert cache_key_of(DataSection(**base), chatml) != key
    os.utime(data, ns=(1, 1))  # touched, not changed: the same tokens
    assert cache_key_of(DataSection(**base), tok) == key


def test_cached_rows_equal_rows_tokenized_in_memory(tmp_path, tok):
    section = DataSection(sources=[{"path": str(MESSAGES), "format": "messages"}],
                          max_seq_len=64, eval_fraction=0.1, cache_dir=str(tmp_path / "c"))
    expected = load_datasets(section, tok, seed=3)
    first = load_cached(section, tok, seed=3, say=lambda m: None)
    again = load_cached(section, tok, seed=3, say=lambda m: None)
    assert not first[2].cached and again[2].cached
    for got in (first, again):
        for rows, want in zip(got[:2], expected[:2]):
            assert [(e.input_ids, e.labels) for e in rows] == \
                [(e.input_ids, e.labels) for e in want]
        assert got[2].describe().split(" (")[0] == expected[2].describe().split(" (")[0]
    assert len(list((tmp_path / "c").glob("tok-*"))) == 1
    assert not list((tmp_path / "c").glob(".tmp-*"))


RACER = """
import sys, time
from pathlib import Path
from dpkit.data import cache
from dpkit.model import load_tokenizer
from dpkit.recipe import DataSection, ModelSection
KINDS = ("sources", "eval_sources")  # what a non-streaming run reads
section = DataSection.model_validate_json(sys.argv[1])
tok = load_tokenizer(ModelSection(config={"model_type": "llama"}, tokenizer=sys.argv[2]))
found = cache.entries(section, tok, KINDS)
go = Path(sys.argv[3])
while not go.exists():  # both processes start tokenizing together
    time.sleep(0.01)
cache.build(section, tok, KINDS, found, progress=False)
print("entry", found[0][3])
"""


def test_two_nodes_building_one_entry_on_a_shared_file_system(tmp_path, tok):
    """Two processes (two nodes' local rank 0) tokenize into the same cache directory at once:
    one rename wins, the other says so and uses it, nothing half-built or temporary is left,
    and the entry reads back equal to tokenizing in memory."""
    import subprocess
    import sys

    section = DataSection(sources=[{"path": str(MESSAGES), "format": "messages"}],
                          max_seq_len=64, cache_dir=str(tmp_path / "c"))
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    racers = [subprocess.Popen([sys.executable, "-c", RACER, section.model_dump_json(),
                                str(TOKENIZER), str(go)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    go.touch()
    outs = [r.communicate(timeout=240) for r in racers]
    assert [r.returncode for r in racers] == [0, 0], outs
    said = "".join(out for out, _ in outs)
    assert said.count("built meanwhile by another process; using it") == 1, said
    assert len(list((tmp_path / "c").glob("tok-*"))) == 1
    assert not list((tmp_path / "c").glob(".tmp-*"))
    assert len((tmp_path / "c" / "tokenize.log").read_text().splitlines()) == 1
    cached = load_cached(section, tok, seed=0, say=lambda m: None)
    assert cached[2].cached
    expected = load_datasets(section, tok, seed=0)
    assert [(e.input_ids, e.labels) for e in cached[0]] == \
        [(e.input_ids, e.labels) for e in expected[0]]


# ------------------------------------------------------------------------------ streams
def stream_file(tmp_path, n: int, layout: str = "jsonl"):
    """`jsonl`: one file, read by dpkit's seekable line reader. `repo`: a dataset repository as
    `hf download --repo-type dataset` leaves it (two parquet shards under data/), streamed by
    `datasets.load_dataset(path, streaming=True)` — the call a hub dataset id goes through."""
    rows = [{"text": f"row {i} says hello"} for i in range(n)]
    if layout == "jsonl":
        path = tmp_path / "stream.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path
    import pyarrow as pa
    import pyarrow.parquet as pq

    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    half = n // 2
    for k, part in enumerate((rows[:half], rows[half:])):
        pq.write_table(pa.Table.from_pylist(part), repo / "data" / f"train-0000{k}-of-00002.parquet")
    return repo


def feeds(tok, path, world, accum=1, **data):
    section = DataSection(sources=[{"path": str(path), "format": "text"}], max_seq_len=32,
                          streaming=True, shuffle_buffer=7, **data)
    return [StreamFeed(section, tok, seed=1, micro=1, accum=accum, dp_rank=r, dp_world=world,
                       collate=collate, pad_id=tok.pad_token_id) for r in range(world)]


def row_number(tok, batch) -> int:
    text = tok.decode(batch["input_ids"][0].tolist(), skip_special_tokens=True)
    return int(text.split()[1])


@pytest.mark.parametrize("layout", ["jsonl", "repo"])
def test_stream_ranks_read_disjoint_rows_that_cover_the_stream(tmp_path, tok, layout):
    """Two ranks read disjoint rows which, step by step, are the rows one process reads; an
    epoch covers the stream once, shuffled within windows; the next epoch reshuffles."""
    n = 103
    path = stream_file(tmp_path, n, layout)
    one, = feeds(tok, path, world=1, accum=2)
    two = feeds(tok, path, world=2)
    seen, split = [], []
    for s in range(-(-n // 2)):
        single = [row_number(tok, b) for b in one.micro_batches(s) if b["attention_mask"].any()]
        mine = [[row_number(tok, f.micro_batches(s)[0])] for f in two]
        assert sorted(single) == sorted(mine[0] + mine[1]) and mine[0] != mine[1]
        seen += single
        split.append(mine)
    assert sorted(seen[:n]) == list(range(n)) and seen[:n] != sorted(seen[:n])
    second = [row_number(tok, b) for s in range(-(-n // 2), n) for b in one.micro_batches(s)
              if b["attention_mask"].any()]
    assert sorted(seen[n:] + second)[:n] == list(range(n)) and second != seen[1:n]


@pytest.mark.parametrize("layout", ["jsonl", "repo"])
def test_stream_position_resumes_exactly(tmp_path, tok, layout):
    """A position saved at step 11 continues exactly, on the same world size and on another
    (saved by two ranks, read by one process: the position is global)."""
    path = stream_file(tmp_path, 61, layout)
    for packing in (False, True):
        a, = feeds(tok, path, world=1, packing=packing, accum=2)
        [a.micro_batches(s) for s in range(11)]
        two = feeds(tok, path, world=2, packing=packing)
        [f.micro_batches(s) for s in range(11) for f in two]
        states = [json.loads(json.dumps(f.state_dict())) for f in (a, *two)]
        assert states[0] == states[1] == states[2]  # as stored in a checkpoint
        b, = feeds(tok, path, world=1, packing=packing, accum=2)
        b.load_state_dict(states[1])
        for s in range(11, 40):
            x, y = a.micro_batches(s), b.micro_batches(s)
            assert all((p[k] == q[k]).all() for p, q in zip(x, y)
                       for k in ("input_ids", "labels")), s
    c, = feeds(tok, path, world=1)
    with pytest.raises(RecipeError, match="per rank"):
        c.load_state_dict({"stream": True, "dp_world": 2, "ranks": {}})


def test_a_stream_holds_a_window_not_the_file(tmp_path, tok):
    """Python memory while a rank reads a 16 MB stream (tracemalloc: every Python allocation,
    rows and tokens included) stays a small fraction of the file, and does not grow with how far
    the rank has read. The same file loaded whole would hold every row."""
    import tracemalloc

    path = tmp_path / "big.jsonl"
    filler = "words " * 30
    with open(path, "w") as f:
        f.writelines(json.dumps({"text": f"row {i} {filler}"}) + "\n" for i in range(80_000))
    size = path.stat().st_size
    assert size > 15e6
    feed, = feeds(tok, path, world=1, packing=True)
    tracemalloc.start()
    try:
        peaks = []
        for s in range(300):
            feed.micro_batches(s)
            if s in (49, 299):
                peaks.append(tracemalloc.get_traced_memory()[1])
                tracemalloc.reset_peak()
    finally:
        tracemalloc.stop()
    assert max(peaks) < size / 20, (peaks, size)  # a window of rows, not the file
    assert peaks[1] < 1.5 * peaks[0], peaks  # flat: no growth after the first 50 steps


def test_windows_continue_one_open_stream(tmp_path, tok, monkeypatch):
    """A stream that is not a local .jsonl (a hub id, a dataset repository) is opened once per
    epoch: each window goes on from the open stream, instead of reopening it and skipping every
    row read so far again (quadratic over a long stream)."""
    from dpkit.data import stream

    opened = []
    real = stream.open_stream
    monkeypatch.setattr(stream, "open_stream", lambda source: opened.append(1) or real(source))
    path = stream_file(tmp_path, 61, "repo")
    feed, = feeds(tok, path, world=1)  # windows of 7 rows
    numbers = [row_number(tok, feed.micro_batches(s)[0]) for s in range(61)]
    assert sorted(numbers) == list(range(61)) and len(opened) == 1
    feed.micro_batches(61)  # the next epoch opens it again, from its start
    assert len(opened) == 2


def test_a_streamed_window_keeps_columns_its_first_row_lacks(tmp_path, tok):
    """Alpaca's optional `input` is missing from the first row of the stream: the rows that have
    it are still rendered with it, token for token as the in-memory path renders them."""
    rows = [{"instruction": "Name a color.", "output": "Blue."},
            {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
            {"instruction": "Say hi.", "input": "", "output": "Hi."}]
    path = tmp_path / "alpaca.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = {"path": str(path), "format": "alpaca"}
    section = DataSection(sources=[source], max_seq_len=128, streaming=True, shuffle_buffer=8)
    feed = StreamFeed(section, tok, seed=1, micro=1, accum=1, dp_rank=0, dp_world=1,
                      collate=collate, pad_id=tok.pad_token_id)
    streamed = sorted((b["input_ids"][0].tolist(), b["labels"][0].tolist())
                      for b in (feed.micro_batches(s)[0] for s in range(len(rows))))
    memory = load_datasets(DataSection(sources=[source], max_seq_len=128), tok, seed=0)[0]
    assert streamed == sorted((ex.input_ids, ex.labels) for ex in memory)
    assert any("2 and 3" in tok.decode(ids) for ids, _ in streamed)


def test_a_malformed_stream_line_is_named_by_file_and_line(tmp_path, tok):
    """validate sees the bad line in the head of the file and refuses it as one problem; the
    ranks' reader, past validate's head (here: the whole file passed as its head), raises
    dpkit's one-line error naming the file and line instead of a JSONDecodeError."""
    from dpkit.data import stream

    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "row 0"}\n\n{"text": "row 1"}\n{"text": "row 2"\n{"text": "3"}\n')
    with pytest.raises(ValueError, match="line 4 is not valid JSON"):
        stream.first_row(DataSource(path=str(path), format="text"))
    feed, = feeds(tok, path, world=1)
    with pytest.raises(RecipeError, match=r"bad.jsonl': line 4 is not valid JSON .* fix or "
                                          r"remove the line") as e:
        feed.micro_batches(0)
    assert len(str(e.value).splitlines()) == 1
    path.write_text('{"text": "row 0"}\n[1, 2]\n')
    resumed = stream.SourceReader(DataSource(path=str(path), format="text"),
                                  {"pass": 0, "byte": 18, "row": 1})
    with pytest.raises(RecipeError, match="line 2 is a JSON list, not an object"):
        resumed.parse(resumed.next())


def test_validate_refuses_a_malformed_stream_line_in_one_line(tmp_path, capsys):
    from conftest import tiny_recipe, write_recipe

    from dpkit.cli import main

    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "row 0"}\n{"text": row 1}\n')
    recipe = tiny_recipe(tmp_path / "run", data={"sources": [{"path": str(path), "format": "text"}],
                                                 "streaming": True})
    assert main(["validate", str(write_recipe(tmp_path / "r.yaml", recipe))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: data.sources[0].path: could not stream")
    assert "line 2 is not valid JSON" in err[0]


# ---------------------------------------------- what is read back from the cache (issue 27)
def test_an_edit_keeping_size_and_mtime_is_tokenized_again(tmp_path, tok):
    """`cp -p` / `touch -r`: the file's bytes change, its size and mtime don't. The cache must
    not serve the old tokens."""
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "the cat sat"}) + "\n")
    section = DataSection(sources=[{"path": str(data), "format": "text"}], max_seq_len=32,
                          cache_dir=str(tmp_path / "c"))
    first = load_cached(section, tok, seed=0, say=lambda m: None)[0]
    assert first[0].input_ids == tok("the cat sat").input_ids + [tok.eos_token_id]
    st = data.stat()
    data.write_text(json.dumps({"text": "the dog sat"}) + "\n")  # same length
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert data.stat().st_size == st.st_size and data.stat().st_mtime_ns == st.st_mtime_ns
    rows, _, stats = load_cached(section, tok, seed=0, say=lambda m: None)
    assert not stats.cached
    assert rows[0].input_ids == tok("the dog sat").input_ids + [tok.eos_token_id]


def test_a_hub_dataset_that_moved_upstream_gets_a_new_key(tok, monkeypatch):
    """An unpinned hub dataset: the key holds the commit its revision resolves to (asked of the
    hub by dpkit.data.cache.resolved_revision, which is not called here: no network)."""
    from dpkit.data import cache

    section = DataSection(sources=[{"path": "someone/prefs", "format": "text"}])
    keys = []
    for sha in ("a" * 40, "b" * 40, "b" * 40):
        monkeypatch.setattr(cache, "resolved_revision", lambda source, sha=sha: sha)
        keys.append(cache_key(section, tok, section.sources[0])[0])
    assert keys[0] != keys[1] == keys[2]


def test_ranks_the_hub_answers_differently_agree_on_rank_0s_commit(tok, monkeypatch):
    """The hub answers rank 0 and times out on rank 1 (or names a newer commit): both key the
    cache with rank 0's answer, sent by broadcast (stood in for here), and only rank 0 asks."""
    import huggingface_hub

    from dpkit.data import cache

    section = DataSection(sources=[{"path": "someone/prefs", "format": "text"}])
    asked = []

    def hub(answer):
        def dataset_info(self, repo_id, revision=None, **kwargs):
            asked.append(answer)
            if answer is None:
                raise TimeoutError("the hub did not answer")
            return SimpleNamespace(sha=answer)
        return dataset_info

    def rank_key(rank, answer, broadcast):  # one rank's process: its own memo, its own hub
        monkeypatch.setattr(cache, "_RESOLVED", {})
        monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", hub(answer))
        if broadcast is not None:
            cache.agree_on_hub_revisions(section, ("sources",), rank, broadcast)
        return cache_key(section, tok, section.sources[0])[0]

    for other in (None, "b" * 40):
        sent = []
        key0 = rank_key(0, "a" * 40, lambda obj: sent.append(obj) or obj)
        asked.clear()
        assert rank_key(1, other, lambda obj: sent[0]) == key0
        assert asked == []  # rank 1 never asked the hub
        assert rank_key(1, other, None) != key0  # asking itself, it would wait on another entry


def test_preference_pairs_are_tokenized_once_into_the_cache(tmp_path, tok, monkeypatch):
    """Pairs go through the tokenize-once cache like rows: the second load reads the entry
    (nothing tokenized) and equals tokenizing in memory."""
    from dpkit.data import preference

    section = DataSection(sources=[{"path": "dpkit:data/self_instruct_seed.preference.jsonl",
                                    "format": "preference"}], max_seq_len=96, eval_fraction=0.1,
                          cache_dir=str(tmp_path / "c"))
    fresh = load_datasets(section, tok, seed=2, options={"max_prompt_len": 16})
    first = load_cached(section, tok, seed=2, say=lambda m: None, options={"max_prompt_len": 16})
    monkeypatch.setattr(preference, "encode_pairs", None)  # a second tokenization would fail
    again = load_cached(section, tok, seed=2, say=lambda m: None, options={"max_prompt_len": 16})
    assert not first[2].cached and again[2].cached
    entry, = (tmp_path / "c").glob("tok-*")
    assert [p["path"] for p in json.loads((entry / "meta.json").read_text())["parts"]] == \
        [section.sources[0].path]

    def sides(pairs):
        return [(p.chosen_ids, p.chosen_labels, p.rejected_ids, p.rejected_labels) for p in pairs]

    for got in (first, again):
        assert sides(got[0]) == sides(fresh[0]) and sides(got[1]) == sides(fresh[1])
        assert got[2].describe().split(" (")[0] == fresh[2].describe().split(" (")[0]
        assert (got[2].prompt_truncated, got[2].dropped_identical) == \
            (fresh[2].prompt_truncated, fresh[2].dropped_identical)
    monkeypatch.undo()
    other = load_cached(section, tok, seed=2, say=lambda m: None, options={"max_prompt_len": None})
    assert not other[2].cached  # max_prompt_len changes the tokens: its own entry


def test_a_torn_cache_entry_is_rebuilt_with_a_note(tmp_path, capsys):
    """A half-written meta.json: `dpkit validate` and `dpkit prepare` set the entry aside and
    tokenize again (exit 0, a note in the data report), no JSON traceback."""
    from conftest import tiny_recipe, write_recipe

    from dpkit.cli import main

    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(
        tmp_path / "run", data={"sources": [{"path": str(MESSAGES), "format": "messages"}],
                                "max_seq_len": 64, "cache_dir": str(tmp_path / "c")}))
    assert main(["prepare", str(recipe)]) == 0
    entry, = (tmp_path / "c").glob("tok-*")
    meta = entry / "meta.json"
    whole = meta.read_text()
    for command in ("validate", "prepare"):
        meta.write_text(whole[:len(whole) // 2])
        capsys.readouterr()
        assert main([command, str(recipe)]) == 0
        out, err = capsys.readouterr()
        assert f"note: cache entry {entry.name} was damaged (its meta.json can't be read " \
               "(JSONDecodeError)): tokenized again" in out + err, out + err
        assert "Traceback" not in out + err
        assert json.loads(meta.read_text()) and (entry / "COMPLETE").is_file()
    assert main(["prepare", str(recipe)]) == 0
    assert "already prepared" in capsys.readouterr().out


def test_summary_records_the_prompts_extracted_from_implicit_prompt_pairs(tmp_path, tok):
    """summary.json's data counts include the pairs whose prompt dpkit cut from chosen/rejected
    (no prompt column): here 2 of 3 pairs, as written below, read through the cache as a run."""
    from dpkit.run import Run

    head = "\n\nHuman: What color is the sky?\n\nAssistant:"
    rows = [{"chosen": head + " Blue.", "rejected": head + " Green."},
            {"chosen": head + " It is blue.", "rejected": head + " It is black."},
            {"prompt": head, "chosen": " Blue.", "rejected": " Red."}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    section = DataSection(sources=[{"path": str(path), "format": "preference"}],
                          cache_dir=str(tmp_path / "c"))
    _, evals, stats = load_cached(section, tok, seed=0, say=lambda m: None)
    run = SimpleNamespace(  # a finished run's state, as summary() reads it
        recipe=SimpleNamespace(zero=SimpleNamespace(stage=2), data=section, objective="dpo",
                               model=SimpleNamespace(dtype="float32", name_or_path="tiny")),
        batch=SimpleNamespace(global_batch_size=8, micro_batch_size=2, grad_accum=1,
                              sequence_parallel=1),
        data_stats=stats, eval_rows=evals, total_steps=1, tokens_seen=0, last_loss=None,
        last_eval=None, env=SimpleNamespace(world_size=1, device=SimpleNamespace(type="cpu")),
        attention="eager", objective=SimpleNamespace(card=dict, card_rows=list), n_params=0,
        n_train=0, layout=SimpleNamespace(world_size=1, stage=2),
        evals=SimpleNamespace(summary=dict), started=0.0, source_counts=[0, 0])
    data = Run.summary(run)["data"]
    assert data["prompts_extracted"] == 2 and data["rows"] == 3
    assert data["sources"][0]["rows_available"] == 3 and data["mixture"] == "concat"
