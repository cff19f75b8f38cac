"""A recipe's text as values: YAML read as YAML 1.2 reads numbers, and `key=value` overrides.

Used by `dpkit.recipe` (files and overrides) and by `dpkit plan` (overrides on a stand-in recipe).
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from dpkit.errors import RecipeError


class DuplicateKeyError(yaml.YAMLError):
    """The same key twice in one mapping: YAML loaders keep the last one without a word, so
    `lr:` written twice under `train:` would train with whichever came last."""

    def __init__(self, key: str, first: int, second: int):
        self.problem = (f"`{key}` is set twice, at lines {first} and {second} (YAML would "
                        "silently keep the second)")
        super().__init__(self.problem)


class RecipeLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml when installed
    """PyYAML reads YAML 1.1, where `1e-5` (no dot) is a string; YAML 1.2 and every user read it
    as a number. This loader resolves such scientific notation as floats, and refuses a key set
    twice in one mapping (DuplicateKeyError), naming its dotted path and both lines."""

    def construct_document(self, node):
        _refuse_duplicates(node, [], set())
        return super().construct_document(node)


def _refuse_duplicates(node, path: list[str], seen: set[int]) -> None:
    if id(node) in seen:  # an alias to a node already walked (or a recursive one)
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        lines: dict[tuple[str, str], int] = {}
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                line = key.start_mark.line + 1
                if (key.tag, key.value) in lines:
                    raise DuplicateKeyError(".".join([*path, key.value]),
                                            lines[key.tag, key.value], line)
                lines[key.tag, key.value] = line
            _refuse_duplicates(value, [*path, str(getattr(key, "value", "?"))], seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_duplicates(item, [*path, str(i)], seen)


RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def read_yaml(text: str):
    return yaml.load(text, Loader=RecipeLoader)


def yaml_error_line(error: yaml.YAMLError, position: bool = True) -> str:
    """A YAML error on one line: what is wrong and where (PyYAML's message spans five)."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark and position else ""
    return f"{problem}{where}"


_NUMBER = re.compile(r"[-+]?(?:\d[\d_]*\.?[\d_]*|\.\d[\d_]*)(?:[eE][-+]?\d+)?")


def _number_or_value(value: Any) -> Any:
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        number = float(value)
        return int(number) if number.is_integer() and not re.search(r"[.eE]", value) else number
    return value


def parse_overrides(overrides: list[str]) -> list[tuple[list[str], Any]]:
    """`train.lr=1e-4` → (["train", "lr"], 1e-4). Values are read as YAML (numbers, lists, null)."""
    parsed = []
    for item in overrides:
        key, sep, value = item.partition("=")
        keys = key.split(".")
        if not sep or not all(k.strip() for k in keys):
            raise RecipeError.one(item, "an override must look like `section.key=value`",
                                  "for example `train.lr=1e-4`")
        try:
            parsed.append((keys, read_yaml(value) if value != "" else ""))
        except yaml.YAMLError as e:
            raise RecipeError.one(key, f"value `{value}` is not valid YAML: "
                                  f"{yaml_error_line(e, position=False)}",
                                  "quote it, or close its brackets: key=[a, b]") from None
    return parsed


def _list_index(node: list, keys: list[str], i: int) -> int:
    """The list position `keys[i]` names, or a RecipeError naming the override key."""
    where = ".".join(keys[: i + 1])
    if not keys[i].lstrip("-").isdigit():
        raise RecipeError.one(where, f"`{keys[i]}` is not a list position",
                              f"use a number from 0 to {len(node) - 1}" if node else
                              "the list is empty: set the whole list, e.g. key=[...]")
    index = int(keys[i])
    if not -len(node) <= index < len(node):
        raise RecipeError.one(where, f"position {index} is past the end of a list of "
                              f"{len(node)}", f"use 0 to {len(node) - 1}, or set the whole list"
                              if node else "the list is empty: set the whole list, e.g. key=[...]")
    return index


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for keys, value in parse_overrides(overrides):
        node: Any = raw
        for i, key in enumerate(keys[:-1]):
            if isinstance(node, list):
                node = node[_list_index(node, keys, i)]
            else:
                if node.get(key) is None:  # absent, or `peft:` left empty in the file
                    node[key] = {}
                node = node[key]
            if not isinstance(node, (dict, list)):
                raise RecipeError.one(".".join(keys[: i + 1]), "is a value, not a section",
                                      "override a key inside a section")
        if isinstance(node, list):
            node[_list_index(node, keys, len(keys) - 1)] = value
        else:
            node[keys[-1]] = value
    return raw
