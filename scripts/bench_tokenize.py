"""Rows per second of dpkit's tokenization vs a plain `datasets.map` with the same fast tokenizer
and the same number of processes, on the same generated rows, in one invocation.

    python scripts/bench_tokenize.py [--rows 200000] [--num-proc 2] [--reps 3] [--format text]

The baseline is what people write by hand: `ds.map(lambda b: tok(b["text"]), batched=True,
num_proc=N)`, written to Arrow (for `--format alpaca`: the same prompt + response text dpkit
renders, tokenized whole). dpkit does more per row (rendering, offsets for masking, labels,
eos, overflow status) through `dpkit.data.tokenize.tokenize_dataset`. Both write Arrow files to a
temporary directory; the best of `--reps` runs of each is compared (ratio = dpkit / baseline).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WORDS = ["the", "model", "learns", "to", "add", "numbers", "and", "answer", "questions", "about", "the", "data", "it", "reads", "while", "every", "rank", "waits", "for", "nothing"]


def make_rows(path: Path, n: int, fmt: str) -> None:
    import random

    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(n):
            a = " ".join(rng.choices(WORDS, k=rng.randint(8, 40)))
            b = " ".join(rng.choices(WORDS, k=rng.randint(8, 40)))
            row = ({"text": f"{a} {i}. {b}"} if fmt == "text" else
                   {"instruction": a, "input": "", "output": f"{b} {i}"})
            f.write(json.dumps(row) + "\n")


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children (datasets' map workers): a measure that
    holds on a shared machine, where wall time depends on the neighbours."""
    import resource

    me, kids = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--num-proc", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--format", choices=["text", "alpaca"], default="text")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import datasets

    from dpkit.data.formats import ALPACA_NO_INPUT
    from dpkit.data.tokenize import tokenize_dataset
    from dpkit.model import load_tokenizer
    from dpkit.recipe import DataSection, ModelSection
    from dpkit.shipped import TOKENIZERS

    datasets.disable_progress_bars()
    tok = load_tokenizer(ModelSection(config={"model_type": "llama"},
                                      tokenizer=str(TOKENIZERS / "tiny-bpe")))
    tmp = Path(tempfile.mkdtemp(prefix="bench-tokenize-"))
    data = tmp / "rows.jsonl"
    make_rows(data, args.rows, args.format)
    ds = datasets.load_dataset("json", data_files=str(data), split="train",
                               cache_dir=str(tmp / "hf"))
    section = DataSection(sources=[{"path": str(data), "format": args.format}], max_seq_len=4096)
    source = section.sources[0]

    def texts(b):  # the same text dpkit tokenizes, without the labels dpkit adds
        if args.format == "text":
            return b["text"]
        return [ALPACA_NO_INPUT.format(instruction=i, input="") + o
                for i, o in zip(b["instruction"], b["output"])]

    def baseline(rep: int):
        return ds.map(lambda b: tok(texts(b)), batched=True, num_proc=args.num_proc,
                      remove_columns=ds.column_names, cache_file_name=str(tmp / f"base{rep}.arrow"),
                      new_fingerprint=f"base{rep}")

    def dpkit_run(rep: int):
        return tokenize_dataset(ds, source, tok, section, args.num_proc, fingerprint=f"dp{rep}",
                                cache_file=str(tmp / f"dpkit{rep}.arrow"))

    best = {"baseline": [float("inf")] * 2, "dpkit": [float("inf")] * 2}
    for rep in range(args.reps):
        for name, fn in (("baseline", baseline), ("dpkit", dpkit_run)):
            t0, c0 = time.perf_counter(), cpu_seconds()
            out = fn(rep)
            seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
            assert len(out) == args.rows
            best[name] = [min(best[name][0], seconds), min(best[name][1], cpu)]
            print(f"rep {rep} {name:8s}: {seconds:6.2f} s wall, {cpu:6.2f} CPU s (this process "
                  f"and its workers), {args.rows / seconds:9,.0f} rows/s", flush=True)
    print(f"rows={args.rows} num_proc={args.num_proc} format={args.format} "
          f"cpus={os.cpu_count()} load={os.getloadavg()[0]:.1f}")
    for i, unit in ((0, "rows/s of wall time"), (1, "rows per CPU second")):
        base, mine = args.rows / best["baseline"][i], args.rows / best["dpkit"][i]
        print(f"{unit}: baseline datasets.map(tok) {base:,.0f}, dpkit {mine:,.0f}, "
              f"ratio dpkit/baseline {mine / base:.2f} (best of {args.reps})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
