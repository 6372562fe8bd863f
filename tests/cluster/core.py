"""A real multi-host test cluster on this one machine (stdlib + psutil only; run as root).

Each host `nodeK` is a network namespace (veth into bridge `dsltc0`, address 10.200.0.(10+K)) plus a
persistent UTS and mount namespace of its own: its hostname, an /etc/hosts that lists `head` and every
node, the cluster's ssh client config as /etc/ssh/ssh_config, the cluster's /etc/slurm, and a private
/dev/shm. /tmp (and the rest of the file system) stays shared, like an NFS home. Every host runs its
own sshd (key-only root login) and slurmd; slurmctld runs in the root network namespace under the
hostname `head` (10.200.0.1, the bridge), with munged beside it.

Daemons are started by this module and stopped by PID; `down()` removes everything it made.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shlex
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

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


# ----------------------------------------------------------------------------------------------------
# Small helpers


def _log(msg: str) -> None:
    print(f"[testcluster] {msg}", file=sys.stderr, flush=True)


def _run(argv: list[str], timeout: float = 20, check: bool = True, env: dict | None = None,
         input: str | None = None) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env,
                              input=input, stdin=None if input is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise ClusterError(f"timed out after {timeout:g}s: {shlex.join(argv)}\n"
                           f"{(exc.stdout or b'')[-2000:]!r}\n{(exc.stderr or b'')[-2000:]!r}") from None
    except FileNotFoundError:
        raise ClusterError(f"{argv[0]}: command not found (run tests/cluster/install.sh as root)") from None
    if check and proc.returncode != 0:
        raise ClusterError(f"`{shlex.join(argv)}` exited {proc.returncode}:\n"
                           f"{(proc.stderr.strip() or proc.stdout.strip())[-3000:]}")
    return proc


def _tail(path: Path | str, lines: int = 25) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode(errors="replace")
    except OSError as exc:
        return f"  (no log: {exc.strerror})"
    body = "\n".join("  " + line for line in text.splitlines()[-lines:])
    return body or "  (empty)"


def _render(template: str, dest: Path, mode: int = 0o644, **values: object) -> bool:
    """Write the template to dest if the content differs; True when it changed."""
    text = string.Template((TEMPLATES / template).read_text()).substitute(
        {k: str(v) for k, v in values.items()})
    return _write(dest, text, mode)


def _write(dest: Path, text: str, mode: int = 0o644) -> bool:
    try:
        if dest.read_text() == text:
            return False
    except OSError:
        pass
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.write_text(text)
    os.chmod(tmp, mode)
    os.replace(tmp, dest)
    return True


_NSFS_DEV: int | None = None


def _is_ns_file(path: Path) -> bool:
    """True if path is a bind mount of a namespace (lives on nsfs)."""
    global _NSFS_DEV
    if _NSFS_DEV is None:
        _NSFS_DEV = os.stat("/proc/self/ns/net").st_dev
    try:
        return os.stat(path).st_dev == _NSFS_DEV
    except OSError:
        return False


def _mountpoints() -> list[str]:
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            raw = line.split()[4]
            points.append(raw.encode().decode("unicode_escape"))  # \040 -> space
    return points


def _umount_all(path: Path) -> None:
    """Unmount path until it is no longer a mount point (bounded)."""
    for _ in range(10):
        if str(path) not in _mountpoints():
            return
        _run(["umount", "-l", str(path)], check=False)


def _ip_json(*args: str) -> list[dict]:
    out = _run(["ip", "-j", *args], check=False)
    if out.returncode != 0 or not out.stdout.strip():
        return []
    return json.loads(out.stdout)


def _listening(pid: int, port: int) -> bool:
    """True if process pid itself holds a TCP socket listening on port (in its network namespace)."""
    want = f":{port:04X}"
    inodes = set()
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                next(f, None)
                for line in f:
                    fields = line.split()
                    if fields[1].endswith(want) and fields[3] == "0A":
                        inodes.add(f"socket:[{fields[9]}]")
        except OSError:
            pass
    if not inodes:
        return False
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                return True
        except OSError:
            pass
    return False


@contextlib.contextmanager
def _locked(timeout: float = 180) -> Iterator[None]:
    """One up()/down() at a time on this machine (file lock; down() removes the file, hence the inode check)."""
    deadline = time.monotonic() + timeout
    while True:
        fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise ClusterError(f"timed out after {timeout:g}s waiting for {LOCK_FILE} "
                                       "(another up()/down() is running)") from None
                time.sleep(0.05)
        try:
            same = os.stat(LOCK_FILE).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------------
# Daemons: started here, recorded in state.json with their start time, stopped by PID only

_CHILDREN: dict[int, subprocess.Popen] = {}  # daemons this process started, so that it can reap them


def _state_path() -> Path:
    return STATE_DIR / "state.json"


def _load_state() -> dict:
    try:
        return json.loads(_state_path().read_text())
    except (OSError, ValueError):
        return {}


def _save_state(state: dict) -> None:
    if STATE_DIR.is_dir():
        _write(_state_path(), json.dumps(state, indent=1, sort_keys=True) + "\n", 0o600)


def _alive(rec: dict | None) -> bool:
    if not rec:
        return False
    child = _CHILDREN.get(rec["pid"])
    if child is not None and child.poll() is not None:
        return False
    try:
        proc = psutil.Process(rec["pid"])
        return abs(proc.create_time() - rec["ctime"]) < 0.5 and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _daemon_pids_of_host(host: str) -> list[int]:
    daemons = _load_state().get("daemons", {})
    return [rec["pid"] for name, rec in daemons.items() if name.endswith(f"@{host}") and _alive(rec)]


def _daemon_env(cluster: Cluster) -> dict[str, str]:
    return {"PATH": DAEMON_PATH, "HOME": "/root", "LANG": "C.UTF-8", "SLURM_CONF": str(cluster.slurm_conf)}


def _spawn(name: str, argv: list[str], out: Path, logs: list[Path], env: dict[str, str]) -> dict:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "ab") as f:
        f.write(f"--- {time.strftime('%F %T')} starting {name}: {shlex.join(argv)}\n".encode())
        f.flush()
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                    env=env, cwd="/", start_new_session=True)
        except OSError as exc:
            raise ClusterError(f"cannot start {name}: {exc}") from None
    _CHILDREN[proc.pid] = proc
    try:
        ctime = psutil.Process(proc.pid).create_time()
    except psutil.Error:
        ctime = 0.0
    return {"pid": proc.pid, "ctime": ctime, "argv": argv, "out": str(out), "logs": [str(p) for p in logs]}


def _describe(name: str, rec: dict) -> str:
    parts = [f"--- {name} (pid {rec['pid']}) output {rec['out']}:", _tail(rec["out"])]
    for log in rec.get("logs", []):
        parts += [f"--- {name} log {log}:", _tail(log)]
    return "\n".join(parts)


def _wait_ready(what: dict[str, tuple[dict, Callable[[], bool]]], timeout: float) -> None:
    """Wait until every check passes; raise with the log tails if a daemon dies or time runs out."""
    pending = dict(what)
    deadline = time.monotonic() + timeout
    while pending:
        for name, (rec, check) in list(pending.items()):
            if check():
                del pending[name]
            elif not _alive(rec):
                raise ClusterError(f"{name} exited during start-up\n{_describe(name, rec)}")
        if not pending:
            return
        if time.monotonic() > deadline:
            raise ClusterError(f"timed out after {timeout:g}s waiting for {', '.join(pending)}\n"
                               + "\n".join(_describe(n, r) for n, (r, _) in pending.items()))
        time.sleep(0.03)


def _stop(recs: dict[str, dict], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM the recorded daemons that are still alive, SIGKILL what is left after timeout, reap ours."""
    live = {name: rec for name, rec in recs.items() if _alive(rec)}
    for rec in live.values():
        with contextlib.suppress(ProcessLookupError):
            os.kill(rec["pid"], signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(_alive(r) for r in live.values()) and time.monotonic() < deadline:
        time.sleep(0.03)
    for rec in live.values():
        if _alive(rec):
            with contextlib.suppress(ProcessLookupError):
                os.kill(rec["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 2
    while any(_alive(r) for r in live.values()) and time.monotonic() < deadline:
        time.sleep(0.03)
    for rec in recs.values():
        child = _CHILDREN.pop(rec["pid"], None)
        if child is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=0.5)


def _kill_pids(pids: list[int], timeout: float = STOP_TIMEOUT) -> None:
    procs = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            proc.terminate()
            procs.append(proc)
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=2)


# ----------------------------------------------------------------------------------------------------
# Bring-up steps (each one checks first and only repairs what is missing)


def _ensure_files(cluster: Cluster) -> None:
    sd = cluster.state_dir
    for d in (sd, sd / "ssh", sd / "ns", sd / "munge", sd / "ctld" / "state", sd / "etc-slurm"):
        d.mkdir(parents=True, exist_ok=True)
    os.chmod(sd, 0o755)  # sshd's StrictModes: root-owned, not group/world-writable
    os.chmod(sd / "munge", 0o755)  # munged: the socket directory must be searchable by all
    if not (cluster.ssh_key.exists() and cluster.ssh_key.with_suffix(".pub").exists()):
        for p in (cluster.ssh_key, cluster.ssh_key.with_suffix(".pub")):
            p.unlink(missing_ok=True)
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "dsl-testcluster-client",
              "-f", str(cluster.ssh_key)])
    _write(sd / "ssh/authorized_keys", cluster.ssh_key.with_suffix(".pub").read_text(), 0o600)

    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback", f"{HEAD_IP}\t{HEAD}"]
    lines += [f"{cluster.ips[h]}\t{h}" for h in cluster.hosts]
    ours = "# dsl test cluster (generated by tests/cluster)\n" + "\n".join(lines) + "\n"
    _write(cluster.hosts_file, ours)
    names = {HEAD, *cluster.hosts}
    try:
        machine = [ln for ln in Path("/etc/hosts").read_text().splitlines()
                   if not names & set(ln.split("#")[0].split()[1:])]
    except OSError:
        machine = []
    _write(cluster.head_hosts_file, ours + "# the machine's own /etc/hosts\n" + "\n".join(machine) + "\n")

    _render("ssh_config", cluster.ssh_config, key=cluster.ssh_key, known_hosts=cluster.known_hosts)

    key = sd / "munge/munge.key"
    if not key.exists() or key.stat().st_size < 32:
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o600)

    try:
        memory_mb = psutil.virtual_memory().total // (1024 * 1024) // 2
    except Exception:  # noqa: BLE001
        memory_mb = 1024
    cpus = len(os.sched_getaffinity(0))
    node_lines = "\n".join(f"NodeName={h} NodeAddr={cluster.ips[h]} CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN"
                           for h in cluster.hosts)
    _render("slurm.conf", cluster.slurm_conf, head_ip=HEAD_IP, ctld_port=CTLD_PORT, slurmd_port=SLURMD_PORT,
            munge_socket=cluster.munge_socket, ctld_dir=sd / "ctld", nodes_dir=sd / "nodes",
            node_lines=node_lines, node_list=",".join(cluster.hosts))

    for h in cluster.hosts:
        hd = sd / "nodes" / h
        for d in (hd / "spool", hd / "tmp", hd / "scratch"):
            d.mkdir(parents=True, exist_ok=True)
        os.chmod(hd / "tmp", 0o1777)
        key = hd / "ssh_host_ed25519_key"
        if not (key.exists() and key.with_suffix(".pub").exists()):
            for p in (key, key.with_suffix(".pub")):
                p.unlink(missing_ok=True)
            _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"root@{h}", "-f", str(key)])
        _render("sshd_config", hd / "sshd_config", host=h, ip=cluster.ips[h], host_key=key,
                authorized_keys=sd / "ssh/authorized_keys")
    known = []
    for h in cluster.hosts:
        kind, blob = (sd / "nodes" / h / "ssh_host_ed25519_key.pub").read_text().split()[:2]
        known.append(f"{h},{cluster.ips[h]} {kind} {blob}\n")
    _write(cluster.known_hosts, "".join(known))


