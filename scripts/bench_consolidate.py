"""Peak memory of writing a Hugging Face model from a ZeRO checkpoint (export) and from a live
ZeRO run (the end-of-run save), old ways against dpkit's streamed one, at two model sizes:

    python scripts/bench_consolidate.py [--sizes 125m,500m] [--parts export3,export2,final3,final2]
        [--work /tmp/bench-consolidate]

Export of a ZeRO-3 checkpoint (`export3`):

For each size (llama-like, random weights saved once, fp32, untied embeddings) `dpkit train`
makes a ZeRO-3 + AdamW checkpoint on 2 CPU ranks (one step), then separate child processes
consolidate it:

- `in-memory`: dpkit export as it was before dpkit/consolidate.py — DeepSpeed's zero_to_fp32
  state dict, all in memory, loaded into the model, written by save_pretrained (5GB shards);
- `zero_to_fp32 lazy`: DeepSpeed's own converter, `convert_zero_checkpoint_to_fp32_state_dict(
  ..., safe_serialization=True)`, which reads lazily (`lazy_mode=True`) and materialises one
  output shard at a time (5GB shards, and 500MB);
- `streamed`: `dpkit export` now (one tensor at a time; 5GB shards, and 500MB).

Export of a ZeRO-2 checkpoint (`export2`; ZeRO-1 has the same files): `in-memory`, `zero_to_fp32
lazy` (its lazy mode is ZeRO-3's only: for ZeRO-2 it concatenates the partitions in memory),
`ds-merge-streamed` (dpkit export before zero2_weights: DeepSpeed's in-memory merge, then written
one tensor at a time) and `streamed` (now: each parameter copied out of the memory-mapped
partitions when due).

The end-of-run save (`final3`, `final2`): 2 CPU ranks load the model into a ZeRO-3 (ZeRO-2)
engine with its AdamW (dpkit's Run.setup, no step), then rank 0 is measured while both save:
`old` is dpkit/engine.py's save_model before (DeepSpeed's `_zero3_consolidated_16bit_state_dict`:
the whole model on rank 0; under ZeRO-2 `save_pretrained` of the module's own tensors), `streamed`
is dpkit's now (ZeRO-3: one parameter gathered at a time; ZeRO-2: the module's tensors written
one at a time, where safetensors' save_file under save_pretrained holds a copy of the shard).

Memory is the process's anonymous resident memory, RssAnon from /proc/self/status, sampled every
2 ms by a thread: the heap and anonymous mappings, i.e. what the consolidation itself holds. Not
VmHWM: every method reads the checkpoint's partitions memory-mapped, and those file-backed pages
count in VmRSS/VmHWM although the kernel can drop them at any time (they are reported too). The
baseline is RssAnon after the imports, before the call; "added" is peak minus baseline. The
outputs are compared tensor by tensor (streamed and zero_to_fp32 against in-memory): bitwise;
the end-of-run saves' files byte for byte.
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
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4),  # a quick check of the script
    "125m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=12),
    "500m": dict(hidden_size=1280, intermediate_size=3456, num_hidden_layers=22,
                 num_attention_heads=20, num_key_value_heads=20),
}
METHODS = {3: [("in-memory", "5GB"), ("zero_to_fp32-lazy", "5GB"), ("zero_to_fp32-lazy", "500MB"),
               ("streamed", "5GB"), ("streamed", "500MB")],
           2: [("in-memory", "5GB"), ("zero_to_fp32-lazy", "5GB"), ("ds-merge-streamed", "5GB"),
               ("streamed", "5GB")]}


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


def ds_merge_streamed(ckpt: Path, out: Path, max_shard_size: str) -> None:
    """dpkit export of a ZeRO 1/2 checkpoint before zero2_weights (git a1c1088): DeepSpeed's
    zero_to_fp32 merge (lazy_mode does not apply to ZeRO 1/2), written one tensor at a time."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from dpkit.consolidate import save_model

    config = AutoConfig.from_pretrained(ckpt / "hf")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig.from_model_config(config)
    out.mkdir(parents=True)
    weights = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="ds", lazy_mode=True)
    save_model(model, weights, out, torch.float32, max_shard_size)


