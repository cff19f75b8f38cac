"""Files shipped inside the package (DeepSpeed templates, hub configs, the tiny tokenizer, chat
templates, bundled data), found with importlib.resources so a wheel works from any directory.

Recipes name them with the `dpkit:` prefix — `dpkit:tokenizers/tiny-bpe`,
`dpkit:data/self_instruct_seed.alpaca.jsonl` — which `resolve` turns into a real path.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

PREFIX = "dpkit:"


def root() -> Path:
    """The package's resources folder (a real directory: setuptools installs package data as
    plain files, so no temporary extraction is needed)."""
    return Path(str(files("dpkit") / "resources"))


DS_CONFIGS = root() / "ds_configs"
ACCELERATE_CONFIGS = DS_CONFIGS / "accelerate"
HUB_CONFIGS = root() / "hub_configs"
CHAT_TEMPLATES = root() / "chat_templates"
TOKENIZERS = root() / "tokenizers"
DATA = root() / "data"


def is_shipped(value: str | None) -> bool:
    return isinstance(value, str) and value.startswith(PREFIX)


def resolve(value: str) -> str:
    """`dpkit:<relative path>` → the shipped file's absolute path; anything else unchanged."""
    if not is_shipped(value):
        return value
    rel = value[len(PREFIX):].lstrip("/")
    path = (root() / rel).resolve()
    if root().resolve() not in path.parents and path != root().resolve():
        return value  # `dpkit:../../x` names nothing shipped; left for the caller to refuse
    return str(path)


def available() -> list[str]:
    """Every shipped name a recipe can use (for error messages)."""
    out = [f"{PREFIX}tokenizers/{p.name}" for p in sorted(TOKENIZERS.iterdir()) if p.is_dir()]
    out += [f"{PREFIX}data/{p.name}" for p in sorted(DATA.iterdir()) if p.suffix == ".jsonl"]
    return out


def looks_local(name: str) -> bool:
    """A local path if it exists or is written like one (a hub id is `org/name` or `name`, of
    letters, digits and `-_.`, and `org` is not a folder here); otherwise a hub id."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if Path(name).expanduser().exists() or name.startswith(("/", "./", "../", "~")):
        return True
    if "/" in name and Path(name.split("/")[0]).is_dir():
        return True  # `data/trian.jsonl`, `tokenizers/tiny-bpee` beside an existing folder
    try:
        validate_repo_id(name)
    except HFValidationError:
        return True  # `data/tok/`, `my tokenizer`: a mistyped path, never a hub id
    return False
