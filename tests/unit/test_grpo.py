"""GRPO's formulas against the same formulas written out by hand (loss types, advantages, reward
scaling), the shipped rewards on real answer layouts, the per-sample seeded sampler, and the
recipe checks (one line, exit 2) and the visible line naming reward code."""

import contextlib
import io
import math
import statistics

import pytest
import torch
from conftest import TINY_LLAMA, TOKENIZER, write_recipe

from dpkit.cli import main
from dpkit.objectives.grpo import (
    EPS,
    generate_group,
    group_advantages,
    sample_seed,
    token_losses,
    top_p_filter,
    unit_loss_sum,
)
from dpkit.objectives.grpo_rewards import Rewards, final_number, math_answer
from dpkit.methods.grpo import RewardSpec

TOY = "dpkit:data/letters.prompts.jsonl"


# ---------------------------------------------------------------------------- the loss by hand
def _fixture(seed=0, B=5, T=7):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = logp + (torch.rand(B, T, generator=g, dtype=torch.float64) - 0.5) * 0.8  # clipping
    ref = logp + (torch.rand(B, T, generator=g, dtype=torch.float64) - 0.5)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    lengths = [7, 3, 5, 1, 6][:B]
    mask = torch.zeros(B, T, dtype=torch.float64)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return logp, old, ref, adv, mask, lengths


def _hand_token(lp, o, rf, a, eps_lo, eps_hi, beta):
    """One token's loss: −min(ratio·A, clip(ratio)·A) + β(e^{ρ−π} − (ρ−π) − 1)."""
    ratio = math.exp(lp - o)
    clipped = min(max(ratio, 1 - eps_lo), 1 + eps_hi)
    loss = -min(ratio * a, clipped * a)
    if beta:
        d = rf - lp
        loss += beta * (math.exp(d) - d - 1)
    return loss


def _hand_loss(kind, logp, old, ref, adv, lengths, eps_lo, eps_hi, beta, max_len):
    """TRL's three normalisations written out over one global batch of completions."""
    per_seq = [[_hand_token(float(logp[i, t]), float(old[i, t]), float(ref[i, t]),
                            float(adv[i]), eps_lo, eps_hi, beta) for t in range(n)]
               for i, n in enumerate(lengths)]
    if kind == "dapo":  # every completion token of the batch weighs the same
        return sum(sum(s) for s in per_seq) / sum(lengths)
    if kind == "grpo":  # each completion's token mean, averaged over completions
        return sum(sum(s) / max(len(s), 1) for s in per_seq) / len(lengths)
    return sum(sum(s) for s in per_seq) / (len(lengths) * max_len)  # dr_grpo


