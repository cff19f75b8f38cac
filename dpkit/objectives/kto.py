"""KTO (Ethayarajh et al. 2024) on unpaired rows: the rows, the reference point z₀, the loss.

The unit is the row: a prompt x, a completion y and a label (desirable or not). With π the policy,
ρ the reference and σ the logistic function, per row (log-probs summed over the completion's
tokens):
    r  = log π(y|x) − log ρ(y|x)
    desirable:    λ_D · (1 − σ(β(r − z₀)))
    undesirable:  λ_U · (1 − σ(β(z₀ − r)))
the paper's loss λ_y − v(x, y) (its Eq. 8), as TRL's KTOTrainer computes it; the rewards are β·r.
The loss is summed over rows and the loop divides by the global number of rows (dpkit/step.py).

z₀, the reference point, estimates KL(π‖ρ) from mismatched rows: row i of a step's global batch
is paired with the completion of row π(i), π a derangement (no fixed point) drawn from (seed,
step), and z₀ = max(0, mean over the global batch of log π(y_π(i)|x_i) − log ρ(y_π(i)|x_i)),
computed without gradients in `prepare`, before any backward, with one all-reduce (sum, count).
It depends on the global batch only, so it is the same on any world size and accumulation split;
TRL rotates completions within each device's batch and averages the devices' means instead,
which no other world size reproduces. An eval pairs its rows the same way (step −1, all eval
rows). A global batch of one row (an epoch's last, partial step) pairs the row with itself, as
TRL's rotation of a batch of one does.

The reference: `adapter_off` runs the engine with the LoRA adapter turned off, without gradients
(for the rows in the loss, for the mismatched rows in `prepare`); `precomputed` forwards the
untouched model once in `setup`, before step 1, over every row and every mismatched row of every
planned step (the derangements are known in advance) and the eval's, cached in the run directory
(`ref_logps.pt`, keyed by a fingerprint of those sequences, reused on resume).

Rows: TRL's unpaired layout (`prompt`, `completion`, boolean `label`), strings (standard: plain
text, bos … completion eos) or message lists (conversational: the chat template; a string prompt
is then one user turn). Prompt and completion ids are kept apart in the tokenized-data cache, so
a mismatched row (prompt_i + completion_π(i), cut to data.max_seq_len) is built at batch time.
"""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dpkit import distributed
from dpkit.data.feed import EVAL_STEP
from dpkit.data.formats import Format
from dpkit.data.load import eval_micro_batches
from dpkit.data.preference import tokenize_side
from dpkit.data.rows import RowKind
from dpkit.data.tokenize import IGNORE, KEPT, NO_TARGET, TOO_LONG, TRUNCATED, map_source
from dpkit.errors import Problem, RecipeError
from dpkit.objectives.base import LossOut, Objective
from dpkit.objectives.head import LossHead, shifted_labels
from dpkit.objectives.sft import model_inputs
from dpkit.run_files import REF_LOGPS, write_atomic


