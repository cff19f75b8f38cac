"""The recipe's `hub:` section: where a run is pushed (the push itself is dpkit/hub.py), and
the rule for where the token may go.

Its own module so that the recipe schema does not import the upload code.

Recipes and run directories are untrusted (docs/security.md): the token goes only to the default
Hub, $HF_ENDPOINT or an endpoint the user gave on the command line, only over https (plain http
to this machine only, for tests), and is read only from HF_TOKEN, HUGGING_FACE_HUB_TOKEN, the
token `hf auth login` stored, or a variable the user named on the command line.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dpkit.errors import Problem, RecipeError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".txt", ".arrow")


def is_hub_id(name: str | None) -> bool:
    """`owner/name` that is not a local path: the Hub rejects anything else in `base_model`."""
    return bool(name) and bool(_HUB_ID.match(name)) and not Path(name).exists() \
        and not name.endswith(_DATA_SUFFIXES)


class HubSection(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True,
                              validate_assignment=True)

    repo_id: str
    """Hub model repository, `owner/name` (created if missing)."""
    private: bool = True
    """Create the repository private. Ignored when it already exists."""
    revision: str | None = None
    """Branch to push to (created from main if missing); default main."""
    push_at_end: bool = True
    """Push the trained model, card and training record when training ends."""
    push_checkpoints: bool = False
    """Also push the Hugging Face export of each saved checkpoint, as a commit `step N`."""
    adapter_only: bool = True
    """LoRA runs: push the adapter alone. False merges it into the base weights and pushes a
    full model. Ignored for full fine-tunes."""
    license: str | None = None
    """License id for the card metadata (`apache-2.0`, `llama3.1`, ...): respect the base
    model's license."""
    tags: list[str] = Field(default_factory=list)
    """Extra card tags, added to dpkit's own (dpkit, deepspeed, zero-stage-N)."""
    token_env: str = "HF_TOKEN"
    """Name of the environment variable holding a write token. The token itself never goes in
    a recipe. Only HF_TOKEN and HUGGING_FACE_HUB_TOKEN (or a token saved by `hf auth login`) are
    read unless the command line names another (`--token-env`, or `hub.token_env=` as an
    override)."""
    endpoint: str | None = None
    """Hub URL for a self-hosted Hub or mirror; default: $HF_ENDPOINT, else huggingface.co. The
    token is sent only where $HF_ENDPOINT or the command line (`--endpoint`, or `hub.endpoint=`
    as an override) agree, over https."""
    retries: int = Field(default=5, ge=0)
    """Retries after a transient error (5xx, 408, 429, connection lost) before giving up."""
    retry_wait_s: float = Field(default=2.0, gt=0)
    """Wait before the first retry; doubled after each, at most 60 s."""

    @field_validator("repo_id")
    @classmethod
    def _repo_id(cls, v: str) -> str:
        if not is_hub_id(v) or len(v.split("/")[1]) > 96:
            raise ValueError("must look like `owner/name` (letters, digits, `-`, `_`, `.`)")
        return v

    @field_validator("token_env")
    @classmethod
    def _token_env(cls, v: str) -> str:
        # The message never repeats the value: it may be a token pasted in by mistake.
        if v.startswith(("hf_", "api_")) or not v.replace("_", "a").isalnum() or v[0].isdigit():
            raise ValueError("must be the NAME of an environment variable (like HF_TOKEN), not a "
                             "token: put the token in that variable")
        return v


def hub_from_dict(raw: dict, where: str = "hub") -> HubSection:
    """Validate a hub section; problems are named `hub.<key>` and never echo values."""
    try:
        return HubSection.model_validate(raw)
    except ValidationError as e:
        raise RecipeError([Problem(".".join([where, *map(str, err["loc"])]),
                                   str(err["msg"]).removeprefix("Value error, "))
                           for err in e.errors()]) from None




# ------------------------------------------------------------------------- where the token goes
DEFAULT_ENDPOINT = "https://huggingface.co"
STANDARD_TOKEN_ENVS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
LOOPBACK = {"127.0.0.1", "::1", "localhost"}


@dataclass(frozen=True)
class UserChoice:
    """What the user said on the command line about the Hub. A recipe or a run directory's
    recipe.yaml can't add to it, so neither can send the token somewhere else."""
    endpoint: str | None = None
    token_env: str | None = None


def user_choice_from_overrides(overrides: list[str]) -> UserChoice:
    """`hub.endpoint=URL` / `hub.token_env=NAME` typed on the `dpkit train` command line."""
    found = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and key.strip() in ("hub.endpoint", "hub.token_env"):
            found[key.strip().split(".")[1]] = value.strip().strip("'\"")
    return UserChoice(**found)


def _same(a: str | None, b: str | None) -> bool:
    return bool(a) and bool(b) and a.strip().rstrip("/") == b.strip().rstrip("/")


def token_problems(hub: HubSection, user: UserChoice | None) -> list[Problem]:
    """Where the token would go and which variable it is read from, against the rule above."""
    user = user or UserChoice()
    out = []
    if hub.token_env not in STANDARD_TOKEN_ENVS and hub.token_env != user.token_env:
        out.append(Problem("hub.token_env", f"'{hub.token_env}' is neither HF_TOKEN nor "
                           "HUGGING_FACE_HUB_TOKEN and was not named on the command line; a "
                           "recipe can't choose which secret dpkit sends",
                           f"pass --token-env {hub.token_env} to dpkit push (or "
                           f"hub.token_env={hub.token_env} on the dpkit train command line)"))
    env_endpoint = os.environ.get("HF_ENDPOINT")
    target, where = hub.endpoint, "hub.endpoint"
    if target is None:
        target, where = env_endpoint or DEFAULT_ENDPOINT, "HF_ENDPOINT"
    elif not any(_same(target, t) for t in (DEFAULT_ENDPOINT, env_endpoint, user.endpoint)):
        return out + [Problem("hub.endpoint", f"'{target}' is named only by the recipe (or a run "
                              "directory's recipe.yaml); the Hub token goes only to "
                              "huggingface.co, $HF_ENDPOINT or an endpoint given on the command "
                              "line", f"if you trust it: dpkit push --endpoint {target} (or "
                              f"hub.endpoint={target} on the dpkit train command line)")]
    parts = urlsplit(target.strip())
    if not (parts.scheme == "https" or parts.scheme == "http" and parts.hostname in LOOPBACK):
        out.append(Problem(where, f"'{target}' is not an https URL: the token would travel in "
                           "clear text", "use https (plain http only to this machine)"))
    return out
