"""Data mixtures without ranks (dpkit/data/mixture.py): the quota schedule against its promises
(within one row of every share at every block, never taking a draw back), the draws per epoch of
each strategy, feeds on one and on two data-parallel ranks (feeds in one process stand for
ranks), the per-source cache, the schema's refusals."""

import json
import random
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest
from conftest import ALPACA, MESSAGES, TOKENIZER

from dpkit.data import load_datasets
from dpkit.data.cache import load_cached
from dpkit.data.feed import MixtureFeed
from dpkit.data.load import collate
from dpkit.data.mixture import (
    Mixture,
    MixSpec,
    Schedule,
    apportion,
    epoch_counts,
    integer_shares,
)
from dpkit.errors import RecipeError
from dpkit.model import load_tokenizer
from dpkit.recipe import DataSection, ModelSection, recipe_from_dict


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ModelSection(config={"model_type": "llama"}, tokenizer=str(TOKENIZER)))


# ------------------------------------------------------------------------------- the schedule
def test_integer_shares_keep_the_ratio_exactly():
    assert integer_shares([0.3, 0.7]) == (3, 7)
    assert integer_shares([2, 2, 4]) == (1, 1, 2)
    assert integer_shares([0.25, 1.5]) == (1, 6)


def test_apportion_is_largest_remainder_written_out():
    # 10 draws by 1:1:1 → exact 3.33 each: floors 3,3,3 and one left to the lowest index
    assert apportion(10, [1, 1, 1]) == [4, 3, 3]
    # 7 by 3:7 → 2.1 and 4.9: floors 2, 4; the one left goes to the larger remainder (.9)
    assert apportion(7, [3, 7]) == [2, 5]
    assert apportion(0, [5, 1]) == [0, 0]


@pytest.mark.parametrize("seed", range(6))
def test_every_block_keeps_each_source_within_one_row_of_its_share(seed):
    """Random weights and batches: at every block boundary each source's draws so far differ
    from weight × draws by less than one row, and no source ever has fewer draws than at the
    block before (largest remainders can take a seat back as the total grows: the block is
    sized so they can't here)."""
    rng = random.Random(seed)
    for _ in range(40):
        weights = [round(rng.uniform(0.01, 4), 2) for _ in range(rng.randint(1, 5))]
        schedule = Schedule(integer_shares(weights), rng.randint(1, 32))
        exact = [Fraction(str(w)) / sum(Fraction(str(v)) for v in weights) for w in weights]
        previous = [0] * len(weights)
        for b in range(1, 120):
            got = schedule.before(b)
            t = b * schedule.block
            assert sum(got) == t
            assert all(abs(g - p * t) < 1 for g, p in zip(got, exact)), (weights, b, got)
            assert all(g >= q for g, q in zip(got, previous)), (weights, b)
            previous = got


def test_the_block_is_the_batch_unless_a_source_would_get_no_row():
    assert Schedule((3, 7), 4).block == 4
    assert Schedule((1, 99), 4).block == 100  # the smallest multiple of 4 with ≥ 1 of the 1%


def test_draws_number_each_sources_rows_in_order_and_shuffle_the_block():
    schedule = Schedule((2, 3, 5), 10, total=95)
    draws = schedule.draws(0, 95, "s")
    counts = apportion(95, [2, 3, 5])
    for i in range(3):
        assert [k for j, k in draws if j == i] == list(range(counts[i]))
    blocks = [[j for j, _ in draws[b:b + 10]] for b in range(0, 90, 10)]
    assert all(Counter(b) == Counter({0: 2, 1: 3, 2: 5}) for b in blocks)  # exact per block
    assert len({tuple(b) for b in blocks}) > 1  # shuffled within blocks, differently
    assert schedule.draws(37, 61, "s") == draws[37:61]  # any slice, computed on its own


