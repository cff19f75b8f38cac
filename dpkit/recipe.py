"""The recipe: a typed schema for one fine-tuning run, loaded from YAML plus `key=value` overrides.

Every field has a docstring (shown by `dpkit validate --explain` and the README's reference).
Unknown keys are refused with the closest valid key; all problems are collected and raised once
as a `RecipeError`. Checks that need the world size, the data or the model on disk live in
`dpkit.preflight`; this module only knows the recipe itself.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from dpkit import shipped
from dpkit.compute_schema import ComputeSection
from dpkit.errors import RecipeError
from dpkit.eval.schema import EvalSection
from dpkit.hub_schema import HubSection
from dpkit.methods import FORMAT_COLUMNS, METHODS, method_problems, sections
from dpkit.moe_schema import MoeSection
from dpkit.overrides import (  # noqa: F401
    DuplicateKeyError,
    _number_or_value,
    apply_overrides,
    parse_overrides,
    read_yaml,
    yaml_error_line,
)
from dpkit.methods.preference import PreferenceSection  # noqa: F401 (a name users import)
from dpkit.schema_errors import problems_from_pydantic


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


def _shipped_path(cls, value: str | None) -> str | None:
    """`dpkit:<name>` → the file shipped in the package; any other value unchanged."""
    if value is None or not shipped.is_shipped(value):
        return value
    path = shipped.resolve(value)
    if not Path(path).exists():
        raise ValueError(f"`{value}` is not a file shipped with dpkit; shipped: "
                         f"{', '.join(shipped.available())}")
    return path


# ----------------------------------------------------------------------------------------- model
class ModelSection(_Section):
    name_or_path: str | None = None
    """Hugging Face hub id (`Qwen/Qwen2.5-0.5B`) or local directory with config.json and weights."""
    config: dict[str, Any] | None = None
    """Inline config (`model_type` plus sizes) for a tiny model with random weights seeded by
    `train.seed`. Use instead of `name_or_path`, for tests and the quickstart."""
    tokenizer: str | None = None
    """Hub id or local directory of the tokenizer (`dpkit:tokenizers/tiny-bpe` is shipped);
    defaults to `name_or_path`."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of the model and tokenizer."""
    chat_template: str | None = None
    """Chat template for `messages` data when the tokenizer has none (base models) or to replace
    its own: a shipped name (`chatml`, from dpkit/resources/chat_templates/) or a path to a .jinja file."""
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    """Training precision. bfloat16/float16 turn on DeepSpeed's mixed precision (fp32 master
    weights in the optimizer); float16 is refused on CPU."""
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2", "flex_attention"] = "sdpa"
    """Attention kernel passed to transformers. With `data.packing`, sdpa runs row by row
    (dpkit/attention.py: flash varlen on CUDA) instead of under a dense block mask, unless the
    model needs more than causality (a short sliding window, soft-capping)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about 30% more compute."""
    trust_remote_code: bool = False
    """Allow model code from the hub repository to run (only for repositories you trust)."""

    _shipped = field_validator("name_or_path", "tokenizer")(_shipped_path)

    @field_validator("config")
    @classmethod
    def _numbers_as_numbers(cls, config: dict[str, Any] | None) -> dict[str, Any] | None:
        """`rms_norm_eps: "1e-5"` (quoted, or from a YAML 1.1 reader) means the number."""
        if config is None:
            return None
        return {k: _number_or_value(v) for k, v in config.items()}

    @model_validator(mode="after")
    def _one_source(self) -> ModelSection:
        if (self.name_or_path is None) == (self.config is None):
            raise ValueError("set exactly one of `model.name_or_path` and `model.config`")
        if self.config is not None and self.tokenizer is None:
            raise ValueError("an inline `model.config` needs `model.tokenizer` (a hub id or directory)")
        if self.config is not None and "model_type" not in self.config:
            typo = difflib.get_close_matches("model_type", [str(k) for k in self.config], n=1)
            raise ValueError("`model.config` needs a `model_type` (for example `llama`)" +
                             (f"; is `{typo[0]}` a misspelling of it?" if typo else ""))
        return self

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.name_or_path  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------ data
# Format names and columns come from the method registry (dpkit/methods/), the names the format
# registry (dpkit/data/formats.py: rendering) is keyed by.
DATA_FORMATS = tuple(FORMAT_COLUMNS)
FormatName = Literal[DATA_FORMATS]  # type: ignore[valid-type]


