"""Supervised fine-tuning: next-token loss on the target tokens (runtime: dpkit/objectives/sft.py)."""

from __future__ import annotations

from dpkit.methods.spec import SEQUENCE_FORMATS, MethodSpec

METHODS = {"sft": MethodSpec("dpkit.objectives.sft:SFT", formats=tuple(SEQUENCE_FORMATS),
                             doc="next-token loss on the target tokens")}