# ----------------------------------------------------------------------------- the formulas
def kto_losses(policy: torch.Tensor, ref: torch.Tensor, desirable: torch.Tensor,
               z0: torch.Tensor | float, beta: float, desirable_weight: float,
               undesirable_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss and reward β·r. `policy`, `ref`: (B,) summed completion log-probs;
    `desirable`: (B,) booleans; `z0`: the reference point (no gradient flows into it)."""
    r = policy - ref
    z0 = torch.as_tensor(z0, dtype=r.dtype, device=r.device).detach()
    loss = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (r - z0))),
                       undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r))))
    return loss, beta * r.detach()


def reference_point(kl_sum: float, count: float) -> float:
    """z₀ = max(0, mean log-ratio of the mismatched rows); 0 for no rows."""
    return max(0.0, kl_sum / count) if count else 0.0


def derangement(n: int, seed: int, step: int) -> list[int]:
    """π over positions 0..n−1 with π[j] ≠ j for n ≥ 2, drawn from (seed, step) alone: Sattolo's
    shuffle (one cycle through all n positions). n = 1 gives [0]: no derangement exists."""
    perm = list(range(n))
    rng = random.Random(f"dpkit-kto-{seed}-{step}")  # a str seed: the same in every process
    for i in range(n - 1, 0, -1):
        j = rng.randrange(i)  # j < i, never i itself: what makes the result a single cycle
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def kl_partners(step_rows: list[int], seed: int, step: int) -> dict[int, int]:
    """Row index → the row whose completion it is paired with, over a step's global batch."""
    perm = derangement(len(step_rows), seed, step)
    return {row: step_rows[perm[j]] for j, row in enumerate(step_rows)}


# ------------------------------------------------------------------------------------ the rows
@dataclass
class UnpairedRow:
    prompt_ids: list[int]
    completion_ids: list[int]
    label: bool
    """True: desirable."""
    ref: float | None = None
    """The reference's log-prob of the completion, set by a precomputed reference pass."""
    position_ids = None  # never packed by the packer (KTO lays its rows end to end itself)

    @property
    def input_ids(self) -> list[int]:
        return self.prompt_ids + self.completion_ids

    @property
    def labels(self) -> list[int]:
        return [IGNORE] * len(self.prompt_ids) + list(self.completion_ids)

    def sample_row(self) -> tuple[list[int], list[int]]:
        """The row eval generations take their prompt from."""
        return self.input_ids, self.labels


@dataclass
class KTOExample:
    """A row with its mismatched row for z₀: its prompt, another row's completion."""
    row: UnpairedRow
    kl_ids: list[int]
    kl_labels: list[int]
    kl_ref: float | None = None


def _value(row: dict, source, canonical: str):
    col = source.column(canonical)
    return row.get(col) if col in row else None


def render_unpaired(row: dict, source, tokenizer) -> tuple[str, str, bool]:
    """(prompt text, completion text, plain text?). Strings are TRL's standard layout (plain
    text); message lists its conversational one, rendered with the chat template (a string
    prompt is one user turn, a string completion one assistant turn)."""
    prompt, completion = _value(row, source, "prompt"), _value(row, source, "completion")
    if isinstance(prompt, str) and isinstance(completion, str):
        return prompt, completion, True
    if not (isinstance(prompt, (str, list)) and isinstance(completion, (str, list))
            and prompt and completion):
        raise ValueError("`prompt` and `completion` must be strings or non-empty message lists")
    turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    answer = ([{"role": "assistant", "content": completion}] if isinstance(completion, str)
              else completion)
    head = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    text = tokenizer.apply_chat_template(turns + answer, tokenize=False)
    # A template may render the prompt turns differently once an answer follows: the
    # completion starts where the two renderings stop agreeing.
    cut = len(os.path.commonprefix([head, text]))
    return text[:cut], text[cut:], False


def row_label(row: dict, source) -> bool:
    label = _value(row, source, "label")
    if not isinstance(label, bool):
        raise ValueError(f"`label` must be true or false, got {label!r}")
    return label


COLUMNS = ("prompt_ids", "completion_ids", "label", "status", "prompt_cut")


def encode_unpaired(batch: dict[str, list], indices: list[int], source, tokenizer,
                    max_seq_len: int, overflow: str, max_prompt_len: int | None
                    ) -> dict[str, list]:
    """Columns of tokenized rows for a batch of raw rows: prompt and completion ids apart, the
    label, a status (rows that can't be trained on are kept with one and no tokens, so the
    report's counts come from the Arrow columns) and whether the prompt was cut."""
    out: dict[str, list] = {k: [] for k in COLUMNS}

    def put(status, prompt=(), completion=(), label=False, cut=False):
        kept = status <= TRUNCATED
        for key, value in zip(COLUMNS, (list(prompt) if kept else [],
                                        list(completion) if kept else [], label, status, cut)):
            out[key].append(value)

    keys = list(batch)
    for n, i in enumerate(indices):
        row = {k: batch[k][n] for k in keys}
        try:
            prompt, completion, plain = render_unpaired(row, source, tokenizer)
            label = row_label(row, source)
        except Exception as e:  # a template error too: one line naming the row
            raise ValueError(f"row {i}: {str(e).splitlines()[0] if str(e) else e!r}") from None
        ids, _, n_prompt = tokenize_side(prompt, completion, tokenizer, plain)
        p, c = ids[:n_prompt], ids[n_prompt:]
        cut = max_prompt_len is not None and len(p) > max_prompt_len
        if cut:
            p = p[len(p) - max_prompt_len:]
        too_long = len(p) + len(c) > max_seq_len
        if too_long and overflow == "drop":
            put(TOO_LONG, label=label)
        elif len(p) >= max_seq_len or len(c) + min(len(p), 1) < 2:
            put(NO_TARGET, label=label)  # no completion token left to predict
        else:
            put(TRUNCATED if too_long else KEPT, p, c[:max_seq_len - len(p)], label, cut)
    return out


def unpaired_features():
    from datasets import Features, Value
    from datasets import Sequence as Seq

    return Features({"prompt_ids": Seq(Value("int32")), "completion_ids": Seq(Value("int32")),
                     "label": Value("bool"), "status": Value("int8"),
                     "prompt_cut": Value("bool")})


def tokenize_unpaired(ds, source, tokenizer, section, max_prompt_len: int | None,
                      num_proc: int = 1, fingerprint: str | None = None,
                      cache_file: str | None = None):
    """`datasets.map` of `encode_unpaired` over a source: written to `cache_file` (Arrow, the
    tokenized-data cache) when given, else in memory. A malformed row is one line."""
    return map_source(ds, encode_unpaired, source, unpaired_features(),
                      f"tokenizing unpaired rows of {source.path}",
                      dict(source=source, tokenizer=tokenizer, max_seq_len=section.max_seq_len,
                           overflow=section.overflow, max_prompt_len=max_prompt_len),
                      num_proc=num_proc, fingerprint=fingerprint, cache_file=cache_file,
                      with_indices=True,
                      layouts="the unpaired layouts in docs/preference.md (KTO)")


def rows_of(tds, path: str, stats) -> list[UnpairedRow]:
    """The trained rows of a tokenized source; its counts added to `stats`."""
    import numpy as np

    table = tds.data.table if hasattr(tds.data, "table") else tds.data
    status = table.column("status").to_numpy()
    kept = np.nonzero(status <= TRUNCATED)[0]
    columns = {k: table.column(k).to_pylist() for k in ("prompt_ids", "completion_ids", "label")}
    rows = [UnpairedRow(columns["prompt_ids"][i], columns["completion_ids"][i],
                        bool(columns["label"][i])) for i in kept]
    cut = table.column("prompt_cut").to_numpy(zero_copy_only=False)
    stats.rows += len(rows)
    stats.truncated += int((status == TRUNCATED).sum())
    stats.dropped_too_long += int((status == TOO_LONG).sum())
    stats.dropped_no_target += int((status == NO_TARGET).sum())
    stats.prompt_truncated += int(cut[kept].sum())
    stats.tokens += sum(len(r.prompt_ids) + len(r.completion_ids) for r in rows)
    stats.per_source[path] = stats.per_source.get(path, 0) + len(rows)
    return rows


def prompt_unpaired(text, source, tokenizer, first_row):
    """A user's prompt as the rows are rendered: plain text for string rows, else one user turn
    in the chat template."""
    row = first_row()
    if all(isinstance(_value(row, source, k), str) for k in ("prompt", "completion")):
        return text, True
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True), False


