"""GRPO's reward functions: the shipped ones by name, a user's own from `path/to/file.py:function`.

A reward function takes the completions of a rollout as lists, one entry per completion
(TRL's calling convention, so a TRL reward function works unchanged):
    f(completions: list[str], prompts: list[str], completion_ids: list[list[int]], **columns)
where `columns` are the rows' other data columns (GSM8K's `answer`, a list of tests), repeated
for each of a prompt's G completions, and returns one float per completion (None: not scored,
counted as 0 in the total, as TRL's nansum).

A user's file is Python code, imported on every rank: `dpkit validate` and `dpkit train` print one
line naming it before any rank starts (dpkit/methods/grpo.py `reward_code_notes`, docs/security.md).
"""

from __future__ import annotations

import importlib.util
import math
import re
from collections.abc import Callable
from pathlib import Path

# ------------------------------------------------------------------------------ final numbers
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_BOXED = re.compile(r"\\boxed\{")


def _boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (braces balanced), or None."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    i, depth = starts[-1], 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def _number(text: str | None) -> float | None:
    """The last number in `text` (thousands separators and a trailing period allowed)."""
    if text is None:
        return None
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def final_number(text: str) -> float | None:
    """A solution's final answer as a number: GSM8K's `#### n`, else the last `\\boxed{}`, else
    the last number in the text."""
    if "####" in text:
        return _number(text.rsplit("####", 1)[1])
    boxed = _boxed(text)
    if boxed is not None:
        return _number(boxed)
    return _number(text)


def math_answer(completions, column: str = "answer", **kw) -> list[float]:
    """1.0 where the completion's final number equals the answer column's, else 0.0."""
    answers = kw[column]
    out = []
    for completion, answer in zip(completions, answers):
        want, got = final_number(str(answer)), final_number(completion)
        out.append(1.0 if want is not None and got is not None and math.isclose(
            got, want, rel_tol=0, abs_tol=1e-6) else 0.0)
    return out


def format_reward(completions, pattern: str, **kw) -> list[float]:
    """1.0 where the completion contains a match of `pattern` (re.search, DOTALL), else 0.0."""
    regex = re.compile(pattern, re.DOTALL)
    return [1.0 if regex.search(c) else 0.0 for c in completions]


def length_reward(completions, completion_ids, target: int, **kw) -> list[float]:
    """−|tokens − target| / target: 0 at the target length."""
    return [-abs(len(ids) - target) / target for ids in completion_ids]


def char_share(completions, column: str = "answer", **kw) -> list[float]:
    """The share of the completion's characters that occur in the answer column's text: dense
    (every completion gets a different share from the start), verifiable, learnable by a tiny
    model — the quickstart's toy task."""
    out = []
    for completion, answer in zip(completions, kw[column]):
        allowed = set(str(answer))
        out.append(sum(ch in allowed for ch in completion) / len(completion) if completion else 0.0)
    return out


SHIPPED: dict[str, Callable] = {"math_answer": math_answer, "format": format_reward,
                                "length": length_reward, "char_share": char_share}


# ---------------------------------------------------------------------------- a user's function
def load_user_function(spec: str) -> Callable:
    """`path/to/file.py:function` → the function (the file imported as a module of its own)."""
    path, _, name = spec.rpartition(":")
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"grpo.rewards: reward file {file} not found")
    module_spec = importlib.util.spec_from_file_location(f"dpkit_reward_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise AttributeError(f"grpo.rewards: {file} has no function `{name}`")
    return fn


class Rewards:
    """The recipe's reward functions, weighted: `score` gives every function's values and the
    weighted total per completion."""

    def __init__(self, specs, say=print):
        self.names, self.weights, self.fns = [], [], []
        for spec in specs:
            if spec.file:
                say(f"[dpkit] grpo.rewards: running Python code from "
                    f"{Path(spec.file).expanduser()} ({spec.function})")
                fn = load_user_function(spec.function)
                options = {}
            else:
                fn = SHIPPED[spec.function]
                options = {"column": spec.column, "pattern": spec.pattern,
                           "target": spec.target}
                options = {k: v for k, v in options.items() if v is not None}
            self.names.append(self._unique(spec.function.rpartition(":")[2] or spec.function))
            self.weights.append(spec.weight)
            self.fns.append((fn, options))

    def _unique(self, name: str) -> str:
        n, k = name, 2
        while n in self.names:
            n, k = f"{name}_{k}", k + 1
        return n

    def score(self, completions: list[str], prompts: list[str], completion_ids: list[list[int]],
              columns: dict[str, list]) -> tuple[list[list[float]], list[float]]:
        """(values per function [F][N], weighted total per completion [N])."""
        per_fn = []
        for name, (fn, options) in zip(self.names, self.fns):
            values = fn(completions=completions, prompts=prompts, completion_ids=completion_ids,
                        **columns, **options)
            values = [float("nan") if v is None else float(v) for v in values]
            if len(values) != len(completions):
                raise ValueError(f"reward {name} returned {len(values)} values for "
                                 f"{len(completions)} completions")
            per_fn.append(values)
        total = [sum(w * v for w, v in zip(self.weights, vals) if not math.isnan(v))
                 for vals in zip(*per_fn)]
        return per_fn, total
