"""A throw-away local Slurm cluster (munged + slurmctld + one slurmd per emulated node) for tests.

Debian bookworm's Slurm 22.05 and munge run as root inside this container. :class:`LocalSlurm` writes
a fresh ``slurm.conf`` under a world-traversable temporary directory (munged refuses a socket path
with any directory lacking o+x, so pytest's 0700 ``tmp_path`` cannot be used), starts the daemons
with ``Popen`` on free ports, waits until every node is exactly ``idle`` and stops them again by the
PIDs it started.

Several ``NodeName`` entries on the same host are emulated with one ``slurmd -N <name>`` per node,
each on its own port and spool directory; every node has ``NodeAddr=127.0.0.1``.

Example::

    cluster = LocalSlurm(nodes=2, cpus_per_node=2).start()
    jid = cluster.sbatch(["--wrap", "hostname"])
    info = cluster.wait(jid)          # {"JobState": "COMPLETED", "ExitCode": "0:0", ...}
    cluster.stop()
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

__all__ = ["LocalSlurm", "ensure_slurm_installed", "free_port", "parse_job_record"]

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["munged", "mungekey", "slurmctld", "slurmd", "sbatch", "sinfo", "squeue", "scontrol", "scancel"]

_CONF = """\
ClusterName=localtest
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
AuthType=auth/munge
AuthInfo=socket={base}/munge/munge.socket,cred_expire=5
CredType=cred/munge
StateSaveLocation={base}/state
SlurmdSpoolDir={base}/spool/%n
SlurmctldPidFile={base}/run/slurmctld.pid
SlurmdPidFile={base}/run/slurmd-%n.pid
SlurmctldLogFile={base}/log/slurmctld.log
SlurmdLogFile={base}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
JobRequeue=1
"""


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now.

    Returns:
        The port number (the OS picked it; another process may take it later, which is unlikely).
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_slurm_installed() -> Optional[str]:
    """Make sure the Slurm and munge binaries exist, installing the Debian packages as root.

    Returns:
        None when everything is there (possibly after ``apt-get install``), otherwise the reason
        why a test that needs the cluster has to be skipped.
    """
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if not missing:
        return None
    if os.geteuid() != 0:
        return f"{', '.join(missing)} not installed and not root (apt-get install {' '.join(PACKAGES)})"
    if shutil.which("apt-get") is None:
        return f"{', '.join(missing)} not installed and no apt-get to install {' '.join(PACKAGES)}"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            return f"`{' '.join(cmd)}` failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}"
    missing = [b for b in BINARIES if shutil.which(b) is None]
    return f"still missing after apt-get install: {', '.join(missing)}" if missing else None


def parse_job_record(text: str) -> dict:
    """Parse one line of ``scontrol show job -o`` into a dict of its ``Key=Value`` fields."""
    out = {}
    for item in text.split():
        if "=" in item:
            key, value = item.split("=", 1)
            out[key] = value
    return out


class LocalSlurm:
    """A single-host Slurm cluster with ``nodes`` emulated nodes of ``cpus_per_node`` CPUs each.

    Args:
        nodes: number of ``NodeName`` entries (one slurmd each, all on this host).
        cpus_per_node: CPUs every node offers (may exceed the real cores: jobs here are tiny).
        root: parent directory of the cluster's directory (default: the system temp dir); it and
            every directory above must be world-traversable for munged.
    """

    def __init__(self, nodes: int = 1, cpus_per_node: int = 2, root: Optional[str] = None):
        self.nodes = nodes
        self.cpus_per_node = cpus_per_node
        self.root = root
        self.base: Optional[Path] = None
        self.conf: Optional[Path] = None
        self.env: dict = {}
        self.node_names = [f"n{i + 1}" for i in range(nodes)]
        self._procs: list[tuple[str, subprocess.Popen]] = []
        self._logs: list = []

    # -------------------------------------------------------------------------------- lifecycle
    def start(self, timeout: float = 30.0) -> "LocalSlurm":
        """Write the config, start munged, slurmctld and the slurmds; wait until all nodes are idle.

        Returns:
            self, with ``env`` (os.environ plus SLURM_CONF) ready for client commands.

        Raises:
            RuntimeError: a daemon died or the nodes did not become idle within ``timeout`` seconds
                (the message holds the tail of the relevant log).
        """
        base = Path(tempfile.mkdtemp(prefix="dist-sparse-slurm-", dir=self.root))
        os.chmod(base, 0o755)
        self.base = base
        for d in ("etc", "state", "spool", "log", "run", "munge"):
            (base / d).mkdir()
        for name in self.node_names:
            (base / "spool" / name).mkdir()
        os.chmod(base / "munge", 0o755)
        key = base / "munge" / "munge.key"
        subprocess.run(["mungekey", "-c", "-k", str(key)], check=True, capture_output=True)
        os.chmod(key, 0o600)
        try:
            sock = base / "munge" / "munge.socket"
            munged = self._spawn("munged", ["munged", "-F", f"--key-file={key}", f"--socket={sock}",
                                            f"--pid-file={base}/munge/munged.pid",
                                            f"--log-file={base}/munge/munged.log",
                                            f"--seed-file={base}/munge/munged.seed"], os.environ)
            deadline = time.monotonic() + 10
            while not sock.exists() and munged.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if not sock.exists():
                raise RuntimeError("munged did not start: " + self._tail("munged.out"))
            self.conf = base / "etc" / "slurm.conf"
            self.conf.write_text(self._render_conf())
            self.env = dict(os.environ, SLURM_CONF=str(self.conf))
            self._spawn("slurmctld", ["slurmctld", "-D", "-i"], self.env)
            for name in self.node_names:
                self._spawn(f"slurmd-{name}", ["slurmd", "-D", "-N", name], self.env)
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the daemons this object started, by their own PIDs (slurmds first, munged last)."""
        for name, proc in reversed(self._procs):
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs.clear()
        for fh in self._logs:
            fh.close()
        self._logs.clear()

    def _spawn(self, name: str, cmd: list[str], env: dict) -> subprocess.Popen:
        log = open(self.base / "log" / f"{name}.out", "wb")
        self._logs.append(log)
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self._procs.append((name, proc))
        return proc

    def _render_conf(self) -> str:
        mem_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20 * 8 // 10 // self.nodes
        text = _CONF.format(host=socket.gethostname(), base=self.base, ctld_port=free_port())
        c = self.cpus_per_node
        for name in self.node_names:
            text += (f"NodeName={name} NodeHostname={socket.gethostname()} NodeAddr=127.0.0.1 Port={free_port()} "
                     f"CPUs={c} Sockets=1 CoresPerSocket={c} ThreadsPerCore=1 RealMemory={mem_mb} State=UNKNOWN\n")
        text += "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP\n"
        return text

    def _tail(self, log: str, n: int = 2000) -> str:
        path = self.base / "log" / log
        return path.read_text(errors="replace")[-n:] if path.exists() else f"({path} missing)"

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        want = sorted(self.node_names)
        while True:
            r = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False)
            states = dict(line.split() for line in r.stdout.splitlines() if len(line.split()) == 2)
            # exact "idle": "idle*" means registered but not responding
            if sorted(states) == want and all(states[n] == "idle" for n in want):
                return
            dead = [name for name, p in self._procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                why = f"{', '.join(dead)} exited" if dead else f"nodes not idle after {timeout:.0f} s: {states}"
                raise RuntimeError(f"local slurm did not come up ({why}); slurmctld log:\n"
                                   + self._tail("slurmctld.log") + "\nslurmd log:\n"
                                   + self._tail(f"slurmd-{self.node_names[0]}.log"))
            time.sleep(0.1)

    # -------------------------------------------------------------------------------- clients
    @property
    def client_env(self) -> dict:
        """The one variable client commands need on top of the environment: ``{"SLURM_CONF": path}``."""
        return {"SLURM_CONF": str(self.conf)}

    def run(self, cmd: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
        """Run a client command with SLURM_CONF set; returns the CompletedProcess (text mode)."""
        return subprocess.run(cmd, env=kw.pop("env", self.env), capture_output=True, text=True, check=check, **kw)

    def sbatch(self, args: list[str]) -> str:
        """``sbatch --parsable ARGS``; returns the job id (for an array: the array's job id)."""
        out = self.run(["sbatch", "--parsable", *args]).stdout.strip()
        return out.split(";")[0]

    def job(self, jobid: str) -> list[dict]:
        """The ``scontrol show job -o`` records of a job (one per array task); [] when unknown."""
        r = self.run(["scontrol", "show", "job", "-o", str(jobid)], check=False)
        return [parse_job_record(line) for line in r.stdout.splitlines() if line.strip()]

    def in_queue(self, jobid: str) -> bool:
        """Whether any part of the job is still pending, running or completing."""
        return bool(self.run(["squeue", "-h", "-j", str(jobid)], check=False).stdout.strip())

    def wait_state(self, jobid: str, states: set, timeout: float = 120.0) -> dict:
        """Poll (every 0.2 s) until the job's first record reaches one of ``states``; returns it."""
        deadline = time.monotonic() + timeout
        while True:
            recs = self.job(jobid)
            if recs and recs[0].get("JobState") in states:
                return recs[0]
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {jobid} not in {sorted(states)} after {timeout:.0f} s: {recs[:1]}")
            time.sleep(0.2)

    def wait(self, jobid: str, timeout: float = 120.0) -> list[dict]:
        """Poll squeue every 0.2 s until the job (all array tasks) left the queue.

        Returns:
            The job's final ``scontrol show job -o`` records (one per array task).

        Raises:
            TimeoutError: still queued after ``timeout`` seconds (the job is cancelled first).
        """
        deadline = time.monotonic() + timeout
        while self.in_queue(jobid):
            if time.monotonic() > deadline:
                self.run(["scancel", str(jobid)], check=False)
                raise TimeoutError(f"job {jobid} still queued after {timeout:.0f} s")
            time.sleep(0.2)
        return self.job(jobid)
