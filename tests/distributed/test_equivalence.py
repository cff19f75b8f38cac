"""Data-parallel equivalence on real ranks, for what the combination matrix (test_matrix.py, every
ZeRO layout × method × LoRA × packing × ...) does not vary: the tiled loss under ZeRO-3, packed
rows, torch.compile'd layers and accumulation splits give the per-step losses of one process."""

from pathlib import Path

import pytest
from conftest import ROOT, tiny_recipe, torchrun, train_losses, write_recipe

pytestmark = pytest.mark.distributed
DRIVER = ROOT / "tests" / "distributed" / "run_recipes.py"
STEPS = 10
TOL = 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("equivalence")
    train = {"max_steps": STEPS, "global_batch_size": 8}
    # One process: the whole global batch in one micro-batch (reference), and two accumulation
    # splits of a global batch of 4.
    single = {
        "reference": tiny_recipe(tmp / "reference", train={**train, "micro_batch_size": 8},
                                 zero={"stage": 0}),
        "micro4_ga1": tiny_recipe(tmp / "micro4_ga1", zero={"stage": 2},
                                  train={**train, "global_batch_size": 4, "micro_batch_size": 4}),
        "micro1_ga4": tiny_recipe(tmp / "micro1_ga4", zero={"stage": 2},
                                  train={**train, "global_batch_size": 4, "micro_batch_size": 1}),
        "packed_reference": tiny_recipe(tmp / "packed_reference", zero={"stage": 0},
                                        data={"packing": True, "max_seq_len": 256},
                                        train={**train, "global_batch_size": 4,
                                               "micro_batch_size": 4}),
    }
    # Two ranks, micro 2 × accumulation 2 × world 2 = 8. Every ZeRO layout against one process is
    # in the combination matrix (test_matrix.py); here what the matrix does not vary.
    double = {}
    # The loss over tiles of 16 tokens (a micro-batch of one tile goes through the full logits,
    # as every other run here does): the head gathered and reduced per call under ZeRO-3.
    double["zero3_tiled"] = tiny_recipe(tmp / "zero3_tiled", zero={"stage": 3},
                                        train={**train, "micro_batch_size": 2},
                                        compute={"loss_tile_tokens": 16})
    double["packed_zero2"] = tiny_recipe(tmp / "packed_zero2", zero={"stage": 2},
                                         data={"packing": True, "max_seq_len": 256},
                                         train={**train, "global_batch_size": 4,
                                                "micro_batch_size": 1})
    # Each decoder layer torch.compile'd on 2 ranks (the inductor CPU backend), padded rows: packed
    # rows' per-row attention breaks the graph and recompiles, ~30 s more of C++ builds here.
    double["zero2_compiled"] = tiny_recipe(tmp / "zero2_compiled", zero={"stage": 2},
                                           train={**train, "micro_batch_size": 2, "compile": True})
    for group, nproc in ((single, 1), (double, 2)):
        paths = [str(write_recipe(tmp / f"{name}.yaml", r)) for name, r in group.items()]
        torchrun(nproc, paths, script=DRIVER, timeout=420)
    return {name: tmp / name for name in (*single, *double)}


def test_tiled_loss_under_zero3_matches_one_process(runs):
    reference, got = train_losses(runs["reference"]), train_losses(runs["zero3_tiled"])
    assert "tiled: 16 tokens" in (runs["zero3_tiled"] / "logs" / "rank0.log").read_text()
    assert len(reference) == len(got) == STEPS
    assert max(abs(a - b) for a, b in zip(reference, got)) <= TOL, (reference, got)
    assert got[-1] < got[0] - 0.1  # it learns: equal flat losses would prove nothing


def test_gradient_accumulation_split_does_not_matter(runs):
    a, b = train_losses(runs["micro4_ga1"]), train_losses(runs["micro1_ga4"])
    assert len(a) == len(b) == STEPS
    assert max(abs(x - y) for x, y in zip(a, b)) <= TOL, (a, b)


def test_packed_two_ranks_match_one_process(runs):
    reference, got = train_losses(runs["packed_reference"]), train_losses(runs["packed_zero2"])
    assert len(reference) == len(got) == STEPS
    assert max(abs(a - b) for a, b in zip(reference, got)) <= TOL, (reference, got)


def test_compiled_layers_match_one_eager_process(runs):
    reference = train_losses(runs["reference"])
    got = train_losses(runs["zero2_compiled"])
    log = (runs["zero2_compiled"] / "logs" / "rank0.log").read_text()
    assert "[dpkit] compile: " in log and "[dpkit] compile: 0 modules" not in log, log
    assert len(reference) == len(got) == STEPS
    assert max(abs(a - b) for a, b in zip(reference, got)) <= TOL, (reference, got)
