"""A two-node SLURM cluster on this one machine, to run scripts/slurm/train.sbatch for real.

    apt-get install -y slurm-wlm munge        # Debian's slurm-wlm 22.05 (as root)
    python tests/distributed/launch_slurm.py up
    DPKIT_TEST_SLURM=1 python -m pytest tests/distributed/test_launchers.py -k sbatch
    python tests/distributed/launch_slurm.py down

Nodes n1 and n2 are two slurmd daemons on this host (ports 17001-17002, `slurmd -N`), both
reached at 127.0.0.1; the job's MASTER_ADDR is therefore given as 127.0.0.1 (the names n1/n2 do
not resolve). It writes /etc/slurm/slurm.conf: only for a throwaway machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

CONF = """ClusterName=dpkit
SlurmctldHost={host}
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmdSpoolDir=/var/spool/slurmd/%n
StateSaveLocation=/var/spool/slurmctld
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
SlurmUser=root
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
NodeName=n1 NodeHostname={host} NodeAddr=127.0.0.1 Port=17001 CPUs={cpus} RealMemory=8000
NodeName=n2 NodeHostname={host} NodeAddr=127.0.0.1 Port=17002 CPUs={cpus} RealMemory=8000
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""
PIDS = [Path("/run/slurmd-n1.pid"), Path("/run/slurmd-n2.pid"), Path("/run/slurmctld.pid"),
        Path("/run/munge/munged.pid")]


def up() -> int:
    if not shutil.which("slurmctld") or not shutil.which("munged"):
        print("install first: apt-get install -y slurm-wlm munge", file=sys.stderr)
        return 1
    host = os.uname().nodename
    for d in ("/var/spool/slurmd/n1", "/var/spool/slurmd/n2", "/var/spool/slurmctld",
              "/var/log/slurm", "/run/munge"):
        Path(d).mkdir(parents=True, exist_ok=True)
    Path("/etc/slurm/slurm.conf").write_text(CONF.format(host=host, cpus=os.cpu_count()))
    shutil.chown("/run/munge", "munge", "munge")
    subprocess.run(["su", "-s", "/bin/sh", "munge", "-c", "/usr/sbin/munged"], check=True)
    subprocess.run(["slurmctld"], check=True)
    time.sleep(2)
    for node in ("n1", "n2"):
        subprocess.run(["slurmd", "-N", node], check=True)
    for _ in range(30):
        out = subprocess.run(["sinfo", "-h", "-o", "%T %D"], capture_output=True, text=True).stdout
        if out.split()[:2] == ["idle", "2"]:
            print("SLURM up: 2 idle nodes (n1, n2)")
            return 0
        time.sleep(1)
    print(f"SLURM did not come up: {out!r}; see /var/log/slurm/", file=sys.stderr)
    return 1


def down() -> int:
    for pidfile in PIDS:
        if pidfile.exists():
            try:
                os.kill(int(pidfile.read_text().strip()), signal.SIGTERM)
            except (ProcessLookupError, ValueError):
                pass
    return 0


if __name__ == "__main__":
    sys.exit({"up": up, "down": down}[sys.argv[1]]())
