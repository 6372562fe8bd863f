"""The run-folder lock (launcher/runlock.py) and the checkpoint clean-up that spares another
live writer's temporary folder (engine/ckpt_folders.py), each held by a real second process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dsl.engine.ckpt_folders import begin_folder, discard
from dsl.engine.errors import UserError
from dsl.launcher.runlock import LOCK_NAME, acquire


def _holder(code: str) -> subprocess.Popen:
    """A process that runs `code`, prints `ready`, then sleeps until killed."""
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code) + "\nprint('ready', flush=True)\n"
                             "import time\ntime.sleep(600)\n"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)


def test_second_lock_is_refused_naming_the_owner_then_free_once_the_owner_dies(tmp_path):
    out = tmp_path / "out"
    owner = _holder(f"from pathlib import Path\nfrom dsl.launcher.runlock import acquire\n"
                    f"lock = acquire(Path({str(out)!r}), 'first', 'job.yaml:1:1 output_dir')")
    try:
        with pytest.raises(UserError) as refused:
            acquire(out, "second", "job.yaml:9:1 output_dir")
        message = str(refused.value)
        assert message.startswith("job.yaml:9:1 output_dir: ")
        assert f"job first launched on host {socket.gethostname()} (pid {owner.pid}," in message
        assert str(out / LOCK_NAME) in message
    finally:
        _kill(owner)  # kill -9: the kernel drops its lock, nothing is stale
    with acquire(out, "second", "job.yaml:9:1 output_dir") as lock:
        assert f'"pid": {os.getpid()}' in lock.path.read_text()


def test_checkpoint_cleanup_spares_a_live_writers_temporary_folder(tmp_path):
    root = tmp_path / "checkpoints"
    other = _holder(f"from pathlib import Path\nfrom dsl.engine.ckpt_folders import begin_folder\n"
                    f"tmp = begin_folder(Path({str(root)!r}), 'step-000005', keep=2)\n"
                    f"(tmp / 'rng.pt').write_bytes(b'in progress')")
    try:
        (theirs,) = root.glob(".tmp-step-000005-*")
        ours = begin_folder(root, "step-000006", keep=2)  # clears leftovers first
        assert (theirs / "rng.pt").read_bytes() == b"in progress"
        discard(ours)
    finally:
        _kill(other)
    ours = begin_folder(root, "step-000007", keep=2)  # the writer is dead: its folder is a leftover
    assert not theirs.exists()
    assert [p.name for p in root.iterdir()] == [ours.name]
    discard(ours)