def _ensure_network(cluster: Cluster, state: dict) -> set[str]:
    """Bridge, guard route, one netns + veth per host. Returns the hosts whose netns was (re)created."""
    if "netns_dir_preexisted" not in state:
        state["netns_dir_preexisted"] = NETNS_DIR.exists()
    if not _ip_json("link", "show", "dev", BRIDGE):
        _run(["ip", "link", "add", BRIDGE, "type", "bridge"])
    addrs = _ip_json("addr", "show", "dev", BRIDGE)
    have = {a.get("local") for a in (addrs[0].get("addr_info", []) if addrs else [])}
    if HEAD_IP not in have:
        _run(["ip", "addr", "replace", f"{HEAD_IP}/{PREFIX_LEN}", "dev", BRIDGE])
    _run(["ip", "link", "set", BRIDGE, "up"])
    _run(["ip", "route", "replace", "unreachable", GUARD_ROUTE])

    created = set()
    for h in cluster.hosts:
        ns, veth, path = netns_name(h), netns_name(h), cluster.netns_path(h)
        if not _is_ns_file(path):
            if path.is_file():  # left over from before a reboot: no namespace behind it
                path.unlink()
            if _ip_json("link", "show", "dev", veth):
                _run(["ip", "link", "del", veth])  # its peer lived in a namespace that is gone
            _run(["ip", "netns", "add", ns])
            created.add(h)
        if not _ip_json("link", "show", "dev", veth):
            _run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns])
        _run(["ip", "link", "set", veth, "master", BRIDGE, "up"])
        inner = _ip_json("-n", ns, "addr", "show")
        eth0 = next((i for i in inner if i.get("ifname") == "eth0"), None)
        lo = next((i for i in inner if i.get("ifname") == "lo"), None)
        if eth0 is None:
            raise ClusterError(f"{h}: no eth0 inside netns {ns}: {inner}")
        if cluster.ips[h] not in {a.get("local") for a in eth0.get("addr_info", [])}:
            _run(["ip", "-n", ns, "addr", "replace", f"{cluster.ips[h]}/{PREFIX_LEN}", "dev", "eth0"])
        if "UP" not in eth0.get("flags", []):
            _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
        if lo is not None and "UP" not in lo.get("flags", []):
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
    return created


