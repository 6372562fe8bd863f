"""The rank <-> launcher wire format (engine/wire.py): every producer's output read by its consumer.

Producers run for real where they are programs: the MPI rank shim (launcher/host/mpirank.py) and
the guard (launcher/host/guard.py) reading what the ssh backend writes on its stdin; the rank starter
(launcher/host/elastic.py: torchrun's prefix and the `[dsl-agent]` report of a failed rank) imports torch,
which takes too long for a unit test: tests/integration/test_wire_starter.py runs it. Their output
goes through the launcher's consumer (launcher/output.py RankOutput), as in `dsl launch`.
"""

from __future__ import annotations

import io
import os
import signal
import string
import subprocess
import sys
import time
from types import SimpleNamespace

from dsl.engine import wire
from dsl.engine.wire import format_progress
from dsl.launcher.backends.mpi import MpiOutput
from dsl.launcher.output import RankOutput


def _output(tmp_path, steps=None):
    return RankOutput(tmp_path / "logs", stdout=io.StringIO(), stderr=io.StringIO(),
                      on_step=(lambda *s: steps.append(s)) if steps is not None else None)


def _feed(output, host: str, proc: subprocess.CompletedProcess) -> None:
    for stream in ("stdout", "stderr"):
        for line in getattr(proc, stream).splitlines():
            output(host, stream, line)


def test_the_prefix_template_torchrun_fills_is_the_prefix_the_launcher_parses():
    filled = string.Template(wire.PREFIX_TEMPLATE).substitute(rank=12, local_rank=3)
    assert filled == wire.rank_prefix(12, 3)
    assert wire.parse_rank_line(filled + "hello | x") == (12, 3, "hello | x")
    assert wire.parse_rank_line("[dsl:1:0]") == (1, 0, "")
    assert wire.parse_rank_line("[dsl:x:0] no") is None and wire.parse_rank_line("dsl:1:0 no") is None


def test_the_mpi_rank_shim_prefixes_like_torchrun(tmp_path):
    env = {**os.environ, "OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4",
           "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
           "MASTER_ADDR": "a", "MASTER_PORT": "1"}
    proc = subprocess.run([sys.executable, "-m", "dsl.launcher.host.mpirank", "--slots=0,1;0,1", "--",
                           sys.executable, "-c", "import os; print('from', os.environ['RANK'])"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == wire.rank_prefix(3, 1) + "from 3\n"
    output = _output(tmp_path)
    _feed(output, "node2", proc)
    output.close()
    assert output.rank_hosts == {3: "node2"} and list(output.tails[3]) == ["from 3"]


def test_mpiruns_failure_report_becomes_the_agent_report_the_launcher_reads(tmp_path):
    plan = SimpleNamespace(hosts=[SimpleNamespace(host="n1", ranks=(0, 1)), SimpleNamespace(host="n2", ranks=(2, 3))])
    output = _output(tmp_path)
    mpi = MpiOutput(plan, output)
    mpi("mpirun", "stdout", wire.rank_prefix(2, 0) + "training")
    for line in ("Process name: [[4242,1],2]", "Exit code:    7"):
        mpi("mpirun", "stderr", line)
    output.close()
    assert output.rank_hosts == {2: "n2"}
    failure = output.failures["mpirun"]
    assert (failure.rank, failure.exitcode) == (2, 7)


def test_agent_lines_round_trip_and_other_lines_are_not_reports():
    report = {"event": "checkpointed", "rank": 1, "exitcode": 75}
    assert wire.parse_agent(wire.agent_line(report)) == report
    assert wire.parse_agent("[dsl:0:0] [dsl-agent] {}") is None
    assert wire.parse_agent(wire.AGENT_MARK + "not json") == {}


def test_the_trainers_progress_line_reaches_the_progress_bar(tmp_path):
    steps = []
    output = _output(tmp_path, steps)
    line = format_progress(120, 300, 2.34564, 2.5e-3, 12345.4, 7.2)
    assert wire.parse_step(line) == (120, 300, 2.3456)
    output("n", "stdout", wire.rank_prefix(0, 0) + line)
    output("n", "stdout", wire.rank_prefix(1, 1) + format_progress(1, 300, 9.0, 1e-3, 1.0, 1.0))  # rank 0 only
    output("n", "stdout", wire.rank_prefix(0, 0) + wire.heartbeat_line(120))
    output.close()
    assert steps == [(120, 300, 2.3456)]
    assert output.beats[0][0] == 120


def test_the_guard_reads_the_lines_the_ssh_backend_writes(tmp_path):
    """SshProcess writes the environment, a warning and a dump request on a fake channel; the
    real guard, given those bytes on its stdin, runs the command with the environment and passes
    it SIGUSR1."""
    from dsl.launcher.backends.ssh import SshProcess
    from dsl.launcher.plan import HostLaunch, SshTarget

    class Channel:
        def __init__(self):
            self.sent = b""

        def exec_command(self, command):
            self.command = command

        def sendall(self, data):
            self.sent += data

        def recv(self, _n):
            time.sleep(0.05)
            return b""

        recv_stderr = recv

        def get_transport(self):
            return SimpleNamespace(global_request=lambda *a, **k: None, is_active=lambda: True)

        def close(self):
            pass

    channel = Channel()
    connection = SimpleNamespace(create_session=lambda: channel, close=lambda: None)
    target = SshTarget(None, 22, None, None, None, True, 5.0, keepalive_interval_s=60.0)
    launch = HostLaunch("h", 0, (0,), (0,), ("true",), {"WIRE_X": "a b'c"}, str(tmp_path))
    proc = SshProcess(launch, target, lambda *a: None, lambda host, t: connection)
    proc.warn(signal.SIGUSR1)
    proc.dump_stacks()
    proc.kill()
    lines = channel.sent.split(b"\n")
    assert wire.parse_env_line(lines[0]) == {"WIRE_X": "a b'c"}
    assert [wire.parse_guard_line(x) for x in lines[1:3]] == ["USR1", wire.GUARD_DUMP]

    got = tmp_path / "got"
    program = ("import os, signal, sys, time, pathlib\n"
               f"signal.signal(signal.SIGUSR1, lambda *a: pathlib.Path({str(got)!r}).write_text(os.environ['WIRE_X']))\n"
               "print('ready', flush=True)\ntime.sleep(30)\n")
    guard = subprocess.Popen([sys.executable, "-m", "dsl.launcher.host.guard", "--grace-s=1", "--env-stdin",
                              "--watch-stdin", "--", sys.executable, "-c", program],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=False)
    try:
        guard.stdin.write(lines[0] + b"\n")
        guard.stdin.flush()
        assert guard.stdout.readline() == b"ready\n"
        guard.stdin.write(lines[1] + b"\n")
        guard.stdin.flush()
        deadline = time.monotonic() + 10
        while not got.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert got.read_text() == "a b'c"
        guard.stdin.close()  # end of stdin: the guard stops the command
        assert guard.wait(10) != 0
    finally:
        if guard.poll() is None:
            guard.kill()
            guard.wait(10)


def test_guard_lines_parse():
    assert wire.parse_guard_line(f"{wire.GUARD_PING}\n".encode()) == wire.GUARD_PING
    assert wire.parse_guard_line(wire.guard_signal_line("USR2").encode()) == "USR2"
    assert wire.parse_guard_line(b"hello") is None