class DataSource(_Section):
    path: str
    """Hub dataset name, or a local .json/.jsonl/.parquet/.csv file (relative to the current
    directory), or a file shipped with dpkit (`dpkit:data/self_instruct_seed.alpaca.jsonl`)."""
    name: str | None = None
    """Hub dataset configuration name, if it has several."""
    split: str = "train"
    """Which split to read."""
    revision: str | None = None
    """Hub dataset revision (branch, tag or commit); part of the tokenized-data cache key."""
    format: FormatName = "alpaca"
    """alpaca: instruction/input/output; messages: chat turns rendered with the tokenizer's chat
    template; text: plain text, every token trained on; prompt_completion: TRL's prompt/completion
    (strings or message lists) in the chat template, trained on the completion only; preference:
    prompt/chosen/rejected pairs for the preference objectives (docs/preference.md)."""
    columns: dict[str, str] = Field(default_factory=dict)
    """Map the format's column names to this dataset's: `{instruction: question, output: answer}`."""
    max_rows: int | None = Field(default=None, gt=0)
    """Read at most this many rows (the first ones)."""
    weight: float | None = Field(default=None, gt=0)
    """With `data.mixture: first_exhausted` or `all_exhausted`: this source's share of the rows
    drawn, relative to the other sources' weights (default 1; weights 3 and 7 draw 30% and 70%)."""
    rows_per_epoch: int | None = Field(default=None, gt=0)
    """With `data.mixture: fixed`: rows drawn from this source per epoch (fewer than it has: each
    epoch goes on where the last stopped; more: it is read again, each pass in a new order)."""
    epochs: float | None = Field(default=None, gt=0)
    """With `data.mixture: fixed`: passes over this source per epoch (0.5: half its rows, 2: each
    row twice); not with `data.streaming`, where a source's length is unknown."""

    _shipped = field_validator("path")(_shipped_path)

    @model_validator(mode="after")
    def _known_columns(self) -> DataSource:
        expected = FORMAT_COLUMNS[self.format]
        unknown = [k for k in self.columns if k not in expected]
        if unknown:
            raise ValueError(
                f"`columns` maps {unknown}, but format `{self.format}` reads {list(expected)}"
            )
        return self

    def column(self, canonical: str) -> str:
        return self.columns.get(canonical, canonical)


Mixture = Literal["concat", "first_exhausted", "all_exhausted", "fixed"]


