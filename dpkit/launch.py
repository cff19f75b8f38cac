"""How `dpkit train` starts the ranks: torchrun (default), accelerate, or the deepspeed CLI, on one
node or many. `--dry-run` prints the command (one per node where every node runs its own).

Each launcher starts `python -m dpkit.train RECIPE [overrides]` on every rank; the recipe is the
same file the parent already validated. Across nodes:

- torchrun and accelerate run once per node (`--node-rank R`) and meet at node 0's address and
  port (static rendezvous: node R's ranks are R×n … R×n+n-1);
- with a node range (`--nodes MIN:MAX`, torchrun only) the nodes meet in torchrun's c10d
  rendezvous at node 0's address instead, and torchrun's agent restarts the ranks when one dies
  (`--max-restarts` = train.max_restarts), on the nodes that are left as long as there are MIN:
  the ranks resume from the newest complete checkpoint by themselves (dpkit.run), through the
  universal format when the world size changed;
- the deepspeed CLI either runs once, on node 0, and ssh-starts (pdsh) every host of the hostfile,
  or, with `--node-rank R`, once per node without ssh (`--no_ssh`; dpkit writes a hostfile when
  none is given: the deepspeed launcher needs one to count the ranks).

A hostfile (`host slots=N` per line, deepspeed's format) gives the node count, the ranks per node
and node 0's address for every launcher. A node that never arrives ends the run after the recipe's
`train.collective_timeout_s` with a message naming it (the launcher's rendezvous is given the same
timeout; the ranks check in again in `dpkit.distributed`).
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dpkit.checkpoint import (last_logged_step, latest_complete, preempted_checkpoint,
                              resume_after_restart)
from dpkit.distributed import (EXIT_NONFINITE, EXIT_REQUEUE, could_not_reach, free_port,
                               never_joined)
from dpkit.errors import EXIT_USER_ERROR, Problem, RecipeError
from dpkit.shipped import ACCELERATE_CONFIGS

DEFAULT_PORT = 29500
"""Node 0's port across nodes (every node must use the same one); one node picks a free port."""


# ------------------------------------------------------------------------------------ hostfile
HOST_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._:-]*")


def read_hostfile(path: str | Path) -> list[tuple[str, int]]:
    """`host slots=N` lines (deepspeed's format; `#` comments and blank lines ignored)."""
    hosts: list[tuple[str, int]] = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"(\S+)\s+slots=(\d+)", line)
        if not m:
            raise ValueError(f"line {n}: '{line}' is not `host slots=N`")
        if not HOST_NAME.fullmatch(m[1]):  # it reaches ssh/pdsh: never an option, never a shell word
            raise ValueError(f"line {n}: '{m[1]}' is not a host name (letters, digits, `.`, `-`, "
                             "`_`, `:`; not starting with `-`)")
        if any(h == m[1] for h, _ in hosts):
            raise ValueError(f"line {n}: host '{m[1]}' is listed twice")
        hosts.append((m[1], int(m[2])))
    if not hosts:
        raise ValueError("no hosts in it")
    return hosts


def write_hostfile(path: str | Path, hosts: list[tuple[str, int]]) -> Path:
    path = Path(path)
    path.write_text("".join(f"{host} slots={slots}\n" for host, slots in hosts))
    return path


def local_names() -> set[str]:
    """Names and addresses this machine answers to (to find its line in a hostfile)."""
    names = {"localhost", "127.0.0.1", socket.gethostname(), socket.getfqdn(),
             socket.gethostname().split(".")[0]}
    try:
        names.update(socket.gethostbyname_ex(socket.gethostname())[2])
    except OSError:
        pass
    return names


