"""Preference objectives without ranks: the losses and rewards against the papers' formulas
written out here by hand (per pair, with `math`, in float64), on fixed log-probs and on a fixed
batch through a tiny model run row by row; the adapter-off reference against a frozen copy; the
pair data layouts, masking and counting; and the recipe's cross-field checks."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_LLAMA, TOKENIZER, tiny_recipe
from torch.utils._python_dispatch import TorchDispatchMode

from dpkit.data.load import DataStats
from dpkit.data.preference import IGNORE, PairExample, collate_pairs, tokenize_pairs
from dpkit.data.tokenize import Example
from dpkit.errors import RecipeError
from dpkit.model import build_model, load_tokenizer
from dpkit.methods import METHODS
from dpkit.objectives import build_objective
from dpkit.objectives.head import LossHead, plain_head
from dpkit.objectives.preference import Preference, pair_losses
from dpkit.recipe import DataSection, DataSource, ModelSection, recipe_from_dict

TOL = 1e-6
PREF = "dpkit:data/self_instruct_seed.preference.jsonl"


# ------------------------------------------------------------- the papers' formulas, by hand
def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def by_hand(kind, pc, pr, nc, nr, rc, rr, beta, ls=0.0, gamma=0.0, lam=0.1):
    """(loss, chosen reward, rejected reward) of one pair: s = summed log-probs, n = tokens."""
    if kind == "dpo":  # Rafailov et al. 2023, eq. 7; label smoothing as in cDPO
        z = beta * ((pc - rc) - (pr - rr))
        return (-(1 - ls) * log_sigmoid(z) - ls * log_sigmoid(-z),
                beta * (pc - rc), beta * (pr - rr))
    if kind == "ipo":  # Azar et al. 2023, eq. 17, with length-averaged log-probs
        h = (pc / nc - rc / nc) - (pr / nr - rr / nr)
        return (h - 1 / (2 * beta)) ** 2, beta * (pc - rc) / nc, beta * (pr - rr) / nr
    if kind == "simpo":  # Meng et al. 2024, eq. 6
        z = beta / nc * pc - beta / nr * pr - gamma
        return (-(1 - ls) * log_sigmoid(z) - ls * log_sigmoid(-z), beta * pc / nc,
                beta * pr / nr)
    if kind == "orpo":  # Hong et al. 2024, eqs. 2-7: NLL of chosen + λ · odds-ratio loss
        p_c, p_r = math.exp(pc / nc), math.exp(pr / nr)
        ratio = math.log((p_c / (1 - p_c)) / (p_r / (1 - p_r)))
        return -pc / nc - lam * log_sigmoid(ratio), lam * pc / nc, lam * pr / nr
    raise ValueError(kind)


CASES = [("dpo", dict(beta=0.1)), ("dpo", dict(beta=0.5, ls=0.2)), ("ipo", dict(beta=0.1)),
         ("simpo", dict(beta=2.0, gamma=1.0)), ("simpo", dict(beta=2.5, ls=0.1, gamma=0.5)),
         ("orpo", dict(beta=0.1, lam=0.25))]


def fixed_logps():
    g = torch.Generator().manual_seed(0)
    counts = torch.randint(3, 40, (6, 2), generator=g).double()
    policy = -torch.rand(6, 2, generator=g, dtype=torch.float64) * counts * 3 - 0.05
    ref = policy + torch.randn(6, 2, generator=g, dtype=torch.float64) * 2
    return policy, counts, ref


@pytest.mark.parametrize("kind, kw", CASES)
def test_losses_and_rewards_on_fixed_logps_equal_the_formulas(kind, kw):
    policy, counts, ref = fixed_logps()
    out = pair_losses(kind, policy, counts, ref, kw["beta"], kw.get("ls", 0.0),
                      kw.get("gamma", 0.0), kw.get("lam", 0.0))
    for i in range(len(policy)):
        loss, chosen, rejected = by_hand(kind, *policy[i].tolist(), *counts[i].tolist(),
                                         *ref[i].tolist(), **kw)
        assert abs(out["loss"][i].item() - loss) <= TOL
        assert abs(out["chosen"][i].item() - chosen) <= TOL
        assert abs(out["rejected"][i].item() - rejected) <= TOL


# -------------------------------------------------------------- a fixed batch, tiny models
@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ModelSection(config={"model_type": "llama"}, tokenizer=str(TOKENIZER)))


@pytest.fixture(scope="module")
def pairs(tok):
    section = DataSection(sources=[DataSource(path=PREF, format="preference")], max_seq_len=96)
    from dpkit.data import load_datasets

    train, _, _ = load_datasets(section, tok, seed=0)
    return train[:5]


def tiny(seed: int):
    """In float64, so that 1e-6 measures the objective, not fp32 rounding of ~1000-nat sums."""
    model = build_model(ModelSection(config=dict(TINY_LLAMA), tokenizer=str(TOKENIZER),
                                     dtype="float32"), seed, 0)
    return model.double().eval()


def row_logps(model, ids: list[int], labels: list[int]) -> tuple[float, int]:
    """Summed log-prob of the labelled tokens, the row alone (no padding), token by token."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    total, n = 0.0, 0
    for t in range(1, len(ids)):
        if labels[t] != IGNORE:
            total, n = total + logp[t - 1, labels[t]].item(), n + 1
    return total, n


