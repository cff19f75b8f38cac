"""Every combination the schema accepts is proven or refused (tests/distributed/matrix.py builds
the rows from the schema and the registries).

Each row is run through `dpkit validate` first: a refused combination must be one of
matrix.REFUSED and say so in one line naming its keys (exit 2); every other row must pass and then
train on 2 real ranks with every logged number finite, and
- where the world size cannot change the numbers (dropout 0; streams and data mixtures included):
  per-step losses and eval losses equal one process within 1e-5 (fp32), and the tokens and rows
  counted per data source are one process's;
- where it can by design (dropout masks are drawn per rank): a rerun of its first two steps from
  scratch is bitwise equal;
- with dropout or a stream: a resume from the step-2 checkpoint continues bitwise equal.
Two launches in all: every 1-process reference, then every 2-rank row, rerun and resume."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import math
import os
import re
from pathlib import Path

import pytest
from conftest import MESSAGES, ROOT, TINY_LLAMA, TOKENIZER, read_metrics, torchrun, write_recipe

from distributed import matrix as M
from dpkit.cli import main

pytestmark = pytest.mark.distributed
DRIVER = ROOT / "tests" / "distributed" / "run_recipes.py"
PREF = "dpkit:data/self_instruct_seed.preference.jsonl"
TOL = 1e-5
PREFERENCE_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
                   "logps/rejected")
# GRPO's loss value is ~0 at one optimizer step per rollout (ratio 1, advantages summing to 0 per
# group; exactly 0 when a group's completions have one length): what shows the step are the
# gradient's norm, the entropy (a function of the weights), the rewards, and the completions
# themselves (their checksum, compared exactly).
ONLINE_KEYS = ("grad_norm", "entropy", "reward")
REWARD_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins")
KTO_KEYS = ("kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected")
"""KTO's z₀ (`kl`) is all-reduced over the global batch: equal to one process's too. A class
absent from a step's batch has no entry (as in TRL's logs)."""
CHECKSUM = "completions/checksum"
ROWS = {M.row_name(r): r for r in M.covering_rows()}
ONLY = os.environ.get("DPKIT_MATRIX_ONLY")
"""A regular expression: the fixture trains only the rows whose names match (with `-k` the same
rows: a developer's loop on a few rows; unset in CI, where every row runs)."""


def build(row: dict, out: Path, **kw) -> dict:
    return M.recipe(row, out, str(TOKENIZER), str(MESSAGES), PREF, TINY_LLAMA, **kw)


def validate(path: Path) -> tuple[int, str]:
    """`dpkit validate` in this process (its exit code and what it printed on stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["validate", str(path), "--nproc-per-node", "2"])
    return code, err.getvalue()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("matrix")
    single, double, resumed = {}, {}, {}
    for name, row in ROWS.items():
        if ONLY and not re.search(ONLY, name):
            continue
        r = build(row, tmp / name)
        if M.compares_to_one_process(row):
            single[f"{name}.one"] = build({**row, "sequence_parallel": 1}, tmp / f"{name}.one")
        else:  # steps 1-2 rerun from scratch
            resumed[f"{name}.rerun"] = build(row, tmp / f"{name}.rerun", steps=2)
        if M.resumes(row):  # resumed from the step-2 checkpoint (μ = 2: step 3's)
            k = M.resume_step(row)
            r["output"]["save_steps"] = k
            resumed[f"{name}.resumed"] = {**build(row, tmp / f"{name}.resumed"),
                                          "resume": str(tmp / name / "checkpoints" /
                                                        f"step-{k:08d}")}
        double[name] = r
    refused = {}
    for name, r in double.items():  # what validate says OK must train: checked below
        code, err = validate(write_recipe(tmp / f"{name}.yaml", r))
        if code:
            refused[name] = err.strip()
    assert not refused, f"validate refused combinations matrix.REFUSED does not list: {refused}"
    for group, nproc in ((single, 1), ({**double, **resumed}, 2)):  # a resume after its run
        paths = [str(write_recipe(tmp / f"{name}.yaml", r)) for name, r in group.items()]
        torchrun(nproc, paths, script=DRIVER, timeout=900)
    return tmp


# ------------------------------------------------------------------- the matrix is the schema's
def test_every_schema_level_is_in_the_matrix():
    """A level the schema or a registry gains without a matrix entry (or an exclusion with its
    reason) fails here."""
    missing = []
    for factor, (model, field) in M.SCHEMA_FIELDS.items():
        for level in M.schema_levels(model, field) or ():
            if (factor, level) in M.EXCLUDED:
                continue
            if factor.startswith("zero."):  # the layouts: one factor, read from TEMPLATES
                layouts = [M.parse_zero(z) for z in M.FACTORS["zero"]]
                ok = any(z[field] == level for z in layouts)
            else:
                ok = level in M.FACTORS[factor]
            if not ok:
                missing.append(f"{factor}={level!r}")
    assert not missing, f"schema levels with no entry in tests/distributed/matrix.py: {missing}"
    assert set(M.FACTORS["method"]) == set(M.METHODS)
    # GRPO's rollout modes are levels of its own section, not factors: each has its rows
    assert set(M.ROLLOUTS) == {r.get("rollout", "reproducible") for r in ROWS.values()
                               if r["method"] in M.ONLINE}


def test_docs_count_the_combinations_the_matrix_trains():
    doc = (ROOT / "docs" / "matrix.md").read_text()
    said = re.search(r"greedily: (\d+) combinations today", " ".join(doc.split()))
    assert said and int(said.group(1)) == len(ROWS), (said and said.group(1), len(ROWS))


def test_rows_cover_every_pair_of_levels():
    """Written independently of the generator: every pair of levels of two factors is in a row,
    unless it is a refused pair; a method with another head than a causal LM's is compared with
    one process under every ZeRO stage, full and LoRA."""
    rows = list(ROWS.values())
    for a, b in itertools.combinations(M.FACTORS, 2):
        for la, lb in itertools.product(M.FACTORS[a], M.FACTORS[b]):
            if M.refusal({a: la, b: lb}):
                continue
            assert any(r[a] == la and r[b] == lb for r in rows), (a, la, b, lb)
    assert all(M.refusal(r) is None for r in rows)
    for method in (m for m, spec in M.METHODS.items() if spec.head != "causal_lm"):
        for stage, peft in itertools.product("0123", (None, "lora")):
            assert any(r["method"] == method and r["zero"] == stage and r["peft"] == peft
                       and M.compares_to_one_process(r) for r in rows), (method, stage, peft)


@pytest.mark.parametrize("row", M.refused_rows(), ids=M.row_name)
def test_refused_combinations_are_refused_in_one_line(row, tmp_path):
    why = M.refusal(row)
    code, err = validate(write_recipe(tmp_path / "r.yaml", build(row, tmp_path / "run")))
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1, err
    assert all(key in lines[0] for key in why.keys), (why.keys, lines[0])
    assert not (tmp_path / "run").exists()


def test_zero_layouts_without_a_template_are_refused(tmp_path):
    stages = M.schema_levels(M.ZeroSection, "stage")
    offloads = [o for o in M.schema_levels(M.ZeroSection, "offload_optimizer") if o != "nvme"]
    row = next(iter(ROWS.values()))
    for stage, opt, par in itertools.product(stages, offloads, offloads):
        if (stage, opt, par) in M.TEMPLATES:
            continue
        r = build(row, tmp_path / "run")
        r["zero"] = {"stage": stage, "offload_optimizer": opt, "offload_params": par}
        code, err = validate(write_recipe(tmp_path / "r.yaml", r))
        assert code == 2 and "zero." in err, (stage, opt, par, err)


def test_qlora_is_refused_on_cpu(tmp_path):
    r = build(next(iter(ROWS.values())), tmp_path / "run")
    r["peft"] = {"method": "qlora"}
    code, err = validate(write_recipe(tmp_path / "r.yaml", r))
    assert code == 2 and "peft.method" in err and "CUDA" in err, err


def test_docs_list_every_refusal_and_exclusion():
    doc = (ROOT / "docs" / "matrix.md").read_text()
    for r in M.REFUSED:
        assert r.why in doc and all(k in doc for k in r.keys), r
    for (factor, level), why in M.EXCLUDED.items():
        assert why in doc and f"{factor}: {level}" in doc, (factor, level)


# ------------------------------------------------------------------------------ the trained rows
def _steps(run: Path) -> list[dict]:
    return [m for m in read_metrics(run) if "loss" in m]


def _evals(run: Path, key: str = "eval_loss") -> list[float]:
    return [m[key] for m in read_metrics(run) if key in m]


def _same_rollouts(a: list[dict], b: list[dict], tol: float, keys=ONLINE_KEYS) -> None:
    """GRPO: the same completions at every step (their checksum, exactly: the first step that
    differs is named, as a near-tied token flipped by rounding would be) and the same gradient
    norms, entropies and rewards within `tol`."""
    assert len(a) == len(b), (len(a), len(b))
    differ = [m["step"] for m, n in zip(a, b) if m[CHECKSUM] != n[CHECKSUM]]
    assert not differ, f"completions differ from step {differ[0]} on"
    for key in keys:
        x, y = [m[key] for m in a], [m[key] for m in b]
        assert max(abs(p - q) for p, q in zip(x, y)) <= tol * max(1.0, *map(abs, y)), (key, x, y)


def _numbers(line: dict):
    for v in line.values():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            yield v
        elif isinstance(v, list):
            yield from (x for x in v if isinstance(x, (int, float)))


# Found by this matrix, not yet mended: with the optimizer offloaded to the CPU and packed rows,
# the second step after a resume differs from the uninterrupted run by ~1e-6 (the first is bitwise
# equal), so the update of the first resumed step is not the uninterrupted one: DeepSpeed's CPU
# Adam state does not come back exactly. Seen under ZeRO-3 with LoRA (DPO) and, reproduced apart
# for SFT, DPO and reward models alike, under ZeRO-1 and ZeRO-2 full fine-tuning; without packing,
# or without the offload, the same rows resume bitwise. Strict: the mark fails the suite once
# they do.
# Not strict where unpacked: a ZeRO-2 + CPU offload SFT mixture row drifted by 2e-6 at its second
# resumed step in a CI run of 2026-12-08, while other unpacked offload rows resumed bitwise.
KNOWN = {name: pytest.mark.xfail(strict=bool(row["packing"]),
                                 reason="CPU optimizer offload: resume not bitwise (~1e-6 at the "
                                        "second step)")
         for name, row in ROWS.items()
         if "+opt" in row["zero"] and M.resumes(row)}


@pytest.mark.parametrize("name", [pytest.param(n, marks=KNOWN.get(n, ())) for n in ROWS])
def test_combination_trains_as_promised(runs, name):
    row, run = ROWS[name], runs / name
    online = row["method"] in M.ONLINE
    summary = json.loads((run / "summary.json").read_text())
    steps = _steps(run)
    assert steps, name
    bad = [m for m in read_metrics(run) for v in _numbers(m) if not math.isfinite(v)]
    assert not bad, bad
    assert all(m["grad_norm"] > 0 for m in steps)  # it learned something at every step
    if row["method"] in M.PREFERENCE + M.UNPAIRED:  # the reference the method and LoRA ask for
        log = (run / "logs" / "rank0.log").read_text()
        want = ("no reference model" if row["method"] not in ("dpo", "ipo", "kto") else
                "reference adapter_off" if row["peft"] else "reference precomputed")
        assert want in log, want
    uneven = row["tail"] == "uneven"
    assert (summary["data"]["eval_rows"] % 2 == 1) == uneven, summary["data"]  # 2 eval shards
    if uneven:  # it trained: the loss on the same held-out rows moved from step 0's (equal
        # numbers on 1 and 2 ranks would prove nothing if neither moved; DPO's may rise: 14
        # pairs at lr 1e-2 overfit). GRPO's eval loss is ~0 by construction: its entropy.
        evals = _evals(run, "eval_entropy" if online else "eval_loss")
        assert len(evals) >= 2 and abs(evals[-1] - evals[0]) > 1e-4, evals
    if not row["streaming"] and not (row["packing"] and row["method"] == "sft"):
        # the fixture is as unkind as it says (packed rows are batched as the packer fills them)
        per_item = (2 if row["method"] in M.PAIRS else  # a pair is two rows
                    M.GROUP if online else 1)  # G completions per prompt
        items = [m["samples"] / per_item for m in steps]
        if uneven:  # the last step leaves a rank an empty micro-batch
            full = [M.GLOBAL_BATCH] * (len(items) - 1)
            assert items[:-1] == full and items[-1] < M.GLOBAL_BATCH, items
        else:
            assert items == [M.GLOBAL_BATCH] * len(items), items
    if M.compares_to_one_process(row):
        one = runs / f"{name}.one"
        a, b = [m["loss"] for m in steps], [m["loss"] for m in _steps(one)]
        assert len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b)) <= TOL, (a, b)
        ga, gb = steps[0]["grad_norm"], _steps(one)[0]["grad_norm"]  # what clipping acted on
        assert abs(ga - gb) <= TOL * max(1.0, gb), (ga, gb)
        for key in (PREFERENCE_KEYS if row["method"] in M.PREFERENCE else
                    REWARD_KEYS if row["method"] in M.REWARD else
                    KTO_KEYS if row["method"] in M.UNPAIRED else ()):
            x, y = [m.get(key) for m in steps], [m.get(key) for m in _steps(one)]
            assert [v is None for v in x] == [v is None for v in y], (key, x, y)
            x, y = [v for v in x if v is not None], [v for v in y if v is not None]
            tol = TOL * max(1.0, *map(abs, y))  # log-probs are sums over ~50 tokens
            if key == "kl":  # a mean of differences of such sums: their fp32 resolution
                tol = TOL * max(abs(m.get(k) or 0.0) for m in _steps(one)
                                for k in ("logps/chosen", "logps/rejected"))
            assert max((abs(p - q) for p, q in zip(x, y)), default=0.0) <= tol, (key, x, y)
        if row["method"] in M.UNPAIRED:  # z₀ came into play: some step's was above its clamp
            assert any(m["kl"] > 0 for m in steps), [m["kl"] for m in steps]
        if online:
            _same_rollouts(steps, _steps(one), TOL)
            if row.get("beta"):  # the KL against the reference, as one process's
                x, y = [m["kl"] for m in steps], [m["kl"] for m in _steps(one)]
                assert max(abs(p - q) for p, q in zip(x, y)) <= TOL * max(1.0, *y), (x, y)
        ea, eb = _evals(run), _evals(one)
        assert len(ea) == len(eb) and all(abs(x - y) <= TOL for x, y in zip(ea, eb)), (ea, eb)
        per_source = [s["data"]["sources"] for s in (summary, json.loads(
            (one / "summary.json").read_text()))]
        assert per_source[0] == per_source[1]  # the same rows and tokens from each source
    else:  # the same world size reproduces it from scratch
        rerun = _steps(runs / f"{name}.rerun")
        assert [m["loss"] for m in rerun] == [m["loss"] for m in steps[:2]]
    tokens = summary["data"]["sources"]
    if row["method"] not in M.ONLINE + M.UNPAIRED:  # their batches hold more than the rows
        # drawn (GRPO's generated completions, KTO's mismatched ones): here all of a step
        assert sum(s["tokens_seen"] for s in tokens) == summary["tokens_seen"], tokens
    if not row["streaming"]:  # one epoch: each source gave its draws per epoch exactly
        assert [s["rows_seen"] for s in tokens] == [s["rows_per_epoch"] for s in tokens], tokens
    if online and row.get("beta"):  # the reference is the model before step 1: no KL there
        # (~0: its forward runs without gradient, the policy's with; another model gives ~0.1)
        kl = [m["kl"] for m in steps]
        assert abs(kl[0]) < 1e-9 and any(v > 1e-6 for v in kl), kl
    if online and row.get("iterations", 1) > 1:  # the 2nd step of a rollout batch moved the
        # ratio π/π_old away from 1: the clip acted on some token, and the loss is not ~0
        assert len(steps) % row["iterations"] == 0, len(steps)  # μ steps per rollout batch
        assert any(m["clip_ratio/region_mean"] > 0 for m in steps[1::2]), steps
        assert all(m["clip_ratio/region_mean"] == 0 for m in steps[0::2]), steps
    if M.resumes(row):  # and from a checkpoint
        k = M.resume_step(row)
        resumed = _steps(runs / f"{name}.resumed")
        assert [m["step"] for m in resumed] == [m["step"] for m in steps[k:]]
        assert [m["loss"] for m in resumed] == [m["loss"] for m in steps[k:]]
        if online:  # bitwise, but for DeepSpeed's reported gradient norm: after a resume under
            # CPU optimizer offload it differs by ~2e-7 at the second step for SFT too, while
            # the weights (the next step's entropy, loss) are bitwise equal
            if not M.compares_to_one_process(row):
                _same_rollouts(steps[:2], rerun, 0.0)
            _same_rollouts(steps[k:], resumed, 0.0, keys=("entropy", "reward"))
