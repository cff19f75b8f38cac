"""`dpkit` command line: one small module per sub-command, each a thin call into the library.

    dpkit validate RECIPE [key=value ...]     check everything before paying for GPUs
    dpkit train RECIPE [key=value ...]        validate, then launch the ranks
    dpkit plan RECIPE_OR_MODEL                memory per GPU, what fits, what to choose
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

# The sub-commands, in the order `dpkit --help` lists them: the one registry of commands.
COMMANDS = [validate, train, plan, export, push, report, doctor]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpkit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except RecipeError as e:
        print(format_errors(e), file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
