"""Model and tokenizer: from a hub id, a local directory, or an inline config for tiny models.

Hub configs shipped under `dpkit/resources/hub_configs/<org>/<name>/` (config.json, no weights) let
`validate` and `plan` work offline; training a hub model downloads its weights as usual.
"""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path

import torch

from dpkit import heads
from dpkit.errors import Problem, RecipeError
from dpkit.recipe import ModelSection
from dpkit.shipped import CHAT_TEMPLATES as SHIPPED_CHAT_TEMPLATES
from dpkit.shipped import HUB_CONFIGS, looks_local  # noqa: F401 (callers import it here)

SHIPPED_HUB_CONFIGS = HUB_CONFIGS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model.safetensors.index.json")


def weight_problems(directory: Path) -> list[Problem]:
    """A local model directory's weights, checked without loading them: present, every shard
    an index names on disk, and each safetensors file as long as its header says."""
    where = "model.name_or_path"
    if not any(next(directory.glob(p), None) for p in WEIGHT_PATTERNS):
        return [Problem(where, f"'{directory}' has a config.json but no weights (model.safetensors "
                        "or pytorch_model.bin)", "point it at a directory written by "
                        "save_pretrained, or use model.config for a randomly initialized model")]
    problems = []
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError, TypeError):
            return [Problem(where, f"'{index}' is not a safetensors index (no weight_map)",
                            "save the model again")]
        missing = [s for s in shards if not (directory / s).is_file()]
        if missing:
            problems.append(Problem(where, f"'{index}' names {len(missing)} shard(s) missing from "
                                    f"'{directory}', first '{missing[0]}'",
                                    "finish the download, or save the model again"))
    for path in sorted(directory.glob("*.safetensors")):
        problem = safetensors_problem(path)
        if problem:
            problems.append(Problem(where, problem, "download or save the model again"))
    return problems


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file's layout (8-byte header length, JSON header, then
    the tensors), read from its header alone; None when it is whole."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > size - 8:
            return f"'{path}' is truncated or not a safetensors file ({size} bytes)"
        try:
            header = json.loads(f.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
                      default=0)
        except (ValueError, KeyError, TypeError, AttributeError, IndexError):
            return f"'{path}' has an unreadable safetensors header"
    if 8 + n + end > size:
        return f"'{path}' is truncated: {size} bytes, its header describes {8 + n + end}"
    return None


def shipped_config_dir(hub_id: str) -> Path | None:
    candidate = SHIPPED_HUB_CONFIGS / hub_id
    return candidate if (candidate / "config.json").is_file() else None


def shipped_tokenizer_dir(hub_id: str) -> Path | None:
    """Tokenizer files shipped beside a hub config (tokenizer.json + tokenizer_config.json)."""
    candidate = SHIPPED_HUB_CONFIGS / hub_id
    return candidate if (candidate / "tokenizer_config.json").is_file() and \
        (candidate / "tokenizer.json").is_file() else None


# Keys real config.json files carry that the config classes no longer list as attributes.
LEGACY_CONFIG_KEYS = {"rope_theta", "rope_scaling", "torch_dtype", "auto_map", "use_mrope"}


POSITIVE_SIZES = {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "vocab_size", "max_position_embeddings", "head_dim",
                  "n_embd", "n_layer", "n_head", "n_positions"}


