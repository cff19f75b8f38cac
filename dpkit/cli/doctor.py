"""`dpkit doctor`: versions, ports and an all-reduce on every node. dpkit/doctor.py keeps its own
entry point (`python -m dpkit.doctor`) because it must run on half-set-up nodes."""

from __future__ import annotations

import argparse

from dpkit.doctor import __doc__ as DOCTOR_DOC
from dpkit.doctor import _cmd, add_arguments

__doc__ = DOCTOR_DOC


def register(subparsers) -> None:
    """Add `dpkit doctor [--hostfile H]`."""
    p = subparsers.add_parser(
        "doctor", help="check versions (on every node), ports and a 2-rank all-reduce",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=_cmd)
