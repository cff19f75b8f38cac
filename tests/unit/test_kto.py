"""KTO without ranks: the loss against the paper's formula written out here by hand (per row, with
`math`, in float64) on fixed log-probs and on a fixed batch through a tiny model scored token by
token; the reference point z₀ (its clamp, and the mismatched rows it is computed from: a
derangement with no fixed point, the same for any split of the global batch across ranks); the
adapter-off reference against a frozen copy; rows laid end to end against padded rows; the
unpaired layouts (strings, message lists), their cuts and their refusals; the recipe's checks."""

from __future__ import annotations

import contextlib
import copy
import io
import math

import datasets
import pytest
import torch
from conftest import TINY_LLAMA, TOKENIZER, tiny_recipe, write_recipe

from dpkit.cli import main
from dpkit.data.feed import EVAL_STEP, RowFeed, eval_batches
from dpkit.data.tokenize import DataStats
from dpkit.errors import RecipeError
from dpkit.model import build_model, load_tokenizer
from dpkit.objectives import build_objective
from dpkit.objectives.kto import (
    IGNORE,
    KTO,
    UNPAIRED,
    UnpairedRow,
    collate_unpaired,
    derangement,
    kl_partners,
    kto_losses,
    reference_point,
    rows_of,
)
from dpkit.recipe import DataSection, DataSource, ModelSection, recipe_from_dict

TOL = 1e-6
UNPAIRED_DATA = "dpkit:data/self_instruct_seed.unpaired.jsonl"


# ----------------------------------------------------------- the paper's formula, by hand
def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def by_hand(policy: float, ref: float, desirable: bool, z0: float, beta: float, wd: float,
            wu: float) -> tuple[float, float]:
    """(loss, reward) of one row: Ethayarajh et al. 2024, Eq. 8, L = λ_y − v(x, y) with
    v = λ_D σ(β(r − z₀)) for a desirable y and λ_U σ(β(z₀ − r)) for an undesirable one,
    r = log π(y|x) − log ρ(y|x)."""
    r = policy - ref
    if desirable:
        return wd - wd * sigmoid(beta * (r - z0)), beta * r
    return wu - wu * sigmoid(beta * (z0 - r)), beta * r


def fixed_logps(n: int = 8):
    g = torch.Generator().manual_seed(0)
    policy = -torch.rand(n, generator=g, dtype=torch.float64) * 80 - 1
    ref = policy + torch.randn(n, generator=g, dtype=torch.float64) * 3
    desirable = torch.tensor([True, False, True, True, False, False, True, False][:n])
    return policy, ref, desirable


@pytest.mark.parametrize("beta, wd, wu, z0", [(0.1, 1.0, 1.0, 0.0), (0.5, 1.33, 1.0, 0.7),
                                              (2.0, 1.0, 0.75, 3.1)])
def test_loss_and_rewards_on_fixed_logps_equal_the_formula(beta, wd, wu, z0):
    policy, ref, desirable = fixed_logps()
    loss, rewards = kto_losses(policy, ref, desirable, z0, beta, wd, wu)
    for i in range(len(policy)):
        one, reward = by_hand(policy[i].item(), ref[i].item(), bool(desirable[i]), z0, beta, wd, wu)
        assert abs(loss[i].item() - one) <= TOL
        assert abs(rewards[i].item() - reward) <= TOL


def test_no_gradient_flows_into_the_reference_point():
    policy, ref, desirable = fixed_logps()
    policy.requires_grad_(True)
    z0 = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    kto_losses(policy, ref, desirable, z0, 0.1, 1.0, 1.0)[0].sum().backward()
    assert z0.grad is None and policy.grad.abs().min() > 0


def test_reference_point_is_the_mean_log_ratio_clamped_at_zero():
    assert reference_point(6.0, 4) == 1.5
    assert reference_point(-6.0, 4) == 0.0  # a policy closer than the reference: no negative KL
    assert reference_point(0.0, 0) == 0.0


# ------------------------------------------------------------------- the mismatched rows
@pytest.mark.parametrize("n", [2, 3, 4, 7, 16, 33])
def test_derangement_has_no_fixed_point_and_depends_on_seed_and_step_only(n):
    draws = {(seed, step): derangement(n, seed, step) for seed in (0, 1) for step in range(6)}
    for perm in draws.values():
        assert sorted(perm) == list(range(n)) and all(perm[j] != j for j in range(n))
    assert all(derangement(n, s, t) == p for (s, t), p in draws.items())  # reproducible
    if n > 3:
        assert len({tuple(p) for p in draws.values()}) > 1  # it varies with seed and step
    assert derangement(1, 0, 0) == [0]  # one row: its own partner (TRL's rotation of one)


