"""A stream's resume reads one window, not what came before: data setup time of a resume at 90%
of a >= 1 GB local stream against one at its start.

    python scripts/bench_stream_resume.py [--gb 1.0] [--at 0.9] [--runs 7] [--keep]

Generates three .jsonl sources under /tmp (50%, 30%, 20% of --gb), mixed `all_exhausted` with
weights in proportion to their rows (so --at of the epoch is --at of every file). The position at
--at is found by drawing the stream from its start as the ranks do (every line read, none parsed:
what a resume that replays would cost at the least), half-way into a window of
data.shuffle_buffer rows. Then, --runs times and alternating, a fresh `StreamFeed` (rank 0 of 2,
as a rank of a resumed job) loads the position at the start and at --at (each half-way into its
window) and builds its first step: the data setup of a resume. Prints the medians and the
generated files' size; the files are deleted unless --keep.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WORDS = ["the", "model", "learns", "to", "add", "numbers", "and", "answer", "questions", "about",
         "data", "it", "reads", "while", "every", "rank", "waits", "for", "nothing", "else"]


def generate(path: Path, size: int, seed: int) -> int:
    rng = random.Random(seed)
    lines, written = 0, 0
    with open(path, "w") as f:
        while written < size:
            chunk = "".join(json.dumps({"text": f"{lines + i} " +
                                        " ".join(rng.choices(WORDS, k=40))}) + "\n"
                            for i in range(10_000))
            f.write(chunk)
            written += len(chunk)
            lines += 10_000
    return lines


def main() -> int:
    from dpkit.data.load import collate
    from dpkit.data.stream import Draws, StreamFeed
    from dpkit.model import load_tokenizer
    from dpkit.recipe import DataSection, ModelSection

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--at", type=float, default=0.9)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="dpkit-stream-resume-", dir="/tmp"))
    try:
        t0 = time.perf_counter()
        rows = [generate(tmp / f"{name}.jsonl", int(args.gb * share * 2**30), k)
                for k, (name, share) in enumerate((("a", 0.5), ("b", 0.3), ("c", 0.2)))]
        size = sum((tmp / f"{n}.jsonl").stat().st_size for n in "abc")
        print(f"generated {size / 2**30:.2f} GB, {sum(rows):,} rows in 3 sources "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        section = DataSection(sources=[{"path": str(tmp / f"{n}.jsonl"), "format": "text",
                                        "weight": r} for n, r in zip("abc", rows)],
                              mixture="all_exhausted", streaming=True, max_seq_len=256)
        tiny = str(ROOT / "dpkit/resources/tokenizers/tiny-bpe")
        tok = load_tokenizer(ModelSection(config={"model_type": "llama"}, tokenizer=tiny))
        micro, accum, world = 4, 2, 2
        window = section.shuffle_buffer

        def feed():
            return StreamFeed(section, tok, seed=0, micro=micro, accum=accum, dp_rank=0,
                              dp_world=world, collate=collate, pad_id=tok.pad_token_id)

        start = feed().position["start"]
        # The position at --at: drawn from the start window by window, as the ranks read it.
        t0 = time.perf_counter()
        draws = Draws(section, 0, micro * accum * world, start)
        goal, w = int(args.at * sum(rows)), 0
        while draws.t + window <= goal:
            got, ended = draws.take(window)
            assert not ended and len(got) == window
            w += 1
        replay = time.perf_counter() - t0
        at = draws.state()
        read = sum(c["byte"] for c in at["cursors"])
        draws.close()
        print(f"the position at {100 * args.at:.0f}%: draw {at['t']:,} (cursors "
              f"{[c['row'] for c in at['cursors']]}); reaching it read {read / 2**30:.2f} GB in "
              f"{replay:.1f} s (what a resume replaying the stream reads, before tokenizing)",
              flush=True)
        positions = {"start": {"window": 0, "start": start, "item": 0, "taken": window // 2},
                     f"{100 * args.at:.0f}%": {"window": w, "start": at, "item": at["t"],
                                               "taken": window // 2}}
        times: dict[str, list[float]] = {k: [] for k in positions}
        for run in range(args.runs):
            for name in (list(positions) if run % 2 == 0 else reversed(list(positions))):
                f = feed()
                t0 = time.perf_counter()
                f.load_state_dict({"stream": True, "version": 2, "position": positions[name]})
                batches = f.micro_batches(0)
                times[name].append(time.perf_counter() - t0)
                assert len(batches) == accum and any(b["attention_mask"].any() for b in batches)
                f.draws.close()
        print(f"data setup of a resume (load the position, build the first step; rank 0 of 2, "
              f"window {window} rows), median of {args.runs}:")
        for name, values in times.items():
            print(f"  at {name:>5}: {1000 * statistics.median(values):7.1f} ms  "
                  f"(min {1000 * min(values):.1f}, max {1000 * max(values):.1f})")
        a, b = (statistics.median(v) for v in times.values())
        print(f"  ratio {b / a:.2f} (at {100 * args.at:.0f}% / at the start)")
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
