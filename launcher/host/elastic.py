"""The per-host rank starter: torch's own elastic agent (torchrun), with a structured report.

`python -m dsl.launcher.host.elastic TORCHRUN_ARGS...` takes exactly torchrun's arguments and runs
torchrun's `run()`; dsl does not reimplement rank spawning. It adds what the launcher needs:

- every line a rank prints is prefixed `[dsl:RANK:LOCAL_RANK] ` (torchrun's log-line prefix
  template, applied with `--tee`), so the launcher can demultiplex one stream per host into
  `[host:rank]` lines and per-rank log files;
- instead of torchrun's Python traceback, a failure is reported as one line
  `[dsl-agent] {"event": "failed", "rank": R, "exitcode": C, ...}` on stderr (the first failing rank,
  torchrun's "root cause"), and this process exits with that rank's exit code (128+N for a rank
  killed by signal N), the way `deepspeed` and `srun` report a failed rank;
- SIGUSR1/SIGUSR2 (the warning before a time limit: Slurm's `--signal`, `dsl launch
  --time-limit`) are passed on to every rank and the job goes on (torchrun alone would die of
  them: their default action is to terminate). See "Warning signals" below;
- a host whose ranks checkpointed at such a signal and exited EXIT_CHECKPOINTED (75, below; the
  bundled trainer does, engine/train.py) reports `[dsl-agent] {"event": "checkpointed", ...}`
  instead of a failure and exits 75 (ranks that torchrun stopped after the first one exited
  count as checkpointed too: a rank exits 75 only after the collective save ended);
- OMP_NUM_THREADS = this host's usable cores / its ranks (at least 1) unless already set: ranks
  sharing a host otherwise start one thread per core each and fight over the cores (torchrun
  would set 1, DeepSpeed nothing);
- with `resources.bind` (DSL_BIND=cores|numa, set by the launcher) each local rank's CPU set,
  computed once here from this host's affinity mask and NUMA layout (topology/cpubind.py), and
  every rank started through `python -m dsl.engine.cpubind`, which pins itself to its set (and
  OMP_NUM_THREADS to its share, unless set) before exec'ing the program (`bind_ranks`). torchrun's
  own `--numa-binding` binds by GPU and needs numactl, so it does not serve a CPU host.

Warning signals. The handler installed for SIGUSR1/SIGUSR2 writes one preallocated byte to a
pipe and does nothing else: it runs between two bytecodes of torchrun's main thread, possibly in
the middle of an import (an `import psutil` inside the old handler, re-entered by a second
signal, crashed the agent with "partially initialized module 'psutil'"). It is installed first
thing, before torch is imported. A thread reads the pipe and delivers the signal to each rank once
the rank catches it (its handler shows in /proc/PID/status SigCgt) or CATCH_WAIT_S after the
signal came, whichever is first; ranks not started yet get it when they start. So a warning that
arrives while the ranks start is neither lost nor fatal to a rank that installs a handler (the
bundled trainer does at its first line); a rank that never catches it gets it anyway, with its
default action, as without dsl. Copies of one signal within COALESCE_S are delivered once:
under Slurm every process of the step gets the signal from Slurm itself and again from the guard,
so a rank may still see it twice (once from Slurm, once from here); handlers should be idempotent.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import sys
import threading
import time

import psutil

from dsl.engine.wire import AGENT_MARK, EXIT_CHECKPOINTED, PREFIX_TEMPLATE, WARNING_SIGNALS  # noqa: F401 - the wire format's home

CATCH_WAIT_S = 30.0
COALESCE_S = 1.0
_POLL_S = 0.05


def _exit_code(exitcode: int) -> int:
    return 128 - exitcode if exitcode < 0 else (exitcode or 1)


def set_omp_threads(ranks_on_host: int) -> None:
    """OMP_NUM_THREADS = usable cores / ranks on this host (at least 1), unless already set."""
    if "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        os.environ["OMP_NUM_THREADS"] = str(max(1, (cores or 1) // max(1, ranks_on_host)))


def bind_ranks(args, mode: str, sys_root: str = "/sys") -> list[tuple[int, ...]]:
    """Bind the ranks of this host (torchrun's parsed `args`) by `mode`: the CPU sets go to the
    ranks in DSL_CPU_SETS, and the program of every rank becomes `python -m dsl.engine.cpubind --
    <what torchrun would have run>`. BindError when the binding cannot apply on this host."""
    from dsl.engine.cpubind import OMP_ENV
    from dsl.topology.cpubind import CPU_SETS_ENV, encode, numa_layout, rank_cores

    sets = rank_cores(mode, int(args.nproc_per_node), frozenset(os.sched_getaffinity(0)),
                      numa_layout(sys_root))
    os.environ[CPU_SETS_ENV] = encode(sets)
    if "OMP_NUM_THREADS" not in os.environ:
        os.environ[OMP_ENV] = "1"
    python = os.getenv("PYTHON_EXEC", sys.executable)  # what torchrun runs the program with
    if args.no_python:
        program = [args.training_script, *args.training_script_args]
    else:
        program = [python, "-u", *(["-m"] if args.module else []), args.training_script,
                   *args.training_script_args]
    args.no_python, args.module = True, False
    args.training_script = python
    args.training_script_args = ["-m", "dsl.engine.cpubind", "--", *program]
    return sets


def _collateral(exitcode: int) -> int:
    """How likely a failure is the consequence of another rank's, not the cause (0 = least)."""
    if exitcode == -signal.SIGTERM:
        return 3  # what torchrun sends the ranks still running once one failed (stamped after it)
    if exitcode < 0:
        return 2  # killed by another signal: a gloo rank aborts (SIGABRT) when its peer's socket
        # closes, or at exit in gloo's destructors ("terminate called without an active exception")
    return 1 if exitcode == 1 else 0  # 1 is what Python exits with when a collective's peer vanished


def root_cause(failures: dict) -> int:
    """The rank whose failure caused the others'.

    torchrun's `get_first_failure` takes the earliest timestamp, but a rank that exits without an
    error file is stamped to the whole second when the agent notices it, so the failing rank and
    the peers it takes down (a gloo rank typically aborts with SIGABRT when its peer's socket
    closes) usually tie, and the lowest rank wins the tie. Within the earliest second we prefer a
    specific exit code over exit 1 over death by a signal over death by SIGTERM (torchrun stops
    the ranks still running with it, so a rank that died by SIGABRT and the peer torchrun stopped
    tie), then the lowest rank.
    """
    return min(failures, key=lambda r: (int(failures[r].timestamp), _collateral(failures[r].exitcode), r))


def catches(pid: int, signum: int) -> bool:
    """Whether process `pid` has a handler for `signum` (Linux: SigCgt of /proc/PID/status).
    Elsewhere, or when it cannot be read, True: deliver at once."""
    try:
        with open(f"/proc/{pid}/status", "rb") as handle:
            for line in handle:
                if line.startswith(b"SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except (OSError, ValueError, IndexError):
        pass
    return not sys.platform.startswith("linux") or not os.path.exists(f"/proc/{pid}")


class Forwarder:
    """Passes SIGUSR1/SIGUSR2 received by this process on to its child processes (the ranks).

    `install()` makes the pipe and starts the delivering thread before the handlers are set, so
    the handler itself only writes a byte that exists already (see the module docstring).
    `expected` is how many children to wait for (torchrun's --nproc-per-node), None: any.
    """

    def __init__(self, expected: int | None = None):
        self.expected = expected
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._write_fd, False)
        self._bytes = {sig: bytes([int(sig)]) for sig in WARNING_SIGNALS}
        self._pending: dict[int, tuple[float, set[int]]] = {}  # signal -> (received at, pids done)
        self._last: dict[int, float] = {}  # signal -> when it was last fully delivered
        self.delivered: list[tuple[int, int]] = []  # (signal, pid), for tests and logs

    def install(self) -> None:
        threading.Thread(target=self._run, name="dsl-signal-forwarder", daemon=True).start()
        for sig in WARNING_SIGNALS:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, _frame: object) -> None:
        try:
            os.write(self._write_fd, self._bytes[signum])
        except OSError:
            pass  # pipe full: copies already waiting say the same

    def _run(self) -> None:
        while True:
            # Blocks until a signal comes; polls only while one waits for its ranks.
            ready, _, _ = select.select([self._read_fd], [], [], _POLL_S if self._pending else None)
            now = time.monotonic()
            if ready:
                for sig in os.read(self._read_fd, 64):
                    if sig not in self._pending and now - self._last.get(sig, -COALESCE_S) >= COALESCE_S:
                        self._pending[sig] = (now, set())
            for sig in list(self._pending):
                self._deliver(sig, now)

    def _deliver(self, sig: int, now: float) -> None:
        since, done = self._pending[sig]
        waited = now - since >= CATCH_WAIT_S
        try:
            children = psutil.Process().children()
        except psutil.Error:
            children = []
        for child in children:
            if child.pid not in done and (waited or catches(child.pid, sig)):
                try:
                    os.kill(child.pid, sig)
                except OSError:
                    continue
                done.add(child.pid)
                self.delivered.append((sig, child.pid))
        enough = len(done) >= self.expected if self.expected else bool(done)
        if enough or waited:
            del self._pending[sig]
            self._last[sig] = now


