"""GRPO: group relative policy optimisation (Shao et al. 2024) — online RL with verifiable
rewards. Its rows are prompts (`format: prompts`, the row kind `PROMPTS` below); every step, each
data-parallel rank generates G completions of each of its prompts (`rollout`), scores them with
the recipe's reward functions (dpkit/objectives/grpo_rewards.py) and trains on them.

Per completion i of a prompt's group, with rewards r and tokens t (π the policy, π_old the policy
that sampled, ρ the reference):
    A_i = (r_i − mean(r_group)) / (std + 1e-4)      std: of the group (`scale_rewards: group`,
                                                    unbiased, as torch.std), of the global batch
                                                    (`batch`), or 1 (`none`: A_i = r_i − mean)
    ratio_t = π(t) / π_old(t),   ℓ_t = −min(ratio_t A_i, clip(ratio_t, 1 − ε_low, 1 + ε_high) A_i)
                                       + β (ρ(t)/π(t) − log(ρ(t)/π(t)) − 1)
    dapo:    Σ_tokens ℓ_t / (completion tokens of the global batch)
    grpo:    Σ_i (Σ_t ℓ_t / |i|) / (completions of the global batch)
    dr_grpo: Σ_i (Σ_t ℓ_t / max_completion_len) / (completions of the global batch)
(TRL's GRPOTrainer: `loss_type` dapo, grpo and dr_grpo.) So the unit is the completion token
(dapo) or the completion (grpo, dr_grpo): the loss is the sum over this rank's units, and the loop
(dpkit/step.py) divides by the global units, counted after the rollout — the same step on any
world size. With one optimizer step per rollout (μ = 1, `grpo.iterations`), π_old is π detached:
the ratio is 1 and only its gradient is used, as in TRL. With μ > 1 the loop serves each batch
for μ steps (dpkit/data/feed.py RepeatedFeed); π_old's log-probs (and ρ's) are computed once, in
`prepare` right after the rollout, and kept with the batch (`_Kept`, saved in a checkpoint between
its steps). The log-probs go through the run's loss head (tiled: no full logits) at the sampling
temperature; ρ is the base with the adapter off (LoRA) or a frozen copy of the initial model
(dpkit/objectives/reference.py).

Reproducible rollouts (the default): a prompt's G samples are generated as one unpadded batch
(the same shape on any world size, so the same rounding), and sample j of row k at step s draws
its tokens by Gumbel-max from its own generator seeded by (train.seed, s, k, j) — never from the
global RNG, which rollouts leave as they found it. One process and N ranks then generate the same
completions from the same weights. Weights that differ by rounding (a gradient all-reduced in
another order) can still flip a near-tied token: docs/grpo.md. `rollout: fast` generates a rank's
prompts in one left-padded batch from the same generators: faster, and the padding may change the
rounding.

Under ZeRO-3 the parameters are gathered once per rollout phase (dpkit/eval/generate.py
`full_weights`), not once per generated token.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from dpkit import distributed
from dpkit.data.packing import flatten_padded
from dpkit.data.rows import RowKind
from dpkit.data.tokenize import IGNORE, map_source
from dpkit.errors import Problem, RecipeError
from dpkit.objectives.base import LossOut, Objective
from dpkit.objectives.head import LossHead, shifted_labels
from dpkit.objectives.sft import model_inputs

EPS = 1e-4  # added to the std before dividing (TRL's)
PACK_MIN_PADDING = 0.1  # fast mode packs a micro-batch whose padding is at least this share


# ----------------------------------------------------------------------------- the formulas
def group_advantages(rewards: torch.Tensor, group: int, scale: str,
                     batch_std: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, each group's std) for rewards laid out group after group ([n·G]).
    `batch_std`: the global batch's std for `scale: batch` (computed over all ranks)."""
    r = rewards.view(-1, group)
    mean = r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, keepdim=True)  # unbiased, as TRL's
    centred = (r - mean).reshape(-1)
    if scale == "group":
        return centred / (std.expand_as(r).reshape(-1) + EPS), std.view(-1)
    if scale == "batch":
        return centred / (batch_std + EPS), std.view(-1)
    return centred, std.view(-1)


