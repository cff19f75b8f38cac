"""Write dpkit/resources/data/self_instruct_seed.unpaired.jsonl: 119 unpaired rows (KTO's data)
derived from the bundled preference pairs (self_instruct_seed.preference.jsonl, Apache-2.0, see
dpkit/resources/data/README.md).

How, deterministically: each of the 60 pairs gives two rows with the same prompt, its chosen
answer labelled true (desirable) and its rejected answer labelled false (undesirable), as TRL's
`unpair_preference_dataset` does; the last pair's rejected row is left out, so the count (119) and
the classes (60 true, 59 false) are uneven, as users' data is; the rows are shuffled with a fixed
seed, so the classes mix within any batch. The layout is TRL's conversational unpaired one (the
`unpaired` format): `prompt` the user turn, `completion` the assistant turn (message lists),
`label` a boolean.
Run from the repository root:  python scripts/make_unpaired_data.py
"""

import json
import random
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "dpkit" / "resources" / "data"

pairs = [json.loads(line) for line in (DATA / "self_instruct_seed.preference.jsonl").open()]
rows = []
for pair in pairs:
    prompt = pair["chosen"][:-1]  # the user turn, which chosen and rejected share
    assert pair["rejected"][:-1] == prompt
    rows.append({"prompt": prompt, "completion": pair["chosen"][-1:], "label": True})
    rows.append({"prompt": prompt, "completion": pair["rejected"][-1:], "label": False})
rows.pop()  # uneven: 60 desirable, 59 undesirable
random.Random(0).shuffle(rows)
with (DATA / "self_instruct_seed.unpaired.jsonl").open("w") as f:
    for row in rows:
        f.write(json.dumps(row) + "\n")
