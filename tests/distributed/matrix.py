"""The combination matrix: every pair of factor levels the schema and the registries accept, each
combination either refused by `dpkit validate` or trained on real ranks (tests/distributed/
test_matrix.py).

The factors are read, not listed by hand, wherever the code has a list:
- the methods from the method registry (dpkit.methods.METHODS);
- the ZeRO layouts from the DeepSpeed template registry (dpkit.zero.TEMPLATES: stage × optimizer
  offload × parameter offload);
- every other factor is a schema field whose levels are its type's (booleans, Literals) or, for an
  open number (sequence parallel degree), the levels named here.
`test_matrix.py` fails when the schema or a registry has a level this module neither covers nor
excludes with a reason, so a new option cannot land without its entry.

The rows are a covering array built greedily: every pair of levels of two factors appears in some
row, except pairs that `validate` refuses by design (REFUSED, each with the reason docs/matrix.md
gives). A refused pair gets one row of its own, which the test runs through `dpkit validate`.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

from dpkit.methods import METHODS, methods_with
from dpkit.recipe import DataSection, PeftSection, TrainSection, ZeroSection
from dpkit.zero import TEMPLATES

PREFERENCE = methods_with("preference")
ONLINE = methods_with("grpo")  # rows are prompts; completions are generated every step
REWARD = methods_with("reward")  # a score model: whole pairs (no prompt cut), centred scores
PAIRS = tuple(m for m, spec in METHODS.items() if "preference" in spec.formats)
"""Methods trained on preference pairs (chosen and rejected rows side by side)."""
NEW_HEAD = tuple(m for m, spec in METHODS.items() if spec.head != "causal_lm")
"""Methods whose model has another head than a causal LM's (a reward model's score layer)."""
UNPAIRED = tuple(m for m, spec in METHODS.items() if "unpaired" in spec.formats)  # KTO
WHOLE_ROWS = PAIRS + UNPAIRED
"""Methods whose loss sums each pair's or row's log-probs (or score) over its whole sequence."""
HELD_IN_MEMORY = tuple(m for m, spec in METHODS.items() if not spec.streams)
"""Methods whose rows are tokenized and held in memory (`MethodSpec.streams` false)."""


def zero_level(stage: int, opt: str, par: str) -> str:
    """'3', '2+opt', '3+opt+par': a ZeRO layout as one factor level."""
    return str(stage) + ("+opt" if opt != "none" else "") + ("+par" if par != "none" else "")


# Levels the matrix cannot run on these machines: (factor, level) → why. Each stays refused or
# unsupported only for the reason given; docs/matrix.md lists them.
EXCLUDED: dict[tuple[str, str], str] = {
    (f, lvl): "NVMe offload needs DeepSpeed's async I/O op (libaio) and a local NVMe drive; "
              "validate checks the recipe, the training is left to GPU machines"
    for f, lvl in [("zero.offload_optimizer", "nvme"), ("zero.offload_params", "nvme")]
}
EXCLUDED[("peft", "qlora")] = ("QLoRA needs a CUDA GPU (bitsandbytes 4-bit); validate refuses it "
                               "on CPU, scripts/gpu_qlora_check.py runs it on a GPU")

def schema_levels(model: type, field: str) -> tuple | None:
    """A field's levels from its type (None for an open number)."""
    kind = model.model_fields[field].annotation
    if kind is bool:
        return (False, True)
    args = typing.get_args(kind)
    return args if typing.get_origin(kind) is typing.Literal else None


FACTORS: dict[str, tuple] = {
    "method": tuple(METHODS),
    "zero": tuple(zero_level(*k) for k in TEMPLATES if "nvme" not in k),
    "peft": (None, "lora"),
    "packing": (False, True),
    "sequence_parallel": (1, 2),
    "streaming": (False, True),
    "tail": ("even", "uneven"),
    "dropout": (0.0, 0.1),
    # last: the greedy rows for the factors above stay as they were (the KNOWN ZeRO-3 + offload
    # + LoRA resume rows among them)
    "mixture": schema_levels(DataSection, "mixture"),
}
"""Factor → its levels. `tail` and `dropout` are properties of the data and the model: an uneven
tail leaves a rank empty micro-batches at the epoch's end and an odd number of eval rows."""

