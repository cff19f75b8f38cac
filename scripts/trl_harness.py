"""The harness the benchmarks against TRL share (scripts/bench_dpo.py, bench_kto.py,
bench_reward.py, bench_grpo.py): the tiny Llama both libraries load from the same saved weights,
the 2-rank torchrun launch of one worker, TRL's side of a run (DeepSpeed on CPU through
accelerate, dpkit's resolved ds_config, a per-optimizer-step clock) and dpkit's (its
metrics.jsonl clock). Each benchmark keeps its recipe, its TRL trainer and what it counts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MODEL = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 688,
         "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
         "vocab_size": 2048, "max_position_embeddings": 2048}
"""The model every benchmark trains (~3.2M parameters), built once from this inline config and
saved, so both libraries start from identical weights."""
TOKENIZER = "dpkit:tokenizers/tiny-bpe"


def require_trl(trainer: str):
    """TRL, or one line saying how to get it (it is a benchmark-time tool, not a dependency)."""
    try:
        import trl
    except ImportError:
        raise SystemExit("TRL is not importable: install it (pip install trl) or put it on "
                         f"PYTHONPATH; this benchmark compares against its {trainer}") from None
    return trl


def save_init(work: Path) -> Path:
    """The shared initial weights and tokenizer, saved under work/init."""
    from dpkit.model import build_model, load_tokenizer
    from dpkit.recipe import ModelSection

    section = ModelSection(config=MODEL, tokenizer=TOKENIZER, dtype="float32")
    build_model(section, 0, 0).save_pretrained(work / "init")
    load_tokenizer(section).save_pretrained(work / "init")
    return work / "init"


def versions() -> dict[str, str]:
    import deepspeed
    import torch
    import transformers
    import trl

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "trl": trl.__version__, "deepspeed": deepspeed.__version__}


# ================================================================================ the workers
def run_dpkit(recipe_path: str, count_key: str = "target_tokens", hook=None) -> dict | None:
    """Train the recipe with dpkit on this rank; rank 0 returns every logged step's end time
    and `count_key` (what the benchmark counts per step). `hook(run)` runs after the Run is
    built, before setup (for timing a phase)."""
    from dpkit.recipe import load_recipe
    from dpkit.run import Run

    run = Run(load_recipe(recipe_path))
    extra = hook(run) if hook else None
    run.setup()
    run.train()
    if run.env.rank != 0:
        return None
    lines = [json.loads(x) for x in (run.out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in lines if "loss" in m]
    out = {"times": [m["time"] for m in steps], "counts": [m[count_key] for m in steps],
           "loss1": steps[0]["loss"]}
    return {**out, **(extra or {})}


@dataclass
class TRLSide:
    """What a TRL worker needs: accelerate's state (gloo on CPU), dpkit's recipe and batch
    arithmetic, its resolved ds_config, the tokenizer and the shared initial model."""
    state: object
    recipe: object
    batch: object
    ds_config: dict
    tokenizer: object
    model: object
    times: list

    def clock(self):
        """A callback stamping the end of every optimizer step (after a GPU sync)."""
        import torch
        from transformers import TrainerCallback

        times = self.times

        class Clock(TrainerCallback):
            def on_step_end(self, a, s, c, **kw):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                times.append(time.time())

        return Clock()

    def common_args(self) -> dict:
        """TrainingArguments both sides agree on (batch, schedule, DeepSpeed, precision)."""
        r, b = self.recipe, self.batch
        return dict(output_dir=str(Path(r.output.dir).parent / "trl-run"),
                    per_device_train_batch_size=b.micro_batch_size,
                    gradient_accumulation_steps=b.grad_accum, learning_rate=r.train.lr,
                    lr_scheduler_type="constant", max_grad_norm=r.train.max_grad_norm,
                    logging_steps=1, save_strategy="no", report_to=[], seed=r.train.seed,
                    deepspeed=self.ds_config, bf16=False,
                    accelerator_config={"use_configured_state": True},
                    dataloader_drop_last=False)


def trl_side(recipe_path: str) -> TRLSide:
    # CPU + DeepSpeed through accelerate: the env flag and a gloo state first (CPU_DEEPSPEED.md)
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    import torch
    from accelerate import PartialState

    state = PartialState(backend="nccl" if torch.cuda.is_available() else "gloo")
    from transformers import AutoModelForCausalLM

    from dpkit.batch import batch_arithmetic
    from dpkit.model import load_model_config, load_tokenizer
    from dpkit.recipe import load_recipe
    from dpkit.zero import resolve_ds_config

    r = load_recipe(recipe_path)
    world = state.num_processes
    ds_config = resolve_ds_config(r, world, load_model_config(r.model).hidden_size, on_cpu=True)
    model = AutoModelForCausalLM.from_pretrained(r.model.name_or_path, dtype=torch.float32)
    return TRLSide(state, r, batch_arithmetic(r, world), ds_config, load_tokenizer(r.model),
                   model, [])


# ================================================================================= the driver
def rank_env() -> dict[str, str]:
    env = dict(os.environ)
    path = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1", PYTHONPATH=path)
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
    return env


def launch(script: str, which: str, recipe_path: Path, result: Path, log: Path,
           timeout: int) -> dict:
    """One 2-rank torchrun of `script --worker which`; rank 0's result (JSON)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(script).resolve()), "--worker", which, "--recipe", str(recipe_path),
           "--result", str(result)]
    result.unlink(missing_ok=True)  # a result from an earlier invocation must not pass for this one
    with open(log, "w") as f:
        proc = subprocess.run(cmd, env=rank_env(), cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                              timeout=timeout, check=False)
    if proc.returncode and result.exists():  # rank 0 wrote its timings, then a rank's teardown
        # failed (seen: TRL's worker aborting in a C++ destructor at exit): the timing stands
        print(f"note: {which} exited {proc.returncode} after writing its result (log {log})",
              flush=True)
    elif proc.returncode:
        raise SystemExit(f"{which} failed ({proc.returncode}), log {log}:\n"
                         f"{log.read_text()[-4000:]}")
    return json.loads(result.read_text())


def per_second(times: list[float], counts: list, warmup: int, drop_last: bool = True) -> float:
    """Counted units per second over the full steps after the warm-up: from the end of step
    `warmup` to the end of the last one timed (`drop_last`: an epoch's partial last step is
    left out)."""
    t = times[:-1] if drop_last else times
    return sum(counts[warmup:len(t)]) / (t[-1] - t[warmup - 1])