@pytest.mark.parametrize("kind, kw", CASES)
def test_loss_on_a_fixed_batch_through_a_tiny_model_equals_the_formulas(tok, pairs, kind, kw):
    policy, reference = tiny(1), tiny(2)
    objective = Preference(kind, kw["beta"], kw.get("ls", 0.0), kw.get("gamma", 0.0),
                           kw.get("lam", 0.1), reference="precomputed")
    for ex in pairs:  # what the precomputed pass stores: the reference model's sums
        ex.ref = (row_logps(reference, ex.chosen_ids, ex.chosen_labels)[0],
                  row_logps(reference, ex.rejected_ids, ex.rejected_labels)[0])
    batch = objective.collate(pairs, tok.pad_token_id)
    with torch.no_grad():
        out = objective.loss(policy, batch)
    loss = margins = acc = 0.0
    for ex in pairs:
        pc, nc = row_logps(policy, ex.chosen_ids, ex.chosen_labels)
        pr, nr = row_logps(policy, ex.rejected_ids, ex.rejected_labels)
        one, chosen, rejected = by_hand(kind, pc, pr, nc, nr, *ex.ref, **kw)
        loss, margins, acc = loss + one, margins + chosen - rejected, acc + (chosen > rejected)
    assert objective.count(batch) == len(pairs)
    assert abs(out.loss.item() - loss) <= TOL * len(pairs)
    assert abs(out.metrics["rewards/margins"].item() - margins) <= TOL * len(pairs)
    assert out.metrics["rewards/accuracies"].item() == acc


def test_adapter_off_reference_equals_a_frozen_copy(tok, pairs):
    from peft import LoraConfig, get_peft_model

    base = tiny(3)
    frozen = copy.deepcopy(base)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():  # a trained adapter: non-zero B, so the adapter changes the outputs
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    objective = Preference("dpo", 0.1, reference="adapter_off")
    batch = objective.collate(pairs, tok.pad_token_id)
    ref = objective.reference_logps(model, batch)
    policy = objective.pair_logps(model, batch)[0]
    for i, ex in enumerate(pairs):
        assert abs(ref[i, 0].item() - row_logps(frozen, ex.chosen_ids, ex.chosen_labels)[0]) \
            <= 1e-4
        assert abs(ref[i, 1].item() - row_logps(frozen, ex.rejected_ids, ex.rejected_labels)[0]) \
            <= 1e-4
    assert (policy - ref).abs().max() > 0.1  # the adapter is on again outside the context


def test_pairs_laid_end_to_end_equal_padded_pairs(tok, pairs):
    """data.packing for pairs: the 2B rows in one sequence with per-row attention, no padding."""
    section = ModelSection(config=dict(TINY_LLAMA), tokenizer=str(TOKENIZER), dtype="float32")
    flat_model = build_model(section, 1, 0, packed_len=512).double().eval()
    for ex in pairs:
        ex.ref = (-50.0, -60.0)
    objective = Preference("dpo", 0.1, reference="precomputed")
    padded = objective.collate(pairs, tok.pad_token_id)
    flat = objective.collate(pairs, tok.pad_token_id, flatten=True)
    assert flat["input_ids"].shape[0] == 1 and flat["attention_mask"].all()
    assert flat["input_ids"].numel() == int(padded["attention_mask"].sum())
    with torch.no_grad():
        a, b = objective.loss(tiny(1), padded), objective.loss(flat_model, flat)
    assert abs(a.loss.item() - b.loss.item()) <= TOL
    for key in a.metrics:
        assert abs(a.metrics[key].item() - b.metrics[key].item()) <= TOL * 100, key


