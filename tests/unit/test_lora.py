"""LoRA pieces that need no ranks: the peft section, `all-linear` per architecture (against names
written out by hand and against PEFT's own resolution), the adapter check catching broken saves,
parameter counts and optimizer contents, merging, and QLoRA refused before launch on CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, TINY_LLAMA, tiny_recipe, write_recipe
from safetensors.torch import load_file, save_file

from dpkit import lora
from dpkit.cli import main as cli_main
from dpkit.errors import RecipeError
from dpkit.preflight import check_recipe
from dpkit.recipe import PeftSection, recipe_from_dict
from dpkit.engine import build_optimizer

R = 4
LLAMA_LINEAR = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
# Tiny configs of other families, and the linear layers (except the head) each has, by hand.
FAMILIES = {
    "llama": (dict(TINY_LLAMA), LLAMA_LINEAR),
    "qwen2": ({"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "vocab_size": 128}, LLAMA_LINEAR),
    "gpt_neox": ({"model_type": "gpt_neox", "hidden_size": 32, "intermediate_size": 64,
                  "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 128},
                 ["dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value"]),
    "phi": ({"model_type": "phi", "hidden_size": 32, "intermediate_size": 64,
             "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 128},
            ["dense", "fc1", "fc2", "k_proj", "q_proj", "v_proj"]),
    "gpt2": ({"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "vocab_size": 128},
             ["c_attn", "c_fc", "c_proj"]),  # Conv1D layers
}


def plain_model(config: dict, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(config)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))


def peft_model(config: dict = TINY_LLAMA, section: PeftSection | None = None, seed: int = 0):
    from peft import LoraConfig, get_peft_model

    section = section or PeftSection(r=R, dropout=0.0)
    model = plain_model(config, seed)
    lc = LoraConfig(r=section.r, lora_alpha=section.alpha, lora_dropout=section.dropout,
                    target_modules=lora.resolve_targets(model, section),
                    modules_to_save=section.modules_to_save or None, task_type="CAUSAL_LM")
    torch.manual_seed(seed)
    return get_peft_model(model, lc)


def pretend_trained(model) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)


def save(model, out: Path, base: str | None = None) -> Path:
    state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    lora.write_adapter(model, state, out, base)
    return out


def llama_config():
    cfg = dict(TINY_LLAMA)
    from transformers import AutoConfig

    return AutoConfig.for_model(cfg.pop("model_type"), **cfg)


# ------------------------------------------------------------------------------------- recipe
def test_peft_section_parses_and_refuses_mistakes(tmp_path):
    recipe = recipe_from_dict(tiny_recipe(tmp_path, peft={"r": 8, "target_modules": ["q_proj"]}))
    assert recipe.peft.r == 8 and recipe.peft.target_modules == ["q_proj"]
    assert recipe.peft.method == "lora" and recipe_from_dict(tiny_recipe(tmp_path)).peft is None
    assert PeftSection().target_modules == "all-linear"
    for bad, where in (({"rank": 8}, "peft.rank"), ({"target_modules": []}, "peft"),
                       ({"method": "dora"}, "peft.method"), ({"r": 0}, "peft.r")):
        with pytest.raises(RecipeError) as e:
            recipe_from_dict(tiny_recipe(tmp_path, peft=bad))
        assert e.value.problems[0].where.startswith(where), e.value


# --------------------------------------------------------------------------------- all-linear
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_all_linear_picks_every_linear_layer_but_the_head(family):
    config, expected = FAMILIES[family]
    model = plain_model(config)
    assert lora.linear_module_names(model) == expected
    # The modules the adapter lands on are exactly those PEFT's own "all-linear" picks.
    ours = peft_model(config, PeftSection(r=R))
    from peft import LoraConfig, get_peft_model

    theirs = get_peft_model(plain_model(config), LoraConfig(r=R, target_modules="all-linear"))
    wrapped = [{n for n, m in pm.named_modules() if hasattr(m, "lora_A")} for pm in (ours, theirs)]
    assert wrapped[0] == wrapped[1] and wrapped[0]
    head = "embed_out" if family == "gpt_neox" else "lm_head"
    assert not any(n.endswith(head) for n in wrapped[0])


def test_target_problems_name_the_key_and_suggest():
    model = lora.meta_model(llama_config())
    problems = lora.target_problems(model, PeftSection(target_modules=["q_prj", "v_proj"],
                                                       modules_to_save=["lm_hed"]))
    assert [p.where for p in problems] == ["peft.target_modules", "peft.modules_to_save"]
    assert "q_prj" in problems[0].message and "q_proj" in problems[0].fix
    assert not lora.target_problems(model, PeftSection(modules_to_save=["lm_head"]))


# ------------------------------------------------------------------------------ build & count
def test_build_is_seeded_counts_are_right_and_optimizer_holds_adapters_only(tmp_path):
    recipe = recipe_from_dict(tiny_recipe(tmp_path, peft={"r": 16, "dropout": 0.0},
                                          zero={"stage": 0}))
    env = SimpleNamespace(is_main=True, local_rank=0)
    a = lora.build_peft_model(recipe, None, None, tmp_path, env)
    b = lora.build_peft_model(recipe, None, None, tmp_path, env)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb), na
    trainable, total = lora.count_parameters(a)
    # Hand count for TINY_LLAMA (hidden 32, intermediate 64, kv 2 × head 8 = 16), r = 16:
    # q, o: 16·32 + 32·16; k, v: 16·32 + 16·16; gate, up: 16·32 + 64·16;
    # down: 16·64 + 32·16.
    per_layer = 2 * 1024 + 2 * 768 + 2 * 1536 + 1536
    assert trainable == 2 * per_layer == 16384
    assert total == sum(p.numel() for p in plain_model(TINY_LLAMA).parameters()) + trainable
    opt = build_optimizer(a, recipe)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for n, p in a.named_parameters() if "lora_" in n}
    assert all(g["params"] for g in opt.param_groups)


# ------------------------------------------------------------------------------ adapter check
def test_a_good_adapter_passes_and_reloads(tmp_path):
    model = peft_model()
    pretend_trained(model)
    out = save(model, tmp_path / "adapter")
    section = PeftSection(r=R, dropout=0.0)
    assert lora.verify_adapter(out, llama_config(), section) == []
    # Independent expectation for one layer: q_proj A is r × hidden, k_proj B is kv-dim × r.
    saved = load_file(out / lora.ADAPTER_WEIGHTS)
    assert saved["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (R, 32)
    assert saved["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"].shape == (16, R)
    assert len(saved) == 2 * 7 * 2


def broken_copy(src: Path, dst: Path, edit) -> Path:
    import shutil

    shutil.copytree(src, dst)
    tensors = load_file(dst / lora.ADAPTER_WEIGHTS)
    edit(tensors)
    save_file(tensors, dst / lora.ADAPTER_WEIGHTS)
    return dst


def test_the_check_catches_every_kind_of_broken_adapter(tmp_path):
    model = peft_model()
    pretend_trained(model)
    good = save(model, tmp_path / "good")
    cfg, section = llama_config(), PeftSection(r=R, dropout=0.0)
    key_a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    key_b = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"

    def empty(t):  # what ZeRO-3 leaves in a partitioned parameter's .data
        t[key_a] = torch.empty(0)

    def shard(t):  # one rank's flat partition
        t[key_a] = t[key_a].flatten()[: t[key_a].numel() // 2].clone()

    def zero_b(t):
        t[key_b] = torch.zeros_like(t[key_b])

    def missing(t):
        del t[key_b]

    for name, edit, needle in (("empty", empty, "shape (0,), expected (4, 32) — a ZeRO-3"),
                               ("shard", shard, "shape (64,), expected (4, 32)"),
                               ("zero_b", zero_b, f"{key_b}: all zeros after training"),
                               ("missing", missing, f"{key_b}: missing")):
        problems = lora.verify_adapter(broken_copy(good, tmp_path / name, edit), cfg, section)
        assert len(problems) == 1 and needle in problems[0], (name, problems)
    # Untrained adapters are fine when nothing was trained, caught when something was.
    fresh = save(peft_model(), tmp_path / "fresh")
    assert lora.verify_adapter(fresh, cfg, section, trained=False) == []
    assert len(lora.verify_adapter(fresh, cfg, section, trained=True)) == 2 * 7
    # A recipe rank that differs from the saved one: every tensor and the config disagree.
    assert len(lora.verify_adapter(good, cfg, PeftSection(r=R + 1))) == 2 * 7 * 2 + 1


def test_modules_to_save_and_embedding_targets_are_checked(tmp_path):
    section = PeftSection(r=R, dropout=0.0, target_modules=["q_proj", "embed_tokens"],
                          modules_to_save=["lm_head"])
    model = peft_model(section=section)
    pretend_trained(model)
    with torch.no_grad():
        model.base_model.model.model.embed_tokens.lora_embedding_B["default"].normal_()
    out = save(model, tmp_path / "adapter")
    expected = lora.expected_adapter_shapes(llama_config(), section)
    assert expected["base_model.model.lm_head.weight"] == (2048, 32)
    assert expected["base_model.model.model.embed_tokens.lora_embedding_A"] == (R, 2048)
    assert lora.verify_adapter(out, llama_config(), section) == []


# ------------------------------------------------------------------------------------ merging
def test_merge_adapter_equals_base_plus_adapter(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir = tmp_path / "run" / "base"
    plain_model(TINY_LLAMA).save_pretrained(base_dir)
    model = peft_model()
    pretend_trained(model)
    adapter = save(model, tmp_path / "run" / "model", base=str(base_dir))
    ids = torch.randint(0, 2048, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir),
                                              adapter).eval()(input_ids=ids).logits
        base_only = AutoModelForCausalLM.from_pretrained(base_dir).eval()(input_ids=ids).logits
    assert (reference - base_only).abs().max() > 1e-3  # the adapter changes something
    recipe = recipe_from_dict(tiny_recipe(tmp_path / "run", peft={"r": R}))
    for source, out in ((None, "from_config"), (base_dir, "from_dir"), (recipe, "from_recipe")):
        merged_dir = lora.merge_adapter(source, adapter, tmp_path / out)
        assert not (tmp_path / f"{out}.partial").exists()
        merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
        assert not any("lora" in n for n, _ in merged.named_parameters())
        with torch.no_grad():
            assert (merged(input_ids=ids).logits - reference).abs().max() <= 1e-5, out


# ------------------------------------------------------------------ a sequence-classification head
def test_a_score_head_is_trained_in_full_checked_and_merged_with_one_label(tmp_path):
    """A reward model's adapter (PEFT task type SEQ_CLS): `all-linear` leaves the score layer to
    PEFT, which trains and saves it whole; the check expects it; a merge onto the causal LM the
    run started from gives a one-label model with the tokenizer's pad token, scoring as base +
    adapter do."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from dpkit import heads
    from dpkit.model import load_tokenizer
    from dpkit.recipe import ModelSection

    head = "sequence_classification"
    base_dir = tmp_path / "base"
    plain_model(TINY_LLAMA).save_pretrained(base_dir)  # a causal LM checkpoint: no score layer
    tok = load_tokenizer(ModelSection(config={"model_type": "llama"}, tokenizer=str(
        ROOT / "dpkit" / "resources" / "tokenizers" / "tiny-bpe")))
    config = heads.configure(llama_config(), head, tok.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config)
    assert lora.linear_module_names(model) == LLAMA_LINEAR  # not `score`
    section = PeftSection(r=R, dropout=0.0)
    adapted = get_peft_model(model, LoraConfig(r=R, target_modules=LLAMA_LINEAR,
                                               task_type=lora.TASK_TYPES[head]))
    pretend_trained(adapted)
    with torch.no_grad():
        heads.score_layer(adapted).modules_to_save["default"].weight.normal_(0, 0.5)
    out = save(adapted, tmp_path / "model", base=str(base_dir))
    tok.save_pretrained(out)
    expected = lora.expected_adapter_shapes(llama_config(), section, head=head)
    assert expected["base_model.model.score.weight"] == (1, 32)
    assert lora.verify_adapter(out, llama_config(), section, head=head) == []
    # The causal-LM view of the same adapter does not hold a score layer: the check says so.
    assert lora.verify_adapter(out, llama_config(), section) == [
        "base_model.model.score.weight: not part of this adapter"]
    merged_dir = lora.merge_adapter(None, out, tmp_path / "merged")
    merged = AutoModelForSequenceClassification.from_pretrained(merged_dir).eval()
    assert merged.config.num_labels == 1 and merged.config.pad_token_id == tok.pad_token_id
    assert AutoTokenizer.from_pretrained(merged_dir).pad_token_id == tok.pad_token_id
    ids = torch.randint(2, 2048, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = PeftModel.from_pretrained(heads.base_for_adapter(base_dir, out),
                                              out).eval()(input_ids=ids).logits
        assert (merged(input_ids=ids).logits - reference).abs().max() <= 1e-5
        assert reference.abs().max() > 1e-2  # the trained score layer, not a zero one


# -------------------------------------------------------------------------------------- QLoRA
def test_qlora_is_refused_before_launch_on_cpu(tmp_path, capsys):
    raw = tiny_recipe(tmp_path / "out", peft={"method": "qlora"})
    report = check_recipe(recipe_from_dict(raw), 2, on_cpu=True, check_data=False)
    assert [p.where for p in report.problems] == ["peft.method"]
    assert "CUDA" in report.problems[0].message
    path = write_recipe(tmp_path / "qlora.yaml", raw)
    assert cli_main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: peft.method:") and "Traceback" not in err


def test_preflight_reports_a_bad_target_once_with_the_fix(tmp_path):
    raw = tiny_recipe(tmp_path / "out", peft={"target_modules": ["q_proj", "vproj"]})
    report = check_recipe(recipe_from_dict(raw), 2, on_cpu=True, check_data=False)
    assert [str(p) for p in report.problems] == [
        "peft.target_modules: `vproj` matches no module of this llama model — did you mean "
        "`v_proj`?"]


def test_quickstart_lora_recipe_validates():
    path = ROOT / "recipes" / "quickstart" / "instruct-lora-zero3.yaml"
    recipe = recipe_from_dict(__import__("yaml").safe_load(path.read_text()))
    assert recipe.peft is not None and recipe.zero.stage == 3
    report = check_recipe(recipe.model_copy(update={"output": recipe.output.model_copy(
        update={"dir": "/nonexistent/dpkit-lora-check"})}), 2, on_cpu=True, check_data=False)
    assert report.problems == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA needs a CUDA device")
def test_qlora_trains_on_one_gpu(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_qlora_check.py"),
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=900,
                          cwd=ROOT)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0 and result["ok"], (result, proc.stderr[-3000:])