@pytest.mark.parametrize("kind", ["dapo", "grpo", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_of_every_type_equals_the_formula_by_hand(kind, beta):
    logp, old, ref, adv, mask, lengths = _fixture()
    eps_lo, eps_hi, max_len = 0.2, 0.28, 9
    per_token, extra = token_losses(logp, old, adv, eps_lo, eps_hi, beta, ref)
    seq_mask = torch.ones(len(lengths), dtype=torch.float64)
    units = sum(lengths) if kind == "dapo" else len(lengths)
    # One process: the whole batch; two ranks: each half's sum, over the global units.
    whole = unit_loss_sum(kind, per_token, mask, seq_mask, max_len) / units
    halves = sum(unit_loss_sum(kind, per_token[sl], mask[sl], seq_mask[sl], max_len)
                 for sl in (slice(0, 2), slice(2, None))) / units
    want = _hand_loss(kind, logp, old, ref, adv, lengths, eps_lo, eps_hi, beta, max_len)
    assert abs(float(whole) - want) < 1e-6 and abs(float(halves) - want) < 1e-6
    assert extra["clip_low"].sum() > 0 or extra["clip_high"].sum() > 0  # clipping exercised
    # a padding completion (seq_mask 0, no tokens) adds nothing
    padded = unit_loss_sum(kind, torch.cat([per_token, per_token[:1]]),
                           torch.cat([mask, torch.zeros_like(mask[:1])]),
                           torch.cat([seq_mask, torch.zeros(1, dtype=torch.float64)]), max_len)
    assert torch.allclose(padded, whole * units)


def test_clip_indicators_by_hand():
    logp, old, _, adv, _, _ = _fixture(1)
    _, extra = token_losses(logp, old, adv, 0.2, 0.3)
    for i in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            r = math.exp(float(logp[i, t] - old[i, t]))
            assert extra["clip_low"][i, t] == float(r < 0.8 and adv[i] < 0)
            assert extra["clip_high"][i, t] == float(r > 1.3 and adv[i] > 0)


def test_mu_one_gradient_is_the_policy_gradient():
    """With old = π detached the ratio is 1 and −∇ℓ = A ∇log π (no clipping at ratio 1)."""
    logp, _, _, adv, mask, lengths = _fixture(2)
    logp = logp.clone().requires_grad_(True)
    per_token, _ = token_losses(logp, logp.detach(), adv, 0.2, 0.2)
    unit_loss_sum("dapo", per_token, mask, torch.ones(len(lengths), dtype=torch.float64),
                  9).backward()
    assert torch.allclose(logp.grad, -adv.unsqueeze(-1) * mask)


# ------------------------------------------------------------------------------ advantages
def test_group_advantages_and_reward_scaling_by_hand():
    rewards = [0.1, 0.5, 0.5, 0.9, 1.0, 1.0, 1.0, 1.0, 0.0, 2.0, 3.0, 7.0]
    G = 4
    t = torch.tensor(rewards, dtype=torch.float64)
    groups = [rewards[i:i + G] for i in range(0, len(rewards), G)]
    batch_std = statistics.stdev(rewards)  # unbiased, as torch.std and TRL
    for scale in ("group", "batch", "none"):
        adv, stds = group_advantages(t, G, scale, batch_std)
        for k, grp in enumerate(groups):
            mean, std = statistics.fmean(grp), statistics.stdev(grp)
            assert abs(float(stds[k]) - std) < 1e-12
            for j, r in enumerate(grp):
                want = {"group": (r - mean) / (std + EPS), "batch": (r - mean) / (batch_std + EPS),
                        "none": r - mean}[scale]
                assert abs(float(adv[k * G + j]) - want) < 1e-9, (scale, k, j)
    # a group of equal rewards has no signal: advantage 0 (not a division by zero)
    assert group_advantages(t, G, "group")[0][4:8].abs().max() == 0


def test_batch_std_from_global_sums_equals_torch_std():
    from dpkit.objectives.grpo import _std

    r = torch.tensor([0.1, 0.5, 0.5, 0.9, 1.0, 3.0], dtype=torch.float64)
    halves = [r[:3], r[3:]]  # what two ranks all-reduce: count, sum, sum of squares
    n, s, q = (sum(float(f(h)) for h in halves) for f in (len, torch.sum,
                                                           lambda h: (h ** 2).sum()))
    assert abs(_std(n, s, q) - float(r.std())) < 1e-12


# --------------------------------------------------------------------------------- rewards
@pytest.mark.parametrize("text,want", [
    ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", 72.0),  # GSM8K's answer column
    ("so the total is 1,234.", 1234.0),
    ("The answer is $\\boxed{\\frac{1}{2}}$ or \\boxed{42}.", 42.0),
    ("\\boxed{-3.5}", -3.5),
    ("no number here", None),
])
def test_final_number(text, want):
    assert final_number(text) == want


def test_math_answer_against_gsm8k_answers():
    answers = ["blah <<6*12=72>>72\n#### 72", "#### 1,200", "#### 5"]
    completions = ["She sold 72 clips. #### 72", "It costs \\boxed{1200} dollars", "6 apples"]
    assert math_answer(completions, answer=answers) == [1.0, 1.0, 0.0]


def test_rewards_weighted_total_and_user_function(tmp_path):
    code = tmp_path / "my_reward.py"
    code.write_text("def shout(completions, **kw):\n"
                    "    return [1.0 if c.isupper() else None for c in completions]\n")
    specs = [RewardSpec(function="format", pattern=r"^<a>.*</a>$", weight=0.5),
             RewardSpec(function="length", target=4, weight=2.0),
             RewardSpec(function=f"{code}:shout", weight=3.0)]
    said = []
    rewards = Rewards(specs, said.append)
    assert said == [f"[dpkit] grpo.rewards: running Python code from {code} ({code}:shout)"]
    completions = ["<a>x</a>", "HELLO"]
    ids = [[1, 2, 3, 4], [1, 2]]
    per_fn, total = rewards.score(completions, ["p", "p"], ids, {})
    assert rewards.names == ["format", "length", "shout"]
    assert per_fn[0] == [1.0, 0.0] and per_fn[1] == [0.0, -0.5]
    assert math.isnan(per_fn[2][0]) and per_fn[2][1] == 1.0
    assert total == [0.5 * 1.0 + 2.0 * 0.0, 0.5 * 0 + 2.0 * -0.5 + 3.0 * 1.0]  # None counts 0


# ---------------------------------------------------------------------------------- sampling
def test_top_p_filter_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.05, 0.3, 0.15]]))
    kept = torch.isfinite(top_p_filter(logits, 0.8))[0].tolist()
    assert kept == [True, False, True, False]  # 0.5 + 0.3 reaches 0.8: the smallest such set
    assert torch.isfinite(top_p_filter(logits, 0.01))[0].tolist() == [True, False, False, False]


