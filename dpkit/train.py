"""The training entry point every launcher starts, and the loop.

    torchrun --nproc_per_node N -m dpkit.train RECIPE [key=value ...]
    accelerate launch --config_file ds_configs/accelerate/<x>.yaml -m dpkit.train RECIPE
    deepspeed --num_gpus N --module dpkit.train RECIPE

The loss of a step is the sum of per-token losses over the whole global batch divided by its
number of target tokens — counted over all ranks and accumulation micro-batches before the
backward passes. So the step is the same whatever the world size and accumulation split: exactly
what one process would compute on the same rows.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dpkit import checkpoint as C
from dpkit import data as D
from dpkit import distributed
from dpkit import lora
from dpkit.errors import EXIT_USER_ERROR, RecipeError, format_errors
from dpkit.metrics import MetricsLog, Progress, memory_mb
from dpkit.model import build_model, load_model_config, load_tokenizer
from dpkit.recipe import Recipe, load_recipe, recipe_to_yaml
from dpkit.zero import batch_arithmetic, resolve_ds_config


def output_dir_problem(recipe: Recipe):
    """The run directory may not exist unless the recipe says to overwrite or resume it."""
    out = Path(recipe.output.dir)
    if recipe.resume is not None:
        return None
    if out.exists() and any(out.iterdir()) and not recipe.output.overwrite:
        return RecipeError.one("output.dir", f"'{out}' already exists and is not empty",
                               "choose another directory, or set output.overwrite=true to replace it")
    return None


def prepare_output_dir(recipe: Recipe, env) -> Path:
    out = Path(recipe.output.dir)
    problem = output_dir_problem(recipe)  # every rank checks before any rank creates it
    distributed.barrier()
    if problem is not None:
        raise problem
    if env.is_main:
        if out.exists() and recipe.output.overwrite and recipe.resume is None:
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    return out


def lr_lambda(recipe: Recipe, total_steps: int):
    warmup = int(recipe.train.warmup_ratio * total_steps)
    schedule = recipe.train.lr_schedule

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress

    return factor


def build_optimizer(model, recipe: Recipe):
    """AdamW with no decay on biases and norm weights. CPU offload needs DeepSpeed's CPU Adam."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": recipe.train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]  # LoRA has no norms: ZeRO-3 drops empty groups
    t = recipe.train
    if recipe.zero.offload_optimizer != "none":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=t.lr, betas=t.adam_betas, eps=t.adam_eps,
                                adamw_mode=True)
    return torch.optim.AdamW(groups, lr=t.lr, betas=t.adam_betas, eps=t.adam_eps)


def loss_sum(engine, batch: dict) -> torch.Tensor:
    """Sum (not mean) of next-token losses over the batch's target tokens, in fp32."""
    logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    use_cache=False).logits
    logits = logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=D.IGNORE, reduction="sum")


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def evaluate(engine, examples, env, micro: int, pad_id: int) -> tuple[float, int]:
    """Token-weighted eval loss over all ranks' shards of the eval set."""
    engine.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for idx in D.eval_micro_batches(len(examples), env.rank, env.world_size, micro):
            batch = to_device(D.collate([examples[i] for i in idx], pad_id), env.device)
            total += float(loss_sum(engine, batch))
            count += D.target_tokens(batch)
    engine.train()
    total, count = distributed.all_reduce_sum([total, count], env.device)
    return total / max(count, 1), int(count)


def save_model(engine, tokenizer, out_dir: Path, env, stage: int) -> None:
    """Hugging Face format (safetensors), written to a temporary name and renamed when complete."""
    state = engine._zero3_consolidated_16bit_state_dict() if stage == 3 else None
    if env.is_main:
        tmp = out_dir.with_name(out_dir.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        if state is None:
            state = engine.module.state_dict()
        engine.module.save_pretrained(tmp, state_dict=state)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.rename(out_dir)
    distributed.barrier()


def versions() -> dict[str, str]:
    import accelerate
    import deepspeed
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "deepspeed": deepspeed.__version__, "transformers": transformers.__version__,
           "accelerate": accelerate.__version__}
    try:
        import peft

        out["peft"] = peft.__version__
    except ImportError:
        pass
    return out


def hardware(env) -> str:
    if env.device.type == "cuda":
        return f"{env.world_size} × {torch.cuda.get_device_name(env.device)}"
    return f"{env.world_size} CPU ranks on {platform.machine()} ({os.cpu_count()} cores)"


