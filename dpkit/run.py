"""The training entry point every launcher starts, and the loop.

    torchrun --nproc_per_node N -m dpkit.train RECIPE [key=value ...]
    accelerate launch --config_file ds_configs/accelerate/<x>.yaml -m dpkit.train RECIPE
    deepspeed --num_gpus N --module dpkit.train RECIPE

`run(recipe)` reads top to bottom: data, DeepSpeed config, model, resume, the loop (one step is
in step.py), final save, summary, push.
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

from dpkit import checkpoint as C
from dpkit import data as D
from dpkit import distributed, logs, lora
from dpkit.errors import EXIT_USER_ERROR, RecipeError, format_errors
from dpkit.hub_schema import UserChoice, user_choice_from_overrides
from dpkit.metrics import (MetricsLog, Progress, Trackers, matmul_parameters, memory_mb,
                           model_flops, peak_flops, per_rank)
from dpkit.model import build_model, load_model_config, load_tokenizer
from dpkit.attention import NAME as ROWS_ATTENTION
from dpkit.attention import describe_packed
from dpkit.data.packing import fill_ratio, pack
from dpkit.recipe import Recipe, load_recipe, recipe_to_yaml
from dpkit.rundir import RunFinished, outside_warning, prepare_output_dir
from dpkit.step import evaluate, train_step
from dpkit.batch import batch_arithmetic
from dpkit.zero import resolve_ds_config


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
    # On GPU under ZeRO 0-2 the parameters are already on the device (see run): torch's fused
    # AdamW kernel then updates the flat fp32 partitions in one launch per group.
    fused = all(p.is_cuda for g in groups for p in g["params"]) and recipe.zero.stage < 3
    return torch.optim.AdamW(groups, lr=t.lr, betas=t.adam_betas, eps=t.adam_eps,
                             fused=fused or None)


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


def run(recipe: Recipe, hub_user: UserChoice | None = None) -> dict:
    """Train one recipe on the ranks of this job; returns the summary (also on disk).
    `hub_user`: the Hub endpoint / token variable the command line named (see hub_schema)."""
    started = time.time()
    env = distributed.setup(recipe.train.collective_timeout_s)
    out, resume_from = prepare_output_dir(recipe, env)  # resume_from: checked whole
    log = logs.setup(out, env.rank, env.is_main)

    def say(message: str) -> None:
        log.info(message)
        if env.is_main:
            print(message, flush=True)

    # Load data -------------------------------------------------------------------------------
    tokenizer = load_tokenizer(recipe.model)
    train_rows, eval_rows, stats = D.load_datasets(recipe.data, tokenizer, recipe.train.seed)
    say(f"[dpkit] data: {stats.describe()}; eval rows: {len(eval_rows)}")
    if recipe.data.packing:
        rows_before = len(train_rows)
        train_rows = pack(train_rows, recipe.data.max_seq_len, recipe.train.seed)
        say(f"[dpkit] packing: {rows_before} rows into {len(train_rows)} sequences of up to "
            f"{recipe.data.max_seq_len} tokens, {100 * fill_ratio(train_rows, recipe.data.max_seq_len):.1f}% full")
    lengths = [len(r.input_ids) for r in train_rows] if recipe.data.group_by_length else None

    # Resolve DeepSpeed config ----------------------------------------------------------------
    model_config = load_model_config(recipe.model)
    hidden = getattr(model_config, "hidden_size", None)
    ds_config = resolve_ds_config(recipe, env.world_size, hidden, on_cpu=env.backend == "gloo")
    batch = batch_arithmetic(recipe, env.world_size)
    per_epoch = D.steps_per_epoch(len(train_rows), batch.global_batch_size)
    total_steps = recipe.train.max_steps or recipe.train.epochs * per_epoch
    say(f"[dpkit] {batch.describe()}; {per_epoch} steps per epoch, {total_steps} steps; "
        f"ZeRO stage {recipe.zero.stage}, {recipe.model.dtype}")
    if resume_from is not None and (warning := outside_warning(resume_from, out)):
        say(f"[dpkit] {warning}")
    if env.is_main:
        (out / "recipe.yaml").write_text(recipe_to_yaml(recipe))
        (out / "ds_config.json").write_text(json.dumps(ds_config, indent=2) + "\n")
        if recipe.resume is not None and resume_from is None:  # nothing to resume: start over
            truncate_metrics(out / "metrics.jsonl", 0)
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
        model = build_model(recipe.model, recipe.train.seed, recipe.zero.stage, ds_config,
                            packed_len=recipe.data.max_seq_len if recipe.data.packing else None)
    attention = getattr(model.config, "_attn_implementation", recipe.model.attn_implementation)
    flat = attention == ROWS_ATTENTION  # packed sequences laid end to end: no padding at all
    if recipe.data.packing:
        how = describe_packed(attention, recipe.model.attn_implementation, model.config,
                              recipe.data.max_seq_len)
        say(f"[dpkit] packing: attention {attention} ({how})")
    n_train, n_params = lora.count_parameters(model)
    say(f"[dpkit] model: {n_params:,} parameters, {n_train:,} trainable "
        f"({100 * n_train / max(n_params, 1):.2f}%)")
    if env.device.type == "cuda" and recipe.zero.stage < 3 and recipe.peft is None:
        model.to(env.device)  # lets the optimizer use fused CUDA kernels
    optimizer = build_optimizer(model, recipe)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(recipe, total_steps))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    if recipe.train.compile:  # after initialize, in place: DeepSpeed's hooks stay on the path
        from accelerate.utils import compile_regions_deepspeed

        compile_regions_deepspeed(engine.module)
        compiled = sum(getattr(m, "_compiled_call_impl", None) is not None
                       for m in engine.module.modules())
        say(f"[dpkit] compile: {compiled} modules (each decoder layer, then the rest) compiled "
            "by torch.compile on first use; the first steps are slower")

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
    trackers = Trackers(recipe.output.report_to, out, out.name,
                        recipe.model_dump(mode="json"), env.is_main)
    progress = Progress(total_steps, start_step, env.is_main)
    pad_id = tokenizer.pad_token_id
    peak = peak_flops(env.device, recipe.model.dtype)
    layers = getattr(model_config, "num_hidden_layers", 0)
    flop_params = matmul_parameters(engine.module)
    last_loss, last_eval, skipped = float("nan"), None, 0
    for step in range(start_step, total_steps):
        C.fault_point("step", step + 1, env.rank)
        epoch, step_in_epoch = divmod(step, per_epoch)
        t0 = time.perf_counter()
        micro_batches = [D.collate([train_rows[i] for i in idx], pad_id, flatten=flat)
                         for idx in D.step_micro_batches(
                             len(train_rows), recipe.train.seed, epoch, step_in_epoch, env.rank,
                             env.world_size, batch.micro_batch_size, batch.grad_accum,
                             lengths)]
        collate_s = time.perf_counter() - t0
        result = train_step(engine, micro_batches, env, batch.grad_accum,
                            poison_loss=C.fault_requested("nan", step + 1, env.rank))
        result.times["data_s"] += collate_s
        result.times["step_time_s"] += collate_s
        last_loss, elapsed = result.loss, result.times["step_time_s"]
        tokens_seen += result.tokens
        if not math.isfinite(last_loss):
            skipped += 1
            handle_non_finite(recipe, result, step + 1, out, say)
        progress.update(last_loss, result.tokens / elapsed)
        if (step + 1) % recipe.output.log_steps == 0 or step + 1 == total_steps:
            flops = model_flops(*flop_params, layers, hidden or 0, result.row_lengths)
            (flops,) = distributed.all_reduce_sum([flops], env.device)
            grad_norm = engine.get_global_grad_norm()
            record = dict(
                step=step + 1, epoch=epoch, loss=last_loss, lr=lr_now(scheduler),
                grad_norm=float(grad_norm) if grad_norm is not None else None,
                tokens=result.tokens, target_tokens=result.targets, tokens_seen=tokens_seen,
                samples=result.samples, tokens_per_s=result.tokens / elapsed,
                samples_per_s=result.samples / elapsed, flops=flops,
                mfu=flops / (elapsed * env.world_size * peak) if peak else None,
                skipped=not result.applied, skipped_steps=skipped, **result.times)
            record.update(per_rank(memory_mb(env.device), env))
            metrics.write(**record)
            trackers.log(record, step + 1)
            log.info(f"step {step + 1}: loss {last_loss:.4f}, {result.tokens / elapsed:,.0f} "
                     f"tokens/s, {elapsed:.3f} s")
        eval_due = recipe.output.eval_steps and (step + 1) % recipe.output.eval_steps == 0
        if eval_rows and (eval_due or step + 1 == total_steps):
            last_eval, eval_tokens = evaluate(engine, eval_rows, env, batch.micro_batch_size,
                                              pad_id)
            metrics.write(step=step + 1, eval_loss=last_eval, eval_tokens=eval_tokens,
                          tokens_seen=tokens_seen)
            trackers.log({"eval_loss": last_eval}, step + 1)
            progress.write(f"[dpkit] step {step + 1}: eval loss {last_eval:.4f}")
        save_every = recipe.output.save_steps
        if save_every and ((step + 1) % save_every == 0 or step + 1 == total_steps):
            ckpt = save_checkpoint(step + 1)
            progress.write(f"[dpkit] step {step + 1}: checkpoint {ckpt}")
            if recipe.hub is not None and recipe.hub.push_checkpoints:
                push_checkpoint(ckpt, step + 1, recipe, env, say, hub_user)
    progress.close()
    metrics.close()
    trackers.finish()

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
        "dtype": recipe.model.dtype, "attention": attention,
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
        push_on_main(out, recipe.hub, is_main=env.is_main, barrier=distributed.barrier, say=say,
                     user=hub_user)
    engine.destroy() if hasattr(engine, "destroy") else None
    logs.teardown()
    return summary


def push_checkpoint(ckpt: Path, step: int, recipe: Recipe, env, say,
                    hub_user: UserChoice | None = None) -> None:
    """Rank 0 exports the checkpoint to Hugging Face format and pushes it; the others wait."""
    from dpkit.export import export
    from dpkit.hub import push_on_main

    model_dir = ckpt / "hf-export"
    if env.is_main:
        export(ckpt, model_dir, dtype=recipe.model.dtype, overwrite=True)
    push_on_main(Path(recipe.output.dir), recipe.hub, is_main=env.is_main,
                 barrier=distributed.barrier, say=say, model_dir=model_dir, step=step,
                 user=hub_user)


def lr_now(scheduler) -> float:
    return scheduler.get_last_lr()[0]


def handle_non_finite(recipe: Recipe, result, step: int, out: Path, say) -> None:
    """A NaN/inf loss: stop naming the last good checkpoint, or (skip) confirm DeepSpeed
    discarded the update — if it applied it anyway, the weights are poisoned: stop too."""
    latest = C.latest_complete(out)
    where = f"last complete checkpoint: {latest}" if latest else "no complete checkpoint yet"
    if recipe.train.nan_policy == "skip" and not result.applied:
        say(f"[dpkit] step {step}: loss is {result.loss}; update skipped (train.nan_policy=skip)")
        return
    reason = ("DeepSpeed applied the update anyway, so the weights are no longer finite"
              if recipe.train.nan_policy == "skip" else "train.nan_policy is stop")
    raise NonFiniteLoss(f"loss is {result.loss} at step {step} ({reason}); {where}")


class NonFiniteLoss(RuntimeError):
    pass


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
        run(load_recipe(argv[0], argv[1:]), hub_user=user_choice_from_overrides(argv[1:]))
        distributed.shutdown()
    except RunFinished as e:  # nothing to do: every rank knows, rank 0 says it
        if distributed.is_main_process():
            print(e, file=sys.stderr if e.code else sys.stdout, flush=True)
        return e.code
    except RecipeError as e:
        if distributed.is_main_process():
            print(format_errors(e), file=sys.stderr)
        return EXIT_USER_ERROR
    except NonFiniteLoss as e:  # every rank sees the same global loss: rank 0 speaks
        if distributed.is_main_process():
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    except distributed.RendezvousError as e:  # one line per node, not a traceback per rank
        if distributed.launcher_info().local_rank == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        else:  # the launcher stops a node's ranks when the first one exits: let rank 0 speak
            time.sleep(15)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