def test_empty_micro_batch_adds_nothing(tok):
    objective = Preference("dpo", 0.1, reference="precomputed")
    batch = collate_pairs([], tok.pad_token_id)
    out = objective.loss(tiny(1), batch)
    assert objective.count(batch) == 0 and out.loss.item() == 0.0


# ------------------------------------------ masked pairs and empty micro-batches stay finite
def registered(name: str, tmp_path):
    """Each objective as a recipe builds it (preference data for the preference ones)."""
    data = {} if name == "sft" else {"sources": [{"path": PREF, "format": "preference"}]}
    r = tiny_recipe(tmp_path / "run", data=data)
    r["objective"] = name
    return build_objective(recipe_from_dict(r))


def padding_pair(pad_id: int) -> PairExample:
    """What collate_pairs puts in for a rank whose shard ran out: no labelled token at all."""
    return PairExample([pad_id, pad_id], [IGNORE] * 2, [pad_id, pad_id], [IGNORE] * 2)


@pytest.mark.parametrize("name", sorted(n for n, m in METHODS.items()
                                         if m.formats == ("preference",) or n == "sft"))
@pytest.mark.parametrize("tiled", [False, True])
def test_empty_and_partly_masked_batches_give_finite_loss_and_gradients(tok, pairs, tmp_path,
                                                                       name, tiled):
    """A rank whose shard ran out at an epoch's tail, or a padded eval batch, gets an all-masked
    micro-batch: ORPO's log(1 − e^0) = −inf turned its loss and every gradient into NaN."""
    objective = registered(name, tmp_path)
    model = build_model(ModelSection(config=dict(TINY_LLAMA), tokenizer=str(TOKENIZER),
                                     dtype="float32"), 1, 0, head=METHODS[name].head,
                        pad_token_id=tok.pad_token_id)
    if tiled:  # the run's head with 8-token tiles (set by setup() in a run)
        objective.head = LossHead(plain_head(model), tile=8)
    pad = tok.pad_token_id
    if name == "sft":
        real = [Example(ex.chosen_ids, ex.chosen_labels) for ex in pairs[:2]]
        masked = real + [Example([pad, pad, pad], [IGNORE] * 3)]
    else:
        masked = pairs[:2] + [padding_pair(pad)]
    batches = {"empty": objective.collate([], pad), "masked": objective.collate(masked, pad)}
    if name != "sft":  # the padding pair is masked out, as collate does for an empty list
        batches["masked"]["pair_mask"][-1] = 0.0
        assert objective.count(batches["masked"]) == 2
    for what, batch in batches.items():
        model.zero_grad()
        out = objective.loss(model, batch)
        out.loss.backward()
        assert torch.isfinite(out.loss), (what, out.loss)
        assert all(torch.isfinite(v).all() for v in out.metrics.values()), (what, out.metrics)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads), what
        if what == "empty":  # nothing to learn from: exactly nothing added
            assert out.loss.item() == 0.0 and all(float(g.abs().max()) == 0.0 for g in grads)


@pytest.mark.parametrize("kind, kw", CASES)
def test_pair_losses_masked_rows_are_finite_and_leave_real_rows_alone(kind, kw):
    """Masked rows with no tokens (sums 0, counts 0, so average 0) beside real ones: finite loss
    and gradients everywhere, zero gradient on the masked rows, real rows still the formula."""
    policy, counts, ref = fixed_logps()
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    dead = mask == 0
    policy, counts, ref = policy.clone(), counts.clone(), ref.clone()
    policy[dead], counts[dead], ref[dead] = 0.0, 0.0, 0.0
    policy.requires_grad_(True)
    out = pair_losses(kind, policy, counts, ref, kw["beta"], kw.get("ls", 0.0),
                      kw.get("gamma", 0.0), kw.get("lam", 0.0), mask=mask)
    (out["loss"] * mask).sum().backward()
    assert torch.isfinite(out["loss"]).all() and torch.isfinite(policy.grad).all()
    assert float(policy.grad[dead].abs().max()) == 0.0
    for i in torch.nonzero(~dead).flatten().tolist():
        loss, chosen, rejected = by_hand(kind, *policy[i].tolist(), *counts[i].tolist(),
                                         *ref[i].tolist(), **kw)
        assert abs(out["loss"][i].item() - loss) <= TOL
        assert abs(out["chosen"][i].item() - chosen) <= TOL