def test_a_sample_does_not_depend_on_its_batch_and_leaves_the_global_rng():
    """The reproducible mode's promise at the smallest scale: sample j of a prompt is the same
    generated alone, within its group, or (fast mode) beside another prompt's group; and the
    global RNG is not drawn from."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    a = tok("Write a line using only a b c")["input_ids"]
    b = tok("Write e l o, a longer prompt than the first one")["input_ids"]
    seeds = [[sample_seed(7, 3, 11, j) for j in range(3)],
             [sample_seed(7, 3, 12, j) for j in range(3)]]
    args = (6, [tok.eos_token_id], tok.eos_token_id, 1.0, 0.95, "cpu")
    rng = torch.get_rng_state()
    with torch.no_grad():
        group = generate_group(model, [a], seeds[:1], *args)[0]
        alone = [generate_group(model, [a], [[s]], *args)[0][0] for s in seeds[0]]
        both = generate_group(model, [a, b], seeds, *args)
    assert torch.equal(rng, torch.get_rng_state())
    assert group == alone
    assert len({tuple(c) for c in group}) > 1  # they are samples, not one greedy answer
    # left padding (fast mode) may change rounding; here the tiny fp32 model gives the same
    assert both[0] == group
    assert sample_seed(7, 3, 11, 0) != sample_seed(7, 4, 11, 0) != sample_seed(7, 3, 11, 1)


# ---------------------------------------------------------------------------- recipe checks
def _recipe(tmp_path, **grpo):
    return {
        "model": {"config": dict(TINY_LLAMA), "tokenizer": str(TOKENIZER), "dtype": "float32"},
        "data": {"sources": [{"path": TOY, "format": "prompts"}], "max_seq_len": 96},
        "train": {"global_batch_size": 4, "micro_batch_size": 1, "max_steps": 2},
        "zero": {"stage": 2}, "objective": "grpo",
        "grpo": {"group_size": 2, "max_completion_len": 8,
                 "rewards": [{"function": "char_share"}], **grpo},
        "output": {"dir": str(tmp_path / "run"), "save_model": False},
    }


def _validate(path):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = main(["validate", str(path), "--nproc-per-node", "2"])
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("grpo,key", [({"rewards": [{"function": "nope"}]}, "grpo.rewards"),
                                      ({"rewards": [{"function": "format"}]}, "pattern")])
def test_unsupported_settings_are_refused_in_one_line(tmp_path, grpo, key):
    code, _, err = _validate(write_recipe(tmp_path / "r.yaml", _recipe(tmp_path, **grpo)))
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and key in lines[0], err


def test_validate_names_the_reward_code_it_would_run(tmp_path):
    code_file = tmp_path / "rw.py"
    code_file.write_text("raise SystemExit('validate must not import me')\n")
    r = _recipe(tmp_path, rewards=[{"function": f"{code_file}:f"}])
    code, out, err = _validate(write_recipe(tmp_path / "r.yaml", r))
    assert code == 0, err
    lines = [ln for ln in out.splitlines() if "runs Python code" in ln]
    assert len(lines) == 1 and str(code_file) in lines[0], out


# ------------------------------------------------------- the tiled head and μ > 1, by hand
def _tiny_policy(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}
    return LlamaForCausalLM(LlamaConfig(**cfg)).double()  # fp64: resolves 1e-6 on sums


def _objective(**grpo):
    from dpkit.methods.grpo import GRPOSection
    from dpkit.objectives.grpo import GRPO

    settings = GRPOSection(group_size=2, max_completion_len=6, temperature=0.7,
                           rewards=[{"function": "char_share"}], **grpo)
    return GRPO(settings)


def _sequences():
    """(prompt, completion, advantage, masked) rows as a rollout gives them: two groups of 2,
    one completion truncated and masked, lengths that differ (padding)."""
    return [([5, 6, 7], [8, 9, 10, 11], 0.9, False), ([5, 6, 7], [12, 13], -0.9, False),
            ([20, 21], [22, 23, 24, 25, 26, 27], 0.7, True), ([20, 21], [28], -0.7, False)]


def _hand_logps(model, batch, temperature):
    """log softmax(logits / T) of each label through the model's full logits."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1].double() / temperature, dim=-1)
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    return logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask, mask, logp


