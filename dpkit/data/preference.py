"""Preference pairs: a prompt with a chosen and a rejected answer, tokenized for the preference
objectives (dpkit/objectives/preference.py).

Accepted layouts (TRL's, which users already have):
- standard: `prompt`, `chosen`, `rejected` are strings; the tokenizer adds bos as for any prompt
  and eos is appended (trained) to each answer, as for alpaca rows. Without `prompt` (HH-RLHF's
  whole transcripts) their shared beginning is the prompt (`shared_prefix`), counted in the report.
- conversational: `chosen` / `rejected` are message lists. With a `prompt` message list they are
  the answers alone (or repeat the prompt turns first, which are then skipped); without one — or
  with a string prompt, as in UltraFeedback-binarized — the leading turns they share are the
  prompt. Rendered with the chat template.

Each side is tokenized whole (prompt + answer, as the model sees it at inference) and a token is
trained on when it ends inside the answer (a token straddling the boundary holds answer text); prompt tokens get label -100. `max_prompt_len` keeps
the last prompt tokens; then each side is cut (or dropped, `data.overflow: drop`) at
`data.max_seq_len`. Pairs whose answers are identical (as text, or once cut) carry no preference
and are left out; all of it is counted in DataStats and reported at start. Pairs are tokenized
once per node into the tokenized-data cache (dpkit/data/cache.py), like rows.

A method may ask for numbers that come with each pair (a reward model's margin): its data options'
`pair_numbers` name them and the column holding each (`number_columns`); they are read while
tokenizing, kept in the cache beside the tokens and collated as a float64 tensor per name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from dpkit.data.rows import RowKind
from dpkit.errors import Problem, RecipeError

IGNORE = -100


@dataclass
class PairExample:
    chosen_ids: list[int]
    chosen_labels: list[int]
    rejected_ids: list[int]
    rejected_labels: list[int]
    ref: tuple[float, float] | None = None
    """Reference log-probs (chosen, rejected), set by a precomputed reference pass."""
    numbers: dict[str, float] | None = None
    """The per-pair numbers the method asked for (`pair_numbers`), by name."""
    position_ids = None  # never packed (the recipe refuses packing for preference objectives)

    def sample_row(self) -> tuple[list[int], list[int]]:
        """The row eval generations take their prompt from: the chosen side."""
        return self.chosen_ids, self.chosen_labels

    @property
    def input_ids(self) -> list[int]:
        """The longer side: what sets this pair's padded width (data.group_by_length sorts by it)."""
        return max(self.chosen_ids, self.rejected_ids, key=len)


def _value(row: dict, source, canonical: str):
    col = source.column(canonical)
    return row.get(col) if col in row else None


def shared_prefix(chosen: str, rejected: str) -> int:
    """Where an implicit prompt ends in two full texts (HH-RLHF's "\n\nHuman: …\n\nAssistant:
    …"): their longest common prefix, cut back to the start of the word the two texts part in,
    so each answer starts with the whitespace before its first own word (TRL's `extract_prompt`
    gives " blue." / " green." too; it only steps back over one space, so "bl|ue" / "bl|ack"
    would split a word). 0 when the shared text holds no whitespace."""
    n = len(os.path.commonprefix([chosen, rejected]))
    while n > 0 and not chosen[n - 1].isspace():
        n -= 1
    return max(n - 1, 0)


def render_pair(row: dict, source, tokenizer) -> tuple[str, str, str, bool, bool]:
    """(prompt text, chosen answer text, rejected answer text, plain text?, prompt extracted?).
    Without a `prompt` column the shared beginning of chosen and rejected is the prompt
    (implicit-prompt data such as HH-RLHF), never trained on."""
    prompt, chosen, rejected = (_value(row, source, k) for k in ("prompt", "chosen", "rejected"))
    if isinstance(chosen, str) and isinstance(rejected, str):
        if prompt is not None and not isinstance(prompt, str):
            raise ValueError("string `chosen`/`rejected` need a string `prompt`")
        if prompt is None:
            n = shared_prefix(chosen, rejected)
            return chosen[:n], chosen[n:], rejected[n:], True, n > 0
        return prompt, chosen, rejected, True, False
    if not (isinstance(chosen, list) and isinstance(rejected, list) and chosen and rejected):
        raise ValueError("`chosen` and `rejected` must both be strings or both message lists")
    if isinstance(prompt, list):
        turns = prompt
        chosen = chosen[len(turns):] if chosen[:len(turns)] == turns else chosen
        rejected = rejected[len(turns):] if rejected[:len(turns)] == turns else rejected
    else:  # the shared leading turns are the prompt; each side keeps at least its last turn
        k = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b),
                 min(len(chosen), len(rejected)))
        k = min(k, len(chosen) - 1, len(rejected) - 1)
        if k == 0:
            raise ValueError("`chosen` and `rejected` do not share the turns before their "
                             "answers (the prompt)")
        turns, chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
    head = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    texts = [tokenizer.apply_chat_template(turns + side, tokenize=False)
             for side in (chosen, rejected)]
    # A template may render the prompt turns differently once an answer follows: the answer
    # starts where the two renderings stop agreeing.
    cut = min(len(os.path.commonprefix([head, t])) for t in texts)
    return texts[0][:cut], texts[0][cut:], texts[1][cut:], False, prompt is None


