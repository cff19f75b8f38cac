"""GPU check: the longest sequence one GPU trains (one full step: forward, backward, optimizer),
for a ~0.5B and an 8B model, bf16, ZeRO-3, gradient checkpointing, with the full logits and with
dpkit's tiled loss head. One JSON line per (model, loss) and a summary line; with --out, the lines
also go to DIR/<date>-long-seq.jsonl. Started by scripts/gpu_check.sh.

    python scripts/gpu_long_seq.py [--models qwen2.5-0.5b,llama-3.1-8b] [--out docs/gpu]
    python scripts/gpu_long_seq.py --smoke      # tiny model, a few lengths: any CPU machine

Models are built from their shipped config.json (dpkit/resources/hub_configs, random weights:
no download). The ~0.5B model is fully fine-tuned; the 8B one trains LoRA adapters (r=16, all
linear layers): its full optimizer state (~128 GB with fp32 master weights and Adam) would leave
one GPU nothing for activations, and what the sequence length changes is the activations and the
logits either way. Each length is probed in the same engine; an out-of-memory probe frees its
tensors and the search continues by bisection (multiples of --step tokens), starting from what
`dpkit plan`'s memory model predicts. Published reference (ALST, arXiv 2506.13996): Llama-8B,
500K tokens on one H100 80GB with all ALST features (sequence tiling, activation offload).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODELS = {"qwen2.5-0.5b": ("Qwen/Qwen2.5-0.5B", None), "llama-3.1-8b": ("meta-llama/Llama-3.1-8B", 16)}
SMOKE = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "vocab_size": 2048, "max_position_embeddings": 4096}


def recipe_dict(config: dict, lora: int | None, loss: str, seq: int, out: Path) -> dict:
    from dpkit.shipped import DATA

    r = {"model": {"config": config, "tokenizer": "dpkit:tokenizers/tiny-bpe",
                   "dtype": "bfloat16", "gradient_checkpointing": True},
         "data": {"sources": [{"path": str(DATA / "self_instruct_seed.alpaca.jsonl")}],
                  "max_seq_len": seq},
         "train": {"global_batch_size": 1, "micro_batch_size": 1, "max_steps": 1,
                   "lr": 1e-9},  # ~no change between probes: variants see the same weights
         "zero": {"stage": 3}, "compute": {"loss": loss},
         "output": {"dir": str(out), "save_model": False}}
    if lora:
        r["peft"] = {"r": lora, "alpha": 2 * lora, "dropout": 0.0}
    return r


class Prober:
    """One engine; `step(n)` trains one step on n random tokens, False on out-of-memory."""

    def __init__(self, recipe, env):
        from dpkit import lora as L
        from dpkit.engine import build_engine
        from dpkit.model import build_model, load_model_config
        from dpkit.objectives.head import LossHead
        from dpkit.zero import resolve_ds_config

        self.env, self.config = env, load_model_config(recipe.model)
        ds = resolve_ds_config(recipe, env.world_size, self.config.hidden_size,
                               on_cpu=env.backend == "gloo")
        if recipe.peft is not None:
            from dpkit.model import load_tokenizer

            model = L.build_peft_model(recipe, load_tokenizer(recipe.model), ds, None, env)
        else:
            model = build_model(recipe.model, 0, 3, ds)
        self.head, self.how = LossHead.for_run(recipe, model, self.config)
        self.engine, _, _ = build_engine(model, recipe, ds, 10, env, lambda s: None)

    def step(self, n: int) -> tuple[bool, float, int]:
        import torch

        dev = self.env.device
        # the same tokens for a length in every variant (full and tiled loss compare)
        g = torch.Generator().manual_seed(n)
        ids = torch.randint(0, self.config.vocab_size, (1, n), generator=g).to(dev)
        labels = torch.cat([ids[:, 1:], torch.full((1, 1), -100, device=dev)], dim=1)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            loss = self.head.loss_sum(self.engine, {"input_ids": ids}, labels) / n
            self.engine.backward(loss)
            self.engine.step()
            ok, value = True, float(loss)
        except torch.OutOfMemoryError:
            ok, value, loss = False, float("nan"), None
        del loss  # free the graph before the next probe
        self.engine.zero_grad()
        peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else 0
        return ok, value, peak


def search(prober: Prober, start: int, step: int, limit: int) -> tuple[int, list[dict]]:
    """Longest multiple of `step` in [step, limit] that trains, by doubling then bisection."""
    probes, lo, hi = [], 0, None
    n = max(step, start // step * step)
    while hi is None or hi - lo > step:
        if n > limit:
            hi = limit + step if hi is None else hi
            n = (lo + hi) // 2 // step * step
            if n <= lo:
                break
        ok, loss, peak = prober.step(n)
        probes.append({"seq": n, "ok": ok, "loss": loss, "peak_gib": peak / 2**30})
        if ok:
            lo = n
        else:
            hi = n
        n = n * 2 if hi is None else max(step, (lo + hi) // 2 // step * step)
        if hi is not None and n <= lo:
            break
    return lo, probes


def predicted(recipe_obj, gpu_bytes: int) -> int:
    from dpkit.plan.long import max_seq_len, recipe_setup
    from dpkit.plan.recommend import Hardware, recipe_shape

    hw = Hardware(1, 1, gpu_bytes)
    shape = recipe_shape(recipe_obj)
    return max_seq_len(shape, recipe_setup(recipe_obj, hw, shape), hw)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--step", type=int, default=4096, help="lengths are multiples of this")
    p.add_argument("--limit", type=int, default=1 << 20)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU, a few lengths")
    args = p.parse_args()
    import tempfile

    import torch

    from dpkit import distributed
    from dpkit.model import shipped_config_dir
    from dpkit.recipe import recipe_from_dict

    env = distributed.setup(600)
    if args.smoke:
        cases, args.step, args.limit = {"tiny": (SMOKE, None)}, 256, 512
    else:
        cases = {k: (json.loads((shipped_config_dir(v[0]) / "config.json").read_text()), v[1])
                 for k, v in MODELS.items() if k in args.models.split(",")}
    gpu = torch.cuda.get_device_properties(0).total_memory if env.device.type == "cuda" else 0
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (config, lora) in cases.items():
            for loss in ("full", "tiled"):
                r = recipe_from_dict(recipe_dict(config, lora, loss, args.limit, Path(tmp) / name))
                if args.smoke:  # short rows: small tiles, so that the tiled head really tiles
                    r.compute.loss_tile_tokens = 128
                t0 = time.time()
                prober = Prober(r, env)
                start = predicted(r, gpu) if gpu else args.step
                longest, probes = search(prober, start, args.step, args.limit)
                lines.append({"model": name, "loss": loss, "head": prober.how,
                              "longest_seq": longest, "planned_seq": start if gpu else None,
                              "lora_rank": lora, "probes": probes,
                              "seconds": round(time.time() - t0, 1),
                              "device": torch.cuda.get_device_name(0) if gpu else "cpu"})
                print(json.dumps(lines[-1]), flush=True)
                prober.engine.destroy()
                del prober
    by = {(x["model"], x["loss"]): x for x in lines}
    summary = {"long_seq": {m: {"full": by[(m, "full")]["longest_seq"],
                                "tiled": by[(m, "tiled")]["longest_seq"]} for m in cases},
               "same_losses": all(abs(a["loss"] - b["loss"]) <= 1e-2 * abs(a["loss"])
                                  for m in cases for a, b in zip(by[(m, "full")]["probes"],
                                                                  by[(m, "tiled")]["probes"])
                                  if a["ok"] and b["ok"] and a["seq"] == b["seq"])}
    print(json.dumps(summary), flush=True)
    if args.out and env.is_main:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"{datetime.date.today()}-long-seq.jsonl"
        path.write_text("".join(json.dumps(x) + "\n" for x in [*lines, summary]))
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
