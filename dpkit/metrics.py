"""Metrics: metrics.jsonl (one line per logged step), memory readings, the rank-0 progress bar."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from dpkit.run_files import TENSORBOARD, append_jsonl


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

    def write(self, **record) -> None:
        if self.path is None:
            return
        record.setdefault("time", time.time())
        append_jsonl(self.path, record)  # the file's one writer (dpkit/run_files.py)

    def close(self) -> None:
        pass  # each line is written and closed at once


class Progress:
    """tqdm bar on rank 0: step, loss, tokens/s and ETA. Silent on other ranks."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step",
                            dynamic_ncols=True)

    def update(self, loss: float, tokens_per_s: float, extra: dict[str, str] | None = None) -> None:
        """`extra`: the objective's own short readings (preference: reward accuracy, margin)."""
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", **(extra or {}),
                                 refresh=False)
            self.bar.update(1)

    def write(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------------------------ MFU
# Dense bf16/fp16 tensor-core peaks per GPU (no sparsity), FLOP/s. fp32 runs use the TF32 peak.
PEAK_FLOPS = {
    "H200": {"bf16": 989e12, "tf32": 494e12},
    "H100 SXM": {"bf16": 989e12, "tf32": 494e12},
    "H100 NVL": {"bf16": 835e12, "tf32": 418e12},
    "H100 PCIe": {"bf16": 756e12, "tf32": 378e12},
    "H100": {"bf16": 989e12, "tf32": 494e12},
    "A100": {"bf16": 312e12, "tf32": 156e12},
    "L40S": {"bf16": 362e12, "tf32": 183e12},
    "A10G": {"bf16": 70e12, "tf32": 35e12},
    "L4": {"bf16": 121e12, "tf32": 60e12},
    "V100": {"bf16": 125e12, "tf32": 15.7e12},  # fp16 tensor cores (no bf16); fp32 without
}


def peak_flops(device: torch.device, dtype: str) -> float | None:
    """Peak FLOP/s of one GPU for the training dtype; None on CPU or an unknown GPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    kind = "tf32" if dtype == "float32" else "bf16"
    for key in PEAK_FLOPS:  # most specific names first (dict order)
        if all(part in name for part in key.split()):
            return PEAK_FLOPS[key][kind]
    return None


def matmul_parameters(model) -> tuple[int, int]:
    """(all, trainable) parameters that take part in matrix multiplies: every parameter but the
    input embedding table (a lookup, and its gradient a scatter-add) unless it is tied to the
    output head. Counts ZeRO-3 partitioned parameters in full. A mixture of experts' routed
    experts count at the share each token runs (top-k / experts): the FLOPs a token costs come
    from its active parameters, not from every expert it skips."""
    from dpkit.moe import experts_of, is_expert_parameter

    emb = model.get_input_embeddings().weight
    tied = getattr(model.config, "tie_word_embeddings", False)
    experts = experts_of(model.config)
    total = trainable = 0.0
    for name, p in model.named_parameters():
        if p is emb and not tied:
            continue
        n = getattr(p, "ds_numel", p.numel())
        if experts is not None and is_expert_parameter(name):
            n = n * experts.active / experts.routed
        total += n
        trainable += n if p.requires_grad else 0
    return round(total), round(trainable)


def model_flops(n_params: int, n_trainable: int, n_layers: int, hidden: int,
                row_lengths: list[int]) -> float:
    """Model FLOPs of one forward+backward over rows of these (non-padding) lengths.

    `n_params`, `n_trainable`: matmul parameters (see matmul_parameters). Matmuls: 2N per token forward, 2N backward for activation gradients, and 2 per trainable
    parameter for weight gradients — 6N for full fine-tuning, 4N + 2N_trainable for LoRA (a
    frozen base computes no weight gradients; counting 6N would flatter LoRA's MFU).
    Attention scores and values: 12·L·d per token per token of context (PaLM's appendix B),
    i.e. 12·L·d·len² for a row of length len — without halving for the causal mask.
    """
    tokens = sum(row_lengths)
    matmul = (4 * n_params + 2 * n_trainable) * tokens
    attention = 12 * n_layers * hidden * sum(n * n for n in row_lengths)
    return float(matmul + attention)


def forward_flops(n_params: int, n_layers: int, hidden: int, row_lengths: list[int]) -> float:
    """Model FLOPs of one forward without gradient (a frozen reference model's pass): 2N per
    token for the matmuls and a third of model_flops' attention term (its forward share)."""
    return float(2 * n_params * sum(row_lengths)
                 + 4 * n_layers * hidden * sum(n * n for n in row_lengths))


def per_rank(values: dict[str, float], env) -> dict[str, list[float]]:
    """Each rank's value of every key, on every rank (one small all-reduce)."""
    keys = sorted(values)
    grid = torch.zeros(len(keys), env.world_size, dtype=torch.float64, device=env.device)
    for i, k in enumerate(keys):
        grid[i, env.rank] = values[k]
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(grid)
    return {k: grid[i].tolist() for i, k in enumerate(keys)}


# ------------------------------------------------------------------------------- trackers
class Trackers:
    """TensorBoard / W&B through accelerate's tracker classes, on rank 0 only."""

    def __init__(self, names: list[str], run_dir: Path, run_name: str, config: dict,
                 enabled: bool):
        self.trackers = []
        if not enabled:
            return
        from accelerate.tracking import TensorBoardTracker, WandBTracker

        for name in names:
            if name == "tensorboard":
                tracker = TensorBoardTracker(run_name, run_dir / TENSORBOARD)
            else:  # wandb: WANDB_MODE=offline works without network
                tracker = WandBTracker(run_name, dir=str(run_dir))
            tracker.start()  # accelerate >= 1.x: trackers open their writer in start()
            tracker.store_init_configuration(_flat(config))
            self.trackers.append(tracker)

    def log(self, values: dict, step: int) -> None:
        scalars = {k: v for k, v in values.items() if isinstance(v, (int, float)) and v is not None}
        for tracker in self.trackers:
            tracker.log(scalars, step=step)

    def log_text(self, tag: str, text: str, step: int) -> None:
        """Markdown text (sample generations): TensorBoard's text tab, a one-cell W&B table."""
        for tracker in self.trackers:
            if hasattr(tracker, "writer") and hasattr(tracker.writer, "add_text"):
                tracker.writer.add_text(tag, text, global_step=step)
            elif hasattr(tracker, "log_table"):
                tracker.log_table(tag, columns=["text"], data=[[text]], step=step)

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()


def _flat(config: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float, str, bool)):
            out[f"{prefix}{k}"] = v
        else:
            out[f"{prefix}{k}"] = str(v)
    return out
