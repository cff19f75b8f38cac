"""Launch commands, hostfiles and `--dry-run` output, read back by the launchers' own argument
parsers (torch.distributed.run, `accelerate launch`, the deepspeed runner) — never compared as
strings — plus the launcher environments dpkit reads, rendezvous messages, and `dpkit doctor`.
(The SLURM script and scripts/launch_multinode.sh run in tests/distributed/test_launchers.py.)"""

from __future__ import annotations

import re
import shlex
import socket
from pathlib import Path

import pytest
from conftest import ROOT, tiny_recipe, write_recipe
from distributed.launch_parsers import (
    accelerate_to_torchrun,
    commands_of,
    deepspeed_args,
    split,
    torchrun_config,
)

from dpkit import distributed
from dpkit.distributed import expand_hostlist, free_port, launcher_info, strip_launcher_args
from dpkit.launch import (
    LaunchPlan,
    command,
    diagnose,
    rank_environment,
    read_hostfile,
    write_hostfile,
)
from dpkit.shipped import ACCELERATE_CONFIGS

RECIPE = "recipes/some.yaml"
OVERRIDES = ["train.lr=1e-4", "output.dir=runs/x"]


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # torch.distributed.run would set it (and warn)


# ------------------------------------------------------------------------------------- torchrun
def test_torchrun_one_node_is_standalone():
    plan = LaunchPlan("torchrun", nproc_per_node=2)
    args, config, cmd_args = torchrun_config(split(command(plan, RECIPE, OVERRIDES),
                                                   "torch.distributed.run"))
    assert args.standalone and config.min_nodes == config.max_nodes == 1
    assert config.nproc_per_node == 2 and plan.world_size() == 2
    assert cmd_args[-4:] == ["-m", "dpkit.train", RECIPE, *OVERRIDES][-4:]
    assert args.module and args.training_script == "dpkit.train"
    assert args.training_script_args == [RECIPE, *OVERRIDES]
    plan.preemption_grace_s = 60  # train.preemption_grace_s: torchrun waits 5 s longer
    _, config, _ = torchrun_config(split(command(plan, RECIPE, OVERRIDES), "torch.distributed.run"))
    assert config.shutdown_timeout == 60 + 5


@pytest.mark.parametrize("node", [0, 1])
def test_torchrun_across_nodes(node):
    plan = LaunchPlan("torchrun", nproc_per_node=4, nodes=2, node_rank=node,
                      master_addr="10.0.0.1", rendezvous_timeout_s=33)
    args, config, _ = torchrun_config(split(command(plan, RECIPE, OVERRIDES),
                                            "torch.distributed.run"))
    assert config.min_nodes == config.max_nodes == 2 and config.nproc_per_node == 4
    assert config.rdzv_backend == "static" and config.rdzv_endpoint == "10.0.0.1:29500"
    assert int(config.rdzv_configs["rank"]) == node
    assert int(config.rdzv_configs["timeout"]) == 33  # the recipe's timeout reaches the launcher
    assert args.training_script_args == [RECIPE, *OVERRIDES] and plan.world_size() == 8


# ------------------------------------------------------------------------------------ accelerate
@pytest.mark.parametrize("node", [0, 1])
def test_accelerate_across_nodes(node):
    port = free_port()  # accelerate checks on node 0 that the port is free
    plan = LaunchPlan("accelerate", nproc_per_node=2, nodes=2, node_rank=node,
                      master_addr="127.0.0.1", master_port=port, rendezvous_timeout_s=21)
    cmd = command(plan, RECIPE, OVERRIDES)
    argv = split(cmd, "accelerate.commands.launch")
    assert Path(argv[argv.index("--config_file") + 1]).name == "multi_node.yaml"
    args, config, _ = accelerate_to_torchrun(argv)
    assert config.min_nodes == config.max_nodes == 2 and config.nproc_per_node == 2
    assert config.rdzv_backend == "static" and config.rdzv_endpoint == f"127.0.0.1:{port}"
    assert int(config.rdzv_configs["rank"]) == node
    assert int(config.rdzv_configs["timeout"]) == 21
    assert args.module and args.training_script == "dpkit.train"
    assert args.training_script_args == [RECIPE, *OVERRIDES]


def test_accelerate_multi_node_yaml_as_documented():
    """The spelling in the docs: only --machine_rank and --main_process_ip on the command line."""
    config = ACCELERATE_CONFIGS / "multi_node.yaml"
    args, cfg, _ = accelerate_to_torchrun(
        ["--config_file", str(config), "--machine_rank", "1", "--main_process_ip", "10.0.0.1",
         "-m", "dpkit.train", RECIPE])
    assert cfg.min_nodes == cfg.max_nodes == 2 and cfg.nproc_per_node == 8
    assert cfg.rdzv_endpoint == "10.0.0.1:29500" and int(cfg.rdzv_configs["rank"]) == 1


