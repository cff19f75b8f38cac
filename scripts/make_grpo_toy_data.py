"""Writes dpkit/resources/data/letters.prompts.jsonl: GRPO's toy task for the CPU quickstart.

Each row asks for text made of a few letters (`answer`: the letters, with a space); the shipped
`char_share` reward gives a completion the share of its characters among them — verifiable, dense
(a random model's completions already score differently within a group) and learnable by the
quickstart's tiny model in a few dozen steps. Deterministic: no randomness, no model.
"""

import json
from pathlib import Path

LETTER_SETS = ["abc", "elo", "rst", "aei", "mno", "dgh", "lpu", "ent"]
OUT = Path(__file__).resolve().parent.parent / "dpkit" / "resources" / "data" / \
    "letters.prompts.jsonl"


def main() -> None:
    rows = []
    for i in range(64):
        letters = LETTER_SETS[i % len(LETTER_SETS)]
        rows.append({"prompt": f"Write a line using only the letters {' '.join(letters)} "
                               f"and spaces (#{i}).",
                     "answer": letters + " "})
    OUT.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{len(rows)} rows -> {OUT}")


if __name__ == "__main__":
    main()