@pytest.mark.parametrize("strategy", ["first_exhausted", "all_exhausted"])
def test_epoch_counts_stop_at_the_first_or_last_source_to_run_out(strategy):
    rng = random.Random(1)
    for _ in range(200):
        k = rng.randint(1, 4)
        sizes = [rng.randint(1, 400) for _ in range(k)]
        weights = [rng.randint(1, 9) for _ in range(k)]
        counts = epoch_counts(strategy, sizes, weights)
        total = sum(counts)
        assert counts == apportion(total, integer_shares(weights))
        if strategy == "first_exhausted":  # no source drawn past its end; one more draw would
            assert all(c <= n for c, n in zip(counts, sizes))
            assert any(c > n for c, n in zip(apportion(total + 1, weights), sizes)) or \
                any(c > n for c, n in zip(apportion(total + 2, weights), sizes))
        else:  # every source read whole; one draw fewer would leave one short
            assert all(c >= n for c, n in zip(counts, sizes))
            assert any(c < n for c, n in zip(apportion(total - 1, weights), sizes))


def test_fixed_counts_are_rows_or_epochs_times_rows():
    assert epoch_counts("fixed", [100, 40], [1, 1], rows=[30, None],
                        epochs=[None, 2.5]) == [30, 100]
    assert epoch_counts("concat", [100, 40], [1, 1]) == [100, 40]


# ---------------------------------------------------------------------------- feeds in memory
def toy(sizes, strategy="all_exhausted", weights=(1, 1, 1)) -> Mixture:
    """Items are (source, row) pairs standing for tokenized rows."""
    items = [_Row(i, j) for i, n in enumerate(sizes) for j in range(n)]
    spec = MixSpec(strategy, tuple(weights), (None,) * len(sizes), (None,) * len(sizes))
    return Mixture(items, sizes, spec)


class _Row:
    def __init__(self, source, row):
        self.source, self.row = source, row
        self.input_ids = [1] * (3 + source)  # a source's rows have its own length

    def key(self):
        return self.source, self.row


def keys(examples, pad_id=0, flatten=False):
    return [ex.key() for ex in examples]


