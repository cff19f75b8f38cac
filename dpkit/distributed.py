"""Rank, world size, process group, and main-process helpers.

The only module that reads launcher environment variables. torchrun, `accelerate launch` and the
`deepspeed` CLI all export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT (plus their
own names for the node: GROUP_RANK under torchrun and accelerate, CROSS_RANK under deepspeed);
`srun` starting the ranks itself exports SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID instead. A
plain `python -m dpkit.train` (no launcher) runs as a single process on a free local port.

Before the process group starts, every rank checks in at MASTER_ADDR:MASTER_PORT and waits (the
recipe's `train.collective_timeout_s`) for all the others: a node that never arrives, or an address
nobody answers at, ends the run with a `RendezvousError` naming the node, address and wait.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    backend: str
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RendezvousError(RuntimeError):
    """The ranks of a job did not all meet: a node never started, or nothing answered at the
    master address and port within the timeout."""


@dataclass(frozen=True)
class LauncherInfo:
    """Where this process sits in the job, as its launcher said."""
    launcher: str
    """torchrun (also accelerate), deepspeed, slurm (srun started the ranks), env, or none."""
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_rank: int
    nodes: int
    master_addr: str
    master_port: int


def _int(env, *names: str, default: int) -> int:
    for name in names:
        if env.get(name, "").strip().lstrip("-").isdigit():
            return int(env[name])
    return default


def expand_hostlist(hostlist: str) -> list[str]:
    """SLURM's compressed host list (`gpu[01-03,7],login1`) as names, in order."""
    hosts = []
    for prefix, ranges, suffix in re.findall(r"([^,\[]*)(?:\[([^\]]*)\])?([^,\[]*),?", hostlist):
        if not ranges:
            if prefix + suffix:
                hosts.append(prefix + suffix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{i:0{len(lo)}d}{suffix}")
    return hosts


def launcher_info(env=None) -> LauncherInfo:
    """Read the launcher's environment (torchrun/accelerate, deepspeed, srun, or none)."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = _int(env, "RANK", default=0), _int(env, "WORLD_SIZE", default=1)
        if "TORCHELASTIC_RUN_ID" in env:
            launcher, node, nodes, local_world = "torchrun", "GROUP_RANK", "GROUP_WORLD_SIZE", \
                "LOCAL_WORLD_SIZE"
        elif "CROSS_RANK" in env:
            launcher, node, nodes, local_world = "deepspeed", "CROSS_RANK", "CROSS_SIZE", \
                "LOCAL_SIZE"
        else:
            launcher, node, nodes, local_world = "env", "NODE_RANK", "NNODES", "LOCAL_WORLD_SIZE"
        per_node = _int(env, local_world, default=world)
        return LauncherInfo(launcher, rank, _int(env, "LOCAL_RANK", default=0), world, per_node,
                            _int(env, node, default=rank // max(per_node, 1)),
                            _int(env, nodes, default=max(1, world // max(per_node, 1))),
                            env.get("MASTER_ADDR", "127.0.0.1"),
                            _int(env, "MASTER_PORT", default=0))
    if "SLURM_STEP_ID" in env and _int(env, "SLURM_NTASKS", default=1) > 1:
        # srun started every rank itself (no torchrun in between).
        world = _int(env, "SLURM_NTASKS", default=1)
        nodes = _int(env, "SLURM_STEP_NUM_NODES", "SLURM_NNODES", default=1)
        hosts = expand_hostlist(env.get("SLURM_STEP_NODELIST", env.get("SLURM_JOB_NODELIST", "")))
        job = _int(env, "SLURM_JOB_ID", default=0)
        port = _int(env, "MASTER_PORT", default=20000 + job % 20000)
        return LauncherInfo("slurm", _int(env, "SLURM_PROCID", default=0),
                            _int(env, "SLURM_LOCALID", default=0), world, max(1, world // nodes),
                            _int(env, "SLURM_NODEID", default=0), nodes,
                            env.get("MASTER_ADDR", hosts[0] if hosts else "127.0.0.1"), port)
    return LauncherInfo("none", 0, 0, 1, 1, 0, 1, env.get("MASTER_ADDR", "127.0.0.1"),
                        _int(env, "MASTER_PORT", default=0))


def restart_count(env=None) -> int:
    """Which attempt of this run the ranks are: 0 the first, n after n automatic restarts (by
    `dpkit train`'s supervisor, DPKIT_RESTART, or torchrun's elastic agent,
    TORCHELASTIC_RESTART_COUNT, when someone runs it with --max-restarts). Once the process
    group exists (setup): the number every rank agreed on, which also counts the starts of an
    elastic launch (`_agreed_restarts`)."""
    env = os.environ if env is None else env
    local = max(_int(env, "DPKIT_RESTART", default=0),
                _int(env, "TORCHELASTIC_RESTART_COUNT", default=0))
    return max(local, _AGREED or 0) if env is os.environ else local


_AGREED: int | None = None
"""restart_count() as all ranks agreed on it in setup (None before)."""


def _elastic_starts() -> int:
    """Rank 0 of an elastic launch (dpkit.launch sets DPKIT_RDZV_ENDPOINT): how many times the
    ranks of this launch started before, counted in the rendezvous's own store, which lives on
    node 0's agent for the whole launch. torchrun's restart count can't say it: each node's
    agent counts its own restarts, and a group restarted because a node joined or left keeps
    the count it had (pytorch#108158), so a start after a node's death may read 0 there."""
    endpoint = os.environ.get("DPKIT_RDZV_ENDPOINT", "")
    if not endpoint:
        return 0
    from torch.distributed import TCPStore

    host, _, port = endpoint.rpartition(":")
    try:
        store = TCPStore(host, int(port), None, False, datetime.timedelta(seconds=60),
                         wait_for_workers=False)
        return int(store.add(f"dpkit_starts/{os.environ.get('TORCHELASTIC_RUN_ID', '')}", 1)) - 1
    except Exception as e:  # DistNetworkError, DistStoreError: torch's wording
        raise RendezvousError(f"rank 0 could not reach the rendezvous at {endpoint} to count "
                              f"this launch's starts: {e}") from e


def _agreed_restarts(info: LauncherInfo, device: torch.device) -> int:
    """restart_count() the same on every rank: the highest any rank has (rank 0 adds the
    elastic launch's count). Every start after the first resumes (dpkit.run), so the ranks must
    not disagree about it."""
    count = restart_count()
    if info.rank == 0:
        count = max(count, _elastic_starts())
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        t = torch.tensor([count], dtype=torch.int64, device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        count = int(t.item())
    return count


EXIT_REQUEUE = 143
"""Exit code of a run stopped by SIGTERM after writing its checkpoint (ranks and `dpkit train`):
128 + SIGTERM, what a shell reports for a job ended by SIGTERM; a job script requeues on it."""

EXIT_NONFINITE = 3
"""Exit code of a rank stopped by a NaN/inf loss (train.nan_policy: stop). Not 1 (a crash, which
`dpkit train` restarts) and not 2 (a recipe error): a restart would replay the same data from the
same checkpoint into the same NaN, so the supervisor stops on it (dpkit.launch.decide)."""


class StopFlag:
    """Preemption: SIGTERM (from a scheduler, Kubernetes, or the launcher forwarding
    `dpkit train`'s) asks this rank to stop. The rank does not stop at once: its flag rides the
    all-reduce every step already does (dpkit/step.py), so all ranks learn at the same step that
    one of them was asked, finish it, write a checkpoint and exit together."""

    def __init__(self):
        self.requested_at: float | None = None
        self._previous = None

    def install(self) -> StopFlag:
        import signal

        self._previous = signal.signal(signal.SIGTERM, self._on_term)
        return self

    def uninstall(self) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _on_term(self, signum, frame) -> None:
        if self.requested_at is None:  # a second SIGTERM (scheduler and launcher both) changes nothing
            self.requested_at = time.monotonic()

    @property
    def requested(self) -> bool:
        return self.requested_at is not None

    def value(self) -> float:
        """This rank's vote, summed over ranks with the step's numbers."""
        return 1.0 if self.requested else 0.0

    @staticmethod
    def agreed(reduced: float) -> bool:
        """After the all-reduce: did any rank get SIGTERM before this step's end?"""
        return reduced > 0


STOP = StopFlag()
"""This process's flag (installed by the training loop, read by dpkit/step.py)."""


def launcher_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from the launcher; (0, 0, 1) when started directly."""
    info = launcher_info()
    return info.rank, info.local_rank, info.world_size


def strip_launcher_args(argv: list[str]) -> list[str]:
    """The deepspeed CLI passes `--local_rank=N` to the script unless told `--no_local_rank`; the
    rank is read from LOCAL_RANK, so the argument is dropped."""
    return [a for a in argv if not re.fullmatch(r"--local[_-]rank(=\d+)?", a)]


def _span(ranks: list[int]) -> str:
    parts, start = [], None
    for i, r in enumerate(ranks):
        start = r if start is None else start
        if i + 1 == len(ranks) or ranks[i + 1] != r + 1:
            parts.append(str(r) if start == r else f"{start}-{r}")
            start = None
    return ", ".join(parts)


def never_joined(missing_nodes: list[int] | None, nodes: int, where: str, timeout_s: float,
                 detail: str = "") -> str:
    """The one message for a rendezvous that some nodes never reached (ranks and launchers)."""
    if missing_nodes:
        who = (f"node {missing_nodes[0]} of {nodes}" if len(missing_nodes) == 1 else
               f"nodes {_span(missing_nodes)} of {nodes}")
    else:
        who = "some ranks"
    return (f"{who} never joined the rendezvous at {where} within {timeout_s:g} s"
            + (f" ({detail})" if detail else "")
            + " — start every node with the same master address and port, check that they can "
              "reach it, or raise train.collective_timeout_s if nodes start slowly")


def could_not_reach(node_rank: int | None, where: str, timeout_s: float) -> str:
    who = f"node {node_rank}" if node_rank is not None else "this node"
    return (f"{who} could not reach the rendezvous at {where} within {timeout_s:g} s: nothing "
            "answered there — check the master address and port, that node 0 is started, and "
            "that no firewall is in between")


def _missing_nodes(missing: list[int], info: LauncherInfo) -> tuple[list[int] | None, str]:
    per_node = info.local_world_size
    uniform = per_node * info.nodes == info.world_size
    arrived = info.world_size - len(missing)
    detail = f"ranks {_span(missing)} missing, {arrived} of {info.world_size} arrived"
    if not uniform:
        return None, detail
    nodes = sorted({r // per_node for r in missing})
    partial = [n for n in nodes if sum(r // per_node == n for r in missing) < per_node]
    if partial:  # the node arrived but some of its ranks did not: say ranks, not nodes
        return None, detail
    return nodes, detail


def _wait_for_listener(addr: str, port: int, timeout_s: float, node_rank: int) -> None:
    """Until something accepts connections at addr:port (quietly, unlike a TCPStore client, which
    logs a C++ stack per attempt and retries past its timeout)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((addr, port), timeout=5):
                return
        except socket.gaierror as e:
            raise RendezvousError(f"the master address '{addr}' does not resolve ({e}) — use "
                                  "node 0's IP address or a name every node can resolve") from e
        except OSError:
            if time.monotonic() >= deadline:
                raise RendezvousError(could_not_reach(node_rank, f"{addr}:{port}", timeout_s)
                                      ) from None
            time.sleep(0.5)


def _meet(info: LauncherInfo, timeout_s: int):
    """Every rank checks in on a TCP store at MASTER_ADDR:MASTER_PORT and waits for all the
    others, so a node that never arrives is named instead of a bare store timeout. Under torchrun
    and accelerate the launcher's own store already listens there; otherwise rank 0 hosts it."""
    from torch.distributed import PrefixStore, TCPStore

    where = f"{info.master_addr}:{info.master_port}"
    timeout = datetime.timedelta(seconds=timeout_s)
    server = info.rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    if not server:
        _wait_for_listener(info.master_addr, info.master_port, timeout_s, info.node_rank)
    try:
        store = TCPStore(info.master_addr, info.master_port, None, server, timeout,
                         wait_for_workers=False, multi_tenant=True)
    except Exception as e:  # DistNetworkError, DistStoreError, RuntimeError: torch's wording
        if server:
            raise RendezvousError(
                f"rank 0 could not listen at {where}: {e} — pick a free --master-port (or "
                "MASTER_PORT)") from e
        raise RendezvousError(could_not_reach(info.node_rank, where, timeout_s)) from e
    # A store torchrun's agent shares with every start of the ranks keeps the keys of the ones
    # before: name this start's. A fresh store per start (elastic launches) needs no name, and
    # must not take one from the agents' restart counts, which differ between nodes there.
    shared = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") if shared else "0"
    meet = PrefixStore(f"dpkit_meet/{attempt}", store)
    meet.set(str(info.rank), f"{info.node_rank} {socket.gethostname()}")
    keys = [str(r) for r in range(info.world_size)]
    try:  # the store's host waits a little longer, so the others can still ask it who is missing
        meet.wait(keys, timeout + datetime.timedelta(seconds=5 if server else 0))
    except Exception as e:
        try:
            missing = [r for r in range(info.world_size) if not meet.check([str(r)])]
        except Exception:  # the store's host went away while we waited
            raise RendezvousError(could_not_reach(info.node_rank, where, timeout_s)) from e
        nodes, detail = _missing_nodes(missing, info)
        raise RendezvousError(never_joined(nodes, info.nodes, where, timeout_s, detail)) from e
    return store


def is_main_process() -> bool:
    """Before the process group exists too: rank 0 prints user errors, the others stay quiet."""
    return launcher_env()[0] == 0


def backend_for_device() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


_ENV: DistEnv | None = None


def setup(timeout_s: int) -> DistEnv:
    """Start the process group once per process (safe to call again: runs share it)."""
    global _ENV
    if _ENV is not None:
        return _ENV
    import deepspeed

    info = launcher_info()
    rank, local_rank, world_size = info.rank, info.local_rank, info.world_size
    if info.launcher == "slurm":  # DeepSpeed (and torch) read the torchrun names
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world_size),
                          MASTER_ADDR=info.master_addr, MASTER_PORT=str(info.master_port))
    elif "MASTER_ADDR" not in os.environ:  # started without a launcher: one process
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0",
                          LOCAL_RANK="0", WORLD_SIZE="1")
    backend = backend_for_device()
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    timeout = datetime.timedelta(seconds=timeout_s)
    if world_size > 1 and not torch.distributed.is_initialized():
        store = _meet(info, timeout_s)
        torch.distributed.init_process_group(
            backend, store=torch.distributed.PrefixStore("default_pg", store), rank=rank,
            world_size=world_size, timeout=timeout,
            **({"device_id": device} if backend == "nccl" else {}))
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout, verbose=False)
    global _AGREED
    _AGREED = _agreed_restarts(info, device)
    _ENV = DistEnv(rank, local_rank, world_size, backend, device)
    return _ENV


