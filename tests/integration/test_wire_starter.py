"""The rank starter (launcher/host/elastic.py, torchrun) as the producer of the wire format
(engine/wire.py): its prefixed rank lines and its report of a failed rank, read by the launcher's
consumer (launcher/output.py). The other producers: tests/unit/test_wire_format.py."""

from __future__ import annotations

import io
import os
import subprocess
import sys

from dsl.launcher.output import RankOutput
from dsl.launcher.ports import reserve_port


def _output(tmp_path):
    return RankOutput(tmp_path / "logs", stdout=io.StringIO(), stderr=io.StringIO())


def _feed(output, host: str, proc: subprocess.CompletedProcess) -> None:
    for stream in ("stdout", "stderr"):
        for line in getattr(proc, stream).splitlines():
            output(host, stream, line)


def test_the_starter_prefixes_rank_lines_and_reports_the_failed_rank(tmp_path):
    """launcher/host/elastic.py (torchrun) as dsl runs it on a host, its output through RankOutput."""
    port = reserve_port()
    port.release()
    program = tmp_path / "prog.py"
    program.write_text("import os, sys\nprint('hello', os.environ['RANK'], flush=True)\nsys.exit(3)\n")
    proc = subprocess.run(
        [sys.executable, "-m", "dsl.launcher.host.elastic", "--nnodes=1", "--node-rank=0", "--nproc-per-node=1",
         "--master-addr=127.0.0.1", f"--master-port={port.port}", "--max-restarts=0",
         "--monitor-interval=0.1", "--tee=3", f"--log-dir={tmp_path / 'te'}", str(program)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 3, proc.stderr
    output = _output(tmp_path)
    _feed(output, "node1", proc)
    output.close()
    assert output.rank_hosts == {0: "node1"}
    assert list(output.tails[0]) == ["hello 0"]
    failure = output.failures["node1"]
    assert (failure.rank, failure.exitcode, failure.signal) == (0, 3, None)
