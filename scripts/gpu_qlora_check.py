"""GPU check for QLoRA: a tiny QLoRA run of a tiny model on one CUDA GPU, through dpkit's real
training path (4-bit NF4 base via bitsandbytes, LoRA adapters, DeepSpeed ZeRO, the gathered and
verified adapter save, the merge). Prints one JSON line; exit code 0 when every check held.

    python scripts/gpu_qlora_check.py [--stages 2,3] [--steps 12] [--out DIR]

Checks, per ZeRO stage: the base really is 4-bit (Linear4bit layers, packed weights), only the
adapters train (optimizer state for them only), the loss falls, the saved adapter passed dpkit's
own check (full shapes from the base config and r, lora_B non-zero), reloads with
PeftModel.from_pretrained onto the 4-bit base and reproduces the logits the engine computed at
the end of training, and the merged model exists. Needs: bitsandbytes, deepspeed, peft,
transformers, datasets, pydantic (see docs/lora.md for carrying them to a GPU machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from dpkit.shipped import TOKENIZERS, DATA as SHIPPED_DATA

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TINY = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 256,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 2048, "max_position_embeddings": 512}
PROBE_TOL = 2e-2  # bf16 compute on a 4-bit base: kernels differ between engine and reload


def recipe_for(stage: int, steps: int, out: Path) -> dict:
    return {
        "model": {"config": dict(TINY), "tokenizer": str(TOKENIZERS / "tiny-bpe"),
                  "dtype": "bfloat16"},
        "data": {"sources": [{"path": str(SHIPPED_DATA / "self_instruct_seed.alpaca.jsonl"),
                              "format": "alpaca"}], "max_seq_len": 256},
        "train": {"global_batch_size": 8, "micro_batch_size": 4, "max_steps": steps, "lr": 1e-2,
                  "lr_schedule": "constant"},
        "zero": {"stage": stage},
        "peft": {"method": "qlora", "r": 16, "alpha": 32, "dropout": 0.0, "merge": True},
        "output": {"dir": str(out / f"zero{stage}"), "overwrite": True},
    }


def check_stage(stage: int, steps: int, out: Path) -> dict:
    import torch

    from dpkit import lora
    from dpkit.model import DTYPES
    from dpkit.recipe import recipe_from_dict
    from dpkit.run import run

    recipe = recipe_from_dict(recipe_for(stage, steps, out))
    seen: dict = {}
    save = lora.save_adapter
    probe = (torch.arange(2 * 16).reshape(2, 16) * 37 + 5) % TINY["vocab_size"]

    def inspecting_save(engine, tokenizer, run_dir, env, recipe, trained=True):
        model = engine.module
        seen["linear4bit"] = sum(type(m).__name__ == "Linear4bit" for m in model.modules())
        seen["params4bit"] = sum(type(p).__name__ == "Params4bit" for p in model.parameters())
        inner = getattr(engine.optimizer, "optimizer", engine.optimizer)  # under ZeRO's wrapper
        seen["optimizer_state_numel"] = sum(s["exp_avg"].numel() for s in inner.state.values()
                                            if "exp_avg" in s)
        seen["trainable"], seen["total"] = lora.count_parameters(model)
        engine.eval()
        with torch.no_grad():
            logits = engine(input_ids=probe.to(env.device), use_cache=False).logits
            seen["logits"] = logits.float().cpu()
        engine.train()
        return save(engine, tokenizer, run_dir, env, recipe, trained)

    lora.save_adapter = inspecting_save
    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    try:
        summary = run(recipe)
    finally:
        lora.save_adapter = save
    run_dir = Path(recipe.output.dir)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(line)["loss"] for line in lines if '"loss"' in line]

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    kwargs = {**lora.quantization_kwargs(recipe, 0), "device_map": {"": 0}}
    base = AutoModelForCausalLM.from_pretrained(run_dir / "base", dtype=DTYPES[recipe.model.dtype],
                                                **kwargs)
    reloaded = PeftModel.from_pretrained(base, run_dir / "model").eval()
    with torch.no_grad():
        logits = reloaded(input_ids=probe.cuda()).logits.float().cpu()
    diff = float((logits - seen.pop("logits")).abs().max())
    result = {
        "stage": stage, "losses": [round(x, 4) for x in losses], **seen,
        "adapter_saved": (run_dir / "model" / lora.ADAPTER_WEIGHTS).is_file(),
        "adapter_problems": lora.verify_adapter(run_dir / "model", lora.load_model_config(
            recipe.model), recipe.peft),
        "merged_saved": (run_dir / "merged" / "config.json").is_file(),
        "reload_max_abs_logit_diff": diff, "peak_gpu_mib": torch.cuda.max_memory_allocated() >> 20,
        "wall_s": round(time.time() - t0, 1), "final_loss": summary["final_loss"],
    }
    result["ok"] = bool(result["linear4bit"] > 0 and result["params4bit"] > 0
                        # Adam moments for the adapters only (+ ZeRO's alignment padding)
                        and 0 < result["trainable"] <= result["optimizer_state_numel"]
                        <= result["trainable"] + 1024
                        and result["trainable"] < result["total"] and losses[-1] < losses[0]
                        and result["adapter_saved"] and not result["adapter_problems"]
                        and result["merged_saved"] and diff <= PROBE_TOL)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default="2,3", help="ZeRO stages to run, comma-separated")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--out", default=None, help="run directories (default: a temp dir)")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    report: dict = {"check": "gpu_qlora", "ok": False, "python": platform.python_version()}
    try:
        import torch

        report["torch"] = torch.__version__
        if not torch.cuda.is_available():
            report["error"] = "no CUDA device: QLoRA (bitsandbytes 4-bit) needs one"
            print(json.dumps(report))
            return 1
        report["gpu"] = torch.cuda.get_device_name(0)
        import bitsandbytes
        import deepspeed
        import peft
        import transformers

        report.update(bitsandbytes=bitsandbytes.__version__, deepspeed=deepspeed.__version__,
                      peft=peft.__version__, transformers=transformers.__version__)
        out = Path(args.out or tempfile.mkdtemp(prefix="dpkit-qlora-"))
        report["stages"] = []
        for stage in (int(s) for s in args.stages.split(",")):
            try:
                report["stages"].append(check_stage(stage, args.steps, out))
            except Exception as e:  # one stage failing still reports the others
                report["stages"].append({"stage": stage, "ok": False,
                                         "error": f"{type(e).__name__}: {e}"[:2000],
                                         "traceback": traceback.format_exc()[-3000:]})
        report["ok"] = all(s["ok"] for s in report["stages"])
    except Exception as e:  # report, don't crash: the caller reads one JSON line
        report["error"] = f"{type(e).__name__}: {e}"[:2000]
        report["traceback"] = traceback.format_exc()[-4000:]
    print(json.dumps(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