def _ensure_ns_dir(cluster: Cluster) -> None:
    """Mount namespace files can only be bind-mounted on a mount that does not propagate."""
    ns_dir = str(cluster.ns_dir)
    if ns_dir not in _mountpoints():
        _run(["mount", "--bind", ns_dir, ns_dir])
    _run(["mount", "--make-private", ns_dir])


def _ensure_host_namespaces(cluster: Cluster, recreate: set[str]) -> set[str]:
    """Persistent UTS + mount namespace per host (created from inside its netns). Returns the hosts set up now."""
    made = set()
    for h in cluster.hosts:
        uts, mnt = cluster.uts_path(h), cluster.mnt_path(h)
        if h not in recreate and _is_ns_file(uts) and _is_ns_file(mnt):
            continue
        for p in (uts, mnt):
            _umount_all(p)
            p.unlink(missing_ok=True)
            p.touch()
        scratch = cluster.state_dir / "nodes" / h / "scratch"
        _run(["nsenter", f"--net={cluster.netns_path(h)}", "--",
              "unshare", f"--uts={uts}", f"--mount={mnt}", "--propagation", "slave", "--",
              "/bin/sh", str(TEMPLATES / "host_setup.sh"), h, str(cluster.hosts_file),
              str(cluster.ssh_config), str(cluster.slurm_conf.parent), str(scratch)])
        made.add(h)
    return made


