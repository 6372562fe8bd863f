"""The test cluster's layout and the handle tests use: names, addresses, `Cluster`."""

from __future__ import annotations

import dataclasses
import os
import shlex
from pathlib import Path
from typing import Iterable

import psutil

STATE_DIR = Path("/run/dsl-testcluster")
LOCK_FILE = Path("/run/dsl-testcluster.lock")
TEMPLATES = Path(__file__).resolve().parent / "templates"

SUBNET = "10.200.0"
HEAD = "head"
HEAD_IP = f"{SUBNET}.1"
PREFIX_LEN = 24
GUARD_ROUTE = "10.200.0.0/16"  # `unreachable` in the root namespace: nothing leaks out via eth0
BRIDGE = "dsltc0"
NS_PREFIX = "dsltc-"  # network namespace and root-side veth names: dsltc-node1, ...
NETNS_DIR = Path("/run/netns")
CTLD_PORT = 16817  # not Slurm's default 6817, so that a real slurmctld on the machine cannot clash
SLURMD_PORT = 6818  # one per host namespace
DAEMON_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MAX_HOSTS = 50

START_TIMEOUT = 15.0  # per daemon start-up
SLURM_READY_TIMEOUT = 30.0  # nodes idle + a first srun
STOP_TIMEOUT = 5.0  # SIGTERM, then SIGKILL


class ClusterError(RuntimeError):
    """The test cluster could not be brought up (or down); the message says why, with log tails."""


def host_name(k: int) -> str:
    return f"node{k}"


def host_ip(k: int) -> str:
    return f"{SUBNET}.{10 + k}"


def netns_name(host: str) -> str:
    return NS_PREFIX + host


# ----------------------------------------------------------------------------------------------------
# The handle that tests use


