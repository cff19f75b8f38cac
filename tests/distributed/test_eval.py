"""Evaluation on real ranks, all in ONE 2-rank launch (tests/distributed/run_recipes.py):

- ZeRO-3 (parameters gathered once per eval): the generations written at the last eval equal,
  token for token, greedy `generate` from the exported model loaded with transformers;
- ZeRO-2: the step-0 eval loss equals the loss of the untouched model (the same seeded inline
  config built here, transformers' own loss row by row), and the step-0 answers equal that
  model's greedy answers; samples reach TensorBoard's text tab;
- LoRA under ZeRO-3: the last answers equal PeftModel(base, saved adapter)'s;
- a resume past step 0 does not repeat the baseline.
"""

import json

import pytest
import torch
from conftest import ALPACA, ROOT, TINY_LLAMA, read_metrics, tiny_recipe, torchrun, write_recipe

from dpkit.data import IGNORE, load_datasets
from dpkit.model import load_tokenizer
from dpkit.recipe import load_recipe

pytestmark = pytest.mark.distributed
DRIVER = ROOT / "tests" / "distributed" / "run_recipes.py"
NEW = 12
PROMPTS = ["Give me three names for a cat.", "What is the capital of France?",
           "Write a haiku about rain."]
ALPACA_DATA = {"sources": [{"path": str(ALPACA), "format": "alpaca"}], "eval_fraction": 0.05}
TRAIN = {"max_steps": 4, "global_batch_size": 8, "micro_batch_size": 2}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    recipes = {
        # prompts from the first 3 eval rows; evals at 0, 2, 4
        "z3": tiny_recipe(tmp / "z3", data=ALPACA_DATA, train=TRAIN, zero={"stage": 3},
                          eval={"max_new_tokens": NEW},
                          output={"eval_steps": 2, "save_model": True}),
        # the recipe's prompts through the chat template (messages data); checkpoint at 2
        "z2": tiny_recipe(tmp / "z2", data={"eval_fraction": 0.05}, train=TRAIN,
                          eval={"prompts": PROMPTS, "max_new_tokens": NEW},
                          output={"eval_steps": 2, "save_steps": 2,
                                  "report_to": ["tensorboard"]}),
        "lora": tiny_recipe(tmp / "lora", data=ALPACA_DATA, train={**TRAIN, "lr": 1e-2},
                            zero={"stage": 3}, peft={"r": 16, "alpha": 32, "dropout": 0.0},
                            eval={"prompts": PROMPTS[:2], "max_new_tokens": NEW},
                            output={"save_model": True}),
    }
    # z2 again in a new directory, continued from its step-2 checkpoint: no second baseline
    recipes["z2_resumed"] = {**recipes["z2"], "resume": str(tmp / "z2/checkpoints/step-00000002"),
                             "output": {**recipes["z2"]["output"], "dir": str(tmp / "z2_resumed"),
                                        "report_to": []}}
    paths = [str(write_recipe(tmp / f"{name}.yaml", r)) for name, r in recipes.items()]
    torchrun(2, paths, script=DRIVER, timeout=600)
    return tmp


def samples(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]


def greedy(model, ids: list[int], tok) -> list[int]:
    inputs = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs),
                             max_new_tokens=NEW, do_sample=False, num_beams=1,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return out[0, len(ids):].tolist()


def prompt_ids(example) -> list[int]:
    """An eval row's tokens before its first trained one (the alpaca prompt)."""
    return example.input_ids[:next(i for i, t in enumerate(example.labels) if t != IGNORE)]


def chat_ids(tok, text: str) -> list[int]:
    rendered = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                       add_generation_prompt=True)
    return tok(rendered, add_special_tokens=False)["input_ids"]


