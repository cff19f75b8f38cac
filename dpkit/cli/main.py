"""`dpkit` command line: one small module per sub-command, each a thin call into the library.

    dpkit validate RECIPE [key=value ...]     check everything before paying for GPUs
    dpkit train RECIPE [key=value ...]        validate, then launch the ranks
    dpkit plan RECIPE_OR_MODEL                memory per GPU, what fits, how long, what to choose
    dpkit export RUN_OR_CHECKPOINT --out DIR  a Hugging Face model from a checkpoint
    dpkit push RUN_DIR --repo-id ORG/NAME     model and card to the Hugging Face Hub
    dpkit report RUN_DIR [RUN_DIR ...]        report.md and plots
    dpkit doctor [--hostfile H]               versions, ports and an all-reduce on every node
"""

from __future__ import annotations

import argparse
import sys

from dpkit.cli import doctor, export, plan, push, report, train, validate
from dpkit.errors import EXIT_USER_ERROR, RecipeError, format_errors
from dpkit.rundir import RunFinished

# The sub-commands, in the order `dpkit --help` lists them: the one registry of commands.
COMMANDS = [validate, train, plan, export, push, report, doctor]


class Parser(argparse.ArgumentParser):
    """Command-line mistakes are one line and exit code 2, like every other bad input (argparse
    prints the whole usage first). Sub-command parsers are of this class too."""

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"error: {self.prog}: {message} — see `{self.prog} -h`\n")


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Options and overrides in any order (`dpkit train R --nproc-per-node 1 train.lr=1e-4`):
    a sub-command's arguments are parsed intermixed, as users write them."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if argv and argv[0] in sub.choices:
        try:
            args = sub.choices[argv[0]].parse_intermixed_args(argv[1:])
        except TypeError:  # a sub-command with sub-commands of its own: plain parsing
            return parser.parse_args(argv)
        args.command = argv[0]
        return args
    return parser.parse_args(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="dpkit", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:  # inside: an option's type check (`--gpu-memory 80XB`) may raise a RecipeError
        args = parse_args(build_parser(), argv)
        return args.func(args)
    except RecipeError as e:
        print(format_errors(e), file=sys.stderr)
        return EXIT_USER_ERROR
    except RunFinished as e:  # a resume of a finished run: nothing to do, nothing changed
        print(e, file=sys.stderr if e.code else sys.stdout)
        return e.code


if __name__ == "__main__":
    sys.exit(main())
