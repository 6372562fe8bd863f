"""One message for a failed write of the run's output: the path, the error, the free space.

Used by the launcher (per-rank logs, the run folder's files: launcher/output.py,
launcher/launch.py), the trainer (metrics.jsonl: engine/train.py) and checkpoints
(engine/ckpt_folders.py, engine/ckpt_files.py). A write that fails for lack of space usually
fails without naming its file (ENOSPC comes from write(), not open()), so the caller says which
path it was writing. Torch-free: the launcher imports it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from dsl.engine.errors import WriteError

EXIT_WRITE_FAILED = WriteError.exit_code


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def free_space(path: str | os.PathLike) -> str:
    """`N free of M on the filesystem of DIR` for the nearest existing folder of `path`."""
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if folder.is_file():
        folder = folder.parent
    try:
        usage = shutil.disk_usage(folder)
    except OSError as exc:
        return f"free space of {folder} unknown ({exc.strerror or exc})"
    return f"{_size(usage.free)} free of {_size(usage.total)} on the filesystem of {folder}"


def write_failed(path: str | os.PathLike, err: OSError, what: str) -> WriteError:
    """The WriteError for `err` raised while writing `what` (e.g. "checkpoint file") to `path`."""
    reason = err.strerror or str(err)
    return WriteError(f"cannot write {what} {path}: {reason} ({free_space(path)}); free space "
                      "there or choose another output_dir, then launch again")
