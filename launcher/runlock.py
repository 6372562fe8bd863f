"""The run-folder lock: one launch owns an output_dir while it runs.

Two launches of one spec used to share `output_dir/` silently: `rank0.log` and `metrics.jsonl`
interleaved both runs, and checkpoints of one were deleted by the other's clean-up. Now
`dsl launch` (and `dsl sbatch`, which rewrites the run folder's files) takes the lock before it
writes anything there and holds it until it exits:

- the lock is `flock(LOCK_EX | LOCK_NB)` on `OUTPUT_DIR/.dsl-launch.lock`, held through a file
  descriptor of the launching process. The kernel drops it when that process ends however it
  ends (kill -9 included), so a lock is never stale: a crashed launch does not block the next.
  The file itself is never deleted (deleting it would let two launches lock two different files
  of one name);
- the owner writes its host, pid, start time and job name into the file once it holds the lock;
  a refused launch reads them for its message (exit 2, nothing of the owner's touched);
- flock works across hosts on NFSv4 and Lustre/GPFS mounted with locking; on a filesystem
  without locks (ENOLCK) the launch goes on with a warning, as it did before the lock existed.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from dsl.engine.errors import UserError
from dsl.engine.writefail import write_failed

log = logging.getLogger(__name__)

LOCK_NAME = ".dsl-launch.lock"
_READ_RETRY_S = 1.0  # the owner writes its record right after it locks: wait that long for it


@dataclass
class RunLock:
    path: Path
    fd: int | None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def owner_text(record: dict) -> str:
    if not record:
        return "another launch (it has not written its host and pid yet)"
    started = record.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "?"
    return (f"job {record.get('job', '?')} launched on host {record.get('host', '?')} "
            f"(pid {record.get('pid', '?')}, started {when})")


def _read_record(fd: int) -> dict:
    deadline = time.monotonic() + _READ_RETRY_S
    while True:
        raw = os.pread(fd, 4096, 0)
        try:
            return json.loads(raw)
        except ValueError:
            if time.monotonic() >= deadline:
                return {}
            time.sleep(0.05)


def acquire(output_dir: Path, job: str, where: str, name: str = LOCK_NAME) -> RunLock:
    """Lock `output_dir` for this launch (created if missing). `where` locates output_dir in the
    spec for the refusal; `name` is the lock file's (backend pernode: one per node, whose launches
    share the folder). Raises UserError (exit 2) when another launch holds it."""
    path = output_dir / name
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise write_failed(path, exc, "run-folder lock") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
            record = _read_record(fd)
            os.close(fd)
            raise UserError(
                f"{where}: {output_dir} is in use by {owner_text(record)}; two launches into one "
                f"run folder would mix their logs and metrics and delete each other's checkpoints. "
                f"Wait for it to end, stop it, or set another output_dir (lock: {path})") from None
        if exc.errno == errno.ENOLCK:
            log.warning("%s: this filesystem does not support locks; a second launch into %s would "
                        "not be refused", path, output_dir)
            return RunLock(path, fd)
        os.close(fd)
        raise
    record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "job": job}
    data = (json.dumps(record) + "\n").encode()
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
    except OSError as exc:
        os.close(fd)
        raise write_failed(path, exc, "run-folder lock") from None
    return RunLock(path, fd)