# ---------------------------------------------------------------------------------------- plan
@dataclass
class LaunchPlan:
    launcher: str = "torchrun"
    nproc_per_node: int = 0
    """0: the hostfile's slots, else one rank per GPU, or 2 ranks on a machine without GPUs."""
    nodes: int = 0
    """0: the hostfile's host count, else 1. With `min_nodes`: the most nodes."""
    min_nodes: int = 0
    """Elastic (`--nodes MIN:MAX`, torchrun only): the fewest nodes the run goes on with after a
    node died; 0: a fixed node count."""
    max_restarts: int = 0
    """The recipe's train.max_restarts: torchrun's agent restarts the ranks itself in an elastic
    launch (the ranks are to meet again, on fewer nodes); `dpkit train` does otherwise."""
    rdzv_conf: str = ""
    """More `key=value,...` for torchrun's c10d rendezvous in an elastic launch (e.g.
    last_call_timeout=10); dpkit sets join_timeout, and is_host where the node rank is known."""
    node_rank: int | None = None
    """This node's rank; None: detected from the hostfile where this machine has one line, and
    for the deepspeed CLI, start every node from here over ssh."""
    master_addr: str | None = None
    """Node 0's address; None: the hostfile's first host, else 127.0.0.1."""
    master_port: int = 0
    """0: a free port on one node, 29500 across nodes (every node must agree)."""
    hostfile: str | None = None
    rendezvous_timeout_s: int = 600
    """How long nodes wait for each other (the recipe's train.collective_timeout_s)."""
    preemption_grace_s: int = 25
    """The recipe's train.preemption_grace_s: after passing SIGTERM on, torchrun waits this plus
    5 s (--shutdown_timeout) before it kills the ranks, so that dpkit's own grace ends first."""
    extra_env: dict[str, str] = field(default_factory=dict)
    _port: int = field(default=0, repr=False)
    _generated: Path | None = field(default=None, repr=False)
    """The hostfile dpkit wrote for this launch (deepspeed CLI without ssh), if any."""
    last_output: str = field(default="", repr=False)
    """The tail of the last launch's stderr (its failure report)."""

    def hosts(self) -> list[tuple[str, int]]:
        return read_hostfile(self.hostfile) if self.hostfile else []

    def num_nodes(self) -> int:
        return self.nodes or len(self.hosts()) or 1

    def ranks_per_node(self) -> int:
        if self.nproc_per_node:
            return self.nproc_per_node
        if self.hostfile:
            return self.hosts()[0][1]
        return torch.cuda.device_count() if torch.cuda.is_available() else 2

    def node_slots(self) -> list[int]:
        """Ranks on each node."""
        if self.hostfile and not self.nproc_per_node:
            return [slots for _, slots in self.hosts()[:self.num_nodes()]]
        return [self.ranks_per_node()] * self.num_nodes()

    def world_size(self) -> int:
        return sum(self.node_slots())

    def elastic(self) -> bool:
        """A node range (MIN < MAX): torchrun's c10d rendezvous, restarts by its agent."""
        return 0 < self.min_nodes < self.num_nodes()

    def world_sizes(self) -> list[int]:
        """Every world size this launch can run on (one, unless elastic)."""
        if not self.elastic():
            return [self.world_size()]
        return [n * self.ranks_per_node() for n in range(self.min_nodes, self.num_nodes() + 1)]

    def rdzv_id(self) -> str:
        """The c10d rendezvous's name, the same on every node without a word between them: the
        SLURM job's id where there is one (its state lives in node 0's agent, fresh each launch)."""
        job = os.environ.get("SLURM_JOB_ID", "")
        return job if job.isdigit() else "dpkit"

    def addr(self) -> str:
        if self.master_addr:
            return self.master_addr
        return self.hosts()[0][0] if self.hostfile else "127.0.0.1"

    def port(self) -> int:
        if not self._port:
            self._port = self.master_port or (DEFAULT_PORT if self.num_nodes() > 1 else free_port())
        return self._port

    def per_node(self) -> bool:
        """Every node runs its own launcher (all but the deepspeed CLI over ssh)."""
        return self.launcher != "deepspeed" or self.node_rank is not None

    def this_node(self) -> int | None:
        if self.node_rank is not None or self.num_nodes() == 1:
            return self.node_rank or 0
        if self.hostfile:
            mine = [i for i, (h, _) in enumerate(self.hosts()[:self.num_nodes()])
                    if h in local_names()]
            if len(mine) == 1:
                return mine[0]
        return None

    def problems(self, launching: bool = True, commands: bool = True) -> list[Problem]:
        """Mistakes in the launch flags, named by flag, before anything starts. Which node this
        is matters only when launching (a dry run prints every node's command); node 0's address
        only for commands (not to validate a recipe for a world size)."""
        out: list[Problem] = []
        if self.launcher not in LAUNCHERS:
            return [Problem("--launcher", f"unknown launcher '{self.launcher}'",
                            f"choose one of {', '.join(LAUNCHERS)}")]
        if self.hostfile:
            try:
                hosts = self.hosts()
            except (OSError, ValueError) as e:
                return [Problem("--hostfile", f"{self.hostfile}: {e}",
                                "write one `host slots=N` line per node")]
            if self.nodes > len(hosts):
                out.append(Problem("--nodes", f"{self.nodes} nodes but the hostfile lists "
                                   f"{len(hosts)}", "add hosts or lower --nodes"))
            if self.launcher != "deepspeed" and not self.nproc_per_node and \
                    len({s for _, s in hosts[:self.num_nodes()]}) > 1:
                out.append(Problem("--hostfile", f"{self.launcher} starts the same number of "
                                   "ranks on every node, the hostfile's slots differ",
                                   "give every host the same slots, or use --launcher deepspeed"))
        if self.nodes < 0 or self.nproc_per_node < 0 or self.min_nodes < 0:
            out.append(Problem("--nodes", "must be positive"))
        nodes = self.num_nodes()
        if self.min_nodes > nodes:
            out.append(Problem("--nodes", f"{self.min_nodes}:{nodes}: the minimum is above the "
                               "maximum", f"give MIN:MAX with MIN <= MAX, e.g. 1:{nodes}"))
        if self.elastic() and self.launcher != "torchrun":
            out.append(Problem("--nodes", f"{self.min_nodes}:{nodes} needs torchrun's elastic "
                               f"(c10d) rendezvous; the {self.launcher} launcher starts a fixed "
                               "set of nodes", f"use --launcher torchrun, or a fixed count: "
                               f"--nodes {nodes}"))
        if self.elastic() and self.max_restarts < 1:
            out.append(Problem("train.max_restarts", f"is 0: with --nodes {self.min_nodes}:{nodes} "
                               "a dead node would end the run instead of resuming on the nodes "
                               "left", "set train.max_restarts to 1 or more (each node death "
                               "uses one restart on every surviving node)"))
        if self.node_rank is not None and not 0 <= self.node_rank < nodes:
            out.append(Problem("--node-rank", f"{self.node_rank} is not in 0..{nodes - 1}",
                               f"number the {nodes} nodes 0..{nodes - 1}"))
        if nodes > 1 and self.launcher == "deepspeed" and not self.per_node() and \
                not self.hostfile:
            out.append(Problem("--hostfile", f"the deepspeed CLI needs a hostfile to start {nodes} "
                               "nodes over ssh", "give --hostfile, or run it on each node with "
                               f"--node-rank 0..{nodes - 1} (no ssh)"))
        if commands and nodes > 1 and not self.master_addr and not self.hostfile:
            out.append(Problem("--master-addr", f"required with {nodes} nodes: node 0's address, "
                               "the same on every node", "give --master-addr (or --hostfile)"))
        if launching and nodes > 1 and self.this_node() is None and self.per_node() and \
                not self.elastic():  # c10d numbers the nodes in arrival order
            where = ("this machine is not exactly one host of the hostfile" if self.hostfile
                     else f"{self.launcher} runs once on every node")
            out.append(Problem("--node-rank", f"required with {nodes} nodes: {where}",
                               f"run the command on each node with --node-rank 0..{nodes - 1}"
                               + (" (or give --hostfile to start every node from node 0 over "
                                  "ssh)" if self.launcher == "deepspeed" else "")))
        return out

    def check(self, launching: bool = False, commands: bool = False) -> LaunchPlan:
        problems = self.problems(launching, commands)
        if problems:
            raise RecipeError(problems)
        return self


