"""Evaluation people read: a step-0 baseline, sample generations at every eval, benchmarks.

- schema.py: the recipe's `eval` section (prompts, generation length, lm-eval tasks).
- generate.py: greedy generations from the training engine under any ZeRO stage (under ZeRO-3
  the parameters are gathered once per eval, not once per token) and the prompts they start from.
- evaluator.py: what dpkit/run.py's Run calls — before the first step, at each eval, at the end;
  writes samples.jsonl (named in dpkit/run_files.py, with the run's other files) and TensorBoard
  text.
- harness.py: EleutherAI's lm-eval on the exported model after training (optional: `dpkit[eval]`).
- present.py: samples and scores as Markdown, for `dpkit report` and the model card.

Nothing heavy is imported here: recipe.py imports the schema.
"""