def shutdown() -> None:
    """End the process group cleanly once the work is done. Leaving it to interpreter exit can
    abort a rank ("terminate called without an active exception") as the collective backend's
    threads are torn down, turning a finished run into a failed launch."""
    global _ENV
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    _ENV = None


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


class MainWorkTimeout(RuntimeError):
    """Rank 0's work alone (a conversion, a merge, a save, lm-eval, an upload) outlasted
    train.single_rank_work_timeout_s, or rank 0 went away during it."""


_WAITS = 0
"""How many waits this process has made: every rank counts the same, which names each wait."""


def wait_for_main(what: str, bound_s: float, every_s: float = 60.0, say=None) -> None:
    """Where rank 0 has just done something alone, the other ranks wait here for it to finish
    (`what`: "convert the checkpoint to the universal format"). Every rank calls it, at the same
    point, after the work. Not a barrier: a barrier is a collective, bounded by
    train.collective_timeout_s, and a conversion or an upload of a large model outlasts that —
    the waiting ranks would fail and the launcher kill rank 0 before it finished (and marked its
    work done), on every retry again. Rank 0 sets a key on the process group's store; the others
    look for the key with no collective pending, saying every `every_s` what they wait for, and
    give up after `bound_s` (train.single_rank_work_timeout_s) with one line naming it."""
    global _WAITS
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return
    from torch.distributed import DistNetworkError
    from torch.distributed.distributed_c10d import _get_default_store

    _WAITS += 1
    key = f"dpkit_main_done/{restart_count()}/{_WAITS}"  # a restarted group: fresh keys
    store, rank = _get_default_store(), torch.distributed.get_rank()
    if rank == 0:
        store.set(key, what)
        return
    if say is None:  # one waiting rank on the terminal, every waiting rank in its own log
        import logging

        say = (lambda line: print(line, flush=True)) if rank == 1 else \
            logging.getLogger("dpkit").info
    start = time.monotonic()
    said_at, pause = start, 0.01
    while True:
        try:  # check, not a timed wait: each timed-out wait logs torch's C++ warnings
            if store.check([key]):
                return
        except DistNetworkError as e:  # rank 0 hosted the store and died
            raise MainWorkTimeout(f"rank {rank}: rank 0 went away while this rank waited for it "
                                  f"to {what} — see rank 0's log (logs/rank0.log)") from e
        now = time.monotonic()
        if now - start >= bound_s:
            raise MainWorkTimeout(
                f"rank {rank} gave up waiting for rank 0 to {what} after {bound_s:g} s "
                "(train.single_rank_work_timeout_s) — raise it if the work needs longer, or see "
                "rank 0's log (logs/rank0.log) for why it stalled")
        if now - said_at >= every_s:
            said_at = now
            say(f"[dpkit] rank {rank}: waiting for rank 0 to {what} ({now - start:.0f} s so far)")
        time.sleep(pause)
        pause = min(2 * pause, 1.0)  # short work is noticed at once, long work costs 1 check/s


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s `obj` (anything picklable) on every rank; `obj` itself without a process
    group. Every rank must call it, at the same point."""
    if not torch.distributed.is_initialized():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over all ranks in one collective (float64: exact for token counts)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t.tolist()