def token_losses(logp: torch.Tensor, old: torch.Tensor, advantages: torch.Tensor,
                 eps_low: float, eps_high: float, beta: float = 0.0,
                 ref: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token loss ℓ [B, T] (unmasked) and per-token indicators (clipped low/high, KL)."""
    ratio = torch.exp(logp - old)
    adv = advantages.unsqueeze(-1)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    loss = -torch.min(ratio * adv, clipped * adv)
    extra = {"clip_low": ((ratio < 1 - eps_low) & (adv < 0)).to(logp.dtype),
             "clip_high": ((ratio > 1 + eps_high) & (adv > 0)).to(logp.dtype)}
    if beta:
        d = ref - logp
        kl = torch.exp(d) - d - 1
        loss = loss + beta * kl
        extra["kl"] = kl
    return loss, extra


def unit_loss_sum(kind: str, per_token: torch.Tensor, mask: torch.Tensor,
                  seq_mask: torch.Tensor, max_completion_len: int) -> torch.Tensor:
    """The loss summed over this batch's units (tokens for dapo, completions otherwise); the
    loop divides by the global units. `mask` [B, T]: completion tokens trained on; `seq_mask`
    [B]: real completions (1) or padding (0)."""
    summed = (per_token * mask).sum(-1)
    if kind == "dapo":
        return (summed * seq_mask).sum()
    if kind == "grpo":
        return (summed / mask.sum(-1).clamp(min=1) * seq_mask).sum()
    if kind == "dr_grpo":
        return (summed / max_completion_len * seq_mask).sum()
    raise ValueError(f"unknown grpo loss type {kind!r}")


# ----------------------------------------------------------------------------------- sampling
def sample_seed(seed: int, step: int, row: int, sample: int) -> int:
    """The generator seed of one sample: a hash of (seed, step, row, sample), 63 bits."""
    digest = hashlib.sha256(f"grpo/{seed}/{step}/{row}/{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class GumbelSampler:
    """A logits processor for greedy `generate` that turns it into sampling: each row adds
    Gumbel noise from its own generator to its (temperature-scaled, top-p-filtered) log-probs,
    so argmax draws a sample — the same one whatever other rows share the batch."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float):
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.temperature, self.top_p = temperature, top_p

    def __call__(self, input_ids, scores):
        logits = scores.float() / self.temperature
        if self.top_p < 1.0:
            logits = top_p_filter(logits, self.top_p)
        # One uniform draw per vocabulary entry per row and step, float64 on the CPU: the same
        # numbers on any device; -log(-log u) is a Gumbel(0, 1) draw.
        u = torch.stack([torch.rand(logits.shape[-1], generator=g, dtype=torch.float64)
                         for g in self.generators])
        gumbel = -torch.log(-torch.log(u.clamp(min=1e-300)))
        return logits.double() + gumbel.to(logits.device)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """-inf outside the smallest set of most likely tokens whose probability reaches top_p (the
    most likely token always stays)."""
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs  # probability mass strictly before each token
    drop_sorted = before >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def generate_group(model, prompts: list[list[int]], seeds: list[list[int]],
                   max_new_tokens: int, eos_ids: list[int], pad_id: int, temperature: float,
                   top_p: float, device) -> list[list[list[int]]]:
    """Completions (token ids, eos included when reached) of each prompt's samples, generated in
    ONE batch: unpadded when all prompts have one length (a single prompt's group), else
    left-padded (`rollout: fast`)."""
    from transformers import GenerationConfig, LogitsProcessorList

    rows = [(p, s) for p, ss in zip(prompts, seeds) for s in ss]
    width = max(len(p) for p, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (p, _) in enumerate(rows):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                              eos_token_id=eos_ids, pad_token_id=pad_id)
    sampler = GumbelSampler([s for _, s in rows], temperature, top_p)
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                         generation_config=config,
                         logits_processor=LogitsProcessorList([sampler]))
    completions = []
    for row in out[:, width:].tolist():
        end = next((k + 1 for k, t in enumerate(row) if t in eos_ids), len(row))
        completions.append(row[:end])
    g = len(seeds[0])
    return [completions[i * g:(i + 1) * g] for i in range(len(prompts))]


# ----------------------------------------------------------------------------------- the rows
@dataclass
class PromptExample:
    prompt_ids: list[int]
    columns: dict = field(default_factory=dict)
    """The row's other columns (and `prompt`, as the data holds it): what rewards read."""
    position_ids = None

    @property
    def input_ids(self) -> list[int]:
        return self.prompt_ids

    def sample_row(self) -> tuple[list[int], list[int]]:
        """Eval generations' prompt: the whole row (nothing is trained on in it)."""
        return self.prompt_ids, [IGNORE] * len(self.prompt_ids)


def _in_chat(prompt, tokenizer) -> bool:
    return not isinstance(prompt, str) or bool(getattr(tokenizer, "chat_template", None))


def render_prompt(prompt, tokenizer) -> tuple[str, bool]:
    """(text, plain?): message lists — and strings, when the tokenizer has a chat template, as
    one user turn — end in the assistant's header; plain strings are used as they are."""
    if not _in_chat(prompt, tokenizer):
        return prompt, True
    turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True), False