def test_accelerate_one_node_on_cpu():
    plan = LaunchPlan("accelerate", nproc_per_node=2)
    args, config, _ = accelerate_to_torchrun(split(command(plan, RECIPE, []),
                                                   "accelerate.commands.launch"))
    assert config.min_nodes == config.max_nodes == 1 and config.nproc_per_node == 2


# ------------------------------------------------------------------------------------- deepspeed
def test_deepspeed_cli_takes_module_not_m():
    """`deepspeed -m dpkit.train` is refused by deepspeed 0.19's parser: the spelling is
    `--module` (which is what dpkit generates and the docs say)."""
    with pytest.raises(SystemExit):
        deepspeed_args(["-m", "dpkit.train", RECIPE])
    assert deepspeed_args(["--module", "dpkit.train", RECIPE]).module


@pytest.mark.parametrize("node", [0, 1])
def test_deepspeed_without_ssh_writes_a_hostfile(node):
    from deepspeed.launcher.runner import fetch_hostfile

    plan = LaunchPlan("deepspeed", nproc_per_node=2, nodes=2, node_rank=node,
                      master_addr="10.0.0.1", master_port=29600)
    args = deepspeed_args(split(command(plan, RECIPE, OVERRIDES), "deepspeed.launcher.runner"))
    assert args.no_ssh and args.node_rank == node and args.no_local_rank and args.module
    assert args.master_addr == "10.0.0.1" and args.master_port == 29600
    assert args.user_script == "dpkit.train" and args.user_args == [RECIPE, *OVERRIDES]
    pool = fetch_hostfile(args.hostfile)  # deepspeed's own hostfile reader
    assert list(pool.values()) == [2, 2] and sum(pool.values()) == plan.world_size() == 4


def test_deepspeed_over_ssh_from_a_hostfile(tmp_path):
    from deepspeed.launcher.runner import fetch_hostfile, parse_inclusion_exclusion

    hostfile = write_hostfile(tmp_path / "hosts", [("gpu-a", 8), ("gpu-b", 8), ("gpu-c", 8)])
    plan = LaunchPlan("deepspeed", hostfile=str(hostfile))
    args = deepspeed_args(split(command(plan, RECIPE, []), "deepspeed.launcher.runner"))
    assert not args.no_ssh and args.hostfile == str(hostfile)  # node 0 pdsh-starts the others
    assert args.master_addr == "gpu-a" and args.master_port == 29500
    active = parse_inclusion_exclusion(fetch_hostfile(args.hostfile), args.include, args.exclude)
    assert dict(active) == {h: list(range(8)) for h in ("gpu-a", "gpu-b", "gpu-c")}
    assert plan.world_size() == 24 and plan.num_nodes() == 3


def test_deepspeed_one_node_counts_ranks_itself_on_cpu():
    args = deepspeed_args(split(command(LaunchPlan("deepspeed", nproc_per_node=2), RECIPE, []),
                                "deepspeed.launcher.runner"))
    assert args.num_gpus == 2 and args.hostfile != "" and not args.no_ssh


# -------------------------------------------------------------------------------------- hostfile
def test_hostfile_reader_agrees_with_deepspeeds(tmp_path):
    from deepspeed.launcher.runner import fetch_hostfile

    path = tmp_path / "hosts"
    path.write_text("# the cluster\nworker-0 slots=4\n\nworker-1 slots=2  # smaller\n")
    assert read_hostfile(path) == list(fetch_hostfile(str(path)).items())
    again = write_hostfile(tmp_path / "again", read_hostfile(path))
    assert list(fetch_hostfile(str(again)).items()) == [("worker-0", 4), ("worker-1", 2)]
    for bad in ("worker-0 slots=4\nworker-0 slots=4\n", "worker-0 4\n"):
        path.write_text(bad)
        with pytest.raises(ValueError):
            read_hostfile(path)
        with pytest.raises(ValueError):
            fetch_hostfile(str(path))


def test_hostfile_gives_nodes_ranks_and_master_to_every_launcher(tmp_path):
    hostfile = write_hostfile(tmp_path / "hosts", [("10.0.0.5", 4), ("10.0.0.6", 4)])
    plan = LaunchPlan("torchrun", hostfile=str(hostfile), node_rank=1)
    _, config, _ = torchrun_config(split(command(plan, RECIPE, []), "torch.distributed.run"))
    assert config.max_nodes == 2 and config.nproc_per_node == 4
    assert config.rdzv_endpoint == "10.0.0.5:29500" and plan.world_size() == 8


