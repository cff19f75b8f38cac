"""Data: prompt masking against hand-derived expectations, sharding, collation."""

import itertools
import json

import pytest
from conftest import ALPACA, MESSAGES, TOKENIZER

from dpkit.data import (ALPACA_NO_INPUT, ALPACA_WITH_INPUT, IGNORE, collate, epoch_order,
                        eval_micro_batches, load_datasets, shard, step_micro_batches,
                        steps_per_epoch, target_tokens, tokenize_row)
from dpkit.errors import RecipeError
from dpkit.model import load_tokenizer
from dpkit.recipe import DataSection, DataSource, ModelSection


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ModelSection(config={"model_type": "llama"}, tokenizer=str(TOKENIZER)))


def test_tokenizer_without_pad_pads_with_eos(tok):
    assert tok.pad_token == tok.eos_token == "</s>"


@pytest.mark.parametrize("row, template", [
    ({"instruction": "Name a color.", "input": "", "output": "Blue is a color."}, ALPACA_NO_INPUT),
    ({"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}, ALPACA_WITH_INPUT),
])
def test_alpaca_masks_exactly_the_prompt(tok, row, template):
    source = DataSource(path="x.jsonl", format="alpaca")
    ex = tokenize_row(row, source, tok, completion_only=True)
    prompt = template.format(**row)
    prompt_ids = tok(prompt).input_ids          # <s> + prompt, tokenized on its own
    full_ids = tok(prompt + row["output"]).input_ids
    assert full_ids[: len(prompt_ids)] == prompt_ids  # the boundary tokenizes cleanly here
    expected_ids = full_ids + [tok.eos_token_id]
    expected_labels = [IGNORE] * len(prompt_ids) + expected_ids[len(prompt_ids):]
    assert ex.input_ids == expected_ids
    assert ex.labels == expected_labels
    assert tok.decode([t for t in ex.labels if t != IGNORE]) == row["output"] + "</s>"


def test_alpaca_without_completion_only_trains_everything_but_bos(tok):
    row = {"instruction": "Name a color.", "input": "", "output": "Blue."}
    ex = tokenize_row(row, DataSource(path="x", format="alpaca"), tok, completion_only=False)
    assert ex.labels[0] == IGNORE and ex.labels[1:] == ex.input_ids[1:]


def test_plain_text_rows_skip_offsets_and_equal_the_tokenizer(tok):
    """Text rows are tokenized without character offsets (encode_batch_fast); alpaca rows without
    completion-only need none either. Both must equal the tokenizer called by hand, and a batch
    that needs offsets (completion-only alpaca) must still mask its prompt."""
    from dpkit.data.tokenize import encode_batch

    texts = ["The model learns.", "", "two  spaces and a tab\t1 2 3", "é ü — unicode 42"]
    out = encode_batch({"text": texts}, DataSource(path="x", format="text"), tok, None)
    for text, ids, labels in zip(texts, out["input_ids"], out["labels"]):
        expected = tok(text).input_ids + [tok.eos_token_id]
        assert ids == expected
        assert labels == [IGNORE] + expected[1:]  # bos is never trained on
    row = {"instruction": ["Name a color."], "input": [""], "output": ["Blue."]}
    alpaca = DataSource(path="x", format="alpaca")
    everything = encode_batch(row, alpaca, tok, None, completion_only=False)
    masked = encode_batch(row, alpaca, tok, None, completion_only=True)
    assert everything["input_ids"] == masked["input_ids"]
    n_prompt = len(tok(ALPACA_NO_INPUT.format(instruction="Name a color.", input="")).input_ids)
    assert masked["labels"][0] == [IGNORE] * n_prompt + masked["input_ids"][0][n_prompt:]
    assert everything["labels"][0] == [IGNORE] + everything["input_ids"][0][1:]


def test_messages_train_only_assistant_turns(tok):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Capital of France?"},
                {"role": "assistant", "content": "Paris."},
                {"role": "user", "content": "And of Italy?"},
                {"role": "assistant", "content": "Rome."}]
    ex = tokenize_row({"messages": messages}, DataSource(path="x", format="messages"), tok, True)
    rendered = ("<s><|system|>\nBe brief.</s>\n<|user|>\nCapital of France?</s>\n"
                "<|assistant|>\nParis.</s>\n<|user|>\nAnd of Italy?</s>\n<|assistant|>\nRome.</s>\n")
    assert tok.decode(ex.input_ids) == rendered
    trained = [i for i, label in enumerate(ex.labels) if label != IGNORE]
    # Two contiguous runs of trained tokens, one per assistant turn, each with its </s>.
    runs = [list(g) for _, g in itertools.groupby(trained, key=lambda i, c=itertools.count():
                                                  i - next(c))]
    assert [tok.decode([ex.input_ids[i] for i in run]) for run in runs] == ["Paris.</s>\n",
                                                                           "Rome.</s>\n"]
    assert all(ex.labels[i] == ex.input_ids[i] for i in trained)


def test_column_mapping_and_missing_column(tmp_path, tok):
    path = tmp_path / "qa.jsonl"
    path.write_text('{"question": "Say hi.", "answer": "Hi."}\n')
    section = DataSection(sources=[{"path": str(path), "format": "alpaca",
                                    "columns": {"instruction": "question", "output": "answer"}}])
    train, _, stats = load_datasets(section, tok, seed=0)
    assert stats.rows == 1
    assert tok.decode([t for t in train[0].labels if t != IGNORE]) == "Hi.</s>"
    unmapped = DataSection(sources=[{"path": str(path), "format": "alpaca"}])
    with pytest.raises(RecipeError) as e:
        load_datasets(unmapped, tok, seed=0)
    assert "data.sources[0]: dataset" in str(e.value) and "no column 'instruction'" in str(e.value)
    assert "columns: {instruction: <column>}" in str(e.value)


def test_overflow_truncate_and_drop_are_counted(tok):
    rows = [r for r in (MESSAGES.read_text().splitlines())]
    n = len(rows)
    common = dict(sources=[{"path": str(MESSAGES), "format": "messages"}], max_seq_len=64)
    _, _, truncated = load_datasets(DataSection(**common, overflow="truncate"), tok, 0)
    train, _, dropped = load_datasets(DataSection(**common, overflow="drop"), tok, 0)
    assert dropped.dropped_too_long > 0 and truncated.truncated > 0
    assert truncated.rows + truncated.dropped_no_target == n
    assert dropped.rows + dropped.dropped_too_long + dropped.dropped_no_target == n
    assert all(len(ex.input_ids) <= 64 for ex in train)


def test_eval_fraction_holds_out_rows(tok):
    section = DataSection(sources=[{"path": str(ALPACA), "format": "alpaca"}], eval_fraction=0.2,
                          max_seq_len=512)
    train, evals, stats = load_datasets(section, tok, seed=1)
    assert len(evals) == round(stats.rows * 0.2) and len(train) + len(evals) == stats.rows
    assert not {tuple(e.input_ids) for e in evals} & {tuple(t.input_ids) for t in train}


@pytest.mark.parametrize("n", [1, 10, 11, 13, 175])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shards_are_disjoint_and_cover(n, world):
    order = epoch_order(n, seed=3, epoch=0)
    shards = [shard(order, r, world) for r in range(world)]
    flat = [i for s in shards for i in s]
    assert sorted(flat) == list(range(n))          # covering, nothing repeated
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


@pytest.mark.parametrize("n", [13, 40, 175])
@pytest.mark.parametrize("world, micro", [(1, 8), (2, 2), (2, 4), (4, 1)])
def test_every_world_size_sees_the_single_process_batches(n, world, micro):
    global_batch = 8
    accum = global_batch // (micro * world)
    order = epoch_order(n, seed=5, epoch=2)
    for step in range(steps_per_epoch(n, global_batch)):
        rows = [i for r in range(world) for mb in step_micro_batches(
            n, 5, 2, step, r, world, micro, accum) for i in mb]
        assert sorted(rows) == sorted(order[step * global_batch:(step + 1) * global_batch])


def test_epochs_reshuffle():
    assert epoch_order(50, 0, 0) != epoch_order(50, 0, 1)
    assert epoch_order(50, 0, 1) == epoch_order(50, 0, 1)


@pytest.mark.parametrize("n, world, micro", [(5, 2, 2), (7, 3, 2), (1, 2, 4)])
def test_eval_batches_cover_and_are_equal_in_number(n, world, micro):
    per_rank = [eval_micro_batches(n, r, world, micro) for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1
    assert sorted(i for b in per_rank for mb in b for i in mb) == list(range(n))


def test_collate_pads_and_masks():
    from dpkit.data import Example

    batch = collate([Example([1, 5, 6], [IGNORE, 5, 6]), Example([1, 7], [IGNORE, 7])], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 6], [1, 7, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 5, 6], [IGNORE, 7, IGNORE]]
    assert target_tokens(batch) == 3
    empty = collate([], pad_id=0)
    assert target_tokens(empty) == 0 and (empty["labels"] == IGNORE).all()


def test_chat_template_from_the_recipe(tmp_path):
    section = ModelSection(config={"model_type": "llama"}, tokenizer=str(TOKENIZER),
                           chat_template="chatml")
    tok = load_tokenizer(section)
    ex = tokenize_row({"messages": [{"role": "user", "content": "Hi"},
                                    {"role": "assistant", "content": "Yo."}]},
                      DataSource(path="x", format="messages"), tok, True)
    assert tok.decode(ex.input_ids) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n" \
                                       "Yo.<|im_end|>\n"
    assert tok.decode([t for t in ex.labels if t != IGNORE]) == "Yo.<|im_end|>\n"
    with pytest.raises(RecipeError, match="model.chat_template: 'nope' is neither"):
        load_tokenizer(ModelSection(config={"model_type": "llama"}, tokenizer=str(TOKENIZER),
                                    chat_template="nope"))


def test_messages_without_a_chat_template_is_refused(tmp_path, tok):
    bare = load_tokenizer(ModelSection(config={"model_type": "llama"}, tokenizer=str(TOKENIZER)))
    bare.chat_template = None
    section = DataSection(sources=[{"path": str(MESSAGES), "format": "messages"}])
    with pytest.raises(RecipeError, match=r"data.sources\[0\].format: `messages` needs a chat"):
        load_datasets(section, bare, seed=0)


def test_every_local_layout_gives_the_same_rows(tmp_path, tok):
    """jsonl, json, parquet, csv files, and a directory laid out like a hub dataset repository
    (read through `datasets.load_dataset(name)`, the hub code path), with a split and max_rows."""
    import datasets

    rows = datasets.load_dataset("json", data_files=str(ALPACA), split="train").select(range(20))
    rows.to_json(tmp_path / "a.json", lines=False)
    rows.to_parquet(tmp_path / "a.parquet")
    rows.to_csv(tmp_path / "a.csv", index=False)
    repo = tmp_path / "repo" / "data"
    repo.mkdir(parents=True)
    rows.to_json(repo / "train.jsonl")
    rows.select(range(5)).to_json(repo / "test.jsonl")

    def texts(**source):
        section = DataSection(sources=[{"format": "alpaca", **source}], max_seq_len=512)
        train, _, _ = load_datasets(section, tok, seed=0)
        return [tuple(ex.input_ids) for ex in train]

    expected = texts(path=str(ALPACA), max_rows=20)
    assert len(expected) > 10
    for name in ("a.json", "a.parquet", "a.csv"):
        assert texts(path=str(tmp_path / name)) == expected, name
    assert texts(path=str(tmp_path / "repo")) == expected
    assert texts(path=str(tmp_path / "repo"), split="test") == expected[:5]


def test_implicit_prompt_pairs_get_their_shared_beginning_as_the_prompt(tmp_path, tok):
    """HH-RLHF style: no `prompt` column, `chosen` and `rejected` are whole transcripts. The
    shared beginning, cut where a word starts, is the prompt (masked); the answers are what
    follows; the report counts the pairs. Message lists: the shared leading turns."""
    from dpkit.data.preference import render_pair

    head = "\n\nHuman: What color is the sky?\n\nAssistant:"
    rows = [{"chosen": head + " Blue.", "rejected": head + " Green, mostly."},
            {"chosen": head + " It is blue.", "rejected": head + " It is black."}]
    written_out = [(head, " Blue.", " Green, mostly."),
                   (head + " It is", " blue.", " black.")]  # not "bl" | "ue." / "ack."
    source = DataSource(path="hh.jsonl", format="preference")
    assert [render_pair(r, source, tok)[:3] for r in rows] == written_out
    path = tmp_path / "hh.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs, _, stats = load_datasets(DataSection(sources=[{"path": str(path),
                                                          "format": "preference"}]), tok, seed=0)
    for pair, (prompt, chosen, rejected) in zip(pairs, written_out):
        n = len(tok(prompt).input_ids)  # <s> + prompt, tokenized on its own
        for ids, labels, answer in ((pair.chosen_ids, pair.chosen_labels, chosen),
                                    (pair.rejected_ids, pair.rejected_labels, rejected)):
            full = tok(prompt + answer).input_ids
            assert full[:n] == tok(prompt).input_ids  # the boundary tokenizes cleanly here
            assert ids == full + [tok.eos_token_id]
            assert labels == [IGNORE] * n + ids[n:]
    assert stats.prompts_extracted == 2
    assert "2 prompts extracted from chosen/rejected" in stats.describe()
    user = {"role": "user", "content": "Hi"}
    turns = {"chosen": [user, {"role": "assistant", "content": "Hello!"}],
             "rejected": [user, {"role": "assistant", "content": "Go away."}]}
    chatml = load_tokenizer(ModelSection(config={"model_type": "llama"}, tokenizer=str(TOKENIZER),
                                         chat_template="chatml"))
    prompt, chosen, rejected, _, extracted = render_pair(turns, source, chatml)
    assert prompt == chatml.apply_chat_template([user], tokenize=False,
                                                add_generation_prompt=True) and extracted
    assert chosen.startswith("Hello!") and rejected.startswith("Go away.")
