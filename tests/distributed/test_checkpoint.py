"""Checkpoints on real ranks: crashes (a rank SIGKILLed between steps and in the middle of a
checkpoint write), automatic restarts (train.max_restarts), preemption (SIGTERM: checkpoint, exit
code 143), exact resume, resume on another world size and ZeRO stage, export, the keep-limit,
and a dead rank ending the job quickly.

Everything is compared with an uninterrupted run of the same recipe ("U"; "D" with dropout for
the crash chain). Every run trains on a data mixture — three sources weighted 5:3:2, drawn until
each has run out (dpkit/data/mixture.py) — so the crash chain and the resumes on another world
size or stage are also those of a mixture, whose in-memory position is the step."""

import json
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch
from conftest import (
    ALPACA,
    MESSAGES,
    ROOT,
    rank_env,
    read_metrics,
    tiny_recipe,
    torchrun,
    train_losses,
    write_recipe,
)
from safetensors.torch import load_file

from dpkit.checkpoint import MARKER, complete_checkpoints, latest_complete
from dpkit.distributed import EXIT_REQUEUE
from dpkit.export import consolidated_state_dict, export
from dpkit.model import build_model
from dpkit.recipe import load_recipe

pytestmark = pytest.mark.distributed
DRIVER = ROOT / "tests" / "distributed" / "run_recipes.py"
TRAIN = {"max_steps": 8, "global_batch_size": 8, "micro_batch_size": 2, "weight_decay": 0.1,
         "lr_schedule": "cosine", "warmup_ratio": 0.2}


MIXTURE = {"mixture": "all_exhausted", "max_seq_len": 128, "sources": [
    {"path": str(ALPACA), "format": "alpaca", "max_rows": 40, "weight": 5},
    {"path": str(MESSAGES), "format": "messages", "max_rows": 30, "weight": 3},
    {"path": str(ALPACA), "format": "text", "columns": {"text": "output"}, "max_rows": 10,
     "weight": 2}]}


def recipe(tmp: Path, name: str, stage=2, save_steps=2, dropout=0.0, tied=False,
           **extra) -> Path:
    r = tiny_recipe(tmp / name, train={**TRAIN, **extra.pop("train", {})}, zero={"stage": stage},
                    output={"save_steps": save_steps, "save_model": True, **extra.pop("output", {})},
                    data=MIXTURE)
    r["model"]["config"]["attention_dropout"] = dropout  # > 0: resume must restore the RNG
    r["model"]["config"]["tie_word_embeddings"] = tied
    r.update(extra)
    return write_recipe(tmp / f"{name}.yaml", r)


def dpkit_train(path: Path, *overrides: str, fault: str | None = None):
    env = {**rank_env(), **({"DPKIT_FAULT": fault} if fault else {})}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "dpkit.cli", "train", str(path), *overrides],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    proc.ended = time.time()  # to compare with the ranks' log times
    return proc, time.monotonic() - start


def logged_at(run: Path, text: str) -> float:
    """When rank 0 first logged a line containing `text` (its log's clock, this machine's)."""
    line = next(line for line in (run / "logs" / "rank0.log").read_text().splitlines()
                if text in line)
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("checkpoints")
    # Uninterrupted references (one 2-rank launch): D is what the crash chain must reproduce
    # (with dropout, so the RNG streams must resume exactly too), U what resuming on another
    # world size or stage must (without: each rank's RNG stream can't follow its rows there).
    references = [recipe(tmp, "U"), recipe(tmp, "D", dropout=0.2),
                  recipe(tmp, "E0", stage=0, save_steps=2, train={"max_steps": 2}),
                  recipe(tmp, "E3", stage=3, save_steps=2, train={"max_steps": 2},
                         tied=True),  # one parameter under two names, gathered once on save
                  recipe(tmp, "L", save_steps=1, output={"save_total_limit": 2}),
                  # ZeRO-3 saving in the background (output.async_save): the same run as Z3
                  recipe(tmp, "Z3", stage=3), recipe(tmp, "A", stage=3,
                                                     output={"async_save": True})]
    torchrun(2, [str(p) for p in references], script=DRIVER, timeout=300)

    # The crash chain of one run K, three `dpkit train`s: rank 1 killed at step 3 (the job
    # ends); preempted: SIGTERM to `dpkit train` as step 3 starts (and to rank 1, as a scheduler
    # signals every process of a job); with train.max_restarts, rank 1 killed while writing the
    # step-4 checkpoint (the launcher left alive): the group restarts by itself and finishes.
    k = recipe(tmp, "K", dropout=0.2)
    chain = [dpkit_train(k, fault="kill@step:3:1"),
             dpkit_train(k, "resume=auto", fault="term@step:3:1"),
             dpkit_train(k, "resume=auto", "train.max_restarts=2", fault="kill@save:4:1")]

    # Another world size and stage: U's step-4 checkpoint on 1 rank and under ZeRO-3, and a
    # 1-rank run's checkpoint on 2 ranks.
    u4 = str(tmp / "U" / "checkpoints" / "step-00000004")
    torchrun(1, [str(recipe(tmp, "W21", resume=u4)), str(recipe(tmp, "S1"))], script=DRIVER)
    s1_4 = str(tmp / "S1" / "checkpoints" / "step-00000004")
    a4 = str(tmp / "A" / "checkpoints" / "step-00000004")
    torchrun(2, [str(recipe(tmp, "W12", resume=s1_4)),
                 str(recipe(tmp, "S23", stage=3, resume=u4)),
                 str(recipe(tmp, "AR", stage=3, resume=a4, output={"async_save": True}))],
             script=DRIVER)
    return tmp, chain


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model" / "model.safetensors")


