"""Seeded fuzz: every shipped recipe, mutated the ways people break recipes — a required key
dropped, a key misspelled (at every level, inline model configs included), a value of the wrong
type, a number out of its range, a malformed override — is refused by `dpkit validate` with exit
code 2, a message of at most three lines naming the key, and no traceback. In-process and offline
(hub models resolve through the configs shipped in dpkit/resources/hub_configs)."""

from __future__ import annotations

import copy
import difflib
import io
import random
import re
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import yaml
from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel

from dpkit.cli import main
from dpkit.recipe import Recipe

ROOT = Path(__file__).resolve().parents[3]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))
SEED = 20261201
PER_KIND = 5  # mutants of each kind per recipe (drawn with the seed)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def world(path: Path) -> list[str]:
    """The ranks the recipe's header plans for (quickstart: the 2 CPU ranks)."""
    m = re.search(r"Hardware: +(\d+) nodes? × (\d+) GPUs", path.read_text())
    nodes, gpus = (int(m.group(1)), int(m.group(2))) if m else (1, 2)
    return ["--nproc-per-node", str(gpus), "--nodes", str(nodes)]


# ----------------------------------------------------------------------------- the schema
def schema_at(path: tuple) -> type[BaseModel] | None:
    """The recipe section class a key path points into (None for free-form dicts)."""
    model: type[BaseModel] | None = Recipe
    for part in path:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        types = [field.annotation, *getattr(field.annotation, "__args__", ())]
        inner = [a for t in types for a in (t, *getattr(t, "__args__", ()))]
        model = next((t for t in inner if isinstance(t, type) and issubclass(t, BaseModel)), None)
    return model


def config_keys(raw: dict) -> set[str]:
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[raw["model"]["config"]["model_type"]]
    return set(cls().to_dict())


def leaves(node, path=()):
    """(path, value) of every key in the recipe, depth first."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield (*path, k), v
            yield from leaves(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from leaves(v, (*path, i))


def get(raw, path):
    for p in path:
        raw = raw[p]
    return raw


def dotted(path) -> str:
    return ".".join(str(p) for p in path)


# ----------------------------------------------------------------------------- mutations
def misspell(word: str, rng: random.Random) -> str:
    i = rng.randrange(len(word))
    op = rng.choice(["drop", "double", "swap", "replace"]) if len(word) > 2 else "double"
    if op == "drop":
        return word[:i] + word[i + 1:]
    if op == "double":
        return word[:i] + word[i] + word[i:]
    if op == "swap" and i < len(word) - 1 and word[i] != word[i + 1]:
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    return word[:i] + ("x" if word[i] != "x" else "z") + word[i + 1:]


def drop_mutants(raw: dict):
    required = [("model",), ("data",), ("train",), ("output",), ("data", "sources", 0, "path"),
                ("train", "global_batch_size"), ("output", "dir")]
    required.append(("model", "config") if "config" in raw["model"] else ("model", "name_or_path"))
    if "config" in raw["model"]:
        required.append(("model", "config", "model_type"))
    if "hub" in raw:
        required.append(("hub", "repo_id"))
    for path in required:
        r = copy.deepcopy(raw)
        del get(r, path[:-1])[path[-1]]
        yield f"drop {dotted(path)}", r, [], str(path[-1])


def misspell_mutants(raw: dict, rng: random.Random):
    for path, _ in leaves(raw):
        key = path[-1]
        if isinstance(key, int):
            continue
        parent = get(raw, path[:-1])
        inside_config = path[:2] == ("model", "config")
        if inside_config:
            valid = config_keys(raw)
        elif path[-2:-1] == ("columns",):
            valid = {"instruction", "input", "output", "messages", "text"}
        else:
            section = schema_at(path[:-1])
            valid = set(section.model_fields) if section else set()
        for _ in range(10):  # a misspelling that is not itself a valid key
            typo = misspell(key, rng)
            if typo not in valid and typo not in parent and (not inside_config or difflib.
                                                             get_close_matches(typo, [key], 1, 0.8)):
                break
        else:
            continue
        r = copy.deepcopy(raw)
        node = get(r, path[:-1])
        node[typo] = node.pop(key)
        yield f"misspell {dotted(path)} -> {typo}", r, [], typo


def wrong_type(value):
    if isinstance(value, bool):
        return "maybe"
    if isinstance(value, (int, float)):
        return "lots"
    if isinstance(value, str):
        return [1, 2]
    if isinstance(value, list):
        return 7
    if isinstance(value, dict):
        return "x"
    return None


def type_mutants(raw: dict):
    for path, value in leaves(raw):
        bad = wrong_type(value)
        if bad is None or isinstance(path[-1], int):
            continue
        r = copy.deepcopy(raw)
        get(r, path[:-1])[path[-1]] = bad
        yield f"wrong type {dotted(path)}={bad!r}", r, [], str(path[-1])


def out_of_range(path, value):
    """A value its field's constraints refuse (None when the field has none)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if path[:2] == ("model", "config"):
        from dpkit.model import POSITIVE_SIZES

        return 0 if path[-1] in POSITIVE_SIZES else None
    section = schema_at(path[:-1])
    field = section.model_fields.get(path[-1]) if section else None
    for c in field.metadata if field else []:
        if isinstance(c, Gt):
            return c.gt
        if isinstance(c, Ge):
            return c.ge - 1
        if isinstance(c, Lt):
            return c.lt
        if isinstance(c, Le):
            return c.le + 1
    return None


