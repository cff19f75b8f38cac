"""LoRA and QLoRA under every ZeRO stage, and adapters that are checked before they are trusted.

The adapter is built the same way on every rank (the LoRA init is seeded with `train.seed` right
before `get_peft_model`), so 1 process and N ranks start identical. The wrapped model goes into
`deepspeed.initialize` as it is: the optimizer only holds the trainable (adapter) parameters, and
DeepSpeed checkpoints keep the usual engine state, so resuming works as for full fine-tuning.

On save the trainable parameters are gathered from the ZeRO-3 partitions (not the frozen base),
written as `adapter_model.safetensors` + `adapter_config.json` to `<run>/model.partial/` and
checked against shapes computed from the *base config* and `peft.r` — never from the live
parameters — and for a `lora_B` that training left all zero. Only a passing adapter is renamed to
`<run>/model/`; otherwise every rank fails with the list of what is wrong. A model built from an
inline config has its initial weights written to `<run>/base/`, so the adapter has a base to load.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dpkit import distributed, heads
from dpkit.errors import Problem, RecipeError
from dpkit.model import DTYPES, build_model, load_model_config
from dpkit.recipe import PeftSection, Recipe, load_recipe
from dpkit.run_files import BASE, MERGED, MODEL, publish_dir, stage_dir, staged_path

ALL_LINEAR = "all-linear"
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"
PREFIX = "base_model.model."  # what PEFT puts in front of the base model's module paths


class AdapterCheckError(RuntimeError):
    """A saved adapter is not what training produced (empty partitions, wrong shapes, untrained)."""

    def __init__(self, problems: list[str], where: Path | None = None):
        self.problems = problems
        head = f"LoRA adapter check failed{f' ({where})' if where else ''}:"
        shown = [f"  - {p}" for p in problems[:12]]
        more = [f"  ... and {len(problems) - 12} more"] if len(problems) > 12 else []
        super().__init__("\n".join([head, *shown, *more]))


# ----------------------------------------------------------------------------- which modules
def meta_model(model_config, trust_remote_code: bool = False, head: str = "causal_lm"):
    """The base architecture with no memory behind it: module names and sizes from the config."""
    with torch.device("meta"):
        return heads.auto_class(head).from_config(model_config,
                                                  trust_remote_code=trust_remote_code)


def _adaptable_kinds() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D

    return torch.nn.Linear, Conv1D  # bitsandbytes' Linear4bit is a torch.nn.Linear too


def linear_module_names(model) -> list[str]:
    """`all-linear`: the short names of every Linear/Conv1D module except the output head — the
    LM head, or a sequence classifier's score layer, which PEFT trains in full — (and except
    layers inside existing adapters). A short name shared with the head is given as the full
    paths instead, so the head is never picked up by accident."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = head if head is not None else getattr(model, heads.SCORE, None)
    inside_adapters = {f"{p}.{s}" for p, m in model.named_modules() if isinstance(m, BaseTunerLayer)
                       for s, _ in m.named_modules() if s}
    picked, excluded = [], set()
    for name, module in model.named_modules():
        if module is head or name in inside_adapters:
            excluded.add(name.rsplit(".", 1)[-1])
        elif isinstance(module, _adaptable_kinds()) or (
                isinstance(module, BaseTunerLayer) and "Linear" in type(module).__name__):
            picked.append(name)
    short = {n.rsplit(".", 1)[-1] for n in picked}
    return sorted(short - excluded) + sorted(n for n in picked if n.rsplit(".", 1)[-1] in excluded)


def matches(module_name: str, target: str) -> bool:
    """PEFT's rule for a list of target names: the whole path, or its last dotted parts."""
    return module_name == target or module_name.endswith("." + target)


def resolve_targets(model, section: PeftSection) -> list[str]:
    if section.target_modules == ALL_LINEAR:
        return linear_module_names(model)
    return list(section.target_modules)


def matches_parameter(module_name: str, param_name: str, target: str) -> bool:
    """PEFT's rule for `target_parameters`: `module.param`, whole or its last dotted parts."""
    return matches(f"{module_name}.{param_name}", target)


