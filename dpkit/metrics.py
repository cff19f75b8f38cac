"""Metrics: metrics.jsonl (one line per logged step), memory readings, the rank-0 progress bar."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch


def memory_mb(device: torch.device) -> dict[str, float]:
    """Memory of this rank: CUDA allocated/reserved on GPU, resident set size on CPU."""
    if device.type == "cuda":
        return {"memory_allocated_mb": torch.cuda.memory_allocated(device) / 2**20,
                "memory_reserved_mb": torch.cuda.memory_reserved(device) / 2**20,
                "memory_peak_mb": torch.cuda.max_memory_allocated(device) / 2**20}
    import psutil

    return {"memory_rss_mb": psutil.Process(os.getpid()).memory_info().rss / 2**20}


class MetricsLog:
    """Appends JSON lines to metrics.jsonl on the main process; a no-op elsewhere."""

    def __init__(self, path: Path | None):
        self.path = path
        self._file = open(path, "a", buffering=1) if path is not None else None

    def write(self, **record) -> None:
        if self._file is None:
            return
        record.setdefault("time", time.time())
        self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class Progress:
    """tqdm bar on rank 0: step, loss, tokens/s and ETA. Silent on other ranks."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step",
                            dynamic_ncols=True)

    def update(self, loss: float, tokens_per_s: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
            self.bar.update(1)

    def write(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
