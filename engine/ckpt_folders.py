"""The filesystem half of a checkpoint save: temporary folder, commit, `latest`, retention.

The protocol (what survives a kill at any moment) is written at the top of engine/checkpoint.py;
this module holds its steps, run by rank 0, and the rules that let two writers share a
checkpoints folder without destroying each other's work:

- every `.tmp-*` folder is locked (flock on the folder's own descriptor, LOCK_EX) by the writer
  that created it, from its creation until it is renamed to `step-*` or removed. The kernel
  drops the lock when the writer ends, however it ends, so a `.tmp-*` folder whose lock can be
  taken is a leftover of a dead writer, and only those are deleted ("clear leftovers" used to
  delete every `.tmp-*`, including another live run's checkpoint in progress);
- creating a `.tmp-*` folder (with its lock) and clearing leftovers happen under a lock of the
  checkpoints folder itself, so a clearer never sees a new folder before its writer locked it;
  so do writing and renaming the `.latest-*` pointer;
- retention never deletes the folder `latest` names at that moment.

On a filesystem without flock (ENOLCK, some network filesystems), folders are cleared as before,
whoever wrote them. Writes that fail (a full disk) raise WriteError naming the path and the free
space (engine/writefail.py); torch.save's own writer would raise a RuntimeError from its C++ zip
writer instead of an OSError, so objects are serialized in memory first and written here.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from dsl.engine.errors import WriteError
from dsl.engine.writefail import write_failed

LATEST = "latest"
STEP_RE = re.compile(r"^step-(\d+)$")
_held: dict[str, int] = {}  # temporary folder -> the descriptor holding its lock


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(path: Path, data: bytes, what: str = "checkpoint file") -> None:
    """Write and fsync `path`; an OSError becomes a WriteError naming it."""
    try:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise write_failed(path, err, what) from None


def save_file(obj: Any, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes(path, buffer.getvalue())


def step_folders(root: Path) -> list[tuple[int, Path]]:
    out = []
    for child in root.iterdir() if root.is_dir() else []:
        m = STEP_RE.match(child.name)
        if m and child.is_dir() and (child / "meta.json").is_file():
            out.append((int(m.group(1)), child))
    return sorted(out)


def _lock(path: Path, blocking: bool) -> int | None:
    """A descriptor of folder `path` holding an exclusive flock; None when the filesystem has no
    locks. Raises BlockingIOError when not `blocking` and someone else holds it."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        raise
    except OSError as err:
        os.close(fd)
        if err.errno in (errno.ENOLCK, errno.EINVAL, errno.EBADF, errno.EOPNOTSUPP):
            return None
        raise
    return fd


@contextlib.contextmanager
def _folder_locked(root: Path) -> Iterator[None]:
    fd = _lock(root, blocking=True)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


def in_use(folder: Path) -> bool:
    """Whether a live writer holds `folder` (a `.tmp-*` folder)."""
    try:
        fd = _lock(folder, blocking=False)
    except BlockingIOError:
        return True
    except FileNotFoundError:
        return False
    if fd is not None:
        os.close(fd)
    return False


def delete(path: Path, root: Path, token: str) -> None:
    """Rename `path` out of the `step-*` namespace first, so a kill during the (non-atomic)
    delete never leaves a half-deleted folder that looks like a checkpoint."""
    doomed = root / f".del-{path.name}-{token}"
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def clear_leftovers(root: Path) -> None:
    """Partial folders of dead writers, folders being deleted, pointers of writers killed
    earlier (call under `_folder_locked(root)`)."""
    for stale in [*root.glob(".tmp-*"), *root.glob(".del-*"), *root.glob(f".{LATEST}-*")]:
        if stale.is_dir():
            if stale.name.startswith(".tmp-") and in_use(stale):
                continue  # another run's checkpoint in progress
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def named_latest(root: Path) -> str | None:
    current = root / LATEST
    return current.read_text(encoding="utf-8").strip() if current.is_file() else None


def begin_folder(root: Path, name: str, keep: int | None) -> Path:
    """Rank 0, before any rank writes: clear leftovers, apply retention, create, lock and return
    the temporary folder every rank writes into. Raises WriteError."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        with _folder_locked(root):
            clear_leftovers(root)
            token = uuid.uuid4().hex[:8]
            # Retention before writing too, so a writer killed before its own clean-up never lets
            # folders pile up: at most keep + 1 `step-*` folders exist at any moment.
            retain(root, keep, protect={named_latest(root)}, token=token)
            tmp = root / f".tmp-{name}-{token}"
            tmp.mkdir()
            fd = _lock(tmp, blocking=False)
    except OSError as err:
        raise write_failed(err.filename or root, err, "checkpoint folder") from None
    if fd is not None:
        _held[str(tmp)] = fd
    return tmp


def release(tmp: Path) -> None:
    fd = _held.pop(str(tmp), None)
    if fd is not None:
        os.close(fd)


def discard(tmp: Path) -> None:
    """Rank 0, after a failed save: remove its temporary folder, then let go of it."""
    shutil.rmtree(tmp, ignore_errors=True)
    release(tmp)


def commit_folder(root: Path, tmp: Path, name: str, files: dict[str, Any], meta: dict[str, Any],
                  keep: int | None) -> Path:
    """Rank 0, after every rank's file in `tmp` is complete and fsynced: add `files`
    (torch.save) and meta.json, rename `tmp` to `root/name`, point `latest` at it, apply
    retention. Raises WriteError (tmp is left for the caller to discard)."""
    token = tmp.name.rsplit("-", 1)[-1]
    for fname, obj in files.items():
        save_file(obj, tmp / fname)
    write_bytes(tmp / "meta.json", json.dumps(meta, indent=1, sort_keys=True).encode())
    final = root / name
    try:
        fsync_dir(tmp)
        if final.exists():
            os.rename(final, root / f".old-{name}-{token}")
        os.rename(tmp, final)
        release(tmp)
        fsync_dir(root)
        with _folder_locked(root):
            pointer = root / f".{LATEST}-{token}"
            write_bytes(pointer, (name + "\n").encode(), "checkpoint pointer")
            os.replace(pointer, root / LATEST)
            fsync_dir(root)
        for aside in root.glob(".old-*"):  # `latest` names a complete folder now
            delete(aside, root, token)
        retain(root, keep, protect={name, named_latest(root)}, token=token)
    except WriteError:
        raise
    except OSError as err:
        raise write_failed(err.filename or final, err, "checkpoint") from None
    return final


def retain(root: Path, keep: int | None, *, protect: set[str | None], token: str) -> None:
    """Delete all but the newest `keep` `step-*` folders, never one named in `protect`."""
    if keep is None:
        return
    folders = step_folders(root)
    for _, path in folders[: max(0, len(folders) - keep)]:
        if path.name not in protect:
            delete(path, root, token)