# ------------------------------------------------------- pairs through the tiled loss head
class Logits(TorchDispatchMode):
    """Records the most tokens any [..., vocabulary] tensor held, forward and backward (the
    head's transposed weight, [hidden, vocabulary], is no logits)."""

    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.vocab, self.hidden, self.most = vocab, hidden, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == self.vocab \
                    and tuple(t.shape) != (self.hidden, self.vocab):
                self.most = max(self.most, t.numel() // self.vocab)
        return out


@pytest.mark.parametrize("flatten", [False, True])
def test_tiled_pair_logps_equal_full_logits_and_never_build_them(tok, pairs, tmp_path, flatten):
    """The run's tiled head (compute.loss: tiled, 16-token tiles), handed over by setup(): each
    side's summed log-prob equals the model's full logits row by row (independent of the head),
    the loss and every gradient equal the full-logits path, and no tensor of more than one tile
    of [tokens, vocabulary] ever exists — forward or backward."""
    model = tiny(1)
    if flatten:
        model = build_model(ModelSection(config=dict(TINY_LLAMA), tokenizer=str(TOKENIZER),
                                         dtype="float32"), 1, 0, packed_len=512).double()
    vocab = TINY_LLAMA["vocab_size"]

    class R:  # the recipe keys LossHead.for_run reads
        class compute:
            loss, loss_tile_tokens = "tiled", 16

    head, line = LossHead.for_run(R, model, model.config)
    assert head.tiled and line.startswith("tiled: 16 tokens"), line
    objective = registered("orpo", tmp_path)  # no reference: setup only takes the head
    full = copy.deepcopy(objective)
    objective.setup(SimpleNamespace(loss_head=head))
    assert objective.head is head and not full.head.tiled
    batch = objective.collate(pairs, tok.pad_token_id, flatten=flatten)
    tokens = batch["input_ids"].numel()
    assert tokens > 8 * 16  # many tiles

    def run(obj):
        model.zero_grad()
        with Logits(vocab, TINY_LLAMA["hidden_size"]) as seen:
            logps = obj.pair_logps(model, batch)[0]
            out = obj.loss(model, batch)
            out.loss.backward()
        return logps.detach(), out.loss.item(), {n: p.grad.clone()
                                                 for n, p in model.named_parameters()}, seen.most

    logps, loss, grads, most = run(objective)
    ref_logps, ref_loss, ref_grads, ref_most = run(full)
    assert most <= 16 and ref_most >= tokens  # the detector sees the full logits when built
    for i, ex in enumerate(pairs):
        for side, (ids, labels) in enumerate(((ex.chosen_ids, ex.chosen_labels),
                                              (ex.rejected_ids, ex.rejected_labels))):
            assert abs(logps[i, side].item() - row_logps(model, ids, labels)[0]) <= TOL
    assert abs(loss - ref_loss) <= TOL
    for n, g in ref_grads.items():
        assert float((grads[n] - g).abs().max()) <= TOL * max(1.0, float(g.abs().max())), n


# ------------------------------------------------------------------------------------- data
def tokenize(rows, tok, max_seq_len=256, max_prompt_len=None, overflow="truncate"):
    import datasets

    source = DataSource(path="x.jsonl", format="preference")
    stats = DataStats()
    section = DataSection(sources=[source], max_seq_len=max_seq_len, overflow=overflow)
    return tokenize_pairs(datasets.Dataset.from_list(rows), source, tok, section, stats,
                          max_prompt_len), stats


def answer(tok, ids, labels) -> str:
    return tok.decode([t for t, label in zip(ids, labels) if label != IGNORE])


def test_string_pairs_train_on_the_answers_only(tok):
    rows = [{"prompt": "Name a color. ", "chosen": "Blue.", "rejected": "Seven."}]
    (ex,), stats = tokenize(rows, tok)
    assert ex.chosen_ids == tok("Name a color. Blue.").input_ids + [tok.eos_token_id]
    # " B" straddles prompt and answer: it holds answer text, so it is trained on
    assert answer(tok, ex.chosen_ids, ex.chosen_labels).strip() == "Blue.</s>"
    assert answer(tok, ex.rejected_ids, ex.rejected_labels).strip() == "Seven.</s>"
    assert "color" not in answer(tok, ex.chosen_ids, ex.chosen_labels)
    assert stats.rows == 1


def test_conversational_layouts_render_through_the_chat_template(tok):
    user = [{"role": "user", "content": "Name a color."}]
    good, bad = [{"role": "assistant", "content": "Blue."}], [
        {"role": "assistant", "content": "Seven."}]
    layouts = [{"prompt": user, "chosen": good, "rejected": bad},            # explicit prompt
               {"chosen": user + good, "rejected": user + bad},             # implicit prompt
               {"prompt": "Name a color.", "chosen": user + good, "rejected": user + bad}]
    examples = [tokenize([layout], tok)[0][0] for layout in layouts]  # one dataset each
    whole = tok.apply_chat_template(user + good, tokenize=False)
    expected = tok(whole, add_special_tokens=False).input_ids
    for ex in examples:
        assert ex.chosen_ids == expected
        assert answer(tok, ex.chosen_ids, ex.chosen_labels).strip().startswith("Blue.")
        assert "Name a color" not in answer(tok, ex.chosen_ids, ex.chosen_labels)
        assert "Seven." in answer(tok, ex.rejected_ids, ex.rejected_labels)


def test_identical_pairs_are_left_out_and_counted(tok):
    rows = [{"prompt": "Q ", "chosen": "A.", "rejected": "A."},
            {"prompt": "Q ", "chosen": "A.", "rejected": "B."}]
    examples, stats = tokenize(rows, tok)
    assert len(examples) == 1 and stats.dropped_identical == 1
    assert "1 dropped with chosen == rejected" in stats.describe()


def test_the_pairs_report_says_how_long_they_took(tok, monkeypatch):
    """The data report's time is measured around the pairs' tokenization (it said 0.0 s)."""
    import time

    from dpkit.data import load_datasets
    from dpkit.data import preference

    real = preference.PairRows.tokenize

    def slow(*args, **kwargs):
        time.sleep(0.2)
        return real(*args, **kwargs)

    monkeypatch.setattr(preference.PairRows, "tokenize", slow)
    section = DataSection(sources=[DataSource(path=PREF, format="preference")], max_seq_len=96)
    _, _, stats = load_datasets(section, tok, seed=0)
    assert stats.seconds >= 0.2 and f"in {stats.seconds:.1f} s" in stats.describe()


def test_prompt_cut_keeps_its_last_tokens_and_long_answers_are_cut(tok):
    prompt = "one two three four five six seven eight nine ten "
    rows = [{"prompt": prompt, "chosen": "yes " * 30, "rejected": "no."}]
    (ex,), stats = tokenize(rows, tok, max_seq_len=24, max_prompt_len=4)
    full = tokenize(rows, tok)[0][0]
    n_prompt = full.chosen_labels.index(next(x for x in full.chosen_labels if x != IGNORE))
    assert ex.rejected_ids == full.rejected_ids[n_prompt - 4:]
    assert ex.chosen_ids == full.chosen_ids[n_prompt - 4:][:24]
    assert stats.prompt_truncated == 1 and stats.truncated == 1
    assert tokenize(rows, tok, max_seq_len=24, max_prompt_len=4,
                    overflow="drop")[1].dropped_too_long == 1


def test_pairs_not_sharing_their_prompt_turns_are_refused_naming_the_row(tok):
    user = [{"role": "user", "content": "Hi"}]
    rows = [{"chosen": user + [{"role": "assistant", "content": "Hello"}],
             "rejected": [{"role": "user", "content": "Bye"}, {"role": "assistant",
                                                              "content": "x"}]}]
    with pytest.raises(RecipeError, match="row 0: .*do not share"):
        tokenize(rows, tok)


# ----------------------------------------------------------------------------------- recipe
def pref_recipe(tmp_path, objective="dpo", **sections):
    r = tiny_recipe(tmp_path / "run", data={"sources": [{"path": PREF, "format": "preference"}]})
    r["objective"] = objective
    r.update(sections)
    return r


def test_objective_defaults(tmp_path):
    full = build_objective(recipe_from_dict(pref_recipe(tmp_path)))
    assert (full.beta, full.reference) == (0.1, "precomputed")
    lora = build_objective(recipe_from_dict(pref_recipe(tmp_path, peft={"r": 4})))
    assert lora.reference == "adapter_off"
    simpo = build_objective(recipe_from_dict(pref_recipe(tmp_path, "simpo")))
    assert (simpo.beta, simpo.reference, simpo.card()["simpo_gamma"]) == (2.0, None, 1.0)


@pytest.mark.parametrize("change, message", [
    (dict(objective="sft"), "is for `objective: dpo, ipo, simpo, orpo, reward`"),
    (dict(preference={"reference": "adapter_off"}), "needs LoRA"),
    (dict(objective="ipo", preference={"label_smoothing": 0.1}), "no meaning"),
    (dict(objective="orpo", preference={"label_smoothing": 0.1}), "no meaning"),
])
def test_cross_field_checks_name_the_key(tmp_path, change, message):
    r = pref_recipe(tmp_path)
    r.update(change)
    with pytest.raises(RecipeError, match=message):
        recipe_from_dict(r)


def test_preference_objective_needs_preference_data(tmp_path):
    r = tiny_recipe(tmp_path / "run")
    r["objective"] = "orpo"
    with pytest.raises(RecipeError, match="format: preference"):
        recipe_from_dict(r)
    r = tiny_recipe(tmp_path / "run", data={"sources": [{"path": PREF, "format": "preference"}]})
    r["preference"] = {"beta": 0.2}
    with pytest.raises(RecipeError, match="section is for `objective: dpo, ipo, simpo, orpo`"):
        recipe_from_dict(r)


# ---------------------------------------------------------------------- card and report
def test_model_card_and_report_name_the_objective_and_show_rewards(tmp_path):
    import json

    from dpkit.model_card import render_card
    from dpkit.report import write_report

    run = tmp_path / "run"
    run.mkdir()
    dpo = Preference("dpo", 0.25, reference="adapter_off")
    (run / "summary.json").write_text(json.dumps({"steps": 2, "world_size": 2, **dpo.card(),
                                                  "method_card": dpo.card_rows()}))
    lines = [{"step": s, "loss": 0.69 - 0.1 * s, "tokens_seen": 100 * s, "rewards/margins": 0.1 * s,
              "rewards/accuracies": 0.5 + 0.2 * s} for s in (1, 2)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    text = render_card(run, repo_id="me/x", base_model=None, adapter=True, license=None, tags=[],
                       has_plot=False)
    assert "| objective | dpo |" in text and "| beta | 0.25 |" in text
    assert "| reference model | adapter_off |" in text
    report = write_report([run]).read_text()
    assert "## Reward margin" in report and "## Reward accuracy" in report
    assert "objective dpo, beta 0.25" in report and "last reward accuracy 0.9000" in report


# ------------------------------------------------------------------------ numbers with pairs
def test_numbers_asked_for_travel_with_their_pairs_through_the_split_and_the_cache(tok,
                                                                                 tmp_path):
    """A method's data options may ask for a number per pair (`pair_numbers`: a reward model's
    margin); each pair keeps its own through tokenizing, the cache and the eval split, and
    collate gives them in the batch's pair order."""
    import json

    from dpkit.data import load_datasets
    from dpkit.data.cache import load_cached

    rows = [{"prompt": f"Question {i}? ", "chosen": f"Answer number {i}.", "rejected": "No.",
             "score_gap": i / 4} for i in range(20)]  # the chosen answer names its number
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    section = DataSection(sources=[DataSource(path=str(path), format="preference")],
                          eval_fraction=0.25)
    options = {"pair_numbers": {"margin": {"column": "score_gap", "key": "some.setting"}}}
    for train, evals, _ in (load_datasets(section, tok, 0, options=options),
                            load_cached(section, tok, 0, say=lambda m: None, progress=False,
                                        options=options)):
        assert len(train) == 15 and len(evals) == 5
        for ex in train + evals:
            text = tok.decode(ex.chosen_ids)
            assert f"number {round(ex.numbers['margin'] * 4)}." in text, (text, ex.numbers)
        batch = collate_pairs(evals, tok.pad_token_id)
        assert batch["margin"].tolist() == [ex.numbers["margin"] for ex in evals]
        flat = collate_pairs(evals, tok.pad_token_id, flatten=True)
        assert flat["margin"].tolist() == batch["margin"].tolist()
    assert "margin" not in collate_pairs([], tok.pad_token_id)  # a rank whose shard ran out
    plain, _, _ = load_datasets(section, tok, 0)
    assert all(ex.numbers is None for ex in plain)
    assert "margin" not in collate_pairs(plain[:2], tok.pad_token_id)
