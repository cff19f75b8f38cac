"""User-facing errors: each problem names the recipe key (or file) and the fix.

A `RecipeError` carries every problem found, so a user fixes them all in one pass. The CLI and
the rank entry point print them one per line and exit with code 2 — never a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass

EXIT_USER_ERROR = 2


@dataclass(frozen=True)
class Problem:
    where: str
    """The recipe key (`train.global_batch_size`) or file the problem is in."""
    message: str
    fix: str = ""

    def __str__(self) -> str:
        text = f"{self.where}: {self.message}"
        return f"{text} — {self.fix}" if self.fix else text


class RecipeError(Exception):
    """One or more mistakes in a recipe or its inputs, found before (or instead of) training."""

    def __init__(self, problems: list[Problem] | Problem):
        self.problems = [problems] if isinstance(problems, Problem) else list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))

    @classmethod
    def one(cls, where: str, message: str, fix: str = "") -> "RecipeError":
        return cls(Problem(where, message, fix))


def format_errors(error: RecipeError) -> str:
    n = len(error.problems)
    head = "error:" if n == 1 else f"{n} errors:"
    lines = [f"  {p}" for p in error.problems]
    return "\n".join([head, *lines]) if n > 1 else f"error: {error.problems[0]}"