def test_killed_rank_ends_the_job_quickly_and_says_where_to_resume(runs):
    tmp, chain = runs
    proc, _ = chain[0]
    assert proc.returncode != 0
    # From rank 1's death (as step 3 starts) to the job's end: not the collective timeout (600 s).
    # Counted from the kill, not the launch: start-up alone took 60-100 s on a loaded 2-core CI.
    after_kill = proc.ended - logged_at(tmp / "K", "step 2: loss")
    assert after_kill < 60, after_kill
    assert "rank      : 1" in proc.stderr and "SIGKILL" in proc.stderr  # launcher: who failed
    ckpt = tmp / "K" / "checkpoints" / "step-00000002"
    assert f"last complete checkpoint: {ckpt}" in proc.stderr
    assert "resume=auto" in proc.stderr


def test_preempted_run_writes_a_checkpoint_and_asks_for_a_requeue(runs):
    tmp, chain = runs
    proc, _ = chain[1]
    assert proc.returncode == EXIT_REQUEUE == 143, proc.stderr[-3000:]
    ckpt = tmp / "K" / "checkpoints" / "step-00000003"  # not a save step: written on SIGTERM
    assert (ckpt / MARKER).is_file()
    assert "[dpkit] preempted: stopped after step 3 of 8" in proc.stdout
    assert f"checkpoint {ckpt} written; exit code 143 asks for a requeue" in proc.stderr
    # From the resumed ranks' start of training (step 3 is the first, and SIGTERM comes with it)
    # to the job's end: within the grace period (25 s) plus teardown, counted from the ranks'
    # log rather than the launch, whose start-up alone took 60-100 s on a loaded 2-core CI.
    after_start = proc.ended - logged_at(tmp / "K", "resumed from")
    assert 0 < after_start < 60, after_start


def test_dead_rank_restarts_the_group_from_the_last_complete_checkpoint(runs):
    tmp, chain = runs
    proc, _ = chain[2]
    assert proc.returncode == 0, proc.stderr[-3000:]
    step3 = tmp / "K" / "checkpoints" / "step-00000003"
    # Rank 1 died after writing its files for step 4 but before COMPLETE: the restart takes the
    # preemption's step-3 checkpoint (checkpoints/latest), not the torn step-4 one.
    assert "restart 1 of 2 (train.max_restarts)" in proc.stderr
    assert proc.stdout.count(f"[dpkit] resumed from {step3} at step 3") == 2  # attempts 0, 1
    assert f"[dpkit] restart 1: resumed from {step3} at step 3; 1 steps" in proc.stdout
    assert "restart 2 of 2" not in proc.stderr  # the fault fires in the first attempt only
    restarts = [m for m in read_metrics(tmp / "K") if "restart" in m]
    assert restarts == [{"step": 3, "restart": 1, "resumed_from": str(step3),
                         "steps_redone": 1, "saved_world_size": 2, "world_size": 2}]


def test_resumed_run_is_bitwise_identical_to_uninterrupted(runs):
    tmp, chain = runs
    assert chain[2][0].returncode == 0, chain[2][0].stderr[-3000:]
    assert train_losses(tmp / "D") != train_losses(tmp / "U")  # dropout is really on
    assert train_losses(tmp / "K") == train_losses(tmp / "D")
    a, b = weights(tmp / "K"), weights(tmp / "D")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sources = [json.loads((tmp / n / "summary.json").read_text())["data"]["sources"]
               for n in ("K", "D")]
    assert sources[0] == sources[1] and all(s["rows_seen"] for s in sources[0])


