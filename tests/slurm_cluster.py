"""A real, throwaway SLURM cluster on this machine, for testing job scripts.

Use:
    with SlurmCluster(nodes=2) as cluster:          # nodes=1 or 2
        job = cluster.sbatch(["launch/slurm_multi.sbatch"], env={...})
        info = cluster.wait(job)                    # scontrol's fields, e.g. info["JobState"]

    slurm1 = cluster_fixture(nodes=1)               # in a test module: a module-scoped fixture

Every node is a network namespace of its own (``ip netns``) with its own hostname and /etc/hosts, so
the daemons' ports never meet anything on the host; nodes talk over a veth pair. The
controller and client commands run in node 0's namespace. munged runs with a private socket and key
in a scratch directory. Everything started here is stopped by PID on exit, stray job processes are
found through ``ip netns pids``, and the namespaces are deleted.

Debian's packages are installed with apt-get when missing. Where that cannot happen (not root, no
apt-get, no network namespaces) ``unavailable_reason`` says why and the fixture skips.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

PACKAGES = ["munge", "slurmctld", "slurmd", "slurm-client"]
DAEMONS = ["/usr/sbin/munged", "/usr/sbin/slurmctld", "/usr/sbin/slurmd"]
CLIENTS = ["sbatch", "scontrol", "sinfo", "scancel", "squeue"]
# A requeued job may start only once its old credential has expired (SLURM's default: 120 s), and
# then at the next pass of the scheduling loop (sched_interval=1 below; SLURM's default: 60 s).
CRED_EXPIRE = 10
SUBNET = "10.231.77"  # inside our own namespaces only: it cannot clash with the host's routes


def _missing_binaries() -> list[str]:
    return [b for b in DAEMONS if not os.path.exists(b)] + [
        c for c in CLIENTS if shutil.which(c) is None
    ]


def _apt_install() -> str | None:
    """Install the SLURM packages; returns why not, or None on success."""
    if shutil.which("apt-get") is None:
        return "SLURM is not installed and there is no apt-get"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [
        "apt-get",
        "install",
        "-y",
        "-q",
        "--no-install-recommends",
        "-o",
        "DPkg::Lock::Timeout=300",
        *PACKAGES,
    ]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        # A fresh machine has no package lists yet.
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        res = subprocess.run(install, env=env, capture_output=True, text=True)
        if res.returncode != 0:
            return f"apt-get install {' '.join(PACKAGES)} failed: {res.stderr[-500:]}"
    return None


def unavailable_reason() -> str | None:
    """None when a cluster can be brought up here (installing SLURM if needed), else why not."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "a local SLURM cluster needs root"
    for tool in ("ip", "nsenter", "unshare", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if _missing_binaries():
        reason = _apt_install()
        if reason:
            return reason
        if _missing_binaries():
            return f"still missing after install: {_missing_binaries()}"
    probe = f"cltkprobe{os.getpid()}"
    if subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode != 0:
        return "cannot create network namespaces here"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


class SlurmCluster:
    """Context manager: ``nodes`` slurmd daemons (1 or 2), one slurmctld, one munged."""

    _count = 0

    def __init__(self, nodes: int = 1, cpus: int | None = None, scratch: str | None = None):
        if nodes not in (1, 2):
            raise ValueError(f"nodes must be 1 or 2, got {nodes}")
        self.nodes = nodes
        self.cpus = cpus or os.cpu_count() or 1
        SlurmCluster._count += 1  # two clusters may be up at once in one test process
        tag = f"cltk{os.getpid()}c{SlurmCluster._count}"
        self.netns = [f"{tag}n{i}" for i in range(nodes)]
        self.hostnames = [f"cltk-node{i}" for i in range(nodes)]
        self.addrs = [f"{SUBNET}.{i + 1}" for i in range(nodes)]
        self.scratch = Path(scratch or tempfile.mkdtemp(prefix="cltk-slurm-"))
        self.conf = self.scratch / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._procs: list[subprocess.Popen] = []
        self._made_netns: list[str] = []

    # -- bring-up ----------------------------------------------------------------------------

    def __enter__(self) -> SlurmCluster:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _start(self) -> None:
        s = self.scratch
        s.chmod(0o755)  # munged (user munge) must reach its directory inside
        for d in ("state", "spool", "log"):
            (s / d).mkdir(parents=True, exist_ok=True)
        self._start_munge()
        self._make_network()
        hosts = s / "hosts"
        lines = ["127.0.0.1 localhost"] + [f"{a} {h}" for a, h in zip(self.addrs, self.hostnames)]
        hosts.write_text("\n".join(lines) + "\n")
        self.conf.write_text(self._slurm_conf())
        self._spawn(0, ["/usr/sbin/slurmctld", "-D", "-i", "-f", str(self.conf)], "slurmctld")
        for i, name in enumerate(self.hostnames):
            (s / "spool" / name).mkdir(exist_ok=True)
            self._spawn(i, ["/usr/sbin/slurmd", "-D", "-N", name, "-f", str(self.conf)], name)
        self._wait_idle(timeout=60)

    def _start_munge(self) -> None:
        import pwd

        m = self.scratch / "munge"
        m.mkdir()
        key = m / "munge.key"
        key.write_bytes(os.urandom(1024))
        user = pwd.getpwnam("munge")
        for p in (m, key):
            os.chown(p, user.pw_uid, user.pw_gid)
        m.chmod(0o755)  # munged wants the socket directory searchable by all
        key.chmod(0o400)
        self.munge_socket = m / "munge.sock"
        cmd = [
            "/usr/sbin/munged",
            "-F",
            f"--socket={self.munge_socket}",
            f"--key-file={key}",
            f"--pid-file={m / 'munged.pid'}",
            f"--log-file={m / 'munged.log'}",
            f"--seed-file={m / 'munged.seed'}",
        ]
        # Popen(user=) execs munged itself (no runuser in between), so its PID is the daemon's.
        proc = subprocess.Popen(
            cmd,
            user="munge",
            group="munge",
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._procs.append(proc)
        self._until(lambda: self.munge_socket.exists(), 15, "munged socket", proc)

    def _make_network(self) -> None:
        for ns in self.netns:
            _run(["ip", "netns", "add", ns])
            self._made_netns.append(ns)
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        # Even one node needs a non-loopback address: the daemons bind with AI_ADDRCONFIG, which
        # finds nothing when only lo is up. Two nodes get one end of the veth pair each; one node
        # keeps both ends (gVisor has no dummy interfaces).
        ends = [self.netns[0], self.netns[-1]]
        _run(
            [
                "ip",
                "link",
                "add",
                "veth0",
                "netns",
                ends[0],
                "type",
                "veth",
                "peer",
                "name",
                "veth1",
                "netns",
                ends[1],
            ]
        )
        for i, ns in enumerate(ends):
            if i < self.nodes:
                _run(["ip", "-n", ns, "addr", "add", f"{self.addrs[i]}/24", "dev", f"veth{i}"])
            _run(["ip", "-n", ns, "link", "set", f"veth{i}", "up"])

    def _slurm_conf(self) -> str:
        s = self.scratch
        nodes = "\n".join(
            f"NodeName={h} NodeAddr={a} CPUs={self.cpus} RealMemory=1024 State=UNKNOWN"
            for h, a in zip(self.hostnames, self.addrs)
        )
        # Plugins chosen to need no cgroups, systemd or accounting database (DESIGN.md).
        return f"""\
ClusterName=cltktest
SlurmctldHost={self.hostnames[0]}({self.addrs[0]})
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket={self.munge_socket},cred_expire={CRED_EXPIRE}
StateSaveLocation={s}/state
SlurmdSpoolDir={s}/spool/%n
SlurmctldPidFile={s}/slurmctld.pid
SlurmdPidFile={s}/slurmd-%n.pid
SlurmctldLogFile={s}/log/slurmctld.log
SlurmdLogFile={s}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
MinJobAge=600
KillWait=5
{nodes}
PartitionName=main Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""

    def _ns_prefix(self, node: int) -> list[str]:
        """Enter node's network namespace, plus its own hostname and /etc/hosts.

        ``nsenter``, not ``ip netns exec``: the latter remounts /sys and slurmd then fails. Neither
        nsenter nor unshare (without --fork) forks, so a spawned daemon keeps the Popen's PID.
        """
        setup = (
            f"hostname {self.hostnames[node]} && "
            f'mount --bind {self.scratch / "hosts"} /etc/hosts && exec "$@"'
        )
        return [
            "nsenter",
            f"--net=/run/netns/{self.netns[node]}",
            "unshare",
            "--mount",
            "--uts",
            "sh",
            "-c",
            setup,
            "sh",
        ]

    def _spawn(self, node: int, cmd: list[str], name: str) -> None:
        log = open(self.scratch / "log" / f"{name}.stdout", "w")
        proc = subprocess.Popen(
            self._ns_prefix(node) + cmd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self._procs.append(proc)

    def _wait_idle(self, timeout: float) -> None:
        def all_idle() -> bool:
            res = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False)
            states = dict(line.split() for line in res.stdout.splitlines() if line.strip())
            return all(states.get(h) == "idle" for h in self.hostnames)

        self._until(all_idle, timeout, "idle nodes")

    def _until(self, ok, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
        deadline = time.monotonic() + timeout
        while not ok():
            died = [p for p in ([proc] if proc else self._procs) if p.poll() is not None]
            if died or time.monotonic() > deadline:
                why = f"exited {died[0].returncode}" if died else f"not ready in {timeout}s"
                raise RuntimeError(f"SLURM test cluster: {what}: {why}\n{self.logs()}")
            time.sleep(0.3)

    # -- use ---------------------------------------------------------------------------------

    def run(self, cmd: list[str], env: dict | None = None, check: bool = True, **kw):
        """Run a client command (sbatch, scontrol, ...) in node 0's network namespace."""
        full = ["nsenter", f"--net=/run/netns/{self.netns[0]}", *cmd]
        res = subprocess.run(
            full, env={**self.env, **(env or {})}, capture_output=True, text=True, **kw
        )
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {res.returncode}: {res.stderr}")
        return res

    def sbatch(self, args: list[str], env: dict | None = None, cwd: str | None = None) -> str:
        """Submit; returns the job id. ``args`` are sbatch's options, the script and its args."""
        return self.run(["sbatch", "--parsable", *args], env=env, cwd=cwd).stdout.strip()

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict of its Key=Value fields."""
        out = self.run(["scontrol", "show", "job", "-o", job_id]).stdout
        return dict(f.split("=", 1) for f in out.split() if "=" in f)

    def wait(self, job_id: str, timeout: float = 300, restarts: int = 0) -> dict[str, str]:
        """Poll until the job ends (after ``restarts`` requeues); polling is faster than --wait."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            ended = info["JobState"] in {
                "COMPLETED",
                "FAILED",
                "CANCELLED",
                "TIMEOUT",
                "NODE_FAIL",
                "OUT_OF_MEMORY",
                "BOOT_FAIL",
                "DEADLINE",
            }
            if ended and int(info.get("Restarts", 0)) >= restarts:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {info['JobState']} after {timeout}s")
            time.sleep(0.5)

    def logs(self, tail: int = 2000) -> str:
        out = []
        for f in sorted((self.scratch / "log").glob("*")) + [self.scratch / "munge/munged.log"]:
            if f.exists():
                out.append(f"--- {f.name}\n{f.read_text(errors='replace')[-tail:]}")
        return "\n".join(out)

    # -- tear-down ---------------------------------------------------------------------------

    def stop(self) -> None:
        """Cancel jobs, stop our daemons by PID, kill what is left in our namespaces, clean up."""
        if len(self._procs) > 1 and self._procs[1].poll() is None:  # slurmctld is up
            try:
                self.run(["scancel", "--partition=main"], check=False, timeout=20)
                time.sleep(0.5)
            except subprocess.TimeoutExpired:
                pass  # the namespace sweep below ends the jobs anyway
        for p in reversed(self._procs):  # slurmd before slurmctld before munged
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self._procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for ns in self._made_netns:
            # Job processes that outlived slurmd are still in our namespace: ours, end them by PID.
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
            for pid in pids.stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._made_netns.clear()
        self._procs.clear()
        shutil.rmtree(self.scratch, ignore_errors=True)


def _run(cmd: list[str]) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {res.returncode}: {res.stderr}")


def cluster_fixture(nodes: int, scope: str = "module"):
    """A pytest fixture yielding a running ``SlurmCluster``; skips where none can run."""
    import pytest

    @pytest.fixture(scope=scope)
    def _cluster():
        reason = unavailable_reason()
        if reason:
            pytest.skip(reason)
        with SlurmCluster(nodes=nodes) as cluster:
            yield cluster

    return _cluster
