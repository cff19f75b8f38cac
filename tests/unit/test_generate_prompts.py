"""Generation prompts (`eval.prompts`) are rendered by the data format the way its training rows
are, so the step-0 answer in samples.jsonl is what the model gives in the format it trains in.

Parametrized over the format registry: a format added without an expected rendering here fails.
References are independent of dpkit/eval: the tokenizer's own chat template or the alpaca template
written out, and the training tokenization of a row (the ids before its first trained token)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_LLAMA, TOKENIZER, tiny_recipe
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from dpkit.data.formats import ALPACA_NO_INPUT, FORMATS
from dpkit.data.preference import render_pair, tokenize_side
from dpkit.data.tokenize import IGNORE, tokenize_row
from dpkit.eval import generate as G
from dpkit.eval.evaluator import Evaluator
from dpkit.recipe import DataSource, recipe_from_dict

PROMPT, ANSWER = "Name a colour.", "Blue."
USER = [{"role": "user", "content": PROMPT}]
REPLY = [{"role": "assistant", "content": ANSWER}]


def chat_ids(tok) -> list[int]:
    out = tok.apply_chat_template(USER, add_generation_prompt=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def plain_ids(text: str):
    return lambda tok: list(tok(text)["input_ids"])  # with bos, as any plain prompt


# format -> {layout: (a training row holding PROMPT and ANSWER, uses the chat template?,
#                     the generation prompt's ids by an independent rule)}
LAYOUTS = {
    "alpaca": {"rows": ({"instruction": PROMPT, "input": "", "output": ANSWER}, True,
                        plain_ids(ALPACA_NO_INPUT.format(instruction=PROMPT)))},
    "messages": {"turns": ({"messages": USER + REPLY}, True, chat_ids)},
    "text": {"text": ({"text": PROMPT}, True, plain_ids(PROMPT))},
    "prompt_completion": {
        "strings, template": ({"prompt": PROMPT, "completion": ANSWER}, True, chat_ids),
        "strings, no template": ({"prompt": PROMPT, "completion": ANSWER}, False,
                                 plain_ids(PROMPT)),
        "conversational": ({"prompt": USER, "completion": REPLY}, True, chat_ids)},
    "preference": {
        "conversational": ({"prompt": USER, "chosen": REPLY,
                            "rejected": [{"role": "assistant", "content": "Red."}]}, True,
                           chat_ids),
        "last turn answers": ({"chosen": USER + REPLY, "rejected": USER + [
            {"role": "assistant", "content": "Red."}]}, True, chat_ids),
        "strings": ({"prompt": PROMPT, "chosen": ANSWER, "rejected": "Red."}, True,
                    plain_ids(PROMPT))},
}
FORMATS_WITH_LABELS = ("alpaca", "messages", "prompt_completion")
CASES = [(name, layout) for name in sorted(FORMATS) for layout in LAYOUTS.get(name, [None])]


def case(name: str, layout: str | None, tmp_path):
    """(source with its one row written to a file, row, tokenizer, expected prompt ids)."""
    if layout is None:
        pytest.fail(f"format `{name}` has no expected generation prompt: add it to LAYOUTS")
    row, template, expected = LAYOUTS[name][layout]
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(row) + "\n")
    tok = AutoTokenizer.from_pretrained(TOKENIZER)  # its own chat template (chat_template.jinja)
    assert tok.chat_template
    if not template:
        tok.chat_template = None
    return DataSource(path=str(path), format=name), row, tok, expected(tok)


def training_prompt(row, source, tok) -> list[int]:
    """The ids training gives the row before its answer's first trained token."""
    if source.format == "preference":
        prompt, chosen, _, plain = render_pair(row, source, tok)[:4]  # (a 5th: extracted?)
        ids, _, n_prompt = tokenize_side(prompt, chosen, tok, plain)
        return ids[:n_prompt]
    ex = tokenize_row(row, source, tok, completion_only=True)
    if source.format == "text":  # every token trained: the text, continued (no eos yet)
        assert ex.input_ids[-1] == tok.eos_token_id
        return ex.input_ids[:-1]
    return ex.input_ids[:next(i for i, t in enumerate(ex.labels) if t != IGNORE)]


@pytest.mark.parametrize(("name", "layout"), CASES)
def test_generation_prompt_is_the_training_rendering_up_to_the_answer(name, layout, tmp_path):
    source, row, tok, expected = case(name, layout, tmp_path)
    ids = G.render_prompt(PROMPT, source, tok)
    assert ids == expected
    assert ids == training_prompt(row, source, tok)


# text rows are continued from their first half; pairs: test_eval.py::test_a_preference_pair_...
@pytest.mark.parametrize(("name", "layout"), [c for c in CASES if c[0] in FORMATS_WITH_LABELS])
def test_held_out_row_prompts_match_the_rendered_prompt(name, layout, tmp_path):
    """A held-out row's prompt (its tokens before the first trained one) is the same prompt as
    the one `eval.prompts` renders: both ways of choosing prompts ask in the same format."""
    source, row, tok, expected = case(name, layout, tmp_path)
    got = G.row_prompt(tokenize_row(row, source, tok, completion_only=True), tok)
    assert got.ids == expected


@pytest.fixture(scope="module")
def tiny_model():
    cfg = dict(TINY_LLAMA)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    return model.eval()


@pytest.mark.parametrize(("name", "layout"), CASES)
def test_step0_samples_are_what_generate_gives_on_the_reference_prompt(
        name, layout, tmp_path, tiny_model):
    """The step-0 line of samples.jsonl, through dpkit's Evaluator and generate on one process,
    equals `model.generate` on the reference prompt ids (the chat template's, for every format
    trained in it), token for token."""
    source, _, tok, expected = case(name, layout, tmp_path)
    recipe = recipe_from_dict(tiny_recipe(tmp_path, eval={"prompts": [PROMPT],
                                                         "max_new_tokens": 12}))
    recipe.data.sources = [source]
    written = []
    run = SimpleNamespace(
        recipe=recipe, out=tmp_path, tokenizer=tok, eval_rows=[], start_step=0, say=print,
        batch=SimpleNamespace(sequence_parallel=1), engine=SimpleNamespace(module=tiny_model),
        layout=SimpleNamespace(partitions_parameters=False),  # one process, ZeRO-0
        env=SimpleNamespace(rank=0, world_size=1, is_main=True, device="cpu"),
        trackers=SimpleNamespace(log_text=lambda *a: written.append(a)),
        log=SimpleNamespace(info=lambda *a: None))
    recipe.zero.stage = 0
    Evaluator(run).at_eval(0)
    (sample,) = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    with torch.no_grad():
        inputs = torch.tensor([expected])
        want = tiny_model.generate(inputs, attention_mask=torch.ones_like(inputs),
                                   max_new_tokens=12, do_sample=False,
                                   pad_token_id=tok.eos_token_id,
                                   eos_token_id=tok.eos_token_id)[0, len(expected):].tolist()
    assert len(want) > 0
    assert sample["step"] == 0 and sample["prompt"] == PROMPT
    assert sample["completion_ids"] == want


def test_every_format_renders_generation_prompts():
    assert all(callable(fmt.prompt) for fmt in FORMATS.values())
    # KTO's unpaired rows and GRPO's prompts render their generation prompts in their own
    # runtime modules (tests/unit/test_kto.py, test_grpo.py); not yet laid out here: debt.
    brought_by_methods = {"unpaired", "prompts"}
    assert set(LAYOUTS) == set(FORMATS) - brought_by_methods, \
        "add the new format's layouts to LAYOUTS"

