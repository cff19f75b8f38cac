"""The step-time model of `dpkit plan` (dpkit/plan/time.py, calibrate.py, cost.py).

References: the ZeRO paper's per-step communication volumes written out here (Rajbhandari et al.
2020, §7.2: 2Ψ for stages 1–2 like data parallelism, 3Ψ with parameters partitioned), the MFU
metric's own FLOP count on a real model, and a synthetic metrics.jsonl made by a formula.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from transformers import AutoConfig, AutoModelForCausalLM

from dpkit.metrics import matmul_parameters, model_flops
from dpkit.plan.calibrate import WARMUP_STEPS, calibrate
from dpkit.plan.memory import ModelShape, model_shape
from dpkit.plan.recommend import Hardware, knobs, plan, resolved_ds_config
from dpkit.plan.time import (
    DEVICES,
    LINKS,
    Cluster,
    Job,
    comm_time,
    comm_volume,
    flops_per_rank,
    step_time,
    with_world,
)
from dpkit.recipe import recipe_from_dict, recipe_to_yaml

LLAMA_8B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
            "vocab_size": 128256, "tie_word_embeddings": False}
TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 160,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 256, "max_position_embeddings": 256}


def shape(psi: int, trainable: int | None = None) -> ModelShape:
    numels = (psi // 4,) * 4
    train = numels if trainable is None else (trainable,)
    return ModelShape(numels if trainable is None else numels + train, train, psi // 4,
                      hidden=1024, intermediate=4096, layers=8, heads=16, kv_heads=16,
                      head_dim=64, vocab=1000, lora_rank=0 if trainable is None else 8)


def job(stage: int, world: int = 64, accum: int = 1, **kw) -> Job:
    return Job(kw.pop("shape", shape(7_000_000_000)), stage, "none", "none", world, 8, 1, accum,
               2048, 2, **kw)


# ---------------------------------------------------------------- communication volumes
@pytest.mark.parametrize("world", [2, 8, 64, 1024])
@pytest.mark.parametrize("dtype_bytes", [2, 4])
def test_volumes_are_the_zero_papers(world, dtype_bytes):
    psi = 7_000_000_000
    ring = (world - 1) / world  # a ring moves (N−1)/N of a tensor per pass; the paper's Ψ is N→∞
    paper = {0: 2 * psi, 1: 2 * psi, 2: 2 * psi, 3: 3 * psi}  # elements per rank per step
    for stage, elements in paper.items():
        j = replace(job(stage, world), dtype_bytes=dtype_bytes)
        assert comm_volume(j) == pytest.approx(elements * ring * dtype_bytes, rel=1e-12)
    assert comm_volume(job(3, 1)) == 0  # one rank: nothing to talk to


def test_accumulation_and_lora_volumes():
    psi, a = 7_000_000_000, 4
    ring = 63 / 64
    # stages 0–1 reduce once per step; stage 2 reduce-scatters every micro-batch, gathers once;
    # stage 3 gathers twice and reduce-scatters every micro-batch
    assert comm_volume(job(1, accum=a)) == pytest.approx(2 * psi * ring * 2)
    assert comm_volume(job(2, accum=a)) == pytest.approx((a + 1) * psi * ring * 2)
    assert comm_volume(job(3, accum=a)) == pytest.approx(3 * a * psi * ring * 2)
    # LoRA: gradients are the adapters' only; stage 3 still gathers the frozen base
    lora = shape(psi, trainable=20_000_000)
    assert comm_volume(job(2, shape=lora)) == pytest.approx(2 * 20_000_000 * ring * 2)
    assert comm_volume(job(3, shape=lora)) == pytest.approx(
        (2 * lora.total + 20_000_000) * ring * 2)


def test_alpha_beta_ring_time():
    c = Cluster(intra=LINKS["nvlink4"], inter=LINKS["ib200"])
    one_node, two_nodes = job(1, world=8), job(1, world=16)
    bucket = one_node.reduce_bucket
    calls = -(-7_000_000_000 // bucket)
    nv, ib = LINKS["nvlink4"], LINKS["ib200"]
    expect_1 = 2 * 7 / 8 * 7e9 * 2 / nv.bandwidth + calls * 2 * 7 * nv.latency
    # across nodes the node's 8 NICs (one per GPU) carry the rings: 8 × 25 GB/s < NVLink
    expect_2 = 2 * 15 / 16 * 7e9 * 2 / (8 * ib.bandwidth) + calls * 2 * (7 * nv.latency
                                                                       + ib.latency)
    assert comm_time(one_node, c) == pytest.approx(expect_1)
    assert comm_time(two_nodes, c) == pytest.approx(expect_2)
    # fewer NICs than GPUs share the node's bandwidth
    assert comm_time(two_nodes, replace(c, nics_per_node=4)) > comm_time(two_nodes, c)


# ------------------------------------------------------------------------------- FLOPs
@pytest.mark.parametrize("tied", [False, True])
def test_flops_are_the_mfu_metrics(tied):
    config = AutoConfig.for_model(**TINY, tie_word_embeddings=tied)
    model = AutoModelForCausalLM.from_config(config)
    n, t = matmul_parameters(model)
    j = Job(model_shape(config), 2, "none", "none", 1, 1, 3, 2, 100, 4)
    assert flops_per_rank(j) == model_flops(n, t, TINY["num_hidden_layers"],
                                            TINY["hidden_size"], [100] * 6)


def test_lora_flops_are_the_mfu_metrics():
    from peft import LoraConfig, get_peft_model

    config = AutoConfig.for_model(**TINY)
    model = get_peft_model(AutoModelForCausalLM.from_config(config),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    n, t = matmul_parameters(model)
    j = Job(model_shape(config, 4, ["q_proj", "v_proj"]), 2, "none", "none", 1, 1, 1, 1, 50, 4)
    assert flops_per_rank(j) == model_flops(n, t, 2, 64, [50])


# ------------------------------------------------------------------------- calibration
def write_run(tmp_path: Path, world: int, stage: int, efficiency: float, cluster: Cluster):
    """A run directory whose metrics.jsonl comes from the time model's own formula."""
    run = tmp_path / "run"
    run.mkdir()
    r = recipe_from_dict({"model": {"config": TINY, "dtype": "bfloat16",
                                    "tokenizer": "dpkit:tokenizers/tiny-bpe"},
                          "data": {"sources": [{"path": "d.jsonl"}], "max_seq_len": 128},
                          "train": {"global_batch_size": 4 * world, "micro_batch_size": 2},
                          "zero": {"stage": stage}, "output": {"dir": str(run)}})
    (run / "recipe.yaml").write_text(recipe_to_yaml(r))
    (run / "ds_config.json").write_text(json.dumps(resolved_ds_config(r, world, 64)))
    (run / "summary.json").write_text(json.dumps({
        "world_size": world, "zero_stage": stage, "micro_batch_size": 2, "grad_accum": 2,
        "global_batch_size": 4 * world, "dtype": "bfloat16",
        "hardware": f"{world} CPU ranks on x86_64 (2 cores)"}))
    config = AutoConfig.for_model(**TINY)
    model = AutoModelForCausalLM.from_config(config)
    n, t = matmul_parameters(model)
    bucket = knobs(resolved_ds_config(r, world, 64)).reduce_bucket_size
    base = Job(model_shape(config), stage, "none", "none", world, world, 2, 2, 128, 2, bucket)
    lines = []
    for step in range(12):
        rows = [128 - (step * 7 + i * 13) % 40 for i in range(4 * world)]  # packed, not full
        flops = model_flops(n, t, 2, 64, rows)
        j = replace(base, fill=sum(rows) / (4 * world * 128))
        compute = flops / world / (efficiency * DEVICES["cpu-core"].peak_flops)
        comm = comm_time(j, cluster)
        fb = compute + comm - min(cluster.overlap * comm, compute)
        if step < WARMUP_STEPS:
            fb *= 5  # slow first steps: calibration must skip them
        opt = 3e-12 * model_shape(config).trainable / world
        lines.append(json.dumps({"step": step + 1, "flops": flops, "tokens": sum(rows),
                                 "forward_backward_s": fb, "optimizer_s": opt,
                                 "step_time_s": fb + opt + 0.004}))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run