# ------------------------------------------------------------------------- elastic node counts
@pytest.mark.parametrize("node", [0, 1, None])
def test_torchrun_with_a_node_range_meets_in_c10d_and_restarts_itself(node):
    plan = LaunchPlan("torchrun", nproc_per_node=4, nodes=3, min_nodes=1, node_rank=node,
                      master_addr="10.0.0.1", rendezvous_timeout_s=33, max_restarts=2,
                      rdzv_conf="last_call_timeout=10")
    assert plan.elastic() and plan.world_sizes() == [4, 8, 12] and plan.problems() == []
    _, config, _ = torchrun_config(split(command(plan, RECIPE, OVERRIDES),
                                         "torch.distributed.run"))
    assert (config.min_nodes, config.max_nodes, config.nproc_per_node) == (1, 3, 4)
    assert config.rdzv_backend == "c10d" and config.rdzv_endpoint == "10.0.0.1:29500"
    assert config.max_restarts == 2 and config.run_id == "dpkit"
    conf = config.rdzv_configs
    assert int(conf["join_timeout"]) == 33 and conf["last_call_timeout"] == "10"
    assert "rank" not in conf  # c10d numbers the nodes as they arrive
    # which agent serves the rendezvous: said where the node rank is known, else torch's guess
    assert conf.get("is_host") == (None if node is None else str(int(node == 0)))
    # a fresh store for each start of the ranks; rank 0 counts the starts at the rendezvous
    env = rank_environment(plan)
    assert env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    assert env["DPKIT_RDZV_ENDPOINT"] == "10.0.0.1:29500"
    assert "DPKIT_RDZV_ENDPOINT" not in rank_environment(LaunchPlan("torchrun", nodes=2))


def test_node_range_is_refused_where_it_cannot_work():
    def problems(plan):
        return [(p.where, p.message) for p in plan.problems(launching=True)]

    for launcher in ("deepspeed", "accelerate"):  # a fixed set of nodes, no elastic rendezvous
        (where, message), = problems(LaunchPlan(launcher, nodes=2, min_nodes=1, node_rank=0,
                                                master_addr="h", max_restarts=1))
        assert where == "--nodes" and f"the {launcher} launcher starts a fixed set" in message
    (where, message), = problems(LaunchPlan("torchrun", nodes=2, min_nodes=1, master_addr="h"))
    assert where == "train.max_restarts"  # a death would end the run: nothing to go on with
    assert [w for w, _ in problems(LaunchPlan("torchrun", nodes=2, min_nodes=3,
                                              master_addr="h", node_rank=0))] == ["--nodes"]
    # 2:2 is a fixed count: the static rendezvous as before
    assert not LaunchPlan("torchrun", nodes=2, min_nodes=2).elastic()


def test_validate_checks_every_node_count_of_a_range(recipe_file, capsys):
    """The run may go on with fewer nodes: the global batch (8, micro 2) must split over each
    world size of the range. 1, 2 and 4 ranks do; 3 (the minimum of 3:4) don't. (The refusals
    come before the recipe's slower checks.)"""
    from dpkit.cli import main
    from dpkit.cli.common import fewer_nodes_problems
    from dpkit.recipe import load_recipe

    ok = ["validate", str(recipe_file), "train.max_restarts=1", "--nproc-per-node", "1"]
    recipe = load_recipe(recipe_file)
    assert fewer_nodes_problems(recipe, LaunchPlan(nproc_per_node=1, nodes=2, min_nodes=1)) == []
    (problem,) = fewer_nodes_problems(recipe, LaunchPlan(nproc_per_node=1, nodes=4, min_nodes=3))
    assert problem.where == "train.global_batch_size"
    assert problem.message.endswith("(on 3 nodes, which --nodes 3:4 allows)")
    assert main([*ok[:2], "--nodes", "1:2"]) == 2
    assert "train.max_restarts: is 0: with --nodes 1:2" in capsys.readouterr().err
    assert main([*ok, "--nodes", "1-2"]) == 2  # argparse: not N or MIN:MAX
    # an expert-parallel checkpoint resumes only on its own layout (or one process): no range
    ep = load_recipe(recipe_file, ["moe.expert_parallel=2"])
    (problem,) = fewer_nodes_problems(ep, LaunchPlan(nproc_per_node=1, nodes=2, min_nodes=1))
    assert problem.where == "--nodes" and "moe.expert_parallel: 2" in problem.message
    assert fewer_nodes_problems(ep, LaunchPlan(nproc_per_node=2, nodes=2)) == []