def range_mutants(raw: dict):
    for path, value in leaves(raw):
        bad = out_of_range(path, value)
        if bad is None:
            continue
        r = copy.deepcopy(raw)
        get(r, path[:-1])[path[-1]] = bad
        yield f"out of range {dotted(path)}={bad}", r, [], str(path[-1])


OVERRIDES = [("data.sources.9.path=x", "data.sources.9"), ("data.sources.x.path=x", "data.sources.x"),
             ("train.lr=[1e-4", "train.lr"), ("train.lr", "train.lr"),
             ("train.global_batch_size.x=1", "train.global_batch_size"),
             ("trian.lr=1e-4", "trian"), ("=1", "=1"), ("data.sources.0.columns={a: b", "columns"),
             ("train.adam_betas=[0.9, 0.99", "train.adam_betas"), ("output.dir=\"runs/x", "output.dir"),
             ("train.adam_eps=0", "train.adam_eps"), ("train.adam_betas=[0.9, 1]", "adam_betas"),
             ("data.sources.-4.path=x", "data.sources.-4"), ("train..lr=1", "train..lr")]


def override_mutants(raw: dict):
    for override, needle in OVERRIDES:
        yield f"override {override}", raw, [override], needle


def mutants(path: Path):
    rng = random.Random(f"{SEED}:{path.relative_to(ROOT)}")
    raw = yaml.safe_load(path.read_text())
    out = []
    for kind in (drop_mutants(raw), misspell_mutants(raw, rng), type_mutants(raw),
                 range_mutants(raw), override_mutants(raw)):
        found = list(kind)
        # one key from each nesting level (train.lr, data.sources.0.path, model.config.x, ...)
        by_level: dict[int, list] = {}
        for m in found:
            key = m[0].split("=")[0].split(" -> ")[0].split(" ")[-1]
            by_level.setdefault(key.count("."), []).append(m)
        picked = [rng.choice(group) for _, group in sorted(by_level.items())]
        rest = [m for m in found if m not in picked]
        out += picked + rng.sample(rest, max(0, min(PER_KIND - len(picked), len(rest))))
    return out


# ----------------------------------------------------------------------------- the test
def validate(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with redirect_stdout(out), redirect_stderr(out):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
        except Exception:  # noqa: BLE001 (the failure we look for)
            import traceback

            traceback.print_exc(file=out)
            code = "raised"
    return code, out.getvalue()


def test_recipes_found():
    assert len(RECIPES) >= 25


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_every_mutant_is_refused_in_one_line(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # recipes name relative run directories: none may appear
    base = tmp_path / "original.yaml"
    base.write_text(path.read_text())
    code, output = validate(["validate", str(base), *world(path)])
    assert code == 0, f"the unmutated recipe must validate:\n{output}"
    failures = []
    found = mutants(path)
    assert len(found) >= 15
    for i, (name, raw, overrides, needle) in enumerate(found):
        recipe = tmp_path / f"mutant{i}.yaml"
        recipe.write_text(yaml.safe_dump(raw, sort_keys=False))
        code, output = validate(["validate", str(recipe), *world(path), *overrides])
        lines = [line for line in output.splitlines() if line.strip()]
        if code != 2 or "Traceback" in output or not 1 <= len(lines) <= 3 or needle not in output:
            failures.append(f"{name}: exit {code}, {len(lines)} lines, needle {needle!r}\n"
                            f"{output[-1500:]}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["original.yaml", *(f"mutant{i}.yaml" for i in range(len(found)))]), "something was written"
    assert not failures, f"{len(failures)} of {len(found)} mutants:\n" + "\n".join(failures)
