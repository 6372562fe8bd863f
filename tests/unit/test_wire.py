"""The heartbeat of the wire format (engine/wire.py) as the launcher reads it: recorded per
rank for the watchdog, never printed nor written to the rank's log; produced only when dsl
watches (DSL_HEARTBEAT), with the stack dump installed on the first."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys

from dsl.engine.wire import DUMP_SIGNAL, HEARTBEAT_ENV, heartbeat_line, parse_heartbeat
from dsl.launcher.output import RankOutput


def test_heartbeats_are_recorded_not_shown(tmp_path):
    stdout, steps = io.StringIO(), []
    output = RankOutput(tmp_path, stdout=stdout, stderr=io.StringIO(),
                        on_step=lambda step, total, loss: steps.append(step))
    output("node2", "stdout", f"[dsl:1:0] {heartbeat_line(7)}")
    output("node1", "stdout", "[dsl:0:0] step 7/9 | loss 1.2500 | lr 1.00e-03 | 9 tok/s | eta 0:01")
    output.close()
    assert output.beats[1][0] == 7 and output.rank_hosts[1] == "node2"
    assert steps == [7]
    assert "dsl-beat" not in stdout.getvalue() + "".join(p.read_text() for p in tmp_path.glob("*.log"))
    assert parse_heartbeat("[dsl-beat] x") is None and parse_heartbeat("step 1/2") is None


def test_heartbeat_prints_only_when_watched_and_installs_the_stack_dump():
    code = ("import os, signal, time\nfrom dsl.engine.wire import heartbeat, DUMP_SIGNAL\n"
            "heartbeat(3)\nprint('ready', flush=True)\ndef inner():\n    time.sleep(30)\ninner()\n")
    quiet = subprocess.run([sys.executable, "-c", code.replace("inner()\n", "")], capture_output=True, text=True,
                           env={k: v for k, v in os.environ.items() if k != HEARTBEAT_ENV}, timeout=60)
    assert quiet.stdout == "ready\n"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, HEARTBEAT_ENV: "1"})
    try:
        assert proc.stdout.readline() == heartbeat_line(3) + "\n"
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(DUMP_SIGNAL)  # the dump, and the process goes on
        lines = [proc.stderr.readline() for _ in range(3)]
        assert any('line 6 in inner' in line for line in lines), lines
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)


def test_the_guard_passes_the_dump_signal_only_to_processes_that_catch_it(tmp_path):
    import time

    catcher = ("import faulthandler, signal, sys, time\nfrom dsl.engine.wire import install_stack_dump\n"
               "install_stack_dump()\nprint('catcher ready', flush=True)\ntime.sleep(30)\n")
    plain = "import time\nprint('plain ready', flush=True)\ntime.sleep(30)\n"
    both = (f"import subprocess, sys\nprocs = [subprocess.Popen([sys.executable, '-c', {catcher!r}]),"
            f" subprocess.Popen([sys.executable, '-c', {plain!r}])]\n"
            "codes = [p.wait() for p in procs]\nprint('codes', codes, flush=True)\n")
    guard = subprocess.Popen([sys.executable, "-m", "dsl.launcher.host.guard", "--grace-s=1", "--", sys.executable,
                              "-c", both], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = {guard.stdout.readline().strip() for _ in range(2)}
        assert ready == {"catcher ready", "plain ready"}
        guard.send_signal(DUMP_SIGNAL)
        deadline = time.monotonic() + 10
        err = ""
        while "Current thread" not in err and time.monotonic() < deadline:
            err += guard.stderr.readline()
        assert "Current thread" in err  # the catcher dumped its stack
        time.sleep(0.5)
        assert guard.poll() is None  # the plain child (and its parent) did not die of it
    finally:
        guard.send_signal(signal.SIGTERM)
        guard.wait(10)