@pytest.mark.parametrize("world,stage", [(1, 2), (4, 3)])
def test_calibration_recovers_a_known_efficiency(tmp_path, world, stage):
    # slow compute, fast links: compute outweighs the communication it hides (the regime where
    # the hidden part, and so the compute, can be told apart from the forward/backward time)
    cluster = Cluster(device=DEVICES["cpu-core"], intra=LINKS["nvlink4"])
    run = write_run(tmp_path, world, stage, 0.37, cluster)
    cal = calibrate(run, cluster)
    assert cal.cluster.device.name == "cpu-core"
    # rows vary step to step, so per-step efficiencies differ only if the FLOPs are miscounted
    assert cal.cluster.efficiency == pytest.approx(0.37, rel=0.02)
    assert cal.cluster.overhead_s == pytest.approx(0.004, rel=1e-6)
    assert cal.cluster.optimizer_s_per_param == pytest.approx(3e-12, rel=1e-9)
    # predicting the run it was calibrated on gives back its median step
    steps = sorted(json.loads(line)["step_time_s"]
                   for line in (run / "metrics.jsonl").read_text().splitlines()[WARMUP_STEPS:])
    assert step_time(cal.job, cal.cluster).step_s == pytest.approx(steps[len(steps) // 2],
                                                                    rel=0.03)


def test_calibration_reads_a_run_whose_last_line_is_half_written(tmp_path):
    """A run killed mid-line (or read while it writes): the torn line is skipped, and the fit is
    the one of the whole lines alone. Before, the calibration reader raised JSONDecodeError."""
    cluster = Cluster(device=DEVICES["cpu-core"], intra=LINKS["nvlink4"])
    run = write_run(tmp_path, 1, 2, 0.37, cluster)
    whole = calibrate(run, cluster)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 13, "flops": 1.5e9, "tokens": 4')
    torn = calibrate(run, cluster)
    assert torn.steps_used == whole.steps_used == 12 - WARMUP_STEPS
    assert torn.cluster == whole.cluster


# ------------------------------------------------------------------ the recommendation
def eight_b(tmp_path) -> object:
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_8B))
    return recipe_from_dict({
        "model": {"name_or_path": str(tmp_path)},
        "data": {"sources": [{"path": "d.jsonl"}], "max_seq_len": 2048},
        "train": {"global_batch_size": 128}, "zero": {"stage": 0},
        # the full-logits head: the micro batches these scenarios were sized with (the tiled
        # loss, on by default, lets ZeRO-3 fit larger ones and win even over slow links)
        "compute": {"loss": "full"},
        "output": {"dir": str(tmp_path / "out")}})


