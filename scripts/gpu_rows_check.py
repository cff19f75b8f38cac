"""GPU check: dpkit's per-row attention (torch's flash-attention varlen kernel) against what
transformers does for packed sdpa (a dense block-diagonal mask), on CUDA in bf16: loss and
gradients of the same packed batch of real rows, and the forward+backward time of each.
The CPU path (causal sdpa per row) is proven against masked sdpa by tests/unit/test_packing.py;
this is the CUDA path, which only a GPU can run. Prints one JSON line per model.

    python scripts/gpu_rows_check.py [--layers 8] [--micro 8] [--iters 10]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from dpkit.shipped import TOKENIZERS, DATA as SHIPPED_DATA

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WIDE = {"model_type": "llama", "hidden_size": 1024, "intermediate_size": 4096,
        "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 32000,
        "max_position_embeddings": 4096, "tie_word_embeddings": False}


def packed_batch(micro: int, seq_len: int):
    from dpkit import data as D
    from dpkit.model import load_tokenizer
    from dpkit.data.packing import pack
    from dpkit.recipe import DataSection, ModelSection

    tok = load_tokenizer(ModelSection(config={"model_type": "llama"},
                                      tokenizer=str(TOKENIZERS / "tiny-bpe")))
    section = DataSection(sources=[{"path": str(SHIPPED_DATA / "self_instruct_seed.alpaca.jsonl"),
                                    "format": "alpaca"}] * 8, max_seq_len=seq_len)
    rows, _, _ = D.load_datasets(section, tok, seed=0)
    seqs = pack(rows, seq_len, seed=0)[:micro]
    return D.collate(seqs, tok.pad_token_id)


def check(config_kwargs: dict, batch, iters: int, device: str = "cuda") -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import dpkit.attention as A
    from dpkit import data as D
    from dpkit.objectives.sft import loss_sum
    from dpkit.step import to_device

    calls = {"varlen": 0}
    varlen = A._varlen

    def counted(*args, **kwargs):
        calls["varlen"] += 1
        return varlen(*args, **kwargs)

    A._varlen = counted
    cfg = dict(config_kwargs)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    device = torch.device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    on_gpu = to_device(batch, device)
    targets = D.target_tokens(batch)
    results = {}
    for attn in ("sdpa", A.NAME):
        if attn == A.NAME:
            A.register()
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                 attn_implementation="sdpa").to(device)
        if attn != "sdpa":
            model.set_attn_implementation(attn)
        model.train()
        loss = loss_sum(model, on_gpu) / targets
        loss.backward()
        grads = {n: p.grad.float().clone() for n, p in model.named_parameters()}
        for _ in range(2):  # warm-up, then timed forward+backward passes
            loss_sum(model, on_gpu).backward()
        sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            loss_sum(model, on_gpu).backward()
        sync()
        results[attn] = {"loss": float(loss.detach()), "grads": grads,
                         "fwd_bwd_s": (time.perf_counter() - t0) / iters}
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    ref, rows = results["sdpa"], results[A.NAME]
    rel = {n: float((rows["grads"][n] - g).norm() / g.norm().clamp_min(1e-12))
           for n, g in ref["grads"].items()}
    worst = max(rel, key=rel.get)
    loss_rel = abs(rows["loss"] - ref["loss"]) / abs(ref["loss"])
    A._varlen = varlen
    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    return {"check": "gpu_rows", "gpu": gpu,
            "torch": torch.__version__, "layers": config.num_hidden_layers,
            "heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads,
            "batch": list(batch["input_ids"].shape), "rows": int(batch["cu_seq_lens"].numel() - 1),
            "varlen_calls": calls["varlen"], "loss_masked_sdpa": ref["loss"],
            "loss_rows": rows["loss"], "loss_rel_diff": loss_rel,
            "grad_rel_err_max": rel[worst], "grad_rel_err_worst_param": worst,
            "grad_rel_err_median": sorted(rel.values())[len(rel) // 2],
            "fwd_bwd_s_masked_sdpa": ref["fwd_bwd_s"], "fwd_bwd_s_rows": rows["fwd_bwd_s"],
            "speedup": ref["fwd_bwd_s"] / rows["fwd_bwd_s"],
            # bf16 kernels differ in summation order: a few 1e-3 is rounding, 1e-1 is a bug
            "ok": (calls["varlen"] > 0 or device.type != "cuda") and loss_rel < 1e-2
            and rel[worst] < 5e-2}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--micro", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--hidden", type=int, default=WIDE["hidden_size"],
                   help="hidden size (intermediate 4x); smaller for a CPU dry run")
    p.add_argument("--vocab", type=int, default=WIDE["vocab_size"],
                   help="vocabulary (at least the tiny tokenizer's 2048)")
    p.add_argument("--device", default="cuda", help="cpu: a dry run of this script (fp32, "
                   "the per-row sdpa path; small --layers/--seq-len)")
    args = p.parse_args()
    batch = packed_batch(args.micro, args.seq_len)
    ok = True
    for extra in ({}, {"num_key_value_heads": 4}):  # multi-head, then grouped-query attention
        width = {"hidden_size": args.hidden, "intermediate_size": 4 * args.hidden,
                 "vocab_size": args.vocab}
        line = check({**WIDE, **width, "num_hidden_layers": args.layers, **extra}, batch,
                     args.iters, args.device)
        print(json.dumps(line), flush=True)
        ok &= line["ok"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
