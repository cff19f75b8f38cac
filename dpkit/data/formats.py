"""Data formats: ONE registry, name → columns it reads and how a row is rendered.

The recipe schema validates `format` and `columns` against the declarations in dpkit/methods/;
tokenization renders with this registry; preflight names the missing columns from it. Adding a format = one `register(Format(...))`.

A render function turns one row into (text, trained character spans, plain_text):
- text: the whole sequence as the model will see it (chat markup included);
- spans: [start, end) character ranges whose tokens are trained on (the rest gets label -100);
- plain_text: True when the text has no special tokens of its own (alpaca, text): the
  tokenizer then adds bos as for any prompt and dpkit appends a trained eos so the model learns
  to stop. A chat template holds every special token itself (False).

Formats a method brings with rows of its own shape come from its row kind (`get`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


@dataclass(frozen=True)
class Format:
    name: str
    columns: tuple[str, ...]
    """Canonical column names read (a source's `columns` maps them to its own)."""
    render: Callable
    """(row, source, tokenizer, completion_only) -> (text, spans, plain_text)."""
    prompt: Callable
    """(user's text, source, tokenizer, first_row) -> (text, plain_text): a prompt to generate
    from (`eval.prompts`), rendered as `render` renders a training row up to its answer, so the
    model is asked in the format it is trained in. `first_row()` reads the source's first row,
    for a format whose rendering depends on the data's layout (strings or message lists)."""
    optional: frozenset[str] = field(default_factory=frozenset)
    """Columns that may be absent from a dataset."""
    problem: Callable | None = None
    """(first row, source, tokenizer) -> one-line problem or None, checked before tokenizing."""
    doc: str = ""


FORMATS: dict[str, Format] = {}


def register(fmt: Format) -> Format:
    FORMATS[fmt.name] = fmt
    return fmt


def get(name: str) -> Format:
    """The format named `name`: registered here, or brought by a method's row kind (its
    declaration in dpkit/methods/ names the row kind; loaded on first use)."""
    if name not in FORMATS:
        from dpkit import methods

        fmt = methods.load(methods.FORMATS[name].rows).format
        if fmt is None:
            raise KeyError(f"format {name!r} has no rendering: its row kind brings no Format")
        FORMATS[name] = fmt
    return FORMATS[name]


# ------------------------------------------------------------------------------------- renders
def render_text(row, source, tokenizer, completion_only):
    text = row[source.column("text")]
    return text, [(0, len(text))], True


def render_alpaca(row, source, tokenizer, completion_only):
    inp = row.get(source.column("input")) or ""
    template = ALPACA_WITH_INPUT if inp.strip() else ALPACA_NO_INPUT
    prompt = template.format(instruction=row[source.column("instruction")], input=inp)
    text = prompt + row[source.column("output")]
    return text, [(len(prompt) if completion_only else 0, len(text))], True


def render_messages(row, source, tokenizer, completion_only):
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


def render_prompt_completion(row, source, tokenizer, completion_only):
    """TRL's prompt-completion: strings, or message lists (conversational). With a chat template,
    strings become one user turn and one assistant turn, so question/answer data trains an
    instruct model in its own chat format; without one they are concatenated (bos … eos)."""
    prompt, completion = row[source.column("prompt")], row[source.column("completion")]
    if not _pc_in_chat(prompt, tokenizer):
        text = prompt + completion
        return text, [(len(prompt) if completion_only else 0, len(text))], True
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if isinstance(completion, str):
        completion = [{"role": "assistant", "content": completion}]
    head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    text = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    start = len(os.path.commonprefix([head, text]))  # == len(head) for well-behaved templates
    return text, [(start if completion_only else 0, len(text))], False


def _pc_in_chat(prompt, tokenizer) -> bool:
    """Whether a prompt_completion row is rendered in the chat template (training and generation
    prompts share this condition)."""
    return not isinstance(prompt, str) or bool(getattr(tokenizer, "chat_template", None))


# --------------------------------------------------------------------- prompts for generation
def _user_turn(text: str, tokenizer) -> str:
    """One user turn and the assistant's header: where a trained answer starts in the template."""
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)


def prompt_alpaca(text, source, tokenizer, first_row):
    return ALPACA_NO_INPUT.format(instruction=text), True  # a prompt has no separate input


def prompt_messages(text, source, tokenizer, first_row):
    return _user_turn(text, tokenizer), False


def prompt_text(text, source, tokenizer, first_row):
    return text, True  # no answer to start: the model continues the text


def prompt_prompt_completion(text, source, tokenizer, first_row):
    if not _pc_in_chat(text, tokenizer):
        return text, True
    return _user_turn(text, tokenizer), False


def prompt_preference(text, source, tokenizer, first_row):
    """dpkit/data/preference.render_pair: string answers follow their prompt as plain text;
    message lists are rendered in the chat template (whatever the prompt column holds)."""
    if isinstance(first_row().get(source.column("chosen")), str):
        return text, True
    return _user_turn(text, tokenizer), False


# ----------------------------------------------------------------------------- first-row checks
def _needs_template(row, source, tokenizer):
    if not getattr(tokenizer, "chat_template", None):
        return (f"`{source.format}` needs a chat template and the tokenizer has none",
                "set model.chat_template (e.g. chatml) or use a tokenizer with one")
    return None


def _pc_problem(row, source, tokenizer):
    values = [row.get(source.column(c)) for c in ("prompt", "completion")]
    if any(isinstance(v, list) for v in values):
        return _needs_template(row, source, tokenizer)
    if not all(isinstance(v, (str, list)) for v in values):
        got = [type(v).__name__ for v in values]
        return (f"`prompt_completion` reads strings or message lists, got {got}",
                "check the column mapping")
    return None


register(Format("alpaca", ("instruction", "input", "output"), render_alpaca, prompt_alpaca,
                optional=frozenset({"input"}),
                doc="instruction/input/output in the Alpaca prompt; trains on output"))
register(Format("messages", ("messages",), render_messages, prompt_messages,
                problem=_needs_template,
                doc="chat turns rendered with the chat template; trains on assistant turns"))
register(Format("text", ("text",), render_text, prompt_text,
                doc="plain text, every token trained on"))
register(Format("prompt_completion", ("prompt", "completion"), render_prompt_completion,
                prompt_prompt_completion,
                problem=_pc_problem,
                doc="TRL's prompt/completion (strings or message lists) in the chat template; "
                    "trains on the completion"))


def _pairs_only(row, source, tokenizer, completion_only):
    raise TypeError("preference rows are pairs: dpkit.data.preference tokenizes them")


# Pairs for the preference objectives: tokenized by dpkit/data/preference.py (two sides per row),
# so no single-text render; the registry still owns the name and the columns.
register(Format("preference", ("prompt", "chosen", "rejected"), _pairs_only, prompt_preference,
                optional=frozenset({"prompt"}),
                doc="prompt/chosen/rejected pairs (strings or message lists) for the preference "
                    "objectives"))


def render(row: dict, source, tokenizer, completion_only: bool):
    """(text, trained character spans, plain_text) for one row of `source`, by its format."""
    return get(source.format).render(row, source, tokenizer, completion_only)