def numbered_rows(n: int) -> list[UnpairedRow]:
    """Row i: prompt [i], completion [1000 + i], so a mismatched row names its partner."""
    return [UnpairedRow([i], [1000 + i], i % 3 == 0) for i in range(n)]


def partners_seen(rows, world: int, micro: int, accum: int, step: int, lengths: bool) -> dict:
    """Row → partner over every rank's micro-batches of a step, as RowFeed builds them."""
    objective = KTO(seed=5)
    seen = {}

    def collate(examples, pad_id, flatten=False):
        for e in examples:
            assert e.kl_ids[:1] == e.row.prompt_ids and e.kl_labels[0] == IGNORE
            seen[e.row.prompt_ids[0]] = e.kl_ids[1] - 1000
        return {}

    for rank in range(world):
        feed = RowFeed(rows, 5, micro, accum, rank, world, micro * accum * world, collate, 0,
                       group_by_length=lengths, examples=objective.step_examples)
        feed.micro_batches(step)
    return seen


@pytest.mark.parametrize("step", [0, 4, 7])
def test_mismatched_rows_are_the_same_for_any_split_of_the_global_batch(step):
    rows = numbered_rows(37)  # 8 per step: an epoch's last step (4) has 5
    splits = [(1, 8, 1), (1, 1, 8), (2, 2, 2), (2, 4, 1), (4, 1, 2), (8, 1, 1)]
    seen = [partners_seen(rows, *split, step, lengths) for split in splits
            for lengths in (False, True)]
    assert all(s == seen[0] for s in seen[1:]), seen
    feed = RowFeed(rows, 5, 8, 1, 0, 1, 8, lambda *a, **k: {}, 0)
    step_rows = feed.step_rows(step)
    assert sorted(seen[0]) == sorted(step_rows)
    assert all(seen[0][i] != i for i in step_rows)  # no row is its own partner
    assert seen[0] == kl_partners(step_rows, 5, step)


def test_eval_pairs_all_eval_rows_once_whatever_the_ranks():
    rows = numbered_rows(7)
    objective, seen = KTO(seed=5), []
    for world in (1, 2, 3):
        got = {}

        def collate(examples, pad_id, flatten=False):
            got.update({e.row.prompt_ids[0]: e.kl_ids[1] - 1000 for e in examples})
            return {}

        for rank in range(world):
            eval_batches(rows, rank, world, 2, collate, 0, objective.step_examples)
        seen.append(got)
    assert seen[0] == seen[1] == seen[2] == kl_partners(list(range(7)), 5, EVAL_STEP)
    assert all(k != v for k, v in seen[0].items())


def test_mismatched_row_is_its_prompt_and_the_partners_completion_cut_to_max_seq_len():
    rows = [UnpairedRow([1, 2, 3], [4, 5], True), UnpairedRow([6], [7, 8, 9, 10], False)]
    ex = KTO(max_seq_len=5).kl_example(rows, 0, 1, 0)
    assert ex.kl_ids == [1, 2, 3, 7, 8] and ex.kl_labels == [IGNORE] * 3 + [7, 8]


# -------------------------------------------------------------- a fixed batch, tiny models
@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ModelSection(config={"model_type": "llama"}, tokenizer=str(TOKENIZER)))


@pytest.fixture(scope="module")
def rows(tok):
    from dpkit.data import load_datasets

    section = DataSection(sources=[DataSource(path=UNPAIRED_DATA, format="unpaired")],
                          max_seq_len=96)
    train, _, _ = load_datasets(section, tok, seed=0)
    assert {r.label for r in train[:6]} == {True, False}
    return train[:6]


def tiny(seed: int, packed: bool = False):
    """In float64, so that 1e-6 measures the objective, not fp32 rounding of ~100-nat sums."""
    model = build_model(ModelSection(config=dict(TINY_LLAMA), tokenizer=str(TOKENIZER),
                                     dtype="float32"), seed, 0, packed_len=512 if packed else None)
    return model.double().eval()


def logp_by_hand(model, ids: list[int], labels: list[int]) -> float:
    """Summed log-prob of the labelled tokens, the row alone (no padding), token by token."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    return sum(logp[t - 1, labels[t]].item() for t in range(1, len(ids)) if labels[t] != IGNORE)


class Env:
    device = torch.device("cpu")


def examples_of(objective, rows):
    """The rows as one step's global batch: each with its mismatched row."""
    return objective.step_examples(rows, [list(range(len(rows)))], list(range(len(rows))), 0)[0]


