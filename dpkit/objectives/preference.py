"""Preference objectives on chosen/rejected pairs: DPO (and its IPO variant) against a reference
model, SimPO and ORPO without one. The unit is the pair: the loss is summed over pairs and the
loop divides by the global number of pairs (dpkit/step.py).

The formulas, per pair, with π the policy and ρ the reference (s = summed log-prob of the answer's
tokens, a = s / number of answer tokens), c chosen, r rejected, σ the logistic function:
  DPO   (Rafailov et al. 2023)  z = β((s_c − s_r) − (ρs_c − ρs_r));
                                loss = −(1−ε) log σ(z) − ε log σ(−z)   (ε: label smoothing)
  IPO   (Azar et al. 2023)      h = (a_c − a_r) − (ρa_c − ρa_r);  loss = (h − 1/(2β))²
  SimPO (Meng et al. 2024)      z = β(a_c − a_r) − γ;  loss = −(1−ε) log σ(z) − ε log σ(−z)
  ORPO  (Hong et al. 2024)      loss = −a_c − λ log σ(log odds(a_c) − log odds(a_r)),
                                odds(a) = e^a / (1 − e^a)
Rewards: β(s − ρs) for DPO, β(a − ρa) for IPO, β·a for SimPO, λ·a for ORPO; accuracy: reward of the
chosen answer above the rejected one's.

Chosen and rejected go through the model in ONE forward: the collated batch holds the B chosen
rows then the B rejected rows, padded to one width (dpkit/data/preference.py). Their per-token
log-probs come from the run's loss head (dpkit/objectives/head.py), tiled as for SFT: long pairs
never hold the full [tokens, vocabulary] logits. A pair the batch masks out (a rank whose shard
ran out gets one) adds exactly 0 to the loss and its gradients.

The reference (DPO, IPO): `adapter_off` runs the same engine with the LoRA adapter turned off,
without gradients (one more forward per micro-batch, no second copy of the model);
`precomputed` runs the untouched model over every pair once in `setup`, before step 1, and
caches the log-probs in the run directory (`ref_logps.pt`, reused on resume). docs/preference.md
compares the two.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F

from dpkit import distributed
from dpkit.data.load import eval_micro_batches
from dpkit.data.preference import IGNORE, collate_pairs
from dpkit.objectives.base import LossOut, Objective
from dpkit.objectives.head import LossHead, shifted_labels
from dpkit.objectives.sft import model_inputs
from dpkit.run_files import REF_LOGPS, write_atomic


# ----------------------------------------------------------------------------- the formulas
def pair_losses(kind: str, policy: torch.Tensor, counts: torch.Tensor, ref: torch.Tensor | None,
                beta: float, label_smoothing: float = 0.0, gamma: float = 0.0,
                lam: float = 0.0, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-pair loss and rewards. `policy`, `ref`: (B, 2) summed log-probs (chosen, rejected);
    `counts`: (B, 2) answer tokens; `mask`: (B,) 1 for real pairs. Returns loss, chosen/rejected
    rewards (B,) and extras; masked pairs get finite values (the caller multiplies them by 0)."""
    if mask is not None:
        # A masked pair (the padding of a rank whose shard ran out: no labels, so sums and
        # counts 0) gets harmless inputs BEFORE any log: ORPO's log(1 − e^0) is −inf, and
        # −inf × 0 is NaN in the loss and in every gradient. Replacing the value after the log
        # (torch.where) would still send NaN back through the log's derivative.
        keep = mask.bool().unsqueeze(-1)
        policy = torch.where(keep, policy, torch.full_like(policy, -1.0))
        counts = torch.where(keep, counts, torch.ones_like(counts))
        ref = torch.where(keep, ref, torch.zeros_like(ref)) if ref is not None else None
    avg = policy / counts.clamp(min=1)
    out = {}
    if kind in ("dpo", "ipo"):
        pi, rho = (policy, ref) if kind == "dpo" else (avg, ref / counts.clamp(min=1))
        h = (pi[:, 0] - pi[:, 1]) - (rho[:, 0] - rho[:, 1])
        if kind == "dpo":
            z = beta * h
            loss = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
        else:
            loss = (h - 1 / (2 * beta)) ** 2
        rewards = beta * (pi - rho)
    elif kind == "simpo":
        z = beta * (avg[:, 0] - avg[:, 1]) - gamma
        loss = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
        rewards = beta * avg
    elif kind == "orpo":
        # log odds(p) = log p − log(1 − p), with log(1 − e^a) computed stably as log(−expm1(a))
        log_odds = (avg[:, 0] - avg[:, 1]) - (torch.log(-torch.expm1(avg[:, 0]))
                                             - torch.log(-torch.expm1(avg[:, 1])))
        nll = -avg[:, 0]
        loss = nll - lam * F.logsigmoid(log_odds)
        rewards = lam * avg
        out.update(nll_loss=nll, log_odds_ratio=log_odds)
    else:
        raise ValueError(f"unknown preference objective {kind!r}")
    out.update(loss=loss, chosen=rewards[:, 0], rejected=rewards[:, 1])
    return out