def _template_problem(row, source, tokenizer):
    lists = any(isinstance(_value(row, source, k), list) for k in ("prompt", "completion"))
    if lists and not getattr(tokenizer, "chat_template", None):
        return ("conversational unpaired rows need a chat template and the tokenizer has none",
                "set model.chat_template (e.g. chatml) or use a tokenizer with one")
    return None


def _rows_only(row, source, tokenizer, completion_only):
    raise TypeError("unpaired rows are tokenized by dpkit.objectives.kto (prompt and completion "
                    "kept apart)")


class UnpairedRows(RowKind):
    """KTO's rows as a row kind (dpkit/data/rows.py): `options["max_prompt_len"]` is the
    `kto.max_prompt_len` setting."""

    format = Format("unpaired", ("prompt", "completion", "label"), _rows_only, prompt_unpaired,
                    problem=_template_problem,
                    doc="prompt/completion (strings or message lists) with a boolean label "
                        "(KTO)")

    def check(self, raw, tokenizer):
        """Layout problems of every source's first row, raised at once."""
        problems, index = [], {"sources": 0, "eval_sources": 0}
        for kind, source, ds in raw:
            where = f"data.{kind}[{index[kind]}]"
            index[kind] += 1
            if len(ds) == 0:
                continue
            try:
                render_unpaired(ds[0], source, tokenizer)
                row_label(ds[0], source)
            except Exception as e:
                problems.append(Problem(where, f"row 0 of '{source.path}': {e}",
                                        "see the unpaired layouts in docs/preference.md (KTO)"))
        if problems:
            raise RecipeError(problems)

    def tokenize(self, ds, source, tokenizer, section, options, num_proc, fingerprint=None,
                 cache_file=None):
        return tokenize_unpaired(ds, source, tokenizer, section, options.get("max_prompt_len"),
                                 num_proc, fingerprint=fingerprint, cache_file=cache_file)

    def assemble(self, parts, section, seed, need_train=True):
        """(train rows, eval rows, stats), held in memory; the eval split as for pairs."""
        from dpkit.data.tokenize import DataStats

        from dpkit.data import mixture

        stats, eval_stats = DataStats(), DataStats()
        train, evals, sizes, eval_sizes = [], [], [], []
        for kind, source, tds in parts:
            target, st, n = ((train, stats, sizes) if kind == "sources" else
                             (evals, eval_stats, eval_sizes))
            got = rows_of(tds, source.path, st)
            target.extend(got)
            n.append(len(got))
        train, sizes, evals = mixture.eval_split(train, sizes, evals, section, seed)
        if need_train and not train:
            raise RecipeError.one("data.sources", "no training rows left after tokenization "
                                  f"({stats.describe()})", "raise data.max_seq_len, use "
                                  "overflow: truncate, or check the data")
        train, evals = mixture.arrange(train, sizes, evals, eval_sizes, section, seed, stats)
        return train, evals, stats