def tokenize_side(prompt: str, answer: str, tokenizer, plain: bool) -> tuple[list, list, int]:
    """(ids, labels, prompt token count) of prompt + answer, trained on the answer's tokens."""
    enc = tokenizer(prompt + answer, add_special_tokens=plain, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    # A token that straddles the boundary (" B" after "color.") holds answer text: trained.
    labels = [tok if end > start and end > len(prompt) else IGNORE
              for tok, (start, end) in zip(ids, enc["offset_mapping"])]
    n_prompt = next((i for i, x in enumerate(labels) if x != IGNORE), len(labels))
    if plain:
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    return ids, labels, n_prompt


IDENTICAL = 4  # a status beside dpkit/data/tokenize's KEPT, TRUNCATED, TOO_LONG, NO_TARGET
NUMBER = "number_"  # the Arrow column of a per-pair number is this + its name


def number_columns(options: dict) -> dict[str, dict]:
    """name → {"column": the data's column, "key": the recipe key naming it} from a method's data
    options (`pair_numbers`); {} when it asks for none."""
    return dict((options or {}).get("pair_numbers") or {})


def read_number(row: dict, name: str, spec: dict) -> float:
    value = row.get(spec["column"])
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValueError(f"column '{spec['column']}' ({spec['key']}) holds {value!r}, not a number")
    return float(value)


def encode_pairs(batch: dict[str, list], indices: list[int], source, tokenizer,
                 max_seq_len: int, overflow: str, max_prompt_len: int | None,
                 numbers: dict[str, dict] | None = None) -> dict[str, list]:
    """Columns of tokenized pairs for a batch of raw rows (a dict of columns): both sides' ids
    and labels, a status (pairs that can't be trained on are kept with one and no tokens, so the
    report's counts come from the Arrow columns, also when read back from the cache), whether
    the prompt was cut to max_prompt_len and whether it was extracted (no `prompt` column), and
    the per-pair `numbers` asked for (name → its column, see `number_columns`)."""
    from dpkit.data.tokenize import KEPT, NO_TARGET, TOO_LONG, TRUNCATED

    numbers = numbers or {}
    out: dict[str, list] = {k: [] for k in (*SIDES, "status", "prompt_cut", "extracted")}
    out.update({NUMBER + name: [] for name in numbers})
    values: dict[str, float] = {}

    def put(status, sides=((), ()), cut=False, extracted=False):
        (c_ids, c_labels), (r_ids, r_labels) = sides if status <= TRUNCATED else (([], []),) * 2
        for key, value in zip(out, (c_ids, c_labels, r_ids, r_labels, status, cut, extracted)):
            out[key].append(value)
        for name in numbers:
            out[NUMBER + name].append(values[name])

    keys = list(batch)
    for n, i in enumerate(indices):
        row = {k: batch[k][n] for k in keys}
        try:
            prompt, chosen, rejected, plain, extracted = render_pair(row, source, tokenizer)
            values = {name: read_number(row, name, spec) for name, spec in numbers.items()}
        except ValueError as e:
            raise ValueError(f"row {i}: {e}") from None
        if chosen == rejected:
            put(IDENTICAL)
            continue
        sides, cut_prompt, too_long = [], False, False
        for answer in (chosen, rejected):
            ids, labels, n_prompt = tokenize_side(prompt, answer, tokenizer, plain)
            if max_prompt_len is not None and n_prompt > max_prompt_len:
                ids, labels = ids[n_prompt - max_prompt_len:], labels[n_prompt - max_prompt_len:]
                cut_prompt = True
            if len(ids) > max_seq_len:
                too_long = True
                ids, labels = ids[:max_seq_len], labels[:max_seq_len]
            sides.append((ids, labels))
        if too_long and overflow == "drop":
            put(TOO_LONG)
        elif any(all(x == IGNORE for x in labels[1:]) for _, labels in sides):
            put(NO_TARGET)  # the prompt alone fills max_seq_len
        elif sides[0][0] == sides[1][0]:  # the answers differed only past max_seq_len
            put(IDENTICAL)
        else:
            put(TRUNCATED if too_long else KEPT, sides, cut_prompt, extracted)
    return out


SIDES = ("chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels")


def pair_features(numbers: dict | None = None):
    from datasets import Features, Value
    from datasets import Sequence as Seq

    return Features({**{k: Seq(Value("int32")) for k in SIDES}, "status": Value("int8"),
                     "prompt_cut": Value("bool"), "extracted": Value("bool"),
                     **{NUMBER + name: Value("float64") for name in numbers or {}}})


def tokenize_pair_dataset(ds, source, tokenizer, section, max_prompt_len: int | None,
                          num_proc: int = 1, fingerprint: str | None = None,
                          cache_file: str | None = None, numbers: dict | None = None):
    """`datasets.map` of `encode_pairs` over a source: written to `cache_file` (Arrow, the
    tokenized-data cache) when given, else in memory. A row that is no pair is one line."""
    from dpkit.data.tokenize import map_source

    for name, spec in (numbers or {}).items():
        if spec["column"] not in ds.column_names:
            raise RecipeError.one(spec["key"], f"names column '{spec['column']}' (each pair's "
                                  f"{name}), which data source {source.path} lacks; its columns "
                                  f"are {ds.column_names}", "name one of them, or leave it out")
    return map_source(ds, encode_pairs, source, pair_features(numbers),
                      f"tokenizing pairs of {source.path}",
                      dict(source=source, tokenizer=tokenizer, max_seq_len=section.max_seq_len,
                           overflow=section.overflow, max_prompt_len=max_prompt_len,
                           numbers=numbers),
                      num_proc=num_proc, fingerprint=fingerprint, cache_file=cache_file,
                      with_indices=True, layouts="the preference layouts in docs/preference.md")


def pairs_of(tds, path: str, stats) -> list[PairExample]:
    """The trained PairExamples of a tokenized source; its counts added to `stats`."""
    import numpy as np

    from dpkit.data.tokenize import NO_TARGET, TOO_LONG, TRUNCATED

    table = tds.data.table if hasattr(tds.data, "table") else tds.data
    status = table.column("status").to_numpy()
    kept = status <= TRUNCATED
    flags = {k: table.column(k).to_numpy(zero_copy_only=False) & kept
             for k in ("prompt_cut", "extracted")}
    columns = {k: table.column(k).to_pylist() for k in SIDES}
    names = [c[len(NUMBER):] for c in table.column_names if c.startswith(NUMBER)]
    numbers = {n: table.column(NUMBER + n).to_numpy() for n in names}
    pairs = [PairExample(*(columns[k][i] for k in SIDES),
                         numbers={n: float(numbers[n][i]) for n in names} if names else None)
             for i in np.nonzero(kept)[0]]
    stats.rows += len(pairs)
    stats.truncated += int((status == TRUNCATED).sum())
    stats.dropped_too_long += int((status == TOO_LONG).sum())
    stats.dropped_no_target += int((status == NO_TARGET).sum())
    stats.dropped_identical += int((status == IDENTICAL).sum())
    stats.prompt_truncated += int(flags["prompt_cut"].sum())
    stats.prompts_extracted += int(flags["extracted"].sum())
    stats.tokens += sum(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    stats.per_source[path] = stats.per_source.get(path, 0) + len(pairs)
    return pairs


def tokenize_pairs(ds, source, tokenizer, section, stats, max_prompt_len: int | None) -> list:
    """PairExamples of one source, tokenized in memory; what was cut or left out is counted in
    `stats`."""
    return pairs_of(tokenize_pair_dataset(ds, source, tokenizer, section, max_prompt_len),
                    source.path, stats)


def pair_problems(ds, source, tokenizer, where: str) -> list[Problem]:
    """Layout problems visible in the first row (the rest are checked while tokenizing)."""
    if len(ds) == 0:
        return []
    try:
        row = ds[0]
        chosen = _value(row, source, "chosen")
        if isinstance(chosen, list) and not getattr(tokenizer, "chat_template", None):
            return [Problem(f"{where}.format", "conversational preference pairs need a chat "
                            "template and the tokenizer has none", "set model.chat_template "
                            "(e.g. chatml) or use a tokenizer with one")]
        render_pair(row, source, tokenizer)
    except ValueError as e:
        return [Problem(where, f"row 0 of '{source.path}': {e}",
                        "see the preference layouts in docs/preference.md")]
    return []


def collate_pairs(examples: list[PairExample], pad_id: int, flatten: bool = False) -> dict:
    """B pairs → one batch of 2B rows (the B chosen, then the B rejected), so both sides go
    through the model in ONE forward: right-padded to one width, or (`flatten`, with per-row
    attention) laid end to end in a single row with position ids restarting per row and
    `row_ids` naming each token's row — no padding at all. `pair_mask` marks real pairs: an
    empty list gives one all-masked pair that adds nothing (a rank whose shard ran out)."""
    real = len(examples)
    if not examples:
        examples = [PairExample([pad_id, pad_id], [IGNORE] * 2, [pad_id, pad_id], [IGNORE] * 2)]
    rows = [(e.chosen_ids, e.chosen_labels) for e in examples] + \
           [(e.rejected_ids, e.rejected_labels) for e in examples]
    if flatten:
        return _flat(rows, examples, real)
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row_ids, row_labels) in enumerate(rows):
        ids[i, :len(row_ids)] = torch.tensor(row_ids)
        labels[i, :len(row_ids)] = torch.tensor(row_labels)
        mask[i, :len(row_ids)] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels,
             "pair_mask": torch.tensor([1.0] * real + [0.0] * (len(examples) - real),
                                       dtype=torch.float64)}
    return _with_ref(batch, examples, real)