def targeted_parameters(model, section: PeftSection) -> list[tuple[str, str, tuple[int, ...]]]:
    """(module path, parameter name, full shape) of every parameter `peft.target_parameters`
    names, in the order PEFT wraps them (module by module, parameters in registration order)."""
    out = []
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if any(matches_parameter(name, pname, t) for t in section.target_parameters):
                out.append((name, pname, tuple(getattr(p, "ds_shape", p.shape))))
    return out


def target_problems(model, section: PeftSection) -> list[Problem]:
    """Every listed target and module to save must name a module this architecture has."""
    from difflib import get_close_matches

    names = [n for n, _ in model.named_modules() if n]
    kinds = (*_adaptable_kinds(), torch.nn.Embedding)
    adaptable = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, kinds)}
    problems = []
    for key, wanted in (("peft.target_modules", resolve_targets(model, section)),
                        ("peft.modules_to_save", section.modules_to_save)):
        for target in wanted:
            hits = [n for n in names if matches(n, target)]
            if not hits:
                close = get_close_matches(target, sorted(adaptable), n=1)
                fix = (f"did you mean `{close[0]}`?" if close else
                       f"modules it has: {', '.join(sorted(adaptable))}")
                problems.append(Problem(key, f"`{target}` matches no module of this "
                                        f"{model.config.model_type} model", fix))
            elif key == "peft.target_modules":
                bad = sorted({type(m).__name__ for n, m in model.named_modules()
                              if n in hits and not isinstance(m, kinds)})
                if bad:
                    problems.append(Problem(key, f"`{target}` matches {', '.join(bad)} modules, "
                                            "which LoRA can't adapt", "name Linear layers"))
    params = [(m, n, len(p.shape)) for m, mod in model.named_modules()
              for n, p in mod.named_parameters(recurse=False)]
    for target in section.target_parameters:
        hits = [(m, n, dims) for m, n, dims in params if matches_parameter(m, n, target)]
        if not hits:
            from dpkit.moe import is_expert_parameter

            experts = sorted({f"{m.rsplit('.', 1)[-1]}.{n}" for m, n, dims in params
                              if dims == 3 and is_expert_parameter(f"{m}.{n}")})
            problems.append(Problem("peft.target_parameters", f"`{target}` matches no parameter of "
                                    f"this {model.config.model_type} model",
                                    f"expert parameters it has: {', '.join(experts)}" if experts
                                    else "it has no 3-D expert parameters: use target_modules"))
        elif any(dims not in (2, 3) for *_, dims in hits):
            problems.append(Problem("peft.target_parameters", f"`{target}` matches a parameter "
                                    "that is neither 2-D nor 3-D", "name expert weights"))
    return problems


# ---------------------------------------------------------------------------------- building
def quantization_kwargs(recipe: Recipe, local_rank: int) -> dict:
    """from_pretrained arguments that load the base in 4-bit NF4 (QLoRA)."""
    from transformers import BitsAndBytesConfig

    dtype = DTYPES[recipe.model.dtype]
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype,
                               # ZeRO-3 partitions all parameters alike: store the 4-bit data in
                               # the training dtype so they can be flattened with the rest.
                               bnb_4bit_quant_storage=dtype if recipe.zero.stage == 3
                               else torch.uint8)
    # Under ZeRO-3 transformers refuses a device_map and bitsandbytes quantizes on the current
    # device; otherwise place the whole 4-bit model on this rank's GPU.
    return {"quantization_config": quant,
            **({"device_map": {"": local_rank}} if recipe.zero.stage != 3 else {})}


def save_base(model, tokenizer, base_dir: Path) -> None:
    """The initial weights of an inline-config model, the base its adapter is loaded onto."""
    tmp = stage_dir(base_dir)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    publish_dir(tmp, base_dir)


# PEFT's task type per head: with SEQ_CLS it trains and saves the new score head in full.
TASK_TYPES = {"causal_lm": "CAUSAL_LM", "sequence_classification": "SEQ_CLS"}


