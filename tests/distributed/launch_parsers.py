"""Test helper: read launch command lines back with the launchers' own argument parsers
(torch.distributed.run, `accelerate launch`, the deepspeed runner) instead of comparing strings."""

from __future__ import annotations

import shlex
import sys


def torchrun_config(argv: list[str]):
    """torch.distributed.run's own parsing of a command line (after `python -m ...run`):
    (its arguments, the LaunchConfig it would run, the worker's command arguments)."""
    from torch.distributed.run import config_from_args, parse_args

    args = parse_args(argv)
    config, _, cmd_args = config_from_args(args)
    return args, config, cmd_args


def accelerate_to_torchrun(argv: list[str]):
    """What `accelerate launch` turns a command line into: its parser, its config-file merge, its
    multi-GPU environment, then the torch.distributed.run arguments and LaunchConfig it runs."""
    import torch.distributed.run as distrib_run
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import _filter_args, prepare_multi_gpu_env

    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
    assert args.multi_gpu and not args.use_deepspeed and not args.cpu, args
    prepare_multi_gpu_env(args)
    args = _filter_args(args, distrib_run.get_args_parser(),
                        ["--training_script", args.training_script,
                         "--training_script_args", args.training_script_args])
    config, _, cmd_args = distrib_run.config_from_args(args)
    return args, config, cmd_args


def deepspeed_args(argv: list[str]):
    """The deepspeed runner's (`deepspeed` CLI) own parsing."""
    from deepspeed.launcher.runner import parse_args

    return parse_args(argv)


def split(cmd: list[str], module: str) -> list[str]:
    """The launcher's own arguments: what follows `python -m <module>`."""
    assert cmd[:3] == [sys.executable, "-m", module], cmd
    return cmd[3:]


def commands_of(text: str) -> list[list[str]]:
    """The command lines of a dry run: notes, comments and log lines (DeepSpeed's `[date]
    [WARNING] ...` when it is first imported) dropped, leading VAR=value too."""
    out = []
    for line in text.splitlines():
        if line.startswith(("#", "[")) or not line.strip():
            continue
        words = shlex.split(line)
        while "=" in words[0] and not words[0].startswith("/"):
            words.pop(0)
        out.append(words)
    return out