# ---------------------------------------------------------------------------- the objective
class Preference(Objective):
    """One class for the four losses; `kind` picks the formula (registered under each name)."""

    unit = "pairs"
    rows_per_item = 2  # chosen and rejected, in one forward
    packs_rows = False  # a pair's two rows are laid end to end per batch (collate's flatten)
    metric_names = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                    "logps/chosen", "logps/rejected")

    def __init__(self, kind: str, beta: float, label_smoothing: float = 0.0, gamma: float = 0.0,
                 lam: float = 0.1, reference: str | None = None):
        self.name, self.kind, self.beta = kind, kind, beta
        self.label_smoothing, self.gamma, self.lam = label_smoothing, gamma, lam
        self.reference = reference if kind in ("dpo", "ipo") else None
        self.head = LossHead()  # full logits until setup() knows the run's head
        if kind == "orpo":  # ORPO's rewards are scaled by λ (as TRL's, whose `beta` is λ)
            self.beta = lam
            self.metric_names = (*Preference.metric_names, "nll_loss", "log_odds_ratio")

    @classmethod
    def from_recipe(cls, recipe) -> Preference:
        from dpkit.methods.preference import PreferenceSection

        name = recipe.objective
        p = recipe.preference or PreferenceSection()
        return cls(name, p.resolved_beta(name), p.label_smoothing, p.simpo_gamma, p.orpo_lambda,
                   p.resolved_reference(recipe.peft is not None))

    def collate(self, examples: list, pad_id: int, flatten: bool = False) -> dict:
        return collate_pairs(examples, pad_id, flatten)

    def count(self, batch: dict) -> int:
        return int(batch["pair_mask"].sum())

    def pair_logps(self, engine, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 2) summed log-probs and answer-token counts, chosen and rejected in one forward.

        Per-token log-probs are the run's loss head's −NLL (dpkit/objectives/head.py): tiled as
        for SFT, so long pairs never hold the full [tokens, vocabulary] logits; in fp32, or the
        model's dtype when wider. Rows laid end to end (`row_ids`) are summed per row."""
        labels = shifted_labels(batch)  # position i predicts token i + 1
        inputs = {"input_ids": batch["input_ids"], **model_inputs(batch)}
        token = -self.head.token_nll(engine, inputs, labels)  # 0 where the label is -100
        mask = labels != IGNORE
        if "row_ids" not in batch:
            return token.sum(-1).view(2, -1).T, mask.sum(-1).view(2, -1).T
        n = 2 * batch["pair_mask"].shape[0]
        rows = F.pad(batch["row_ids"][:, 1:], (0, 1)).reshape(-1)  # each predicted token's row
        sums = torch.zeros(n, dtype=token.dtype, device=token.device).index_add_(
            0, rows, token.reshape(-1))
        counts = torch.zeros(n, dtype=torch.long, device=token.device).index_add_(
            0, rows, mask.reshape(-1).long())
        return sums.view(2, -1).T, counts.view(2, -1).T

    def reference_logps(self, engine, batch: dict) -> torch.Tensor | None:
        if self.reference is None:
            return None
        if self.reference == "adapter_off":  # the frozen base: the same weights minus the adapter
            with torch.no_grad(), getattr(engine, "module", engine).disable_adapter():
                return self.pair_logps(engine, batch)[0]
        if "ref_logps" in batch:
            return batch["ref_logps"]
        return torch.zeros(batch["pair_mask"].shape[0], 2, device=batch["pair_mask"].device)

    def loss(self, engine, batch: dict) -> LossOut:
        ref = self.reference_logps(engine, batch)
        policy, counts = self.pair_logps(engine, batch)
        ref = ref.to(policy.dtype) if ref is not None else None
        m = batch["pair_mask"].to(policy.dtype)
        out = pair_losses(self.kind, policy, counts, ref, self.beta, self.label_smoothing,
                          self.gamma, self.lam, mask=m)
        chosen, rejected = out["chosen"].detach(), out["rejected"].detach()
        metrics = {"rewards/chosen": chosen, "rewards/rejected": rejected,
                   "rewards/margins": chosen - rejected,
                   "rewards/accuracies": (chosen > rejected).to(m.dtype),
                   "logps/chosen": policy[:, 0].detach(), "logps/rejected": policy[:, 1].detach(),
                   **{k: out[k].detach() for k in ("nll_loss", "log_odds_ratio") if k in out}}
        return LossOut((out["loss"] * m).sum(), {k: (v * m).sum() for k, v in metrics.items()})

    # ------------------------------------------------------------------ precomputed reference
    def setup(self, run) -> None:
        self.head = run.loss_head  # tiled as compute.loss says, like SFT
        if self.reference != "precomputed":
            return
        rows = [*run.train_rows, *run.eval_rows]  # a mixture: its distinct pairs
        path, key = run.out / REF_LOGPS, fingerprint(rows)
        cached = torch.load(path) if path.is_file() else None
        if cached is not None and cached.get("fingerprint") == key:
            values = cached["logps"]
            run.say(f"[dpkit] reference log-probs of {len(rows)} pairs read from {path}")
        else:
            values = self.precompute(run.engine, rows, run.dp_rank, run.batch.data_parallel,
                                     run.batch.micro_batch_size, run.tokenizer.pad_token_id,
                                     run.env.device)
            if run.env.is_main:
                write_atomic(path, lambda f: torch.save({"fingerprint": key, "logps": values}, f))
            run.say(f"[dpkit] reference log-probs of {len(rows)} pairs computed before step 1 "
                    f"(one forward per pair), cached in {path}")
        for row, (c, r) in zip(rows, values.tolist()):
            row.ref = (c, r)

    def precompute(self, engine, rows: list, dp_rank: int, dp_world: int, micro: int,
                   pad_id: int, device) -> torch.Tensor:
        """(N, 2) log-probs of the untouched model: each data-parallel rank forwards its share
        (the same number of batches on every rank, as ZeRO-3 gathers in step), then one sum."""
        values = torch.zeros(len(rows), 2, dtype=torch.float64)
        engine.eval()
        with torch.no_grad():
            for idx in eval_micro_batches(len(rows), dp_rank, dp_world, micro):
                batch = collate_pairs([rows[i] for i in idx], pad_id)
                batch = {k: v.to(device) for k, v in batch.items()}
                logps = self.pair_logps(engine, batch)[0].double().cpu()
                if idx:
                    values[idx] = logps
        engine.train()
        # Every row comes from one rank and zeros from the others: the sum is exact.
        summed = distributed.all_reduce_sum(values.flatten().tolist(), device)
        return torch.tensor(summed, dtype=torch.float64).view(-1, 2)

    def progress(self, metrics: dict[str, float]) -> dict[str, str]:
        return {"acc": f"{metrics['rewards/accuracies']:.2f}",
                "margin": f"{metrics['rewards/margins']:.3f}"}

    def describe(self) -> str:
        ref = f", reference {self.reference}" if self.reference else ", no reference model"
        return f"{self.name} (beta {self.beta:g}{ref})"

    def card(self) -> dict:
        card = {"objective": self.name}
        if self.kind != "orpo":
            card["beta"] = self.beta
        if self.kind in ("dpo", "simpo") and self.label_smoothing:
            card["label_smoothing"] = self.label_smoothing
        if self.kind == "simpo":
            card["simpo_gamma"] = self.gamma
        if self.kind == "orpo":
            card["orpo_lambda"] = self.lam
        if self.reference:
            card["reference"] = self.reference
        return card

    def card_rows(self) -> list[tuple[str, object]]:
        return [(LABELS.get(k, k), v) for k, v in self.card().items() if k != "objective"]


LABELS = {"simpo_gamma": "SimPO gamma", "orpo_lambda": "ORPO lambda",
          "reference": "reference model"}


def fingerprint(rows: list) -> str:
    """Identifies the tokenized pairs a cached reference belongs to."""
    h = hashlib.sha256()
    for row in rows:
        for ids in (row.chosen_ids, row.chosen_labels, row.rejected_ids, row.rejected_labels):
            h.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()
