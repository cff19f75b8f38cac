"""GPU check: dpkit's own MFU for a ~0.5B Llama-family model built from a config — bf16, packed
2048-token sequences, ZeRO-2, one GPU. Prints one JSON line (tokens/s and MFU, median over the
steps after warm-up, as dpkit's metrics.jsonl reports them). Goal (issue 9): MFU >= 45% on H100.

    python scripts/gpu_mfu_dpkit.py [--steps 20] [--micro 8] [--global-batch 32] [--compile]
                                    [--checkpointing] [--dense-mask] [--no-pack] [--attn NAME]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from dpkit.shipped import TOKENIZERS, DATA as SHIPPED_DATA

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))  # bench_throughput's dense-mask baseline

# ~0.5B parameters (Qwen2.5-0.5B-like widths, Llama layout); the bundled tokenizer uses ids < 2048.
MODEL = {"model_type": "llama", "hidden_size": 1024, "intermediate_size": 4096,
         "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 16,
         "vocab_size": 32000, "max_position_embeddings": 4096, "tie_word_embeddings": False}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--micro", type=int, default=8)
    p.add_argument("--global-batch", type=int, help="sequences per optimizer step "
                   "(default: one micro-batch; more = gradient accumulation)")
    p.add_argument("--compile", action="store_true", help="train.compile: regional torch.compile")
    p.add_argument("--dense-mask", action="store_true",
                   help="packed sdpa under transformers' dense block mask instead of dpkit's "
                        "per-row attention (what dpkit did before; for the ratio)")
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--attn", default="sdpa")
    p.add_argument("--no-pack", action="store_true",
                   help="rows of exactly 2048 tokens instead (no packing, no padding, no mask): "
                        "the attention kernels' best case, to see what packing's mask costs")
    args = p.parse_args()

    import torch

    if args.dense_mask:
        from bench_throughput import use_dense_mask

        use_dense_mask()
    global_batch = args.global_batch or args.micro
    from dpkit.recipe import recipe_from_dict
    from dpkit.run import run

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # The real instructions, repeated: rows of realistic lengths for packing.
        rows = (SHIPPED_DATA / "self_instruct_seed.alpaca.jsonl").read_text()
        needed = args.steps * global_batch * 2048 // 150 + 1  # rows, at ~200 tokens each
        copies = needed // 175 + 2
        (tmp / "rows.jsonl").write_text(rows * copies)
        if args.no_pack:  # long text rows, each truncated to exactly 2048 tokens
            words = " ".join(json.loads(r)["output"] for r in rows.splitlines())[:24000]
            (tmp / "rows.jsonl").write_text("".join(
                json.dumps({"text": words[i % 1000:] + words}) + "\n"
                for i in range(args.steps * global_batch)))
        recipe = recipe_from_dict({
            "model": {"config": MODEL, "tokenizer": str(TOKENIZERS / "tiny-bpe"),
                      "dtype": "bfloat16", "attn_implementation": args.attn,
                      "gradient_checkpointing": args.checkpointing},
            "data": {"sources": [{"path": str(tmp / "rows.jsonl"),
                                  "format": "text" if args.no_pack else "alpaca"}],
                     "max_seq_len": 2048, "packing": not args.no_pack,
                     "completion_only_loss": False},
            "train": {"global_batch_size": global_batch, "micro_batch_size": args.micro,
                      "max_steps": args.steps, "lr": 1e-4, "skip_memory_check": True,
                      "compile": args.compile},
            "zero": {"stage": 2},
            "output": {"dir": str(tmp / "run"), "save_model": False},
        })
        summary = run(recipe)
        lines = [json.loads(x) for x in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in lines if "loss" in m][args.warmup:]
    result = {
        "check": "mfu_dpkit", "gpu": torch.cuda.get_device_name(0),
        "parameters": summary["parameters"], "seq_len": 2048, "micro_batch": args.micro,
        "global_batch": global_batch, "compile": args.compile,
        "gradient_checkpointing": args.checkpointing, "attn": args.attn,
        "attention_used": summary.get("attention"), "packed": not args.no_pack,
        "tokens_per_s": statistics.median(m["tokens_per_s"] for m in steps),
        "mfu": statistics.median(m["mfu"] for m in steps),
        "step_time_s": statistics.median(m["step_time_s"] for m in steps),
        **{k: statistics.median(m[k] for m in steps)
           for k in ("data_s", "forward_backward_s", "optimizer_s")},
        "peak_memory_gib": max(max(m["memory_peak_mb"]) for m in steps) / 1024,
        "final_loss": summary["final_loss"],
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