def test_slow_inter_node_link_changes_the_recommendation(tmp_path):
    r, hw = eight_b(tmp_path), Hardware(32, 8, 40 * 2**30, 1024 * 2**30)
    fast = plan(r, hw, cluster=Cluster(inter=LINKS["ib400"]))
    slow = plan(r, hw, cluster=Cluster(inter=LINKS["eth25"]))
    key = lambda o: (o.stage, o.offload_optimizer)
    # the same options fit either way: only time decides
    assert [key(o) for o in fast.options if o.fits] == [key(o) for o in slow.options if o.fits]
    assert key(fast.recommended) == (3, "none")  # ZeRO-3's 3Ψ is cheap over 400 Gb/s ...
    assert key(slow.recommended) == (2, "cpu")  # ... over 25 Gb/s offloading the optimizer wins
    ranked = sorted((o for o in slow.options if o.fits), key=lambda o: -o.time.tokens_per_s)
    assert ranked[0] is slow.recommended


def test_slow_links_make_fewer_nodes_faster():
    """Per GPU, and even in total: one node beats four when the nodes talk over 25 Gb/s."""
    slow = Cluster(inter=LINKS["eth25"])
    base = job(3, world=8)
    one = step_time(with_world(base, 8, 64), slow)
    four = step_time(with_world(base, 32, 64), slow)
    assert four.tokens_per_s < one.tokens_per_s
    fast = Cluster(inter=LINKS["ib400"])
    assert step_time(with_world(base, 32, 64), fast).tokens_per_s > \
        step_time(with_world(base, 8, 64), fast).tokens_per_s