def build_peft_model(recipe: Recipe, tokenizer, ds_config: dict | None, run_dir: Path, env):
    """Load the base (4-bit for QLoRA), freeze it and add the adapters, identically on each rank."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    section, msec, seed = recipe.peft, recipe.model, recipe.train.seed
    packed_len = recipe.data.max_seq_len if recipe.data.packing else None
    qlora = section.method == "qlora"
    quant = quantization_kwargs(recipe, env.local_rank) if qlora else {}
    head = heads.of_recipe(recipe)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    quant.update(head=head, pad_token_id=pad_id)
    if msec.config is not None:
        model = build_model(msec, seed, recipe.zero.stage, ds_config, packed_len, head=head,
                            pad_token_id=pad_id)
        base_dir = run_dir / BASE
        if env.is_main and (recipe.output.save_model or qlora):
            save_base(model, tokenizer, base_dir)
        distributed.wait_for_main("save the base model", recipe.train.single_rank_work_timeout_s)
        if qlora:  # bitsandbytes quantizes while loading: reload the saved base in 4-bit
            del model
            saved = msec.model_copy(update={"config": None, "name_or_path": str(base_dir)})
            model = build_model(saved, seed, recipe.zero.stage, ds_config, packed_len, **quant)
    else:
        model = build_model(msec, seed, recipe.zero.stage, ds_config, packed_len, **quant)
    if qlora:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=msec.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    config = LoraConfig(r=section.r, lora_alpha=section.alpha, lora_dropout=section.dropout,
                        target_modules=resolve_targets(model, section), bias="none",
                        target_parameters=list(section.target_parameters) or None,
                        modules_to_save=list(section.modules_to_save) or None,
                        task_type=TASK_TYPES[head])  # SEQ_CLS: the score head is trained too
    torch.manual_seed(seed)  # the LoRA A init draws from the global RNG: same on every rank
    model = get_peft_model(model, config)
    if msec.gradient_checkpointing:
        model.enable_input_require_grads()
    return model


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total), counting ZeRO-3 partitioned and 4-bit packed parameters in full."""
    trainable = total = 0
    for p in model.parameters():
        n = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
        if type(p).__name__ == "Params4bit":
            n *= 2 * getattr(getattr(p, "quant_storage", None), "itemsize", 1)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def describe(model, section: PeftSection) -> str:
    config = model.peft_config["default"]
    targets = sorted(config.target_modules) + sorted(config.target_parameters or [])
    from dpkit.moe import experts_of

    frozen = ("; the experts stay frozen (adapt them with peft.target_parameters)"
              if experts_of(model.config) is not None and not section.target_parameters
              and not any("expert" in t for t in targets) else "")
    return (f"{section.method}: r={section.r}, alpha={section.alpha:g}, dropout={section.dropout:g}"
            f" on {', '.join(targets)}{frozen}"
            + (f"; trained in full: {', '.join(section.modules_to_save)}"
               if section.modules_to_save else "") + "; optimizer state for these only")


# ------------------------------------------------------------------------------------ saving
def gather_adapter_state(model) -> dict[str, torch.Tensor]:
    """The trainable parameters, whole, on every rank (collective under ZeRO-3: call on all)."""
    import deepspeed

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    partitioned = [p for _, p in named if hasattr(p, "ds_id")]
    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None,
                                           enabled=bool(partitioned)):
        return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in named}


