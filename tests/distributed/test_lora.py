"""LoRA on real ranks. Two launches: 1 process (the reference), then 2 ranks running ZeRO-2,
ZeRO-3, ZeRO-3 on a pretrained base loaded partitioned, and a deliberately broken ZeRO-3 save.

- the per-step losses of every 2-rank run equal the 1-process run (fp32, ≤ 1e-5);
- the adapter saved under ZeRO-3, loaded with PeftModel.from_pretrained onto `<run>/base`,
  reproduces the logits the engine computed at the end of training;
- `<run>/merged` gives base + adapter's logits;
- an adapter written from the ZeRO-3 partitions without gathering is caught and never renamed
  to `model/`.

This file is also the launch driver: `torchrun ... tests/distributed/test_lora.py R1.yaml ...`
trains the recipes one after another, recording the engine's logits on a fixed probe batch just
before the adapter is saved, and swapping in an ungathered save for recipes named `broken*`.
"""

import sys
from pathlib import Path

import pytest
import torch

PROBE = (torch.arange(2 * 16).reshape(2, 16) * 37 + 5) % 2048  # token ids, any fixed batch


def _drive(paths: list[str]) -> None:
    from dpkit import distributed, lora
    from dpkit.recipe import load_recipe
    from dpkit.run import run

    save, gather = lora.save_adapter, lora.gather_adapter_state

    def probing_save(engine, tokenizer, run_dir, env, recipe, trained=True):
        engine.eval()
        with torch.no_grad():
            logits = engine(input_ids=PROBE.to(env.device), use_cache=False).logits.float().cpu()
        engine.train()
        # Adam moments held by the optimizer, over all ranks: the adapters', nothing else.
        inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
        held = sum(s["exp_avg"].numel() for s in inner.state.values() if "exp_avg" in s)
        (held,) = distributed.all_reduce_sum([held], env.device)
        if env.is_main:
            torch.save({"input_ids": PROBE, "logits": logits, "optimizer_state_numel": int(held)},
                       Path(run_dir) / "probe.pt")
        return save(engine, tokenizer, run_dir, env, recipe, trained)

    def ungathered(model):  # the classic mistake: each rank's own ZeRO-3 partition, saved as is
        return {n: getattr(p, "ds_tensor", p).detach().clone()
                for n, p in model.named_parameters() if p.requires_grad}

    lora.save_adapter = probing_save
    for path in paths:
        broken = Path(path).stem.startswith("broken")
        lora.gather_adapter_state = ungathered if broken else gather
        recipe = load_recipe(path)
        try:
            run(recipe)
        except lora.AdapterCheckError as e:
            if not broken:
                raise
            if int(__import__("os").environ.get("RANK", "0")) == 0:
                (Path(recipe.output.dir) / "error.txt").write_text("\n".join([str(e), *e.problems]))


if __name__ == "__main__":
    _drive(sys.argv[1:])
    from dpkit import distributed

    distributed.shutdown()  # a clean end, not the backend's threads torn down at exit
    sys.exit(0)

from conftest import (ROOT, TINY_LLAMA, tiny_recipe, torchrun, train_losses,  # noqa: E402
                      write_recipe)

pytestmark = pytest.mark.distributed
DRIVER = ROOT / "tests" / "distributed" / "test_lora.py"
STEPS, TOL, R = 8, 1e-5, 16  # r = 16 makes lora_A (16 × 32) big enough for ZeRO-3 to partition
PEFT = {"r": R, "alpha": 32, "dropout": 0.0}
TRAIN = {"max_steps": STEPS, "global_batch_size": 8, "micro_batch_size": 2, "lr": 1e-2}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("lora")
    save = {"save_model": True}
    reference = tiny_recipe(tmp / "reference", train={**TRAIN, "micro_batch_size": 8},
                            zero={"stage": 0}, peft=PEFT, output=save)
    pretrained = tiny_recipe(tmp / "zero3_pretrained", train=TRAIN, zero={"stage": 3}, peft=PEFT)
    pretrained["model"] = {"name_or_path": str(tmp / "reference" / "base"), "dtype": "float32"}
    double = {
        "zero2": tiny_recipe(tmp / "zero2", train=TRAIN, zero={"stage": 2}, peft=PEFT),
        "zero3": tiny_recipe(tmp / "zero3", train=TRAIN, zero={"stage": 3},
                             peft={**PEFT, "merge": True}, output={**save, "save_steps": 4}),
        # continues zero3 from its step-4 checkpoint (engine state, LoRA weights and moments)
        "zero3_resumed": {**tiny_recipe(tmp / "zero3_resumed", train=TRAIN, zero={"stage": 3},
                                        peft=PEFT, output=save),
                          "resume": str(tmp / "zero3" / "checkpoints" / "step-00000004")},
        "zero3_pretrained": pretrained,  # loaded partitioned (HfDeepSpeedConfig), then LoRA
        "broken": tiny_recipe(tmp / "broken", train={**TRAIN, "max_steps": 2}, zero={"stage": 3},
                              peft=PEFT, output=save),
    }
    # the step-4 checkpoint of 2-rank zero3, continued on 1 rank (a universal checkpoint)
    resumed_1 = {**tiny_recipe(tmp / "zero3_resumed_1rank", train=TRAIN, zero={"stage": 3},
                               peft=PEFT), "resume": str(tmp / "zero3/checkpoints/step-00000004")}
    out = {}
    for group, nproc in (({"reference": reference}, 1), (double, 2),
                         ({"zero3_resumed_1rank": resumed_1}, 1)):
        paths = [str(write_recipe(tmp / f"{name}.yaml", r)) for name, r in group.items()]
        out[len(out)] = torchrun(nproc, paths, script=DRIVER, timeout=240).stdout
    return {"dir": tmp, "stdout": out}