# The schema fields behind the factors whose levels come from a type: a Literal or a bool field
# gaining a level fails test_every_schema_level_is_in_the_matrix until FACTORS or EXCLUDED has it.
SCHEMA_FIELDS: dict[str, tuple[type, str]] = {
    "packing": (DataSection, "packing"),
    "streaming": (DataSection, "streaming"),
    "mixture": (DataSection, "mixture"),
    "peft": (PeftSection, "method"),
    "zero.stage": (ZeroSection, "stage"),
    "zero.offload_optimizer": (ZeroSection, "offload_optimizer"),
    "zero.offload_params": (ZeroSection, "offload_params"),
    "sequence_parallel": (TrainSection, "sequence_parallel"),
}


@dataclass(frozen=True)
class Refusal:
    when: dict[str, tuple]
    """factor → the levels that together are refused"""
    keys: tuple[str, ...]
    """the recipe keys validate's line names"""
    why: str


REFUSED: tuple[Refusal, ...] = (
    Refusal({"method": WHOLE_ROWS, "sequence_parallel": (2,)},
            ("train.sequence_parallel", "objective"),
            "the sequence split would cut a pair's chosen/rejected rows and its pair mask, or a "
            "KTO row from its log-prob sum"),
    Refusal({"method": HELD_IN_MEMORY, "streaming": (True,)}, ("data.streaming", "objective"),
            "the method's rows (pairs, KTO's rows, GRPO's prompts) are tokenized and held in "
            "memory (MethodSpec.streams); streaming reads rows only"),
    Refusal({"method": ONLINE, "sequence_parallel": (2,)},
            ("train.sequence_parallel", "objective"),
            "rollouts generate whole sequences on each rank"),
    Refusal({"method": ONLINE, "packing": (True,)}, ("data.packing", "objective"),
            "its rows are prompts whose completions are generated every step: nothing to pack"),
    Refusal({"zero": ("0",), "sequence_parallel": (2,)}, ("zero.stage",),
            "DeepSpeed clips ZeRO-0 gradients with tensor-parallel bookkeeping that sequence "
            "parallelism would skew"),
)
"""Combinations `dpkit validate` refuses by design, each in one line naming its keys."""


def refusal(row: dict) -> Refusal | None:
    for r in REFUSED:
        if all(row.get(f) in levels for f, levels in r.when.items()):
            return r
    return None


def _pairs(row: dict) -> set:
    return {(a, row[a], b, row[b]) for a, b in combinations(FACTORS, 2) if a in row and b in row}


_PLAIN = {"packing": False, "sequence_parallel": 1, "streaming": False, "tail": "even",
          "dropout": 0.0}
# GRPO's μ (optimizer steps per rollout batch) and β (its reference: adapter off under LoRA, a
# frozen copy partitioned like the policy for full fine-tuning) over its 8 required rows, so that
# every pair of (ZeRO stage, peft, μ, β) levels appears once: no row added for them.
# The frozen copy is met under ZeRO 0–2 (a module) and ZeRO-3 (a second engine), μ = 2 with
# both references.
ONLINE_LEVELS = {("0", None): (2, 0.0), ("0", "lora"): (1, 0.1), ("1", None): (1, 0.1),
                 ("1", "lora"): (2, 0.0), ("2", None): (1, 0.0), ("2", "lora"): (2, 0.1),
                 ("3", None): (2, 0.1), ("3", "lora"): (1, 0.0)}
"""(zero, peft) → (grpo.iterations, grpo.beta) of GRPO's required rows."""
ROLLOUTS = schema_levels(METHODS[ONLINE[0]].settings, "rollout") if ONLINE else ()
"""GRPO's rollout modes. `fast` (a rank's prompts in one padded batch, sequences packed for the
forwards) may change with the world size by design: its rows rerun and resume bitwise instead,
one with LoRA under ZeRO-3 and μ = 2 (its kept batch), one full under ZeRO-2 with β > 0 (the
frozen copy's packed forward)."""
FAST_ROWS: tuple[dict, ...] = tuple(
    {"method": m, "zero": z, "peft": p, **_PLAIN, "rollout": "fast", "iterations": mu, "beta": b}
    for m in ONLINE for z, p, mu, b in (("3", "lora", 2, 0.0), ("2", None, 1, 0.1)))
