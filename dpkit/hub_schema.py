"""The recipe's `hub:` section: where a run is pushed (the push itself is dpkit/hub.py).

Its own module so that the recipe schema does not import the upload code.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dpkit import model_card
from dpkit.errors import Problem, RecipeError


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
    a recipe. With the default, a token saved by `hf auth login` also works."""
    endpoint: str | None = None
    """Hub URL for a self-hosted Hub or mirror; default: $HF_ENDPOINT, else huggingface.co."""
    retries: int = Field(default=5, ge=0)
    """Retries after a transient error (5xx, 408, 429, connection lost) before giving up."""
    retry_wait_s: float = Field(default=2.0, gt=0)
    """Wait before the first retry; doubled after each, at most 60 s."""

    @field_validator("repo_id")
    @classmethod
    def _repo_id(cls, v: str) -> str:
        if not model_card.is_hub_id(v) or len(v.split("/")[1]) > 96:
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