class DataSection(_Section):
    sources: list[DataSource] = Field(min_length=1)
    """One or more datasets, combined as `mixture` says."""
    mixture: Mixture = "concat"
    """How the sources are combined (docs/data.md): `concat` every row of every source once per
    epoch, shuffled together; `first_exhausted` / `all_exhausted` rows drawn in proportion to
    each source's `weight`, an epoch ending when the first source has given all its rows / when
    every source has (the smaller ones are drawn again); `fixed` each source's `rows_per_epoch`
    or `epochs`. Draws follow a quota schedule: at every global batch each source is within one
    row of its share, the same on any world size."""
    eval_mixture: Mixture = "concat"
    """The same for `eval_sources`: the eval rows are one epoch of this mixture."""
    max_seq_len: int = Field(default=2048, gt=1)
    """Longest tokenized row trained on."""
    overflow: Literal["truncate", "drop"] = "truncate"
    """What happens to longer rows: cut at `max_seq_len`, or left out. Either is counted and
    reported at start."""
    packing: bool = False
    """Concatenate rows into sequences of `max_seq_len` (no padding), kept apart by position ids
    restarting per row (data/packing.py): batches count sequences (pairs: each laid end to end)."""
    group_by_length: bool = False
    """Unpacked: build each step's micro-batches from rows of similar length (less padding; the
    same rows per step)."""
    completion_only_loss: bool = True
    """Train only on responses (alpaca output, assistant turns): prompt tokens get label -100."""
    eval_fraction: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Hold out this fraction of the training rows (chosen with `train.seed`) for eval loss."""
    eval_sources: list[DataSource] = Field(default_factory=list)
    """Separate eval datasets; use instead of `eval_fraction`."""
    cache_dir: str | None = None
    """Where tokenized data is kept, keyed by everything that changes the tokens (default
    `$DPKIT_CACHE`, else ~/.cache/dpkit/data). Local rank 0 of each node tokenizes once; the
    next run with the same data starts at once. Build it ahead with `dpkit prepare RECIPE`."""
    num_proc: int | None = Field(default=None, gt=0)
    """Processes that tokenize (default: the CPU count, at most 8)."""
    streaming: bool = False
    """Read the sources as streams (corpora larger than memory): one stream, the same on any world
    size, shuffled in windows of `shuffle_buffer` rows (each rank tokenizes its own rows of it),
    packed on the fly; the position is saved in checkpoints (a resume reads one window, on any
    world size). Needs `train.max_steps`."""
    shuffle_buffer: int = Field(default=1000, gt=0)
    """Streaming: rows shuffled together (and packed together) at a time."""

    @model_validator(mode="after")
    def _one_eval(self) -> DataSection:
        if self.packing and self.group_by_length:
            raise ValueError("`data.packing` and `data.group_by_length` both fight padding; "
                             "packing leaves none. Choose one.")
        if self.eval_fraction > 0 and self.eval_sources:
            raise ValueError(
                "can't use both `data.eval_fraction` and `data.eval_sources`. Choose one."
            )
        if self.streaming and (self.eval_fraction > 0 or self.group_by_length):
            raise ValueError("`data.streaming` reads each row once in stream order: it can't hold "
                             "out `data.eval_fraction` or `group_by_length`; use "
                             "`data.eval_sources` for eval data")
        if self.eval_mixture != "concat" and not self.eval_sources:
            raise ValueError("`data.eval_mixture` combines `data.eval_sources`, and there are "
                             "none: set eval_sources or leave eval_mixture out")
        for kind, strategy, key in (("sources", self.mixture, "mixture"),
                                    ("eval_sources", self.eval_mixture, "eval_mixture")):
            for i, source in enumerate(getattr(self, kind)):
                _check_mixture_keys(source, f"data.{kind}[{i}]", strategy, f"data.{key}",
                                    self.streaming and kind == "sources")
        return self


def _check_mixture_keys(source: DataSource, where: str, strategy: str, key: str,
                        stream: bool) -> None:
    """A source's weight / rows_per_epoch / epochs against its mixture's strategy."""
    weighted = strategy in ("first_exhausted", "all_exhausted")
    if source.weight is not None and not weighted:
        raise ValueError(f"`{where}.weight` is read by `{key}: first_exhausted` or "
                         f"`all_exhausted`, and {key} is `{strategy}`: set one of them")
    counted = [k for k in ("rows_per_epoch", "epochs") if getattr(source, k) is not None]
    if counted and strategy != "fixed":
        raise ValueError(f"`{where}.{counted[0]}` is read by `{key}: fixed`, and {key} is "
                         f"`{strategy}`: set `{key}: fixed` or leave it out")
    if strategy == "fixed" and len(counted) != 1:
        raise ValueError(f"`{key}: fixed` needs one of `{where}.rows_per_epoch` or "
                         f"`{where}.epochs`" + (", not both" if counted else ""))
    if stream and source.epochs is not None:
        raise ValueError(f"`{where}.epochs` needs the source's length, which a stream "
                         f"(`data.streaming`) doesn't know: use `{where}.rows_per_epoch`")


# ----------------------------------------------------------------------------------------- train
Beta = Annotated[float, Field(ge=0.0, lt=1.0)]  # torch.optim.AdamW refuses others at step 1


class TrainSection(_Section):
    global_batch_size: int = Field(gt=0)
    """Rows per optimizer step over all ranks (= micro_batch_size × gradient accumulation ×
    world size; accumulation is derived, never written)."""
    micro_batch_size: int = Field(default=1, gt=0)
    """Rows per forward pass on one rank."""
    epochs: int = Field(default=1, gt=0)
    """Passes over the training data (ignored when `max_steps` is set)."""
    max_steps: int | None = Field(default=None, gt=0)
    """Stop after this many optimizer steps."""
    lr: float = Field(default=2e-5, gt=0)
    """Peak learning rate (AdamW)."""
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup: cosine or linear to 0, or constant."""
    warmup_ratio: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Fraction of the steps spent warming the learning rate up linearly from 0."""
    weight_decay: float = Field(default=0.0, ge=0.0)
    """AdamW weight decay (not applied to biases and norm weights)."""
    adam_betas: tuple[Beta, Beta] = (0.9, 0.999)
    """AdamW betas, each in [0, 1)."""
    adam_eps: float = Field(default=1e-8, gt=0)
    """AdamW epsilon."""
    max_grad_norm: float = Field(default=1.0, ge=0.0)
    """Clip the global gradient norm to this (0 turns clipping off)."""
    seed: int = 42
    """Seeds model init (inline configs), data order, eval split and dropout."""
    compile: bool = False
    """torch.compile each repeated decoder layer once (regional compilation, as accelerate does
    for DeepSpeed): fuses the elementwise work between the matmuls. The first steps pay the
    compile time (about a minute); worth it for long runs on GPUs."""
    skip_memory_check: bool = False
    """Launch even when `dpkit plan`'s memory model says the recipe will not fit the GPUs."""
    nan_policy: Literal["stop", "skip"] = "stop"
    """A NaN or infinite loss: `stop` the run (naming the last good checkpoint), or `skip` the
    step (DeepSpeed discards the update; needs bf16/fp16, or ZeRO 1-2 in fp32)."""
    collective_timeout_s: int = Field(default=600, gt=0)
    """A collective (all-reduce, barrier) waiting longer than this fails the run instead of
    hanging: a dead rank or node ends the job within this time."""
    single_rank_work_timeout_s: int = Field(default=4 * 3600, gt=0)
    """How long the other ranks wait for work rank 0 does alone — the universal-checkpoint
    conversion, the final model save, the LoRA merge, lm-eval, the Hub push — before giving up
    (they are not bound by `collective_timeout_s` meanwhile, and say every minute what they
    wait for)."""
    max_restarts: int = Field(default=0, ge=0)
    """When a rank dies (killed, out of memory; not a recipe error, a NaN loss or a preemption),
    `dpkit train` restarts all ranks from this run's last complete checkpoint, up to this many
    times."""
    preemption_grace_s: int = Field(default=25, gt=0)
    """After SIGTERM the ranks finish the step, write a checkpoint and exit (code 143: requeue);
    `dpkit train` kills them this long after the signal (and gives torchrun 5 s more). Keep it
    under the scheduler's window (SLURM sends SIGKILL 30 s after SIGTERM by default)."""
    sequence_parallel: int = Field(default=1, gt=0)
    """Ranks that split each row's sequence between them (DeepSpeed Ulysses, dpkit/parallel/);
    the world is data-parallel × this. 1: no sequence parallelism."""