@pytest.mark.parametrize("beta, wd, wu", [(0.1, 1.0, 1.0), (0.5, 1.2, 0.8)])
def test_loss_on_a_fixed_batch_through_a_tiny_model_equals_the_formula(tok, rows, beta, wd, wu):
    policy, reference = tiny(1), tiny(2)
    objective = KTO(beta, wd, wu, reference="precomputed", seed=3, max_seq_len=96)
    examples = examples_of(objective, rows)
    for ex in examples:  # what the precomputed pass stores: the reference model's sums
        ex.row.ref = logp_by_hand(reference, ex.row.input_ids, ex.row.labels)
        ex.kl_ref = logp_by_hand(reference, ex.kl_ids, ex.kl_labels)
    batch = objective.collate(examples, tok.pad_token_id)
    with torch.no_grad():
        objective.prepare(policy, [batch], Env())
        out = objective.loss(policy, batch)
    # z₀ by hand: the mismatched rows' mean log-ratio, clamped at 0
    kl = [logp_by_hand(policy, ex.kl_ids, ex.kl_labels) - ex.kl_ref for ex in examples]
    z0 = max(0.0, sum(kl) / len(kl))
    assert abs(objective.z0 - z0) <= TOL
    loss, chosen = 0.0, []
    for ex in examples:
        one, reward = by_hand(logp_by_hand(policy, ex.row.input_ids, ex.row.labels), ex.row.ref,
                              ex.row.label, z0, beta, wd, wu)
        loss += one
        if ex.row.label:
            chosen.append(reward)
    assert objective.count(batch) == len(rows)
    assert abs(out.loss.item() - loss) <= TOL * len(rows)
    assert abs(out.metrics["rewards/chosen"].item() - sum(chosen)) <= TOL * len(rows)
    logged = objective.per_unit({k: v.item() / len(rows) for k, v in out.metrics.items()})
    assert abs(logged["rewards/chosen"] - sum(chosen) / len(chosen)) <= TOL  # TRL's mean per class
    assert abs(logged["kl"] - z0) <= TOL


def test_a_policy_closer_than_the_reference_clamps_z0_at_zero(tok, rows):
    policy = tiny(1)
    objective = KTO(reference="precomputed", seed=3)
    examples = examples_of(objective, rows)
    for ex in examples:  # a reference far more likely than the policy: negative log-ratios
        ex.row.ref, ex.kl_ref = 0.0, 0.0
    objective.prepare(policy, [objective.collate(examples, tok.pad_token_id)], Env())
    assert objective.z0 == 0.0


def test_per_unit_gives_class_means_and_leaves_out_an_absent_class():
    objective = KTO()
    sums = {"rewards/chosen": 0.6, "rewards/rejected": -0.4, "logps/chosen": -30.0,
            "logps/rejected": -10.0, "kl": 0.25, "count/chosen": 0.75, "count/rejected": 0.25}
    out = objective.per_unit(sums)  # 3 chosen rows of 4: their rewards' mean is 0.6 / 0.75
    assert out == pytest.approx({"rewards/chosen": 0.8, "rewards/rejected": -1.6,
                                 "rewards/margins": 2.4, "logps/chosen": -40.0,
                                 "logps/rejected": -40.0, "kl": 0.25})
    only = objective.per_unit({**sums, "rewards/rejected": 0.0, "logps/rejected": 0.0,
                               "count/chosen": 1.0, "count/rejected": 0.0})
    assert "rewards/rejected" not in only and "rewards/margins" not in only


def test_adapter_off_reference_equals_a_frozen_copy(tok, rows):
    from peft import LoraConfig, get_peft_model

    base = tiny(3)
    frozen = copy.deepcopy(base)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():  # a trained adapter: non-zero B, so the adapter changes the outputs
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    objective = KTO(reference="adapter_off", seed=3)
    examples = examples_of(objective, rows)
    batch = objective.collate(examples, tok.pad_token_id)
    ref, kl_ref = (objective.reference_logps(model, batch, p) for p in ("", "kl_"))
    for i, ex in enumerate(examples):
        assert abs(ref[i].item() - logp_by_hand(frozen, ex.row.input_ids, ex.row.labels)) <= 1e-4
        assert abs(kl_ref[i].item() - logp_by_hand(frozen, ex.kl_ids, ex.kl_labels)) <= 1e-4
    objective.prepare(model, [batch], Env())
    assert objective.z0 > 0.1  # the adapter is on again for the policy's side