def _with_ref(batch: dict, examples: list[PairExample], real: int) -> dict:
    if all(e.ref is not None for e in examples[:real]) and real:
        batch["ref_logps"] = torch.tensor([e.ref for e in examples], dtype=torch.float64)
    if real and examples[0].numbers:  # (B,) per name; an all-masked pair has none: no key
        for name in examples[0].numbers:
            batch[name] = torch.tensor([e.numbers[name] for e in examples], dtype=torch.float64)
    return batch


def _flat(rows: list, examples: list[PairExample], real: int) -> dict:
    from dpkit.data.packing import row_boundaries

    ids = torch.tensor([t for row_ids, _ in rows for t in row_ids]).unsqueeze(0)
    # A row's first token is never predicted (nothing before it in its row): unlabelled, so the
    # shift by one can't score it from the previous row's last token.
    labels = torch.tensor([x if i else IGNORE for _, row_labels in rows
                           for i, x in enumerate(row_labels)]).unsqueeze(0)
    positions = torch.cat([torch.arange(len(row_ids)) for row_ids, _ in rows]).unsqueeze(0)
    row_ids = torch.cat([torch.full((len(r),), i) for i, (r, _) in enumerate(rows)]).unsqueeze(0)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
             "position_ids": positions, "row_ids": row_ids,
             "pair_mask": torch.tensor([1.0] * real + [0.0] * (len(examples) - real),
                                       dtype=torch.float64)}
    batch["cu_seq_lens"], batch["max_length"] = row_boundaries(positions)
    return _with_ref(batch, examples, real)


