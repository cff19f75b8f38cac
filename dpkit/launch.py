"""How `dpkit train` starts the ranks: torchrun (default), accelerate, or the deepspeed CLI.

Each launcher starts `python -m dpkit.train RECIPE [overrides]` on every rank; the recipe is the
same file the parent already validated. `--dry-run` prints the command instead of running it.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dpkit.distributed import free_port

LAUNCHERS = ("torchrun", "accelerate", "deepspeed")
ACCELERATE_CONFIGS = Path(__file__).resolve().parent.parent / "ds_configs" / "accelerate"


@dataclass
class LaunchPlan:
    launcher: str = "torchrun"
    nproc_per_node: int = 0
    """0: one rank per GPU, or 2 ranks on a machine without GPUs."""
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 0
    """0: pick a free port (single node only; every node of a multi-node job must agree)."""
    hostfile: str | None = None
    extra_env: dict[str, str] = field(default_factory=dict)

    def ranks_per_node(self) -> int:
        if self.nproc_per_node:
            return self.nproc_per_node
        return torch.cuda.device_count() if torch.cuda.is_available() else 2

    def world_size(self) -> int:
        return self.ranks_per_node() * self.nnodes


def command(plan: LaunchPlan, recipe: str, overrides: list[str]) -> list[str]:
    n = plan.ranks_per_node()
    port = plan.master_port or free_port()
    target = [recipe, *overrides]
    if plan.launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n)]
        if plan.nnodes == 1:
            cmd += ["--standalone"] if not plan.master_port else [
                "--master_addr", plan.master_addr, "--master_port", str(port)]
        else:
            cmd += ["--nnodes", str(plan.nnodes), "--node_rank", str(plan.node_rank),
                    "--master_addr", plan.master_addr, "--master_port", str(port)]
        return cmd + ["-m", "dpkit.train", *target]
    if plan.launcher == "accelerate":
        config = ACCELERATE_CONFIGS / ("multi_node.yaml" if plan.nnodes > 1 else
                                       "single_node.yaml" if torch.cuda.is_available() else
                                       "cpu.yaml")
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
               "--num_processes", str(n * plan.nnodes), "--num_machines", str(plan.nnodes),
               "--machine_rank", str(plan.node_rank), "--main_process_ip", plan.master_addr,
               "--main_process_port", str(port)]
        return cmd + ["-m", "dpkit.train", *target]
    # deepspeed CLI: --num_gpus is needed on CPU too (it would count NUMA nodes otherwise).
    cmd = [shutil.which("deepspeed") or "deepspeed", "--master_port", str(port)]
    if plan.hostfile:
        cmd += ["--hostfile", plan.hostfile]
        if plan.nnodes > 1:
            cmd += ["--no_ssh", "--node_rank", str(plan.node_rank), "--master_addr",
                    plan.master_addr]
    else:
        cmd += ["--num_gpus", str(n)]
    return cmd + ["--module", "dpkit.train", *target]


def rank_environment(plan: LaunchPlan) -> dict[str, str]:
    """Environment for the ranks. On CPU one thread per rank: more threads thrash 2 cores."""
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("OMP_NUM_THREADS", "1")
        env.setdefault("MKL_NUM_THREADS", "1")
    env.update(plan.extra_env)
    return env


def launch(plan: LaunchPlan, recipe: str, overrides: list[str], dry_run: bool) -> int:
    cmd = command(plan, recipe, overrides)
    if dry_run:
        threads = "" if torch.cuda.is_available() else "OMP_NUM_THREADS=1 "
        print(threads + shlex.join(cmd))
        return 0
    print(f"[dpkit] launching {plan.world_size()} ranks: {shlex.join(cmd)}", flush=True)
    return subprocess.call(cmd, env=rank_environment(plan))
