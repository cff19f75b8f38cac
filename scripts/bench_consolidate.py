"""Peak memory of turning a ZeRO-3 checkpoint into a Hugging Face model, three ways, at two model
sizes, in one invocation:

    python scripts/bench_consolidate.py [--sizes 125m,500m] [--work /tmp/bench-consolidate]

For each size (llama-like, random weights saved once, fp32, untied embeddings) `dpkit train`
makes a ZeRO-3 + AdamW checkpoint on 2 CPU ranks (one step), then separate child processes
consolidate it:

- `in-memory`: dpkit export as it was before dpkit/consolidate.py — DeepSpeed's zero_to_fp32
  state dict, all in memory, loaded into the model, written by save_pretrained (5GB shards);
- `zero_to_fp32 lazy`: DeepSpeed's own converter, `convert_zero_checkpoint_to_fp32_state_dict(
  ..., safe_serialization=True)`, which reads lazily (`lazy_mode=True`) and materialises one
  output shard at a time (5GB shards, and 500MB);
- `streamed`: `dpkit export` now (one tensor at a time; 5GB shards, and 500MB).

Memory is the process's anonymous resident memory, RssAnon from /proc/self/status, sampled every
2 ms by a thread: the heap and anonymous mappings, i.e. what the consolidation itself holds. Not
VmHWM: every method reads the checkpoint's partitions memory-mapped, and those file-backed pages
count in VmRSS/VmHWM although the kernel can drop them at any time (they are reported too). The
baseline is RssAnon after the imports, before the call; "added" is peak minus baseline. The
outputs are compared tensor by tensor (streamed and zero_to_fp32 against in-memory): bitwise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SIZES = {  # llama-like; untied embeddings (zero_to_fp32's safetensors writer refuses tied ones)
    "125m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=12),
    "500m": dict(hidden_size=1280, intermediate_size=3456, num_hidden_layers=22,
                 num_attention_heads=20, num_key_value_heads=20),
}
METHODS = [("in-memory", "5GB"), ("zero_to_fp32-lazy", "5GB"), ("zero_to_fp32-lazy", "500MB"),
           ("streamed", "5GB"), ("streamed", "500MB")]


def status(field: str) -> int:
    """A /proc/self/status field, bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


class AnonPeak:
    """Samples RssAnon every `interval` s in a thread (while the work runs)."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self._stop = interval, status("RssAnon"), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, status("RssAnon"))
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, status("RssAnon"))


# ------------------------------------------------------------------------------ the methods
def in_memory_export(ckpt: Path, out: Path, max_shard_size: str) -> None:
    """dpkit/export.py's export before dpkit/consolidate.py (git 4c4adcf), ZeRO-3 branch."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(ckpt / "hf")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="ds")
    model.load_state_dict(state, strict=False, assign=True)
    model = model.to(torch.float32)
    model.generation_config = GenerationConfig.from_model_config(config)
    model.save_pretrained(out, max_shard_size=max_shard_size)


def zero_to_fp32_lazy(ckpt: Path, out: Path, max_shard_size: str) -> None:
    from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_fp32_state_dict

    convert_zero_checkpoint_to_fp32_state_dict(str(ckpt), str(out), tag="ds",
                                               max_shard_size=max_shard_size,
                                               safe_serialization=True)


def streamed(ckpt: Path, out: Path, max_shard_size: str) -> None:
    from dpkit.export import export

    export(ckpt, out, max_shard_size=max_shard_size)


def measure(method: str, ckpt: Path, out: Path, max_shard_size: str) -> dict:
    """In this (child) process: the imports first, then the method under the sampler."""
    import deepspeed  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import dpkit.export  # noqa: F401

    work = {"in-memory": in_memory_export, "zero_to_fp32-lazy": zero_to_fp32_lazy,
            "streamed": streamed}[method]
    base = status("RssAnon")
    start = time.perf_counter()
    with AnonPeak() as peak:
        work(ckpt, out, max_shard_size)
    return {"method": method, "shards": max_shard_size, "baseline": base, "peak_anon": peak.peak,
            "vm_hwm": status("VmHWM"), "wall_s": time.perf_counter() - start}


# ------------------------------------------------------------------------------ the driver
def make_base(size: str, work: Path) -> Path:
    """The size's model with random weights, saved once. Loaded by name, because under ZeRO-3 a
    model directory is loaded partitioned (zero.Init), while an inline config builds the whole
    model on every rank first."""
    base = work / f"base-{size}"
    if not (base / "config.json").is_file():
        subprocess.run([sys.executable, "-c", (
            "import sys, torch; from transformers import LlamaConfig, LlamaForCausalLM; "
            "torch.manual_seed(0); LlamaForCausalLM(LlamaConfig(**eval(sys.argv[2])))"
            ".save_pretrained(sys.argv[1])"), str(base),
            repr({"vocab_size": 32000, "max_position_embeddings": 512,
                  "tie_word_embeddings": False, **SIZES[size]})], check=True)
    return base