def run(recipe: Recipe) -> dict:
    """Train one recipe on the ranks of this job; returns the summary (also on disk)."""
    started = time.time()
    env = distributed.setup(recipe.train.collective_timeout_s)
    out = prepare_output_dir(recipe, env)
    say = print if env.is_main else (lambda *a, **k: None)

    # Load data -------------------------------------------------------------------------------
    tokenizer = load_tokenizer(recipe.model)
    train_rows, eval_rows, stats = D.load_datasets(recipe.data, tokenizer, recipe.train.seed)
    say(f"[dpkit] data: {stats.describe()}; eval rows: {len(eval_rows)}")

    # Resolve DeepSpeed config ----------------------------------------------------------------
    model_config = load_model_config(recipe.model)
    hidden = getattr(model_config, "hidden_size", None)
    ds_config = resolve_ds_config(recipe, env.world_size, hidden, on_cpu=env.backend == "gloo")
    batch = batch_arithmetic(recipe, env.world_size)
    per_epoch = D.steps_per_epoch(len(train_rows), batch.global_batch_size)
    total_steps = recipe.train.max_steps or recipe.train.epochs * per_epoch
    say(f"[dpkit] {batch.describe()}; {per_epoch} steps per epoch, {total_steps} steps; "
        f"ZeRO stage {recipe.zero.stage}, {recipe.model.dtype}")
    if env.is_main:
        (out / "recipe.yaml").write_text(recipe_to_yaml(recipe))
        (out / "ds_config.json").write_text(json.dumps(ds_config, indent=2) + "\n")

    resume_from = C.find_resume(recipe.resume, out)
    universal = resume_from is not None and C.needs_universal(resume_from, env.world_size,
                                                              recipe.zero.stage)
    if universal:
        C.convert_to_universal(resume_from, env)
        ds_config["checkpoint"] = {"load_universal": True}

    # Load model ------------------------------------------------------------------------------
    import deepspeed

    if recipe.peft is not None:  # frozen base + adapters, built identically on every rank
        model = lora.build_peft_model(recipe, tokenizer, ds_config, out, env)
        say(f"[dpkit] {lora.describe(model, recipe.peft)}")
    else:
        model = build_model(recipe.model, recipe.train.seed, recipe.zero.stage, ds_config)
    n_train, n_params = lora.count_parameters(model)
    say(f"[dpkit] model: {n_params:,} parameters, {n_train:,} trainable "
        f"({100 * n_train / max(n_params, 1):.2f}%)")
    optimizer = build_optimizer(model, recipe)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(recipe, total_steps))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)

    start_step, tokens_seen = 0, 0
    if resume_from is not None:
        groups = [{"weight_decay": g["weight_decay"]} for g in optimizer.param_groups]
        state = C.load(engine, resume_from, env, universal)
        if universal:
            C.repair_universal_load(engine.optimizer, groups)
        if state.steps_per_epoch != per_epoch or state.seed != recipe.train.seed:
            raise RecipeError.one("resume", f"checkpoint {resume_from} was made with "
                                  f"{state.steps_per_epoch} steps per epoch and seed {state.seed}, "
                                  f"this run has {per_epoch} and {recipe.train.seed}",
                                  "resume with the same data, global batch and seed")
        start_step, tokens_seen = state.step, state.tokens_seen
        say(f"[dpkit] resumed from {resume_from} at step {start_step}"
            + (" (universal checkpoint: world size or ZeRO stage changed)" if universal else ""))
        if env.is_main:
            truncate_metrics(out / "metrics.jsonl", start_step)

    def save_checkpoint(step_done: int) -> Path:
        state = C.TrainState(step=step_done, tokens_seen=tokens_seen, world_size=env.world_size,
                             zero_stage=recipe.zero.stage, seed=recipe.train.seed,
                             steps_per_epoch=per_epoch)
        return C.save(engine, out, state, tokenizer, env, recipe.output.save_total_limit)

    # Train -----------------------------------------------------------------------------------
    metrics = MetricsLog(out / "metrics.jsonl" if env.is_main else None)
    progress = Progress(total_steps, start_step, env.is_main)
    pad_id = tokenizer.pad_token_id
    last_loss, last_eval = float("nan"), None
    for step in range(start_step, total_steps):
        C.fault_point("step", step + 1, env.rank)
        epoch, step_in_epoch = divmod(step, per_epoch)
        t0 = time.perf_counter()
        micro_batches = [to_device(D.collate([train_rows[i] for i in idx], pad_id), env.device)
                         for idx in D.step_micro_batches(
                             len(train_rows), recipe.train.seed, epoch, step_in_epoch, env.rank,
                             env.world_size, batch.micro_batch_size, batch.grad_accum)]
        local = [sum(D.target_tokens(b) for b in micro_batches),
                 sum(int(b["attention_mask"].sum()) for b in micro_batches if
                     (b["labels"] != D.IGNORE).any()),
                 sum(b["input_ids"].size(0) for b in micro_batches if (b["labels"] != D.IGNORE).any())]
        targets, tokens, samples = distributed.all_reduce_sum(local, env.device)
        # engine.backward divides by accumulation steps and the gradient all-reduce averages over
        # ranks; multiplying by both turns the sum into "sum over the global batch / targets".
        scale = batch.grad_accum * env.world_size / targets
        lr = scheduler.get_last_lr()[0]
        step_loss = 0.0
        for micro in micro_batches:
            loss = loss_sum(engine, micro)
            engine.backward(loss * scale)
            engine.step()
            step_loss += float(loss.detach())
        (loss_total,) = distributed.all_reduce_sum([step_loss], env.device)
        last_loss = loss_total / targets
        elapsed = time.perf_counter() - t0
        tokens_seen += int(tokens)
        if not math.isfinite(last_loss):
            raise RuntimeError(f"loss is {last_loss} at step {step + 1}")
        progress.update(last_loss, tokens / elapsed)
        if (step + 1) % recipe.output.log_steps == 0 or step + 1 == total_steps:
            grad_norm = engine.get_global_grad_norm()
            metrics.write(step=step + 1, epoch=epoch, loss=last_loss, lr=lr,
                          grad_norm=float(grad_norm) if grad_norm is not None else None,
                          tokens=int(tokens), target_tokens=int(targets),
                          tokens_seen=tokens_seen, samples=int(samples), step_time_s=elapsed,
                          tokens_per_s=tokens / elapsed, **memory_mb(env.device))
        eval_due = recipe.output.eval_steps and (step + 1) % recipe.output.eval_steps == 0
        if eval_rows and (eval_due or step + 1 == total_steps):
            last_eval, eval_tokens = evaluate(engine, eval_rows, env, batch.micro_batch_size,
                                              pad_id)
            metrics.write(step=step + 1, eval_loss=last_eval, eval_tokens=eval_tokens,
                          tokens_seen=tokens_seen)
            progress.write(f"[dpkit] step {step + 1}: eval loss {last_eval:.4f}")
        save_every = recipe.output.save_steps
        if save_every and ((step + 1) % save_every == 0 or step + 1 == total_steps):
            ckpt = save_checkpoint(step + 1)
            progress.write(f"[dpkit] step {step + 1}: checkpoint {ckpt}")
            if recipe.hub is not None and recipe.hub.push_checkpoints:
                push_checkpoint(ckpt, step + 1, recipe, env, say)
    progress.close()
    metrics.close()

    # Save ------------------------------------------------------------------------------------
    if recipe.output.save_model and recipe.peft is not None:  # gathered, written, verified
        lora.save_adapter(engine, tokenizer, out, env, recipe, trained=total_steps > 0)
    elif recipe.output.save_model:
        save_model(engine, tokenizer, out / "model", env, recipe.zero.stage)
    summary = {
        "steps": total_steps, "tokens_seen": tokens_seen, "final_loss": last_loss,
        "final_eval_loss": last_eval, "world_size": env.world_size,
        "global_batch_size": batch.global_batch_size, "micro_batch_size": batch.micro_batch_size,
        "grad_accum": batch.grad_accum, "zero_stage": recipe.zero.stage,
        "dtype": recipe.model.dtype,
        "base_model": recipe.model.name_or_path or "inline config",
        "datasets": [s.path for s in recipe.data.sources],
        "parameters": n_params, "trainable_parameters": n_train,
        "data": {"rows": stats.rows, "truncated": stats.truncated,
                 "dropped_too_long": stats.dropped_too_long,
                 "dropped_no_target": stats.dropped_no_target, "eval_rows": len(eval_rows)},
        "wall_time_s": time.time() - started, "versions": versions(), "hardware": hardware(env),
    }
    if env.is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        say(f"[dpkit] done: loss {last_loss:.4f}"
            + (f", eval loss {last_eval:.4f}" if last_eval is not None else "")
            + f"; run directory {out}")
    if recipe.hub is not None and recipe.hub.push_at_end:
        from dpkit.hub import push_on_main

        # After the last collective of training: a long upload can't trip the collective timeout.
        push_on_main(out, recipe.hub, is_main=env.is_main, barrier=distributed.barrier, say=say)
    engine.destroy() if hasattr(engine, "destroy") else None
    return summary


def push_checkpoint(ckpt: Path, step: int, recipe: Recipe, env, say) -> None:
    """Rank 0 exports the checkpoint to Hugging Face format and pushes it; the others wait."""
    from dpkit.export import export
    from dpkit.hub import push_on_main

    model_dir = ckpt / "hf-export"
    if env.is_main:
        export(ckpt, model_dir, dtype=recipe.model.dtype, overwrite=True)
    push_on_main(Path(recipe.output.dir), recipe.hub, is_main=env.is_main,
                 barrier=distributed.barrier, say=say, model_dir=model_dir, step=step)


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines after the checkpoint a run resumes from (they will be written again)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept))


def main(argv: list[str] | None = None) -> int:
    argv = distributed.strip_launcher_args(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else EXIT_USER_ERROR
    try:
        run(load_recipe(argv[0], argv[1:]))
    except RecipeError as e:
        if distributed.is_main_process():
            print(format_errors(e), file=sys.stderr)
        return EXIT_USER_ERROR
    except distributed.RendezvousError as e:  # one line per node, not a traceback per rank
        if distributed.launcher_info().local_rank == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