REQUIRED: tuple[dict, ...] = tuple(
    {"method": m, "zero": z, "peft": p, **_PLAIN,
     **({"iterations": ONLINE_LEVELS[z, p][0], "beta": ONLINE_LEVELS[z, p][1]}
        if m in ONLINE else {})}
    for m in ONLINE + NEW_HEAD for z in ("0", "1", "2", "3") for p in (None, "lora")) + tuple(
    {"method": m, "zero": z, "peft": p, "dropout": 0.0}
    for m in UNPAIRED for z in ("0", "1", "2", "3") for p in (None, "lora")) + FAST_ROWS
"""Rows beyond pairwise coverage, first in the array: GRPO's completions and losses (with μ and β
as ONLINE_LEVELS sets them), and a model
with a new head (a reward model's score layer: its seeded init, its ZeRO-3 gather, PEFT training
it in full), must equal one process's under every ZeRO stage, full and LoRA (dropout 0); so must
KTO's losses and its reference point z₀ — all-reduced over the global batch before the backward
passes — with both its references (precomputed for full fine-tuning, adapter off with LoRA).
KTO's rows fix only those levels: the rest are chosen greedily like any row's, so they also
cover packing and the uneven tail. The greedy rows then cover only what these leave."""


def covering_rows() -> list[dict]:
    """Greedy pairwise covering array over FACTORS, deterministic, after the REQUIRED rows.
    Rows that a Refusal matches are never generated here (their pairs cannot be trained);
    refused_rows() adds one per Refusal."""
    names = list(FACTORS)
    uncovered = {(a, la, b, lb) for a, b in combinations(names, 2)
                 for la in FACTORS[a] for lb in FACTORS[b]}
    # pairs refused whatever the other factors are: nothing to cover
    uncovered = {p for p in uncovered if refusal({p[0]: p[1], p[2]: p[3]}) is None}
    rows: list[dict] = []
    seeds = [dict(r) for r in REQUIRED]
    while uncovered or seeds:
        if seeds:  # a required row, the levels it leaves open chosen as for any row
            row = seeds.pop(0)
        else:
            a, la, b, lb = min(uncovered, key=lambda p: (names.index(p[0]), names.index(p[2]),
                                                         FACTORS[p[0]].index(p[1]),
                                                         FACTORS[p[2]].index(p[3])))
            row = {a: la, b: lb}
        for f in names:
            if f in row:
                continue
            options = [lvl for lvl in FACTORS[f] if refusal({**row, f: lvl}) is None]
            row[f] = max(options, key=lambda lvl: (len(_pairs({**row, f: lvl}) & uncovered),
                                                   -FACTORS[f].index(lvl)))
        assert refusal(row) is None, row
        uncovered -= _pairs(row)
        rows.append(row)
    return rows


def refused_rows() -> list[dict]:
    """One row per Refusal: its levels, every other factor at its first level."""
    return [{f: (r.when[f][0] if f in r.when else FACTORS[f][0]) for f in FACTORS}
            for r in REFUSED]


def row_name(row: dict) -> str:
    return "-".join([row["method"], "z" + row["zero"].replace("+", "_"),
                     row["peft"] or "full", *(["packed"] if row["packing"] else []),
                     *([f"sp{row['sequence_parallel']}"] if row["sequence_parallel"] > 1 else []),
                     *(["stream"] if row["streaming"] else []),
                     *([f"mix_{row['mixture']}"] if row["mixture"] != "concat" else []),
                     row["tail"],
                     *(["dropout"] if row["dropout"] else []),
                     *([f"mu{row['iterations']}"] if row.get("iterations", 1) > 1 else []),
                     *(["kl"] if row.get("beta") else []),
                     *([row["rollout"]] if row.get("rollout", "reproducible") != "reproducible"
                       else [])])


def compares_to_one_process(row: dict) -> bool:
    """Dropout draws its masks per rank: by design a world size changes those numbers, so they
    are held to a bitwise rerun and resume instead; so are GRPO's fast rollouts (a rank's batch of
    prompts, padded together). A stream is the same on any world size."""
    return not row["dropout"] and row.get("rollout", "reproducible") == "reproducible"