def _ensure_daemons(cluster: Cluster, state: dict, fresh_hosts: set[str]) -> bool:
    """sshd + slurmd per host, munged, slurmctld. Returns True if anything Slurm-related was (re)started."""
    daemons: dict[str, dict] = state.setdefault("daemons", {})
    env = _daemon_env(cluster)
    sd = cluster.state_dir

    # Daemons that live in a namespace that was just replaced are stale: stop them first.
    stale = {n: r for n, r in daemons.items() if n.split("@")[-1] in fresh_hosts}
    if stale:
        _stop(stale)
    for name in stale:
        del daemons[name]

    if not Path("/run/sshd").is_dir():
        Path("/run/sshd").mkdir(mode=0o755)
        state["created_run_sshd"] = True

    waits: dict[str, tuple[dict, Callable[[], bool]]] = {}

    def start(name: str, argv: list[str], out: Path, logs: list[Path], ready: Callable[[dict], bool]) -> None:
        if _alive(daemons.get(name)):
            return
        if name in daemons:
            _stop({name: daemons[name]})
        rec = _spawn(name, argv, out, logs, env)
        daemons[name] = rec
        waits[name] = (rec, lambda: ready(rec))

    # munged and every sshd, in parallel
    sock = cluster.munge_socket
    if not _alive(daemons.get("munged")):
        for p in (sock, Path(f"{sock}.lock")):
            p.unlink(missing_ok=True)
    start("munged", ["munged", "--foreground", f"--socket={sock}", f"--key-file={sd}/munge/munge.key",
                     f"--pid-file={sd}/munge/munged.pid", f"--log-file={sd}/munge/munged.log",
                     f"--seed-file={sd}/munge/munged.seed"],
          sd / "munge/munged.out", [sd / "munge/munged.log"], lambda rec: sock.is_socket())
    for h in cluster.hosts:
        hd = sd / "nodes" / h
        start(f"sshd@{h}", cluster.on_host(h, ["/usr/sbin/sshd", "-D", "-e", "-f", str(hd / "sshd_config")]),
              hd / "sshd.out", [], lambda rec: _listening(rec["pid"], 22))
    slurm_changed = "munged" in waits
    _wait_ready(waits, START_TIMEOUT)
    waits.clear()

    # slurmctld under the hostname `head`, then the slurmds (they register with it as they start)
    ctld = sd / "ctld"
    head_script = ('hostname "$0" && mount --bind "$1" /etc/hosts'
                   ' && { [ ! -d /etc/slurm ] || mount --bind "$2" /etc/slurm; } && shift 2 && exec "$@"')
    start("slurmctld", ["unshare", "--uts", "--mount", "--propagation", "slave", "--", "/bin/sh", "-c", head_script,
                        HEAD, str(cluster.head_hosts_file), str(cluster.slurm_conf.parent),
                        "slurmctld", "-D", "-i", "-f", str(cluster.slurm_conf)],
          ctld / "slurmctld.out", [ctld / "slurmctld.log"], lambda rec: _listening(rec["pid"], CTLD_PORT))
    slurm_changed |= bool(waits)
    _wait_ready(waits, START_TIMEOUT)
    waits.clear()
    for h in cluster.hosts:
        hd = sd / "nodes" / h
        start(f"slurmd@{h}", cluster.on_host(h, ["slurmd", "-D", "-N", h, "-f", str(cluster.slurm_conf)]),
              hd / "slurmd.out", [hd / "slurmd.log"], lambda rec: _listening(rec["pid"], SLURMD_PORT))
    slurm_changed |= bool(waits)
    _wait_ready(waits, START_TIMEOUT)
    return slurm_changed


