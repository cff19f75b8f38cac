"""pydantic's validation errors as the recipe's problems: one line per problem, naming the key."""

from __future__ import annotations

import difflib
import re
from typing import Any

from pydantic import BaseModel

from dpkit.errors import Problem


def problems_from_pydantic(errors: list[dict], raw: dict, root: type[BaseModel]) -> list[Problem]:
    """pydantic's errors for `raw` validated as `root`, as problems a person reads: one line per
    field (a union's forms merged), a section's missing keys on one line, typos with a suggestion."""
    errors = _merge_union_errors(errors, raw)
    missing: dict[tuple, list[str]] = {}  # several missing keys of a section: one line
    for err in errors:
        if err["type"] == "missing":
            missing.setdefault(tuple(err["loc"][:-1]), []).append(str(err["loc"][-1]))
    problems = []
    for err in errors:
        parent = tuple(err["loc"][:-1])
        if err["type"] != "missing" or len(missing.get(parent, [])) < 2:
            problems.append(_problem_from_pydantic(err, root))
        elif missing[parent][0] == str(err["loc"][-1]):
            names = ", ".join(f"`{_dotted((*parent, n))}`" for n in missing[parent])
            problems.append(Problem(_dotted(parent), f"{names} are required",
                                    "add them (see the recipes in recipes/)"))
    return problems



_UNION_TAG = re.compile(r"^(?:list|dict|tuple|set|literal|function-\w+)\[|^(?:str|int|float|bool)$")


def _merge_union_errors(errors: list[dict], raw: dict) -> list[dict]:
    """A value that fits none of a field's forms (`list[str] | 'all-linear'`) gives pydantic one
    error per form, under locations like `peft.target_modules.list[str].0`: one error instead."""
    merged: dict[tuple, dict] = {}
    out = []
    for err in errors:
        loc = tuple(err["loc"])
        cut = next((i for i, part in enumerate(loc)
                    if isinstance(part, str) and _UNION_TAG.match(part)), None)
        if cut is None:
            out.append(err)
            continue
        field = loc[:cut]
        if field not in merged:
            value: Any = raw
            for part in field:
                value = value[part] if isinstance(value, (dict, list)) else None
            merged[field] = {"loc": field, "type": "union", "input": value, "msg": []}
            out.append(merged[field])
        if err["msg"] not in merged[field]["msg"]:
            merged[field]["msg"].append(err["msg"])
    for err in merged.values():
        err["msg"] = "is none of the accepted forms: " + "; or ".join(err["msg"])
    return out


def _dotted(loc: tuple) -> str:
    return ".".join(str(p) for p in loc) or "recipe"


def _model_at(loc: tuple, root: type[BaseModel]) -> type[BaseModel] | None:
    """The pydantic section class that a location points into (for key suggestions)."""
    model: Any = root
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if isinstance(model, type) else None
        if field is None:
            return None
        annotation = field.annotation
        args = getattr(annotation, "__args__", ())
        candidates = [annotation, *args]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)),
                     None)
        if model is None:
            return None
    return model


def _problem_from_pydantic(err: dict, root: type[BaseModel]) -> Problem:
    loc = tuple(err["loc"])
    where = _dotted(loc)
    kind = err["type"]
    if kind == "extra_forbidden":
        parent = _model_at(loc[:-1], root)
        valid = list(parent.model_fields) if parent else []
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        fix = f"did you mean `{_dotted((*loc[:-1], close[0]))}`?" if close else (
            f"valid keys here: {', '.join(valid)}" if valid else "remove it")
        return Problem(where, "unknown key", fix)
    if kind == "missing":
        return Problem(where, "is required", "add it to the recipe")
    if kind == "value_error":  # cross-field checks raised by our validators
        msg = str(err["msg"]).removeprefix("Value error, ")
        return Problem(where, msg)
    got = err.get("input")
    shown = f" (got {got!r})" if got is not None and not isinstance(got, dict) else ""
    return Problem(where, f"{err['msg']}{shown}", "see the recipe reference in README.md")