def lean_template(work: Path) -> Path:
    """dpkit's ZeRO-3 template with at most 1e7 parameters gathered at a time (its own lets the
    whole model be gathered) and the optimizer stepping sub-groups of 1e7 (else AdamW's
    temporaries are the size of a rank's whole partition): with them, the 500M training step
    fits 2 ranks in this machine's memory (the partitions are saved as 1e7-element groups,
    which zero_to_fp32 reads as it reads one group)."""
    from dpkit.shipped import DS_CONFIGS

    config = json.loads((DS_CONFIGS / "zero3.json").read_text())
    config["zero_optimization"].update(stage3_max_live_parameters=10_000_000,
                                       stage3_max_reuse_distance=10_000_000,
                                       sub_group_size=10_000_000)
    path = work / "zero3-lean.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def make_checkpoint(size: str, work: Path) -> Path:
    from dpkit.checkpoint import latest_complete
    from dpkit.shipped import DATA, TOKENIZERS

    run = work / f"run-{size}"
    if (found := latest_complete(run)) is not None:
        return found
    import yaml

    recipe = {"model": {"name_or_path": str(make_base(size, work)),
                        "tokenizer": str(TOKENIZERS / "tiny-bpe"),
                        "dtype": "float32"},
              "data": {"sources": [{"path": str(DATA / "self_instruct_seed.messages.jsonl"),
                                    "format": "messages"}], "max_seq_len": 32},
              "train": {"global_batch_size": 2, "micro_batch_size": 1, "max_steps": 1},
              "zero": {"stage": 3, "template": str(lean_template(work))},
              "output": {"dir": str(run), "save_steps": 1, "save_model": False,
                         "overwrite": True},
              "eval": {"num_prompts": 0}}
    path = work / f"recipe-{size}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    subprocess.run([sys.executable, "-m", "dpkit.cli", "train", str(path),
                    "--nproc-per-node", "2"], env=env, check=True, cwd=ROOT)
    return latest_complete(run)


def same_tensors(a: Path, b: Path) -> bool:
    """Every tensor of export a equals b's, bitwise (read one at a time)."""
    import torch
    from safetensors import safe_open

    def where(d: Path) -> dict[str, Path]:
        index = d / "model.safetensors.index.json"
        if index.is_file():
            return {k: d / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        with safe_open(d / "model.safetensors", "pt") as f:
            return {k: d / "model.safetensors" for k in f.keys()}

    wa, wb = where(a), where(b)
    if wa.keys() != wb.keys():
        return False
    for k in wa:
        with safe_open(wa[k], "pt") as fa, safe_open(wb[k], "pt") as fb:
            if not torch.equal(fa.get_tensor(k), fb.get_tensor(k)):
                return False
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="125m,500m")
    ap.add_argument("--work", default="/tmp/bench-consolidate")
    ap.add_argument("--measure", nargs=4, metavar=("METHOD", "CKPT", "OUT", "SHARDS"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        method, ckpt, out, shards = args.measure
        print(json.dumps(measure(method, Path(ckpt), Path(out), shards)))
        return 0
    import shutil

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    rows = []
    for size in args.sizes.split(","):
        ckpt = make_checkpoint(size, work)
        from safetensors import safe_open  # noqa: F401

        params = None
        outs = {}
        for method, shards in METHODS:
            out = work / f"out-{size}-{method}-{shards}"
            shutil.rmtree(out, ignore_errors=True)
            proc = subprocess.run([sys.executable, __file__, "--measure", method, str(ckpt),
                                   str(out), shards], env=env, capture_output=True, text=True,
                                  cwd=ROOT)
            if proc.returncode != 0:
                print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                raise SystemExit(f"{method} failed")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            outs[(method, shards)] = out
            if params is None:
                params = sum(os.path.getsize(f) for f in out.glob("*.safetensors")) // 4
            rows.append({"size": size, "params": params, **result})
            print(json.dumps(rows[-1]), flush=True)
        reference = outs[("in-memory", "5GB")]
        for key, out in outs.items():
            if key != ("in-memory", "5GB"):
                assert same_tensors(out, reference), (size, key)
        for out in outs.values():
            shutil.rmtree(out, ignore_errors=True)
        print(f"{size}: every output equals the in-memory export's tensors, bitwise", flush=True)

    mib = 1 << 20
    print("\n| model | method | shards | peak RssAnon | added over imports | vs in-memory "
          "| VmHWM (incl. mapped files) | wall |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ref = next(x for x in rows if x["size"] == r["size"] and x["method"] == "in-memory")
        added, ref_added = r["peak_anon"] - r["baseline"], ref["peak_anon"] - ref["baseline"]
        print(f"| {r['size']} ({r['params'] / 1e6:.0f}M) | {r['method']} | {r['shards']} | "
              f"{r['peak_anon'] / mib:,.0f} MiB | {added / mib:,.0f} MiB | "
              f"{added / ref_added:.2f}× | {r['vm_hwm'] / mib:,.0f} MiB | {r['wall_s']:.1f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