def _slurm_env(cluster: Cluster) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SALLOC_", "SRUN_"))}
    env.update(cluster.env())
    return env


def node_states(cluster: Cluster) -> dict[str, str]:
    """{node: Slurm state} as sinfo reports it (e.g. idle, mixed, allocated, down*, drained)."""
    out = _run(["sinfo", "-h", "-N", "-o", "%N %T"], env=_slurm_env(cluster), timeout=10)
    states = {}
    for line in out.stdout.splitlines():
        if line.strip():
            node, state = line.split()[:2]
            states[node] = state
    return states


def _slurm_logs(cluster: Cluster, state: dict) -> str:
    daemons = state.get("daemons", {})
    return "\n".join(_describe(n, daemons[n]) for n in ["slurmctld", *(f"slurmd@{h}" for h in cluster.hosts)]
                     if n in daemons)


def _wait_slurm(cluster: Cluster, state: dict, full: bool) -> None:
    """Nodes idle (or busy with jobs) and, after a (re)start, a first `srun` across two nodes."""
    usable = {"idle", "mixed", "allocated", "completing"}
    deadline = time.monotonic() + SLURM_READY_TIMEOUT
    resumed = False
    states: dict[str, str] = {}
    daemons = state.get("daemons", {})
    while True:
        dead = [n for n in ["slurmctld", *(f"slurmd@{h}" for h in cluster.hosts)] if not _alive(daemons.get(n))]
        if dead:
            raise ClusterError(f"{', '.join(dead)} exited while waiting for the Slurm nodes\n"
                               + _slurm_logs(cluster, state))
        try:
            states = node_states(cluster)
        except ClusterError as exc:
            states = {"sinfo": str(exc)}
        good = set(cluster.hosts) <= set(states) and all(states[h] in usable for h in cluster.hosts)
        if good and (not full or all(states[h] == "idle" for h in cluster.hosts)):
            break
        bad = [h for h in cluster.hosts if states.get(h, "").rstrip("*~#!%$@^-") in ("drained", "draining", "down")
               and not states.get(h, "").endswith("*")]
        if bad and not resumed:  # a node that a previous run left drained/down although slurmd answers
            _run(["scontrol", "update", f"nodename={','.join(bad)}", "state=resume"], env=_slurm_env(cluster),
                 check=False)
            resumed = True
        if time.monotonic() > deadline:
            raise ClusterError(f"Slurm nodes not idle after {SLURM_READY_TIMEOUT:g}s: {states}\n"
                               + _slurm_logs(cluster, state))
        time.sleep(0.1)
    if not full:
        return
    n = min(2, len(cluster.hosts))
    left = max(5.0, deadline - time.monotonic())
    out = _run(["srun", f"-N{n}", f"-n{n}", "-t", "1", "hostname"], env=_slurm_env(cluster), timeout=left,
               check=False)
    got = sorted(out.stdout.split())
    if out.returncode != 0 or got != cluster.hosts[:n]:
        raise ClusterError(f"`srun -N{n} -n{n} hostname` gave {got} (exit {out.returncode}), expected "
                           f"{cluster.hosts[:n]}:\n{out.stderr[-2000:]}\n" + _slurm_logs(cluster, state))


