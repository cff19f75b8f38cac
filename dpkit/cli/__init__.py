"""The `dpkit` command: one small module per sub-command, each a thin call into the library."""

from dpkit.cli.main import build_parser, main  # noqa: F401
