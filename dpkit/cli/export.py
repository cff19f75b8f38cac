"""`dpkit export RUN_OR_CHECKPOINT --out DIR`: a Hugging Face model from a checkpoint
(dpkit/export.py)."""

from __future__ import annotations

from pathlib import Path

from dpkit.errors import RecipeError
from dpkit.export import DTYPES, check_out, export, resolve_checkpoint
from dpkit.run_files import MODEL


def _cmd_export(args) -> int:
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise RecipeError.one("--out", f"'{args.out}' is a file, not a directory",
                              "name a directory to write the model to")
    if args.merge:  # a LoRA run: its gathered, verified adapter merged into the base
        from dpkit.lora import merge_adapter

        adapter = Path(args.checkpoint) / MODEL
        if not (adapter / "adapter_config.json").is_file():
            raise RecipeError.one("--merge", f"'{args.checkpoint}' is not a finished LoRA run "
                                  "(no model/adapter_config.json)", "pass the run directory of "
                                  "a LoRA run, or leave out --merge")
        out = Path(args.out).expanduser()
        check_out(out, args.overwrite)
        merge_adapter(None, adapter, out, dtype=DTYPES[args.dtype])
        print(f"merged {adapter} into its base model: {out}")
        return 0
    out = export(Path(args.checkpoint), Path(args.out), args.dtype, args.max_shard_size,
                 args.overwrite)
    print(f"exported {resolve_checkpoint(Path(args.checkpoint))} to {out}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="write a Hugging Face model from a checkpoint")
    p.add_argument("checkpoint", help="a checkpoints/step-N directory, or a run directory "
                   "(its newest complete checkpoint)")
    p.add_argument("--out", required=True, help="directory to write the model to")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--max-shard-size", default="5GB", help="split weights above this size")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out that "
                   "dpkit export wrote (nothing else is ever deleted)")
    p.add_argument("--merge", action="store_true", help="LoRA run directory: write base + "
                   "adapter merged into one model")
    p.set_defaults(func=_cmd_export)