def old_final_save(engine, out: Path, env, layout) -> None:
    """dpkit/engine.py's save_model before streaming (git a1c1088), without the tokenizer."""
    state = (engine._zero3_consolidated_16bit_state_dict() if layout.partitions_parameters
             else None)
    if env.is_main:
        if state is None:
            state = engine.module.state_dict()
        engine.module.save_pretrained(out, state_dict=state)


def final_save(method: str, recipe: Path, out: Path) -> None:
    """On each of the ranks (torchrun): the run's engine built, then its end-of-run save measured;
    rank 0 prints its numbers."""
    import torch.distributed as dist

    from dpkit.engine import save_model
    from dpkit.recipe import load_recipe
    from dpkit.run import Run

    run = Run(load_recipe(recipe)).setup()
    dist.barrier()
    base = status("RssAnon")
    start = time.perf_counter()
    with AnonPeak() as peak:
        if method == "old":
            old_final_save(run.engine, out, run.env, run.layout)
        else:
            save_model(run.engine, run.tokenizer, out, run.env, run.layout, 600)
        dist.barrier()
    if run.env.is_main:
        print(json.dumps({"method": method, "shards": "50GB", "baseline": base,
                          "peak_anon": peak.peak, "vm_hwm": status("VmHWM"),
                          "wall_s": time.perf_counter() - start}), flush=True)
    dist.destroy_process_group()


def measure(method: str, ckpt: Path, out: Path, max_shard_size: str) -> dict:
    """In this (child) process: the imports first, then the method under the sampler."""
    import deepspeed  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import dpkit.export  # noqa: F401

    work = {"in-memory": in_memory_export, "zero_to_fp32-lazy": zero_to_fp32_lazy,
            "streamed": streamed, "ds-merge-streamed": ds_merge_streamed}[method]
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


def lean_template(work: Path, stage: int = 3) -> Path:
    """dpkit's ZeRO-3 template with at most 1e7 parameters gathered at a time (its own lets the
    whole model be gathered) and the optimizer stepping sub-groups of 1e7 (else AdamW's
    temporaries are the size of a rank's whole partition): with them, the 500M training step
    fits 2 ranks in this machine's memory (the partitions are saved as 1e7-element groups,
    which zero_to_fp32 reads as it reads one group)."""
    from dpkit.shipped import DS_CONFIGS

    config = json.loads((DS_CONFIGS / f"zero{stage}.json").read_text())
    if stage == 3:
        config["zero_optimization"].update(stage3_max_live_parameters=10_000_000,
                                           stage3_max_reuse_distance=10_000_000,
                                           sub_group_size=10_000_000)
    path = work / f"zero{stage}-lean.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def write_recipe(size: str, work: Path, stage: int, run: Path, steps: int) -> Path:
    import yaml

    from dpkit.shipped import DATA, TOKENIZERS

    recipe = {"model": {"name_or_path": str(make_base(size, work)),
                        "tokenizer": str(TOKENIZERS / "tiny-bpe"),
                        "dtype": "float32"},
              "data": {"sources": [{"path": str(DATA / "self_instruct_seed.messages.jsonl"),
                                    "format": "messages"}], "max_seq_len": 32},
              "train": {"global_batch_size": 2, "micro_batch_size": 1, "max_steps": steps},
              "zero": {"stage": stage, "template": str(lean_template(work, stage))},
              "output": {"dir": str(run), "save_steps": 1, "save_model": False,
                         "overwrite": True},
              "eval": {"num_prompts": 0}}
    path = work / f"recipe-{run.name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}


def make_checkpoint(size: str, work: Path, stage: int) -> Path:
    from dpkit.checkpoint import latest_complete

    run = work / f"run-{size}-zero{stage}"
    if (found := latest_complete(run)) is not None:
        return found
    path = write_recipe(size, work, stage, run, 1)
    subprocess.run([sys.executable, "-m", "dpkit.cli", "train", str(path),
                    "--nproc-per-node", "2"], env=ENV, check=True, cwd=ROOT)
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


def same_files(a: Path, b: Path) -> bool:
    """The two saves wrote the same weight files, byte for byte."""
    names = sorted(p.name for p in a.iterdir() if p.name.startswith("model"))
    return names == sorted(p.name for p in b.iterdir() if p.name.startswith("model")) and \
        all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