def write_adapter(model, state: dict[str, torch.Tensor], out_dir: Path, base: str | None) -> None:
    """adapter_model.safetensors + adapter_config.json in PEFT's format (loads with PeftModel)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    config = model.peft_config["default"]
    config.base_model_name_or_path = base
    tensors = get_peft_model_state_dict(model, state_dict=state, save_embedding_layers=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, out_dir / ADAPTER_WEIGHTS,
              metadata={"format": "pt"})
    config.save_pretrained(out_dir)


def expected_adapter_shapes(model_config, section: PeftSection, trust_remote_code: bool = False,
                            head: str = "causal_lm") -> dict[str, tuple[int, ...]]:
    """Every tensor a complete adapter holds, with its full shape, from the base config and r;
    for a sequence-classification head also its score layer, which PEFT trains in full."""
    import copy

    model_config = heads.configure(copy.deepcopy(model_config), head)
    model = meta_model(model_config, trust_remote_code, head)
    targets, r = resolve_targets(model, section), section.r
    conv1d = _adaptable_kinds()[1]
    shapes: dict[str, tuple[int, ...]] = {}
    for name, module in model.named_modules():
        if any(matches(name, t) for t in targets):
            if isinstance(module, torch.nn.Embedding):
                shapes[f"{PREFIX}{name}.lora_embedding_A"] = (r, module.num_embeddings)
                shapes[f"{PREFIX}{name}.lora_embedding_B"] = (module.embedding_dim, r)
                continue
            if isinstance(module, conv1d):
                fan_in, fan_out = module.weight.shape
            elif not isinstance(module, torch.nn.Linear):
                continue  # not an adaptable layer: preflight reports the target
            else:
                fan_in, fan_out = module.in_features, module.out_features
            shapes[f"{PREFIX}{name}.lora_A.weight"] = (r, fan_in)
            shapes[f"{PREFIX}{name}.lora_B.weight"] = (fan_out, r)
        elif any(matches(name, m) for m in section.modules_to_save) or (
                head == "sequence_classification" and name == heads.SCORE):
            for pname, p in module.named_parameters():
                shapes[f"{PREFIX}{name}.{pname}"] = tuple(p.shape)
    # A targeted parameter (PEFT's ParamWrapper): one adapter of rank r per expert, stacked —
    # for a 3-D [experts, out, in] weight A is [r·experts, in] and B [out, r·experts]; a 2-D
    # [out, in] one is a single expert. Several on one module nest: the first wrapped sits
    # deepest, one `base_layer.` per parameter wrapped after it.
    wrapped = targeted_parameters(model, section)
    modules = dict(model.named_modules())
    for i, (name, _, shape) in enumerate(wrapped):
        later = sum(1 for other, *_ in wrapped[i + 1:] if other == name)
        experts, out, fan_in = shape if len(shape) == 3 else (1, *shape)
        if len(shape) == 3 and getattr(modules[name], "is_transposed", False):
            out, fan_in = fan_in, out  # gpt-oss stores [experts, in, out]
        key = f"{PREFIX}{name}{'.base_layer' * later}"
        shapes[f"{key}.lora_A.weight"] = (r * experts, fan_in)
        shapes[f"{key}.lora_B.weight"] = (out, r * experts)
    return shapes


def verify_adapter(adapter_dir: Path, model_config, section: PeftSection, trained: bool = True,
                   trust_remote_code: bool = False, head: str = "causal_lm") -> list[str]:
    """What is wrong with a saved adapter (empty list: nothing). See the module docstring."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    expected = expected_adapter_shapes(model_config, section, trust_remote_code, head)
    if not all((adapter_dir / f).is_file() for f in (ADAPTER_WEIGHTS, ADAPTER_CONFIG)):
        return [f"{adapter_dir} lacks {ADAPTER_WEIGHTS} or {ADAPTER_CONFIG}"]
    saved = load_file(adapter_dir / ADAPTER_WEIGHTS)
    problems = [f"{k}: missing (expected shape {tuple(v)})" for k, v in expected.items()
                if k not in saved]
    problems += [f"{k}: not part of this adapter" for k in saved if k not in expected]
    for key, tensor in saved.items():
        want = expected.get(key)
        if want is not None and tuple(tensor.shape) != want:
            hint = " — a ZeRO-3 partition saved without gathering" if tensor.numel() < \
                torch.Size(want).numel() else ""
            problems.append(f"{key}: shape {tuple(tensor.shape)}, expected {want}{hint}")
        elif not torch.isfinite(tensor.float()).all():
            problems.append(f"{key}: holds NaN or infinite values")
        elif trained and ("lora_B" in key or "lora_embedding_B" in key) and not tensor.any():
            problems.append(f"{key}: all zeros after training (the adapter learned nothing "
                            "or its gathered values were lost)")
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    if config.get("r") != section.r:
        problems.append(f"{ADAPTER_CONFIG}: r = {config.get('r')}, the recipe says {section.r}")
    return problems


def adapter_base(recipe: Recipe, run_dir: Path) -> str:
    """What the adapter is loaded onto: the hub id / directory, or the run's saved base."""
    if recipe.model.config is not None:
        return str((run_dir / BASE).resolve())
    name = recipe.model.name_or_path
    return str(Path(name).expanduser().resolve()) if Path(name).expanduser().is_dir() else name