def resumes(row: dict) -> bool:
    """Rows also resumed from a checkpoint (bitwise): dropout (its per-rank masks), streams
    (their saved position), GRPO with μ > 1 (its rollout batch kept between its steps) and
    GRPO's fast rollouts (held to a rerun, not to one process)."""
    return (bool(row["dropout"]) or row["streaming"] or row.get("iterations", 1) > 1
            or not compares_to_one_process(row))


def resume_step(row: dict) -> int:
    """The checkpoint a resumed row continues from: step 2, or with μ = 2 step 3 — between the
    two steps of a rollout batch, so the resume needs the batch the checkpoint kept."""
    return 3 if row.get("iterations", 1) == 2 else 2


def parse_zero(level: str) -> dict:
    stage = int(level[0])
    return {"stage": stage, "offload_optimizer": "cpu" if "+opt" in level else "none",
            "offload_params": "cpu" if "+par" in level else "none"}


# Data: 12 train rows or pairs (a global batch of 4: three full steps), or, uneven, 13 rows or 14
# pairs (a 4th step of 1 or 2, which on 2 ranks × micro 1 leaves a rank empty micro-batches) and
# 3 eval rows over 2 ranks. test_matrix checks the counts from each run's metrics and summary.
GLOBAL_BATCH = 4
ROWS = {"even": (12, 0.0), "uneven": (17, 0.18)}  # max_rows, eval_fraction

# A mixture: three sources (rows, pairs) of these sizes (all kept by tokenization; uneven: one
# of each is held out for eval, 3 in all, leaving 2, 7 and 5), drawn so that an epoch has a
# multiple of the global batch (even: 8, 16, 12 draws) or not (uneven: 13, 15, 13 draws: 4 steps,
# so a resume from step 2 runs two), with a source drawn less than its size and one drawn again.
# SFT sources: messages, alpaca's output as text (a column mapping), alpaca (its first 13 rows
# keep 6 at max_seq_len 96); other methods: their bundled data three times.
MIX_SIZES = {"even": (2, 4, 6), "uneven": (3, 8, 6)}
MIX_KEYS = {
    ("first_exhausted", "even"): [{"weight": 1}, {"weight": 2}, {"weight": 1}],     # 2+4+2
    ("all_exhausted", "even"): [{"weight": 2}, {"weight": 3}, {"weight": 3}],       # 4+6+6
    ("fixed", "even"): [{"rows_per_epoch": 5}, {"rows_per_epoch": 1}, {"epochs": 1.0}],
    ("first_exhausted", "uneven"): [{"weight": 1}, {"weight": 3}, {"weight": 3}],   # 2+6+5
    ("all_exhausted", "uneven"): [{"weight": 1}, {"weight": 3}, {"weight": 3}],     # 2+7+6
    ("fixed", "uneven"): [{"rows_per_epoch": 3}, {"rows_per_epoch": 4}, {"epochs": 1.2}],
}
ALPACA_ROWS = {1: 7, 6: 13}  # alpaca's max_rows that keeps this many rows at max_seq_len 96


def mixture_sources(row: dict, base: dict) -> list[dict]:
    """Three sources: for SFT three formats, for the other methods their data three times
    (its first rows of each size)."""
    sizes = MIX_SIZES[row["tail"]]
    if base["format"] == "messages":
        alpaca = "dpkit:data/self_instruct_seed.alpaca.jsonl"
        sources = [{**base, "max_rows": sizes[0]},
                   {"path": alpaca, "format": "text", "columns": {"text": "output"},
                    "max_rows": sizes[1]},
                   {"path": alpaca, "format": "alpaca", "max_rows": ALPACA_ROWS[sizes[2]]}]
    else:
        sources = [{**base, "max_rows": n} for n in sizes]
    if row["mixture"] == "concat":
        return sources
    keys = MIX_KEYS[(row["mixture"], row["tail"])]
    if row["streaming"] and "epochs" in keys[2]:  # a stream's length is unknown: rows instead
        keys = [*keys[:2], {"rows_per_epoch": round(keys[2]["epochs"] * sizes[2])}]
    return [{**s, **k} for s, k in zip(sources, keys)]