# ---------------------------------------------------------------------------- flags and dry run
def test_flag_problems_are_named():
    def where(plan):
        return {p.where for p in plan.problems(launching=True)}

    node0 = "10.0.0.1"
    assert where(LaunchPlan("torchrun", nodes=2, master_addr=node0)) == {"--node-rank"}
    assert where(LaunchPlan("torchrun", nodes=2, node_rank=2, master_addr=node0)) == {"--node-rank"}
    assert where(LaunchPlan("torchrun", nodes=2, node_rank=1)) == {"--master-addr"}
    assert where(LaunchPlan("deepspeed", nodes=2, master_addr=node0)) == {"--hostfile"}  # for ssh
    assert where(LaunchPlan("deepspeed", nodes=2, node_rank=1, master_addr=node0)) == set()
    assert where(LaunchPlan("torchrun", nodes=2, node_rank=0, master_addr=node0)) == set()
    # a dry run prints every node's command; validating a world size needs no address either
    assert LaunchPlan("torchrun", nodes=2, master_addr=node0).problems(launching=False) == []
    assert LaunchPlan("torchrun", nodes=2).problems(launching=False, commands=False) == []
    assert where(LaunchPlan("torchrun", hostfile="/nonexistent")) == {"--hostfile"}


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("launch")
    recipe = tiny_recipe(tmp / "run", train={"collective_timeout_s": 45})
    return write_recipe(tmp / "r.yaml", recipe)


def test_dry_run_prints_every_nodes_command(recipe_file, capsys):
    from dpkit.cli import main

    assert main(["train", str(recipe_file), "train.preemption_grace_s=100", "--launcher",
                 "torchrun", "--nnodes", "2", "--nproc-per-node", "2", "--master-addr",
                 "10.0.0.9", "--dry-run"]) == 0
    cmds = commands_of(capsys.readouterr().out)
    assert len(cmds) == 2
    for node, cmd in enumerate(cmds):
        _, config, _ = torchrun_config(split(cmd, "torch.distributed.run"))
        assert int(config.rdzv_configs["rank"]) == node and config.max_nodes == 2
        assert int(config.rdzv_configs["timeout"]) == 45  # train.collective_timeout_s
        # torchrun must not kill the ranks before dpkit's grace (100 s) is over
        assert config.shutdown_timeout == 100 + 5
        assert config.rdzv_endpoint == "10.0.0.9:29500"
    # a node range: one command for every node, with the environment it needs
    assert main(["train", str(recipe_file), "train.max_restarts=2", "--nnodes", "1:2",
                 "--nproc-per-node", "2", "--master-addr", "10.0.0.9", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "# every node (the one at 10.0.0.9 serves the rendezvous):" in out
    (cmd,) = commands_of(out)
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 DPKIT_RDZV_ENDPOINT=10.0.0.9:29500 " in out
    _, config, _ = torchrun_config(split(cmd, "torch.distributed.run"))
    assert (config.min_nodes, config.max_nodes, config.max_restarts) == (1, 2, 2)
    assert main(["train", str(recipe_file), "--launcher", "deepspeed", "--nodes", "2",
                 "--node-rank", "1", "--master-addr", "10.0.0.9", "--dry-run"]) == 0
    (cmd,) = commands_of(capsys.readouterr().out)
    args = deepspeed_args(split(cmd, "deepspeed.launcher.runner"))
    assert args.no_ssh and args.node_rank == 1 and args.user_args == [str(recipe_file)]
    assert args.master_addr == "10.0.0.9"


# ----------------------------------------------------------------- the launchers' environments
def test_each_launchers_environment_is_read():
    torchrun = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                "GROUP_RANK": "1", "GROUP_WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "x",
                "MASTER_ADDR": "h", "MASTER_PORT": "5"}
    deepspeed = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_SIZE": "2",
                 "CROSS_RANK": "1", "CROSS_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "5"}
    slurm = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1",
             "SLURM_NODEID": "1", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "h,g",
             "MASTER_PORT": "5"}
    for env, name in ((torchrun, "torchrun"), (deepspeed, "deepspeed"), (slurm, "slurm")):
        info = launcher_info(env)
        assert info.launcher == name
        assert (info.rank, info.local_rank, info.world_size, info.local_world_size,
                info.node_rank, info.nodes, info.master_addr, info.master_port) == \
            (3, 1, 4, 2, 1, 2, "h", 5), name
    # srun inside a batch script started nothing itself; a launcher's RANK wins over SLURM's
    assert launcher_info({"SLURM_PROCID": "0", "SLURM_NTASKS": "8"}).world_size == 1
    assert launcher_info({**slurm, **torchrun, "RANK": "2"}).rank == 2
    assert launcher_info({}).launcher == "none"


def test_slurm_host_lists_and_deepspeed_local_rank_argument():
    assert expand_hostlist("gpu[01-03,7],login1") == ["gpu01", "gpu02", "gpu03", "gpu7", "login1"]
    assert strip_launcher_args(["--local_rank=3", RECIPE, "a=1"]) == [RECIPE, "a=1"]


