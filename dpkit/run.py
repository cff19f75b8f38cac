"""A training run on one rank: setup, the loop, the end. Every training method goes through here.

    run = Run(recipe)          # nothing happens yet
    run.setup()                # process group, run directory, data, DeepSpeed config, model,
                               # engine, objective, resume
    summary = run.train()      # the loop, then final save, summary.json, push

What changes between training methods is not here: the loss is the objective's
(dpkit/objectives/), the rows come from a feed (dpkit/data/feed.py), the batch rule from
dpkit/batch.py. Launchers start `python -m dpkit.train` (dpkit/train.py: `main`), which runs one.
"""

from __future__ import annotations

import atexit
import gc
import math
import time
from pathlib import Path

from dpkit import checkpoint as C
from dpkit import distributed, kernels, logs, lora, moe
from dpkit.attention import NAME as ROWS_ATTENTION
from dpkit.attention import describe_packed

from dpkit.data import load as D
from dpkit.data.cache import load_cached
from dpkit.data.feed import RepeatedFeed, eval_batches, make_feed
from dpkit.data.mixture import Mixture, describe_sources, source_summary
from dpkit.data.packing import fill_ratio, pack
from dpkit.data.stream import check_stream
from dpkit.engine import build_engine, lr_now, save_model
from dpkit.errors import RecipeError
from dpkit.eval.evaluator import Evaluator
from dpkit.hub_schema import UserChoice
from dpkit.layout import layout_of
from dpkit.methods import spec as method_spec
from dpkit.metrics import (
    MetricsLog,
    Progress,
    Trackers,
    matmul_parameters,
    memory_mb,
    model_flops,
    peak_flops,
    per_rank,
)
from dpkit.model import build_model, load_model_config, load_tokenizer
from dpkit.objectives import build_objective
from dpkit.objectives.head import LossHead
from dpkit.parallel.sequence import SequenceParallel, gradient_divisor
from dpkit.recipe import Recipe, recipe_to_yaml
from dpkit.run_files import (
    DS_CONFIG,
    METRICS,
    MODEL,
    PREEMPTED,
    RECIPE,
    SUMMARY,
    append_jsonl,
    truncate_jsonl,
    write_json,
    write_text,
)
from dpkit.run_info import hardware, versions
from dpkit.rundir import outside_warning, prepare_output_dir
from dpkit.step import evaluate, train_step
from dpkit.zero import resolve_ds_config