PROMPT_DATA = "dpkit:data/letters.prompts.jsonl"
UNPAIRED_DATA = "dpkit:data/self_instruct_seed.unpaired.jsonl"  # KTO: 119 labelled rows
GROUP = 2  # GRPO's completions per prompt in the matrix (a step trains on GROUP × its prompts)


def recipe(row: dict, out: Path, tokenizer: str, sft_data: str, pref_data: str,
           model_config: dict, steps: int | None = None) -> dict:
    """The row's recipe: a tiny fp32 model on the bundled data."""
    preference, pairs = row["method"] in PREFERENCE, row["method"] in PAIRS
    online, reward = row["method"] in ONLINE, row["method"] in REWARD
    unpaired = row["method"] in UNPAIRED
    max_rows, eval_fraction = ROWS[row["tail"]]
    config = dict(model_config, attention_dropout=row["dropout"])
    mixed = row.get("mixture", "concat") != "concat"
    base = {"path": PROMPT_DATA if online else UNPAIRED_DATA if unpaired else
            pref_data if pairs else sft_data,
            "format": "prompts" if online else "unpaired" if unpaired else
            "preference" if pairs else "messages"}
    sources = mixture_sources(row, base) if mixed else [{**base, "max_rows": max_rows}]
    r = {
        "model": {"config": config, "tokenizer": tokenizer, "dtype": "float32"},
        "data": {"sources": sources, "mixture": row.get("mixture", "concat"),
                 # whole pairs: 128 tokens hold all 17 (the preference rows cut prompts to 24)
                 "max_seq_len": 128 if reward else 96, "packing": row["packing"],
                 "streaming": row["streaming"], "eval_fraction": eval_fraction,
                 "shuffle_buffer": 8},
        "train": {"global_batch_size": GLOBAL_BATCH, "micro_batch_size": 1, "lr": 1e-2,
                  "lr_schedule": "constant", "sequence_parallel": row["sequence_parallel"],
                  "max_grad_norm": 1.0},
        "zero": parse_zero(row["zero"]),
        "objective": row["method"],
        "output": {"dir": str(out), "save_model": False},
        "eval": {"num_prompts": 0},
    }
    if row["streaming"] and eval_fraction:  # a stream holds nothing out: eval rows of their own
        r["data"]["eval_fraction"] = 0.0
        plain = [{k: v for k, v in s.items() if k not in ("weight", "rows_per_epoch", "epochs")}
                 for s in sources]
        r["data"]["eval_sources"] = ([{**s, "max_rows": ALPACA_ROWS[1] if s["format"] == "alpaca"
                                       else 1} for s in plain] if mixed else
                                     [{**plain[0], "max_rows": 3}])
    if steps is not None:
        r["train"]["max_steps"] = steps
    elif row["streaming"]:  # a stream has no known length
        r["train"]["max_steps"] = 3
    if preference:
        r["preference"] = {"max_prompt_len": 24}
    if reward:
        r["reward"] = {"center_rewards_coefficient": 0.01}
    if unpaired:
        r[METHODS[row["method"]].section] = {"max_prompt_len": 24}
    if online:  # short completions sampled at temperature 1 and scored by the toy reward
        r["grpo"] = {"group_size": GROUP, "max_completion_len": 6,
                     "rewards": [{"function": "char_share"}],
                     "iterations": row.get("iterations", 1), "beta": row.get("beta", 0.0),
                     "rollout": row.get("rollout", "reproducible")}
        if row.get("iterations", 1) > 1:  # at lr 1e-2 a step moves full fine-tuning's ratios
            # past 1 ± 0.2 everywhere (all clipped: no gradient), LoRA's by ~3%: a clip low
            # enough for LoRA's, high enough above for full fine-tuning's A > 0 tokens
            r["grpo"].update(epsilon=0.01, epsilon_high=5.0)
        # its log-probs through the tiled head (tiles of 4 of a micro-batch's ~12 completion
        # tokens), under every stage, the frozen reference's too
        r["compute"] = {"loss": "tiled", "loss_tile_tokens": 4}
    if row["peft"]:
        r["peft"] = {"method": row["peft"], "r": 4, "alpha": 8, "dropout": row["dropout"]}
    return r
