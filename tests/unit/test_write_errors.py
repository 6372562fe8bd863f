"""A write of the run's output that fails: one message naming the path and the free space, exit
74, no traceback. dsl's own rank logs here (launcher/output.py, launcher/supervise.py); a full
disk under real ranks in tests/integration/test_disk_full.py."""

from __future__ import annotations

import errno
import io
import shutil
import time
from types import SimpleNamespace

from dsl.engine.writefail import EXIT_WRITE_FAILED, write_failed
from dsl.launcher.output import RankOutput
from dsl.launcher.supervise import supervise


def test_message_names_the_path_the_error_and_the_free_space(tmp_path):
    err = write_failed(tmp_path / "gone/metrics.jsonl", OSError(errno.ENOSPC, "No space left on device"),
                       "metrics file")
    usage = shutil.disk_usage(tmp_path)
    assert str(err).startswith(f"cannot write metrics file {tmp_path}/gone/metrics.jsonl: No space left on "
                               f"device (")
    assert f"free of {usage.total / 2**30:.1f} GiB on the filesystem of {tmp_path})" in str(err)
    assert err.exit_code == EXIT_WRITE_FAILED == 74


def test_a_log_that_cannot_be_written_is_recorded_and_lines_still_reach_the_terminal(tmp_path):
    (tmp_path / "rank1.log").mkdir()  # opening it for append fails (IsADirectoryError)
    stdout = io.StringIO()
    output = RankOutput(tmp_path, stdout=stdout, stderr=io.StringIO())
    output("node1", "stdout", "[dsl:0:0] zero")
    output("node1", "stdout", "[dsl:1:1] one")  # no exception in the backend's reader thread
    output("node1", "stdout", "[dsl:0:0] zero again")
    output.close()
    assert stdout.getvalue() == "[node1:0] zero\n[node1:1] one\n[node1:0] zero again\n"
    assert str(output.write_error).startswith(f"cannot write log file {tmp_path / 'rank1.log'}: Is a directory (")
    assert (tmp_path / "rank0.log").read_text() == "zero\n"  # nothing written after the failure


class _Host:
    def __init__(self, name: str):
        self.host, self.code, self.stopped_at = name, None, None

    def poll(self):
        return self.code

    def terminate(self):
        self.code, self.stopped_at = 143, time.monotonic()

    kill = terminate

    def wait_output(self, timeout_s):
        pass


def test_supervise_stops_every_rank_when_a_log_cannot_be_written(tmp_path):
    hosts = [_Host("a"), _Host("b")]
    output = RankOutput(tmp_path, stdout=io.StringIO(), stderr=io.StringIO())
    backend = SimpleNamespace(start=lambda plan, sink: hosts)
    plan = SimpleNamespace(name="job", world_size=2, max_restarts=3)
    (tmp_path / "rank0.log").mkdir()
    started = time.monotonic()
    output("a", "stdout", "[dsl:0:0] step 1")
    outcome = supervise(plan, backend, output)
    assert outcome.exit_code == 74 and outcome.attempts == 1  # not restarted: the disk stays full
    assert outcome.write_error.startswith(f"cannot write log file {tmp_path / 'rank0.log'}")
    assert all(h.stopped_at is not None and h.stopped_at - started < 2 for h in hosts)