# -------------------------------------------------------------------------- rendezvous messages
def test_launcher_rendezvous_failures_are_said_in_dpkits_words():
    plan = LaunchPlan("torchrun", nodes=2, node_rank=0, master_port=4567, rendezvous_timeout_s=20)
    node0 = ("torch.distributed.DistStoreError: Timed out after 21 seconds waiting for clients. "
             "1/2 clients joined.")
    assert diagnose(plan, node0).startswith(
        "node 1 of 2 never joined the rendezvous at 127.0.0.1:4567 within 20 s")
    node1 = ("torch.distributed.DistNetworkError: The client socket has timed out after 20000ms "
             "while trying to connect to (127.0.0.1, 4567).")
    plan.node_rank = 1
    assert diagnose(plan, node1).startswith(
        "node 1 could not reach the rendezvous at 127.0.0.1:4567 within 20 s")
    assert diagnose(plan, "error: node 1 of 2 never joined the rendezvous at ...") is None
    assert diagnose(plan, "ZeroDivisionError") is None


def test_rank_level_rendezvous_names_the_missing_node():
    info = distributed.LauncherInfo("deepspeed", 0, 0, 8, 2, 0, 4, "h", 1)
    nodes, detail = distributed._missing_nodes([4, 5, 6, 7], info)
    assert nodes == [2, 3] and "4 of 8 arrived" in detail
    assert distributed.never_joined(nodes, 4, "h:1", 20).startswith(
        "nodes 2-3 of 4 never joined the rendezvous at h:1 within 20 s")
    assert distributed._missing_nodes([5], info)[0] is None  # node 2 came, one rank did not


# ------------------------------------------------------------------------------------- doctor
def _fake_ssh(tmp_path: Path, body: str) -> str:
    ssh = tmp_path / "fake_ssh"
    ssh.write_text("#!/bin/bash\n" + body)
    ssh.chmod(0o755)
    return str(ssh)


def test_doctor_compares_versions_across_nodes(tmp_path, monkeypatch, capsys):
    from dpkit.doctor import report, run_checks

    hostfile = write_hostfile(tmp_path / "hosts", [("localhost", 2), ("node-b", 2)])
    # A node with the same install: ssh runs the remote command here.
    monkeypatch.setenv("DPKIT_SSH", _fake_ssh(tmp_path, 'shift 2; bash -c "$1"\n'))
    assert run_checks(str(hostfile), free_port(), "gloo", 60, allreduce_check=False) == 0
    assert "node-b: reached over ssh" in capsys.readouterr().out
    # A node with another torch.
    here = report()["versions"]["torch"]
    swap = f's/\\"torch\\": \\"{here}\\"/\\"torch\\": \\"2.4.0\\"/'
    monkeypatch.setenv("DPKIT_SSH", _fake_ssh(tmp_path, f'shift 2; bash -c "$1" | sed "{swap}"\n'))
    assert run_checks(str(hostfile), free_port(), "gloo", 60, allreduce_check=False) == 1
    out = capsys.readouterr().out
    assert f"FAIL  torch differs between nodes: {here} on localhost; 2.4.0 on node-b" in out
    # A node ssh cannot reach.
    monkeypatch.setenv("DPKIT_SSH", _fake_ssh(tmp_path, "echo 'ssh: connect: No route' >&2; "
                                                        "exit 255\n"))
    assert run_checks(str(hostfile), free_port(), "gloo", 60, allreduce_check=False) == 1
    assert "FAIL  node-b: could not run dpkit there over ssh" in capsys.readouterr().out


def test_doctor_reports_a_busy_port(capsys):
    from dpkit.doctor import run_checks

    with socket.socket() as s:
        s.bind(("", 0))
        s.listen()
        port = s.getsockname()[1]
        assert run_checks(None, port, "gloo", 60, allreduce_check=False) == 1
    out = capsys.readouterr().out
    assert f"FAIL  port {port} is in use on this machine" in out and "1 problem found" in out


# ------------------------------------------------------------------- the documented commands
def documented_commands() -> list[list[str]]:
    """Every torchrun / accelerate / deepspeed line in docs/launching.md and README's Launching
    section, placeholders filled in."""
    readme = (ROOT / "README.md").read_text()
    launching = readme.split("## Launching", 1)[1].split("\n## ", 1)[0]
    out = []
    for text in ((ROOT / "docs" / "launching.md").read_text(), launching):
        for block in re.findall(r"```bash\n(.*?)```", text, re.DOTALL):
            for line in block.replace("\\\n", " ").splitlines():
                line = re.sub(r"\s+#.*", "", line).replace("[key=value ...]", "")
                for word, value in (("NODE0", "10.0.0.1"), (" R ", " 1 "), ("RECIPE", RECIPE),
                                    ("HOSTFILE", "hosts")):
                    line = line.replace(word, value)
                words = shlex.split(line)
                while words and "=" in words[0]:
                    words.pop(0)  # OMP_NUM_THREADS=1 ...
                if words and words[0] in ("torchrun", "accelerate", "deepspeed"):
                    out.append(words)
    return out


