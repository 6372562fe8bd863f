"""Choose a free rendezvous port that no other dsl launch on this machine is using.

Binding to port 0 alone is not enough: between our check and torchrun's bind, a concurrent
`dsl launch` could pick the same port. Each launch therefore also holds an exclusive lock file
per port (`$TMPDIR/dsl-ports/<port>.lock`, flock) for as long as it runs; a port is taken only if
it is both bindable and unlocked. Locks vanish with the process, so a crash leaks nothing.
"""

from __future__ import annotations

import fcntl
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

from dsl.engine.errors import RunError, UserError

_LOCK_DIR = Path(tempfile.gettempdir()) / "dsl-ports"


@dataclass
class PortReservation:
    port: int
    _fd: int | None = None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _bindable(port: int, host: str) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _lock(port: int) -> int | None:
    _LOCK_DIR.mkdir(mode=0o777, parents=True, exist_ok=True)
    fd = os.open(_LOCK_DIR / f"{port}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def reserve_port(host: str = "127.0.0.1", attempts: int = 50) -> PortReservation:
    """A port free on `host` (an address of this machine) and locked for this process."""
    for _ in range(attempts):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
        fd = _lock(port)
        if fd is None:
            continue
        if _bindable(port, host):
            return PortReservation(port, fd)
        os.close(fd)
    raise RunError(f"found no free port on {host} after {attempts} attempts")


def hold_port(port: int, host: str = "127.0.0.1") -> PortReservation:
    """Lock a port the spec fixed, so two dsl launches with the same fixed port fail clearly."""
    fd = _lock(port)
    if fd is None or not _bindable(port, host):
        if fd is not None:
            os.close(fd)
        raise UserError(
            f"master_port {port} is in use on {host} (another job?); "
            "set resources.master_port: auto or choose another port"
        )
    return PortReservation(port, fd)