def test_grpo_through_the_tiled_head_equals_the_full_logits():
    """`compute.loss: tiled` for GRPO: log-probs at the sampling temperature, the entropy and
    the gradient of the loss equal the full-logits path's (tiles of 3 of the 7 labelled
    tokens, so several tiles and a short last one)."""
    from dpkit.objectives.head import LossHead, plain_head

    model = _tiny_policy()
    outs = []
    for head in (LossHead(), LossHead(plain_head(model), tile=3)):
        model.zero_grad()
        obj = _objective(beta=0.0)
        obj.head = head
        batch = obj.collate_sequences(_sequences(), 0)
        obj.global_tokens, obj.global_completions = 7.0, 4.0
        out = obj.loss(model, batch)
        logp, ent = obj.token_logps(model, batch)
        out.loss.backward()
        outs.append((logp.detach(), ent, out.loss.detach(),
                     [p.grad.clone() for p in model.parameters()]))
    (lp_a, en_a, l_a, g_a), (lp_b, en_b, l_b, g_b) = outs
    hand, mask, full = _hand_logps(model, obj.collate_sequences(_sequences(), 0), 0.7)
    assert torch.allclose(lp_a, hand.detach(), atol=1e-9)
    assert (lp_a - lp_b).abs().max() < 1e-6 and (en_a - en_b).abs().max() < 1e-6
    want_ent = (-(full.exp() * full).sum(-1) * mask).detach()
    assert (en_b - want_ent).abs().max() < 1e-6 and en_b[~mask].abs().max() == 0
    assert abs(float(l_a - l_b)) < 1e-6
    assert max(float((a - b).abs().max()) for a, b in zip(g_a, g_b)) < 1e-6
    assert sum(float(g.abs().sum()) for g in g_b) > 0


class _Env:
    is_main, device, world_size = True, torch.device("cpu"), 1


def _kept_step(obj, model, iteration):
    """The micro-batch of step `iteration` of a rollout batch of the prompts above, as the
    loop hands it to the objective (the feed marks the iteration)."""
    from dpkit.objectives.grpo import PromptExample, _Kept, _Prompt

    seqs = _sequences()
    prompts = [_Prompt(PromptExample(seqs[0][0]), 3, 0), _Prompt(PromptExample(seqs[2][0]), 8, 0)]
    if iteration == 0:  # what the rollout keeps (its completions and advantages)
        obj._kept = _Kept(0, {"reward": 0.5}, 7.0, 4.0)
        keys = [(3, 0), (3, 1), (8, 0), (8, 1)]
        for key, (_, c, a, masked) in zip(keys, seqs):
            obj._kept.entries[key] = [c, a, masked, None, None]
        batch = {**obj.collate_sequences(seqs, 0), "keys": keys, "keep": True}
        obj.prepare(model, [batch], _Env())
        obj.global_tokens, obj.global_completions = 7.0, 4.0
        return batch
    return obj.rollout(model, [{"grpo_prompts": prompts, "pad_id": 0,
                                "iteration": iteration}], _Env())[0]