def encode_prompts(batch: dict, indices: list[int], source, tokenizer,
                   max_prompt_len: int) -> dict:
    col = source.column("prompt")
    out = {"prompt_ids": [], "prompt_cut": [], "columns": []}
    keys = list(batch)
    for n, i in enumerate(indices):
        row = {k: batch[k][n] for k in keys}
        prompt = row.get(col)
        if not isinstance(prompt, (str, list)) or not prompt:
            raise ValueError(f"row {i}: `{col}` must be a non-empty string or message list")
        text, plain = render_prompt(prompt, tokenizer)
        ids = list(tokenizer(text, add_special_tokens=plain)["input_ids"])
        out["prompt_cut"].append(len(ids) > max_prompt_len)
        out["prompt_ids"].append(ids[-max_prompt_len:])
        others = {k: v for k, v in row.items() if k != col}
        out["columns"].append(json.dumps({"prompt": prompt, **others}, default=str))
    return out


def prompt_features():
    from datasets import Features, Value
    from datasets import Sequence as Seq

    return Features({"prompt_ids": Seq(Value("int32")), "prompt_cut": Value("bool"),
                     "columns": Value("string")})


class PromptRows(RowKind):
    """Prompt-only rows (`format: prompts`): tokenized prompts, their other columns kept (as
    JSON) for the reward functions. `options["max_prompt_len"]` keeps each prompt's last
    tokens."""

    @property
    def format(self):
        from dpkit.data.formats import Format

        def render(row, source, tokenizer, completion_only):
            raise TypeError("prompt rows have no answer to train on: GRPO generates it")

        def prompt(text, source, tokenizer, first_row):
            return render_prompt(text, tokenizer)

        return Format("prompts", ("prompt",), render, prompt,
                      doc="prompts alone; the other columns reach the reward functions")

    def check(self, raw, tokenizer):
        problems, index = [], {"sources": 0, "eval_sources": 0}
        for kind, source, ds in raw:
            where = f"data.{kind}[{index[kind]}]"
            index[kind] += 1
            if len(ds) == 0:
                continue
            prompt = ds[0].get(source.column("prompt"))
            if not isinstance(prompt, (str, list)):
                problems.append(Problem(where, f"row 0 of '{source.path}': the prompt must be a "
                                        f"string or a message list, got {type(prompt).__name__}",
                                        "check the column mapping"))
            elif isinstance(prompt, list) and not getattr(tokenizer, "chat_template", None):
                problems.append(Problem(f"{where}.format", "conversational prompts need a chat "
                                        "template and the tokenizer has none",
                                        "set model.chat_template (e.g. chatml)"))
        if problems:
            raise RecipeError(problems)

    def tokenize(self, ds, source, tokenizer, section, options, num_proc, fingerprint=None,
                 cache_file=None):
        # One process: a prompt's tokenization is cheap next to its rollouts.
        return map_source(ds, encode_prompts, source, prompt_features(),
                          f"tokenizing prompts of {source.path}",
                          dict(source=source, tokenizer=tokenizer,
                               max_prompt_len=options.get("max_prompt_len")
                               or section.max_seq_len),
                          fingerprint=fingerprint, cache_file=cache_file, with_indices=True,
                          layouts="docs/grpo.md for the prompt layouts")

    def assemble(self, parts, section, seed, need_train=True):
        from dpkit.data import mixture
        from dpkit.data.tokenize import DataStats

        stats, eval_stats = DataStats(), DataStats()
        train, evals, sizes, eval_sizes = [], [], [], []
        for kind, source, tds in parts:
            target, st, n = ((train, stats, sizes) if kind == "sources" else
                             (evals, eval_stats, eval_sizes))
            table = tds.data.table if hasattr(tds.data, "table") else tds.data
            ids = table.column("prompt_ids").to_pylist()
            cols = table.column("columns").to_pylist()
            cut = table.column("prompt_cut").to_pylist()
            target.extend(PromptExample(i, json.loads(c)) for i, c in zip(ids, cols))
            n.append(len(ids))
            st.rows += len(ids)
            st.prompt_truncated += sum(cut)
            st.tokens += sum(len(i) for i in ids)
            st.per_source[source.path] = st.per_source.get(source.path, 0) + len(ids)
        train, sizes, evals = mixture.eval_split(train, sizes, evals, section, seed)
        if need_train and not train:
            raise RecipeError.one("data.sources", "no prompts", "check the data")
        train, evals = mixture.arrange(train, sizes, evals, eval_sizes, section, seed, stats)
        return train, evals, stats


PROMPTS = PromptRows()


# ------------------------------------------------------------------------------ the objective
@dataclass
class _Kept:
    """A rollout batch kept for its μ optimizer steps (`grpo.iterations` > 1)."""
    step: int | None  # the data step its prompts came from (None: this rank had none)
    metrics: dict     # the rollout's metrics (global), logged again on each of its steps
    tokens: float     # completion tokens trained on, global batch
    completions: float
    entries: dict = field(default_factory=dict)
    """(data row, sample) → [completion ids, advantage, masked, old log-probs, reference
    log-probs] (log-probs: the completion's labelled tokens, filled by prepare()). A row a
    mixture draws twice into one batch has one entry: its samples are seeded by (step, row,
    sample), so both copies hold the same completions, rewards and log-probs."""
    iteration: int = 0  # the last of its steps trained (0 … μ−1)


