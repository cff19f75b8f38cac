"""Test driver (tests/distributed/test_reward.py), one launch: build a score model from a causal
LM checkpoint under ZeRO stages 0-3 and save its score layer as each built it (rank 0; under
ZeRO-3 gathered from the partitions), then train the recipes given one after another.

Usage: reward_runs.py CAUSAL_LM_DIR OUT_DIR RECIPE...  (the first recipe gives seed, data, batch)
"""

import sys
from pathlib import Path

import torch

from dpkit import distributed
from dpkit.model import build_model, load_tokenizer
from dpkit.recipe import load_recipe
from dpkit.run import run
from dpkit.zero import resolve_ds_config

if __name__ == "__main__":
    causal, out, recipes = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    first = load_recipe(recipes[0])
    env = distributed.setup(first.train.collective_timeout_s)
    section = first.model.model_copy(update={"config": None, "name_or_path": str(causal)})
    pad = load_tokenizer(first.model).pad_token_id
    for stage in (0, 1, 2, 3):
        r = first.model_copy(update={"zero": first.zero.model_copy(update={"stage": stage})})
        ds_config = resolve_ds_config(r, env.world_size, 32, on_cpu=True)
        model = build_model(section, first.train.seed, stage, ds_config,
                            head="sequence_classification", pad_token_id=pad)
        weight = model.score.weight
        if hasattr(weight, "ds_id"):  # ZeRO-3: each rank holds a slice; gather to read it
            import deepspeed

            with deepspeed.zero.GatheredParameters([weight]):
                value = weight.detach().clone()
        else:
            value = weight.detach().clone()
        if env.is_main:
            torch.save({"weight": value, "partitioned": hasattr(weight, "ds_id")},
                       out / f"score-init-z{stage}.pt")
        del model
    for path in recipes:
        run(load_recipe(path))
    distributed.shutdown()