UNPAIRED = UnpairedRows()


# --------------------------------------------------------------------------------- batches
def rows_batch(rows: list[tuple[list[int], list[int]]], pad_id: int, flatten: bool) -> dict:
    """(ids, labels) rows → right-padded tensors, or (`flatten`, with per-row attention) laid end
    to end in one row with position ids restarting per row and `row_ids` naming each token's
    row."""
    if flatten:
        from dpkit.data.packing import row_boundaries

        ids = torch.tensor([t for r, _ in rows for t in r]).unsqueeze(0)
        # A row's first token is never predicted (nothing before it in its row): unlabelled,
        # so the shift by one can't score it from the previous row's last token.
        labels = torch.tensor([x if i else IGNORE for _, r in rows
                               for i, x in enumerate(r)]).unsqueeze(0)
        positions = torch.cat([torch.arange(len(r)) for r, _ in rows]).unsqueeze(0)
        row_ids = torch.cat([torch.full((len(r),), i) for i, (r, _) in enumerate(rows)])
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
                 "position_ids": positions, "row_ids": row_ids.unsqueeze(0)}
        batch["cu_seq_lens"], batch["max_length"] = row_boundaries(positions)
        return batch
    width = max(len(r) for r, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, lab) in enumerate(rows):
        ids[i, :len(r)], labels[i, :len(r)], mask[i, :len(r)] = (
            torch.tensor(r), torch.tensor(lab), 1)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate_unpaired(examples: list[KTOExample], pad_id: int, flatten: bool = False) -> dict:
    """B examples → the B rows (`input_ids`, `labels`, ...: what the loss forwards and the loop
    counts) and their B mismatched rows (the same keys prefixed `kl_`, forwarded by `prepare`);
    `row_mask` marks real rows: an empty list gives one all-masked row that adds nothing (a
    rank whose shard ran out); `ref_logps`/`kl_ref_logps` when a precomputed reference set
    them."""
    real = len(examples)
    if not examples:
        dummy = UnpairedRow([pad_id], [pad_id], False, ref=0.0)
        examples = [KTOExample(dummy, [pad_id, pad_id], [IGNORE, IGNORE], kl_ref=0.0)]
    rows = [(e.row.input_ids, e.row.labels if k < real else [IGNORE] * 2)
            for k, e in enumerate(examples)]
    batch = rows_batch(rows, pad_id, flatten)
    kl = rows_batch([(e.kl_ids, e.kl_labels) for e in examples], pad_id, flatten)
    batch.update({f"kl_{k}": v for k, v in kl.items()})
    batch["row_mask"] = torch.tensor([1.0] * real + [0.0] * (len(examples) - real),
                                     dtype=torch.float64)
    batch["desirable"] = torch.tensor([e.row.label for e in examples], dtype=torch.bool)
    if all(e.row.ref is not None and e.kl_ref is not None for e in examples):
        batch["ref_logps"] = torch.tensor([e.row.ref for e in examples], dtype=torch.float64)
        batch["kl_ref_logps"] = torch.tensor([e.kl_ref for e in examples], dtype=torch.float64)
    return batch


