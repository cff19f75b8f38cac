"""dpkit/eval without ranks: prompts, the Markdown people read, the lm-eval preflight, and
lm-eval on a saved model with the shipped local task, scored against a by-hand computation."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import (
    ALPACA,
    MESSAGES,
    ROOT,
    TINY_LLAMA,
    TOKENIZER,
    by_hand_accuracy,
    rank_env,
    seed_mc_docs,
    tiny_recipe,
    write_recipe,
)

from dpkit import report
from dpkit.data import IGNORE, load_datasets
from dpkit.data.load import ALPACA_NO_INPUT
from dpkit.eval import generate as G
from dpkit.eval import harness, present
from dpkit.model import load_tokenizer
from dpkit.recipe import DataSource, recipe_from_dict


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(recipe_from_dict(tiny_recipe(ROOT / "unused")).model)


def test_row_prompts_stop_before_the_answer(tok, tmp_path):
    recipe = recipe_from_dict(tiny_recipe(tmp_path, data={
        "sources": [{"path": str(ALPACA), "format": "alpaca"}], "eval_fraction": 0.05}))
    _, evals, _ = load_datasets(recipe.data, tok, recipe.train.seed)
    prompts = G.choose_prompts(recipe.eval, recipe.data.sources[0], tok, evals)
    assert len(prompts) == 3  # the default num_prompts
    for p, ex in zip(prompts, evals):
        n = len(p.ids)
        assert ex.input_ids[:n] == p.ids and ex.labels[n] != IGNORE
        assert all(t == IGNORE for t in ex.labels[:n])
        assert p.text.endswith("### Response:")


def test_recipe_prompts_are_rendered_like_the_training_rows(tok, tmp_path):
    section = recipe_from_dict(tiny_recipe(tmp_path, eval={"prompts": ["Name a cat."]})).eval
    (alpaca,) = G.choose_prompts(section, DataSource(path=str(ALPACA), format="alpaca"), tok, [])
    assert alpaca.text == "Name a cat."
    assert alpaca.ids == tok(ALPACA_NO_INPUT.format(instruction="Name a cat."))["input_ids"]
    (chat,) = G.choose_prompts(section, DataSource(path=str(MESSAGES), format="messages"), tok,
                               [])
    rendered = tok.apply_chat_template([{"role": "user", "content": "Name a cat."}],
                                       tokenize=False, add_generation_prompt=True)
    assert tok.decode(chat.ids) == rendered
    (text,) = G.choose_prompts(section, DataSource(path="t.jsonl", format="text"), tok, [])
    assert text.ids == tok("Name a cat.")["input_ids"]


def write_samples(run, answers: dict[int, list[str]]) -> None:
    with open(run / "samples.jsonl", "w") as f:
        for step, texts in answers.items():
            f.writelines(json.dumps({"step": step, "index": i, "prompt": f"Q{i}\nsecond line",
                                     "completion": text, "completion_ids": []}) + "\n"
                         for i, text in enumerate(texts))
        f.write('{"step": 99, "ind')  # a line being written


def test_report_shows_every_evals_answers_and_scores(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 0, "eval_loss": 7.5, "tokens_seen": 0},
        {"step": 1, "loss": 7.0, "tokens_seen": 10},
        {"step": 2, "loss": 6.0, "tokens_seen": 20},
        {"step": 2, "eval_loss": 6.25, "tokens_seen": 20}]))
    (run / "summary.json").write_text(json.dumps({"benchmarks": {
        "tasks": {"dpkit_seed_mc": {"acc": 0.28125}}, "n_samples": {"dpkit_seed_mc": 32},
        "lm_eval_version": "0.4.13", "wall_s": 3.0}}))
    write_samples(run, {0: ["aaa", "x|y"], 2: ["bbb", "two\nlines"]})
    text = report.write_report([run]).read_text()
    assert "> Q0\n> second line" in text
    assert "| 0 | 7.5000 | aaa |" in text and "| 2 | 6.2500 | bbb |" in text
    assert "| 0 | 7.5000 | x\\|y |" in text and "| 2 | 6.2500 | two<br>lines |" in text
    assert "| dpkit_seed_mc | acc | 0.2812 | 32 |" in text
    card = present.before_after(run)
    assert "| step 0 | step 2 |" in card[4] and "| Q0<br>second line | aaa | bbb |" in card


def test_benchmark_failure_is_shown_not_raised():
    lines = present.benchmarks_section({"benchmarks": {"error": "ConnectionError: offline"}})
    assert "lm-eval did not finish: `ConnectionError: offline`" in lines


def test_tasks_without_lm_eval_are_refused_before_launch(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path / "run", eval={
        "tasks": ["dpkit_seed_mc"], "task_dirs": ["dpkit:lm_eval_tasks"]}))
    code = ("import sys; sys.modules['lm_eval'] = None\n"  # as if not installed
            "from dpkit.cli import main; sys.exit(main(['validate', sys.argv[1]]))")
    proc = subprocess.run([sys.executable, "-c", code, str(recipe)], env=rank_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "eval.tasks" in line]
    assert len(errors) == 1 and "pip install 'dpkit[eval]'" in errors[0]
    assert not (tmp_path / "run").exists()


def test_task_dirs_must_exist_and_the_model_be_saved(tmp_path):
    r = recipe_from_dict(tiny_recipe(tmp_path, eval={"tasks": ["x"],
                                                      "task_dirs": [str(tmp_path / "no")]}))
    found = harness.problems(r)  # tiny_recipe saves no model
    assert [p.where for p in found] == ["eval.tasks", "eval.task_dirs[0]"]
    assert "output.save_model" in found[0].message


def test_lm_eval_scores_the_saved_model_on_the_shipped_task(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    run = tmp_path / "run"
    cfg = dict(TINY_LLAMA)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    model.save_pretrained(run / "model")
    AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained(run / "model")
    recipe = recipe_from_dict(tiny_recipe(run, eval={
        "tasks": ["dpkit_seed_mc"], "task_dirs": ["dpkit:lm_eval_tasks"], "limit": 12},
        output={"save_model": True}))
    assert harness.problems(recipe) == []
    result = harness.run_benchmarks(run, recipe, "cpu")
    assert "error" not in result, result
    docs = seed_mc_docs()[:12]
    assert result["n_samples"] == {"dpkit_seed_mc": 12}
    assert result["tasks"]["dpkit_seed_mc"]["acc"] == pytest.approx(
        by_hand_accuracy(run / "model", docs))


def test_a_preference_pair_gives_its_chosen_prompt():
    """Generations during a preference run take their prompts from eval pairs: the tokens of the
    chosen side before its first trained one (a pair has no single `labels`)."""
    from dpkit.data.preference import PairExample
    from dpkit.eval.generate import row_prompt
    from dpkit.model import load_tokenizer
    from dpkit.recipe import ModelSection

    tok = load_tokenizer(ModelSection(config={"model_type": "llama"},
                                      tokenizer="dpkit:tokenizers/tiny-bpe"))
    prompt = tok("Name a colour.")["input_ids"]
    chosen, rejected = tok(" Blue.", add_special_tokens=False)["input_ids"], [5, 6]
    pair = PairExample(prompt + chosen, [-100] * len(prompt) + chosen,
                       prompt + rejected, [-100] * len(prompt) + rejected)
    got = row_prompt(pair, tok)
    assert got.ids == prompt
    assert got.text == tok.decode(prompt, skip_special_tokens=True).strip()