# ----------------------------------------------------------------------------------------------------
# Public entry points


def _require_root() -> None:
    if os.geteuid() != 0:
        raise ClusterError("the test cluster needs root (network namespaces, mounts, sshd, Slurm)")
    missing = [t for t in ("ip", "nsenter", "unshare", "mount", "ssh-keygen", "munged", "slurmctld", "slurmd",
                           "sinfo", "srun", "mpirun") if shutil.which(t, path=DAEMON_PATH) is None]
    if not Path("/usr/sbin/sshd").exists():
        missing.append("sshd")
    if missing:
        raise ClusterError(f"missing commands: {', '.join(missing)} (run tests/cluster/install.sh as root)")


def up(n_hosts: int = 3, verbose: bool = True, owner: str | None = None) -> Cluster:
    """Bring the cluster up (or repair it) and return its handle. Idempotent: when everything is
    already running this only checks and returns (well under a second). Raises ClusterError, with the
    failing component's log tail, if something cannot start; every wait is bounded.

    owner: who keeps it up, recorded when it is started ("user" if None). A cluster owned by "pytest"
    is taken down when its last pytest session ends (see lease()); a user's never is. Passing
    owner="user" (the CLI does) to a running cluster makes it the user's; owner=None changes nothing."""
    if not 1 <= n_hosts <= MAX_HOSTS:
        raise ValueError(f"n_hosts must be in 1..{MAX_HOSTS}")
    t0 = time.monotonic()
    _require_root()
    cluster = make_cluster(n_hosts)
    with _locked():
        state = _load_state()
        if state and state.get("n_hosts") != n_hosts:
            if verbose:
                _log(f"cluster has {state.get('n_hosts')} hosts, {n_hosts} wanted: rebuilding")
            _down_locked(verbose=False)
            state = {}
        was_complete = state.get("complete", False)
        state["n_hosts"] = n_hosts
        if not was_complete or owner == "user":
            state["owner"] = owner or "user"
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        _save_state(state)
        try:
            _ensure_files(cluster)
            fresh = _ensure_network(cluster, state)
            _ensure_ns_dir(cluster)
            fresh |= _ensure_host_namespaces(cluster, fresh)
            t_ns = time.monotonic()
            state["complete"] = False
            slurm_changed = _ensure_daemons(cluster, state, fresh)
            _save_state(state)
            t_daemons = time.monotonic()
            _wait_slurm(cluster, state, full=slurm_changed or not was_complete)
            state["complete"] = True
        finally:
            _save_state(state)
    if verbose:
        t1 = time.monotonic()
        if was_complete and not fresh and not slurm_changed:
            _log(f"already up ({n_hosts} hosts), checked in {t1 - t0:.2f}s")
        else:
            _log(f"up: {n_hosts} hosts in {t1 - t0:.2f}s (namespaces {t_ns - t0:.2f}s, "
                 f"daemons {t_daemons - t_ns:.2f}s, slurm ready {t1 - t_daemons:.2f}s)")
    return cluster