# ------------------------------------------------------------------------------------ commands
def generated_hostfile(plan: LaunchPlan) -> Path:
    """For the deepspeed CLI without ssh and without --hostfile: it needs one to count ranks. The
    names only label nodes (nothing connects to them); node 0's address comes from --master-addr."""
    if plan._generated is None:
        hosts = [(f"node{i}", s) for i, s in enumerate(plan.node_slots())]
        # mkstemp: a new file no one else could have planted (a fixed name in /tmp could be a
        # link to someone else's file), readable by this user only.
        fd, name = tempfile.mkstemp(prefix="dpkit-hostfile-", suffix=".txt")
        with os.fdopen(fd, "w") as f:
            f.write("".join(f"{host} slots={slots}\n" for host, slots in hosts))
        plan._generated = Path(name)
    return plan._generated


def command(plan: LaunchPlan, recipe: str, overrides: list[str],
            node_rank: int | None = None) -> list[str]:
    """The launcher command for one node (`node_rank`, default this node)."""
    rank = plan.this_node() if node_rank is None else node_rank
    return LAUNCHER_COMMANDS[plan.launcher](plan, [recipe, *overrides], rank or 0, node_rank)


def _torchrun(plan: LaunchPlan, target: list[str], rank: int, node_rank: int | None) -> list[str]:
    n, nodes, addr, port = plan.ranks_per_node(), plan.num_nodes(), plan.addr(), plan.port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n)]
    if plan.elastic():
        # c10d: the nodes meet at node 0's address whatever their number (no --node_rank), and
        # after a death the agent restarts its ranks and meets the nodes left (dpkit.run resumes).
        # is_host: which agent serves the rendezvous, where the node rank says (else torch
        # guesses from the host name; two "nodes" on one machine would race for the port).
        known = plan.this_node() if node_rank is None else node_rank
        conf = [f"join_timeout={plan.rendezvous_timeout_s}"]
        if known is not None:
            conf.append(f"is_host={int(known == 0)}")
        conf += [c for c in plan.rdzv_conf.split(",") if c.strip()]
        cmd += ["--nnodes", f"{plan.min_nodes}:{nodes}", "--rdzv_backend", "c10d",
                "--rdzv_endpoint", f"{addr}:{port}", "--rdzv_id", plan.rdzv_id(),
                "--max_restarts", str(plan.max_restarts), "--rdzv_conf", ",".join(conf)]
    elif nodes == 1:
        cmd += ["--standalone"] if not plan.master_port else [
            "--master_addr", addr, "--master_port", str(port)]
    else:
        cmd += ["--nnodes", str(nodes), "--node_rank", str(rank), "--rdzv_backend", "static",
                "--rdzv_endpoint", f"{addr}:{port}",
                "--rdzv_conf", f"timeout={plan.rendezvous_timeout_s}"]
    if _torchrun_has_shutdown_timeout():  # newer torch; older torchrun: a fixed 30 s
        cmd += ["--shutdown_timeout", str(plan.preemption_grace_s + 5)]
    return cmd + ["-m", "dpkit.train", *target]