def test_overlap_hides_at_most_the_compute():
    j = job(3, world=64)
    none = step_time(j, Cluster(overlap=0.0))
    full = step_time(j, Cluster(overlap=1.0))
    assert none.exposed_comm_s == pytest.approx(none.comm_s)
    assert full.exposed_comm_s == pytest.approx(max(0.0, full.comm_s - full.compute_s))


def test_cli_time_table_scaling_and_calibrate(tmp_path, capsys):
    from dpkit.cli.main import main

    (tmp_path / "config.json").write_text(json.dumps(LLAMA_8B))
    png = tmp_path / "s.png"
    assert main(["plan", str(tmp_path / "config.json"), "--nodes", "2", "--dataset-tokens",
                 "1000000000", "--price-per-gpu-hour", "2", "--scaling", "1,8,64",
                 "--scaling-plot", str(png), "--inter-node", "ib200"]) == 0
    out = capsys.readouterr().out
    assert "tokens/s" in out and "GPU-h" in out and "cost" in out and "scaling eff." in out
    assert "InfiniBand HDR" in out and png.stat().st_size > 1000
    run = write_run(tmp_path, 1, 2, 0.5, Cluster())
    assert main(["plan", "--calibrate", str(run), "--predict-worlds", "1,2,8"]) == 0
    out = capsys.readouterr().out
    assert "efficiency 50.0%" in out and out.count("\n3     ") == 3


