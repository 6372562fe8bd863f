"""Small system helpers of the test cluster: commands, files, mounts, addresses, the lock and state file."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import string
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator


from tests.cluster.handle import ClusterError, LOCK_FILE, TEMPLATES

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