class Run:
    """One recipe trained on the ranks of this job. Attributes are filled by `setup`."""

    def __init__(self, recipe: Recipe, hub_user: UserChoice | None = None):
        self.recipe = recipe
        self.hub_user = hub_user  # the Hub endpoint / token variable the command line named
        self.objective = build_objective(recipe)
        self.started = time.time()

    # ------------------------------------------------------------------------------- setup
    def setup(self) -> Run:
        r = self.recipe
        self.env = distributed.setup(r.train.collective_timeout_s)
        if distributed.restart_count():  # restarted by torchrun's agent (elastic: maybe on fewer
            # nodes) with the command line of the first start: resume as `dpkit train` would
            again = C.resume_after_restart(r.resume, Path(r.output.dir).expanduser())
            if again != r.resume:
                self.recipe = r = r.model_copy(update={"resume": again})
        # Refusals (finished run, damaged checkpoint, foreign directory) before anything exists.
        self.out, self.resume_from = prepare_output_dir(r, self.env)
        self.log = logs.setup(self.out, self.env.rank, self.env.is_main)
        self.tokenizer = load_tokenizer(r.model)
        self.model_config = load_model_config(r.model)
        self.layout = layout_of(r, self.env.world_size)  # built once: everything below asks it
        self.batch = self.layout.batch
        self.sp = SequenceParallel.start(r, self.model_config)  # None without it
        self._load_data()
        self._resolve_config()
        self._build()
        self.objective.setup(self)
        self._resume()
        self.evals = Evaluator(self)  # prompts for generations, samples.jsonl (dpkit/eval)
        return self

    def say(self, message: str) -> None:
        """Log on every rank; print on the main one."""
        self.log.info(message)
        if self.env.is_main:
            print(message, flush=True)

    @property
    def dp_rank(self) -> int:
        """This rank's place among the ranks that read different rows."""
        return self.env.rank // self.batch.sequence_parallel

    def _load_data(self) -> None:
        """Tokenized once per node (dpkit/data/cache.py); a stream is read by its feed."""
        r = self.recipe
        rows, self.eval_rows, self.data_stats = load_cached(
            r.data, self.tokenizer, r.train.seed, self.env, self.say, r.data.streaming,
            self.log.info, options=method_spec(r).options(r))
        if r.data.streaming:  # no rows: the feed reads the stream
            return check_stream(self)
        self.say(f"[dpkit] data: {self.data_stats.describe()}; eval rows: {len(self.eval_rows)}")
        if r.data.packing and self.objective.packs_rows:  # else: it lays out its own batches
            before = len(rows)
            if isinstance(rows, Mixture):  # each source packed on its own: shares of sequences
                rows = rows.packed(r.data.max_seq_len, r.train.seed)
                describe_sources(self.data_stats, rows, rows.sizes, r.data.sources, "sequences")
            else:
                rows = pack(rows, r.data.max_seq_len, r.train.seed)
            self.say(f"[dpkit] packing: {before} rows into {len(rows)} sequences of up to "
                     f"{r.data.max_seq_len} tokens, "
                     f"{100 * fill_ratio(rows, r.data.max_seq_len):.1f}% full"
                     f"{self.data_stats.describe_sources()}")
        self.train_rows = rows

    def _resolve_config(self) -> None:
        r, env = self.recipe, self.env
        self.hidden = getattr(self.model_config, "hidden_size", None)
        self.ds_config = resolve_ds_config(r, env.world_size, self.hidden,
                                           on_cpu=env.backend == "gloo")
        if self.sp is not None:  # DeepSpeed's batch check outside initialize (zero.Init) reads it
            self.ds_config["sequence_parallel_size"] = self.sp.size
        self.experts = moe.experts_of(self.model_config)  # None: a dense model
        if self.layout.expert_parallel > 1:
            self.ds_config["expert_parallel"] = moe.autoep_section(r, self.model_config)
        self.gradient_divisor = gradient_divisor(self.ds_config, self.batch.data_parallel,
                                                 env.world_size)
        # optimizer steps: each global batch gives the objective's steps_per_batch (GRPO's μ)
        self.per_epoch = (0 if self.train_rows is None else  # a stream: unknown length
                          D.steps_per_epoch(getattr(self.train_rows, "per_epoch",
                                                    len(self.train_rows)),
                                            self.batch.global_batch_size)
                          * self.objective.steps_per_batch)
        self.total_steps = r.train.max_steps or r.train.epochs * self.per_epoch
        self.say(f"[dpkit] {self.batch.describe()}; {self.per_epoch} steps per epoch, "
                 f"{self.total_steps} steps; {self.layout.describe()}, {r.model.dtype}; "
                 f"objective {self.objective.describe()}")
        if self.resume_from is not None and (warning := outside_warning(self.resume_from,
                                                                          self.out)):
            self.say(f"[dpkit] {warning}")
        if env.is_main:
            write_text(self.out / RECIPE, recipe_to_yaml(r))
            self._write_ds_config()
            if r.resume is not None and self.resume_from is None:  # nothing to resume: anew
                truncate_jsonl(self.out / METRICS, 0)
            (self.out / PREEMPTED).unlink(missing_ok=True)  # an earlier attempt's stop
        if self.resume_from is not None and (
                refused := C.expert_parallel_problem(self.resume_from, self.layout)) is not None:
            raise refused
        self.universal = self.resume_from is not None and C.needs_universal(
            self.resume_from, self.layout)
        if self.universal:
            C.convert_to_universal(self.resume_from, env, r.train.single_rank_work_timeout_s)
            self.ds_config.setdefault("checkpoint", {})["load_universal"] = True

    def _write_ds_config(self) -> None:
        write_json(self.out / DS_CONFIG, self.ds_config)

    def _build(self) -> None:
        r, env = self.recipe, self.env
        if r.peft is not None:  # frozen base + adapters, built identically on every rank
            model = lora.build_peft_model(r, self.tokenizer, self.ds_config, self.out, env)
            self.say(f"[dpkit] {lora.describe(model, r.peft)}")
        else:
            model = build_model(r.model, r.train.seed, self.layout.stage, self.ds_config,
                                packed_len=r.data.max_seq_len if r.data.packing else None,
                                head=method_spec(r).head, pad_token_id=self.tokenizer.pad_token_id)
        self.aux = None
        if self.experts is not None:
            self._mixture_of_experts(model)
        if self.sp is not None:
            self.sp.install(model)
            self.say(f"[dpkit] {self.sp.describe()}")
        kernels.apply(model, r, self.env, self.say)
        self.attention = getattr(model.config, "_attn_implementation", r.model.attn_implementation)
        # packed sequences laid end to end: no padding
        flat = self.attention == ROWS_ATTENTION or (self.sp is not None and self.sp.flat)
        if r.data.packing:
            how = describe_packed(self.attention, r.model.attn_implementation, model.config,
                                  r.data.max_seq_len)
            self.say(f"[dpkit] packing: attention {self.attention} ({how})")
        self.n_train, self.n_params = lora.count_parameters(model)
        self.say(f"[dpkit] model: {self.n_params:,} parameters, {self.n_train:,} trainable "
                 f"({100 * self.n_train / max(self.n_params, 1):.2f}%)")
        self._matmul = matmul_parameters(model)  # before AutoEP keeps a rank's experts only
        self.loss_head = LossHead()  # next-token losses; a score head has no vocabulary logits
        if method_spec(r).head == "causal_lm":
            self.loss_head, how = LossHead.for_run(r, model, model.config,
                                                   liger=kernels.liger_active(r, self.env.device))
            self.say(f"[dpkit] loss: {how}")
        if r.output.async_save:  # DeepSpeed's decoupled writer: its environment, its end
            C.prepare_writer()
        self.engine, self.optimizer, self.scheduler = build_engine(
            model, r, self.ds_config, self.total_steps, env, self.say,
            mpu=self.sp.mpu if self.sp is not None else None)
        if C.decoupled(self.engine):
            self.writer_waits = C.clock_commits(self.engine)
            atexit.register(C.stop_writer, self.engine)
        b = self.batch
        sizes = [s["available"] for s in self.data_stats.sources] or None
        self.feed = make_feed(r, self.train_rows, self.tokenizer, b, self.dp_rank,
                              self.objective.collate, flat, self.objective.step_examples,
                              sizes)
        if self.sp is not None:  # every rank of a group reads the same rows, keeps its slice
            self.feed = self.sp.wrap(self.feed)
        if self.objective.steps_per_batch > 1:  # GRPO's μ optimizer steps per rollout batch
            self.feed = RepeatedFeed(self.feed, self.objective.steps_per_batch)

    def _mixture_of_experts(self, model) -> None:
        """Router loss, ZeRO-3 leaf modules and expert parallelism (dpkit/moe.py)."""
        r, e = self.recipe, self.experts
        self.say(f"[dpkit] mixture of experts: {e.routed} experts per layer, {e.active} per token"
                 + (f", {e.shared} shared" if e.shared else ""))
        self.aux, line = moe.aux_loss_for(model, self.model_config, r.moe.aux_loss_coef)
        self.say(f"[dpkit] {line}")
        if self.layout.partitions_parameters:
            classes, line = moe.leaf_classes(model, r.moe.zero3_leaf_modules)
            moe.declare_leaves(self.ds_config, classes)
            self.say(f"[dpkit] {line}")
            if self.env.is_main and classes is not None:
                self._write_ds_config()
        ep = self.layout.expert_parallel
        if ep > 1:
            moe.allow_autoep_with_transformers()
            self.say(f"[dpkit] expert parallelism: each MoE layer's experts split over {ep} "
                     "ranks (DeepSpeed AutoEP, preset "
                     f"{self.ds_config['expert_parallel']['preset_model']}), {e.routed // ep} "
                     "experts per rank")

    def _resume(self) -> None:
        self.start_step, self.tokens_seen = 0, 0
        self.source_counts = [0] * (2 * len(self.recipe.data.sources))  # tokens, then rows
        if self.resume_from is None:
            return
        r, ckpt = self.recipe, self.resume_from
        groups = [{"weight_decay": g["weight_decay"]} for g in self.optimizer.param_groups]
        state = C.load(self.engine, ckpt, self.env, self.universal)
        if self.universal:
            C.repair_universal_load(self.engine.optimizer, groups)
            C.repair_schedule(self.scheduler)
        # The recipe keys were compared before any rank started (C.settings_problem); this also
        # catches data files whose rows changed, and checkpoints from before those were stored.
        if state.steps_per_epoch != self.per_epoch or state.seed != r.train.seed:
            raise RecipeError.one("resume", f"checkpoint {ckpt} was made with "
                                  f"{state.steps_per_epoch} steps per epoch and seed {state.seed}, "
                                  f"this run has {self.per_epoch} and {r.train.seed}",
                                  "resume with the same data, global batch and seed")
        self.feed.load_state_dict(state.data)
        self.objective.load_state_dict(C.objective_state(ckpt))
        if self.env.is_main:  # a rewind: this run's lineage goes on from here (C.latest_complete)
            C.point_latest(self.out, ckpt)
        self.start_step, self.tokens_seen = state.step, state.tokens_seen
        if len(state.source_counts) == len(self.source_counts):  # not in older checkpoints
            self.source_counts = list(state.source_counts)
        world, saved = self.env.world_size, state.world_size
        self.say(f"[dpkit] resumed from {ckpt} at step {self.start_step}"
                 + (f" (universal checkpoint: world size {saved} -> {world} or ZeRO stage "
                    f"changed)" if self.universal else ""))
        if self.env.is_main:
            reached = C.last_logged_step(self.out)  # before the steps after the checkpoint go
            truncate_jsonl(self.out / METRICS, self.start_step)
            restart = distributed.restart_count()
            if restart:  # an automatic restart after a rank (or node) died: what it cost
                redone = max(0, reached - self.start_step)
                fewer = f" on {world} ranks (saved by {saved})" if world != saved else ""
                self.say(f"[dpkit] restart {restart}: resumed from {ckpt} at step "
                         f"{self.start_step}{fewer}; {redone} steps done before the failure "
                         "are redone")
                append_jsonl(self.out / METRICS, {"step": self.start_step, "restart": restart,
                                                  "resumed_from": str(ckpt),
                                                  "steps_redone": redone,
                                                  "saved_world_size": saved,
                                                  "world_size": world})

    # -------------------------------------------------------------------------------- loop
    def train(self) -> dict:
        """The loop from the start (or resumed) step to the end, then save and summarise."""
        r, env = self.recipe, self.env
        self.metrics = MetricsLog(self.out / METRICS if env.is_main else None)
        self.trackers = Trackers(r.output.report_to, self.out, self.out.name,
                                 r.model_dump(mode="json"), env.is_main)
        self.progress = Progress(self.total_steps, self.start_step, env.is_main)
        self.last_loss, self.last_eval, self.skipped = float("nan"), None, 0
        self._flops_args = (*self._matmul,
                            getattr(self.model_config, "num_hidden_layers", 0), self.hidden or 0)
        self._peak = peak_flops(env.device, r.model.dtype)
        self.evals.before_training()  # step 0: the baseline eval (not on a resume past it)
        self.saved_step, self.stop_agreed, self.pending = None, False, None
        # from_pretrained returns a model in eval mode: without this, dropout (LoRA's too) and a
        # MoE's router loss stayed off in runs with no eval before the first step
        self.engine.train()
        distributed.STOP.install()  # SIGTERM: finish the step, checkpoint, exit (preempt)
        try:
            for step in range(self.start_step, self.total_steps):
                self.train_one_step(step)
                self.complete_pending()  # handed to the writer before this step: committed
                self.after_step(step + 1)
                if self.stop_agreed and step + 1 < self.total_steps:
                    self.preempt(step + 1)
            self.complete_pending()
        finally:
            distributed.STOP.uninstall()
        self.progress.close()
        self.metrics.close()
        self.trackers.finish()
        return self.finish()

    def train_one_step(self, step: int) -> None:
        r, env = self.recipe, self.env
        C.fault_point("step", step + 1, env.rank)
        t0 = time.perf_counter()
        micro_batches = self.feed.micro_batches(step)
        collate_s = time.perf_counter() - t0
        # What each source gave this step: counted once per sequence-parallel group
        counts = (self.feed.last_counts if self.sp is None or self.sp.rank == 0 else
                  [0] * len(self.feed.last_counts))
        result = train_step(self.engine, micro_batches, env, self.batch.grad_accum,
                            poison_loss=C.fault_requested("nan", step + 1, env.rank),
                            objective=self.objective, gradient_divisor=self.gradient_divisor,
                            stop_vote=distributed.STOP.requested, aux=self.aux, counts=counts)
        if len(result.counts) == len(self.source_counts):
            self.source_counts = [a + b for a, b in zip(self.source_counts, result.counts)]
        self.stop_agreed = result.stop
        result.times["data_s"] += collate_s
        result.times["step_time_s"] += collate_s
        self.last_loss, elapsed = result.loss, result.times["step_time_s"]
        self.tokens_seen += result.tokens
        if not math.isfinite(self.last_loss):
            self.skipped += 1
            handle_non_finite(r, result, step + 1, self.out, self.say)
        self.progress.update(self.last_loss, result.tokens / elapsed,
                             self.objective.progress(result.metrics))
        if (step + 1) % r.output.log_steps == 0 or step + 1 == self.total_steps:
            self._log_step(step, result, elapsed)

    def _log_step(self, step: int, result, elapsed: float) -> None:
        env = self.env
        flops = model_flops(*self._flops_args, result.row_lengths)
        (flops,) = distributed.all_reduce_sum([flops], env.device)
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = result.grad_norm if grad_norm is None else grad_norm
        record = dict(
            step=step + 1, epoch=self.feed.epoch(step), loss=self.last_loss,
            lr=lr_now(self.scheduler),
            grad_norm=float(grad_norm) if grad_norm is not None else None,
            tokens=result.tokens, target_tokens=result.targets, tokens_seen=self.tokens_seen,
            source_tokens_seen=self.source_counts[:len(self.source_counts) // 2],
            source_rows_seen=self.source_counts[len(self.source_counts) // 2:],
            samples=result.samples, tokens_per_s=result.tokens / elapsed,
            samples_per_s=result.samples / elapsed, flops=flops,
            mfu=flops / (elapsed * env.world_size * self._peak) if self._peak else None,
            skipped=not result.applied, skipped_steps=self.skipped, **result.metrics,
            **({"aux_loss": result.aux_loss} if result.aux_loss is not None else {}),
            **result.times)
        record.update(per_rank(memory_mb(env.device), env))
        self.metrics.write(**record)
        self.trackers.log(record, step + 1)
        self.log.info(f"step {step + 1}: loss {self.last_loss:.4f}, "
                      f"{result.tokens / elapsed:,.0f} tokens/s, {elapsed:.3f} s")

    def after_step(self, step: int) -> None:
        """Eval and checkpoint at their steps (`step` counts completed steps)."""
        out = self.recipe.output
        last = step == self.total_steps
        if self.evals.active and ((out.eval_steps and step % out.eval_steps == 0) or last):
            self.run_eval(step)
        if out.save_steps and (step % out.save_steps == 0 or last):
            ckpt = self.save_checkpoint(step)
            if self.recipe.hub is not None and self.recipe.hub.push_checkpoints:
                self.complete_pending()
                push_checkpoint(ckpt, step, self.recipe, self.env, self.say, self.hub_user)

    def run_eval(self, step: int) -> float | None:
        """Eval loss (with eval rows), then generations from the fixed prompts (dpkit/eval)."""
        loss = self.eval_loss(step) if self.eval_rows else None
        self.evals.at_eval(step)
        return loss

    def eval_loss(self, step: int) -> float:
        batches = eval_batches(self.eval_rows, self.dp_rank, self.batch.data_parallel,
                               self.batch.micro_batch_size, self.objective.collate,
                               self.tokenizer.pad_token_id, self.objective.step_examples)
        if self.sp is not None:
            batches = [self.sp.shard(b) for b in batches]
        loss, units, metrics = evaluate(self.engine, batches, self.env, self.objective)
        self.last_eval = loss
        self.metrics.write(step=step, eval_loss=loss, eval_tokens=units,
                           tokens_seen=self.tokens_seen,
                           **{f"eval_{k}": v for k, v in metrics.items()})
        self.trackers.log({"eval_loss": loss, **{f"eval_{k}": v for k, v in metrics.items()}},
                          step)
        self.progress.write(f"[dpkit] step {step}: eval loss {loss:.4f}")
        return loss

    def preempt(self, step_done: int) -> None:
        """Every rank agreed at this step that one got SIGTERM: checkpoint (unless this step's
        regular save just did), leave the marker `dpkit train` turns into the requeue exit code,
        stop. The launcher kills ranks some seconds after SIGTERM (torchrun and the deepspeed
        launcher 30 s; see docs/checkpoints.md): train.preemption_grace_s is what dpkit allows."""
        ckpt = (C.checkpoints_dir(self.out) / C.step_name(step_done)
                if self.saved_step == step_done else self.save_checkpoint(step_done))
        self.complete_pending()
        since = distributed.STOP.requested_at
        took = f" {time.monotonic() - since:.1f} s after SIGTERM" if since is not None else ""
        grace = self.recipe.train.preemption_grace_s
        if self.env.is_main:
            C.mark_preempted(self.out, ckpt)
        self.say(f"[dpkit] preempted: stopped after step {step_done} of {self.total_steps}, "
                 f"checkpoint {ckpt} written{took} (train.preemption_grace_s {grace} s); "
                 "continue with resume=auto")
        self.progress.close()
        self.metrics.close()
        self.trackers.finish()
        raise Preempted(str(ckpt))

    def save_checkpoint(self, step_done: int) -> Path:
        state = C.TrainState(step=step_done, tokens_seen=self.tokens_seen,
                             world_size=self.layout.world_size, zero_stage=self.layout.stage,
                             seed=self.recipe.train.seed, steps_per_epoch=self.per_epoch,
                             data=self.feed.state_dict(), settings=C.data_settings(self.recipe),
                             source_counts=self.source_counts,
                             expert_parallel=self.layout.expert_parallel)
        self.saved_step = step_done
        start = time.perf_counter()
        ckpt = C.save(self.engine, self.out, state, self.tokenizer, self.env,
                      self.recipe.output.save_total_limit, self.objective.state_dict(self.env))
        took = time.perf_counter() - start
        if C.decoupled(self.engine):  # marked COMPLETE once the writer has it on disk
            self.pending = (ckpt, step_done, took)
            self._note(f"[dpkit] step {step_done}: checkpoint {ckpt} handed to the background "
                       f"writer in {took:.2f} s (output.async_save)")
        else:
            self._note(f"[dpkit] step {step_done}: checkpoint {ckpt} (the ranks waited "
                       f"{took:.2f} s for it)")
        return ckpt

    def _note(self, message: str) -> None:
        """In the log, and above the progress bar."""
        self.log.info(message)
        self.progress.write(message)

    def complete_pending(self) -> None:
        """Mark the checkpoint handed to the background writer COMPLETE once its files are on
        disk. DeepSpeed waits for the writer inside the next optimizer step (before the weights
        it reads change), so after that step this does not wait; before a preemption exit, a
        push or the end of training it waits here."""
        if self.pending is None:
            return
        (ckpt, step, hand_off), self.pending = self.pending, None
        before, start = len(self.writer_waits), time.perf_counter()
        C.complete(self.engine, self.out, ckpt, self.env, self.recipe.output.save_total_limit)
        here = time.perf_counter() - start - sum(self.writer_waits[before:])
        writer = sum(self.writer_waits)
        self.writer_waits.clear()
        self._note(f"[dpkit] step {step}: checkpoint {ckpt} complete; the ranks waited "
                   f"{hand_off + writer + here:.2f} s for it (hand-off {hand_off:.2f} s, writer "
                   f"{writer:.2f} s, marking {here:.2f} s)")

    # --------------------------------------------------------------------------------- end
    def finish(self) -> dict:
        r, env, out = self.recipe, self.env, self.out
        if r.output.save_model and r.peft is not None:  # gathered, written, verified
            lora.save_adapter(self.engine, self.tokenizer, out, env, r,
                              trained=self.total_steps > 0)
        elif r.output.save_model:
            save_model(self.engine, self.tokenizer, out / MODEL, env, self.layout,
                       r.train.single_rank_work_timeout_s)
        summary = self.summary()
        summary.update(self.evals.benchmarks())  # lm-eval on the saved model, rank 0
        if env.is_main:
            write_json(out / SUMMARY, summary)
            self.say(f"[dpkit] done: loss {self.last_loss:.4f}"
                     + (f", eval loss {self.last_eval:.4f}" if self.last_eval is not None else "")
                     + f"; run directory {out}")
        if r.hub is not None and r.hub.push_at_end:
            from dpkit.hub import push_on_main

            push_on_main(out, r.hub, is_main=env.is_main, barrier=wait_for_push(r),
                         say=self.say, user=self.hub_user)
        if hasattr(self.engine, "destroy"):
            self.engine.destroy()
        if self.sp is not None:
            self.sp.close()
        logs.teardown()
        return summary

    def summary(self) -> dict:
        r, b, s = self.recipe, self.batch, self.data_stats
        return {
            "steps": self.total_steps, "tokens_seen": self.tokens_seen,
            "final_loss": self.last_loss, "final_eval_loss": self.last_eval,
            "world_size": self.env.world_size, "global_batch_size": b.global_batch_size,
            "micro_batch_size": b.micro_batch_size, "grad_accum": b.grad_accum,
            "sequence_parallel": b.sequence_parallel, "zero_stage": self.layout.stage,
            "dtype": r.model.dtype, "attention": self.attention, **self.objective.card(),
            "method_card": self.objective.card_rows(), "head": method_spec(r).head,
            "base_model": r.model.name_or_path or "inline config",
            "datasets": [src.path for src in r.data.sources],
            "parameters": self.n_params, "trainable_parameters": self.n_train,
            "data": {"rows": s.rows, "truncated": s.truncated,
                     "dropped_too_long": s.dropped_too_long,
                     "dropped_no_target": s.dropped_no_target, "eval_rows": len(self.eval_rows),
                     "prompt_truncated": s.prompt_truncated,
                     "dropped_identical": s.dropped_identical,
                     "prompts_extracted": s.prompts_extracted, "mixture": r.data.mixture,
                     "sources": source_summary(r.data.sources, s.sources, self.source_counts)},
            **self.evals.summary(),
            "wall_time_s": time.time() - self.started, "versions": versions(),
            "hardware": hardware(self.env),
        }


def run(recipe: Recipe, hub_user: UserChoice | None = None) -> dict:
    """Train one recipe on the ranks of this job; returns the summary (also on disk).
    `hub_user`: the Hub endpoint / token variable the command line named (see hub_schema)."""
    freeze_what_lives_forever()
    return Run(recipe, hub_user).setup().train()


def freeze_what_lives_forever() -> None:
    """Move every object alive now (modules, classes, functions of torch, transformers and
    DeepSpeed: millions, never garbage) out of the garbage collector's reach. DeepSpeed calls
    `gc.collect()` several times per engine (ZeRO-3's defragmentation, each partition-cache
    release), and each full pass walked them all (~0.3 s on 2 cores); now it walks the run's own
    objects. One collection first, so that garbage of an earlier run in this process is freed,
    not frozen."""
    gc.collect()
    gc.freeze()


def push_checkpoint(ckpt: Path, step: int, recipe: Recipe, env, say,
                    hub_user: UserChoice | None = None) -> None:
    """Rank 0 exports the checkpoint to Hugging Face format and pushes it; the others wait."""
    from dpkit.export import export
    from dpkit.hub import push_on_main

    model_dir = ckpt / "hf-export"
    if env.is_main:
        export(ckpt, model_dir, dtype=recipe.model.dtype, overwrite=True)
    push_on_main(Path(recipe.output.dir), recipe.hub, is_main=env.is_main,
                 barrier=wait_for_push(recipe, "export the checkpoint and push it to the Hub"),
                 say=say, model_dir=model_dir, step=step, user=hub_user)


def wait_for_push(recipe: Recipe, what: str = "push the run to the Hub"):
    """How the other ranks wait for rank 0's upload: not a barrier, which a large upload would
    time out (train.collective_timeout_s), but up to train.single_rank_work_timeout_s."""
    return lambda: distributed.wait_for_main(what, recipe.train.single_rank_work_timeout_s)


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


class Preempted(Exception):
    """The ranks stopped on SIGTERM after writing a checkpoint (its path is the message)."""