def run_export(size: str, stage: int, work: Path) -> list[dict]:
    """Each export method in its own process on the stage's checkpoint; outputs compared."""
    import shutil

    ckpt = make_checkpoint(size, work, stage)
    rows, outs, params = [], {}, None
    for method, shards in METHODS[stage]:
        out = work / f"out-{size}-zero{stage}-{method}-{shards}"
        shutil.rmtree(out, ignore_errors=True)
        proc = subprocess.run([sys.executable, __file__, "--measure", method, str(ckpt),
                               str(out), shards], env=ENV, capture_output=True, text=True,
                              cwd=ROOT)
        if proc.returncode != 0:
            print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"{method} failed")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        outs[(method, shards)] = out
        if params is None:
            params = sum(os.path.getsize(f) for f in out.glob("*.safetensors")) // 4
        rows.append({"size": size, "part": f"export, ZeRO-{stage}", "params": params, **result})
        print(json.dumps(rows[-1]), flush=True)
    reference = outs[("in-memory", "5GB")]
    for key, out in outs.items():
        if key != ("in-memory", "5GB"):
            assert same_tensors(out, reference), (size, stage, key)
    for out in outs.values():
        shutil.rmtree(out, ignore_errors=True)
    print(f"{size} ZeRO-{stage} export: every output equals the in-memory export's tensors, "
          "bitwise", flush=True)
    return rows


def run_final(size: str, stage: int, work: Path) -> list[dict]:
    """The end-of-run save, old and streamed, each in its own 2-rank launch; files compared."""
    import shutil

    rows, outs = [], {}
    for method in ("old", "streamed"):
        run = work / f"final-{size}-zero{stage}-{method}"
        shutil.rmtree(run, ignore_errors=True)
        recipe = write_recipe(size, work, stage, run, 1)
        out = work / f"final-out-{size}-zero{stage}-{method}"
        shutil.rmtree(out, ignore_errors=True)
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               "--nproc_per_node", "2", __file__, "--final-save", method,
                               str(recipe), str(out)], env=ENV, capture_output=True, text=True,
                              cwd=ROOT)
        if proc.returncode != 0:
            print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"final save {method} failed")
        line = next(x for x in reversed(proc.stdout.splitlines()) if x.startswith("{"))
        params = sum(os.path.getsize(f) for f in out.glob("*.safetensors")) // 4
        rows.append({"size": size, "part": f"end-of-run save, ZeRO-{stage}", "params": params,
                     **json.loads(line)})
        print(json.dumps(rows[-1]), flush=True)
        outs[method] = out
        shutil.rmtree(run, ignore_errors=True)
    assert same_files(outs["old"], outs["streamed"]), (size, stage)
    for out in outs.values():
        shutil.rmtree(out, ignore_errors=True)
    print(f"{size} ZeRO-{stage} end-of-run save: the same files, byte for byte", flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="125m,500m")
    ap.add_argument("--parts", default="export3,export2,final3,final2")
    ap.add_argument("--work", default="/tmp/bench-consolidate")
    ap.add_argument("--measure", nargs=4, metavar=("METHOD", "CKPT", "OUT", "SHARDS"),
                    help=argparse.SUPPRESS)
    ap.add_argument("--final-save", nargs=3, metavar=("METHOD", "RECIPE", "OUT"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        method, ckpt, out, shards = args.measure
        print(json.dumps(measure(method, Path(ckpt), Path(out), shards)))
        return 0
    if args.final_save:
        method, recipe, out = args.final_save
        final_save(method, Path(recipe), Path(out))
        return 0

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in args.sizes.split(","):
        for part in args.parts.split(","):
            stage = int(part[-1])
            rows += (run_export if part.startswith("export") else run_final)(size, stage, work)

    mib = 1 << 20
    print("\n| model | what | method | shards | peak RssAnon | added over baseline | vs first "
          "| VmHWM (incl. mapped files) | wall |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ref = next(x for x in rows if x["size"] == r["size"] and x["part"] == r["part"])
        added, ref_added = r["peak_anon"] - r["baseline"], ref["peak_anon"] - ref["baseline"]
        print(f"| {r['size']} ({r['params'] / 1e6:.0f}M) | {r['part']} | {r['method']} | "
              f"{r['shards']} | {r['peak_anon'] / mib:,.0f} MiB | {added / mib:,.0f} MiB | "
              f"{added / max(ref_added, 1):.2f}× | {r['vm_hwm'] / mib:,.0f} MiB | "
              f"{r['wall_s']:.1f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