def feeds(mixture, world, seed, micro=2, accum=2):
    batch = micro * accum * 2  # the global batch: the same for world 1 and 2
    accum_here = batch // (micro * world)
    return [MixtureFeed(mixture, seed, micro, accum_here, r, world, batch, keys, 0)
            for r in range(world)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shares_drawn_over_a_run_match_the_weights_on_one_and_two_ranks(seed):
    """3 sources (weights 5:3:2, sizes 70/500/13) over 3,000+ draws: each source's share of the
    rows drawn is within 1% of its weight, every row of a step is drawn once on 2 ranks, and 2
    ranks draw exactly the rows of 1 process at every step."""
    mixture = toy([70, 500, 13], "all_exhausted", (5, 3, 2))
    one, = feeds(mixture, 1, seed)
    two = feeds(mixture, 2, seed)
    drawn = Counter()
    steps = 3200 // one.batch
    for step in range(steps):
        single = [k for mb in one.micro_batches(step) for k in mb]
        split = [[k for mb in f.micro_batches(step) for k in mb] for f in two]
        assert sorted(single) == sorted(split[0] + split[1]), step
        assert len(split[0]) + len(split[1]) == len(single)
        for f in two:
            assert f.last_counts[3:] == [sum(1 for s, _ in split[f.dp_rank] if s == i)
                                         for i in range(3)]
        drawn.update(s for s, _ in single)
    total = sum(drawn.values())
    for i, w in enumerate((0.5, 0.3, 0.2)):
        assert abs(drawn[i] / total - w) < 0.01, (drawn, total)


def test_a_source_drawn_past_its_end_is_read_again_in_a_new_order():
    mixture = toy([5, 50], "all_exhausted", (1, 1))
    feed, = feeds(mixture, 1, seed=3, micro=5, accum=1)
    small = [r for step in range(feed.steps_per_epoch) for s, r in
             (k for mb in feed.micro_batches(step) for k in mb) if s == 0]
    passes = [small[i:i + 5] for i in range(0, 50, 5)]
    assert all(sorted(p) == list(range(5)) for p in passes)  # each pass reads all 5 rows
    assert len({tuple(p) for p in passes}) > 1  # in new orders


def test_first_exhausted_goes_on_where_the_last_epoch_stopped():
    mixture = toy([10, 40], "first_exhausted", (1, 1))  # 10 + 10 per epoch
    assert mixture.counts == [10, 10]
    feed, = feeds(mixture, 1, seed=0, micro=4, accum=1)
    big = [r for step in range(4 * feed.steps_per_epoch)
           for s, r in (k for mb in feed.micro_batches(step) for k in mb) if s == 1]
    assert sorted(big) == list(range(40))  # 4 epochs read the 40 rows once


def test_a_step_is_computed_from_its_number_alone():
    """The in-memory position is the step: a feed built afresh at step 37 (a resume, on
    another world size) draws what one that went through steps 0-36 draws."""
    mixture = toy([70, 500, 13], "all_exhausted", (5, 3, 2))
    going, = feeds(mixture, 1, seed=4)
    for step in range(37):
        going.micro_batches(step)
    fresh = feeds(mixture, 2, seed=4)
    for step in range(37, 60):
        a = sorted(k for mb in going.micro_batches(step) for k in mb)
        b = sorted(k for f in fresh for mb in f.micro_batches(step) for k in mb)
        assert a == b


# ----------------------------------------------------------------------- real data, in memory
def three_sources(**extra):
    weights = extra.pop("weights", (3, 5, 2))
    return DataSection(sources=[
        {"path": str(ALPACA), "format": "alpaca", "max_rows": 40, "weight": weights[0]},
        {"path": str(MESSAGES), "format": "messages", "weight": weights[1]},
        {"path": str(ALPACA), "format": "text", "columns": {"text": "output"}, "max_rows": 10,
         "weight": weights[2]}], max_seq_len=128, mixture="all_exhausted", **extra)


def test_loaded_sources_are_mixed_and_reported_per_source(tok):
    train, evals, stats = load_datasets(three_sources(), tok, seed=1)
    assert isinstance(train, Mixture) and train.sizes == [s["available"] for s in stats.sources]
    assert train.counts == epoch_counts("all_exhausted", train.sizes, [3, 5, 2])
    assert [s["per_epoch"] for s in stats.sources] == train.counts
    assert abs(sum(s["token_share"] for s in stats.sources) - 1) < 1e-9
    text = stats.describe()
    for s in stats.sources:
        assert f"{s['available']} rows, {s['per_epoch']} drawn per epoch" in text
    # item j of source i is what source i gave on its own
    alone, _, _ = load_datasets(DataSection(sources=[three_sources().sources[2].model_copy(
                                                update={"weight": None})],
                                            max_seq_len=128), tok, seed=1)
    a = train.offsets[2]
    assert [train[a + j].input_ids for j in range(len(alone))] == \
        [alone[j].input_ids for j in range(len(alone))]


def test_eval_fraction_holds_out_of_each_source_and_eval_mixture_draws_one_epoch(tok):
    train, evals, stats = load_datasets(three_sources(eval_fraction=0.1), tok, seed=1)
    whole, _, _ = load_datasets(three_sources(), tok, seed=1)
    assert sum(train.sizes) + len(evals) == sum(whole.sizes)
    assert all(w - t == max(1, round(w * 0.1)) for w, t in zip(whole.sizes, train.sizes))
    section = three_sources()
    section = DataSection(**{**section.model_dump(), "eval_sources": [
        {**section.sources[0].model_dump(), "rows_per_epoch": 4, "weight": None},
        {**section.sources[2].model_dump(), "epochs": 2, "weight": None}],
        "eval_mixture": "fixed"})
    _, evals, _ = load_datasets(section, tok, seed=1)
    assert len(evals) == 4 + 2 * 10


def test_packing_a_mixture_packs_each_source_on_its_own(tok):
    train, _, _ = load_datasets(three_sources(), tok, seed=1)
    packed = train.packed(128, seed=1)
    assert sum(len(packed[i].input_ids) for i in range(len(packed))) == \
        sum(len(train[i].input_ids) for i in range(len(train)))
    for i in range(3):  # a sequence never mixes sources
        rows = {tuple(train[j].input_ids) for j in range(train.offsets[i], train.offsets[i + 1])}
        for k in range(packed.offsets[i], packed.offsets[i + 1]):
            seq = packed[k]
            starts = [p for p, pos in enumerate(seq.position_ids) if pos == 0]
            starts.append(len(seq.input_ids))
            assert all(tuple(seq.input_ids[a:b]) in rows for a, b in zip(starts, starts[1:]))
    assert packed.counts == epoch_counts("all_exhausted", packed.sizes, [3, 5, 2])


def test_changing_one_weight_reuses_every_sources_cache(tmp_path, tok):
    """One cache entry per source, keyed without the mixture: a new weight (or strategy)
    tokenizes nothing and reads the rows back as they were; a new max_rows builds that source
    alone."""
    cache = tmp_path / "c"
    first = load_cached(three_sources(cache_dir=str(cache)), tok, seed=0, say=lambda m: None)
    log = cache / "tokenize.log"
    assert len(log.read_text().splitlines()) == 3 and len(list(cache.glob("tok-*"))) == 3
    again = load_cached(three_sources(cache_dir=str(cache), weights=(3, 5, 9)), tok, seed=0,
                        say=lambda m: None)
    assert again[2].cached and len(log.read_text().splitlines()) == 3
    assert [again[0][i].input_ids for i in range(len(again[0]))] == \
        [first[0][i].input_ids for i in range(len(first[0]))]
    assert again[0].counts != first[0].counts  # the new weight is applied
    fixed = three_sources(cache_dir=str(cache), weights=(None, None, None))
    fixed = DataSection(**{**fixed.model_dump(), "mixture": "fixed", "sources": [
        {**s.model_dump(), "rows_per_epoch": 7} for s in fixed.sources]})
    assert load_cached(fixed, tok, seed=0, say=lambda m: None)[2].cached
    moved = three_sources(cache_dir=str(cache))
    moved.sources[0].max_rows = 30
    assert not load_cached(moved, tok, seed=0, say=lambda m: None)[2].cached
    built = log.read_text().splitlines()
    assert len(built) == 4 and "alpaca" in built[-1]


def test_preference_pairs_mix_like_rows(tok):
    pref = str(ALPACA.parent / "self_instruct_seed.preference.jsonl")
    section = DataSection(sources=[{"path": pref, "format": "preference", "max_rows": 30,
                                    "rows_per_epoch": 12},
                                   {"path": pref, "format": "preference", "max_rows": 6,
                                    "epochs": 2}], mixture="fixed", max_seq_len=128)
    train, _, stats = load_datasets(section, tok, seed=0, options={"max_prompt_len": 24})
    assert isinstance(train, Mixture) and train.counts == [12, 2 * train.sizes[1]]
    feed, = feeds(train, 1, seed=0)
    assert feed.steps_per_epoch == -(-train.per_epoch // feed.batch)


# ------------------------------------------------------------------------------ the schema
@pytest.mark.parametrize("data, key", [
    ({"sources": [{"path": "a.jsonl", "weight": 2}]}, "data.sources[0].weight"),
    ({"mixture": "fixed", "sources": [{"path": "a.jsonl"}]}, "data.sources[0].rows_per_epoch"),
    ({"mixture": "first_exhausted", "sources": [{"path": "a.jsonl", "epochs": 2}]},
     "data.sources[0].epochs"),
    ({"mixture": "fixed", "streaming": True, "sources": [{"path": "a.jsonl", "epochs": 2}]},
     "data.sources[0].epochs"),
    ({"eval_mixture": "fixed", "sources": [{"path": "a.jsonl"}]}, "data.eval_mixture"),
])
def test_mixture_keys_that_do_not_fit_the_strategy_are_refused_in_one_line(tmp_path, data, key):
    from conftest import tiny_recipe

    raw = tiny_recipe(tmp_path / "out")
    raw["data"] = {**raw["data"], **data}
    with pytest.raises(RecipeError) as e:
        recipe_from_dict(raw)
    assert len(e.value.problems) == 1 and key in str(e.value), str(e.value)


def test_mixture_settings_are_data_order_settings():
    from dpkit.checkpoint import data_settings
    from conftest import tiny_recipe

    raw = tiny_recipe("out")
    a = data_settings(recipe_from_dict(raw))
    raw["data"]["mixture"] = "first_exhausted"
    raw["data"]["sources"][0]["weight"] = 2
    b = data_settings(recipe_from_dict(raw))
    assert a["data.mixture"] == "concat" and b["data.sources[0].weight"] == 2
    assert json.loads(json.dumps(b)) == b and np.all([k in b for k in a])


# ---------------------------------------------------------------------------------- streams
def stream_sources(tmp_path, sizes=(37, 400, 11)):
    paths = []
    for name, n in zip("abc", sizes):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": f"{name} {i} says hi"}) + "\n"
                                for i in range(n)))
        paths.append(path)
    return paths