def _live_leases() -> list[Path]:
    live = []
    for path in (STATE_DIR / "leases").glob("*"):
        try:
            pid, ctime = path.read_text().split()
            if abs(psutil.Process(int(pid)).create_time() - float(ctime)) < 0.5:
                live.append(path)
                continue
        except (OSError, ValueError, psutil.Error):
            pass
        path.unlink(missing_ok=True)  # its process is gone
    return live


@contextlib.contextmanager
def lease(owner: str = "pytest", n_hosts: int = 3, verbose: bool = True) -> Iterator[Cluster]:
    """Use the cluster for the duration of the block: up(n_hosts, owner=owner) on entry; on exit,
    down() if the cluster is owned by `owner` (a session of it started the cluster) and no other live
    process holds a lease. Concurrent test sessions thus share one cluster safely, and a cluster that
    a user started by hand stays up."""
    cluster = up(n_hosts, verbose=verbose, owner=owner)
    me = psutil.Process()
    mine = STATE_DIR / "leases" / f"{me.pid}-{time.monotonic_ns()}"
    with _locked():
        mine.parent.mkdir(parents=True, exist_ok=True)
        mine.write_text(f"{me.pid} {me.create_time()}\n")
    try:
        yield cluster
    finally:
        with _locked():
            mine.unlink(missing_ok=True)
            last = _load_state().get("owner") == owner and not _live_leases()
            if last:
                _down_locked(verbose)
        if last:
            with contextlib.suppress(FileNotFoundError):
                LOCK_FILE.unlink()  # (best effort: a waiter re-checks the inode)


def current() -> Cluster | None:
    """The handle of the cluster that is up (possibly degraded), or None."""
    n = _load_state().get("n_hosts")
    return make_cluster(n) if n else None


def is_up() -> bool:
    """True if a cluster was fully brought up and all its daemons and namespaces are still there."""
    state = _load_state()
    if not state.get("complete") or not state.get("n_hosts"):
        return False
    cluster = make_cluster(state["n_hosts"])
    daemons = state.get("daemons", {})
    wanted = ["munged", "slurmctld", *(f"{d}@{h}" for h in cluster.hosts for d in ("sshd", "slurmd"))]
    return (all(_alive(daemons.get(n)) for n in wanted)
            and all(_is_ns_file(p) for h in cluster.hosts
                    for p in (cluster.netns_path(h), cluster.uts_path(h), cluster.mnt_path(h))))


