"""Reward modelling without ranks: the loss and metrics against the Bradley-Terry formula written
out here by hand (per pair, with `math`, float64) on scores computed row by row (each row alone,
unpadded, its last hidden state times the score weights); the score read at each row's last real
token where transformers' pooling reads another; pairs laid end to end; margins carried from the
data to the right pairs; and the recipe's checks (one line naming the key)."""

from __future__ import annotations

import contextlib
import io
import json
import math

import datasets
import pytest
import torch
from conftest import TINY_LLAMA, TOKENIZER, tiny_recipe, write_recipe

from dpkit.cli import main
from dpkit.data import load_datasets
from dpkit.data.load import DataStats
from dpkit.data.preference import PairExample, tokenize_pairs
from dpkit.errors import RecipeError
from dpkit.methods import METHODS
from dpkit.model import build_model, load_tokenizer
from dpkit.objectives import build_objective
from dpkit.objectives.reward import Reward
from dpkit.recipe import DataSection, DataSource, ModelSection, recipe_from_dict

TOL = 1e-6
PREF = "dpkit:data/self_instruct_seed.preference.jsonl"
HEAD = "sequence_classification"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ModelSection(config={"model_type": "llama"}, tokenizer=str(TOKENIZER)))


@pytest.fixture(scope="module")
def pairs(tok):
    section = DataSection(sources=[DataSource(path=PREF, format="preference")], max_seq_len=96)
    train, _, _ = load_datasets(section, tok, seed=0)
    return train[:5]


def tiny_rm(tok, seed: int = 1, packed_len: int | None = None):
    """A score model in float64, so 1e-6 measures the objective and not fp32 rounding."""
    section = ModelSection(config=dict(TINY_LLAMA), tokenizer=str(TOKENIZER), dtype="float32")
    model = build_model(section, seed, 0, packed_len=packed_len, head=HEAD,
                        pad_token_id=tok.pad_token_id)
    return model.double().eval()


def row_score(model, ids: list[int]) -> float:
    """The row alone (no padding, no mask): its last hidden state · the score weights."""
    with torch.no_grad():
        hidden = model.model(torch.tensor([ids])).last_hidden_state[0, -1]
        return float(hidden @ model.score.weight[0])


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def by_hand(c: float, r: float, m: float = 0.0, center: float = 0.0) -> float:
    """Bradley-Terry with a margin (Touvron et al. 2023, eq. 2) plus the centring term
    (Eisenstein et al. 2023): −log σ(c − r − m) + λ (c + r)²."""
    return -log_sigmoid(c - r - m) + center * (c + r) ** 2


@pytest.mark.parametrize("margins, center", [(None, 0.0), ([0.5, -1.0, 2.0, 0.0, 1.5], 0.0),
                                             (None, 0.01), ([1.0, 0.25, -0.5, 3.0, 0.0], 0.05)])
def test_loss_and_metrics_equal_the_formula_by_hand(tok, pairs, margins, center):
    model = tiny_rm(tok)
    examples = [PairExample(p.chosen_ids, p.chosen_labels, p.rejected_ids, p.rejected_labels,
                            numbers={"margin": m} if margins else None)
                for p, m in zip(pairs, margins or [0.0] * len(pairs))]
    objective = Reward(center, margin_column="m" if margins else None)
    batch = objective.collate(examples, tok.pad_token_id)
    with torch.no_grad():
        out = objective.loss(model, batch)
    loss = chosen = rejected = right = 0.0
    for ex, m in zip(examples, margins or [0.0] * len(examples)):
        c, r = row_score(model, ex.chosen_ids), row_score(model, ex.rejected_ids)
        loss += by_hand(c, r, m, center)
        chosen, rejected, right = chosen + c, rejected + r, right + (c > r)
    assert objective.count(batch) == len(examples)
    assert abs(out.loss.item() - loss) <= TOL, (out.loss.item(), loss)
    got = {k: v.item() for k, v in out.metrics.items()}
    assert abs(got["rewards/chosen"] - chosen) <= TOL and \
        abs(got["rewards/rejected"] - rejected) <= TOL
    assert abs(got["rewards/margins"] - (chosen - rejected)) <= TOL
    assert got["rewards/accuracies"] == right
    if margins:  # the margin changes the loss: the fixture can tell a dropped margin
        without = Reward(center).loss(model, batch).loss.item()
        assert abs(without - loss) > 1e-3


def test_score_is_read_at_the_last_real_token_where_transformers_reads_another(tok):
    """Plain-text pairs end in eos, and dpkit pads with eos (this tokenizer has no pad token):
    transformers' pooled output takes the last token that is not `pad_token_id` — the one before
    the eos. dpkit reads the last real token, the eos, as the row alone gives it."""
    assert tok.pad_token_id == tok.eos_token_id
    rows = [{"prompt": "Name a color. ", "chosen": "Blue, the color of the sky.",
             "rejected": "Seven."},
            {"prompt": "Add two and two. ", "chosen": "Four.", "rejected": "Twenty-two, I think."}]
    source = DataSource(path="x.jsonl", format="preference")
    examples = tokenize_pairs(datasets.Dataset.from_list(rows), source, tok,
                              DataSection(sources=[source], max_seq_len=64), DataStats(), None)
    assert all(ex.chosen_ids[-1] == tok.eos_token_id for ex in examples)
    model, objective = tiny_rm(tok), Reward()
    batch = objective.collate(examples, tok.pad_token_id)
    with torch.no_grad():
        ours = objective.scores(model, batch)
        pooled = model(input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).logits[:, 0]
    rows_alone = [row_score(model, ids) for ids in
                  [ex.chosen_ids for ex in examples] + [ex.rejected_ids for ex in examples]]
    assert max(abs(a - b) for a, b in zip(ours.tolist(), rows_alone)) <= TOL
    before_eos = [row_score(model, ids[:-1]) for ids in
                  [ex.chosen_ids for ex in examples] + [ex.rejected_ids for ex in examples]]
    assert max(abs(a - b) for a, b in zip(pooled.tolist(), before_eos)) <= TOL  # its choice
    assert min(abs(a - b) for a, b in zip(ours.tolist(), pooled.tolist())) > 1e-4


