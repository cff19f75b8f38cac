"""How long and how much: the time model's answers rendered for `dpkit plan`.

Per fitting option a step-time breakdown, tokens per second, the run's duration, GPU-hours and
(with --price-per-gpu-hour) its cost; and the `--scaling` table and plot (throughput and scaling
efficiency against GPU count for each ZeRO stage).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from dpkit.metrics import forward_flops
from dpkit.plan.memory import DTYPE_BYTES
from dpkit.plan.time import Cluster, Job, StepTime, matmul_params, step_time, with_world


@dataclass(frozen=True)
class RunLength:
    """How long the run is: a fixed number of optimizer steps, or tokens per epoch × epochs."""

    steps: int | None = None
    tokens: int | None = None
    epochs: int = 1
    seq_len: int = 0
    source: str = ""

    def steps_for(self, rows_per_step: int, steps_per_batch: int = 1) -> int | None:
        """Optimizer steps; `rows_per_step`: global batch × rows per item (pairs: 2);
        `steps_per_batch`: optimizer steps per global batch (GRPO's μ, `grpo.iterations`)."""
        if self.steps or not self.tokens:
            return self.steps
        batches = -(-self.tokens // (rows_per_step * self.seq_len))  # ceil per epoch
        return batches * steps_per_batch * self.epochs


def run_length(recipe, dataset_tokens: int | None) -> RunLength:
    t, seq = recipe.train, recipe.data.max_seq_len
    if t.max_steps:
        return RunLength(steps=t.max_steps, source="train.max_steps")
    if dataset_tokens:  # full sequences of max_seq_len: packed data, or the padded worst case
        return RunLength(tokens=dataset_tokens, epochs=t.epochs, seq_len=seq,
                         source=f"{dataset_tokens:,} tokens × {t.epochs} epoch(s) in sequences "
                         f"of {seq}")
    return RunLength(source="pass --dataset-tokens (or set train.max_steps) for the run's length")


def hours(seconds: float) -> str:
    return f"{seconds / 3600:,.1f} h" if seconds >= 360 else f"{seconds / 60:,.1f} min"


def reference_pass_s(p, length: RunLength) -> float | None:
    """Seconds of a precomputed reference's forward over the whole dataset before step 1 (DPO
    and IPO without an adapter to turn off); None when the dataset's size is not known."""
    if not length.tokens:
        return None
    n, _ = matmul_params(p.shape)
    rows = [length.seq_len] * -(-length.tokens // length.seq_len)
    flops = forward_flops(n, p.shape.layers, p.shape.hidden, rows)
    dtype_bytes = DTYPE_BYTES[p.recipe.model.dtype]
    return flops / (p.hw.world_size * p.cluster.efficiency * p.cluster.device.peak(dtype_bytes))


def time_lines(p, length: RunLength, price: float | None) -> list[str]:
    """The time table of a Plan's fitting options (fastest first) and the run's cost."""
    from dpkit.objectives import build_objective

    c, world = p.cluster, p.hw.world_size
    known = bool(length.steps or length.tokens)
    objective = build_objective(p.recipe)
    rows_per_item, precomputed = objective.rows_per_item, objective.reference == "precomputed"
    before = reference_pass_s(p, length) if precomputed else None
    ep = bool(p.shape.experts)  # a mixture of experts: the expert-parallel degree of each row
    lines = [f"time: {c.device.name} at {c.efficiency:.0%} of its {c.device.peak_flops / 1e12:.0f}"
             f" TFLOP/s peak, inside a node {c.intra.name}, across nodes {c.inter.name}, "
             f"{c.overlap:.0%} of communication hidden (assumptions: docs/plan.md)",
             f"{'stage':<6}{'offload':<22}" + (f"{'EP':>3}" if ep else "")
             + f"{'micro×acc':>10}{'compute':>9}{'comm':>8}"
             f"{'hidden':>8}{'optim':>7}{'offload':>8}{'step s':>8}{'tokens/s':>11}"
             + (f"{'steps':>8}{'run':>10}{'GPU-h':>9}" if length.source and known else "")
             + (f"{'cost':>10}" if known and price else "")]
    for o in sorted((o for o in p.options if o.fits), key=lambda o: -o.time.tokens_per_s):
        st: StepTime = o.time
        line = (f"{o.stage:<6}{o.breakdown.setup.label:<22}"
                + (f"{o.expert_parallel:>3}" if ep else "")
                + f"{f'{o.batch.micro_batch_size}×{o.batch.grad_accum}':>10}{st.compute_s:>9.3f}"
                f"{st.comm_s:>8.3f}{st.comm_s - st.exposed_comm_s:>8.3f}{st.optimizer_s:>7.3f}"
                f"{st.offload_s:>8.3f}{st.step_s:>8.3f}{st.tokens_per_s:>11,.0f}")
        if known:
            steps = length.steps_for(o.batch.global_batch_size * rows_per_item,
                                     objective.steps_per_batch)
            seconds = steps * st.step_s + (before or 0.0)
            line += f"{steps:>8,}{hours(seconds):>10}{seconds * world / 3600:>9,.1f}"
            if price:
                line += f"{seconds * world / 3600 * price:>10,.0f}"
        lines.append(line)
    split = [o for o in p.options if o.fits and o.expert_parallel > 1]
    if split:  # the all-to-all traffic of the fastest expert-parallel option
        from dpkit.plan.time import all_to_all_bytes

        o = max(split, key=lambda o: o.time.tokens_per_s)
        lines.append(f"expert parallelism: {all_to_all_bytes(o.time_job) / 2**30:.2f} GiB sent "
                     f"all-to-all per GPU per step at EP {o.expert_parallel} ZeRO-{o.stage} "
                     "(in comm, none of it hidden)")
    lines.append(f"run length: {length.source}" if known
                 else f"run length: unknown — {length.source}")
    if precomputed:
        lines.append("reference log-probs before step 1 (one forward over the data): "
                     + (f"{hours(before)}, included in the run's time" if before is not None
                        else "not in the time above (its length needs --dataset-tokens)"))
    return lines


def scaling(job: Job, cluster: Cluster, worlds: list[int], stages: list[int],
            global_batch: int | None) -> dict[int, list[tuple[int, StepTime]]]:
    """Per stage, the step time at each world size (no offload; the global batch kept where it
    splits, else the micro batch kept: see time.with_world)."""
    out = {}
    for s in stages:
        base = replace(job, stage=s, offload_optimizer="none", offload_params="none")
        out[s] = [(w, step_time(with_world(base, w, global_batch), cluster)) for w in worlds]
    return out


def scaling_lines(table: dict[int, list[tuple[int, StepTime]]]) -> list[str]:
    """Tokens/s and scaling efficiency (tokens/s per GPU against the smallest world's)."""
    lines = [f"{'stage':<6}{'GPUs':>6}{'step s':>9}{'tokens/s':>13}{'per GPU':>10}"
             f"{'exposed comm':>14}{'scaling eff.':>14}"]
    for s, rows in table.items():
        w0, st0 = rows[0]
        for w, st in rows:
            eff = (st.tokens_per_s / w) / (st0.tokens_per_s / w0)
            lines.append(f"{s:<6}{w:>6}{st.step_s:>9.3f}{st.tokens_per_s:>13,.0f}"
                         f"{st.tokens_per_s / w:>10,.0f}{st.exposed_comm_s:>14.3f}{eff:>14.0%}")
    return lines


def scaling_plot(table: dict[int, list[tuple[int, StepTime]]], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for s, rows in table.items():
        w = [r[0] for r in rows]
        tps = [r[1].tokens_per_s for r in rows]
        ax1.plot(w, tps, marker="o", label=f"ZeRO-{s}")
        ax2.plot(w, [(t / n) / (tps[0] / w[0]) for t, n in zip(tps, w)], marker="o",
                 label=f"ZeRO-{s}")
    ax1.set(xscale="log", yscale="log", xlabel="GPUs", ylabel="tokens/s (predicted)")
    ax2.set(xscale="log", xlabel="GPUs", ylabel="scaling efficiency", ylim=(0, 1.05))
    for ax in (ax1, ax2):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