def _torchrun_has_shutdown_timeout() -> bool:
    from dataclasses import fields

    from torch.distributed.launcher.api import LaunchConfig

    return any(f.name == "shutdown_timeout" for f in fields(LaunchConfig))


def _accelerate(plan: LaunchPlan, target: list[str], rank: int, node_rank: int | None
                ) -> list[str]:
    n, nodes, addr, port = plan.ranks_per_node(), plan.num_nodes(), plan.addr(), plan.port()
    config = ACCELERATE_CONFIGS / ("multi_node.yaml" if nodes > 1 else
                                   "single_node.yaml" if torch.cuda.is_available() else
                                   "cpu.yaml")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
           "--num_processes", str(n * nodes), "--num_machines", str(nodes),
           "--machine_rank", str(rank), "--main_process_ip", addr,
           "--main_process_port", str(port)]
    if nodes > 1:
        cmd += ["--rdzv_conf", f"timeout={plan.rendezvous_timeout_s}"]
    return cmd + ["-m", "dpkit.train", *target]


def _deepspeed(plan: LaunchPlan, target: list[str], rank: int, node_rank: int | None
               ) -> list[str]:
    # The deepspeed CLI: `--module`, not `-m` (its parser refuses `-m`); `--no_local_rank` so the
    # script gets the rank from LOCAL_RANK only; --num_gpus on CPU too (it counts NUMA nodes).
    n, nodes, addr, port = plan.ranks_per_node(), plan.num_nodes(), plan.addr(), plan.port()
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--master_addr", addr,
           "--master_port", str(port)]
    if nodes > 1 or plan.hostfile:
        hostfile = plan.hostfile or str(generated_hostfile(plan))
        cmd += ["--hostfile", hostfile]
        if plan.nodes and plan.hostfile:
            cmd += ["--num_nodes", str(nodes)]
        if plan.nproc_per_node:
            cmd += ["--num_gpus", str(n)]
        if nodes > 1 and (plan.per_node() or node_rank is not None):
            cmd += ["--no_ssh", "--node_rank", str(rank)]
    else:
        cmd += ["--num_gpus", str(n)]
    return cmd + ["--no_local_rank", "--module", "dpkit.train", *target]