@dataclasses.dataclass
class Cluster:
    """Everything a test needs to use the cluster. All paths are absolute; the cluster is per machine."""

    hosts: list[str]  # ["node1", "node2", ...]
    ips: dict[str, str]  # host -> IP ("node1" -> "10.200.0.11")
    head: str  # "head": the bridge address in the root namespace, where slurmctld runs
    head_ip: str  # "10.200.0.1"
    state_dir: Path
    ssh_key: Path  # client private key (root on every host accepts it)
    known_hosts: Path  # every host key under the host's name and its IP
    ssh_config: Path  # for `ssh -F`: User root, IdentityFile, UserKnownHostsFile, StrictHostKeyChecking yes, BatchMode yes
    hosts_file: Path  # the /etc/hosts every host sees (localhost, head, node1..nodeN)
    head_hosts_file: Path  # the /etc/hosts on_head() sees: hosts_file plus the machine's own entries
    slurm_conf: Path  # clients in the root namespace need SLURM_CONF=this (see env())
    munge_socket: Path

    @property
    def ns_dir(self) -> Path:
        return self.state_dir / "ns"

    def netns_path(self, host: str) -> Path:
        return NETNS_DIR / netns_name(self._check(host))

    def uts_path(self, host: str) -> Path:
        return self.ns_dir / f"{self._check(host)}.uts"

    def mnt_path(self, host: str) -> Path:
        return self.ns_dir / f"{self._check(host)}.mnt"

    def _check(self, host: str) -> str:
        if host not in self.ips:
            raise ValueError(f"unknown host {host!r}; the cluster has {', '.join(self.hosts)}")
        return host

    def env(self) -> dict[str, str]:
        """Variables a client in the root namespace needs (merge into os.environ): Slurm's config,
        OpenMPI as root, OpenMPI's ssh through ssh_config and its traffic on the cluster subnet."""
        subnet = f"{SUBNET}.0/{PREFIX_LEN}"
        return {
            "SLURM_CONF": str(self.slurm_conf),
            "OMPI_ALLOW_RUN_AS_ROOT": "1",
            "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
            "OMPI_MCA_plm_rsh_args": f"-F {self.ssh_config}",
            "OMPI_MCA_oob_tcp_if_include": subnet,
            "OMPI_MCA_btl_tcp_if_include": subnet,
        }

    def on_host(self, host: str, argv: Iterable[str] = ()) -> list[str]:
        """argv that runs `argv` inside host's network, UTS and mount namespaces (nsenter), in the
        caller's working directory (falls back to / if that does not exist there). The process keeps
        the PID of the returned command: no extra parent stays behind."""
        inner = 'cd "$0" 2>/dev/null || cd /; exec "$@"'
        outer = (f"exec nsenter --net={shlex.quote(str(self.netns_path(host)))}"
                 f" --uts={shlex.quote(str(self.uts_path(host)))}"
                 f" --mount={shlex.quote(str(self.mnt_path(host)))}"
                 f" -- /bin/sh -c {shlex.quote(inner)} \"$PWD\" \"$@\"")
        return ["/bin/sh", "-c", outer, "sh", *argv]

    def on_head(self, argv: Iterable[str] = ()) -> list[str]:
        """argv that runs `argv` in the root network namespace (where `head` is) but in a private mount
        namespace whose /etc/hosts resolves head and node1..nodeN, whose /etc/ssh/ssh_config is
        ssh_config and whose /etc/slurm holds slurm.conf: `ssh node1`, `mpirun --host node1,node2`,
        fabric and `sinfo` work by name there. Keeps the caller's working directory and PID."""
        script = ('mount --bind "$0" /etc/hosts'
                  ' && { [ ! -e /etc/ssh/ssh_config ] || mount --bind "$1" /etc/ssh/ssh_config; }'
                  ' && { [ ! -d /etc/slurm ] || mount --bind "$2" /etc/slurm; }'
                  ' && shift 2 && exec "$@"')
        return ["unshare", "--mount", "--propagation", "slave", "--", "/bin/sh", "-c", script,
                str(self.head_hosts_file), str(self.ssh_config), str(self.slurm_conf.parent), *argv]

    def ssh_argv(self, host: str, *command: str) -> list[str]:
        """`ssh -F ssh_config HOST COMMAND...` (by IP, so it works from the root namespace too)."""
        return ["ssh", "-F", str(self.ssh_config), self.ips[self._check(host)], *command]

    def netns_inode(self, host: str) -> int:
        return os.stat(self.netns_path(host)).st_ino

    def processes_on(self, host: str, include_daemons: bool = False) -> list[psutil.Process]:
        """Live processes inside host's network namespace (zombies excluded). Without include_daemons,
        the cluster's own sshd listener and slurmd are left out (their per-connection and per-job
        children, e.g. `sshd: root@notty` or slurmstepd, are listed)."""
        from tests.cluster.daemons import _daemon_pids_of_host

        skip = set() if include_daemons else {os.getpid(), *_daemon_pids_of_host(host)}
        return [psutil.Process(pid) for pid in _pids_in_netns(self.netns_inode(host))
                if pid not in skip and _exists(pid)]

    def pids_on(self, host: str, include_daemons: bool = False) -> list[int]:
        """PIDs of processes_on(host, include_daemons)."""
        return [p.pid for p in self.processes_on(host, include_daemons)]

    def write_hostfile(self, path: Path | str, slots: int = 1, hosts: Iterable[str] | None = None) -> Path:
        """An OpenMPI hostfile (`node1 slots=1` lines) for the given hosts (default: all)."""
        path = Path(path)
        path.write_text("".join(f"{h} slots={slots}\n" for h in (hosts or self.hosts)))
        return path


def _exists(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _pids_in_netns(inode: int) -> list[int]:
    want = f"net:[{inode}]"
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{entry}/ns/net") == want:  # fails for zombies: no namespaces left
                found.append(int(entry))
        except OSError:
            pass
    return sorted(found)


def make_cluster(n_hosts: int) -> Cluster:
    """The Cluster handle for n_hosts (pure: paths and names only, nothing is checked or started)."""
    hosts = [host_name(k) for k in range(1, n_hosts + 1)]
    return Cluster(
        hosts=hosts,
        ips={h: host_ip(k) for k, h in enumerate(hosts, 1)},
        head=HEAD,
        head_ip=HEAD_IP,
        state_dir=STATE_DIR,
        ssh_key=STATE_DIR / "ssh/id_ed25519",
        known_hosts=STATE_DIR / "ssh/known_hosts",
        ssh_config=STATE_DIR / "ssh/ssh_config",
        hosts_file=STATE_DIR / "hosts",
        head_hosts_file=STATE_DIR / "hosts.head",
        slurm_conf=STATE_DIR / "etc-slurm/slurm.conf",
        munge_socket=STATE_DIR / "munge/munged.sock",
    )
