"""What a Run calls for evaluation (dpkit/run.py): before the first step, at each eval, at the end.

    evals = Evaluator(run)         # after setup: prompts chosen, samples.jsonl trimmed on resume
    evals.before_training()        # step 0: eval loss + generations (not on a resume past 0)
    evals.at_eval(step)            # from Run.run_eval: generations -> samples.jsonl, TensorBoard
    evals.benchmarks()             # rank 0, after the model is saved: lm-eval scores (the
                                   # others wait for it, on every rank)

samples.jsonl holds one line per prompt per eval: {step, index, prompt, completion,
completion_ids}. Rank 0 writes; every rank computes.
"""

from __future__ import annotations

import time

from dpkit import distributed, heads
from dpkit.eval import generate as G
from dpkit.run_files import SAMPLES, append_jsonl, read_metrics, truncate_jsonl


class Evaluator:
    def __init__(self, run):
        self.run = run
        self.section = run.recipe.eval
        self.path = run.out / SAMPLES
        self.baseline_loss: float | None = None
        source = run.recipe.data.sources[0]  # eval.prompts are rendered in its format
        # Sequence parallelism splits each sequence's attention between ranks (a collective per
        # layer): generation, each rank with its own prompt, is not wired for it yet. A model
        # with another head than a causal LM's (a reward model's score) has nothing to generate.
        texts = heads.of_recipe(run.recipe) == "causal_lm"
        generates = self.section.generates and run.batch.sequence_parallel == 1 and texts
        self.prompts = (G.choose_prompts(self.section, source, run.tokenizer, run.eval_rows)
                        if generates else [])
        if self.section.generates and texts and not generates:
            run.say("[dpkit] eval: no generations with sequence parallelism (eval loss only)")
        if run.env.is_main:
            if run.start_step == 0:
                self.path.unlink(missing_ok=True)
            else:  # resumed: the evals after the checkpoint will be written again
                truncate_jsonl(self.path, run.start_step)

    @property
    def active(self) -> bool:
        """Whether evals happen at all: eval rows for the loss, or prompts to generate from."""
        return bool(self.run.eval_rows) or bool(self.prompts)

    def before_training(self) -> None:
        """The step-0 baseline (eval loss of the untouched model, and its answers)."""
        run = self.run
        if self.section.baseline and self.active and run.start_step == 0:
            self.baseline_loss = run.run_eval(0)

    def at_eval(self, step: int) -> None:
        run = self.run
        if not self.prompts:
            return
        tok = run.tokenizer
        t0 = time.perf_counter()
        completions = G.generate(run.engine, self.prompts, run.env, run.layout,
                                 self.section.max_new_tokens, tok.eos_token_id, tok.pad_token_id)
        if completions is None:  # not rank 0
            return
        seconds = time.perf_counter() - t0
        records = []
        for i, (prompt, ids) in enumerate(zip(self.prompts, completions)):
            text = tok.decode(ids, skip_special_tokens=True)
            records.append({"step": step, "index": i, "prompt": prompt.text,
                            "completion": text, "completion_ids": ids})
            run.trackers.log_text(f"samples/{i}", sample_markdown(prompt.text, text), step)
        append_jsonl(self.path, *records)
        run.log.info(f"step {step}: {len(completions)} generations in {seconds:.2f} s")

    def benchmarks(self) -> dict:
        """lm-eval scores of the saved model ({} when no task is named, and on ranks but 0). Call
        on every rank: the others wait for rank 0 here, up to train.single_rank_work_timeout_s,
        not in a later barrier that the collective timeout would end during a long lm-eval."""
        if not self.section.tasks:
            return {}
        result = self._benchmarks() if self.run.env.is_main else {}
        distributed.wait_for_main("run lm-eval on the saved model",
                                  self.run.recipe.train.single_rank_work_timeout_s)
        return result

    def _benchmarks(self) -> dict:
        from dpkit.eval.harness import run_benchmarks

        run = self.run
        run.say(f"[dpkit] lm-eval: {', '.join(self.section.tasks)} on the saved model")
        result = run_benchmarks(run.out, run.recipe, run.env.device)
        scores = result.get("tasks", {})
        run.say("[dpkit] lm-eval: " + ("; ".join(
            f"{task} " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            for task, metrics in scores.items()) or f"failed: {result.get('error')}")
            + f" ({result.get('wall_s', 0):.1f} s)")
        return {"benchmarks": result}

    def summary(self) -> dict:
        loss = self.baseline_loss
        if loss is None and self.run.env.is_main:  # resumed: step 0 was logged by the first run
            loss = baseline_from_metrics(self.run.out)
        return {"baseline_eval_loss": loss, "sample_prompts": len(self.prompts)}


def sample_markdown(prompt: str, completion: str) -> str:
    """One sample for TensorBoard's text tab (Markdown)."""
    quoted = "\n".join(f"> {line}" for line in prompt.splitlines()) or ">"
    return f"{quoted}\n\n{completion or '*(empty)*'}"


def baseline_from_metrics(run_dir) -> float | None:
    records, _ = read_metrics(run_dir)
    return next((r["eval_loss"] for r in records if r.get("step") == 0 and "eval_loss" in r),
                None)
