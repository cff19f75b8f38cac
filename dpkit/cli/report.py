"""`dpkit report RUN_DIR [RUN_DIR ...]`: report.md and plots (dpkit/report.py)."""

from __future__ import annotations

from dpkit.report import write_report


def register(subparsers) -> None:
    """Add `dpkit report RUN_DIR [RUN_DIR ...] [--out DIR]`."""
    p = subparsers.add_parser(
        "report", help="write report.md and plots for one or more run directories",
        description="Draw loss, eval loss, throughput, memory and learning-rate plots from each "
                    "run's metrics.jsonl (runs in progress included; several runs are overlaid) "
                    "and write report.md next to them, with each eval's sample answers "
                    "(samples.jsonl) and lm-eval scores.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories")
    p.add_argument("--out", default=None,
                   help="output directory (default: RUN_DIR/report for one run, ./report for "
                        "several)")
    p.set_defaults(func=_cmd_report)


def _cmd_report(args) -> int:
    report = write_report(args.run_dirs, args.out)
    print(f"wrote {report} and its plots")
    return 0
