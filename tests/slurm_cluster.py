"""A real single-node Slurm cluster for the tests: its own munge daemon and key, a generated slurm.conf, slurmctld
and slurmd on free ports, everything under one temporary folder (Debian's slurm-wlm and munge, which
``scripts/setup.sh --test`` installs). ``start`` returns None with the reason when it cannot start one."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("/usr/sbin/munged", "/usr/sbin/slurmctld", "/usr/sbin/slurmd")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *argv, check=True) -> str:
        out = subprocess.run(list(argv), env=self.env, capture_output=True, text=True, timeout=60)
        if check and out.returncode:
            raise RuntimeError(f"{' '.join(argv)}: {out.stderr.strip()}")
        return out.stdout

    def states(self, array: str) -> list[str]:
        """The states squeue lists for a job (array) id, ended ones included."""
        return [line.strip() for line in self.run("squeue", "-h", "-t", "all", "-j", array, "-o", "%T",
                                                   check=False).splitlines() if line.strip()]

    def stop(self) -> None:
        """Cancel every job, give their runs time to record themselves, then end the daemons (killed if need be)."""
        self.run("scancel", "--user", str(os.geteuid()), check=False)
        deadline = time.time() + 40
        while time.time() < deadline and self.run("squeue", "-h", "-o", "%i", check=False).strip():
            time.sleep(0.5)
        pids = []
        for name in ("slurmd", "slurmctld", "munged"):
            try:
                pids.append(int((self.root / f"{name}.pid").read_text()))
            except (OSError, ValueError):
                pass
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
            deadline = time.time() + 10
            while time.time() < deadline and any(Path(f"/proc/{pid}").exists() and "zombie" not in
                                                 _state(pid) for pid in pids):
                time.sleep(0.2)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return "zombie"


def start(root: Path) -> tuple[Cluster | None, str]:
    """(the cluster, "") or (None, why it cannot start)."""
    missing = [d for d in (*DAEMONS, shutil.which("sbatch") or "sbatch") if not Path(d).exists()]
    if missing:
        return None, f"no Slurm here ({', '.join(missing)} missing: scripts/setup.sh --test installs slurm-wlm, munge)"
    if os.geteuid() != 0:
        return None, "a test Slurm cluster needs root (slurmd starts jobs as their user)"
    for sub in ("state", "spool", "log"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    sock = root / "munge.sock"
    host = socket.gethostname().split(".")[0]
    cpus = len(os.sched_getaffinity(0))
    conf = f"""ClusterName=aacetest
SlurmctldHost={host}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={sock}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
ReturnToService=2
MinJobAge=600
KillWait=30
NodeName={host} CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
    (root / "slurm.conf").write_text(conf)
    cluster = Cluster(root)
    try:
        subprocess.run(["/usr/sbin/munged", "--force", f"--key-file={key}", f"--socket={sock}",
                        f"--pid-file={root}/munged.pid", f"--log-file={root}/log/munged.log",
                        f"--seed-file={root}/munge.seed"], check=True, capture_output=True, timeout=30)
        for daemon in ("/usr/sbin/slurmctld", "/usr/sbin/slurmd"):
            subprocess.run([daemon, "-f", str(cluster.conf)], env=cluster.env, check=True, capture_output=True,
                           timeout=30)
    except (OSError, subprocess.SubprocessError) as err:
        cluster.stop()
        return None, f"Slurm did not start ({err})"
    deadline = time.time() + 30
    while time.time() < deadline:
        if "idle" in cluster.run("sinfo", "-h", "-o", "%t", check=False):
            return cluster, ""
        time.sleep(0.5)
    cluster.stop()
    return None, f"Slurm's node did not come up in 30 s (logs in {root}/log)"