def down(verbose: bool = True) -> None:
    """Stop the cluster's daemons (by PID), kill what still runs inside its host namespaces, remove
    namespaces, veths, bridge, route and the state directory. Idempotent."""
    if os.geteuid() != 0:
        raise ClusterError("the test cluster needs root")
    t0 = time.monotonic()
    with _locked():
        did = _down_locked(verbose)
        with contextlib.suppress(FileNotFoundError):
            LOCK_FILE.unlink()
    if verbose:
        _log(f"down in {time.monotonic() - t0:.2f}s" if did else "already down")


def _our_leftover_daemons() -> list[int]:
    """munged/slurmctld started from our state directory whose record was lost (state.json gone)."""
    marker = str(STATE_DIR) + "/"
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            if proc.info["name"] in ("munged", "slurmctld", "slurmd", "sshd") and \
                    any(marker in arg for arg in proc.info["cmdline"] or []):
                found.append(proc.pid)
    return found


def _down_locked(verbose: bool) -> bool:
    state = _load_state()
    did = bool(state)
    daemons = state.get("daemons", {})
    # Slurm first (slurmds, then slurmctld), then sshd and munged.
    order = sorted(daemons, key=lambda n: (0 if n.startswith("slurmd@") else 1 if n == "slurmctld" else 2))
    _stop({n: daemons[n] for n in order})
    leftovers = _our_leftover_daemons()

    # Everything still inside a host's network namespace was started through the cluster (job steps,
    # ssh sessions, test programs): the namespaces are ours, so are their processes.
    netns = sorted(p.name for p in NETNS_DIR.glob(NS_PREFIX + "*")) if NETNS_DIR.is_dir() else []
    inside = []
    for ns in netns:
        with contextlib.suppress(OSError):
            inside += _pids_in_netns(os.stat(NETNS_DIR / ns).st_ino)
    if leftovers or inside:
        did = True
        _kill_pids(sorted(set(leftovers + inside) - {os.getpid()}))

    ns_dir = STATE_DIR / "ns"
    if ns_dir.is_dir():
        for p in ns_dir.iterdir():
            _umount_all(p)
        _umount_all(ns_dir)
    for link in _ip_json("link", "show", "type", "veth"):
        if link.get("ifname", "").startswith(NS_PREFIX):
            _run(["ip", "link", "del", link["ifname"]], check=False)
            did = True
    for ns in netns:
        _run(["ip", "netns", "del", ns], check=False)
        did = True
    if _ip_json("link", "show", "dev", BRIDGE):
        _run(["ip", "link", "del", BRIDGE], check=False)
        did = True
    routes = _ip_json("route", "show", "type", "unreachable")
    if any(r.get("dst") == GUARD_ROUTE for r in routes):
        _run(["ip", "route", "del", "unreachable", GUARD_ROUTE], check=False)
    if state.get("netns_dir_preexisted") is False and NETNS_DIR.is_dir() and not any(NETNS_DIR.iterdir()):
        _umount_all(NETNS_DIR)
        with contextlib.suppress(OSError):
            NETNS_DIR.rmdir()
    if state.get("created_run_sshd"):
        with contextlib.suppress(OSError):
            Path("/run/sshd").rmdir()
    if STATE_DIR.exists():
        if any(str(STATE_DIR) in m for m in _mountpoints()):
            raise ClusterError(f"still mounted under {STATE_DIR}: "
                               f"{[m for m in _mountpoints() if str(STATE_DIR) in m]}")
        shutil.rmtree(STATE_DIR)
        did = True
    return did


def status() -> dict:
    """What is up: hosts, daemons (alive or not), Slurm node states."""
    state = _load_state()
    if not state:
        return {"up": False}
    cluster = make_cluster(state["n_hosts"])
    daemons = {n: {"pid": r["pid"], "alive": _alive(r)} for n, r in sorted(state.get("daemons", {}).items())}
    info: dict = {"up": is_up(), "hosts": cluster.ips, "head": HEAD_IP, "state_dir": str(STATE_DIR),
                  "daemons": daemons}
    try:
        info["slurm"] = node_states(cluster)
    except ClusterError as exc:
        info["slurm"] = f"error: {exc}"
    return info