def test_rows_laid_end_to_end_equal_padded_rows(tok, rows):
    """data.packing for KTO: the rows (and the mismatched rows) in one sequence each, per-row
    attention, no padding."""
    objective = KTO(reference="precomputed", seed=3)
    examples = examples_of(objective, rows)
    for ex in examples:
        ex.row.ref, ex.kl_ref = -300.0, -1000.0  # z₀ > 0: its clamp hides nothing
    padded = objective.collate(examples, tok.pad_token_id)
    flat = objective.collate(examples, tok.pad_token_id, flatten=True)
    assert flat["input_ids"].shape[0] == flat["kl_input_ids"].shape[0] == 1
    assert flat["input_ids"].numel() == int(padded["attention_mask"].sum())
    assert flat["kl_input_ids"].numel() == int(padded["kl_attention_mask"].sum())
    with torch.no_grad():
        objective.prepare(tiny(1), [padded], Env())
        z_padded, a = objective.z0, objective.loss(tiny(1), padded)
        objective.prepare(tiny(1, packed=True), [flat], Env())
        b = objective.loss(tiny(1, packed=True), flat)
    assert abs(objective.z0 - z_padded) <= TOL and objective.z0 > 0
    assert abs(a.loss.item() - b.loss.item()) <= TOL
    for key in a.metrics:
        assert abs(a.metrics[key].item() - b.metrics[key].item()) <= TOL * 100, key


def test_empty_micro_batch_adds_nothing_and_stays_finite(tok):
    objective = KTO(reference="precomputed")
    model = tiny(1).float().train()
    batch = collate_unpaired([], tok.pad_token_id)
    objective.prepare(model, [batch], Env())
    out = objective.loss(model, batch)
    out.loss.backward()
    assert objective.count(batch) == 0 and out.loss.item() == 0.0 and objective.z0 == 0.0
    assert all(float(p.grad.abs().max()) == 0.0 for p in model.parameters() if p.grad is not None)


# ------------------------------------------------------------------------------------- data
def tokenize(rows, tok, max_seq_len=256, max_prompt_len=None, overflow="truncate"):
    source = DataSource(path="x.jsonl", format="unpaired")
    section = DataSection(sources=[source], max_seq_len=max_seq_len, overflow=overflow)
    stats = DataStats()
    tds = UNPAIRED.tokenize(datasets.Dataset.from_list(rows), source, tok, section,
                            {"max_prompt_len": max_prompt_len}, 1)
    return rows_of(tds, source.path, stats), stats


def test_string_rows_are_plain_text_with_bos_and_a_trained_eos(tok):
    (row,), stats = tokenize([{"prompt": "Name a color. ", "completion": "Blue.",
                               "label": True}], tok)
    assert row.input_ids == tok("Name a color. Blue.").input_ids + [tok.eos_token_id]
    # " B" straddles prompt and completion: it holds completion text, so it is the completion's
    assert tok.decode(row.completion_ids).strip() == "Blue.</s>"
    assert "color" in tok.decode(row.prompt_ids) and row.label is True and stats.rows == 1


def test_conversational_rows_render_through_the_chat_template(tok):
    user = [{"role": "user", "content": "Name a color."}]
    answer = [{"role": "assistant", "content": "Blue."}]
    layouts = [{"prompt": user, "completion": answer, "label": False},
               {"prompt": "Name a color.", "completion": answer, "label": False}]
    whole = tok(tok.apply_chat_template(user + answer, tokenize=False),
                add_special_tokens=False).input_ids
    head = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    for layout in layouts:
        (row,), _ = tokenize([layout], tok)
        assert row.input_ids == whole and row.label is False
        assert tok.decode(row.prompt_ids) == head
        assert tok.decode(row.completion_ids).startswith("Blue.")


def test_prompt_cut_keeps_its_last_tokens_and_long_completions_are_cut_or_dropped(tok):
    rows = [{"prompt": "one two three four five six seven eight nine ten ",
             "completion": "yes " * 30, "label": True}]
    (full,), _ = tokenize(rows, tok)
    (cut,), stats = tokenize(rows, tok, max_seq_len=24, max_prompt_len=4)
    assert cut.prompt_ids == full.prompt_ids[-4:]
    assert cut.completion_ids == full.completion_ids[:20]
    assert stats.prompt_truncated == 1 and stats.truncated == 1
    assert tokenize(rows, tok, max_seq_len=24, overflow="drop")[1].dropped_too_long == 1
    dropped = tokenize(rows, tok, max_seq_len=len(full.prompt_ids))[1]
    assert dropped.rows == 0 and dropped.dropped_no_target == 1  # the prompt alone fills it


