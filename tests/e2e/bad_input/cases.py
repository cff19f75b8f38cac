"""The bad inputs: each a recipe, files or a command line a user could plausibly write, and the
text the one error line must contain (the key, file or value at fault).

`Case.run` builds it in a fresh directory; the tests in this folder run it and check the promise
(exit 2, one short message, no traceback, nothing on disk changed, no run directory).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from conftest import ALPACA, TINY_LLAMA, TOKENIZER, tiny_recipe

from dpkit.shipped import DS_CONFIGS

R = "{recipe}"  # the recipe file's path in a command line
D = "{d}"       # the case's directory


@dataclass
class Case:
    id: str
    needle: str
    """Text the error must contain: the offending key, file or value."""
    over: list[str] = field(default_factory=list)
    """Overrides after the recipe."""
    edit: Callable[[dict, Path], None] | None = None
    """Changes the recipe dict before it is written (gets the case directory too)."""
    files: Callable[[Path], None] | None = None
    """Writes the files the case needs."""
    argv: list[str] | None = None
    """The whole command line (templates {recipe}, {d}); default: validate {recipe} + over."""
    recipe_text: str | bytes | None = None
    """The recipe file's text as is (instead of the dumped dict)."""

    def argv_in(self, d: Path, recipe: Path) -> list[str]:
        argv = self.argv if self.argv is not None else ["validate", R, *self.over]
        return [a.replace(R, str(recipe)).replace(D, str(d)) for a in argv]


def base(d: Path) -> dict:
    """A recipe that validates: tiny inline Llama, shipped tokenizer, shipped alpaca data."""
    return tiny_recipe(d / "run", data={"sources": [{"path": str(ALPACA), "format": "alpaca"}],
                                        "max_seq_len": 128})


def source(path: str, fmt: str = "alpaca", **extra):
    def edit(r: dict, d: Path) -> None:
        r["data"]["sources"] = [{"path": path.replace(D, str(d)), "format": fmt, **extra}]
    return edit


def write(name: str, text: str | bytes):
    def files(d: Path) -> None:
        p = d / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return files


def rows(*items) -> str:
    return "".join((json.dumps(i) if not isinstance(i, str) else i) + "\n" for i in items)


ROW = {"instruction": "Say hi.", "output": "Hi."}


def model_dir(weights: dict[str, bytes] | None = None, config: str | None = None):
    """A local model directory: the tiny config and the given weight files."""
    def files(d: Path) -> None:
        m = d / "model"
        m.mkdir()
        (m / "config.json").write_text(config if config is not None else json.dumps(TINY_LLAMA))
        for name, data in (weights or {}).items():
            (m / name).write_bytes(data)
    return files


def local_model(r: dict, d: Path) -> None:
    r["model"] = {"name_or_path": str(d / "model"), "tokenizer": str(TOKENIZER), "dtype": "float32"}


def safetensors(n_bytes_missing: int = 0) -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    return len(header).to_bytes(8, "little") + header + bytes(16 - n_bytes_missing)


def make_dirs(*names: str):
    def files(d: Path) -> None:
        for n in names:
            (d / n).mkdir(parents=True)
    return files