def test_documented_commands_parse(monkeypatch):
    monkeypatch.chdir(ROOT)  # the accelerate configs are named relative to the repository
    seen = set()
    for words in documented_commands():
        if words[0] == "torchrun":
            args, config, _ = torchrun_config(words[1:])
        elif words[0] == "accelerate":
            assert words[1] == "launch", words
            args, config, _ = accelerate_to_torchrun(words[2:])
        else:
            args = deepspeed_args(words[1:])
            assert args.module and args.user_script == "dpkit.train", words
            seen.add(words[0])
            continue
        assert args.module and args.training_script == "dpkit.train", words
        assert args.training_script_args[0] == RECIPE, words
        if "--node_rank" in words or "--machine_rank" in words:
            assert config.max_nodes == 2 and int(config.rdzv_configs["rank"]) == 1, words
        seen.add(words[0])
    assert seen == {"torchrun", "accelerate", "deepspeed"}


# ------------------------------------------------------------- supervision: restarts, preemption
def _checkpoint(run: Path, step: int) -> Path:
    """A complete checkpoint on disk, as checkpoint.save leaves it (files DeepSpeed writes left out:
    the supervisor only reads which checkpoint `latest` names)."""
    ckpt = run / "checkpoints" / f"step-{step:08d}"
    ckpt.mkdir(parents=True)
    (ckpt / "COMPLETE").write_text(f"{step}\n")
    (run / "checkpoints" / "latest").write_text(ckpt.name + "\n")
    return ckpt


@pytest.mark.parametrize("code, rank_codes, preempted, restarts, expected", [
    (0, [], False, 0, "done"),
    (1, [-9], False, 0, "restart"),       # a rank SIGKILLed (out of memory, a dead node)
    (1, [-9], False, 1, "restart"),
    (1, [-9], False, 2, "stop"),          # max_restarts (2) used up
    (-9, [], False, 0, "restart"),        # the launcher itself killed
    (2, [], False, 0, "stop"),            # a recipe error (deepspeed launcher: the rank's code)
    (1, [1, 2], False, 0, "stop"),        # torchrun's report names a rank's exit code 2
    (1, [-15], True, 0, "requeue"),       # preempted: the scheduler wants the node back
    (143, [], False, 0, "requeue"),       # a rank stopped on SIGTERM (deepspeed launcher)
    (1, [143], False, 0, "requeue"),
    (0, [], True, 0, "done"),             # SIGTERM during the last step: the run finished
    (1, [3], False, 0, "stop"),           # a NaN loss (nan_policy stop): a restart redoes it
    (3, [], False, 0, "stop"),            # the same from the deepspeed launcher
    (1, [3, 3], True, 0, "stop"),         # and a requeue would too
])
def test_supervisor_decides_what_a_failed_launch_means(code, rank_codes, preempted, restarts,
                                                       expected):
    from dpkit.launch import decide

    assert decide(code, rank_codes, preempted, restarts, max_restarts=2) == expected


def test_rank_exit_codes_are_read_from_torchruns_failure_report():
    from dpkit.launch import rank_exit_codes

    report = ("Root Cause (first observed failure):\n[0]:\n  time      : 2025-01-01_00:00:00\n"
              "  host      : node0\n  rank      : 1 (local_rank: 1)\n"
              "  exitcode  : -9 (pid: 4242)\n  error_file: <N/A>\n")
    assert rank_exit_codes(report) == [-9]
    assert rank_exit_codes("error: train.lr: must be > 0") == []


def _fake_launches(codes, run: Path, writes=None):
    """A stand-in for one launch: records what it was started with, returns the next code;
    `writes(attempt)` leaves on disk what ranks would have (a checkpoint, the preemption mark)."""
    calls = []

    def start(plan, recipe, overrides, dry_run, grace_s):
        calls.append((list(overrides), plan.extra_env["DPKIT_RESTART"]))
        if writes:
            writes(len(calls) - 1)
        plan.last_output = ""
        return codes[len(calls) - 1]
    return start, calls