def stream_feeds(tok, paths, world, mixture="all_exhausted", weights=(5, 3, 2), batch=8,
                 seed=1, **data):
    from dpkit.data.stream import StreamFeed

    keys = {"rows_per_epoch": weights} if mixture == "fixed" else {"weight": weights or ()}
    sources = [{"path": str(p), "format": "text",
                **({k: v[i] for k, v in keys.items()} if mixture != "concat" else {})}
               for i, p in enumerate(paths)]
    section = DataSection(sources=sources, mixture=mixture, max_seq_len=32, streaming=True,
                          shuffle_buffer=data.pop("shuffle_buffer", 13), **data)
    return [StreamFeed(section, tok, seed=seed, micro=1, accum=batch // world, dp_rank=r,
                       dp_world=world, collate=collate, pad_id=tok.pad_token_id)
            for r in range(world)]


def streamed(tok, feeds_, step) -> list[tuple[str, int]]:
    """Every rank's rows of a step, as (source, row) read back from the text."""
    out = []
    for f in feeds_:
        for b in f.micro_batches(step):
            for k, (ids, mask) in enumerate(zip(b["input_ids"], b["attention_mask"])):
                ids = ids[mask.bool()].tolist()
                if not ids:
                    continue
                pos = b["position_ids"][k].tolist() if "position_ids" in b else [0]
                starts = [j for j, p in enumerate(pos[:len(ids)]) if p == 0] + [len(ids)]
                for a, e in zip(starts, starts[1:]):  # the rows of a packed sequence
                    name, i = tok.decode(ids[a:e], skip_special_tokens=True).split()[:2]
                    out.append((name, int(i)))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_streamed_mixture_draws_the_weights_and_is_the_same_on_one_and_two_ranks(tmp_path,
                                                                                   tok, seed):
    paths = stream_sources(tmp_path)
    one = stream_feeds(tok, paths, 1, seed=seed)
    two = stream_feeds(tok, paths, 2, seed=seed)
    drawn = Counter()
    for step in range(2400 // 8):
        a, b = streamed(tok, one, step), streamed(tok, two, step)
        assert sorted(a) == sorted(b) and len(a) == 8, step
        drawn.update(name for name, _ in a)
        assert one[0].last_counts[3:] == [sum(1 for n, _ in a if n == x) for x in "abc"]
    total = sum(drawn.values())
    for name, w in zip("abc", (0.5, 0.3, 0.2)):
        assert abs(drawn[name] / total - w) < 0.01, drawn


def test_streamed_epochs_end_as_the_strategy_says(tmp_path, tok):
    """One epoch of draws of sources of 10, 40 and 6 rows (`Draws`, as the feed reads them),
    each strategy's end written out; the feed's first items are that epoch's rows."""
    from dpkit.data.stream import Draws

    paths = stream_sources(tmp_path, (10, 40, 6))

    def epoch(mixture, weights, seed=1):
        feed, = stream_feeds(tok, paths, 1, mixture, weights, seed=seed)
        draws = Draws(feed.section, seed, 8, feed.position["start"])
        got, ended = draws.take(10_000)
        assert ended
        rows = [(paths[i].stem, int(draws.readers[i].parse(raw)["text"].split()[1]))
                for i, raw in got]
        return rows, Counter(n for n, _ in rows), feed

    block = 8  # the schedule's: within a block the draws are shuffled
    rows, n, feed = epoch("first_exhausted", (1, 1, 1))  # ends when c (6 rows) runs out
    assert n["c"] == 6 and abs(n["a"] - 6) <= block and abs(n["b"] - 6) <= block
    first = [r for s in range(-(-len(rows) // 8)) for r in streamed(tok, [feed], s)]
    assert sorted(first[:len(rows)]) == sorted(rows)  # the feed's epoch 0
    rows, n, _ = epoch("all_exhausted", (1, 1, 1))  # until b (40) is read whole
    assert n["b"] == 40 and abs(n["a"] - 40) <= block and abs(n["c"] - 40) <= block
    c = [i for name, i in rows if name == "c"]  # c read again and again, all of it each time
    assert all(sorted(c[k:k + 6]) == list(range(6)) for k in range(0, len(c) - 5, 6))
    rows, n, _ = epoch("fixed", (3, 5, 2))  # 3, 5 and 2 rows per epoch
    assert n == {"a": 3, "b": 5, "c": 2}
    rows, n, _ = epoch("concat", None)  # every row once
    assert sorted(rows) == sorted([("a", i) for i in range(10)] + [("b", i) for i in range(40)]
                                  + [("c", i) for i in range(6)])
    # fixed: the next epoch goes on where this one stopped
    feed, = stream_feeds(tok, paths, 1, "fixed", (3, 5, 2), batch=10, shuffle_buffer=10)
    e0, e1 = streamed(tok, [feed], 0), streamed(tok, [feed], 1)
    assert sorted(i for n, i in e0 + e1 if n == "b") == list(range(10))


@pytest.mark.parametrize("packing", [False, True])
def test_a_streamed_mixture_resumes_exactly_on_another_world_size(tmp_path, tok, packing):
    """3 weighted sources: the position two ranks saved at step 23 (mid-window, mid-pass of the
    small sources) read by one process (and the reverse) continues step for step as the run
    that never stopped; the resume reads one window, not the 23 steps before it."""
    from dpkit.data import stream

    paths = stream_sources(tmp_path)
    going = stream_feeds(tok, paths, 2, packing=packing)
    for step in range(23):
        streamed(tok, going, step)
    state = json.loads(json.dumps(going[0].state_dict()))
    assert state == going[1].state_dict()
    assert state["position"]["taken"] > 0
    read = []
    real = stream.SourceReader.next

    def counted(self):
        read.append(1)
        return real(self)

    stream.SourceReader.next = counted
    try:
        resumed = stream_feeds(tok, paths, 1, packing=packing)
        resumed[0].load_state_dict(state)
        assert len(read) <= 13 + 3  # one window of draws (and a pass ending per source)
    finally:
        stream.SourceReader.next = real
    for step in range(23, 60):
        a, b = streamed(tok, going, step), streamed(tok, resumed, step)
        assert sorted(a) == sorted(b), step


def test_a_mixed_source_with_no_rows_left_is_named(tok, tmp_path):
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"text": "word " * 400}) + "\n")
    section = DataSection(sources=[{"path": str(MESSAGES), "format": "messages", "weight": 1},
                                   {"path": str(long), "format": "text", "weight": 1}],
                          mixture="first_exhausted", max_seq_len=64, overflow="drop")
    with pytest.raises(RecipeError, match=r"data.sources\[1\]: .*long.jsonl' has no rows left"):
        load_datasets(section, tok, seed=0)
