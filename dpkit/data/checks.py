"""What is wrong with a dataset's rows, said by file and line: a JSON Lines line that does not
parse, a row without a required column, a column that is not text, nothing to train on.

Read only where it is needed (after a failed load, or for the row at fault), so a large, sound
file costs no extra pass.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from dpkit import methods
from dpkit.data import formats
from dpkit.errors import Problem

if TYPE_CHECKING:  # the schema imports dpkit.data.formats: no runtime import back
    from dpkit.recipe import DataSource


def bad_json_line(path: Path, head_bytes: int | None = None) -> str | None:
    """The first line of a JSON Lines file that is not a JSON object, by its line number (datasets
    reports a byte position, or only that generation failed). Read only after a failed load, or
    (`head_bytes`) on the head of a stream, whose whole length would cost every launch a pass."""
    if path.suffix != ".jsonl":
        return None
    read = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            read += len(line)
            if head_bytes is not None and read > head_bytes:
                return None
            if not line.strip():
                continue
            try:
                row = json.loads(line.strip())
            except ValueError as e:
                return f"line {number} is not valid JSON ({e.msg}, column {e.colno})"
            if not isinstance(row, dict):
                return f"line {number} is a JSON {type(row).__name__}, not an object"
    return None




def row_problems(ds, source: DataSource, where: str) -> list[Problem]:
    """Rows that would fail or train on nothing: a required column missing from a row (JSON
    Lines rows are read as null there), or not text; and a trained column empty in every row."""
    import pyarrow.compute as pc

    table = ds.with_format("arrow")
    problems = []
    fmt, spec = formats.get(source.format), methods.FORMATS[source.format]
    for canonical in fmt.columns:
        col = source.column(canonical)
        if col not in ds.column_names:
            continue
        values = table[col]
        kind = "list" if canonical in spec.lists else "text"
        wrong_type = not (pa_is_list(values.type) if kind == "list" else pa_is_text(values.type))
        if spec.text_or_list:
            wrong_type = not (pa_is_list(values.type) or pa_is_text(values.type))
        if canonical in spec.booleans:
            kind, wrong_type = "true/false", not pa_is_bool(values.type)
        if wrong_type and not (canonical in fmt.optional and values.null_count == len(ds)):
            problems.append(Problem(f"{where}.path", f"'{source.path}': column '{col}' holds "
                                    f"{values.type} values, not {kind}", "fix the data, or map "
                                    f"another column with `{where}.columns`"))
            continue
        if values.null_count and canonical not in fmt.optional:
            first = pc.index(pc.is_null(values), True).as_py()
            problems.append(Problem(f"{where}.path", f"'{source.path}' {place(source, first)} "
                                    f"has no '{col}'" + (f" (mapped from `{canonical}`)"
                                                         if col != canonical else ""),
                                    "fill it in or remove the row"))
    if problems:
        return problems
    if spec.trained is None:  # a format without this check
        return problems
    col = source.column(spec.trained)
    if not any(_has_text(v, source.format) for v in ds[col]):
        what = "assistant turn" if source.format == "messages" else f"'{col}'"
        problems.append(Problem(f"{where}.path", f"'{source.path}': every {what} is empty, "
                                "nothing to train on", "check the column mapping and the data"))
    return problems


def _has_text(value, fmt: str) -> bool:
    if isinstance(value, list):  # messages: some assistant turn has text
        return any(isinstance(m, dict) and m.get("role") == "assistant" and
                   str(m.get("content") or "").strip() for m in value)
    return bool(value and str(value).strip())


def pa_is_text(t) -> bool:
    import pyarrow as pa

    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)


def pa_is_bool(t) -> bool:
    import pyarrow as pa

    return pa.types.is_boolean(t) or pa.types.is_null(t)


def pa_is_list(t) -> bool:
    import pyarrow as pa

    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_null(t)


def place(source: DataSource, row: int) -> str:
    """Where row `row` (0-based) is in its file, as a person would look for it."""
    path = Path(source.path)
    if path.suffix == ".jsonl" and path.is_file():
        with open(path, encoding="utf-8", errors="replace") as f:
            rows = (n for n, line in enumerate(f, 1) if line.strip())
            line = next((n for i, n in enumerate(rows) if i == row), None)
        if line is not None:
            return f"line {line}"
    if path.suffix == ".csv" and path.is_file():
        return f"line {row + 2}"  # after the header line
    return f"row {row + 1}"