def test_supervisor_restarts_a_dead_rank_from_the_last_checkpoint(tmp_path):
    from dpkit.launch import supervise

    run = tmp_path / "run"
    start, calls = _fake_launches([1, 1, 0], run,
                                  writes=lambda attempt: attempt == 0 and _checkpoint(run, 2))
    code = supervise(LaunchPlan("torchrun", nproc_per_node=2), RECIPE, ["train.lr=1e-4"], run,
                     max_restarts=2, start=start)
    assert code == 0
    assert calls == [(["train.lr=1e-4"], "0"),  # as typed; faults fire in attempt 0 only
                     (["train.lr=1e-4", "resume=auto"], "1"),
                     (["train.lr=1e-4", "resume=auto"], "2")]


def test_supervisor_gives_up_after_max_restarts_and_never_restarts_recipe_errors(tmp_path):
    from dpkit.launch import supervise

    start, calls = _fake_launches([1, 1, 1, 1], tmp_path)
    assert supervise(LaunchPlan(), RECIPE, [], tmp_path, max_restarts=2, start=start) == 1
    assert len(calls) == 3
    start, calls = _fake_launches([2, 0], tmp_path)
    assert supervise(LaunchPlan(), RECIPE, [], tmp_path, max_restarts=2, start=start) == 2
    assert len(calls) == 1
    start, calls = _fake_launches([1, 0], tmp_path)  # the default: no restarts
    assert supervise(LaunchPlan(), RECIPE, [], tmp_path, start=start) == 1
    assert len(calls) == 1


def test_a_nan_stop_ends_the_run_without_a_restart(monkeypatch, tmp_path, capsys):
    import dpkit.train
    from dpkit.launch import supervise
    from dpkit.run import NonFiniteLoss

    def nan(*args, **kwargs):
        raise NonFiniteLoss("loss is nan at step 3 (train.nan_policy is stop)")

    monkeypatch.setattr(dpkit.train, "load_recipe", lambda *args: None)
    monkeypatch.setattr(dpkit.train, "run", nan)
    try:
        code = dpkit.train.main(["recipe.yaml"])  # what each rank exits with
    finally:
        distributed.STOP.uninstall()
    assert "loss is nan at step 3" in capsys.readouterr().err
    assert code not in (0, 1, 2, 143)  # not a crash, a recipe error or a preemption
    calls = []

    def start(plan, recipe, overrides, dry_run, grace_s):  # torchrun reporting both ranks' code
        calls.append(overrides)
        plan.last_output = "".join(f"[{r}]:\n  exitcode  : {code} (pid: {r})\n" for r in (0, 1))
        return 1

    assert supervise(LaunchPlan(), RECIPE, [], tmp_path, max_restarts=2, start=start) == 1
    assert len(calls) == 1  # not restarted into the same NaN


def test_supervisor_asks_for_a_requeue_when_the_ranks_stopped_on_sigterm(tmp_path):
    from dpkit.checkpoint import mark_preempted
    from dpkit.distributed import EXIT_REQUEUE
    from dpkit.launch import supervise

    def ranks_preempted(attempt):
        mark_preempted(tmp_path, _checkpoint(tmp_path, 3))

    start, calls = _fake_launches([1, 0], tmp_path, writes=ranks_preempted)
    assert supervise(LaunchPlan(), RECIPE, [], tmp_path, max_restarts=2, start=start) == 143
    assert EXIT_REQUEUE == 143 and len(calls) == 1  # the scheduler restarts it, not dpkit


def test_restart_keeps_a_resume_path_until_the_run_has_a_checkpoint_of_its_own(tmp_path):
    from dpkit.launch import restart_overrides

    given = ["resume=/elsewhere/checkpoints/step-00000010", "train.lr=1e-4"]
    assert restart_overrides(given, tmp_path, "/elsewhere/checkpoints/step-00000010") == given
    assert restart_overrides(["train.lr=1e-4"], tmp_path, None) == ["train.lr=1e-4",
                                                                     "resume=auto"]
    _checkpoint(tmp_path, 12)
    assert restart_overrides(given, tmp_path, "/elsewhere/checkpoints/step-00000010") == \
        ["train.lr=1e-4", "resume=auto"]


@pytest.mark.parametrize("child, grace, expected", [
    # the ranks stop on SIGTERM (after their checkpoint) with the requeue code
    ("signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))", 20, 143),
    # ranks that ignore SIGTERM are killed once the grace period is over
    ("signal.signal(signal.SIGTERM, signal.SIG_IGN)", 1, -9),
])
def test_sigterm_to_dpkit_train_reaches_the_launcher_and_the_grace_period_holds(child, grace,
                                                                                expected):
    import os
    import signal
    import subprocess
    import sys
    import threading
    import time

    from dpkit import launch

    proc = subprocess.Popen([sys.executable, "-c", f"import signal, sys, time\n{child}\n"
                             "print('ready', flush=True)\ntime.sleep(60)"],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    launch.SIGTERMED.clear()
    threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM)).start()
    before = signal.getsignal(signal.SIGTERM)
    t0 = time.monotonic()
    assert launch._wait(proc, grace) == expected
    assert launch.SIGTERMED and time.monotonic() - t0 < grace + 5
    assert signal.getsignal(signal.SIGTERM) is before  # restored: SIGTERM later ends dpkit