def test_zero3_generations_equal_the_exported_model(runs):
    from transformers import AutoModelForCausalLM

    run = runs / "z3"
    recipe = load_recipe(run / "recipe.yaml")
    tok = load_tokenizer(recipe.model)
    _, evals, _ = load_datasets(recipe.data, tok, recipe.train.seed)
    got = samples(run)
    assert sorted({s["step"] for s in got}) == [0, 2, 4]
    last = sorted((s for s in got if s["step"] == 4), key=lambda s: s["index"])
    assert [s["index"] for s in last] == [0, 1, 2]
    model = AutoModelForCausalLM.from_pretrained(run / "model", dtype=torch.float32).eval()
    for s, example in zip(last, evals):
        expected = greedy(model, prompt_ids(example), tok)
        assert s["completion_ids"] == expected
        assert s["completion"] == tok.decode(expected, skip_special_tokens=True)
    # training changed the answers (or equality with the final model would prove little)
    first = sorted((s for s in got if s["step"] == 0), key=lambda s: s["index"])
    assert [s["completion_ids"] for s in first] != [s["completion_ids"] for s in last]


def test_step0_eval_loss_and_answers_are_the_untouched_models(runs):
    from transformers import AutoConfig, AutoModelForCausalLM

    run = runs / "z2"
    recipe = load_recipe(run / "recipe.yaml")
    tok = load_tokenizer(recipe.model)
    _, evals, _ = load_datasets(recipe.data, tok, recipe.train.seed)
    cfg = dict(TINY_LLAMA)
    torch.manual_seed(recipe.train.seed)  # the inline config, built as a single process would
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg),
                                             dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in evals:
            labels = torch.tensor([ex.labels])
            n = int((labels[:, 1:] != IGNORE).sum())
            total += float(model(input_ids=torch.tensor([ex.input_ids]), labels=labels).loss) * n
            count += n
    step0 = [m for m in read_metrics(run) if m.get("step") == 0]
    assert len(step0) == 1 and abs(step0[0]["eval_loss"] - total / count) <= 1e-5
    assert json.loads((run / "summary.json").read_text())["baseline_eval_loss"] == \
        step0[0]["eval_loss"]
    first = sorted((s for s in samples(run) if s["step"] == 0), key=lambda s: s["index"])
    assert [s["prompt"] for s in first] == PROMPTS
    for s, text in zip(first, PROMPTS):
        assert s["completion_ids"] == greedy(model, chat_ids(tok, text), tok)


def test_samples_reach_tensorboard(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(runs / "z2" / "tensorboard" / "z2"), size_guidance={"tensors": 0})
    acc.Reload()
    events = acc.Tensors("samples/0/text_summary")
    expected = {s["step"]: s["completion"] for s in samples(runs / "z2") if s["index"] == 0}
    assert {e.step for e in events} >= {0, 2, 4}
    for e in events:
        text = e.tensor_proto.string_val[0].decode()
        assert PROMPTS[0] in text and text.endswith(expected[e.step] or "*(empty)*")


def test_lora_zero3_generations_equal_base_plus_adapter(runs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = runs / "lora"
    recipe = load_recipe(run / "recipe.yaml")
    tok = load_tokenizer(recipe.model)
    base = AutoModelForCausalLM.from_pretrained(run / "base", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, run / "model").eval()
    last = sorted((s for s in samples(run) if s["step"] == 4), key=lambda s: s["index"])
    assert len(last) == 2
    from dpkit.data.load import ALPACA_NO_INPUT

    for s, text in zip(last, PROMPTS):
        ids = tok(ALPACA_NO_INPUT.format(instruction=text))["input_ids"]
        assert s["prompt"] == text and s["completion_ids"] == greedy(model, ids, tok)


def test_resume_does_not_repeat_the_baseline(runs):
    run = runs / "z2_resumed"
    assert [m["step"] for m in read_metrics(run) if "eval_loss" in m] == [4]
    resumed = samples(run)
    assert [s["step"] for s in resumed] == [4] * len(PROMPTS)
    # the same weights at step 4 as the run that was not interrupted: the same answers
    whole = [s for s in samples(runs / "z2") if s["step"] == 4]
    assert [s["completion_ids"] for s in resumed] == [s["completion_ids"] for s in whole]