def save_adapter(engine, tokenizer, run_dir: Path, env, recipe: Recipe, trained: bool = True
                 ) -> Path:
    """Gather, write, verify, rename; then merge if the recipe asks. Call on every rank."""
    model = engine.module if hasattr(engine, "module") else engine
    state = gather_adapter_state(model)
    out = run_dir / MODEL
    tmp = staged_path(out)  # kept when the check fails
    problems: list[str] = []
    if env.is_main:
        tmp = stage_dir(out)
        write_adapter(model, state, tmp, adapter_base(recipe, run_dir))
        tokenizer.save_pretrained(tmp)
        problems = verify_adapter(tmp, load_model_config(recipe.model), recipe.peft, trained,
                                  recipe.model.trust_remote_code, heads.of_recipe(recipe))
        if not problems:
            publish_dir(tmp, out)
    (failed,) = distributed.all_reduce_sum([float(len(problems))], env.device)
    if failed:
        raise AdapterCheckError(problems or [f"rank 0 found {int(failed)} problems"], tmp)
    if recipe.peft.merge:  # the others wait for rank 0 alone: no collective timeout
        if env.is_main:
            merge_adapter(recipe, out, run_dir / MERGED)
        distributed.wait_for_main("merge the LoRA adapter into the base model",
                                  recipe.train.single_rank_work_timeout_s)
    return out


# ----------------------------------------------------------------------------------- merging
def _base_and_options(base, adapter_dir: Path) -> tuple[str, dict]:
    if isinstance(base, (str, Path)) and str(base).endswith((".yaml", ".yml")) and \
            Path(base).is_file():
        base = load_recipe(base)
    if isinstance(base, Recipe):
        opts = {"revision": base.model.revision, "trust_remote_code": base.model.trust_remote_code}
        return adapter_base(base, Path(base.output.dir)), opts
    if base is None:
        base = json.loads((adapter_dir / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
        if not base:
            raise RecipeError.one(str(adapter_dir / ADAPTER_CONFIG), "names no base model",
                                  "pass the base model directory, hub id or the run's recipe")
    return str(base), {}


def merge_adapter(base_model_dir_or_recipe, adapter_dir, out_dir, dtype: str = "auto") -> Path:
    """Write base + adapter as one model in Hugging Face format (safetensors) to `out_dir`.

    `base_model_dir_or_recipe`: a model directory or hub id, a `Recipe` or recipe file (its
    model, or `<output.dir>/base` for an inline config), or None to use the base named in the
    adapter's config. Written to `<out_dir>.partial` and renamed when complete.
    """
    from peft import PeftModel
    from transformers import AutoTokenizer

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    base, opts = _base_and_options(base_model_dir_or_recipe, adapter_dir)
    model = heads.base_for_adapter(base, adapter_dir, dtype=dtype, **opts)
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    from dpkit.export import check_out, staging

    check_out(out_dir, overwrite=True)  # replaces only an earlier export (dpkit.rundir's rule)
    with staging(out_dir) as tmp:
        merged.save_pretrained(tmp)
        for source in (adapter_dir, base):
            try:
                AutoTokenizer.from_pretrained(source, **opts).save_pretrained(tmp)
                break
            except (OSError, ValueError):
                continue
    return out_dir


# --------------------------------------------------------------------------------- preflight
def preflight_problems(recipe: Recipe, model_config, on_cpu: bool) -> list[Problem]:
    """QLoRA needs CUDA and bitsandbytes; every target module must exist in the architecture."""
    section = recipe.peft
    if section is None:
        return []
    problems = []
    if section.method == "qlora":
        if on_cpu:
            problems.append(Problem("peft.method", "QLoRA loads the base in 4-bit with "
                                    "bitsandbytes, which needs a CUDA GPU; this machine has none",
                                    "use `peft.method: lora` here, or run on a GPU machine"))
        else:
            try:
                import bitsandbytes  # noqa: F401
            except ImportError:
                problems.append(Problem("peft.method", "QLoRA needs the bitsandbytes package",
                                        "pip install bitsandbytes"))
    if model_config is not None:
        try:
            model = meta_model(model_config, recipe.model.trust_remote_code,
                               heads.of_recipe(recipe))
        except (ValueError, KeyError, OSError) as e:
            return problems + [Problem("peft", f"can't build the architecture to check target "
                                       f"modules: {str(e).splitlines()[0] if str(e) else e}")]
        problems += target_problems(model, section)
    return problems