def _placed(values: list, batch: dict) -> torch.Tensor:
    """Per-sequence log-probs of the labelled tokens back in a [B, T−1] tensor (0 elsewhere)."""
    mask = batch["labels"][:, 1:] != IGNORE
    out = torch.zeros(mask.shape, dtype=values[0].dtype if values else torch.float32)
    for i, v in enumerate(values):
        out[i][mask[i]] = v
    return out


@dataclass
class _Prompt:
    example: PromptExample
    row: int    # the row's index in the data: with the step, what seeds its samples
    step: int


class GRPO(Objective):
    name = "grpo"
    packs_rows = False
    metric_names = ("entropy", "clip_ratio/low_mean", "clip_ratio/high_mean",
                    "clip_ratio/region_mean")

    def __init__(self, settings, seed: int = 0, max_seq_len: int = 512, lora: bool = False):
        self.s = settings
        self.kind = settings.loss_type
        self.unit = "completion tokens" if self.kind == "dapo" else "completions"
        self.G = settings.group_size
        self.eps_low, self.eps_high = settings.epsilon, settings.resolved_epsilon_high()
        self.beta = settings.beta
        # β > 0: the reference is the base with the adapter off (LoRA), else a frozen copy of
        # the initial model partitioned like the policy (dpkit/objectives/reference.py)
        self.reference = (None if self.beta == 0 else "adapter_off" if lora else "frozen_copy")
        self.steps_per_batch = settings.iterations  # μ: the loop serves each batch μ times
        self.rows_per_item = self.G
        self.rollout_load = {"group": self.G, "every": settings.iterations,
                             "prompt_len": settings.resolved_max_prompt_len(max_seq_len),
                             "completion_len": settings.max_completion_len,
                             "batched": settings.rollout == "fast"}
        self.seed = seed
        if self.beta > 0:
            self.metric_names = (*GRPO.metric_names, "kl")
        self.rewards = None
        self.head = LossHead()  # full logits until setup() knows the run's head
        self.ref_engine = self.ref_head = None  # the frozen copy (reference "frozen_copy")
        self._step_metrics: dict[str, float] = {}
        self._kept: _Kept | None = None  # the rollout batch trained on for μ steps (μ > 1)
        self.samples: list[dict] = []  # the last rollout's logged completions (rank 0)

    @classmethod
    def from_recipe(cls, recipe) -> GRPO:
        from dpkit.methods.grpo import GRPOSection

        return cls(recipe.grpo or GRPOSection(), recipe.train.seed, recipe.data.max_seq_len,
                   lora=recipe.peft is not None)

    def setup(self, run) -> None:
        from dpkit.objectives.grpo_rewards import Rewards

        self.layout = run.layout  # whether generation must gather partitioned parameters
        self.tokenizer = run.tokenizer
        self.head = run.loss_head  # tiled as compute.loss says, like SFT: no full logits
        self.rewards = Rewards(self.s.rewards, run.say)
        self.run = run
        needed = {r.column for r in self.s.rewards
                  if r.function in ("math_answer", "char_share")}
        have = set(run.train_rows[0].columns) if run.train_rows else set()
        missing = sorted(needed - have)
        if missing:
            raise RecipeError.one("grpo.rewards", f"the data has no column {missing[0]!r} "
                                  f"(its columns: {sorted(have)})",
                                  "set the reward's `column` to the answer column")
        if self.reference == "frozen_copy":
            from dpkit.objectives.reference import frozen_copy

            self.ref_engine, self.ref_head, line = frozen_copy(run)
            run.say(f"[dpkit] grpo: {line}")
        if self.s.rollout == "fast":
            self._rows_attention(run, [run.engine, self.ref_engine])

    @staticmethod
    def _rows_attention(run, engines) -> None:
        """Fast mode's packed forwards: per-row attention where the model allows it (as
        `data.packing` picks it for SFT, dpkit/attention.py), not sdpa under a dense block mask
        over the whole row — for the policy and a frozen reference copy alike. Generation
        switches back to sdpa (eval/generate.py plain_attention)."""
        from dpkit.attention import implementation_for

        requested = run.recipe.model.attn_implementation
        chosen = requested
        for engine in (e for e in engines if e is not None):
            module = getattr(engine, "module", engine)
            target = module.get_base_model() if hasattr(module, "get_base_model") else module
            chosen = implementation_for(requested, True, target.config,
                                        run.recipe.data.max_seq_len)
            if chosen != requested:
                target.set_attn_implementation(chosen)
        run.attention = chosen
        run.say(f"[dpkit] grpo: fast rollouts; each micro-batch's sequences laid end to end for "
                f"the forwards (where that removes ≥ {PACK_MIN_PADDING:.0%} padding), attention "
                f"{chosen}")

    # ------------------------------------------------------------------------------- data
    def step_examples(self, rows, picks, step_rows, step):
        return [[_Prompt(rows[i], i, step) for i in idx] for idx in picks]

    def collate(self, examples: list, pad_id: int, flatten: bool = False) -> dict:
        return {"grpo_prompts": list(examples), "pad_id": pad_id}

    def count(self, batch: dict) -> int:
        if self.kind == "dapo":
            return int((batch["labels"][:, 1:] != IGNORE).sum())
        return int(batch["seq_mask"].sum())

    # ---------------------------------------------------------------------------- rollouts
    def eos_ids(self, model) -> list[int]:
        ids = set()
        for value in (getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                      self.tokenizer.eos_token_id):
            if isinstance(value, int):
                ids.add(value)
            elif value:
                ids.update(value)
        return sorted(ids)

    def generate(self, engine, prompts: list[_Prompt], env) -> list[list[list[int]]]:
        """Every prompt's G completions. Collective under ZeRO-3: every rank calls it once per
        rollout phase (the parameters are gathered once, whatever its number of prompts)."""
        from dpkit.eval.generate import full_weights, plain_attention

        s, out = self.s, []
        module = engine.module
        was_training = module.training
        pad = self.tokenizer.pad_token_id
        with full_weights(engine, self.layout) as model, plain_attention(model), torch.no_grad():
            model.eval()
            eos = self.eos_ids(model)
            seeds = [[sample_seed(self.seed, p.step, p.row, j) for j in range(self.G)]
                     for p in prompts]
            args = (s.max_completion_len, eos, pad, s.temperature, s.top_p, env.device)
            if s.rollout == "fast" and prompts:
                out = generate_group(model, [p.example.prompt_ids for p in prompts], seeds,
                                     *args)
            else:
                for p, ss in zip(prompts, seeds):
                    out.extend(generate_group(model, [p.example.prompt_ids], [ss], *args))
        module.train(was_training)
        return out

    def rollout(self, engine, micro_batches: list[dict], env) -> list[dict]:
        """A step's sequences: new completions of its prompts, or — on the 2nd to μth
        optimizer step of a rollout batch (`grpo.iterations`; the feed marks each step's
        `iteration`) — the kept ones, with the old (and reference) log-probs computed once
        after their rollout."""
        iteration = micro_batches[0].get("iteration") if micro_batches else None
        if iteration:  # the same on every rank: no collective here
            return self._kept_batches(micro_batches, iteration)
        return self._new_rollout(engine, micro_batches, env, keep=iteration == 0)

    def _new_rollout(self, engine, micro_batches: list[dict], env, keep: bool) -> list[dict]:
        prompts = [p for b in micro_batches for p in b["grpo_prompts"]]
        pad_id = micro_batches[0]["pad_id"] if micro_batches else 0
        rng = torch.get_rng_state()
        completions = self.generate(engine, prompts, env)
        assert torch.equal(rng, torch.get_rng_state()), "a rollout moved the global RNG"
        eos = set(self.eos_ids(engine.module))
        flat = [c for group in completions for c in group]
        texts = self.tokenizer.batch_decode(flat, skip_special_tokens=True)
        truncated = [not (c and c[-1] in eos) for c in flat]
        columns: dict[str, list] = {}
        for p in prompts:
            for key, value in p.example.columns.items():
                columns.setdefault(key, []).extend([value] * self.G)
        prompt_values = columns.pop("prompt", [])
        names = self.rewards.names
        per_fn, total = (self.rewards.score(texts, prompt_values, flat, columns) if flat
                         else ([[] for _ in names], []))
        rewards = torch.tensor(total, dtype=torch.float64)
        # Global sums for the metrics, the batch std and the units: one collective.
        n = len(flat)
        mask_trunc = self.s.mask_truncated
        trained = [0 if (mask_trunc and t) else len(c) for c, t in zip(flat, truncated)]
        local = [n, float(rewards.sum()), float((rewards ** 2).sum()), sum(len(c) for c in flat),
                 sum(truncated), sum(trained)]
        for values in per_fn:
            v = torch.tensor(values, dtype=torch.float64)
            ok = ~torch.isnan(v)
            local += [float(ok.sum()), float(v[ok].sum()), float((v[ok] ** 2).sum())]
        _, group_std = (group_advantages(rewards, self.G, "none") if n
                        else (None, torch.zeros(0, dtype=torch.float64)))
        # A checksum of every completion (with its prompt row and sample): equal on 1 and N
        # ranks exactly when the completions are (tests compare it step by step).
        checksum = sum(_digest(p.row, j, c) for p, group in zip(prompts, completions)
                       for j, c in enumerate(group))
        local += [float(checksum), float(group_std.sum()), float((group_std < 1e-12).sum()),
                  len(prompts)]
        g = distributed.all_reduce_sum(local, env.device)
        longest = _all_reduce_max(max((len(c) for c in flat), default=0), env.device)
        N, total_sum, total_sq = g[0], g[1], g[2]
        batch_std = _std(N, total_sum, total_sq)
        advantages = (group_advantages(rewards, self.G, self.s.scale_rewards, batch_std)[0]
                      if n else rewards)
        self.global_tokens, self.global_completions = g[5], N
        groups = g[-1]
        m = {"reward": total_sum / max(N, 1), "reward_std": g[-3] / max(groups, 1),
             "reward_batch_std": batch_std, "frac_reward_zero_std": g[-2] / max(groups, 1),
             "completions/mean_length": g[3] / max(N, 1),
             "completions/max_length": float(longest),
             "completions/clipped_ratio": g[4] / max(N, 1), "completions/checksum": g[-4]}
        for k, name in enumerate(names):
            cnt, sm, sq = g[6 + 3 * k: 9 + 3 * k]
            m[f"rewards/{name}/mean"] = sm / max(cnt, 1)
            m[f"rewards/{name}/std"] = _std(cnt, sm, sq)
        self._step_metrics = m
        self._keep_samples(prompts, texts, per_fn, total, env)
        # The trained micro-batches: each prompt's G sequences in its micro-batch.
        out, k = [], 0
        kept = (_Kept(prompts[0].step if prompts else None, m, g[5], N) if keep else None)
        for b in micro_batches:
            seqs, keys = [], []
            for p in b["grpo_prompts"]:
                for j in range(self.G):
                    seqs.append((p.example.prompt_ids, flat[k], float(advantages[k]),
                                 truncated[k] and mask_trunc))
                    keys.append((p.row, j))
                    if kept is not None:
                        kept.entries[(p.row, j)] = [flat[k], float(advantages[k]),
                                                    truncated[k] and mask_trunc, None, None]
                    k += 1
            out.append({**self.collate_sequences(seqs, pad_id), "keys": keys, "keep": keep})
        if keep:  # μ > 1: prepare() adds the old log-probs before any update
            self._kept = kept
        return out

    def _kept_batches(self, micro_batches: list[dict], iteration: int) -> list[dict]:
        """This rank's micro-batches of the kept rollout batch (any world size: entries are
        looked up by data row and sample), with their old and reference log-probs."""
        kept = self._kept
        if kept is None:
            raise RuntimeError(f"grpo: optimizer step {iteration + 1} of a rollout batch without "
                               "its rollout (a checkpoint without objective.pt?)")
        kept.iteration = iteration
        self._step_metrics = dict(kept.metrics)  # the rollout's, on each of its μ steps
        self.global_tokens, self.global_completions = kept.tokens, kept.completions
        self.samples = []
        pad_id = micro_batches[0]["pad_id"]
        out = []
        for b in micro_batches:
            seqs, keys, olds, refs = [], [], [], []
            for p in b["grpo_prompts"]:
                if p.step != kept.step:
                    raise RuntimeError(f"grpo: kept rollout of data step {kept.step}, asked for "
                                       f"{p.step}")
                for j in range(self.G):
                    c, adv, masked, old, ref = kept.entries[(p.row, j)]
                    seqs.append((p.example.prompt_ids, c, adv, masked))
                    keys.append((p.row, j))
                    olds.append(old)
                    refs.append(ref)
            batch = self.collate_sequences(seqs, pad_id)
            batch["old_logp"] = _placed(olds, batch)
            if self.beta > 0:
                batch["ref_logp"] = _placed(refs, batch)
            out.append({**batch, "keys": keys, "keep": False})
        return out

    def _keep_samples(self, prompts, texts, per_fn, total, env) -> None:
        """Rank 0's first `log_completions` prompts with their completions and rewards."""
        self.samples = []
        if not env.is_main:
            return
        for i, p in enumerate(prompts[:self.s.log_completions]):
            sl = slice(i * self.G, (i + 1) * self.G)
            self.samples.append({
                "step": p.step * self.steps_per_batch + 1, "kind": "rollout", "row": p.row,
                "prompt": self.tokenizer.decode(p.example.prompt_ids, skip_special_tokens=True),
                "completions": texts[sl], "reward": total[sl],
                "rewards": {n: v[sl] for n, v in zip(self.rewards.names, per_fn)}})
        run = getattr(self, "run", None)
        if run is not None and self.samples and prompts[0].step >= 0:  # not an eval pass
            from dpkit.run_files import SAMPLES, append_jsonl

            # beside the evals' generations; `dpkit report` reads only those (index, completion)
            append_jsonl(run.out / SAMPLES, *self.samples)

    def collate_sequences(self, seqs: list, pad_id: int) -> dict:
        """Prompt + completion rows, right-padded; labels on the completion tokens (none for a
        masked truncated one); an empty list gives one all-masked row that adds nothing."""
        real = len(seqs)
        if not seqs:
            seqs = [([pad_id], [pad_id], 0.0, True)]
        width = max(len(p) + len(c) for p, c, _, _ in seqs)
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, (p, c, _, masked) in enumerate(seqs):
            ids[i, :len(p) + len(c)] = torch.tensor(p + c)
            mask[i, :len(p) + len(c)] = 1
            if not masked and i < real:
                labels[i, len(p):len(p) + len(c)] = torch.tensor(c, dtype=torch.long)
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels,
                 "advantages": torch.tensor([a for _, _, a, _ in seqs], dtype=torch.float64),
                 "seq_mask": torch.tensor([1.0] * real + [0.0] * (len(seqs) - real),
                                          dtype=torch.float64)}
        # fast mode: the forwards run on the sequences laid end to end, where that removes at
        # least PACK_MIN_PADDING of the batch (per-row attention costs a little per row: on
        # CPU, equal-length rows run ~20% slower packed than padded)
        if self.s.rollout == "fast" and int(mask.sum()) <= (1 - PACK_MIN_PADDING) * mask.numel():
            batch["flat"] = flatten_padded(batch)
        return batch

    # -------------------------------------------------------------------------------- loss
    def token_logps(self, engine, batch: dict, head=None, entropy: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-token log-probs of the labels [B, T−1] at the sampling temperature, and (with
        `entropy`) each position's entropy, both 0 where nothing is predicted. Through the
        run's loss head (`head`: the frozen reference's): tiled as `compute.loss` says, so a
        long completion's [tokens, vocabulary] logits never exist at once. A batch with `flat`
        (fast mode) is computed on its packed row and spread back to the padded layout: the
        same values, no padding in the forward."""
        if "flat" in batch:
            from dpkit.data.packing import spread
            from dpkit.step import to_device

            flat = to_device(batch["flat"], batch["input_ids"].device)
            logp, ent = self.token_logps(engine, flat, head, entropy)
            shape = batch["labels"].shape
            return (spread(logp, flat, shape)[:, :-1],
                    spread(ent, flat, shape)[:, :-1] if entropy else None)
        labels = shifted_labels(batch)
        # model_inputs: the packed keywords (restarting positions, row boundaries) or the mask
        inputs = {"input_ids": batch["input_ids"], **model_inputs(batch)}
        nll, ent = (head or self.head).token_nll_entropy(engine, inputs, labels,
                                                         self.s.temperature, entropy)
        return -nll[:, :-1], (ent[:, :-1] if entropy else None)

    def ref_logps(self, engine, batch: dict) -> torch.Tensor:
        """The reference's per-token log-probs (no gradient): the base with the LoRA adapter
        off, or the frozen copy of the initial model."""
        with torch.no_grad():
            if self.reference == "adapter_off":
                with getattr(engine, "module", engine).disable_adapter():
                    return self.token_logps(engine, batch, entropy=False)[0]
            return self.token_logps(self.ref_engine, batch, self.ref_head, entropy=False)[0]

    def prepare(self, engine, micro_batches: list[dict], env) -> None:
        """Before any update: the reference's log-probs (β > 0) and, on the first step of a
        kept rollout batch (μ > 1), the old policy's — one forward without gradient each per
        micro-batch, once per rollout batch, kept for its μ steps (as TRL does)."""
        for b in micro_batches:
            keep = b.get("keep", False)
            if keep:
                with torch.no_grad():
                    b["old_logp"] = self.token_logps(engine, b, entropy=False)[0]
            if self.beta > 0 and "ref_logp" not in b:
                b["ref_logp"] = self.ref_logps(engine, b)
            if keep:
                mask = b["labels"][:, 1:] != IGNORE
                for i, key in enumerate(b["keys"]):
                    entry = self._kept.entries[key]
                    entry[3] = b["old_logp"][i][mask[i]].cpu()
                    if self.beta > 0:
                        entry[4] = b["ref_logp"][i][mask[i]].cpu()

    def loss(self, engine, batch: dict) -> LossOut:
        logp, entropy = self.token_logps(engine, batch)
        mask = (batch["labels"][:, 1:] != IGNORE).to(logp.dtype)
        seq_mask = batch["seq_mask"].to(logp.dtype)
        # μ = 1: the policy that sampled is this one (ratio 1, only its gradient counts); μ > 1:
        # the log-probs of the weights that sampled, computed once after the rollout
        old = batch["old_logp"] if "old_logp" in batch else logp.detach()
        per_token, extra = token_losses(logp, old, batch["advantages"].to(logp.dtype),
                                        self.eps_low, self.eps_high, self.beta,
                                        batch.get("ref_logp"))
        loss = unit_loss_sum(self.kind, per_token, mask, seq_mask, self.s.max_completion_len)
        # Token metrics are means over the completion tokens of the global batch; the loop
        # divides them by the global units, so they are scaled by units / tokens here.
        units = self.global_tokens if self.kind == "dapo" else self.global_completions
        scale = units / max(self.global_tokens, 1)
        low, high = extra["clip_low"] * mask, extra["clip_high"] * mask
        metrics = {"entropy": entropy.sum().detach() * scale,
                   "clip_ratio/low_mean": low.sum() * scale,
                   "clip_ratio/high_mean": high.sum() * scale,
                   "clip_ratio/region_mean": (low + high).sum() * scale}
        if "kl" in extra:
            metrics["kl"] = (extra["kl"] * mask).sum().detach() * scale
        return LossOut(loss, metrics)

    # ------------------------------------------------------------------------- checkpoints
    def state_dict(self, env) -> dict | None:
        """Between the μ steps of a rollout batch: the batch (every rank's completions,
        advantages, old and reference log-probs, by data row and sample) and its metrics,
        gathered onto the main rank, so a resume continues bitwise — on any world size. None
        at a rollout boundary: the next step rolls out anew (its sampler is a function of the
        step)."""
        kept = self._kept
        if kept is None or kept.iteration >= self.steps_per_batch - 1:
            return None
        mine = (kept.step, [[r, j, *e] for (r, j), e in kept.entries.items()])
        parts = [mine]
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            parts = [None] * torch.distributed.get_world_size() if env.is_main else None
            torch.distributed.gather_object(mine, parts, dst=0)
        if not env.is_main:
            return None
        steps = [st for st, _ in parts if st is not None]
        return {"step": steps[0] if steps else None, "iteration": kept.iteration,
                "metrics": kept.metrics, "tokens": kept.tokens,
                "completions": kept.completions,
                "entries": [e for _, entries in parts for e in entries]}

    def load_state_dict(self, state: dict | None) -> None:
        if state is None:
            self._kept = None
            return
        kept = _Kept(state["step"], dict(state["metrics"]), state["tokens"],
                     state["completions"], iteration=state["iteration"])
        for r, j, *entry in state["entries"]:
            kept.entries[(r, j)] = list(entry)
        self._kept = kept

    @property
    def forwards_without_grad(self) -> float:
        """Per micro-batch and optimizer step (the planner's): the reference's forward (β > 0)
        and, with μ > 1, the old policy's — each once per rollout batch, shared by its μ
        steps."""
        once = (1 if self.reference else 0) + (1 if self.steps_per_batch > 1 else 0)
        return once / self.steps_per_batch

    def step_metrics(self) -> dict[str, float]:
        return dict(self._step_metrics)

    def progress(self, metrics):
        return {"reward": f"{metrics.get('reward', float('nan')):.3f}"}

    def describe(self) -> str:
        return (f"grpo ({self.kind} loss, G {self.G}, {self.s.max_completion_len} completion "
                f"tokens, temperature {self.s.temperature:g}, {self.s.rollout} rollouts"
                + (f", {self.steps_per_batch} optimizer steps per rollout batch"
                   if self.steps_per_batch > 1 else "")
                + (f", beta {self.beta:g}, reference {self.reference}" if self.beta else "")
                + ")")

    def card(self) -> dict:
        s = self.s
        return {"objective": "grpo", "loss_type": self.kind, "group_size": self.G,
                "max_completion_len": s.max_completion_len, "temperature": s.temperature,
                "top_p": s.top_p, "epsilon": self.eps_low, "epsilon_high": self.eps_high,
                "beta": self.beta, "iterations": self.steps_per_batch,
                "scale_rewards": s.scale_rewards,
                "mask_truncated": s.mask_truncated, "rollout": s.rollout,
                "rewards": [f"{r.function} × {r.weight:g}" for r in s.rewards]}


def _digest(row: int, sample: int, ids: list[int]) -> int:
    """20 bits of a completion's hash: a sum of them over ≤ 2^33 completions is exact in
    float64."""
    data = f"{row}/{sample}/" + ",".join(map(str, ids))
    return int.from_bytes(hashlib.sha256(data.encode()).digest()[:4], "little") >> 12


def _std(n: float, total: float, squares: float) -> float:
    """Unbiased std from a count, a sum and a sum of squares (float64)."""
    if n < 2:
        return float("nan") if n < 1 else 0.0
    return math.sqrt(max(squares - total * total / n, 0.0) / (n - 1))


def _all_reduce_max(value: int, device) -> int:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())