def test_stop_flag_is_set_by_sigterm_and_restored():
    import os
    import signal

    from dpkit.distributed import StopFlag

    before = signal.getsignal(signal.SIGTERM)
    flag = StopFlag().install()
    try:
        assert not flag.requested and flag.value() == 0.0
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # scheduler and launcher both: one request
        assert flag.requested and flag.value() == 1.0
    finally:
        flag.uninstall()
    assert signal.getsignal(signal.SIGTERM) is before
    assert StopFlag.agreed(1.0) and StopFlag.agreed(2.0) and not StopFlag.agreed(0.0)


@pytest.mark.parametrize("vote", [False, True])
def test_stop_vote_rides_the_steps_own_all_reduce(monkeypatch, vote):
    """One collective more per step would cost every step; the vote is summed with the loss."""
    import torch

    from dpkit import distributed as dist
    from dpkit import step as S
    from dpkit.objectives.base import LossOut, Objective

    class Counted(Objective):
        def count(self, batch):
            return int(batch["n"])

        def loss(self, engine, batch):
            return LossOut(engine.w * batch["n"], {})

    class Engine:
        w = torch.nn.Parameter(torch.ones(()))

        def backward(self, loss):
            loss.backward()

        def step(self):
            pass

        def zero_optimization_stage(self):
            return 1

    calls = []
    other_rank = {0: [3, 0, 0, 0], 1: [0.0, 1.0]}  # the second reduction: loss, votes
    monkeypatch.setattr(dist, "all_reduce_sum", lambda values, device: (
        calls.append(list(values)) or [v + o for v, o in zip(values, other_rank[len(calls) - 1])]))
    env = dist.DistEnv(0, 0, 2, "gloo", torch.device("cpu"))
    batch = {"n": torch.tensor(2), "attention_mask": torch.ones(1, 2),
             "labels": torch.zeros(1, 2, dtype=torch.long)}
    result = S.train_step(Engine(), [batch], env, 1, objective=Counted(), stop_vote=vote)
    assert len(calls) == 2  # units before the backward, loss after the step: as before
    assert calls[1][1] == float(vote)
    assert result.loss == pytest.approx((2.0 + 0.0) / 5)  # (this rank's 2 + the other's 0) / units
    assert result.stop  # the other rank voted: every rank stops at this step


def test_faults_fire_in_the_first_attempt_only(monkeypatch):
    from dpkit.checkpoint import fault_requested
    from dpkit.distributed import restart_count

    monkeypatch.setenv("DPKIT_FAULT", "nan@step:3:1")
    monkeypatch.delenv("DPKIT_RESTART", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    assert restart_count() == 0 and fault_requested("nan", 3, 1)
    monkeypatch.setenv("DPKIT_RESTART", "1")  # dpkit train's supervisor restarted the ranks
    assert restart_count() == 1 and not fault_requested("nan", 3, 1)
    monkeypatch.setenv("DPKIT_RESTART", "0")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")  # torchrun --max-restarts did
    assert restart_count() == 2 and not fault_requested("nan", 3, 1)


def test_an_elastic_launch_counts_its_starts_at_the_rendezvous(monkeypatch):
    """torchrun's restart count is each agent's own (a node that joins late reads 0 while the
    others read 1): rank 0 counts the starts of an elastic launch in the rendezvous's store and
    every rank takes the highest number (here one rank, a local store as the rendezvous's)."""
    import datetime

    import torch
    from torch.distributed import TCPStore

    server = TCPStore("127.0.0.1", 0, None, True, datetime.timedelta(seconds=10),
                      wait_for_workers=False)
    monkeypatch.setenv("DPKIT_RDZV_ENDPOINT", f"127.0.0.1:{server.port}")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job7")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")  # a membership change keeps it
    monkeypatch.delenv("DPKIT_RESTART", raising=False)
    monkeypatch.setattr(distributed, "_AGREED", None)
    info = distributed.LauncherInfo("torchrun", 0, 0, 1, 1, 0, 1, "127.0.0.1", 0)
    cpu = torch.device("cpu")
    assert [distributed._agreed_restarts(info, cpu) for _ in range(3)] == [0, 1, 2]
    monkeypatch.setattr(distributed, "_AGREED", 2)  # what setup keeps
    assert distributed.restart_count() == 2
    monkeypatch.delenv("DPKIT_RDZV_ENDPOINT")  # not elastic: nothing to ask
    assert distributed._elastic_starts() == 0