@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_second_step_of_a_rollout_batch_clips_against_the_kept_old_log_probs(beta, tmp_path):
    """μ = 2: the old log-probs are the policy's right after the rollout, computed once; after
    an update the second step's loss is the clipped-ratio formula by hand against them (and the
    reference's, kept too), the clip acts, and the batch saved in a checkpoint gives the same
    tensors back."""
    model = _tiny_policy()
    ref_model = _tiny_policy()  # the frozen copy: the initial weights
    obj = _objective(iterations=2, beta=beta, epsilon=0.05)
    obj.reference = "frozen_copy" if beta else None
    obj.ref_engine, obj.ref_head = ref_model, obj.head
    first = _kept_step(obj, model, 0)
    hand_old, mask, _ = _hand_logps(model, first, 0.7)
    assert torch.allclose(first["old_logp"], hand_old.detach(), atol=1e-12)
    out = obj.loss(model, first)
    assert float(out.metrics["clip_ratio/region_mean"]) == 0  # ratio 1 at the first step
    out.loss.backward()
    with torch.no_grad():  # an update large enough to move ratios past 1 ± ε
        for p in model.parameters():
            p -= 0.5 * p.grad / (p.grad.norm() + 1e-12)
    obj.global_tokens = -1.0  # an eval pass in between overwrote it: the batch's comes back
    state = obj.state_dict(_Env())
    torch.save(state, tmp_path / "objective.pt")
    second = _kept_step(obj, model, 1)
    assert torch.equal(second["old_logp"], first["old_logp"])
    assert torch.equal(second["input_ids"], first["input_ids"])
    out = obj.loss(model, second)
    new, _, _ = _hand_logps(model, second, 0.7)
    ref, _, _ = _hand_logps(ref_model, second, 0.7)
    adv = [0.9, -0.9, 0.7, -0.7]
    want, tokens, clipped = 0.0, 0, 0
    for i in range(4):
        for t in range(mask.shape[1]):
            if not mask[i, t]:
                continue
            want += _hand_token(float(new[i, t]), float(hand_old[i, t]), float(ref[i, t]),
                                adv[i], 0.05, 0.05, beta)
            r = math.exp(float(new[i, t] - hand_old[i, t]))
            clipped += (r < 0.95 and adv[i] < 0) or (r > 1.05 and adv[i] > 0)
            tokens += 1
    assert tokens == 7 and clipped > 0  # the masked truncated completion adds nothing
    assert abs(float(out.loss) - want) < 1e-6  # dapo: the sum over tokens (÷ global tokens)
    assert float(out.metrics["clip_ratio/region_mean"]) == clipped  # × units / tokens = 1
    if beta:
        assert float(out.metrics["kl"]) > 0
    # a resume: a fresh objective loads the checkpoint's batch and builds the same step
    again = _objective(iterations=2, beta=beta, epsilon=0.05)
    again.load_state_dict(torch.load(tmp_path / "objective.pt", weights_only=True))
    resumed = _kept_step(again, model, 1)
    for key in ("input_ids", "labels", "advantages", "old_logp", *(["ref_logp"] if beta else [])):
        assert torch.equal(resumed[key], second[key]), key
    assert again.step_metrics() == {"reward": 0.5} and again.global_tokens == 7.0
    assert again.state_dict(_Env()) is None  # the batch's last step: nothing left to keep


