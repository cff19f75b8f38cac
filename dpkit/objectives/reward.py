"""Reward modelling: a Bradley-Terry score model trained on preference pairs.

The model is the causal LM with a score layer instead of its LM head (transformers'
`...ForSequenceClassification` with one label, dpkit/heads.py): one number per token, of which
a row's score r is the one at its last real token. The unit is the pair; per pair, with c the
chosen row, r the rejected one and m the pair's margin (`reward.margin_column`, else 0):

    loss = −log σ(r_c − r_r − m) + λ (r_c + r_r)²        λ: reward.center_rewards_coefficient

summed over pairs (the loop divides by the global number of pairs): TRL's RewardTrainer's mean
of the same terms. Metrics per pair: the chosen and rejected scores, their difference and the
accuracy (r_c > r_r).

Where a score is read. transformers' pooled output takes each row's last token that is not
`pad_token_id`; dpkit pads with eos where a tokenizer has no pad token, so a row ending in eos
(every plain-text pair does) would be read one token early, and rows laid end to end
(`data.packing`) would give one number for all. dpkit takes the per-token scores from the score
layer itself (a forward hook: the same forward, no second call of the layer) and reads each
row at its last real token, from the attention mask or, laid end to end, the row ids.

Chosen and rejected go through the model in one forward (dpkit/data/preference.py: the B chosen
rows, then the B rejected ones). A pair the batch masks out (a rank whose shard ran out) adds 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dpkit import heads
from dpkit.data.preference import collate_pairs
from dpkit.objectives.base import LossOut, Objective
from dpkit.objectives.head import wide
from dpkit.objectives.sft import model_inputs


def pair_losses(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None,
                center: float = 0.0) -> torch.Tensor:
    """Per-pair loss from the (B,) scores of the chosen and rejected rows (the formula above)."""
    z = chosen - rejected - (margin if margin is not None else 0.0)
    loss = -F.logsigmoid(z)
    if center:
        loss = loss + center * (chosen + rejected) ** 2
    return loss


def last_token_scores(per_token: torch.Tensor, batch: dict) -> torch.Tensor:
    """Each row's score at its last real token: `per_token` [rows, T] (right-padded rows, the
    attention mask marks the real tokens) or [1, N] with `row_ids` (rows laid end to end)."""
    if "row_ids" in batch:
        rows = batch["row_ids"].reshape(-1)
        n = 2 * batch["pair_mask"].shape[0]
        where = torch.arange(rows.numel(), device=rows.device)
        last = torch.zeros(n, dtype=torch.long, device=rows.device).scatter_reduce_(
            0, rows, where, "amax")
        return per_token.reshape(-1)[last]
    last = batch["attention_mask"].sum(-1) - 1
    return per_token[torch.arange(per_token.shape[0], device=per_token.device), last]


class Reward(Objective):
    name = "reward"
    unit = "pairs"
    rows_per_item = 2  # chosen and rejected, in one forward
    packs_rows = False  # a pair's two rows are laid end to end per batch (collate's flatten)
    metric_names = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")

    def __init__(self, center: float = 0.0, margin_column: str | None = None):
        self.center, self.margin_column = center, margin_column
        self._layer, self._scores = None, None

    @classmethod
    def from_recipe(cls, recipe) -> Reward:
        from dpkit.methods.reward import RewardSection

        section = recipe.reward or RewardSection()
        return cls(section.center_rewards_coefficient, section.margin_column)

    def setup(self, run) -> None:
        self.watch(run.engine)

    def watch(self, model) -> None:
        """Keep the score layer's per-token output at every forward of `model` (an engine, a
        PEFT model or a plain one)."""
        layer = heads.score_layer(getattr(model, "module", model))
        if layer is not self._layer:
            layer.register_forward_hook(self._keep)
            self._layer = layer

    def _keep(self, module, args, output) -> None:
        self._scores = output

    def collate(self, examples: list, pad_id: int, flatten: bool = False) -> dict:
        return collate_pairs(examples, pad_id, flatten)

    def count(self, batch: dict) -> int:
        return int(batch["pair_mask"].sum())

    def scores(self, engine, batch: dict) -> torch.Tensor:
        """(2B,) scores: the B chosen rows, then the B rejected, from one forward."""
        self.watch(engine)
        engine(input_ids=batch["input_ids"], use_cache=False, **model_inputs(batch))
        per_token, self._scores = self._scores, None
        return last_token_scores(per_token[..., 0], batch)

    def loss(self, engine, batch: dict) -> LossOut:
        scores = self.scores(engine, batch)
        scores = scores.to(wide(scores.dtype))
        chosen, rejected = scores.view(2, -1)
        mask = batch["pair_mask"].to(scores.dtype)
        margin = batch.get("margin") if self.margin_column else None
        loss = pair_losses(chosen, rejected, margin.to(scores.dtype) if margin is not None
                           else None, self.center)
        c, r = chosen.detach(), rejected.detach()
        metrics = {"rewards/chosen": c, "rewards/rejected": r, "rewards/margins": c - r,
                   "rewards/accuracies": (c > r).to(mask.dtype)}
        return LossOut((loss * mask).sum(), {k: (v * mask).sum() for k, v in metrics.items()})

    def progress(self, metrics: dict[str, float]) -> dict[str, str]:
        return {"acc": f"{metrics['rewards/accuracies']:.2f}",
                "margin": f"{metrics['rewards/margins']:.3f}"}

    def describe(self) -> str:
        extras = [f"margin column '{self.margin_column}'"] if self.margin_column else []
        extras += [f"centring {self.center:g}"] if self.center else []
        return "reward (Bradley-Terry on pairs, score at each row's last token" + \
            "".join(f", {e}" for e in extras) + ")"

    def card(self) -> dict:
        card = {"objective": self.name}
        if self.margin_column:
            card["margin_column"] = self.margin_column
        if self.center:
            card["center_rewards_coefficient"] = self.center
        return card

    def card_rows(self) -> list[tuple[str, object]]:
        labels = {"margin_column": "margin column", "center_rewards_coefficient":
                  "reward centring coefficient"}
        return [("loss", "Bradley-Terry (pairwise logistic)")] + [
            (labels[k], v) for k, v in self.card().items() if k != "objective"]
