"""Sequence parallelism (DeepSpeed Ulysses) on real gloo ranks: 1 data-parallel × 2
sequence-parallel ranks, and 2 × 2 on 4 ranks, give the per-step losses of one process on the
same global batch and initial weights — unpacked and packed rows, LoRA, and a run resumed from a
sequence-parallel checkpoint on another world size. Three launches (1, 2 and 4 ranks)."""

from pathlib import Path

import pytest
from conftest import ROOT, read_metrics, tiny_recipe, torchrun, train_losses, write_recipe

pytestmark = pytest.mark.distributed
DRIVER = ROOT / "tests" / "distributed" / "run_recipes.py"
STEPS = 5
TOL = 1e-5
# 4 heads, 2 key/value heads: sequence-parallel 2 splits both
TRAIN = {"max_steps": STEPS, "global_batch_size": 4, "lr": 5e-3, "lr_schedule": "constant"}
PACKED = {"packing": True, "max_seq_len": 256}
LORA = {"r": 4, "alpha": 8, "dropout": 0.0}


def _recipes(tmp: Path) -> dict[str, dict[str, dict]]:
    def r(name, micro, sp=1, resume=None, **sections):
        train = {**TRAIN, "micro_batch_size": micro, "sequence_parallel": sp,
                 **({"lr": 5e-2} if "peft" in sections else {})}
        recipe = tiny_recipe(tmp / name, train=train, **sections)
        return {**recipe, "resume": resume} if resume else recipe

    return {
        # one process (ZeRO-1 on one rank: the same numbers as no ZeRO)
        "1": {"reference": r("reference", 4, zero={"stage": 1}),
              "packed_reference": r("packed_reference", 4, zero={"stage": 1}, data=PACKED),
              "lora_reference": r("lora_reference", 4, zero={"stage": 1}, peft=LORA)},
        "2": {"sp2": r("sp2", 2, sp=2, zero={"stage": 2}),
              "sp2_packed": r("sp2_packed", 1, sp=2, zero={"stage": 2}, data=PACKED),
              "sp2_packed_zero3": r("sp2_packed_zero3", 1, sp=2, zero={"stage": 3}, data=PACKED),
              "sp2_lora": r("sp2_lora", 2, sp=2, zero={"stage": 2}, peft=LORA),
              "sp2_saved": r("sp2_saved", 4, sp=2, zero={"stage": 2},
                             output={"save_steps": 2, "save_model": True})},
        "4": {"dp2_sp2": r("dp2_sp2", 1, sp=2, zero={"stage": 2}),
              "dp2_sp2_packed": r("dp2_sp2_packed", 1, sp=2, zero={"stage": 1}, data=PACKED),
              # the 2-rank run's step-2 checkpoint, resumed on 4 ranks (data-parallel 2 × 2)
              "resumed": r("resumed", 1, sp=2, zero={"stage": 2},
                           resume=str(tmp / "sp2_saved" / "checkpoints" / "step-00000002"))},
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("seqpar")
    groups = _recipes(tmp)
    for nproc, group in groups.items():
        paths = [str(write_recipe(tmp / f"{name}.yaml", r)) for name, r in group.items()]
        torchrun(int(nproc), paths, script=DRIVER, timeout=600)
    return {name: tmp / name for group in groups.values() for name in group}


def _same(reference, got):
    assert len(reference) == len(got) == STEPS, (reference, got)
    assert max(abs(a - b) for a, b in zip(reference, got)) <= TOL, (reference, got)
    assert got[-1] < got[0] - 0.03  # it learns: equal flat losses would prove nothing


@pytest.mark.parametrize("reference,name", [("reference", "sp2"), ("reference", "dp2_sp2"),
                                            ("packed_reference", "sp2_packed"),
                                            ("packed_reference", "dp2_sp2_packed"),
                                            ("lora_reference", "sp2_lora")])
def test_sequence_parallel_matches_one_process(runs, reference, name):
    _same(train_losses(runs[reference]), train_losses(runs[name]))


def test_zero3_sequence_parallel_matches_one_process(runs):
    """ZeRO-3 divides the summed gradients by every rank, not by world / S as ZeRO 1-2 do
    (dpkit.parallel.sequence.gradient_divisor). Before dpkit scaled for it, Adam hid the S-times
    smaller gradient but for a 2.6e-5 drift after 5 steps; the gradient norms show it at once."""
    _same(train_losses(runs["packed_reference"]), train_losses(runs["sp2_packed_zero3"]))


@pytest.mark.parametrize("reference,name", [("reference", "sp2"), ("reference", "dp2_sp2"),
                                            ("packed_reference", "sp2_packed_zero3"),
                                            ("packed_reference", "dp2_sp2_packed"),
                                            ("lora_reference", "sp2_lora")])
def test_gradient_norms_are_one_processs(runs, reference, name):
    """The first step's gradient norm (before the weights differ): what clipping acts on. Adam's
    update barely depends on the gradient's scale, so the losses alone would not catch a
    gradient S times too small."""
    want, got = (read_metrics(runs[n])[0]["grad_norm"] for n in (reference, name))
    assert got == pytest.approx(want, rel=1e-4), (reference, name, want, got)


def test_counters_count_each_row_once(runs):
    """Slices of one row are not counted as rows of their own."""
    one, split = read_metrics(runs["reference"]), read_metrics(runs["dp2_sp2"])
    for a, b in zip(one, split):
        assert (a["samples"], a["target_tokens"]) == (b["samples"], b["target_tokens"]), (a, b)


def test_saved_run_and_its_exported_model(runs):
    """The 2-rank run that checkpoints equals one process, and its final model (gathered from
    ZeRO partitions, Hugging Face format) loads."""
    from transformers import AutoModelForCausalLM

    _same(train_losses(runs["reference"]), train_losses(runs["sp2_saved"]))
    model = AutoModelForCausalLM.from_pretrained(runs["sp2_saved"] / "model")
    assert model.config.num_attention_heads == 4


def test_resume_on_another_world_size_continues_the_same_losses(runs):
    """The 2-rank (1 × 2) step-2 checkpoint resumed on 4 ranks (2 × 2): steps 3-5 equal one
    process's."""
    expected = train_losses(runs["reference"])[2:]
    got = train_losses(runs["resumed"])
    assert len(got) == STEPS - 2
    assert max(abs(a - b) for a, b in zip(expected, got)) <= TOL, (expected, got)
