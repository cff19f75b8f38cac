"""dpkit plan: the memory model against the ZeRO paper, DeepSpeed's own estimators, autograd's
saved tensors and PEFT's parameter count; the recommendation and the CLI.

The per-rank element counts of real engines are checked in tests/distributed/test_plan_measured.py.
"""

import argparse
import contextlib
import io
import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from dpkit.errors import RecipeError
from dpkit.plan.memory import (Knobs, ModelShape, Setup, activation_bytes, estimate, model_shape,
                               saved_activations)
from dpkit.cli.plan import parse_size, register
from dpkit.plan.recommend import Hardware, check_fits, plan
from dpkit.recipe import load_recipe, recipe_from_dict
from dpkit.zero import MIN_COMM_BUCKET
from dpkit.shipped import DS_CONFIGS

ROOT = Path(__file__).resolve().parents[2]
LLAMA_8B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
            "vocab_size": 128256, "tie_word_embeddings": False}


def shape_of(total, n_params=100, **dims):
    """A model of `total` parameters in `n_params` equal tensors (for closed-form checks)."""
    dims = {"hidden": 4096, "intermediate": 11008, "layers": 32, "heads": 32, "kv_heads": 32,
            "head_dim": 128, "vocab": 32000, **dims}
    numels = (total // n_params,) * n_params
    return ModelShape(numels, numels, largest_layer=total // n_params, **dims)


def setup(stage, world=64, dtype_bytes=2, offload="none", params="none", knobs=Knobs()):
    return Setup(stage, offload, params, world, 8, dtype_bytes, 1, 2048, knobs=knobs)


# ------------------------------------------------------------------ 1. the ZeRO paper, Table 1
@pytest.mark.parametrize("stage,paper_gb", [(0, 120), (1, 31.4), (2, 16.6), (3, 1.88)])
def test_model_states_reproduce_the_zero_paper(stage, paper_gb):
    # Rajbhandari et al. 2020, Figure 1: Ψ = 7.5B, mixed-precision Adam (K = 12), Nd = 64.
    b = estimate(shape_of(7_500_000_000), setup(stage, world=64, dtype_bytes=2))
    assert float(f"{b.model_states / 1e9:.3g}") == paper_gb


# ------------------------------------------------------- 2. DeepSpeed's own estimator functions
@pytest.fixture(scope="module")
def real_model():
    config = AutoConfig.for_model("llama", hidden_size=256, intermediate_size=688,
                                  num_hidden_layers=2, num_attention_heads=4, vocab_size=8192,
                                  tie_word_embeddings=True)
    torch.manual_seed(0)
    return config, AutoModelForCausalLM.from_config(config)


def printed_gpu_gib(fn, model, **kw):
    """Run a DeepSpeed `*_all_live` estimator and read its per-GPU column (GiB, 2 decimals)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        fn(model, **kw)
    rows = re.findall(r"^\s*([\d.]+)GB \|\s*([\d.]+)GB \| (.*)$", out.getvalue(), re.MULTILINE)
    return {opts.strip(): float(gpu) for _, gpu, opts in rows}


def gpu_model_states(b, phase):
    """GPU bytes of parameters, gradients and optimizer state in one phase (no activations or
    buffers: DeepSpeed's estimators count neither)."""
    return sum(b.on("gpu", phase, c) for c in ("params", "grads", "optim", "step"))


def test_meta_count_matches_deepspeed_count(real_model):
    from deepspeed.runtime.zero.stage3 import model_to_params

    config, model = real_model
    total, largest_layer = model_to_params(model)  # DeepSpeed's count of the real weights
    shape = model_shape(config)  # ours, on the meta device
    assert shape.total == total == sum(p.numel() for p in model.parameters())
    assert shape.largest_layer == largest_layer


QWEN_05B = {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
            "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
            "vocab_size": 151936, "tie_word_embeddings": True}


@pytest.mark.parametrize("cfg,published", [(LLAMA_8B, 8_030_261_248), (QWEN_05B, 494_032_768)])
def test_meta_count_matches_published_parameter_counts(cfg, published):
    # the counts the model cards / safetensors index of Llama-3.1-8B and Qwen2.5-0.5B state
    cfg = dict(cfg)
    assert model_shape(AutoConfig.for_model(cfg.pop("model_type"), **cfg)).total == published


@pytest.mark.parametrize("nodes,gpus", [(1, 8), (2, 8), (4, 4)])
def test_zero2_agrees_with_deepspeed_estimator(real_model, nodes, gpus):
    from deepspeed.runtime.zero.stage_1_and_2 import (
        estimate_zero2_model_states_mem_needs, estimate_zero2_model_states_mem_needs_all_live,
        model_to_params)

    config, model = real_model
    shape, world, psi = model_shape(config), nodes * gpus, model_to_params(model)
    printed = printed_gpu_gib(estimate_zero2_model_states_mem_needs_all_live, model,
                              num_gpus_per_node=gpus, num_nodes=nodes)
    for offload in ("none", "cpu"):
        _, ds_gpu = estimate_zero2_model_states_mem_needs(psi, gpus, nodes, offload == "cpu")
        b = estimate(shape, Setup(2, offload, "none", world, gpus, 2, 1, 128))
        # DeepSpeed: 2Ψ + 18Ψ/N = bf16 weights + per partition 2 (bf16 grads) + 4 (fp32 grads at
        # step) + 4 (fp32 master) + 8 (Adam); with offload only the bf16 weights stay on the GPU.
        # dpkit counts the same at the optimizer step, plus what DeepSpeed's formula leaves out:
        # the bf16 gradient buffer holds a parameter straddling the partition edge whole.
        ours = gpu_model_states(b, "step") - 2 * b.elements("grads", "partition boundary")
        assert ours == pytest.approx(ds_gpu, abs=4 * world)  # ceil vs int() per partition
        shown = [gib for opts, gib in printed.items() if opts.endswith(offload)]
        assert shown == [pytest.approx(ds_gpu / 2**30, abs=0.006)]


def test_zero3_agrees_with_deepspeed_estimator_but_for_the_bf16_partition(real_model):
    from deepspeed.runtime.zero.stage3 import (
        estimate_zero3_model_states_mem_needs, estimate_zero3_model_states_mem_needs_all_live,
        model_to_params)

    config, model = real_model
    psi, largest = model_to_params(model)
    shape, gpus, nodes = model_shape(config), 8, 2
    world = gpus * nodes
    # DeepSpeed's formula has no prefetch bucket and no persistent parameters: turn them off
    # (and a reduce bucket smaller than the largest layer, so its gradient is counted once).
    kn = Knobs(prefetch_bucket_size=0, param_persistence_threshold=0, reduce_bucket_size=1000)
    printed = printed_gpu_gib(estimate_zero3_model_states_mem_needs_all_live, model,
                              num_gpus_per_node=gpus, num_nodes=nodes)
    for opt, par in (("none", "none"), ("cpu", "none"), ("cpu", "cpu")):
        _, ds_gpu, _ = estimate_zero3_model_states_mem_needs(
            psi, largest, gpus, nodes, cpu_offload=opt == "cpu", cpu_offload_params=par == "cpu")
        b = estimate(shape, Setup(3, opt, par, world, gpus, 2, 1, 128, knobs=kn))
        # DeepSpeed adds both phases: the gathered largest layer and its gradient (4 bytes per
        # element) plus the partitioned states. dpkit does the same sum here...
        working = b.elements("params", "gathered") * 2 + b.elements("grads", "in flight") * 2
        assert working == 4 * largest
        states = gpu_model_states(b, "step")  # partition, grads, optimizer, fp32 step grads
        if opt == "none":
            # ...and finds 20 bytes per partitioned element where DeepSpeed's comment lists 18
            # ("2 grads16 + 4 grads32 + 4 params32 + 8 optim"): the bf16 parameter partition
            # (ds_tensor, 2 bytes) is missing from DeepSpeed's sum.
            assert states + working - ds_gpu == pytest.approx(2 * psi / world, abs=8 * world)
        else:
            assert states + working == pytest.approx(ds_gpu, abs=8 * world)
        device = {"none": "none", "cpu": "OffloadDeviceEnum.cpu"}
        key = f"offload_param={device[par]}, offload_optimizer={device[opt]}, zero_init=1"
        assert printed[key] == pytest.approx(ds_gpu / 2**30, abs=0.006)


# ------------------------------------------------------------------------------ activations
def saved_bytes(config, dtype, attn, ckpt, batch=2, seq=40, wrap=lambda m: m):
    """What autograd really keeps for backward: saved tensors' storages, weights excluded."""
    model = wrap(AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn))
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in weights:
            seen[s.data_ptr()] = s.nbytes()
        return t

    x = torch.randint(0, config.vocab_size, (batch, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=x, labels=x, use_cache=False)
    return sum(seen.values())


ACT_MODELS = {  # shapes unlike the ones the coefficients were fitted on
    "llama": dict(model_type="llama", hidden_size=96, intermediate_size=200, num_hidden_layers=3,
                  num_attention_heads=6, num_key_value_heads=3, vocab_size=1000),
    "qwen2": dict(model_type="qwen2", hidden_size=96, intermediate_size=200, num_hidden_layers=3,
                  num_attention_heads=6, num_key_value_heads=2, vocab_size=1000),
    "mistral": dict(model_type="mistral", hidden_size=128, intermediate_size=320,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                    vocab_size=800, head_dim=48),
    "gemma2": dict(model_type="gemma2", hidden_size=96, intermediate_size=200,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=24, vocab_size=1000),  # eager only: four norms, soft-capping
}


@pytest.mark.parametrize("name", sorted(ACT_MODELS))
@pytest.mark.parametrize("dtype,attn,ckpt", [(torch.bfloat16, "sdpa", False),
                                             (torch.float32, "eager", False),
                                             (torch.bfloat16, "sdpa", True)])
def test_activation_formula_matches_autograd(name, dtype, attn, ckpt):
    cfg = dict(ACT_MODELS[name])
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    attn = "eager" if name == "gemma2" else attn  # transformers has no sdpa path for Gemma-2
    measured = saved_bytes(config, dtype, attn, ckpt)
    b = 2 if dtype == torch.bfloat16 else 4
    planned = saved_activations(model_shape(config), Setup(0, "none", "none", 1, 1, b, 2, 40,
                                                           ckpt, attn))
    assert measured <= planned * 1.01 and planned <= measured * 1.08


def test_activation_formula_is_not_low_for_gpt2():
    config = AutoConfig.for_model("gpt2", n_embd=96, n_layer=3, n_head=6, vocab_size=1000,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    measured = saved_bytes(config, torch.bfloat16, "sdpa", False)
    planned = saved_activations(model_shape(config), Setup(0, "none", "none", 1, 1, 2, 2, 40))
    assert measured <= planned <= 1.3 * measured


# -------------------------------------------------------------------------------------- LoRA
def test_lora_count_matches_peft():
    from peft import LoraConfig, get_peft_model

    config = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=160,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=300)
    for targets in (None, ["q_proj", "v_proj"]):
        model = get_peft_model(AutoModelForCausalLM.from_config(config),
                               LoraConfig(r=8, target_modules=targets or "all-linear"))
        shape = model_shape(config, lora_rank=8, lora_targets=targets)
        assert shape.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert shape.total == sum(p.numel() for p in model.parameters())
    with pytest.raises(RecipeError):
        model_shape(config, lora_rank=8, lora_targets=["nope"])


def test_a_score_head_counts_as_peft_trains_it_and_holds_no_vocabulary_logits():
    """A reward model (sequence classification, one label): PEFT's SEQ_CLS trains the score
    layer in full beside the adapters (counted as PEFT counts), `all-linear` leaves it out, and
    the logits the loss sees are one number per token, not the vocabulary's."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    sizes = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=300)
    config, head = AutoConfig.for_model("llama", **sizes), "sequence_classification"
    one_label = AutoConfig.for_model("llama", num_labels=1, **sizes)
    for targets in (None, ["q_proj", "v_proj"]):
        model = get_peft_model(AutoModelForSequenceClassification.from_config(one_label),
                               LoraConfig(r=8, target_modules=targets or "all-linear",
                                          task_type="SEQ_CLS"))
        shape = model_shape(config, lora_rank=8, lora_targets=targets, head=head)
        assert shape.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert shape.total == sum(p.numel() for p in model.parameters())
    full = model_shape(config, head=head)
    assert full.vocab == 1 and model_shape(config).vocab == 300
    setup = Setup(0, "none", "none", 1, 1, 4, 2, 40)
    # per token, 299 outputs fewer: the fp32 log-softmax input kept (4 bytes each) and the
    # logits with their gradient opening the backward (4 + 2·4)
    assert activation_bytes(model_shape(config), setup) - activation_bytes(full, setup) == \
        2 * 40 * (4 + 4 + 2 * 4) * (300 - 1)


@pytest.mark.parametrize("dtype,dropout,targets", [
    (torch.bfloat16, 0.0, None), (torch.bfloat16, 0.05, None), (torch.float32, 0.05, None),
    (torch.bfloat16, 0.05, ["q_proj", "v_proj"]), (torch.float32, 0.0, None)])
def test_lora_activations_match_autograd(dtype, dropout, targets):
    from peft import LoraConfig, get_peft_model

    b = 2 if dtype == torch.bfloat16 else 4
    cfg = dict(ACT_MODELS["llama"])
    kind = cfg.pop("model_type")
    got, plan_ = {}, {}
    for layers in (2, 3):
        config = AutoConfig.for_model(kind, **{**cfg, "num_hidden_layers": layers})
        lora = LoraConfig(r=8, lora_dropout=dropout, target_modules=targets or "all-linear")
        got[layers] = saved_bytes(config, dtype, "sdpa", False,  # (PEFT edits its config)
                                  wrap=lambda m: get_peft_model(m, lora))
        shape = model_shape(config, lora_rank=8, lora_targets=targets, lora_dropout=dropout)
        # CPU's dropout keeps a mask of the input's dtype (4 bytes here), CUDA's a bool
        plan_[layers] = saved_activations(shape, Setup(0, "none", "none", 1, 1, b, 2, 40),
                                          mask_bytes=4)
    # a block: exact; the whole model: a little over, because the first block's input needs no
    # gradient under LoRA (frozen embeddings), so it keeps less than the others
    assert plan_[3] - plan_[2] == pytest.approx(got[3] - got[2], rel=0.01)
    assert got[3] <= plan_[3] <= 1.12 * got[3]


def test_lora_shrinks_optimizer_state():
    config = AutoConfig.for_model(**LLAMA_8B)
    full = estimate(model_shape(config), setup(0, world=8))
    lora = estimate(model_shape(config, lora_rank=16), setup(0, world=8))
    assert lora.gpu("params") >= full.gpu("params")  # frozen base + adapters
    assert lora.gpu("optim") < full.gpu("optim") / 50


# ---------------------------------------------------------------------- recommendation, train
def recipe(tmp_path, **train):
    cfg = tmp_path / "m"
    cfg.mkdir(exist_ok=True)
    (cfg / "config.json").write_text(json.dumps(LLAMA_8B))
    return recipe_from_dict({
        "model": {"name_or_path": str(cfg)},
        "data": {"sources": [{"path": "d.jsonl"}], "max_seq_len": 2048},
        "train": {"global_batch_size": 64, **train}, "zero": {"stage": 0},
        "output": {"dir": str(tmp_path / "out")}})


def test_recommendation_is_fastest_that_fits(tmp_path):
    r = recipe(tmp_path)
    p = plan(r, Hardware(16, 8, 80 * 2**30))
    rec = p.recommended
    assert rec is not None and rec.fits and rec.breakdown.gpu_total <= 80 * 2**30
    by_key = {(o.stage, o.offload_optimizer, o.offload_params): o for o in p.options}
    assert not by_key[(0, "none", "none")].fits  # 8B full fine-tuning: 16 bytes/param > 80 GiB
    assert rec.offload_optimizer == "none" and rec.stage in (1, 2)
    # no fitting option of the same tier has a larger micro batch
    assert all(o.micro_batch <= rec.micro_batch for o in p.options
               if o.fits and o.offload_optimizer == "none" and o.stage < 3)
    # ...and the next larger micro batch of the recommendation does not fit
    bigger = [m for m in (1, 2, 4) if m > rec.micro_batch]
    if bigger:
        again = plan(recipe_from_dict({**r.model_dump(mode="json"), "train": {
            "global_batch_size": 16 * bigger[0]}}), Hardware(16, 8, 80 * 2**30))
        same = [o for o in again.options if (o.stage, o.offload_optimizer) ==
                (rec.stage, rec.offload_optimizer)][0]
        assert same.micro_batch < bigger[0]


def test_lora_comes_from_the_recipe_peft_section(tmp_path):
    raw = recipe(tmp_path).model_dump(mode="json")
    raw["zero"] = {"stage": 2}
    full = recipe_from_dict(raw)
    lora = recipe_from_dict({**raw, "peft": {"r": 16, "target_modules": ["q_proj", "v_proj"]}})
    hw = (1, 1, 40 * 2**30)
    assert check_fits(full, *hw) and not check_fits(lora, *hw)  # 8B: full no, LoRA yes
    assert check_fits(lora, *hw, lora_rank=0)  # explicit arguments win


def test_small_gpus_need_offload_and_tiny_ones_nothing(tmp_path):
    r = recipe(tmp_path)
    p = plan(r, Hardware(2, 2, 24 * 2**30, cpu_memory=1024 * 2**30))
    assert p.recommended is not None and p.recommended.offload_optimizer == "cpu"
    assert plan(r, Hardware(1, 1, 8 * 2**30)).recommended is None


def test_check_fits(tmp_path):
    r = recipe(tmp_path, micro_batch_size=1)
    problems = check_fits(r, 16, 8, 80 * 2**30)
    assert len(problems) == 1 and problems[0].where == "zero.stage"
    assert "zero.stage=" in problems[0].fix and "skip_memory_check" in problems[0].fix
    ok = recipe_from_dict({**r.model_dump(mode="json"), "zero": {"stage": 2}})
    assert check_fits(ok, 16, 8, 80 * 2**30) == []
    too_big = recipe_from_dict({**ok.model_dump(mode="json"), "train": {
        "global_batch_size": 256, "micro_batch_size": 16}})
    [p] = check_fits(too_big, 16, 8, 80 * 2**30)
    assert p.where == "train.micro_batch_size" and "train.micro_batch_size=" in p.fix


def test_custom_template_is_used_for_its_own_choice_only(tmp_path):
    template = json.loads((DS_CONFIGS / "zero3.json").read_text())
    template["zero_optimization"]["reduce_bucket_size"] = 12345
    (tmp_path / "t.json").write_text(json.dumps(template))
    raw = recipe(tmp_path).model_dump(mode="json")
    raw["zero"] = {"stage": 3, "template": str(tmp_path / "t.json")}
    p = plan(recipe_from_dict(raw), Hardware(16, 8, 80 * 2**30))
    buckets = {(o.stage, o.offload_optimizer): o.breakdown.setup.knobs.reduce_bucket_size
               for o in p.options}
    assert buckets[(3, "none")] == 12345  # the template's own choice
    assert buckets[(2, "none")] == max(4096 * 4096, MIN_COMM_BUCKET)  # the "auto" rule


# ------------------------------------------------------------------------------------- CLI
def run_cli(*argv):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["plan", *argv])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = args.func(args)
    return code, out.getvalue()


def test_cli_from_config_json_writes_config_and_command(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_8B))
    code, out = run_cli(str(tmp_path / "config.json"), "--gpus-per-node", "8", "--nodes", "2",
                        "--gpu-memory", "80GB", "--cpu-memory", "1TB", "--nvme",
                        "--write", str(tmp_path / "w"))
    assert code == 0
    assert "recommended: ZeRO-" in out and "global batch" in out and "nvme" in out
    ds = json.loads((tmp_path / "w/ds_config.json").read_text())
    written = load_recipe(tmp_path / "w/recipe.yaml")
    assert ds["zero_optimization"]["stage"] == written.zero.stage
    assert ds["train_micro_batch_size_per_gpu"] == written.train.micro_batch_size
    assert ds["train_batch_size"] == written.train.global_batch_size
    assert "--nnodes 2" in (tmp_path / "w/launch.sh").read_text()


def test_cli_recipe_with_lora_and_overrides(tmp_path):
    r = recipe(tmp_path)
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(r.model_dump(mode="json")))  # JSON is YAML
    code, out = run_cli(str(path), "data.max_seq_len=4096", "--gpus-per-node", "8",
                        "--gpu-memory", "24GB", "--lora-rank", "16")
    assert code == 0 and "LoRA r=16" in out and "4096 tokens" in out
    assert "recipe as written: zero.stage:" in out  # ZeRO-0 full 8B on 24 GB: refused, with a fix
    code, out = run_cli(str(path), "zero.stage=2", "--gpus-per-node", "8", "--gpu-memory", "80GB")
    assert "recipe as written: fits" in out


def test_sizes_and_user_errors(tmp_path):
    assert parse_size("80GB") == parse_size("80GiB") == parse_size("80g") == 80 * 2**30
    assert parse_size("1TB") == 2**40 and parse_size("1.5T") == 1.5 * 2**40
    with pytest.raises(RecipeError):
        parse_size("lots")
    with pytest.raises(RecipeError):
        run_cli("not-a-model")
    r = recipe(tmp_path)
    with pytest.raises(RecipeError, match="train.global_batch_size"):
        plan(recipe_from_dict({**r.model_dump(mode="json"), "train": {"global_batch_size": 12}}),
             Hardware(8, 8, 80 * 2**30))


def test_free_global_batch_is_one_micro_batch_per_data_parallel_rank_under_sequence_parallel(
        tmp_path):
    """The planner's free global batch and the recipe it writes agree with the ranks' batch rule:
    under sequence parallelism the ranks of a group share rows, so micro × data-parallel ranks
    (it was micro × world: accumulation 2 where the plan timed 1)."""
    from dpkit.batch import batch_arithmetic
    from dpkit.plan.recommend import chosen_recipe

    raw = recipe(tmp_path).model_dump(mode="json")
    raw["train"]["sequence_parallel"] = 2
    p = plan(recipe_from_dict(raw), Hardware(8, 8, 80 * 2**30), free_global_batch=True)
    assert any(o.micro_batch for o in p.options)
    for o in (o for o in p.options if o.micro_batch):  # None: fits at no micro batch
        written = batch_arithmetic(chosen_recipe(p, o, True), 8)
        assert (written.grad_accum, o.batch.grad_accum) == (1, 1), o
        assert written.global_batch_size == o.micro_batch * 4 == o.batch.global_batch_size


def test_a_frozen_reference_copy_is_counted_like_the_policy_weights(tmp_path):
    """GRPO's β > 0 under full fine-tuning keeps a frozen copy of the model
    (dpkit/objectives/reference.py): the whole weights per rank under ZeRO 0–2, a partition under
    ZeRO-3 (here no parameter is small enough to persist); nothing else changes."""
    import dataclasses
    import math

    from dpkit.plan.recommend import setup_for

    total = 7_500_000_000
    for stage in (0, 1, 2, 3):
        base = setup(stage)
        plain = estimate(shape_of(total), base)
        ref = estimate(shape_of(total), dataclasses.replace(base, reference_copy=True))
        want = total * 2 if stage < 3 else math.ceil(total / 64) * 2
        assert ref.gpu("params") - plain.gpu("params") == want, stage
        assert ref.gpu("grads", "optim", "activations") == plain.gpu("grads", "optim",
                                                                      "activations")
    raw = recipe(tmp_path).model_dump(mode="json")
    raw.update(objective="grpo", grpo={"beta": 0.1, "rewards": [{"function": "char_share"}]})
    raw["data"]["sources"][0]["format"] = "prompts"
    hw = Hardware(16, 8, 80 * 2**30)
    full = recipe_from_dict(raw)
    lora = recipe_from_dict({**raw, "peft": {"method": "lora", "r": 8}})
    no_kl = recipe_from_dict({**raw, "grpo": {"rewards": [{"function": "char_share"}]}})
    assert setup_for(full, 3, "none", "none", hw, 1, Knobs()).reference_copy
    assert not setup_for(lora, 3, "none", "none", hw, 1, Knobs()).reference_copy  # adapter off
    assert not setup_for(no_kl, 3, "none", "none", hw, 1, Knobs()).reference_copy


def test_run_length_counts_optimizer_steps_of_every_rollout_batch():
    """GRPO's μ (`grpo.iterations`): each global batch gives μ optimizer steps, so a run
    measured in tokens has μ times the steps (and the time table multiplies accordingly)."""
    from dpkit.plan.cost import RunLength

    length = RunLength(tokens=10_000, epochs=3, seq_len=100)
    assert length.steps_for(8) == 13 * 3  # ceil(10000 / 800) batches per epoch
    assert length.steps_for(8, 2) == 13 * 2 * 3
    assert RunLength(steps=50).steps_for(8, 2) == 50  # max_steps counts optimizer steps