def _nproc(argv: list[str]) -> int | None:
    """torchrun's --nproc-per-node from its argv, when it is a number (before argparse runs)."""
    for i, arg in enumerate(argv):
        name, _, value = arg.partition("=")
        if name in ("--nproc-per-node", "--nproc_per_node"):
            value = value or (argv[i + 1] if i + 1 < len(argv) else "")
            return int(value) if value.isdigit() else None
        if not arg.startswith("-"):
            return None  # the training script: the rest are its arguments
    return None


def checkpointed(failures: dict) -> bool:
    """Whether the failures of a host are its ranks stopping after a checkpoint at a warning
    signal: some exited EXIT_CHECKPOINTED, the rest too or were stopped by torchrun (a signal)."""
    codes = [f.exitcode for f in failures.values()]
    return EXIT_CHECKPOINTED in codes and all(c == EXIT_CHECKPOINTED or c < 0 for c in codes)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Before torch is imported (seconds): a warning arriving meanwhile must not end the agent.
    Forwarder(_nproc(argv)).install()
    os.environ["TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE"] = PREFIX_TEMPLATE
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(argv)
    bind = os.environ.get("DSL_BIND", "none")
    if bind != "none" and str(args.nproc_per_node).isdigit():
        from dsl.topology.cpubind import BindError, format_cpus

        try:
            sets = bind_ranks(args, bind)
        except BindError as exc:
            print(f"dsl: {socket.gethostname()}: {exc}", file=sys.stderr, flush=True)
            return 2
        print(f"dsl: {socket.gethostname()}: bind {bind}: " + ", ".join(
            f"local rank {i} -> cpus {format_cpus(s)}" for i, s in enumerate(sets)),
            file=sys.stderr, flush=True)
    elif bind != "none":  # dsl passes a number; by hand, say that nothing was bound
        print(f"dsl: {socket.gethostname()}: bind {bind} needs a number of ranks per host, got "
              f"--nproc-per-node={args.nproc_per_node}: ranks not bound", file=sys.stderr, flush=True)
    if str(args.nproc_per_node).isdigit():
        set_omp_threads(int(args.nproc_per_node))
    try:
        run(args)
    except ChildFailedError as exc:
        rank = root_cause(exc.failures)
        first = exc.failures[rank]
        if checkpointed(exc.failures):
            print(AGENT_MARK + json.dumps({
                "event": "checkpointed", "rank": rank, "exitcode": EXIT_CHECKPOINTED,
                "failures": {str(r): f.exitcode for r, f in sorted(exc.failures.items())},
            }), file=sys.stderr, flush=True)
            return EXIT_CHECKPOINTED
        report = {
            "event": "failed",
            "rank": rank,
            "local_rank": first.local_rank,
            "exitcode": first.exitcode,
            "signal": first.signal_name() if first.exitcode < 0 else None,
            "failures": {str(r): f.exitcode for r, f in sorted(exc.failures.items())},
        }
        print(AGENT_MARK + json.dumps(report), file=sys.stderr, flush=True)
        return _exit_code(first.exitcode)
    except SignalException as exc:
        # Asked to stop (the guard forwards SIGTERM): torchrun has already stopped the ranks.
        print(AGENT_MARK + json.dumps({"event": "stopped", "signal": exc.sigval.name}),
              file=sys.stderr, flush=True)
        return 128 + int(exc.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