# The launchers dpkit can start, by name: the one registry (LAUNCHERS and the CLI's choices
# come from it). A new launcher is a function building its command line, plus a line here.
LAUNCHER_COMMANDS = {"torchrun": _torchrun, "accelerate": _accelerate, "deepspeed": _deepspeed}
LAUNCHERS = tuple(LAUNCHER_COMMANDS)


def elastic_environment(plan: LaunchPlan) -> dict[str, str]:
    """For torchrun's agent and the ranks of an elastic launch. The agent would otherwise share
    one TCP store with every start of the ranks, where a restarted group finds the keys of the
    group before it (and torchrun's restart counts differ between nodes, pytorch#108158): each
    start gets a fresh store from its rank 0. DPKIT_RDZV_ENDPOINT: where the ranks count the
    starts of this launch (the rendezvous's own store, alive as long as the launch is), so that
    every start after the first resumes (dpkit.distributed.restart_count)."""
    if not plan.elastic():
        return {}
    return {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
            "DPKIT_RDZV_ENDPOINT": f"{plan.addr()}:{plan.port()}"}


def rank_environment(plan: LaunchPlan) -> dict[str, str]:
    """Environment for the ranks. On CPU one thread per rank: more threads thrash 2 cores."""
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("OMP_NUM_THREADS", "1")
        env.setdefault("MKL_NUM_THREADS", "1")
    env.update(elastic_environment(plan))
    env.update(plan.extra_env)
    return env


def render(plan: LaunchPlan, recipe: str, overrides: list[str]) -> str:
    """What `--dry-run` prints: the command for this node, or for every node when each runs its
    own and no --node-rank says which one this is."""
    env = "" if torch.cuda.is_available() else "OMP_NUM_THREADS=1 "
    env += "".join(f"{k}={shlex.quote(v)} " for k, v in elastic_environment(plan).items())
    nodes = plan.num_nodes()
    if plan.elastic() and plan.this_node() is None:
        lines = [f"# every node (the one at {plan.addr()} serves the rendezvous):",
                 env + shlex.join(command(plan, recipe, overrides))]
    elif nodes == 1 or not plan.per_node() or plan.this_node() is not None:
        lines = [env + shlex.join(command(plan, recipe, overrides))]
    else:
        hosts = [h for h, _ in plan.hosts()] or [""] * nodes
        lines = []
        for r in range(nodes):
            on = f" ({hosts[r]})" if hosts[r] else ""
            lines += [f"# node {r}{on}:", env + shlex.join(command(plan, recipe, overrides, r))]
    if plan.launcher == "deepspeed" and nodes > 1 and not plan.hostfile:
        path = generated_hostfile(plan)
        lines.insert(0, f"# {path} (written by dpkit): "
                     + "; ".join(path.read_text().strip().splitlines()))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ running