@pytest.mark.parametrize("name", ["zero2", "zero3", "zero3_pretrained"])
def test_two_ranks_match_one_process(runs, name):
    reference = train_losses(runs["dir"] / "reference")
    got = train_losses(runs["dir"] / name)
    assert len(reference) == len(got) == STEPS
    assert max(abs(a - b) for a, b in zip(reference, got)) <= TOL, (reference, got)
    assert got[-1] < got[0] - 0.05  # the adapters learn, or equal losses would prove nothing


def test_resume_from_a_lora_checkpoint_continues_exactly(runs):
    from safetensors.torch import load_file

    whole = train_losses(runs["dir"] / "zero3")
    resumed = train_losses(runs["dir"] / "zero3_resumed")
    assert len(resumed) == STEPS - 4  # steps 5..8, from the checkpoint taken after step 4
    assert max(abs(a - b) for a, b in zip(whole[4:], resumed)) <= 1e-6, (whole, resumed)
    a, b = (load_file(runs["dir"] / r / "model" / "adapter_model.safetensors")
            for r in ("zero3", "zero3_resumed"))
    assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() <= 1e-6 for k in a)
    # and on another world size, through DeepSpeed's universal checkpoint (frozen base included)
    other = train_losses(runs["dir"] / "zero3_resumed_1rank")
    assert len(other) == STEPS - 4
    assert max(abs(a - b) for a, b in zip(whole[4:], other)) <= 1e-5, (whole, other)


def test_counts_are_printed(runs):
    # TINY_LLAMA, r = 16 on all 7 linear layers of 2 layers: 16,384 adapter parameters (by hand
    # in tests/unit/test_lora.py); the ZeRO-3 runs count partitioned parameters in full.
    total = 149_664 + 16_384
    for stdout in runs["stdout"].values():
        assert f"model: {total:,} parameters, 16,384 trainable" in stdout, stdout[-2000:]
    assert runs["stdout"][1].count("16,384 trainable") == 5


def test_optimizer_state_is_for_the_adapters_only(runs):
    for name in ("reference", "zero3", "zero3_resumed", "broken"):  # ZeRO 0 / 1 rank, 3 / 2
        held = torch.load(runs["dir"] / name / "probe.pt")["optimizer_state_numel"]
        assert 16_384 <= held <= 16_384 + 64, (name, held)  # + ZeRO's alignment padding


def _logits(model, ids):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits.float()


def test_saved_adapter_reproduces_training_logits(runs):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    run = runs["dir"] / "zero3"
    assert not (run / "model.partial").exists()
    saved = load_file(run / "model" / "adapter_model.safetensors")
    # Full shapes, written out by hand for TINY_LLAMA (hidden 32, kv 16, intermediate 64).
    layer = "base_model.model.model.layers.1."
    assert saved[layer + "self_attn.q_proj.lora_A.weight"].shape == (R, 32)
    assert saved[layer + "self_attn.k_proj.lora_B.weight"].shape == (16, R)
    assert saved[layer + "mlp.down_proj.lora_A.weight"].shape == (R, 64)
    assert saved[layer + "mlp.up_proj.lora_B.weight"].shape == (64, R)
    assert len(saved) == 2 * 7 * TINY_LLAMA["num_hidden_layers"]
    assert all(t.any() for k, t in saved.items() if "lora_B" in k)
    probe = torch.load(run / "probe.pt")
    base = AutoModelForCausalLM.from_pretrained(run / "base", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, run / "model")
    got = _logits(model, probe["input_ids"])
    assert got.shape == probe["logits"].shape
    assert (got - probe["logits"]).abs().max() <= TOL
    base_only = _logits(AutoModelForCausalLM.from_pretrained(run / "base"), probe["input_ids"])
    assert (base_only - probe["logits"]).abs().max() > 1e-3  # training changed the logits


def test_merged_model_equals_base_plus_adapter(runs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = runs["dir"] / "zero3"
    ids = torch.load(run / "probe.pt")["input_ids"]
    merged = AutoModelForCausalLM.from_pretrained(run / "merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run / "base"),
                                        run / "model")
    assert (_logits(merged, ids) - _logits(adapted, ids)).abs().max() <= TOL


def test_an_ungathered_zero3_save_is_caught(runs):
    run = runs["dir"] / "broken"
    error = (run / "error.txt").read_text()
    assert "LoRA adapter check failed" in error
    # rank 0's flat half of a 16 × 32 lora_A and of a 16 × 16 k_proj lora_B
    assert "q_proj.lora_A.weight: shape (256,), expected (16, 32) — a ZeRO-3 partition" in error
    assert "k_proj.lora_B.weight: shape (128,), expected (16, 16)" in error, error
    assert not (run / "model").exists() and (run / "model.partial").is_dir()


def test_export_merge_equals_base_plus_adapter(runs, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from dpkit.cli import main

    run = runs["dir"] / "zero3"
    out = tmp_path / "merged"
    assert main(["export", str(run), "--merge", "--out", str(out)]) == 0
    ids = torch.load(run / "probe.pt")["input_ids"]
    merged = AutoModelForCausalLM.from_pretrained(out)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run / "base"),
                                        run / "model")
    assert (_logits(merged, ids) - _logits(adapted, ids)).abs().max() <= TOL
    assert main(["export", str(run), "--merge", "--out", str(out)]) == 2  # not overwritten