# ------------------------------------------------------------------------------------------ zero
Offload = Literal["none", "cpu", "nvme"]


class ZeroSection(_Section):
    stage: Literal[0, 1, 2, 3] = 2
    """ZeRO stage: 0 plain data parallel, 1 partitions optimizer state, 2 also gradients,
    3 also parameters."""
    template: str | None = None
    """A DeepSpeed JSON template; default: the one in dpkit/resources/ds_configs/ matching stage and offload."""
    offload_optimizer: Offload = "none"
    """Keep optimizer state (and its step) on CPU (stage 1–3) or NVMe (stage 3)."""
    offload_params: Offload = "none"
    """Keep parameters on CPU or NVMe between uses: stage 3 only."""
    nvme_path: str | None = None
    """Directory on a fast local disk for NVMe offload."""

    _shipped = field_validator("template")(_shipped_path)

    @model_validator(mode="after")
    def _offload_fits_stage(self) -> ZeroSection:
        if self.offload_optimizer != "none" and self.stage == 0:
            raise ValueError("optimizer offload needs `zero.stage` 1, 2 or 3")
        if self.offload_params != "none" and self.stage != 3:
            raise ValueError("parameter offload needs `zero.stage: 3`")
        if self.offload_optimizer == "nvme" and self.stage != 3:
            raise ValueError("NVMe offload of the optimizer needs `zero.stage: 3` (ZeRO-Infinity); "
                             "use `zero.offload_optimizer: cpu` with stage 1 or 2")
        if "nvme" in (self.offload_optimizer, self.offload_params) and not self.nvme_path:
            raise ValueError("NVMe offload needs `zero.nvme_path` (a directory on a local NVMe disk)")
        return self