def diagnose(plan: LaunchPlan, output: str) -> str | None:
    """A launcher that failed in its own rendezvous (before any rank ran dpkit) says so in torch's
    words; say it in dpkit's: which node, which address, how long."""
    where = f"{plan.addr()}:{plan.port()}"
    t = plan.rendezvous_timeout_s
    if "never joined the rendezvous" in output or "could not reach the rendezvous" in output:
        return None  # the ranks already said it
    m = re.search(r"waiting for clients\. (\d+)/(\d+) clients joined", output)
    if m:
        joined, nodes = int(m[1]), int(m[2])
        missing = list(range(joined, nodes)) if joined == 1 else None
        return never_joined(missing, nodes, where, t, f"{joined} of {nodes} nodes arrived")
    if re.search(r"timed out .*while trying to connect to", output):
        return could_not_reach(plan.this_node(), where, t)
    if "RendezvousTimeoutError" in output:
        return never_joined(None, plan.num_nodes(), where, t)
    if re.search(r"EADDRINUSE|[Aa]ddress already in use", output):
        return f"port {plan.port()} is already in use on node 0 — pick another --master-port"
    return None


def _pump(src, dst, keep: list[bytes], limit: int = 1 << 16) -> None:
    """Copy the launcher's stderr through as it comes (progress bars too), keeping its tail."""
    while True:
        chunk = os.read(src.fileno(), 4096)
        if not chunk:
            return
        if hasattr(dst, "buffer"):
            dst.buffer.write(chunk)
        else:  # a captured stream (tests) takes text
            dst.write(chunk.decode(errors="replace"))
        dst.flush()
        keep.append(chunk)
        while sum(map(len, keep)) > limit and len(keep) > 1:
            keep.pop(0)


def launch(plan: LaunchPlan, recipe: str, overrides: list[str], dry_run: bool,
           grace_s: float = 25) -> int:
    """Start the launcher once and wait for it. SIGTERM to this process (a scheduler's
    preemption, Kubernetes stopping the pod) goes on to the launcher, which passes it to the
    ranks: they finish the step, write a checkpoint and exit (dpkit.run.Run.preempt); after
    `grace_s` the ranks still running are killed, so that this process can still report."""
    plan.check(launching=not dry_run, commands=True)
    if dry_run:
        print(render(plan, recipe, overrides))
        return 0
    cmd = command(plan, recipe, overrides)
    ranks = (f"{plan.world_sizes()[0]}-{plan.world_size()}" if plan.elastic()
             else plan.world_size())
    print(f"[dpkit] launching {ranks} ranks: {shlex.join(cmd)}", flush=True)
    env = {**rank_environment(plan), "DPKIT_SUPERVISOR_PID": str(os.getpid())}
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
    tail: list[bytes] = []
    pump = threading.Thread(target=_pump, args=(proc.stderr, sys.stderr, tail), daemon=True)
    pump.start()
    code = _wait(proc, grace_s)
    pump.join(timeout=5)
    if plan._generated is not None:  # ours, for this launch only (a restart writes a new one)
        plan._generated.unlink(missing_ok=True)
        plan._generated = None
    plan.last_output = b"".join(tail).decode(errors="replace")
    if code != 0:
        message = diagnose(plan, plan.last_output)
        if message:
            print(f"error: {message}", file=sys.stderr, flush=True)
    return code


SIGTERMED: list[float] = []
"""When this process got SIGTERM (time.monotonic()), if it did: the supervisor stops restarting."""


def _wait(proc: subprocess.Popen, grace_s: float) -> int:
    def on_term(signum, frame):
        if not SIGTERMED:
            SIGTERMED.append(time.monotonic())
            print(f"[dpkit] SIGTERM: the ranks finish their step and write a checkpoint "
                  f"(train.preemption_grace_s {grace_s:g} s)", file=sys.stderr, flush=True)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        while True:
            try:
                return proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass
            except KeyboardInterrupt:  # the launcher got the same Ctrl-C: let it stop its ranks
                return proc.wait()
            if SIGTERMED and time.monotonic() - SIGTERMED[0] > grace_s:
                print(f"[dpkit] the ranks did not stop within train.preemption_grace_s "
                      f"({grace_s:g} s): killing them", file=sys.stderr, flush=True)
                _kill_tree(proc.pid)
                return proc.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)


