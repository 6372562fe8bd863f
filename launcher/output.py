"""Rank output: `[host:rank]` prefixes, per-rank log files, the failure report, progress.

Every host streams one stdout and one stderr; each line a rank printed arrives tagged
`[dsl:RANK:LOCAL_RANK] ` by the rank starter (`dsl.launcher.host.elastic`). `RankOutput` is the sink the
backends feed, from their reader threads:

- a rank's line goes to our stdout (or stderr, as the rank wrote it) as `[host:rank] text` and
  to `OUTPUT_DIR/logs/rank{R}.log`; the last lines of every rank are kept for the failure message;
- a line of the starter itself (torchrun's own logging) goes to stderr as `[host] text` and to
  `OUTPUT_DIR/logs/{host}.agent.log`;
- a heartbeat `[dsl-beat] STEP` (engine/wire.py) is recorded in `beats`, for the hang
  watchdog, and neither printed nor logged;
- the starter's `[dsl-agent] {json}` report (which rank failed, with what code) is recorded, not
  printed;
- a progress line of the bundled trainer (`step N/M | loss X | ...` on rank 0) moves the progress
  bar when stderr is a terminal.

A log file that cannot be written (a full disk) is not an exception in a reader thread: the first
such error is kept in `write_error` (a WriteError naming the file and the free space,
engine/writefail.py), log files are no longer written, lines still reach the terminal, and
`supervise` stops the job and exits 74.
"""

from __future__ import annotations

import collections
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TextIO

from dsl.engine.errors import WriteError
from dsl.engine.writefail import write_failed

from dsl.engine.wire import parse_agent, parse_heartbeat, parse_rank_line, parse_step

TAIL_LINES = 20


@dataclass
class Failure:
    """What a host's starter reported about its first failing rank."""

    host: str
    rank: int | None
    exitcode: int | None
    signal: str | None


class RankOutput:
    def __init__(self, log_dir: Path, stdout: TextIO | None = None, stderr: TextIO | None = None,
                 on_step: Callable[[int, int, float], None] | None = None):
        self._log_dir = log_dir
        self._stdout = stdout or sys.stdout
        self._stderr = stderr or sys.stderr
        self._on_step = on_step
        self._lock = threading.Lock()
        self._files: dict[str, TextIO] = {}
        self.tails: dict[int, collections.deque[str]] = collections.defaultdict(
            lambda: collections.deque(maxlen=TAIL_LINES))
        self.rank_hosts: dict[int, str] = {}
        self.failures: dict[str, Failure] = {}
        self.beats: dict[int, tuple[int, float]] = {}
        """rank -> (its last heartbeat's step, when it came: time.monotonic())."""
        self._header = ""
        self.write_error: WriteError | None = None
        try:
            log_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise write_failed(log_dir, exc, "log folder") from None

    def __call__(self, host: str, stream: str, line: str) -> None:
        parsed = parse_rank_line(line)
        report = None if parsed else parse_agent(line)
        with self._lock:
            if parsed:
                rank, _, text = parsed
                self.rank_hosts[rank] = host
                beat = parse_heartbeat(text)
                if beat is not None:  # neither printed nor logged (engine/wire.py)
                    self.beats[rank] = (beat, time.monotonic())
                    return
                self.tails[rank].append(text)
                self._log(f"rank{rank}.log", text)
                out = self._stdout if stream == "stdout" else self._stderr
                out.write(f"[{host}:{rank}] {text}\n")
                out.flush()
                if rank == 0 and self._on_step is not None:
                    step = parse_step(text)
                    if step:
                        self._on_step(*step)
            elif report is not None:
                self._log(f"{host}.agent.log", line)
                self._record_failure(host, report)
            else:
                self._log(f"{host}.agent.log", line)
                self._stderr.write(f"[{host}] {line}\n")
                self._stderr.flush()

    def note(self, text: str, ranks: range | None = None) -> None:
        """A line of dsl's own into the logs (attempt boundaries); opens every rank's log, so a
        rank that prints nothing still has one."""
        with self._lock:
            self._header = f"# dsl: {text}\n"
            for name in list(self._files):
                self._log(name, self._header.rstrip("\n"))
            for rank in ranks or ():
                if f"rank{rank}.log" not in self._files:
                    self._guarded(f"rank{rank}.log", lambda n: self._open(n).flush())

    def close(self) -> None:
        with self._lock:
            for name, handle in self._files.items():
                try:  # after a failed write its line is still buffered: close() tries it again
                    handle.close()
                except OSError as exc:
                    self.write_error = self.write_error or write_failed(self._log_dir / name, exc, "log file")
            self._files.clear()

    def log_path(self, rank: int) -> Path:
        return self._log_dir / f"rank{rank}.log"

    def _log(self, name: str, text: str) -> None:
        def write(name: str) -> None:
            handle = self._files.get(name) or self._open(name)
            handle.write(text + "\n")
            handle.flush()

        self._guarded(name, write)

    def _guarded(self, name: str, action: Callable[[str], object]) -> None:
        """`action(name)` on a log file, unless one failed already; the first OSError is kept."""
        if self.write_error is not None:
            return
        try:
            action(name)
        except OSError as exc:
            self.write_error = write_failed(self._log_dir / name, exc, "log file")

    def _open(self, name: str) -> TextIO:
        # Append: a restart or a later launch of the same spec adds to, never erases, a log.
        handle = self._files[name] = open(self._log_dir / name, "a", encoding="utf-8")
        handle.write(self._header)
        return handle

    def _record_failure(self, host: str, report: dict) -> None:
        if report.get("event") == "failed":
            self.failures.setdefault(host, Failure(
                host, report.get("rank"), report.get("exitcode"), report.get("signal")))