@pytest.mark.parametrize("row, message", [
    ({"prompt": "Q", "completion": "A", "label": 1}, "holds int64 values, not true/false"),
    ({"prompt": "Q", "completion": 7, "label": True}, "holds int64 values, not text"),
])
def test_bad_rows_are_refused_naming_the_column(tok, tmp_path, row, message):
    import json

    from dpkit.data import load_datasets

    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(row) + "\n")
    section = DataSection(sources=[DataSource(path=str(path), format="unpaired")],
                          max_seq_len=64)
    with pytest.raises(RecipeError, match=message):
        load_datasets(section, tok, seed=0)


def test_the_cache_key_follows_the_row_kind_module():
    """An edit of dpkit/objectives/kto.py (where these rows are tokenized) changes the key."""
    from pathlib import Path

    import dpkit.objectives.kto as runtime
    from dpkit.data.cache import row_kind_code

    section = DataSection(sources=[DataSource(path=UNPAIRED_DATA, format="unpaired")])
    assert row_kind_code(section) == Path(runtime.__file__).read_bytes()


# ----------------------------------------------------------------------------------- recipe
def kto_recipe(tmp_path, **sections):
    r = tiny_recipe(tmp_path / "run", data={"sources": [{"path": UNPAIRED_DATA,
                                                         "format": "unpaired"}]})
    r["objective"] = "kto"
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(r.get(key), dict):
            r[key] = {**r[key], **value}
        else:
            r[key] = value
    return r


def test_objective_defaults_and_card(tmp_path):
    full = build_objective(recipe_from_dict(kto_recipe(tmp_path)))
    assert (full.beta, full.desirable_weight, full.undesirable_weight, full.reference) == \
        (0.1, 1.0, 1.0, "precomputed")
    assert full.forwards_without_grad == 1 and full.unit == "rows"
    lora = build_objective(recipe_from_dict(kto_recipe(tmp_path, peft={"r": 4},
                                                       kto={"beta": 0.3})))
    assert (lora.reference, lora.beta, lora.forwards_without_grad) == ("adapter_off", 0.3, 3)
    assert "reference model" in dict(lora.card_rows())


@pytest.mark.parametrize("change, keys", [
    (dict(train={"sequence_parallel": 2, "micro_batch_size": 1}),
     ("train.sequence_parallel", "objective: kto")),
    (dict(data={"streaming": True, "sources": [{"path": UNPAIRED_DATA, "format": "unpaired"}]}),
     ("data.streaming", "objective: kto")),
    (dict(kto={"reference": "adapter_off"}), ("kto.reference", "needs LoRA")),
    (dict(train={"global_batch_size": 1, "micro_batch_size": 1}),
     ("train.global_batch_size", "2 or more")),
    (dict(data={"sources": [{"path": "dpkit:data/self_instruct_seed.preference.jsonl",
                             "format": "preference"}]}), ("format: unpaired",)),
    (dict(objective="dpo"), ("objective: dpo", "format: preference")),
    (dict(kto={"beta": 0}), ("kto.beta",)),
])
def test_validate_refuses_in_one_line_naming_the_key(tmp_path, change, keys):
    path = write_recipe(tmp_path / "r.yaml", kto_recipe(tmp_path, **change))
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["validate", str(path), "--nproc-per-node", "2"])
    lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1, err.getvalue()
    assert all(k in lines[0] for k in keys), lines[0]
    assert not (tmp_path / "run").exists()


def test_a_kto_section_needs_the_kto_objective(tmp_path):
    r = tiny_recipe(tmp_path / "run")
    r["kto"] = {"beta": 0.2}
    with pytest.raises(RecipeError, match="section is for `objective: kto`"):
        recipe_from_dict(r)


def test_model_card_and_report_show_kto_and_no_pair_accuracy(tmp_path):
    import json

    from dpkit.model_card import render_card
    from dpkit.report import write_report

    run = tmp_path / "run"
    run.mkdir()
    kto = KTO(0.2, 1.33, 1.0, reference="adapter_off")
    (run / "summary.json").write_text(json.dumps({"steps": 2, "world_size": 2, **kto.card(),
                                                  "method_card": kto.card_rows()}))
    lines = [{"step": s, "loss": 0.5 - 0.1 * s, "tokens_seen": 100 * s, "kl": 0.1 * s,
              "rewards/margins": 0.1 * s} for s in (1, 2)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    text = render_card(run, repo_id="me/x", base_model=None, adapter=True, license=None, tags=[],
                       has_plot=False)
    assert "| objective | kto |" in text and "| desirable weight λ_D | 1.33 |" in text
    assert "| reference model | adapter_off |" in text
    report = write_report([run]).read_text()
    assert "## Reward margin" in report and "## Reward accuracy" not in report  # rows, no pairs
    assert "objective kto, beta 0.2" in report
