"""A full disk under a real run: a 3 MiB tmpfs as output_dir, a checkpoint every step.

The run ends with one message naming the file and the free space, exit 74, no traceback from
dsl or the ranks; `latest` still names a complete checkpoint, and with space again the next
launch resumes from it. Needs root (mount)."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from tests.conftest import run_dsl

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs (root only)")]


@pytest.fixture
def small_disk(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(out)], check=True)
    try:
        yield out
    finally:
        subprocess.run(["umount", "-l", str(out)], check=False)


def test_full_disk_during_checkpoints_is_one_message_and_the_previous_checkpoint_resumes(tmp_path, small_disk):
    out = small_disk
    spec = tmp_path / "job.yaml"
    spec.write_text("name: full\nrun:\n  train: {steps: 500, log_every: 1, checkpoint_every: 1, "
                    "keep_checkpoints: 3, model: {preset: tiny}}\n"
                    f"resources:\n  procs_per_node: 2\noutput_dir: {out}\n")
    proc = run_dsl("launch", str(spec), timeout=300)
    assert proc.returncode == 74, proc.stderr[-3000:]
    both = proc.stdout + proc.stderr
    assert "Traceback" not in both and "RuntimeError" not in both
    message = re.search(r"cannot write (checkpoint file|checkpoint|metrics file|log file) "
                        rf"({re.escape(str(out))}/\S+): No space left on device \((\d+) (B|KiB) free of 3\.0 MiB "
                        rf"on the filesystem of {re.escape(str(out))}", proc.stderr)
    assert message, proc.stderr[-3000:]
    assert f"dsl: job full " in proc.stderr and "(exit 74)" in proc.stderr or "code 74" in proc.stderr
    latest = (out / "checkpoints/latest").read_text().strip()
    step = int(latest.split("-")[1])
    assert step >= 1 and (out / "checkpoints" / latest / "meta.json").is_file()
    assert not list((out / "checkpoints").glob(".tmp-*"))  # the failed save removed its folder

    subprocess.run(["mount", "-o", "remount,size=64m", str(out)], check=True)
    spec.write_text(spec.read_text().replace("steps: 500", f"steps: {step + 2}"))
    proc = run_dsl("launch", str(spec), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints'} at step {step} " in proc.stderr
