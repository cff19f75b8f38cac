"""Run logging: a log file per rank in `<run>/logs/`, and warnings shown once, not once per rank.

Every rank writes its own `rank{r}.log` (what it did, its warnings, its errors: the place to look
when rank 37 misbehaves). Only rank 0 also prints to the terminal; the other ranks' library
warnings and progress bars go to their files alone, so a 64-rank job prints a warning once.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

from dpkit.run_files import LOGS

LOGGER = logging.getLogger("dpkit")


def setup(run_dir: Path, rank: int, is_main: bool) -> logging.Logger:
    log_dir = run_dir / LOGS
    log_dir.mkdir(parents=True, exist_ok=True)
    file_handler = logging.FileHandler(log_dir / f"rank{rank}.log")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.captureWarnings(True)  # warnings.warn(...) -> the "py.warnings" logger
    # DeepSpeed's own use of a renamed torch collective: nothing a user can act on.
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated",
                            category=FutureWarning)
    for name in ("dpkit", "py.warnings"):
        logger = logging.getLogger(name)
        logger.handlers = [h for h in logger.handlers if not getattr(h, "_dpkit", False)]
        file_handler._dpkit = True  # type: ignore[attr-defined]
        logger.addHandler(file_handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
        if is_main and name == "py.warnings":
            console = logging.StreamHandler(sys.stderr)
            console._dpkit = True  # type: ignore[attr-defined]
            logger.addHandler(console)
    if not is_main:
        import datasets
        import transformers

        transformers.logging.set_verbosity_error()
        datasets.disable_progress_bars()
    return LOGGER


def teardown() -> None:
    for name in ("dpkit", "py.warnings"):
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if getattr(h, "_dpkit", False)]:
            handler.close()
            logger.removeHandler(handler)