def test_pairs_laid_end_to_end_equal_padded_pairs(tok, pairs):
    """data.packing: the 2B rows in one sequence with per-row attention, each read at its end."""
    objective = Reward(0.01)
    padded = objective.collate(pairs, tok.pad_token_id)
    flat = objective.collate(pairs, tok.pad_token_id, flatten=True)
    assert flat["input_ids"].shape[0] == 1
    with torch.no_grad():
        a = objective.loss(tiny_rm(tok), padded)
        b = objective.loss(tiny_rm(tok, packed_len=512), flat)
    assert abs(a.loss.item() - b.loss.item()) <= TOL
    for key in a.metrics:
        assert abs(a.metrics[key].item() - b.metrics[key].item()) <= TOL, key


def test_an_empty_micro_batch_adds_nothing(tok):
    objective = Reward(0.01, margin_column="m")
    batch = objective.collate([], tok.pad_token_id)
    model = tiny_rm(tok)
    out = objective.loss(model, batch)
    out.loss.backward()
    assert objective.count(batch) == 0 and out.loss.item() == 0.0
    assert all(float(p.grad.abs().max()) == 0.0 for p in model.parameters() if p.grad is not None)


# ----------------------------------------------------------------------------- margin column
def test_the_margin_column_is_read_with_each_pair(tmp_path):
    """`reward.margin_column` asks the pairs' row kind for a number per pair (its data options:
    part of the tokenized-data cache key and of what a resume must not change)."""
    r = reward_recipe(tmp_path, reward={"margin_column": "score_gap"})
    assert METHODS["reward"].options(recipe_from_dict(r)) == {"pair_numbers": {"margin": {
        "column": "score_gap", "key": "reward.margin_column"}}}
    assert METHODS["reward"].options(recipe_from_dict(reward_recipe(tmp_path))) == {}


def validate(path) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["validate", str(path)])
    return code, err.getvalue()


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "Q? ", "chosen": "A.", "rejected": "B."}],
     "reward.margin_column: names column 'score_gap'"),
    ([{"prompt": "Q? ", "chosen": "A.", "rejected": "B.", "score_gap": "high"}],
     "column 'score_gap' (reward.margin_column) holds 'high', not a number"),
])
def test_a_bad_margin_column_is_one_line_before_any_rank(tmp_path, rows, message):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows * 4))
    r = tiny_recipe(tmp_path / "run", data={"sources": [{"path": str(path),
                                                         "format": "preference"}]})
    r.update(objective="reward", reward={"margin_column": "score_gap"})
    code, err = validate(write_recipe(tmp_path / "r.yaml", r))
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------- recipe
def reward_recipe(tmp_path, **sections):
    r = tiny_recipe(tmp_path / "run", data={"sources": [{"path": PREF, "format": "preference"}]})
    r["objective"] = "reward"
    for key, values in sections.items():
        r.setdefault(key, {}).update(values)
    return r


def test_the_method_declares_a_score_head_and_builds_its_settings(tmp_path):
    assert METHODS["reward"].head == HEAD and not METHODS["reward"].streams
    objective = build_objective(recipe_from_dict(reward_recipe(
        tmp_path, reward={"margin_column": "m", "center_rewards_coefficient": 0.01})))
    assert (objective.margin_column, objective.center) == ("m", 0.01)
    assert objective.card() == {"objective": "reward", "margin_column": "m",
                                "center_rewards_coefficient": 0.01}
    assert build_objective(recipe_from_dict(reward_recipe(tmp_path))).card() == \
        {"objective": "reward"}


@pytest.mark.parametrize("change, message", [
    (dict(train={"sequence_parallel": 2}), "`train.sequence_parallel: 2` does not work with "
                                           "`objective: reward`"),
    (dict(eval={"prompts": ["Hi"]}), "`eval.prompts` needs a model that writes text"),
    (dict(eval={"tasks": ["hellaswag"]}), "`eval.tasks` needs a model that writes text"),
    (dict(compute={"loss": "tiled"}), "`compute.loss: tiled` tiles a vocabulary's logits"),
    (dict(data={"streaming": True}), "`data.streaming` does not work with `objective: reward`"),
])
def test_what_a_reward_model_cannot_do_is_refused_naming_the_key(tmp_path, change, message):
    with pytest.raises(RecipeError, match=message.replace("`", ".").replace("(", ".")):
        recipe_from_dict(reward_recipe(tmp_path, **change))


def test_reward_needs_preference_data_and_its_section_needs_it(tmp_path):
    r = tiny_recipe(tmp_path / "run")
    r["objective"] = "reward"
    with pytest.raises(RecipeError, match="format: preference"):
        recipe_from_dict(r)
    r = reward_recipe(tmp_path, reward={"margin_column": "m"})
    r["objective"] = "dpo"
    with pytest.raises(RecipeError, match="section is for `objective: reward`"):
        recipe_from_dict(r)