@pytest.mark.parametrize("name", ["W21", "W12", "S23"])
def test_resume_on_another_world_size_or_stage(runs, name):
    tmp, _ = runs
    expected = train_losses(tmp / "U")[4:]
    got = train_losses(tmp / name)
    assert len(got) == 4
    assert max(abs(a - b) for a, b in zip(expected, got)) <= 1e-5, (expected, got)


def test_universal_conversion_is_cached_beside_the_checkpoint(runs):
    tmp, _ = runs
    assert (tmp / "U" / "checkpoints" / "step-00000004" / "universal" / MARKER).is_file()


def test_keep_limit_keeps_the_newest_complete_checkpoints(runs):
    tmp, _ = runs
    kept = [p.name for p in complete_checkpoints(tmp / "L")]
    assert kept == ["step-00000007", "step-00000008"]
    assert sorted(p.name for p in (tmp / "L" / "checkpoints").iterdir()) == \
        ["latest", "step-00000007", "step-00000008"]
    assert (tmp / "L" / "checkpoints" / "latest").read_text().strip() == "step-00000008"


@pytest.mark.parametrize("name", ["E0", "U", "E3"])
def test_export_matches_the_engine_weights(runs, tmp_path, name):
    from transformers import AutoModelForCausalLM

    tmp, _ = runs
    run = tmp / name
    out = export(latest_complete(run), tmp_path / "export")
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    trained = AutoModelForCausalLM.from_pretrained(run / "model", dtype=torch.float32).eval()
    ids = torch.randint(0, 2048, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (exported(ids).logits - trained(ids).logits).abs().max().item()
    assert diff <= 1e-6
    # ... and both are the trained weights, not the initial ones (an export or a final save that
    # wrote the untouched model would agree with the other just as well): the recipe's own start,
    # built independently here (an inline config: the plain constructor under the seed).
    recipe = load_recipe(tmp / f"{name}.yaml")
    initial = build_model(recipe.model, recipe.train.seed, recipe.zero.stage).float().eval()
    with torch.no_grad():
        moved = (exported(ids).logits - initial(ids).logits).abs().max().item()
    assert moved > 1e-4, moved
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    assert not list(out.glob("*.bin")) and list(out.glob("*.safetensors"))


def save_pretrained_of(ckpt: Path, out: Path, dtype=torch.float32, **kwargs) -> Path:
    """What dpkit saved before it streamed: DeepSpeed's zero_to_fp32 state dict, all in memory
    (for ZeRO 1/2 its in-memory merge), loaded into the model, cast, written by save_pretrained."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    master = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="ds")
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ckpt / "hf"))
    model.load_state_dict(master)
    model.generation_config = GenerationConfig.from_model_config(model.config)
    model.to(dtype).save_pretrained(out, **kwargs)
    return out


@pytest.mark.parametrize("name", ["E3", "U"])
def test_streamed_export_equals_zero_to_fp32_through_save_pretrained(runs, tmp_path, name):
    """E3 is a 2-rank ZeRO-3 checkpoint (tied embeddings), U a ZeRO-2 one. `export` writes them
    one weight at a time (dpkit/consolidate.py: ZeRO-3 through DeepSpeed's lazy tensors, ZeRO-2
    read from the memory-mapped partitions); the reference is the export as it was before
    (save_pretrained_of). Same files and index, bitwise the same tensors, and from_pretrained
    loads the same model."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModelForCausalLM

    tmp, _ = runs
    ckpt = latest_complete(tmp / name)
    master = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="ds")
    ids = torch.randint(0, 2048, (2, 24), generator=torch.Generator().manual_seed(0))
    for dtype in (torch.float32, torch.bfloat16):
        dname = str(dtype).split(".")[1]
        out = export(ckpt, tmp_path / dname, dtype=dname, max_shard_size="100KB")
        reference = save_pretrained_of(ckpt, tmp_path / f"reference-{dname}", dtype,
                                       max_shard_size="100KB")
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert index == json.loads((reference / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1  # several shards
        for file in ("config.json", "generation_config.json"):
            assert json.loads((out / file).read_text()) == json.loads((reference / file)
                                                                        .read_text())
        files = sorted(p.name for p in reference.glob("*.safetensors"))
        assert sorted(p.name for p in out.glob("*.safetensors")) == files
        for f in files:
            a, b = load_file(out / f), load_file(reference / f)
            assert a.keys() == b.keys()
            assert all(a[k].dtype == dtype and torch.equal(a[k], b[k]) for k in a)
            if dtype == torch.float32:  # and the master weights themselves
                assert all(torch.equal(a[k], master[k]) for k in a)
        loaded, expected = (AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
                            for d in (out, reference))
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, expected(ids).logits)


@pytest.mark.parametrize("name", ["E3", "U"])
def test_final_save_equals_save_pretrained_of_the_trained_model(runs, tmp_path, name):
    """The run's own model/ (dpkit/engine.py: E3's ZeRO-3 parameters gathered one at a time on
    both ranks, written by rank 0 one tensor at a time; U's ZeRO-2 module written tensor by
    tensor) is the file save_pretrained writes of the whole trained model, byte for byte: on the
    CPU in fp32 the live weights are the master weights of the last checkpoint, taken at the
    last step."""
    tmp, _ = runs
    run = tmp / name
    ckpt = latest_complete(run)
    assert json.loads((ckpt / "dpkit.json").read_text())["step"] == \
        load_recipe(tmp / f"{name}.yaml").train.max_steps
    reference = save_pretrained_of(ckpt, tmp_path / "reference")
    saved = run / "model"
    assert (saved / "model.safetensors").read_bytes() == \
        (reference / "model.safetensors").read_bytes()
    assert json.loads((saved / "config.json").read_text()) == \
        json.loads((reference / "config.json").read_text())
    assert not (saved / "model.safetensors.index.json").exists()  # save_pretrained's 50GB shards


def test_background_saves_complete_after_their_files_and_resume_bitwise(runs):
    """A saves through DeepSpeed's decoupled writer (output.async_save): its losses are Z3's
    (same recipe, saving in the foreground); each checkpoint is marked COMPLETE only after the
    writer's files are on disk (the first save's writer is still starting up when the ranks hand
    the state over, so a marker written at hand-off would be seconds older than them); the
    checkpoint read back equals the trained model; and AR, resumed from A's step 4 with the
    writer on too, continues bitwise: losses and final weights."""
    tmp, _ = runs
    a = tmp / "A"
    assert json.loads((a / "ds_config.json").read_text())["checkpoint"]["writer"] == \
        {"type": "python", "decoupled": True}
    log = (a / "logs" / "rank0.log").read_text()
    assert "step 2: checkpoint" in log and "handed to the background writer" in log
    assert train_losses(a) == train_losses(tmp / "Z3")
    saved = complete_checkpoints(a)
    assert [p.name for p in saved] == [f"step-{s:08d}" for s in (2, 4, 6, 8)]
    assert (a / "checkpoints" / "latest").read_text().strip() == "step-00000008"
    for ckpt in saved:
        files = [f for f in (ckpt / "ds").iterdir()]
        assert len(files) == 4  # model states and optimizer partition of each of 2 ranks
        assert (ckpt / MARKER).stat().st_mtime >= max(f.stat().st_mtime for f in files)
    final = weights(a)
    written = consolidated_state_dict(saved[-1])
    assert final.keys() <= written.keys()
    assert all(torch.equal(final[k], written[k]) for k in final)
    assert train_losses(tmp / "AR") == train_losses(a)[4:]
    resumed = weights(tmp / "AR")
    assert resumed.keys() == final.keys() and all(torch.equal(resumed[k], final[k])
                                                  for k in final)


# ----------------------------------------------------------------------- elastic: a node dies
ELASTIC_RDZV = "last_call_timeout=5,keep_alive_interval=1,keep_alive_max_attempt=2,read_timeout=300"
"""Torch's defaults wait 30 s for more nodes once MIN are there and drop a silent node after
3 missed 5 s heartbeats; here 5 s and 2 × 1 s (read_timeout: node 1's agent waits for node 0's
rendezvous while node 0 still checks the recipe)."""
ELASTIC_WEIGHT_TOLERANCE = 1e-5
"""Measured 3.1e-7 (embeddings; weights up to 1.0): 30× that, and 300× less than what one
optimizer step moves a weight by (up to lr = 3e-3), so a step lost, trained twice or on other
rows fails it."""


@pytest.fixture(scope="module")
def node_death(runs):
    """U's recipe as two one-rank "nodes" on this machine, each its own `dpkit train --nodes 1:2`
    (torchrun's c10d rendezvous, train.max_restarts 1); node 1's whole launch — `dpkit train`,
    torchrun and its rank — SIGKILLed as step 4 of 8 starts, as when a machine goes away. Node 0
    goes on alone: its ranks fail on the dead peer, its agent meets again without node 1 and the
    rank resumes from step 2's checkpoint on 1 rank through the universal format."""
    from dpkit.distributed import free_port

    tmp, _ = runs
    # collective_timeout_s: a bound on anything that would wait for the dead node (not the
    # data order, so resume compares it with nothing)
    n = recipe(tmp, "N", train={"max_restarts": 1, "collective_timeout_s": 120})
    cmd = [sys.executable, "-m", "dpkit.cli", "train", str(n), "--nodes", "1:2",
           "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port",
           str(free_port()), "--rdzv-conf", ELASTIC_RDZV]
    start = time.monotonic()
    # Node 1 first: its agent waits for node 0's rendezvous, which then sees both within the
    # last call (started together, the two checks of the recipe could end seconds apart).
    log = tmp / "N-node1.log"  # a file, not a pipe nobody reads while it runs
    with log.open("w") as out:
        dead = subprocess.Popen([*cmd, "--node-rank", "1"], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT,
                                env={**rank_env(), "DPKIT_FAULT": "killnode@step:4:*"})
    try:
        _wait_for_child(dead, "torch.distributed.run")
        survivor = subprocess.run([*cmd, "--node-rank", "0"], cwd=ROOT, env=rank_env(),
                                  capture_output=True, text=True, timeout=400)
        survivor.seconds = time.monotonic() - start
        dead.wait(timeout=60)
    finally:
        if dead.poll() is None:
            _kill_tree(dead.pid)
    dead.output = log.read_text()
    return tmp, survivor, dead


def _kill_tree(pid: int) -> None:
    import psutil

    root = psutil.Process(pid)
    for p in [root, *root.children(recursive=True)]:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def _wait_for_child(proc: subprocess.Popen, name: str, timeout: float = 180) -> None:
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if any(name in " ".join(p.cmdline()) for p in psutil.Process(proc.pid).children()):
            return
        time.sleep(0.2)
    raise AssertionError(f"no {name} under {proc.args} (exit code {proc.poll()})")


def test_dead_node_the_survivor_resumes_alone_through_the_universal_format(node_death):
    tmp, survivor, dead = node_death
    assert dead.returncode == -9, dead.output[-3000:]
    assert survivor.returncode == 0, survivor.stdout[-3000:] + survivor.stderr[-5000:]
    step2 = tmp / "N" / "checkpoints" / "step-00000002"
    out = survivor.stdout
    assert f"[dpkit] restart 1: resumed from {step2} at step 2 on 1 ranks (saved by 2); 1 " \
           "steps done before the failure are redone" in out, out[-3000:]
    assert (step2 / "universal" / MARKER).is_file()  # converted once, marked, kept for next time
    restarts = [m for m in read_metrics(tmp / "N") if "restart" in m]
    assert restarts == [{"step": 2, "restart": 1, "resumed_from": str(step2), "steps_redone": 1,
                         "saved_world_size": 2, "world_size": 1}]
    summary = json.loads((tmp / "N" / "summary.json").read_text())
    assert summary["world_size"] == 1
    # From the death (as step 4 starts, right after step 3's line) to the resumed rank: a
    # heartbeat timeout (2 × 1 s), the last call (5 s), starting the rank and the conversion.
    gap = logged_at(tmp / "N", "[dpkit] restart 1: resumed") - logged_at(tmp / "N", "step 3: loss")
    print(f"node death to resumed training: {gap:.1f} s; the whole launch {survivor.seconds:.0f} s")
    assert 0 < gap < 120, gap


def test_dead_node_run_ends_where_the_uninterrupted_two_rank_run_does(node_death):
    """Steps 1-2 ran on the same 2 ranks as U: bitwise. Steps 3-8 ran on 1 rank with twice the
    accumulation (the global batch and its rows are the same): the same sums in another order,
    so fp32 rounding only (no dropout here: each rank's dropout stream cannot follow its rows to
    another world size, as in test_resume_on_another_world_size_or_stage)."""
    tmp, survivor, _ = node_death
    assert survivor.returncode == 0, survivor.stderr[-3000:]
    expected, got = train_losses(tmp / "U"), train_losses(tmp / "N")
    assert len(got) == 8 and got[:2] == expected[:2]
    assert max(abs(a - b) for a, b in zip(expected[2:], got[2:])) <= 1e-5, (expected, got)
    a, b = weights(tmp / "N"), weights(tmp / "U")
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= ELASTIC_WEIGHT_TOLERANCE, worst

