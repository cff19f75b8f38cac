"""Model and tokenizer: from a hub id, a local directory, or an inline config for tiny models.

Hub configs shipped under `dpkit/resources/hub_configs/<org>/<name>/` (config.json, no weights) let
`validate` and `plan` work offline; training a hub model downloads its weights as usual.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dpkit.errors import RecipeError
from dpkit.recipe import ModelSection
from dpkit.shipped import CHAT_TEMPLATES as SHIPPED_CHAT_TEMPLATES
from dpkit.shipped import HUB_CONFIGS

SHIPPED_HUB_CONFIGS = HUB_CONFIGS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def looks_local(name: str) -> bool:
    """A local path if it exists or is written like one; otherwise a hub id."""
    return Path(name).expanduser().exists() or name.startswith(("/", "./", "../", "~"))


def shipped_config_dir(hub_id: str) -> Path | None:
    candidate = SHIPPED_HUB_CONFIGS / hub_id
    return candidate if (candidate / "config.json").is_file() else None


def shipped_tokenizer_dir(hub_id: str) -> Path | None:
    """Tokenizer files shipped beside a hub config (tokenizer.json + tokenizer_config.json)."""
    candidate = SHIPPED_HUB_CONFIGS / hub_id
    return candidate if (candidate / "tokenizer_config.json").is_file() and \
        (candidate / "tokenizer.json").is_file() else None


def load_model_config(section: ModelSection, offline_ok: bool = True):
    """The transformers config of the recipe's model, without loading weights.

    With `offline_ok`, a hub id whose config ships with dpkit is read from disk (no network).
    """
    from transformers import AutoConfig

    if section.config is not None:
        cfg = dict(section.config)
        return AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    name = section.name_or_path
    assert name is not None
    if looks_local(name):
        path = Path(name).expanduser()
        if not (path / "config.json").is_file():
            raise RecipeError.one("model.name_or_path", f"no config.json in local directory '{name}'",
                                  "point it at a saved Hugging Face model directory")
        return AutoConfig.from_pretrained(path, trust_remote_code=section.trust_remote_code)
    shipped = shipped_config_dir(name) if offline_ok else None
    if shipped is not None:
        return AutoConfig.from_pretrained(shipped)
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise RecipeError.one("model.name_or_path", f"'{name}' has no config.json shipped under "
                              f"{SHIPPED_HUB_CONFIGS} and the hub is offline (HF_HUB_OFFLINE=1)",
                              "add dpkit/resources/hub_configs/<org>/<name>/config.json, or go online")
    return AutoConfig.from_pretrained(name, revision=section.revision,
                                      trust_remote_code=section.trust_remote_code)


def load_tokenizer(section: ModelSection):
    """The tokenizer, with a pad token guaranteed.

    A tokenizer without a pad token gets its eos token as pad. That is safe here because padded
    positions are found from the attention mask, never from the token id, so a real eos that the
    model should learn to emit keeps its label.
    """
    from transformers import AutoTokenizer

    name = section.tokenizer_path
    if looks_local(name) and not Path(name).expanduser().is_dir():
        raise RecipeError.one("model.tokenizer" if section.tokenizer else "model.name_or_path",
                              f"tokenizer directory '{name}' not found", "check the path")
    shipped = None if looks_local(name) else shipped_tokenizer_dir(name)
    from huggingface_hub import constants

    if shipped is not None and constants.HF_HUB_OFFLINE:
        name = str(shipped)  # offline validation of a hub recipe: the copy that ships with it
    tok = AutoTokenizer.from_pretrained(name, revision=section.revision,
                                        trust_remote_code=section.trust_remote_code)
    if section.chat_template is not None:
        tok.chat_template = read_chat_template(section.chat_template)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise RecipeError.one("model.tokenizer", f"tokenizer '{name}' has neither a pad nor an "
                                  "eos token", "use a tokenizer that defines eos_token")
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


CHAT_TEMPLATES = SHIPPED_CHAT_TEMPLATES


def read_chat_template(value: str) -> str:
    shipped = CHAT_TEMPLATES / f"{value}.jinja"
    if shipped.is_file():
        return shipped.read_text()
    path = Path(value).expanduser()
    if path.suffix == ".jinja" and path.is_file():
        return path.read_text()
    names = sorted(p.stem for p in CHAT_TEMPLATES.glob("*.jinja"))
    raise RecipeError.one("model.chat_template", f"'{value}' is neither a shipped template nor a "
                          ".jinja file", f"use one of {names} or a path to a .jinja file")


def build_model(section: ModelSection, seed: int, zero_stage: int, ds_config: dict | None = None,
                packed_len: int | None = None, **load_kwargs):
    """The causal LM, in the training dtype.

    `packed_len` (data.max_seq_len when data.packing is on) lets packed sdpa run row by row
    (dpkit/attention.py) instead of under a dense block mask.

    An inline config is built with the plain constructor under `seed`, so every rank and a
    single-process reference start from identical weights. A pretrained model under ZeRO-3 is
    loaded partitioned (transformers' HfDeepSpeedConfig), so no rank holds the whole model.
    `load_kwargs` go to `from_pretrained` (QLoRA's 4-bit quantization, from dpkit.lora).
    """
    from transformers import AutoModelForCausalLM

    dtype = DTYPES[section.dtype]
    common = dict(attn_implementation=section.attn_implementation)
    if section.config is not None:
        config = load_model_config(section)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **common)
    else:
        keep_alive = None
        if zero_stage == 3 and ds_config is not None:
            from transformers.integrations import HfDeepSpeedConfig

            keep_alive = HfDeepSpeedConfig(ds_config)  # noqa: F841 (zero.Init while it lives)
        model = AutoModelForCausalLM.from_pretrained(
            section.name_or_path, revision=section.revision, dtype=dtype,
            trust_remote_code=section.trust_remote_code, **common, **load_kwargs)
        del keep_alive
    if packed_len is not None:
        # imported here, at build time: the benchmarks swap implementation_for for their
        # dense-mask baseline (scripts/bench_throughput.py, use_dense_mask)
        from dpkit.attention import implementation_for

        chosen = implementation_for(section.attn_implementation, True, model.config, packed_len)
        if chosen != section.attn_implementation:
            model.set_attn_implementation(chosen)  # not saved: config.json keeps the recipe's
    if section.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model