def _kill_tree(pid: int) -> None:
    """SIGKILL the launcher and every process under it (torchrun starts ranks in their own
    sessions: killing the launcher alone would leave them running)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


# ------------------------------------------------------------------------------ supervision
# `dpkit train` supervises the launcher rather than asking it to restart: torchrun's elastic
# agent can (--max-restarts), the deepspeed launcher and accelerate cannot; one loop here treats
# all three alike and can tell a dead rank (restart) from a recipe error (don't) or a preemption
# (exit for the scheduler to requeue).
DONE, RESTART, REQUEUE, STOP = "done", "restart", "requeue", "stop"


def rank_exit_codes(output: str) -> list[int]:
    """The ranks' exit codes in the launcher's failure report (torchrun, accelerate: `exitcode :
    -9`); the deepspeed launcher exits with the failed rank's code itself."""
    return [int(c) for c in re.findall(r"exitcode\s*:\s*(-?\d+)", output)]


def decide(code: int, rank_codes: list[int], preempted: bool, restarts: int,
           max_restarts: int) -> str:
    """What the supervisor does after one launch ended with `code`."""
    if code == 0:
        return DONE
    if code == EXIT_NONFINITE or EXIT_NONFINITE in rank_codes:
        return STOP  # a NaN loss: a restart (or a requeue) replays the same steps into it
    if preempted or code == EXIT_REQUEUE or EXIT_REQUEUE in rank_codes:
        return REQUEUE  # the scheduler takes the node back: a restart here would be killed
    if code == EXIT_USER_ERROR or EXIT_USER_ERROR in rank_codes:
        return STOP  # the same recipe fails the same way again
    return RESTART if restarts < max_restarts else STOP


def restart_overrides(overrides: list[str], run_dir: Path, recipe_resume: str | None
                      ) -> list[str]:
    """The overrides of a restart: resume as dpkit.checkpoint.resume_after_restart says (the
    ranks of an elastic launch, restarted by torchrun, apply the same rule themselves)."""
    if resume_after_restart(recipe_resume, run_dir) != "auto":
        return list(overrides)
    return [o for o in overrides if not o.startswith("resume=")] + ["resume=auto"]


def supervise(plan: LaunchPlan, recipe: str, overrides: list[str], run_dir: Path,
              max_restarts: int = 0, grace_s: float = 25, recipe_resume: str | None = None,
              start=launch) -> int:
    """Launch; when a rank dies, launch again from the last complete checkpoint, up to
    `max_restarts` times. Returns 0, EXIT_REQUEUE (preempted: the ranks wrote a checkpoint, or
    this process got SIGTERM), or the failed launch's exit code."""
    SIGTERMED.clear()
    restarts = 0
    while True:
        plan.extra_env["DPKIT_RESTART"] = str(restarts)  # faults fire in attempt 0 only
        began = time.time()
        code = start(plan, recipe, overrides, False, grace_s)
        preempted = bool(SIGTERMED) or preempted_checkpoint(run_dir, began) is not None
        action = decide(code, rank_exit_codes(getattr(plan, "last_output", "")), preempted,
                        restarts, max_restarts)
        if action == DONE:
            return 0
        if action == REQUEUE:
            return EXIT_REQUEUE
        if action == STOP:
            return code
        restarts += 1
        ckpt = latest_complete(run_dir)
        reached = last_logged_step(run_dir)
        done = int(ckpt.name.split("-")[1]) if ckpt else 0
        print(f"[dpkit] a rank failed (launcher exit code {code}) after step {reached}; "
              f"restart {restarts} of {max_restarts} (train.max_restarts): "
              + (f"resuming from {ckpt}, {max(0, reached - done)} steps to redo" if ckpt else
                 "no complete checkpoint yet: from the start"), file=sys.stderr, flush=True)
        overrides = restart_overrides(overrides, run_dir, recipe_resume)