CASES = [
    # ------------------------------------------------------------------ recipe file
    Case("recipe-missing", "nope.yaml", argv=["validate", f"{D}/nope.yaml"]),
    Case("recipe-is-directory", "sub", argv=["validate", f"{D}/sub"], files=make_dirs("sub")),
    Case("recipe-bad-yaml", "recipe.yaml", recipe_text="model:\n  config: {a: 1\ntrain: [\n"),
    Case("recipe-tab-indent", "recipe.yaml", recipe_text="model:\n\tdtype: float32\n"),
    Case("recipe-is-list", "recipe.yaml", recipe_text="- model\n- data\n"),
    Case("recipe-empty", "recipe.yaml", recipe_text="# nothing yet\n"),
    Case("recipe-binary", "recipe.yaml", recipe_text=b"\xff\xfe\x00model"),
    Case("recipe-unknown-section", "trian", edit=lambda r, d: r.update(trian=r.pop("train"))),
    # ------------------------------------------------------------------ schema: train
    Case("unknown-key-suggestion", "train.micro_batch", over=["train.micro_batch=2"]),
    Case("lr-not-number", "train.lr", over=["train.lr=fast"]),
    Case("lr-zero", "train.lr", over=["train.lr=0"]),
    Case("lr-negative", "train.lr", over=["train.lr=-1e-4"]),
    Case("adam-eps-zero", "train.adam_eps", over=["train.adam_eps=0"]),
    Case("adam-eps-negative", "train.adam_eps", over=["train.adam_eps=-1e-8"]),
    Case("adam-beta2-one", "train.adam_betas.1", over=["train.adam_betas=[0.9, 1.0]"]),
    Case("adam-beta1-negative", "train.adam_betas.0", over=["train.adam_betas=[-0.1, 0.99]"]),
    Case("adam-beta1-above-one", "train.adam_betas.0", over=["train.adam_betas=[1.5, 0.999]"]),
    Case("adam-betas-one-value", "train.adam_betas", over=["train.adam_betas=[0.9]"]),
    Case("warmup-ratio-one", "train.warmup_ratio", over=["train.warmup_ratio=1.0"]),
    Case("global-batch-zero", "train.global_batch_size", over=["train.global_batch_size=0"]),
    Case("micro-batch-negative", "train.micro_batch_size", over=["train.micro_batch_size=-2"]),
    Case("max-steps-zero", "train.max_steps", over=["train.max_steps=0"]),
    Case("epochs-word", "train.epochs", over=["train.epochs=two"]),
    Case("lr-schedule-typo", "train.lr_schedule", over=["train.lr_schedule=cosin"]),
    Case("grad-norm-negative", "train.max_grad_norm", over=["train.max_grad_norm=-1"]),
    Case("timeout-zero", "train.collective_timeout_s", over=["train.collective_timeout_s=0"]),
    Case("nan-policy-unknown", "train.nan_policy", over=["train.nan_policy=ignore"]),
    Case("batch-not-divisible", "train.global_batch_size",
         over=["train.global_batch_size=10", "train.micro_batch_size=2"]),
    Case("compile-zero3", "train.compile", over=["train.compile=true", "zero.stage=3"]),
    Case("async-save-zero2", "output.async_save", over=["output.async_save=true"]),
    Case("nan-skip-fp32-zero3", "train.nan_policy", over=["train.nan_policy=skip", "zero.stage=3"]),
    Case("train-section-scalar", "train", over=["train=fast"]),
    # ------------------------------------------------------------------ schema: data
    Case("max-seq-len-one", "data.max_seq_len", over=["data.max_seq_len=1"]),
    Case("overflow-unknown", "data.overflow", over=["data.overflow=cut"]),
    Case("eval-fraction-one", "data.eval_fraction", over=["data.eval_fraction=1.0"]),
    Case("sources-empty", "data.sources", over=["data.sources=[]"]),
    Case("format-unknown", "data.sources.0.format", over=["data.sources.0.format=chat"]),
    Case("max-rows-zero", "data.sources.0.max_rows", over=["data.sources.0.max_rows=0"]),
    Case("columns-unknown-canonical", "prompt", over=["data.sources.0.columns={prompt: q}"]),
    Case("packing-and-grouping", "data.group_by_length",
         over=["data.packing=true", "data.group_by_length=true"]),
    Case("eval-fraction-and-sources", "data.eval_sources",
         over=["data.eval_fraction=0.1", f"data.eval_sources=[{{path: '{ALPACA}'}}]"]),
    Case("source-without-path", "data.sources.0.path", over=["data.sources=[{format: alpaca}]"]),
    Case("mixture-unknown", "data.mixture", over=["data.mixture=random"]),
    Case("weight-without-mixture", "data.sources[0].weight", over=["data.sources.0.weight=2"]),
    Case("fixed-without-count", "data.sources[0].rows_per_epoch", over=["data.mixture=fixed"]),
    # ------------------------------------------------------------------ schema: model
    Case("dtype-unknown", "model.dtype", over=["model.dtype=fp32"]),
    Case("attn-unknown", "model.attn_implementation", over=["model.attn_implementation=flash"]),
    Case("no-model-source", "model.name_or_path", over=["model.config=null"]),
    Case("config-without-model-type", "model_type", over=["model.config={hidden_size: 32}"]),
    Case("model-type-typo", "model.config.model_type", over=["model.config.model_type=lama"]),
    Case("config-key-typo", "model.config.hiden_size", over=["model.config.hiden_size=32"]),
    Case("config-key-typo-layers", "model.config.num_hiden_layers",
         over=["model.config.num_hiden_layers=2"]),
    Case("config-value-word", "model.config.vocab_size", over=["model.config.vocab_size=big"]),
    Case("config-value-float", "model.config.num_hidden_layers",
         over=["model.config.num_hidden_layers=2.5"]),
    Case("config-heads-not-dividing", "hidden size (30)", over=["model.config.hidden_size=30"]),
    Case("chat-template-unknown", "model.chat_template",
         edit=lambda r, d: (source("dpkit:data/self_instruct_seed.messages.jsonl", "messages")(
             r, d), r["model"].update(chat_template="chatmlx"))),
    Case("tokenizer-not-shipped", "model.tokenizer", over=["model.tokenizer=dpkit:tokenizers/tiny"]),
    Case("tokenizer-dir-typo", "model.tokenizer", over=[f"model.tokenizer={TOKENIZER}x"]),
    Case("tokenizer-relative-typo", "tokenizers/tiny-bpee/",
         over=["model.tokenizer=tokenizers/tiny-bpee/"]),
    Case("tokenizer-nested-typo", "assets/tok/tiny", over=["model.tokenizer=assets/tok/tiny"]),
    Case("tokenizer-with-space", "my tokenizer", over=["model.tokenizer=my tokenizer"]),
    Case("model-dir-missing", "model.name_or_path",
         over=["model.config=null", f"model.name_or_path={D}/no-such-model"]),
    # ------------------------------------------------------------------ schema: zero, peft, output
    Case("zero-stage-4", "zero.stage", over=["zero.stage=4"]),
    Case("zero-key-typo", "zero.stagee", over=["zero.stagee=3"]),
    Case("offload-stage0", "zero", over=["zero.stage=0", "zero.offload_optimizer=cpu"]),
    Case("param-offload-stage2", "zero.stage: 3", over=["zero.offload_params=cpu"]),
    Case("nvme-without-path", "zero.nvme_path", over=["zero.stage=3", "zero.offload_optimizer=nvme"]),
    Case("nvme-optimizer-below-stage3", "zero.stage: 3", over=["zero.offload_optimizer=nvme"]),
    Case("template-not-shipped", "zero.template", over=["zero.template=dpkit:ds_configs/zero9.json"]),
    Case("template-missing", "missing.json", over=[f"zero.template={D}/missing.json"]),
    Case("template-bad-json", "ds.json", over=[f"zero.template={D}/ds.json"],
         files=write("ds.json", "{not json")),
    Case("zero3-sequence-parallel-without-reduce-scatter", "reduce_scatter",
         argv=["validate", R, "--nproc-per-node", "2", "zero.stage=3", "train.sequence_parallel=2",
               f"zero.template={D}/z3.json"],
         files=lambda d: write("z3.json", json.dumps({
             **json.loads((DS_CONFIGS / "zero3.json").read_text()),
             "zero_optimization": {**json.loads((DS_CONFIGS / "zero3.json").read_text())[
                 "zero_optimization"], "reduce_scatter": False}}))(d)),
    Case("lora-rank-zero", "peft.r", over=["peft.r=0"]),
    Case("lora-method-unknown", "peft.method", over=["peft.method=dora"]),
    Case("lora-targets-empty", "peft.target_modules", over=["peft.target_modules=[]"]),
    Case("lora-targets-absent", "qkv_proj", over=["peft.target_modules=[qkv_proj]"]),
    Case("lora-dropout-one", "peft.dropout", over=["peft.dropout=1.0"]),
    Case("output-dir-missing", "output.dir", over=["output={save_model: false}"]),
    Case("output-log-steps-zero", "output.log_steps", over=["output.log_steps=0"]),
    Case("output-report-unknown", "output.report_to", over=["output.report_to=[mlflow]"]),
    Case("output-keep-zero", "output.save_total_limit", over=["output.save_total_limit=0"]),
    Case("output-dir-is-file", "output.dir", over=[f"output.dir={D}/taken"],
         files=write("taken", "mine")),
    Case("output-dir-under-file", "output.dir", over=[f"output.dir={D}/taken/run"],
         files=write("taken", "mine")),
    Case("hub-key-typo", "hub.privat", over=["hub={repo_id: me/model, privat: true}"]),
    # ------------------------------------------------------------------ override syntax
    Case("override-no-equals", "train.lr", over=["train.lr"]),
    Case("override-no-key", "=3", over=["=3"]),
    Case("override-empty-part", "train..lr", over=["train..lr=1"]),
    Case("override-index-past-end", "data.sources.5", over=["data.sources.5.path=x"]),
    Case("override-index-negative", "data.sources.-3", over=["data.sources.-3.path=x"]),
    Case("override-index-word", "data.sources.first", over=["data.sources.first.path=x"]),
    Case("override-unclosed-list", "train.adam_betas", over=["train.adam_betas=[0.9, 0.99"]),
    Case("override-unclosed-map", "model.config", over=["model.config={hidden_size: 32"]),
    Case("override-unclosed-quote", "output.dir", over=["output.dir=\"runs/x"]),
    Case("override-into-value", "train.lr", over=["train.lr.peak=1"]),
    # ------------------------------------------------------------------ command line
    Case("options-between-recipe-and-overrides", "train.max_steps",
         argv=["validate", R, "--nproc-per-node", "1", "train.max_steps=0"]),
    Case("options-before-recipe", "train.max_steps",
         argv=["validate", "--nproc-per-node", "1", R, "train.max_steps=0"]),
    Case("train-options-between", "train.max_steps",
         argv=["train", R, "--nproc-per-node", "1", "--dry-run", "train.max_steps=0"]),
    Case("nproc-not-number", "--nproc-per-node", argv=["validate", R, "--nproc-per-node", "two"]),
    Case("unknown-option", "--bogus", argv=["validate", R, "--bogus"]),
    Case("no-recipe", "recipe", argv=["validate"]),
    Case("unknown-command", "trian", argv=["trian", R]),
    Case("launcher-unknown", "--launcher", argv=["train", R, "--launcher", "slurmm"]),
    Case("plan-size-unit", "80XB", argv=["plan", R, "--gpu-memory", "80XB"]),
    Case("plan-size-negative", "-80GB", argv=["plan", R, "--gpu-memory", "-80GB"]),
    Case("plan-size-zero", "0GB", argv=["plan", R, "--gpu-memory", "0GB"]),
    Case("plan-cpu-size-word", "lots", argv=["plan", R, "--cpu-memory", "lots"]),
    Case("plan-options-between", "train.lr", argv=["plan", R, "--gpus-per-node", "2", "train.lr=0"]),
    Case("export-out-is-file", "--out", argv=["export", f"{D}/run", "--out", f"{D}/taken"],
         files=write("taken", "mine")),
    # ------------------------------------------------------------------ data
    Case("data-missing-relative", "data/train.jsonl", edit=source("data/train.jsonl")),
    Case("data-missing-nested", "no/such/dir/rows", edit=source("no/such/dir/rows")),
    Case("data-missing-txt", "rows.txt", edit=source("rows.txt")),
    Case("data-typo-beside-folder", "data/trian", edit=source("data/trian"),
         files=write("data/train.jsonl", rows(ROW))),
    Case("tokenizer-typo-beside-folder", "tokenizers/tiny-bpee",
         over=["model.tokenizer=tokenizers/tiny-bpee"], files=make_dirs("tokenizers/tiny-bpe")),
    Case("data-missing-parquet", "train.parquet", edit=source("./train.parquet")),
    Case("data-unsupported-suffix", ".txt", edit=source(f"{D}/rows.txt"),
         files=write("rows.txt", "hello\n")),
    Case("data-empty-file", "empty.jsonl", edit=source(f"{D}/empty.jsonl"),
         files=write("empty.jsonl", "")),
    Case("data-bad-jsonl-line", "line 3", edit=source(f"{D}/x.jsonl"),
         files=write("x.jsonl", rows(ROW, ROW, '{"instruction": "a", "output": "b"', ROW))),
    Case("data-jsonl-line-is-list", "line 2", edit=source(f"{D}/x.jsonl"),
         files=write("x.jsonl", rows(ROW, ["a", "b"], ROW))),
    Case("data-row-missing-column", "line 4", edit=source(f"{D}/x.jsonl"),
         files=write("x.jsonl", rows(ROW, ROW, ROW, {"instruction": "No answer."}, ROW))),
    Case("data-row-missing-mapped-column", "'answer'",
         edit=source(f"{D}/x.jsonl", columns={"output": "answer"}),
         files=write("x.jsonl", rows({"instruction": "a", "answer": "b"},
                                     {"instruction": "c", "response": "d"}))),
    Case("data-column-absent", "instruction", edit=source(f"{D}/x.jsonl"),
         files=write("x.jsonl", rows({"question": "a", "answer": "b"}))),
    Case("data-all-completions-empty", "output", edit=source(f"{D}/x.jsonl"),
         files=write("x.jsonl", rows(*[{"instruction": f"q{i}", "output": " "} for i in range(4)]))),
    Case("data-all-text-empty", "text", edit=source(f"{D}/x.jsonl", "text"),
         files=write("x.jsonl", rows({"text": ""}, {"text": ""}))),
    Case("data-all-assistant-empty", "assistant",
         edit=lambda r, d: (source(f"{D}/x.jsonl", "messages")(r, d),
                            r["model"].update(chat_template="chatml")),
         files=write("x.jsonl", rows({"messages": [{"role": "user", "content": "hi"},
                                                   {"role": "assistant", "content": ""}]}))),
    Case("data-column-wrong-type", "'output'", edit=source(f"{D}/x.jsonl"),
         files=write("x.jsonl", rows({"instruction": "a", "output": 1}, {"instruction": "b",
                                                                        "output": 2}))),
    Case("data-csv-missing-cell", "line 3", edit=source(f"{D}/x.csv"),
         files=write("x.csv", "instruction,output\na,b\nc,\n")),
    Case("data-message-without-role", "x.jsonl",
         edit=lambda r, d: (source(f"{D}/x.jsonl", "messages")(r, d),
                            r["model"].update(chat_template="chatml")),
         files=write("x.jsonl", rows({"messages": [{"content": "hi"},
                                                   {"role": "assistant", "content": "yo"}]}))),
    Case("data-parquet-garbage", "x.parquet", edit=source(f"{D}/x.parquet"),
         files=write("x.parquet", b"PAR1 not really")),
    Case("data-json-array-broken", "x.json", edit=source(f"{D}/x.json"),
         files=write("x.json", '[{"instruction": "a", "output": "b"},')),
    Case("data-eval-source-missing", "data.eval_sources[0].path",
         over=["data.eval_sources=[{path: missing.jsonl}]"]),
    Case("data-mapping-to-absent-column", "'answer'", edit=source(str(ALPACA),
                                                                  columns={"output": "answer"})),
    # ------------------------------------------------------------------ model on disk
    Case("model-config-no-weights", "no weights", edit=local_model, files=model_dir()),
    Case("model-safetensors-truncated", "model.safetensors", edit=local_model,
         files=model_dir({"model.safetensors": safetensors(n_bytes_missing=6)})),
    Case("model-safetensors-garbage", "model.safetensors", edit=local_model,
         files=model_dir({"model.safetensors": b"\xff" * 64})),
    Case("model-index-missing-shard", "model-00002-of-00002.safetensors", edit=local_model,
         files=model_dir({"model.safetensors.index.json": json.dumps({"weight_map": {
             "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}).encode(),
             "model-00001-of-00002.safetensors": safetensors()})),
    Case("model-config-not-json", "model.name_or_path", edit=local_model,
         files=model_dir({"model.safetensors": safetensors()}, config="{oops")),
    Case("model-dir-without-config", "no config.json", edit=local_model,
         files=make_dirs("model")),
    Case("max-seq-len-beyond-positions", "data.max_seq_len", over=["data.max_seq_len=4096"]),
    Case("max-seq-len-beyond-local-model", "max_position_embeddings", edit=lambda r, d: (
        local_model(r, d), r["data"].update(max_seq_len=1024)),
         files=model_dir({"model.safetensors": safetensors()})),
    Case("existing-run-dir", "output.dir", files=write("run/keep.txt", "precious")),
]
