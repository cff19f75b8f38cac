"""Write dpkit/resources/data/self_instruct_seed.preference.jsonl: 60 preference pairs derived
from the bundled Self-Instruct seed tasks (Apache-2.0, see dpkit/resources/data/README.md).

How each pair is made, deterministically (no model, no sampling): the first 60 seed tasks whose
answer has at least 8 words, in file order. prompt = the instruction (and, when the task has
one, a blank line and its input); chosen = the seed answer, unchanged; rejected = a deliberately
worse answer: for even positions the seed answer cut after its first third of words (an
unfinished answer), for odd positions the seed answer of the next selected task (an answer to
another question). The layout is UltraFeedback-binarized's (the `preference` format, conversational):
`prompt` a string, `chosen` and `rejected` the whole conversation (the user turn, then the answer).
Run from the repository root:  python scripts/make_preference_data.py
"""

import json
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "dpkit" / "resources" / "data"
N = 60

rows = [json.loads(line) for line in (DATA / "self_instruct_seed.alpaca.jsonl").open()]
picked = [r for r in rows if len(r["output"].split()) >= 8][:N + 1]
with (DATA / "self_instruct_seed.preference.jsonl").open("w") as f:
    for i, row in enumerate(picked[:N]):
        prompt = row["instruction"] + (f"\n\n{row['input']}" if row["input"].strip() else "")
        words = row["output"].split(" ")
        rejected = (" ".join(words[:max(1, len(words) // 3)]) if i % 2 == 0
                    else picked[i + 1]["output"])
        assert rejected != row["output"]
        user = {"role": "user", "content": prompt}
        f.write(json.dumps({"prompt": prompt,
                            "chosen": [user, {"role": "assistant", "content": row["output"]}],
                            "rejected": [user, {"role": "assistant", "content": rejected}]})
                + "\n")
