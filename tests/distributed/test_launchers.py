"""One recipe under every launcher and across nodes, on real ranks (gloo, 127.0.0.1):

- the same 4-rank recipe as 2 "nodes" × 2 ranks (two launcher processes on this machine) under
  torchrun, `accelerate launch` and the deepspeed CLI without ssh — and as the 4 ranks srun would
  start itself (SLURM variables only) — gives exactly the per-step losses of ONE 1-node × 4-rank
  torchrun run;
- a node that never joins, or an address nobody answers at: the others exit within the recipe's
  timeout (20 s here) with a message naming the node, the address and the wait — not a hang;
- the SLURM script and scripts/launch_multinode.sh, run with bash (srun/scontrol faked), start
  what the launchers' own parsers read as the right job (and, with DPKIT_TEST_SLURM=1 and a
  one-machine SLURM from launch_slurm.py, the SLURM script runs for real); `dpkit doctor` here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, rank_env, tiny_recipe, torchrun, train_losses, write_recipe

from distributed.launch_parsers import accelerate_to_torchrun, commands_of, split, torchrun_config
from dpkit.distributed import free_port
from dpkit.launch import LAUNCHERS, LaunchPlan, command

pytestmark = pytest.mark.distributed
STEPS = 4
TIMEOUT_S = 20  # the recipe's train.collective_timeout_s in the never-joins tests
SLACK_S = 60  # imports and teardown of a launch on 2 busy cores, on top of the wait itself


def recipe(tmp: Path, name: str, timeout_s: int = 120) -> Path:
    r = tiny_recipe(tmp / name, train={"max_steps": STEPS, "global_batch_size": 8,
                                       "micro_batch_size": 2, "collective_timeout_s": timeout_s},
                    zero={"stage": 2})
    return write_recipe(tmp / f"{name}.yaml", r)


def start(cmd: list[str], log: Path) -> tuple[subprocess.Popen, float]:
    """A launcher in its own process group (so a timeout kills all its ranks), output to `log`."""
    proc = subprocess.Popen(cmd, env=rank_env(), cwd=ROOT, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    return proc, time.monotonic()


def finish(started: dict[str, tuple[subprocess.Popen, float]], timeout: float,
           logs: dict[str, Path]) -> dict[str, tuple[int, float, str]]:
    """Wait for every launcher; kill them all past `timeout`. name -> (exit code, s, output)."""
    deadline = time.monotonic() + timeout
    done = {}
    try:
        while len(done) < len(started):
            for name, (proc, t0) in started.items():
                if name not in done and proc.poll() is not None:
                    done[name] = (proc.returncode, time.monotonic() - t0, logs[name].read_text())
            if time.monotonic() > deadline:
                pytest.fail(f"launch still running after {timeout} s: "
                            + ", ".join(n for n in started if n not in done))
            time.sleep(0.2)
    finally:
        for proc, _ in started.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return done


# ---------------------------------------------------------------- same losses on 1 or 2 nodes
@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[float]:
    """ONE 1-node × 4-rank torchrun run: the losses every launcher must reproduce on 2 nodes."""
    tmp = tmp_path_factory.mktemp("reference")
    torchrun(4, [str(recipe(tmp, "run"))], module="dpkit.train", timeout=240)
    losses = train_losses(tmp / "run")
    assert len(losses) == STEPS and losses[-1] < losses[0]  # it learns: equality means something
    return losses


def srun_ranks(path: Path, port: int, tmp: Path) -> tuple[dict, dict]:
    """What `srun --nodes 2 --ntasks-per-node 2 python -m dpkit.train RECIPE` starts: four ranks
    with only SLURM's variables (no RANK/WORLD_SIZE): dpkit.distributed reads those."""
    started, logs = {}, {}
    for rank in range(4):
        env = {k: v for k, v in rank_env().items() if not k.startswith(
            ("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "TORCHELASTIC_"))}
        env.update(SLURM_JOB_ID="77", SLURM_STEP_ID="0", SLURM_NTASKS="4", SLURM_NNODES="2",
                   SLURM_JOB_NODELIST="localhost", SLURM_PROCID=str(rank),
                   SLURM_LOCALID=str(rank % 2), SLURM_NODEID=str(rank // 2),
                   MASTER_PORT=str(port))
        logs[rank] = tmp / f"rank{rank}.log"
        started[rank] = (subprocess.Popen([sys.executable, "-m", "dpkit.train", str(path)], env=env,
                                          cwd=ROOT, stdout=logs[rank].open("w"),
                                          stderr=subprocess.STDOUT, start_new_session=True),
                         time.monotonic())
    return started, logs


@pytest.mark.parametrize("launcher", [*LAUNCHERS, "srun"])
def test_two_nodes_give_the_losses_of_one(launcher, reference, tmp_path):
    path = recipe(tmp_path, "run")
    port = free_port()
    started, logs = {}, {}
    if launcher == "srun":
        started, logs = srun_ranks(path, port, tmp_path)
    for node in (0, 1) if launcher != "srun" else ():
        # two launcher processes = two "nodes", meeting at 127.0.0.1:port
        plan = LaunchPlan(launcher, nproc_per_node=2, nodes=2, node_rank=node,
                          master_addr="127.0.0.1", master_port=port, rendezvous_timeout_s=120)
        logs[node] = tmp_path / f"node{node}.log"
        started[node] = start(command(plan, str(path), []), logs[node])
    done = finish(started, 240, logs)
    for who, (code, _, out) in done.items():
        assert code == 0, f"{who}:\n{out[-5000:]}"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 4
    # Bit-identical: the same 4 ranks reduce in the same order whichever launcher placed them.
    assert train_losses(tmp_path / "run") == reference


# --------------------------------------------------------------------- a node that never joins
@pytest.fixture(scope="module")
def never_joined(tmp_path_factory) -> dict[str, tuple[int, float, str, int]]:
    """Half of a 2-node × 1-rank job, every scenario at once (they mostly wait). torchrun and
    accelerate fail in their own rendezvous, before any rank runs: `dpkit train` starts them and
    says what happened. The deepspeed CLI starts the ranks at once: its command is run as a user
    would, and the ranks (dpkit.distributed) say it."""
    tmp = tmp_path_factory.mktemp("never_joined")
    scenarios = {"torchrun node 0": ("torchrun", 0), "accelerate node 0": ("accelerate", 0),
                 "deepspeed node 0": ("deepspeed", 0), "torchrun node 1": ("torchrun", 1),
                 "deepspeed node 1": ("deepspeed", 1)}
    started, logs, ports = {}, {}, {}
    for name, (launcher, node) in scenarios.items():
        slug = name.replace(" ", "_")
        path, port = recipe(tmp, slug, TIMEOUT_S), free_port()
        if launcher == "deepspeed":
            cmd = command(LaunchPlan(launcher, nproc_per_node=1, nodes=2, node_rank=node,
                                     master_port=port), str(path), [])
        else:
            cmd = [sys.executable, "-m", "dpkit.cli", "train", str(path), "--launcher", launcher,
                   "--nodes", "2", "--node-rank", str(node), "--nproc-per-node", "1",
                   "--master-addr", "127.0.0.1", "--master-port", str(port)]
        ports[name], logs[name] = port, tmp / f"{slug}.log"
        started[name] = start(cmd, logs[name])
    done = finish(started, TIMEOUT_S + 4 * SLACK_S, logs)
    return {name: (*done[name], ports[name]) for name in scenarios}


@pytest.mark.parametrize("scenario", ["torchrun node 0", "accelerate node 0", "deepspeed node 0"])
def test_node_that_never_joins_is_named(never_joined, scenario):
    code, elapsed, out, port = never_joined[scenario]
    assert code != 0, out[-3000:]
    assert (f"error: node 1 of 2 never joined the rendezvous at 127.0.0.1:{port} within "
            f"{TIMEOUT_S} s") in out, out[-5000:]
    assert elapsed < TIMEOUT_S + SLACK_S, (elapsed, out[-3000:])


@pytest.mark.parametrize("scenario", ["torchrun node 1", "deepspeed node 1"])
def test_address_nobody_answers_at_is_named(never_joined, scenario):
    code, elapsed, out, port = never_joined[scenario]
    assert code != 0, out[-3000:]
    assert (f"error: node 1 could not reach the rendezvous at 127.0.0.1:{port} within "
            f"{TIMEOUT_S} s") in out, out[-5000:]
    assert elapsed < 2 * TIMEOUT_S + SLACK_S, (elapsed, out[-3000:])  # connect retries, then wait


# ------------------------------------------------------------- SLURM script and node helper
@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory) -> Path:
    return recipe(tmp_path_factory.mktemp("scripts"), "run", timeout_s=45)


def test_multinode_helper_script(recipe_file, tmp_path):
    """scripts/launch_multinode.sh under SLURM variables (scontrol faked), dry run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f"#!/bin/sh\n{sys.executable} -c 'import sys; from dpkit.distributed "
                        "import expand_hostlist; print(*expand_hostlist(sys.argv[3]), "
                        "sep=chr(10))' \"$@\"\n")
    scontrol.chmod(0o755)
    env = dict(rank_env(), PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=sys.executable,
               SLURM_JOB_NODELIST="gpu[07-08]", SLURM_NNODES="2", SLURM_NODEID="1",
               LAUNCHER="accelerate", NPROC_PER_NODE="2", DRY_RUN="1", MASTER_PORT=str(free_port()))
    proc = subprocess.run([str(ROOT / "scripts" / "launch_multinode.sh"), str(recipe_file),
                           "train.lr=1e-3"], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (cmd,) = commands_of(proc.stdout)
    args, config, _ = accelerate_to_torchrun(split(cmd, "accelerate.commands.launch"))
    assert config.max_nodes == 2 and int(config.rdzv_configs["rank"]) == 1
    assert config.rdzv_endpoint.startswith("gpu07:")
    assert args.training_script_args == [str(recipe_file), "train.lr=1e-3"]


@pytest.mark.parametrize("min_nodes", [None, "1"])
def test_slurm_script_runs_one_torchrun_per_node(recipe_file, tmp_path, min_nodes):
    """Run scripts/slurm/train.sbatch with bash under a fake allocation: `srun` and `scontrol`
    are stand-ins that record their arguments; torch's parser reads what srun would start.
    MIN_NODES=1: elastic, as `dpkit train --nodes 1:2` launches it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record, environ = tmp_path / "srun.json", tmp_path / "srun-env.json"
    keys = ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "DPKIT_RDZV_ENDPOINT"]
    (bin_dir / "srun").write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                                  f"open({str(record)!r}, 'w').write(json.dumps(sys.argv[1:]))\n"
                                  f"open({str(environ)!r}, 'w').write(json.dumps("
                                  f"{{k: os.environ.get(k) for k in {keys!r}}}))\n")
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf 'node-a\\nnode-b\\n'\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = dict(rank_env(), PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=sys.executable,
               SLURM_JOB_NODELIST="node-a,node-b", SLURM_NNODES="2", SLURM_JOB_ID="4242",
               GPUS_PER_NODE="2", **({"MIN_NODES": min_nodes} if min_nodes else {}))
    script = ROOT / "scripts" / "slurm" / "train.sbatch"
    sbatch = [line.split()[1] for line in script.read_text().splitlines()
              if line.startswith("#SBATCH")]
    assert "--ntasks-per-node=1" in sbatch  # one launcher per node
    overrides = ["train.lr=1e-3", *(["train.max_restarts=2"] if min_nodes else [])]
    proc = subprocess.run(["bash", str(script), str(recipe_file), *overrides], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    argv = json.loads(record.read_text())
    assert "--ntasks-per-node=1" in argv
    start = argv.index("torch.distributed.run") + 1
    assert argv[start - 3:start] == [sys.executable, "-m", "torch.distributed.run"]
    args, config, _ = torchrun_config(argv[start:])
    assert config.max_nodes == 2 and config.nproc_per_node == 2
    assert config.rdzv_backend == "c10d" and config.rdzv_endpoint == "node-a:29500"
    assert config.run_id == "4242" and int(config.rdzv_configs["join_timeout"]) == 45
    assert args.training_script == "dpkit.train"
    assert args.training_script_args == [str(recipe_file), *overrides]
    exported = json.loads(environ.read_text())
    if min_nodes is None:  # one dead node ends the job
        assert config.min_nodes == 2 and config.max_restarts == 0
        assert "--kill-on-bad-exit=1" in argv[:start] and "--no-kill" not in argv[:start]
        assert exported == dict.fromkeys(keys)
    else:  # the others go on: srun keeps them, torchrun restarts their ranks, which resume
        assert config.min_nodes == 1 and config.max_restarts == 2
        assert "--kill-on-bad-exit=0" in argv[:start] and "--no-kill" in argv[:start]
        assert exported == {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
                            "DPKIT_RDZV_ENDPOINT": "node-a:29500"}


@pytest.mark.skipif(os.environ.get("DPKIT_TEST_SLURM") != "1" or not shutil.which("sbatch"),
                    reason="a real SLURM job: set DPKIT_TEST_SLURM=1 with 2 nodes up "
                           "(tests/distributed/launch_slurm.py up)")
def test_sbatch_for_real(reference, tmp_path):
    """scripts/slurm/train.sbatch under real SLURM (2 slurmd on this machine): 2 nodes × 2 ranks
    give the 1-node reference losses."""
    path = recipe(tmp_path, "run")
    env = dict(rank_env(), PYTHON=sys.executable, GPUS_PER_NODE="2", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), PATH=f"{Path(sys.executable).parent}:"
                                                  f"{os.environ['PATH']}")
    proc = subprocess.run(["sbatch", "--wait", "--nodes=2", "--gpus-per-node=0",
                           "--cpus-per-task=1", f"--chdir={ROOT}", f"--output={tmp_path}/%j.out",
                           "--export=ALL", str(ROOT / "scripts" / "slurm" / "train.sbatch"),
                           str(path)], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    logs = "".join(p.read_text() for p in tmp_path.glob("*.out"))
    assert proc.returncode == 0, proc.stderr + logs[-5000:]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["world_size"] == 4
    assert train_losses(tmp_path / "run") == reference


# ------------------------------------------------------------------------------------- doctor
def test_doctor_on_this_machine():
    proc = subprocess.run([sys.executable, "-m", "dpkit.cli", "doctor", "--master-port",
                           str(free_port()), "--timeout", "60"], env=rank_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "ok    all-reduce over gloo on 2 rank(s): correct sum" in proc.stdout
    assert "ok    deepspeed 0." in proc.stdout and "all checks passed" in proc.stdout