def inline_config(values: dict):
    """The transformers config for an inline `model.config`, every mistake named by its key.

    A key that is not an attribute of the model type's config class but is close to one is a
    typo (`hiden_size`): transformers would keep it as an unused extra attribute, silently. Keys
    close to nothing are kept: real configs carry extras the class does not list.
    """
    import dataclasses

    from huggingface_hub.errors import StrictDataclassError
    from transformers import CONFIG_MAPPING, AutoConfig

    cfg = dict(values)
    model_type = cfg.pop("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        close = difflib.get_close_matches(str(model_type), list(CONFIG_MAPPING.keys()), n=3)
        raise RecipeError.one("model.config.model_type", f"unknown model type '{model_type}'",
                              f"did you mean {' or '.join(close)}?" if close else
                              "use a transformers model type, e.g. llama, qwen2, mistral")
    cls = CONFIG_MAPPING[model_type]
    known = set(cls().to_dict()) | set(getattr(cls, "attribute_map", {}))
    if dataclasses.is_dataclass(cls):
        known |= {f.name for f in dataclasses.fields(cls)}
    problems = []
    for key in cfg:
        if key in known or key in LEGACY_CONFIG_KEYS:
            continue
        close = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.8)
        if close:
            problems.append(Problem(f"model.config.{key}", f"is not a `{model_type}` config key",
                                    f"did you mean `model.config.{close[0]}`?"))
    for key in POSITIVE_SIZES & set(cfg):  # transformers builds a 0 or -1 size, or divides by it
        if not isinstance(cfg[key], bool) and isinstance(cfg[key], int) and cfg[key] <= 0:
            problems.append(Problem(f"model.config.{key}", f"must be a positive integer (got "
                                    f"{cfg[key]})", "set a size of 1 or more"))
    if problems:
        raise RecipeError(problems)
    try:
        return AutoConfig.for_model(model_type, **cfg)
    except (StrictDataclassError, TypeError, ValueError, ArithmeticError) as e:
        text = str(e).strip()
        field = re.search(r"field '(\w+)'", text.splitlines()[0] if text else "")
        where = f"model.config.{field.group(1)}" if field else "model.config"
        detail = text.splitlines()[-1].strip() if text else type(e).__name__
        detail = re.sub(r"^\w+Error: ", "", detail)
        raise RecipeError.one(where, f"is not valid for `{model_type}`: {detail}",
                              "see the model's configuration class in transformers") from None


def load_model_config(section: ModelSection, offline_ok: bool = True):
    """The transformers config of the recipe's model, without loading weights.

    With `offline_ok`, a hub id whose config ships with dpkit is read from disk (no network).
    """
    from transformers import AutoConfig

    if section.config is not None:
        return inline_config(section.config)
    name = section.name_or_path
    assert name is not None
    if looks_local(name):
        path = Path(name).expanduser()
        if not (path / "config.json").is_file():
            gone = "" if path.is_dir() else " (it does not exist, and it is not a hub id)"
            raise RecipeError.one("model.name_or_path",
                                  f"no config.json in local directory '{name}'{gone}",
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
                              f"tokenizer directory '{name}' not found (and it is not a hub id)",
                              "check the path (relative paths are read from the current "
                              "directory), or use dpkit:tokenizers/tiny-bpe")
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
                packed_len: int | None = None, head: str = "causal_lm",
                pad_token_id: int | None = None, **load_kwargs):
    """The model with the method's `head` (dpkit/heads.py), in the training dtype.

    `packed_len` (data.max_seq_len when data.packing is on) lets packed sdpa run row by row
    (dpkit/attention.py) instead of under a dense block mask.

    An inline config is built with the plain constructor under `seed`, so every rank and a
    single-process reference start from identical weights; a score head the model did not have
    is drawn from `seed` alone, the same under every ZeRO stage (`heads.seed_new_head`). A
    pretrained model under ZeRO-3 is loaded partitioned (transformers' HfDeepSpeedConfig), so no
    rank holds the whole model.
    `load_kwargs` go to `from_pretrained` (QLoRA's 4-bit quantization, from dpkit.lora).
    """
    dtype = DTYPES[section.dtype]
    auto = heads.auto_class(head)
    common = dict(attn_implementation=section.attn_implementation)
    if section.config is not None:
        config = heads.configure(load_model_config(section), head, pad_token_id)
        torch.manual_seed(seed)
        model = auto.from_config(config, dtype=dtype, **common)
        heads.seed_new_head(model, head, seed)
    else:
        keep_alive = None
        if zero_stage == 3 and ds_config is not None:
            from transformers.integrations import HfDeepSpeedConfig

            keep_alive = HfDeepSpeedConfig(ds_config)  # noqa: F841 (zero.Init while it lives)
        saved_head = None
        if head != "causal_lm":  # the head's settings, on top of the checkpoint's config
            config = load_model_config(section)
            saved_head = heads.of_config(config)
            load_kwargs = {"config": heads.configure(config, head, pad_token_id), **load_kwargs}
        model = auto.from_pretrained(
            section.name_or_path, revision=section.revision, dtype=dtype,
            trust_remote_code=section.trust_remote_code, **common, **load_kwargs)
        if saved_head != head:  # a new head (a causal LM loaded for scores): seeded, not random
            heads.seed_new_head(model, head, seed)
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