# ------------------------------------------------------------------------------------------ peft
class PeftSection(_Section):
    method: Literal["lora", "qlora"] = "lora"
    """lora: train low-rank adapters on a frozen base model; qlora: the same on a base model
    loaded in 4-bit (bitsandbytes NF4, CUDA GPUs only)."""
    r: int = Field(default=16, gt=0)
    """LoRA rank: the inner size of each adapter (A is r × in, B is out × r)."""
    alpha: float = Field(default=32, gt=0)
    """LoRA scaling numerator: adapter outputs are scaled by alpha / r."""
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    """Dropout on the adapters' input during training (0 makes runs on any world size equal)."""
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Module names to adapt (`[q_proj, v_proj]`, matched against the end of each module path),
    or `all-linear`: every linear layer except the output head."""
    target_parameters: list[str] = Field(default_factory=list)
    """Parameters to adapt directly, by name (matched against the end of each parameter path):
    the experts of a mixture-of-experts model stored as 3-D tensors (`[experts.gate_up_proj,
    experts.down_proj]`), which no linear layer — so not `all-linear` — reaches. Empty: the
    experts stay frozen. Needs `dropout: 0` (PEFT's rule for parameter adapters)."""
    modules_to_save: list[str] = Field(default_factory=list)
    """Modules trained in full and saved with the adapter (e.g. `[lm_head]` after adding tokens)."""
    merge: bool = False
    """Also write the base model with the adapter merged in, in Hugging Face format, to
    `<output.dir>/merged`."""

    @model_validator(mode="after")
    def _some_targets(self) -> PeftSection:
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError("`peft.target_modules` is empty: list module names or use `all-linear`")
        if self.target_parameters and self.dropout:
            raise ValueError("`peft.target_parameters` needs `peft.dropout: 0` (PEFT can't apply "
                             "dropout to a parameter's adapter)")
        return self


# ---------------------------------------------------------------------------------------- output
class OutputSection(_Section):
    dir: str
    """Run directory (relative to the current directory)."""
    overwrite: bool = False
    """Replace an existing run directory, only one dpkit created as a run (its `.dpkit-run`
    marker), never `.`, a parent of it, `$HOME` or a symbolic link (docs/security.md). Without
    it an existing non-empty directory stops the run."""
    log_steps: int = Field(default=1, gt=0)
    """Write a metrics line and a log line every this many steps."""
    eval_steps: int | None = Field(default=None, gt=0)
    """Eval (loss on the eval data, generations: see `eval`) every this many steps, and always
    at the end and before the first step (`eval.baseline`)."""
    report_to: list[Literal["tensorboard", "wandb"]] = Field(default_factory=list)
    """Trackers that also receive the metrics (rank 0): TensorBoard under `<dir>/tensorboard`,
    W&B (`pip install wandb`; WANDB_MODE=offline works without network)."""
    save_model: bool = True
    """Write the trained model in Hugging Face format to `<dir>/model` at the end."""
    save_steps: int | None = Field(default=None, gt=0)
    """Write a full training checkpoint (engine, optimizer, ZeRO partitions, scheduler, data
    position, RNG) to `<dir>/checkpoints/` every this many steps, and at the last step."""
    save_total_limit: int | None = Field(default=None, gt=0)
    """Keep only the newest this many complete checkpoints (default: keep all)."""
    async_save: bool = False
    """Write checkpoints in the background (DeepSpeed's decoupled checkpoint engine, ZeRO-3
    only): the ranks wait only to hand the state to a writer process per rank and go on with the
    next step; DeepSpeed waits for the writer before that step updates the weights, and the
    checkpoint is marked COMPLETE once its files are written (docs/checkpoints.md)."""


class _RecipeBase(_Section):
    """The sections every recipe has; `Recipe` adds the methods' own (from dpkit/methods/)."""


    model: ModelSection
    data: DataSection
    train: TrainSection
    zero: ZeroSection = Field(default_factory=ZeroSection)
    compute: ComputeSection = Field(default_factory=ComputeSection)
    """Loss head, tiled MLP, activation offload, fused kernels (dpkit/compute_schema.py)."""
    moe: MoeSection = Field(default_factory=MoeSection)
    """Mixture-of-experts models: router loss, ZeRO-3 leaf modules, expert parallelism
    (dpkit/moe_schema.py, docs/moe.md); ignored for a dense model."""
    peft: PeftSection | None = None
    """Parameter-efficient fine-tuning (LoRA / QLoRA); leave out for full fine-tuning."""
    output: OutputSection
    eval: EvalSection = Field(default_factory=EvalSection)
    """Step-0 baseline, sample generations at every eval, lm-eval benchmarks after training."""
    hub: HubSection | None = None
    """Push the trained model with a model card to the Hugging Face Hub (see docs/hub.md)."""
    resume: str | None = None
    """`auto`: continue from the checkpoint `output.dir/checkpoints/latest` names, this run's last
    complete one (after a rewind, not the highest step on disk; start fresh if there is none; a
    finished run is left as it is); or a checkpoint path (a pickle: only your own). Another
    world size or ZeRO stage is converted automatically."""

    @model_validator(mode="after")
    def _method_fits(self):
        for problem in method_problems(self):
            raise ValueError(problem)
        return self


def _method_fields() -> dict:
    """`objective` (its choices: the registered methods) and one optional section per method
    settings class, documented like the other fields."""
    listed = "; ".join(f"`{name}`: {spec.doc}" for name, spec in METHODS.items())
    fields: dict = {"objective": (Literal[tuple(METHODS)], Field(  # type: ignore[valid-type]
        "sft", description=f"The training method. {listed} (docs/methods.md).",
    ))}
    for key, (cls, users) in sections().items():
        fields[key] = (cls | None, Field(None, description=f"Settings of `objective: {users}` "
                                         "(optional: the defaults apply when left out)."))
    return fields


Recipe = create_model("Recipe", __base__=_RecipeBase, __module__=__name__, **_method_fields())
Recipe.__doc__ = "One fine-tuning run: the sections above plus each training method's own."


# -------------------------------------------------------------------------------------- loading
def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe file, apply overrides, validate. Raises `RecipeError` listing every problem."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not a recipe file" if path.is_dir() else "recipe file not found"
        raise RecipeError.one(str(path), what, "pass the path of a recipe .yaml file")
    try:
        raw = read_yaml(path.read_text()) or {}
    except DuplicateKeyError as e:
        raise RecipeError.one(str(path), e.problem, "keep one of them") from None
    except yaml.YAMLError as e:
        raise RecipeError.one(str(path), f"is not valid YAML: {yaml_error_line(e)}",
                              "fix the syntax") from None
    except (UnicodeDecodeError, OSError) as e:
        raise RecipeError.one(str(path), f"can't be read as text: {e}",
                              "pass a recipe .yaml file") from None
    if not isinstance(raw, dict) or not raw:
        what = "is empty" if not raw else "must be a mapping of sections (model, data, train, ...)"
        raise RecipeError.one(str(path), what, "start from a recipe in recipes/")
    return recipe_from_dict(apply_overrides(raw, overrides or []))


def recipe_from_dict(raw: dict) -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        raise RecipeError(problems_from_pydantic(e.errors(), raw, Recipe)) from None


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
