"""Waiting for work rank 0 does alone (dpkit.distributed.wait_for_main), not in a barrier.

One real 2-process gloo group (torch.multiprocessing, spawned once for the module) whose
collective timeout is 1.5 s plays the scenes: rank 0 works 3 s and the other rank's
wait_for_main outlasts the timeout; rank 0 works past wait_for_main's bound and the other rank
gives up with one line naming the work; a plain barrier behind the same 3 s of work times out —
what the call sites did before. The call sites are checked in-process: each ends its rank-0-only
work with wait_for_main and the recipe's bound, not with a barrier.
"""

from __future__ import annotations

import datetime
import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_recipe

from dpkit import distributed

COLLECTIVE_TIMEOUT_S = 1.5
WORK_S = 3  # twice the collective timeout


def _scenes(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    # Meet on a store with a long timeout (the two processes start unevenly), then a group whose
    # collectives time out after COLLECTIVE_TIMEOUT_S.
    store = dist.TCPStore("127.0.0.1", port, 2, rank == 0, datetime.timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    said: list[str] = []
    result: dict = {}

    # 1. rank 0 works longer than the collective timeout; the other rank waits it out
    t0 = time.monotonic()
    if rank == 0:
        time.sleep(WORK_S)
    distributed.wait_for_main("convert the checkpoint to the universal format", bound_s=60,
                              every_s=1, say=said.append)
    result["waited_s"] = time.monotonic() - t0
    result["said"] = list(said)
    dist.barrier()  # the group still works afterwards

    # 2. rank 0 works past the bound: the other rank gives up, naming the work, then
    # 3. waits in a plain barrier instead, as the call sites did before: it times out too
    if rank == 0:
        time.sleep(WORK_S)
    try:
        distributed.wait_for_main("merge the LoRA adapter into the base model", bound_s=0.5,
                                  every_s=0.2, say=said.append)
        result["bound_error"] = None
    except distributed.MainWorkTimeout as e:
        result["bound_error"] = str(e)
    try:
        dist.barrier()  # rank 1 arrives at 0.5 s, rank 0 at WORK_S
        result["barrier_error"] = None
    except RuntimeError as e:  # gloo's timeout (a DistBackendError)
        result["barrier_error"] = f"{type(e).__name__}: {e}"
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    os._exit(0)  # the group is broken after a timed-out barrier: no teardown to hang in


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    out = tmp_path_factory.mktemp("wait_for_main")
    torch.multiprocessing.spawn(_scenes, args=(distributed.free_port(), str(out)), nprocs=2)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_the_waiting_rank_outlasts_the_collective_timeout(scenes):
    waiting = scenes[1]
    assert waiting["waited_s"] >= WORK_S - 0.5 > COLLECTIVE_TIMEOUT_S
    assert waiting["said"], "no progress line while waiting"
    assert waiting["said"][0].startswith(
        "[dpkit] rank 1: waiting for rank 0 to convert the checkpoint to the universal format (")
    assert scenes[0]["said"] == []  # rank 0 does not wait


def test_past_the_bound_the_waiting_rank_gives_up_naming_the_work(scenes):
    error = scenes[1]["bound_error"]
    assert error is not None and "\n" not in error
    assert error.startswith("rank 1 gave up waiting for rank 0 to merge the LoRA adapter into the "
                            "base model after 0.5 s (train.single_rank_work_timeout_s)")
    assert scenes[0]["bound_error"] is None


def test_a_plain_barrier_behind_the_same_work_times_out(scenes):
    """What the call sites did before: the waiting rank fails after the collective timeout."""
    assert scenes[1]["barrier_error"] is not None


# ------------------------------------------------------------------------------ call sites
@pytest.fixture
def waits(monkeypatch):
    """Record wait_for_main; a barrier fails the test (it would be bound by the timeout)."""
    calls: list[tuple[str, float]] = []
    monkeypatch.setattr(distributed, "wait_for_main",
                        lambda what, bound_s, **kw: calls.append((what, bound_s)))

    def barrier():
        raise AssertionError("a barrier after rank-0-only work")
    monkeypatch.setattr(distributed, "barrier", barrier)
    return calls


WAITING = SimpleNamespace(is_main=False, rank=1, world_size=2, device=torch.device("cpu"))


def test_the_universal_conversion_waits_for_rank_0_with_the_bound(waits, tmp_path):
    from dpkit import checkpoint as C

    (tmp_path / "universal").mkdir()
    (tmp_path / "universal" / C.MARKER).write_text("universal\n")
    assert C.convert_to_universal(tmp_path, WAITING, 123) == tmp_path / "universal"
    assert waits == [("convert the checkpoint to the universal format", 123)]


def test_the_final_model_save_waits_for_rank_0_with_the_bound(waits, tmp_path):
    from dpkit.batch import plan_batch
    from dpkit.engine import save_model
    from dpkit.layout import Layout

    stage_2 = Layout(2, "none", "none", plan_batch(2, 1, 2))  # nothing to consolidate
    save_model(None, None, tmp_path / "model", WAITING, stage_2, 123)
    assert waits == [("write the final model", 123)]


def test_lm_eval_and_the_hub_push_wait_for_rank_0_with_the_bound(waits, monkeypatch):
    from dpkit import run as R
    from dpkit.eval.evaluator import Evaluator

    recipe = SimpleNamespace(train=SimpleNamespace(single_rank_work_timeout_s=123))
    evals = Evaluator.__new__(Evaluator)
    evals.section = SimpleNamespace(tasks=["hellaswag"])
    evals.run = SimpleNamespace(env=WAITING, recipe=recipe)
    assert evals.benchmarks() == {}
    R.wait_for_push(recipe)()
    assert waits == [("run lm-eval on the saved model", 123), ("push the run to the Hub", 123)]


def test_the_bound_is_a_train_key_and_must_be_positive(tmp_path):
    from dpkit.errors import RecipeError
    from dpkit.recipe import recipe_from_dict

    raw = tiny_recipe(tmp_path / "out")
    assert recipe_from_dict(raw).train.single_rank_work_timeout_s == 4 * 3600
    raw["train"]["single_rank_work_timeout_s"] = 0
    with pytest.raises(RecipeError) as e:
        recipe_from_dict(raw)
    assert e.value.problems[0].where == "train.single_rank_work_timeout_s"


def test_a_finished_conversion_is_reused_and_one_cut_short_is_redone(waits, tmp_path,
                                                                     monkeypatch):
    """What a retry finds: the marker, written last, decides (the conversion itself stubbed)."""
    import deepspeed.checkpoint.ds_to_universal as converter

    from dpkit import checkpoint as C

    converted = []

    def convert(args):
        converted.append(args.input_folder)
        Path(args.output_folder).mkdir(parents=True)
    monkeypatch.setattr(converter, "main", convert)
    (tmp_path / "dpkit.json").write_text(json.dumps(asdict(C.TrainState(  # as a save writes it
        step=4, tokens_seen=0, world_size=2, zero_stage=1, seed=0, steps_per_epoch=4))))
    main = SimpleNamespace(is_main=True, rank=0, world_size=2, device=torch.device("cpu"))
    target = C.convert_to_universal(tmp_path, main, 123)
    assert converted == [str(tmp_path / "ds")] and (target / C.MARKER).is_file()
    C.convert_to_universal(tmp_path, main, 123)  # a retry: nothing converted again
    assert len(converted) == 1
    (target / C.MARKER).unlink()  # killed before the marker: the leftover is redone
    (target / "ds" / "half-written").write_text("")
    C.convert_to_universal(tmp_path, main, 123)
    assert len(converted) == 2 and (target / C.MARKER).is_file()
    assert not (target / "ds" / "half-written").exists()


def test_a_rank_that_gives_up_says_one_line_and_exits_1(tmp_path, monkeypatch, capsys):
    """The rank's entry point turns the give-up into its one line (exit 1, which a supervised
    run may restart), not a traceback."""
    from conftest import write_recipe

    import dpkit.train

    line = ("rank 1 gave up waiting for rank 0 to save the final model after 5 s "
            "(train.single_rank_work_timeout_s) — raise it")

    def gives_up(*args, **kwargs):
        raise distributed.MainWorkTimeout(line)

    monkeypatch.setattr(dpkit.train, "run", gives_up)
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path / "run"))
    assert dpkit.train.main([str(path)]) == 1
    err = capsys.readouterr().err
    assert err == f"error: {line}\n"