def test_repeated_feed_serves_each_batch_mu_times_and_counts_it_once():
    from dpkit.data.feed import RepeatedFeed

    class Inner:  # a feed whose batches name their step
        steps_per_epoch, last_counts = 3, [0, 0]

        def micro_batches(self, step):
            self.last_counts = [10 * step + 1, 1]
            return [{"step": step}]

        def step_rows(self, step):
            return [step]

        def epoch(self, step):
            return step // 3

        def state_dict(self):
            return {}

    feed = RepeatedFeed(Inner(), 2)
    assert feed.steps_per_epoch == 6
    got = [(feed.micro_batches(s), list(feed.last_counts), feed.epoch(s)) for s in range(8)]
    assert [b[0] for b, _, _ in got] == [{"step": s // 2, "iteration": s % 2} for s in range(8)]
    assert [c for _, c, _ in got] == [[10 * (s // 2) + 1, 1] if s % 2 == 0 else [0, 0]
                                      for s in range(8)]
    assert [e for _, _, e in got] == [0] * 6 + [1] * 2 and feed.step_rows(5) == [2]


def test_iterations_and_a_full_reference_pass_validate(tmp_path):
    r = _recipe(tmp_path, iterations=2, beta=0.1)
    code, out, err = _validate(write_recipe(tmp_path / "r.yaml", r))
    assert code == 0, err


# ----------------------------------------------------------------- fast mode's packed forwards
@pytest.mark.parametrize("attention,tiled", [("dpkit_rows", False), ("sdpa", False),
                                              ("dpkit_rows", True)])
def test_packed_forward_equals_the_padded_forward(attention, tiled):
    """Fast mode lays a micro-batch's prompt + completion sequences end to end (no padding) for
    the policy forward: per-token log-probs, entropies, the loss and its gradient equal the
    padded batch's (reproducible mode's layout), row by row — with dpkit's per-row attention
    and with transformers' own packed path (sdpa, block mask from the restarting positions),
    through the full logits and the tiled head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from dpkit.attention import implementation_for
    from dpkit.methods.grpo import GRPOSection
    from dpkit.objectives.grpo import GRPO

    torch.manual_seed(0)
    cfg = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    if attention == "dpkit_rows":
        model.set_attn_implementation(implementation_for("sdpa", True, model.config, 64))
    g = torch.Generator().manual_seed(1)
    vocab = cfg["vocab_size"]
    # groups of very different lengths: prompts 3-9 tokens, completions 1-12, one masked
    seqs = [(torch.randint(3, vocab, (p,), generator=g).tolist(),
             torch.randint(3, vocab, (c,), generator=g).tolist(), a, m)
            for p, c, a, m in [(5, 12, 0.7, False), (5, 1, -1.2, False), (9, 4, 0.3, True),
                               (3, 7, -0.1, False), (9, 10, 1.5, False)]]
    out = {}
    for mode in ("reproducible", "fast"):
        rule = {"function": "char_share"}
        obj = GRPO(GRPOSection(rollout=mode, rewards=[rule], max_completion_len=12))
        if tiled:  # through the tiled loss head (compute.loss: tiled), tiles of 5 tokens
            from dpkit.objectives.head import LossHead, plain_head

            obj.head = LossHead(plain_head(model), tile=5)
        batch = obj.collate_sequences(seqs, pad_id=0)
        assert ("flat" in batch) == (mode == "fast")
        if mode == "fast":  # no padding left: every token is one of a sequence's
            assert batch["flat"]["input_ids"].numel() == sum(len(p) + len(c) for p, c, _, _ in seqs)
        obj.global_tokens, obj.global_completions = 30.0, 5.0
        model.zero_grad()
        logp, entropy = obj.token_logps(model, batch)
        obj.loss(model, batch).loss.backward()
        grad = torch.cat([p.grad.flatten() for p in model.parameters()])
        out[mode] = (logp.detach(), entropy, grad)
    (lp, ent, grad), (lp_f, ent_f, grad_f) = out["reproducible"], out["fast"]
    assert lp.shape == lp_f.shape and bool((lp != 0).any())
    torch.testing.assert_close(lp_f, lp, atol=1e-6, rtol=0)
    torch.testing.assert_close(ent_f, ent, atol=1e-6, rtol=1e-6)  # entropies ~log(vocab) ≈ 7.6
    torch.testing.assert_close(grad_f, grad, atol=1e-6, rtol=1e-5)
    # a micro-batch with under 10% padding stays padded (per-row attention would cost more)
    even = [(p, c[:1] * 4, a, m) for p, c, a, m in seqs if len(p) == 5]
    fast = GRPO(GRPOSection(rollout="fast", rewards=[{"function": "char_share"}]))
    assert "flat" not in fast.collate_sequences(even, pad_id=0)
