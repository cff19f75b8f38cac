"""What a run records about where it ran: package versions and hardware (summary.json)."""

from __future__ import annotations

import os
import platform

import torch


def versions() -> dict[str, str]:
    import accelerate
    import deepspeed
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "deepspeed": deepspeed.__version__, "transformers": transformers.__version__,
           "accelerate": accelerate.__version__}
    try:
        import peft

        out["peft"] = peft.__version__
    except ImportError:
        pass
    return out


def hardware(env) -> str:
    if env.device.type == "cuda":
        return f"{env.world_size} × {torch.cuda.get_device_name(env.device)}"
    return f"{env.world_size} CPU ranks on {platform.machine()} ({os.cpu_count()} cores)"
