"""`dpkit doctor [--hostfile H]`: is this machine, and every node of a hostfile, ready to train?

Each check prints `ok` or `FAIL` with what is wrong and what to do; the exit code is 1 when
anything failed, 0 otherwise.

- versions of python, torch, deepspeed, transformers, accelerate, peft, CUDA and NCCL, and every
  dependency of dpkit installed in the range it needs;
- with a hostfile: the same versions on every node, read by running `python -m dpkit.doctor
  --report-json` on each host over ssh (the way the deepspeed launcher reaches nodes, so this also
  proves passwordless ssh and the same paths everywhere); hosts that are this machine are read
  locally; GPUs per node against the hostfile's slots;
- the master port free on this machine;
- no stale lock of an interrupted JIT op build under the torch extensions directory (a build
  killed midway leaves `<op>/lock`, and every later launch that loads the op waits on it forever);
- an all-reduce on 2 ranks over the backend training uses (gloo on CPU, nccl on GPU; NCCL cannot
  put two ranks on one GPU, so with one GPU it runs on 1 rank), which must finish in `--timeout`.

Runs without pydantic or the recipe code, so `python -m dpkit.doctor` works on a half-set-up node.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path

from dpkit.errors import Problem  # a dataclass: nothing else is imported

PACKAGES = ("torch", "deepspeed", "transformers", "accelerate", "peft")
SAME_EVERYWHERE = ("python", *PACKAGES, "cuda", "nccl")


# -------------------------------------------------------------------------------- this machine
def report() -> dict:
    """This machine: host name, versions (None: not installed), GPU count."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["cuda"] = versions["nccl"] = None
    gpus = 0
    try:
        import torch

        versions["cuda"] = torch.version.cuda
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if torch.version.cuda:
            try:
                versions["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
            except Exception:  # a CUDA build without NCCL
                pass
    except ImportError:
        pass
    return {"host": socket.gethostname(), "versions": versions, "gpus": gpus}


def requirement_problems() -> tuple[list[str], list[str]]:
    """dpkit's declared dependencies: installed, and in range. (ok lines, problems)"""
    try:
        from packaging.requirements import Requirement
    except ImportError:
        return [], ["the `packaging` module is missing — pip install packaging"]
    try:
        requires = metadata.requires("dpkit") or []
    except metadata.PackageNotFoundError:
        return ["dpkit is not pip-installed here: dependency ranges not checked"], []
    ok, problems = [], []
    for line in requires:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # an extra (dev): not needed to train
        try:
            have = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            problems.append(f"{req.name} is not installed (dpkit needs {req}) — pip install "
                            f"'{req}' (or the whole set: pip install -c constraints.txt -e .)")
            continue
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            problems.append(f"{req.name} {have} is outside the range dpkit needs ({req}) — "
                            f"pip install '{req}'")
        else:
            ok.append(f"{req.name} {have}")
    return ok, problems


def port_problem(port: int) -> str | None:
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError as e:
            from dpkit.distributed import free_port

            return (f"port {port} is in use on this machine ({e.strerror}) — node 0 listens there: "
                    f"pass --master-port to dpkit train (e.g. {free_port()}, free now)")
    return None


# ------------------------------------------------------------------------- JIT op build locks
STALE_LOCK_S = 60  # a lock this old with no build running in its folder is left over


def extensions_roots() -> list[Path]:
    """Where torch (and DeepSpeed, through it) JIT-builds ops for this Python, as
    torch.utils.cpp_extension._get_build_directory picks it: TORCH_EXTENSIONS_DIR, else
    <cache>/torch_extensions/py<version>_<accelerator> (every accelerator: no torch import)."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return [Path(os.environ["TORCH_EXTENSIONS_DIR"])]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "torch_extensions"
    tag = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}_"
    return sorted(p for p in cache.glob(f"{tag}*") if p.is_dir())


def _build_folders_in_use() -> set[Path] | None:
    """Folders some process of this machine works in (ninja and the compilers run in the op's
    build folder); None where /proc can't tell."""
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    folders = set()
    for pid in proc.iterdir():
        if pid.name.isdigit():
            try:
                folders.add(Path(os.readlink(pid / "cwd")))
            except OSError:  # gone, or another user's
                pass
    return folders


def stale_build_locks(now: float | None = None) -> list[tuple[Path, float]]:
    """(lock file, age in seconds) for every op build lock with no live owner: torch's FileBaton
    only checks that the file exists, so a build killed midway leaves a lock that makes the next
    build of that op wait forever, silently. Stale: older than STALE_LOCK_S and no process
    working in its folder (without /proc: older than 10 minutes)."""
    now = time.time() if now is None else now
    busy = _build_folders_in_use()
    found = []
    for root in extensions_roots():
        for lock in sorted(root.glob("*/lock")):
            try:
                age = now - lock.stat().st_mtime
            except OSError:  # released meanwhile
                continue
            if busy is None:
                stale = age >= 600
            else:
                stale = age >= STALE_LOCK_S and lock.parent.resolve() not in busy
            if stale:
                found.append((lock, age))
    return found


def stale_lock_problems() -> list[Problem]:
    """One line per stale lock: the file, and the command that removes it."""
    return [Problem(str(lock), f"left over from an interrupted build of the '{lock.parent.name}' "
                    f"op ({age / 60:.0f} min old, no build running on this machine): the next "
                    "launch that loads this op waits on it forever, silently",
                    f"remove it: rm {shlex.quote(str(lock))}")
            for lock, age in stale_build_locks()]


# ------------------------------------------------------------------------------------ all-reduce
def _worker(rank: int, world: int, port: int, backend: str, timeout_s: float) -> int:
    import torch
    import torch.distributed as dist

    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
    t = torch.full((1024,), float(rank + 1), device=device)
    dist.all_reduce(t)
    expected = world * (world + 1) / 2
    print(json.dumps({"rank": rank, "ok": bool((t == expected).all()), "got": float(t[0]),
                      "expected": expected}), flush=True)
    dist.destroy_process_group()
    return 0


def allreduce(backend: str, world: int, timeout_s: float) -> tuple[bool, str]:
    """Start `world` ranks on this machine, all-reduce once; (passed, what happened)."""
    from dpkit.distributed import free_port

    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    t0 = time.monotonic()
    procs = [subprocess.Popen([sys.executable, "-m", "dpkit.doctor", "--allreduce-rank", str(r),
                               "--world", str(world), "--port", str(port), "--backend", backend,
                               "--timeout", str(timeout_s)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for r in range(world)]
    results = []
    try:
        for p in procs:
            left = max(1.0, timeout_s - (time.monotonic() - t0))
            results.append(p.communicate(timeout=left))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        for p in procs:
            p.communicate()
        return False, (f"all-reduce over {backend} on {world} ranks did not finish within "
                       f"{timeout_s:g} s — a firewall on 127.0.0.1, or a broken {backend} install")
    elapsed = time.monotonic() - t0
    for r, ((out, err), p) in enumerate(zip(results, procs)):
        line = (out.strip().splitlines() or ["{}"])[-1]
        try:
            got = json.loads(line)
        except json.JSONDecodeError:
            got = {}
        if p.returncode != 0 or not got.get("ok"):
            tail = (err.strip().splitlines() or ["no output"])[-1]
            return False, (f"all-reduce over {backend} failed on rank {r} (exit {p.returncode}"
                           + (f", got {got.get('got')} instead of {got.get('expected')}"
                              if "got" in got else "") + f"): {tail}")
    return True, f"all-reduce over {backend} on {world} rank(s): correct sum in {elapsed:.1f} s"


# --------------------------------------------------------------------------------- other nodes
def remote_report(host: str, timeout_s: float) -> dict:
    """Run this module on `host` over ssh (deepspeed's launcher reaches nodes the same way), from
    the same directory with the same Python: a cluster with a shared file system has both."""
    ssh = shlex.split(os.environ.get("DPKIT_SSH", "ssh -o BatchMode=yes -o ConnectTimeout=10"))
    remote = (f"cd {shlex.quote(os.getcwd())} && {shlex.quote(sys.executable)} -m dpkit.doctor "
              "--report-json")
    try:
        # `--`: the host name ends ssh's options (hostfile names are checked too, in launch).
        proc = subprocess.run([*ssh, "--", host, remote], capture_output=True, text=True,
                              timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(str(e)) from e
    lines = proc.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"exit {proc.returncode}: {tail}") from None


def compare(reports: dict[str, dict]) -> list[str]:
    """One problem per version that differs between nodes, naming which node has which."""
    problems = []
    for key in SAME_EVERYWHERE:
        seen: dict[str, list[str]] = {}
        for host, rep in reports.items():
            seen.setdefault(str(rep["versions"].get(key)), []).append(host)
        if len(seen) > 1:
            where = "; ".join(f"{v if v != 'None' else 'missing'} on {', '.join(h)}"
                              for v, h in seen.items())
            problems.append(f"{key} differs between nodes: {where} — install the same versions "
                            "on every node (pip install -c constraints.txt ...)")
    return problems


# ---------------------------------------------------------------------------------------- main
def run_checks(hostfile: str | None, master_port: int, backend: str, timeout_s: float,
               allreduce_check: bool = True, out=print) -> int:
    problems: list[str] = []

    def ok(text: str) -> None:
        out(f"  ok    {text}")

    def fail(text: str) -> None:
        problems.append(text)
        out(f"  FAIL  {text}")

    here = report()
    v = here["versions"]
    gpus = here["gpus"]
    out(f"dpkit doctor on {here['host']} ({os.cpu_count()} CPU cores, "
        + (f"{gpus} GPU{'s' * (gpus > 1)})" if gpus else "no GPU)"))
    for name in ("python", *PACKAGES):
        (ok if v[name] else fail)(f"{name} {v[name]}" if v[name] else
                                  f"{name} is not installed — pip install -c constraints.txt -e .")
    if v["cuda"]:
        ok(f"CUDA {v['cuda']}, NCCL {v['nccl'] or 'not found'}, {gpus} GPU(s) visible")
        if v["nccl"] is None:
            fail("this CUDA build of torch has no NCCL — install a torch wheel built with it")
    else:
        ok("CUDA none (CPU build of torch): training runs on CPU over gloo, NCCL not used")
    good, bad = requirement_problems()
    if good:
        ok("dpkit's dependencies in range: " + ", ".join(good))
    for p in bad:
        fail(p)

    if hostfile:
        from dpkit.launch import local_names, read_hostfile

        try:
            hosts = read_hostfile(hostfile)
        except (OSError, ValueError) as e:
            hosts = []
            fail(f"--hostfile {hostfile}: {e} — write one `host slots=N` line per node")
        local = local_names()
        reports = {h: here for h, _ in hosts if h in local}
        remote = [h for h, _ in hosts if h not in local]
        with ThreadPoolExecutor(max_workers=min(16, max(1, len(remote)))) as pool:
            futures = {h: pool.submit(remote_report, h, timeout_s) for h in remote}
            for h, fut in futures.items():
                try:
                    reports[h] = fut.result()
                    ok(f"{h}: reached over ssh")
                except RuntimeError as e:
                    fail(f"{h}: could not run dpkit there over ssh ({e}) — the deepspeed "
                         "launcher needs passwordless ssh, and this check the same paths on every "
                         "node; without ssh, run `dpkit doctor` on each node and compare")
        if hosts:
            diffs = compare(reports)
            for p in diffs:
                fail(p)
            if not diffs and len(reports) > 1:
                ok(f"same versions on all {len(reports)} nodes reached")
            for h, slots in hosts:
                n = reports.get(h, {}).get("gpus", 0)
                if n and slots > n:
                    fail(f"{h}: the hostfile gives {slots} slots but it has {n} GPUs — one rank "
                         "per GPU: lower its slots")

    locks = stale_lock_problems()
    for lock in locks:
        fail(str(lock))
    if not locks:
        ok("no stale JIT op build lock in "
           + (", ".join(map(str, extensions_roots())) or "the torch extensions directory"))

    p = port_problem(master_port)
    if p:
        fail(p)
    else:
        ok(f"port {master_port} free (node 0's rendezvous port)")

    if backend == "auto":
        backend = "nccl" if gpus else "gloo"
    if allreduce_check:
        world = 2 if backend == "gloo" else min(2, max(gpus, 1))
        passed, what = allreduce(backend, world, timeout_s)
        if passed and backend == "nccl" and world == 1:
            what += " (one GPU: NCCL cannot run two ranks on one GPU)"
        (ok if passed else fail)(what)

    if problems:
        out(f"{len(problems)} problem{'s' * (len(problems) > 1)} found")
        return 1
    out("all checks passed")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hostfile", help="`host slots=N` per line: check every node (over ssh)")
    p.add_argument("--master-port", type=int, default=29500,
                   help="node 0's rendezvous port, checked free here (default 29500)")
    p.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto",
                   help="backend of the all-reduce (default: nccl with GPUs, else gloo)")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds for the all-reduce and for each node's ssh check (default 60)")
    p.add_argument("--no-allreduce", action="store_true", help="skip the all-reduce")


def _cmd(args) -> int:
    return run_checks(args.hostfile, args.master_port, args.backend, args.timeout,
                      not args.no_allreduce)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpkit.doctor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--report-json", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--allreduce-rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.report_json:
        print(json.dumps(report()))
        return 0
    if args.allreduce_rank is not None:
        return _worker(args.allreduce_rank, args.world, args.port, args.backend, args.timeout)
    return _cmd(args)


if __name__ == "__main__":
    sys.exit(main())
