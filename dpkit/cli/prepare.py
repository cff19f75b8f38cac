"""`dpkit prepare RECIPE [key=value ...]`: tokenize a recipe's data into the cache ahead of a job.

Run it once (e.g. on a login node) before a cluster job: every rank of the job then finds the
tokenized data under `data.cache_dir` and starts training at once. Each source is tokenized once
into its own entry (a source already there, e.g. from a recipe with other weights, is reused).
Prints where each source's entry is and the data report; shows a progress bar while tokenizing.
"""

from __future__ import annotations

import argparse


def cmd_prepare(args) -> int:
    from dpkit.data.cache import entries, load_cached
    from dpkit.methods import spec
    from dpkit.model import load_tokenizer
    from dpkit.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    data = recipe.data
    tokenizer = load_tokenizer(recipe.model)
    kinds = ("eval_sources",) if data.streaming else ("sources", "eval_sources")
    if not any(getattr(data, k) for k in kinds):
        print(f"{args.recipe}: data.streaming reads its sources as streams; nothing to prepare")
        return 0
    options = spec(recipe).options(recipe)  # the method's settings that change the tokens
    _, evals, stats = load_cached(data, tokenizer, recipe.train.seed,
                                  streaming=data.streaming, options=options)
    state = "already prepared" if stats.cached else "prepared"
    for kind, i, source, entry, _ in entries(data, tokenizer, kinds, options):
        print(f"[dpkit] {state}: data.{kind}[{i}] ({source.path}): {entry}")
    print(f"[dpkit] data: {stats.describe()}; eval rows: {len(evals)}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="tokenize a recipe's data into the cache ahead of a job")
    p.add_argument("recipe", help="path to a recipe YAML")
    p.add_argument("overrides", nargs="*", help="recipe overrides, e.g. data.max_seq_len=1024")
    p.set_defaults(func=cmd_prepare)