def check_pairs(raw: list, tokenizer) -> None:
    """Layout problems of every preference source's first row, raised at once."""
    problems, index = [], {"sources": 0, "eval_sources": 0}
    for kind, source, ds in raw:
        problems.extend(pair_problems(ds, source, tokenizer, f"data.{kind}[{index[kind]}]"))
        index[kind] += 1
    if problems:
        raise RecipeError(problems)


def assemble_pairs(parts: list, section, seed: int):
    """(train pairs, eval pairs, stats) from tokenized sources [(kind, source, tokenized ds)]
    (in memory, or read back from the tokenized-data cache); pairs are held in memory."""
    from dpkit.data import mixture
    from dpkit.data.tokenize import DataStats

    stats, eval_stats = DataStats(), DataStats()
    train, evals, sizes, eval_sizes = [], [], [], []
    for kind, source, tds in parts:
        target, st, n = ((train, stats, sizes) if kind == "sources" else
                         (evals, eval_stats, eval_sizes))
        got = pairs_of(tds, source.path, st)
        target.extend(got)
        n.append(len(got))
    train, sizes, evals = mixture.eval_split(train, sizes, evals, section, seed)
    if not train:
        raise RecipeError.one("data.sources", "no training pairs left after tokenization "
                              f"({stats.describe()})",
                              "raise data.max_seq_len, use overflow: truncate, or check the data")
    train, evals = mixture.arrange(train, sizes, evals, eval_sizes, section, seed, stats)
    return train, evals, stats


class PairRows(RowKind):
    """Preference pairs as a row kind (dpkit/data/rows.py): `options["max_prompt_len"]` is the
    `preference.max_prompt_len` setting; `options["pair_numbers"]` the numbers read with each
    pair (`number_columns`)."""

    def check(self, raw, tokenizer):
        check_pairs(raw, tokenizer)

    def tokenize(self, ds, source, tokenizer, section, options, num_proc, fingerprint=None,
                 cache_file=None):
        return tokenize_pair_dataset(ds, source, tokenizer, section,
                                     options.get("max_prompt_len"), num_proc,
                                     fingerprint=fingerprint, cache_file=cache_file,
                                     numbers=number_columns(options))

    def assemble(self, parts, section, seed, need_train=True):
        return assemble_pairs(parts, section, seed)


PAIRS = PairRows()