def part(batch: dict, prefix: str) -> dict:
    """The rows of a collated batch under `prefix` ("" the rows, "kl_" the mismatched ones)."""
    if not prefix:
        return batch
    return {k[len(prefix):]: v for k, v in batch.items() if k.startswith(prefix)}


def row_logps(head: LossHead, engine, rows: dict, n: int) -> torch.Tensor:
    """(n,) log-probs of each row's labelled tokens, summed, through the run's loss head (tiled
    as for SFT; fp32, or the model's dtype when wider). Rows laid end to end are summed per row."""
    labels = shifted_labels(rows)  # position i predicts token i + 1
    inputs = {"input_ids": rows["input_ids"], **model_inputs(rows)}
    token = -head.token_nll(engine, inputs, labels)  # 0 where the label is -100
    if "row_ids" not in rows:
        return token.sum(-1)
    where = F.pad(rows["row_ids"][:, 1:], (0, 1)).reshape(-1)  # each predicted token's row
    return torch.zeros(n, dtype=token.dtype, device=token.device).index_add_(
        0, where, token.reshape(-1))


# ---------------------------------------------------------------------------- the objective
class KTO(Objective):
    name = "kto"
    unit = "rows"
    packs_rows = False  # rows and their mismatched rows are laid end to end per batch (flatten)
    metric_names = ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "kl",
                    "count/chosen", "count/rejected")
    """Sums over rows: rewards and log-probs of the desirable (chosen) and undesirable (rejected)
    rows apart, z₀ once per row, and the rows of each class; `per_unit` turns them into TRL's
    means per class."""

    def __init__(self, beta: float = 0.1, desirable_weight: float = 1.0,
                 undesirable_weight: float = 1.0, reference: str = "precomputed", seed: int = 0,
                 max_seq_len: int = 1 << 30):
        self.beta, self.desirable_weight = beta, desirable_weight
        self.undesirable_weight, self.reference = undesirable_weight, reference
        self.seed, self.max_seq_len = seed, max_seq_len
        self.head = LossHead()  # full logits until setup() knows the run's head
        self.z0 = 0.0
        self.kl_refs: dict[tuple[int, int], float] | None = None

    @classmethod
    def from_recipe(cls, recipe) -> KTO:
        from dpkit.methods.kto import KTOSection

        k = recipe.kto or KTOSection()
        return cls(k.beta, k.desirable_weight, k.undesirable_weight,
                   k.resolved_reference(recipe.peft is not None), recipe.train.seed,
                   recipe.data.max_seq_len)

    @property
    def forwards_without_grad(self) -> int:
        # the mismatched rows (z₀), and with the adapter off the reference of both row sets
        return 3 if self.reference == "adapter_off" else 1

    # -------------------------------------------------------------------------- batches
    def kl_example(self, rows, i: int, j: int, step: int) -> KTOExample:
        """Row i with its mismatched row: its prompt, row j's completion, cut to max_seq_len."""
        row, other = rows[i], rows[j]
        ids = (row.prompt_ids + other.completion_ids)[:self.max_seq_len]
        labels = ([IGNORE] * len(row.prompt_ids) + list(other.completion_ids))[:self.max_seq_len]
        ref = self.kl_refs.get((step, i)) if self.kl_refs is not None else None
        return KTOExample(row, ids, labels, ref)

    def step_examples(self, rows, picks, step_rows, step):
        partner = kl_partners(step_rows, self.seed, step)
        return [[self.kl_example(rows, i, partner[i], step) for i in idx] for idx in picks]

    def collate(self, examples, pad_id, flatten=False):
        return collate_unpaired(examples, pad_id, flatten)

    def count(self, batch: dict) -> int:
        return int(batch["row_mask"].sum())

    # ----------------------------------------------------------------------------- z₀
    def reference_logps(self, engine, batch: dict, prefix: str) -> torch.Tensor:
        """ρ's log-probs of the rows under `prefix`: the adapter turned off, or precomputed."""
        n = batch["row_mask"].shape[0]
        if self.reference == "adapter_off":  # the frozen base: the same weights minus the adapter
            with torch.no_grad(), getattr(engine, "module", engine).disable_adapter():
                return row_logps(self.head, engine, part(batch, prefix), n)
        if f"{prefix}ref_logps" not in batch:
            raise RuntimeError("KTO's precomputed reference log-probs are missing from a batch")
        return batch[f"{prefix}ref_logps"]

    def prepare(self, engine, micro_batches, env) -> None:
        """z₀ of the step's (or the eval's) global batch: the mismatched rows' log-ratio summed
        here without gradients, then one all-reduce of (sum, count) over the ranks."""
        total = torch.zeros((), dtype=torch.float64, device=env.device)
        count = total.clone()
        with torch.no_grad():
            for b in micro_batches:
                n, m = b["row_mask"].shape[0], b["row_mask"]
                policy = row_logps(self.head, engine, part(b, "kl_"), n).double()
                ref = self.reference_logps(engine, b, "kl_").double()
                total += ((policy - ref) * m).sum()
                count += m.sum()
        kl_sum, rows = distributed.all_reduce_sum([float(total), float(count)], env.device)
        self.z0 = reference_point(kl_sum, rows)

    # ----------------------------------------------------------------------------- loss
    def loss(self, engine, batch: dict) -> LossOut:
        n = batch["row_mask"].shape[0]
        ref = self.reference_logps(engine, batch, "")
        policy = row_logps(self.head, engine, batch, n)
        m = batch["row_mask"].to(policy.dtype)
        loss, rewards = kto_losses(policy, ref.to(policy.dtype), batch["desirable"], self.z0,
                                   self.beta, self.desirable_weight, self.undesirable_weight)
        d = batch["desirable"].to(m.dtype) * m
        u = m - d
        logps = policy.detach()
        metrics = {"rewards/chosen": (rewards * d).sum(), "rewards/rejected": (rewards * u).sum(),
                   "logps/chosen": (logps * d).sum(), "logps/rejected": (logps * u).sum(),
                   "kl": self.z0 * m.sum(), "count/chosen": d.sum(), "count/rejected": u.sum()}
        return LossOut((loss * m).sum(), metrics)

    def per_unit(self, metrics: dict[str, float]) -> dict[str, float]:
        """Means per class, as TRL logs them (a class absent from the batch: no entry), and z₀
        as `kl`."""
        out = {"kl": metrics["kl"]}
        for side in ("chosen", "rejected"):
            share = metrics[f"count/{side}"]  # the class's rows / all rows
            if share > 0:
                out[f"rewards/{side}"] = metrics[f"rewards/{side}"] / share
                out[f"logps/{side}"] = metrics[f"logps/{side}"] / share
        if "rewards/chosen" in out and "rewards/rejected" in out:
            out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        return out

    # ------------------------------------------------------------ precomputed reference
    def setup(self, run) -> None:
        self.head = run.loss_head  # tiled as compute.loss says, like SFT
        rows = run.train_rows
        good = sum(r.label for r in rows)
        ratio = (self.desirable_weight * good) / max(self.undesirable_weight * (len(rows) - good),
                                                     1e-12)
        run.say(f"[dpkit] kto: {good} desirable and {len(rows) - good} undesirable training rows; "
                f"λ_D·n_D / (λ_U·n_U) = {ratio:.2f} (the paper advises 1 to 4/3: set "
                "kto.desirable_weight or kto.undesirable_weight)")
        if self.reference != "precomputed":
            return
        keys, seqs = self.planned_rows(run)
        path, key = run.out / REF_LOGPS, fingerprint(seqs)
        cached = None
        if run.env.is_main and path.is_file():
            try:
                saved = torch.load(path)
                cached = saved["logps"] if saved.get("fingerprint") == key else None
            except Exception:  # a torn file: computed again
                cached = None
        values = distributed.broadcast_object(cached)  # rank 0 decides for every rank
        if values is not None:
            run.say(f"[dpkit] reference log-probs of {len(seqs)} rows read from {path}")
        else:
            values = self.precompute(run.engine, seqs, run.dp_rank, run.batch.data_parallel,
                                     run.batch.micro_batch_size, run.tokenizer.pad_token_id,
                                     run.env.device)
            if run.env.is_main:  # whole or not at all: a resume reads it back
                write_atomic(path, lambda f: torch.save({"fingerprint": key, "logps": values}, f))
            run.say(f"[dpkit] reference log-probs of {len(seqs)} rows (the rows, and the "
                    "mismatched rows of every planned step and of eval) computed before step 1, "
                    f"cached in {path}")
        self.assign(keys, values.tolist(), run.train_rows, run.eval_rows)

    def planned_rows(self, run) -> tuple[list, list]:
        """(keys, (ids, labels) sequences) of everything the precomputed reference must score:
        every train and eval row (keys ("row", i) and ("eval", i)), and the mismatched row of
        every row in every planned step (key (step, i)) and in an eval (key (−1, i))."""
        keys, seqs = [], []
        for kind, rows in (("row", run.train_rows), ("eval", run.eval_rows)):
            for i, row in enumerate(rows):
                keys.append((kind, i))
                seqs.append((row.input_ids, row.labels))
        plan = [(s, run.train_rows, run.feed.step_rows(s)) for s in range(run.total_steps)]
        plan.append((EVAL_STEP, run.eval_rows, list(range(len(run.eval_rows)))))
        for step, rows, step_rows in plan:
            for i, j in kl_partners(step_rows, self.seed, step).items():
                ex = self.kl_example(rows, i, j, step)
                keys.append((step, i))
                seqs.append((ex.kl_ids, ex.kl_labels))
        return keys, seqs

    def assign(self, keys: list, values: list[float], train_rows, eval_rows) -> None:
        self.kl_refs = {}
        for k, v in zip(keys, values):
            if k[0] == "row":
                train_rows[k[1]].ref = v
            elif k[0] == "eval":
                eval_rows[k[1]].ref = v
            else:
                self.kl_refs[k] = v

    def precompute(self, engine, seqs: list, dp_rank: int, dp_world: int, micro: int,
                   pad_id: int, device) -> torch.Tensor:
        """(N,) log-probs of the untouched model: sorted by length (little padding), each
        data-parallel rank forwards its share (the same number of batches on every rank, as
        ZeRO-3 gathers in step), then one sum."""
        order = sorted(range(len(seqs)), key=lambda k: -len(seqs[k][0]))
        values = torch.zeros(len(seqs), dtype=torch.float64)
        engine.eval()
        with torch.no_grad():
            for idx in eval_micro_batches(len(seqs), dp_rank, dp_world, micro):
                picked = [order[k] for k in idx]
                rows = [seqs[k] for k in picked] or [([pad_id] * 2, [IGNORE] * 2)]
                batch = {k: v.to(device) for k, v in rows_batch(rows, pad_id, False).items()}
                logps = row_logps(self.head, engine, batch, len(rows)).double().cpu()
                if picked:
                    values[picked] = logps
        engine.train()
        # Every row comes from one rank and zeros from the others: the sum is exact.
        return torch.tensor(distributed.all_reduce_sum(values.tolist(), device),
                            dtype=torch.float64)

    # --------------------------------------------------------------------------- reports
    def progress(self, metrics: dict[str, float]) -> dict[str, str]:
        out = {"kl": f"{metrics['kl']:.3f}"}
        if "rewards/margins" in metrics:
            out["margin"] = f"{metrics['rewards/margins']:.3f}"
        return out

    def describe(self) -> str:
        return (f"kto (beta {self.beta:g}, desirable weight {self.desirable_weight:g}, "
                f"undesirable weight {self.undesirable_weight:g}, reference {self.reference})")

    def card(self) -> dict:
        return {"objective": self.name, "beta": self.beta,
                "desirable_weight": self.desirable_weight,
                "undesirable_weight": self.undesirable_weight, "reference": self.reference}

    def card_rows(self) -> list[tuple[str, object]]:
        labels = {"desirable_weight": "desirable weight λ_D",
                  "undesirable_weight": "undesirable weight λ_U", "reference": "reference model"}
        return [(labels.get(k, k), v) for k, v in self.card().items() if k != "objective"]


def fingerprint(seqs: list) -> str:
    """Identifies the sequences a cached reference belongs to (their tokens and labels, in
    order: the rows, and the mismatched rows the seed and the planned steps give)."""
    import numpy as np

    h = hashlib.sha256()
    for ids, labels in seqs:
        h.update(np.asarray([len(ids)], dtype=np.int64).tobytes())
        h.update(np.asarray(ids, dtype=np.int64).tobytes())
        h.update(np.asarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()