# ------------------------------------------------------------------ preference objectives
def test_forward_flops_equal_a_counted_forward():
    """A frozen reference's forward, as the time model counts it, against torch's FLOP counter
    on a real forward (matmuls and attention scores/values, no mask halving in either)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from dpkit.metrics import forward_flops

    config = AutoConfig.for_model(**TINY, attn_implementation="eager")
    model = AutoModelForCausalLM.from_config(config).eval()
    n, _ = matmul_parameters(model)
    ids = torch.randint(0, TINY["vocab_size"], (3, 40))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=ids)
    # within 0.5%: matmul_parameters counts the norms' weights too (0.3% of this tiny model's
    # 102,720; far less at real widths), as the MFU metric's 2N-per-token convention does
    assert forward_flops(n, 2, 64, [40] * 3) == pytest.approx(counter.get_total_flops(), rel=5e-3)


def preference_recipe(tmp_path, objective: str, lora: bool):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_8B))
    return recipe_from_dict({
        "model": {"name_or_path": str(tmp_path)}, "objective": objective,
        "data": {"sources": [{"path": "p.jsonl", "format": "preference"}], "max_seq_len": 1024},
        "train": {"global_batch_size": 64, "micro_batch_size": 2}, "zero": {"stage": 2},
        **({"peft": {"r": 16}} if lora else {}), "output": {"dir": str(tmp_path / "out")}})


def test_a_pair_is_two_rows_and_adapter_off_adds_a_forward(tmp_path):
    """DPO with LoRA (reference = adapter off): each rank's step computes 2 rows per pair forward
    and backward plus one more forward of them; SimPO (no reference) only the 2 rows per pair.
    Expected compute written out from the FLOP formulas (4N + 2N_trained per token forward and
    backward, 2N forward; attention 12·L·d·len² and a third of it)."""
    from dpkit.plan.recommend import objective_load

    hw = Hardware(8, 8, 80 * 2**30, 1024 * 2**30)
    dpo = preference_recipe(tmp_path, "dpo", lora=True)
    simpo = dpo.model_copy(update={"objective": "simpo"})
    none = {"rollout": None}  # nothing generated
    assert objective_load(dpo) == {"rows_per_item": 2, "reference_forwards": 1, **none}
    assert objective_load(simpo) == {"rows_per_item": 2, "reference_forwards": 0, **none}
    assert objective_load(preference_recipe(tmp_path, "dpo", lora=False)) == \
        {"rows_per_item": 2, "reference_forwards": 0, **none}  # precomputed: before step 1
    c = Cluster()
    speed = c.efficiency * c.device.peak(2)
    seconds = {}
    for name, r in (("dpo", dpo), ("simpo", simpo)):
        p = plan(r, hw, cluster=c)
        o = next(o for o in p.options if (o.stage, o.offload_optimizer) == (2, "none"))
        s = p.shape
        trained = sum(s.trainable_numels)
        n = s.matmul_params + trained
        rows = o.batch.micro_batch_size * o.batch.grad_accum * 2
        tokens, attention = rows * 1024, 12 * s.layers * s.hidden * rows * 1024**2
        flops = (4 * n + 2 * trained) * tokens + attention
        if name == "dpo":
            flops += 2 * n * tokens + attention / 3
        assert o.time.compute_s == pytest.approx(flops / speed, rel=1e-9), name
        assert o.time.tokens == pytest.approx(tokens * 8)  # all ranks' rows of 1024
        seconds[name] = o.time.compute_s
    assert 1.45 < seconds["dpo"] / seconds["simpo"] < 1.55  # ~+50% with LoRA, not +33%


def test_precomputed_reference_is_in_the_run_time(tmp_path, capsys):
    from dpkit.cli.main import main
    from dpkit.metrics import forward_flops

    r = preference_recipe(tmp_path, "dpo", lora=False)  # full fine-tuning: precomputed
    path = tmp_path / "dpo.yaml"
    path.write_text(recipe_to_yaml(r))
    tokens = 200_000_000
    assert main(["plan", str(path), "--gpus-per-node", "8", "--gpu", "H100",
                 "--dataset-tokens", str(tokens)]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("reference log-probs before step 1"))
    shape = plan(r, Hardware(8, 8, 80 * 2**30, None)).shape
    seconds = forward_flops(shape.matmul_params, shape.layers, shape.hidden,
                            [1024] * (tokens // 1024 + 1)) / (8 * 0.4 * DEVICES["H100"].peak(2))
    assert f"{seconds / 60:,.1f} min" in line or f"{seconds / 3600:,.1f} h" in line, line
    # steps: the dataset's tokens in rows of 1024, two rows per pair, 64 pairs per step
    assert f"{-(-tokens // (64 * 2 * 1024)):,}" in out


# ------------------------------------------------------------------------------- rollouts
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("stage", [2, 3])
def test_rollout_memory_and_time_are_the_formula_written_out(batched, stage):
    """GRPO's generation, by hand: a rank's P prompts × G completions of C tokens after Lp
    prompt tokens. Fast (batched): one call of P·G sequences; reproducible: P calls of G.
    KV cache = 2 · layers · kv_heads · head_dim · sequences · (Lp + C) · bytes. Per call:
    prefill 2N·seqs·Lp FLOPs at the efficiency; C decode steps each reading all weights and the
    cache so far (Σ_t seqs·kv·(Lp + t)) at the HBM bandwidth, or 2N·seqs FLOPs at the peak,
    whichever is slower; plus the launch overhead per layer and token. ZeRO-3: one all-gather of
    the weights per rollout (and the gathered weights held)."""
    from dpkit.plan.memory import ROLLOUT, Rollout, Setup, estimate
    from dpkit.plan.time import DECODE_STEP_OVERHEAD_S_PER_LAYER, matmul_params, rollout_time

    s = model_shape(AutoConfig.for_model(**LLAMA_8B))
    G, Lp, C, micro, accum, world, b = 8, 200, 500, 2, 3, 16, 2
    prompts = micro * accum
    r = Rollout(G, Lp, C, batched)
    seqs, calls = (prompts * G, 1) if batched else (G, prompts)
    kv_per_token = 2 * 32 * 8 * 128 * b  # Llama 8B: 32 layers, 8 KV heads of 128
    # memory: the KV cache of one call's sequences at full length, in the rollout phase only
    setup = Setup(stage, "none", "none", world, 8, b, micro * G, 1024, rollout=r,
                  rollout_prompts=prompts)
    br = estimate(s, setup)
    held = {p.item: p for p in br.parts if p.category == "rollout"}
    assert held["KV cache"].bytes == kv_per_token * seqs * (Lp + C)
    assert held["logits"].bytes == seqs * 128256 * (b + 4 + 16)
    assert all(p.phases == {ROLLOUT} for p in held.values())
    assert ("gathered weights" in held) == (stage == 3)
    without = estimate(s, replace(setup, rollout=None))
    assert br.on("gpu", "backward") == without.on("gpu", "backward")  # nothing else moved
    assert br.on("gpu", ROLLOUT) == (without.on("gpu", "backward") + sum(
        p.bytes for p in held.values()) - sum(p.bytes for p in without.parts
                                              if p.phases == {"backward"}))
    # time
    cluster = Cluster()
    j = replace(job(stage, world=world, accum=accum, shape=s, rollout=r), micro_batch=micro)
    n = matmul_params(s)[0]
    hbm, peak = cluster.device.memory_bandwidth, cluster.device.peak(b)
    prefill = 2 * n * seqs * Lp / (cluster.efficiency * peak)
    reads = sum(s.total * b + seqs * kv_per_token * (Lp + t) for t in range(1, C + 1)) / hbm
    decode = max(reads, C * 2 * n * seqs / peak)
    overhead = C * 32 * DECODE_STEP_OVERHEAD_S_PER_LAYER
    gather = 0.0
    if stage == 3:
        bandwidth, latency = cluster.ring(world, 8)
        gather = (world - 1) / world * s.total * b / bandwidth + latency
    want = calls * (prefill + decode + overhead) + gather
    assert rollout_time(j, cluster) == pytest.approx(want, rel=1e-12)
    # μ = 2 (grpo.iterations): two optimizer steps share one rollout
    mu2 = replace(j, rollout=replace(r, every=2))
    assert rollout_time(mu2, cluster) == pytest.approx(want / 2, rel=1e-12)
    st = step_time(j, cluster)
    assert st.rollout_s == pytest.approx(want, rel=1e-12)
    assert st.step_s == pytest.approx(step_time(replace(j, rollout=None), cluster).step_s + want)
    # at these sizes decode is memory-bound, and the reproducible mode reads every weight once
    # per prompt: P times the fast mode's reads
    assert reads > C * 2 * n * seqs / peak


def test_plan_of_a_grpo_recipe_counts_its_rollout(tmp_path):
    """`dpkit plan` on a GRPO recipe: the rollout's memory is in the totals and the fast mode
    generates one batch (a larger KV cache) in less time than the reproducible one."""
    r = {"model": {"config": LLAMA_8B, "tokenizer": "dpkit:tokenizers/tiny-bpe",
                   "dtype": "bfloat16", "gradient_checkpointing": True},
         "objective": "grpo",
         "grpo": {"group_size": 8, "max_completion_len": 512,
                  "rewards": [{"function": "math_answer"}]},
         "data": {"sources": [{"path": "dpkit:data/letters.prompts.jsonl",
                               "format": "prompts"}], "max_seq_len": 1024},
         "train": {"global_batch_size": 64, "micro_batch_size": 1},
         "zero": {"stage": 3}, "peft": {"method": "lora", "r": 16},
         "output": {"dir": str(tmp_path / "run")}}
    hw = Hardware(8, 8, 80 * 2**30)
    plans = {}
    for mode in ("fast", "reproducible"):
        r["grpo"]["rollout"] = mode
        plans[mode] = plan(recipe_from_dict(r), hw)
    fast, repro = (plans[m].recommended for m in ("fast", "reproducible"))
    kv = {m: next(p.bytes for p in plans[m].recommended.breakdown.parts if p.item == "KV cache")
          for m in plans}
    assert kv["fast"] == 8 * kv["reproducible"]  # 8 prompts per rank, generated at once
    assert fast.time.rollout_s < repro.time.rollout_s
    assert fast.breakdown.setup.rollout.batched and not repro.breakdown.setup.rollout.batched
