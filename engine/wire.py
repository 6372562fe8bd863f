"""The rank <-> launcher wire format, in one place: what ranks print that dsl reads, and what
dsl sends to a host's guard.

Producers are the rank starters (launcher/host/elastic.py through torchrun's prefix template,
launcher/host/mpirank.py with `rank_prefix`), mpirun's failure report turned into an agent report
(launcher/backends/mpi.py, `agent_line`), the bundled trainer (`format_progress`, printed by
engine/train.py) and user scripts (`heartbeat()`); the consumers are launcher/output.py and the
mpi backend. The launcher -> guard lines are produced by launcher/backends/ssh.py and read by
launcher/host/guard.py. tests/unit/test_wire_format.py checks every producer against its consumer.
Torch-free, import-light (the rank starter imports it before torch).

- `[dsl:RANK:LOCAL_RANK] ` prefixes every line a rank prints (torchrun's log-line prefix
  template, PREFIX_TEMPLATE; `rank_prefix` writes it, RANK_LINE parses it);
- `[dsl-agent] {json}`: the starter's report of a host's failed or checkpointed ranks
  (`agent_line` writes one, `parse_agent` reads one);
- `step N/M | loss X | ...`: the bundled trainer's progress line on rank 0 (`format_progress`
  writes it, STEP_LINE / `parse_step` read it);
- `[dsl-beat] N`: a heartbeat, one per step on every rank, printed only when the launcher
  watches for hangs (HEARTBEAT_ENV is set: local and ssh backends with `watchdog_s`). dsl
  neither prints nor logs these lines (torchrun's raw per-rank files under
  logs/torchelastic/ keep them); a job whose ranks all stop sending them for
  `watchdog_s` is hung (launcher/supervise.py). A line of ~20 bytes per step per rank;
- DUMP_SIGNAL: a rank that registered for it (`heartbeat()` and the bundled trainer do, with
  faulthandler) writes every thread's Python stack to stderr when it arrives; the guard sends it
  only to processes that catch it (launcher/host/guard.py), so a script without it is not killed.
- COLLECTIVE_TIMEOUT_ENV: seconds after which a collective of the engine's process group
  (engine/dist.py) raises instead of waiting; dsl sets it from `watchdog_s`.

Launcher -> guard, on the guard's stdin (ssh backend: `--env-stdin --watch-stdin`):
- the first line is the host's environment as one JSON object (`env_line`; no secret on a
  command line);
- then `ping` every keepalive interval (GUARD_PING: silence means a lost launcher), `dump`
  (GUARD_DUMP: every rank's stack) and `signal USR1` / `signal USR2` (`guard_signal_line`: a
  time-limit warning for every rank); `parse_guard_line` reads them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys

PREFIX_TEMPLATE = "[dsl:${rank}:${local_rank}] "
RANK_LINE = re.compile(r"^\[dsl:(\d+):(\d+)\] ?(.*)$", re.DOTALL)
AGENT_MARK = "[dsl-agent] "
EXIT_CHECKPOINTED = 75
"""A rank's exit code for "I checkpointed at a warning signal (SIGUSR1/SIGUSR2) and stopped:
resume me". The bundled trainer exits with it (engine/train.py); a user script may too. The
launcher reports it as such (not as a failure, no restart), and a Slurm batch script with
`requeue: true` requeues the job on it. 75 is sysexits' EX_TEMPFAIL ("try again later"), none of
0 = done, 1 = failure, 2 = bad input, 128+N = killed by signal N."""
WARNING_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)
STEP_LINE = re.compile(r"^step (\d+)/(\d+) \| loss ([0-9.]+|nan|inf)")
HEARTBEAT_MARK = "[dsl-beat] "
HEARTBEAT_ENV = "DSL_HEARTBEAT"
COLLECTIVE_TIMEOUT_ENV = "DSL_COLLECTIVE_TIMEOUT_S"
DUMP_SIGNAL = signal.SIGRTMIN + 6 if hasattr(signal, "SIGRTMIN") else None
"""A real-time signal: nothing else in a training process uses it (SIGUSR1/2 are the time-limit
warnings), and its default action ends a process, which is why only catchers receive it."""

GUARD_PING = "ping"
GUARD_DUMP = "dump"

_dump_ready = [False]


def rank_prefix(rank: int | str, local_rank: int | str) -> str:
    """The prefix of a rank's line (what torchrun writes from PREFIX_TEMPLATE)."""
    return PREFIX_TEMPLATE.replace("${rank}", str(rank)).replace("${local_rank}", str(local_rank))


def parse_rank_line(line: str) -> tuple[int, int, str] | None:
    """(rank, local rank, text) of a prefixed line, else None."""
    match = RANK_LINE.match(line)
    return (int(match.group(1)), int(match.group(2)), match.group(3)) if match else None


def agent_line(report: dict) -> str:
    """A starter's report line: AGENT_MARK + one JSON object (`event`: failed | checkpointed |
    stopped, with `rank`, `exitcode`, `signal`, ... as launcher/host/elastic.py writes them)."""
    return AGENT_MARK + json.dumps(report)


def parse_agent(line: str) -> dict | None:
    """The report of an agent line; None for any other line. A mark with bad JSON is {} (a
    report that says nothing, which consumers treat as no report)."""
    if not line.startswith(AGENT_MARK):
        return None
    try:
        report = json.loads(line[len(AGENT_MARK):])
    except json.JSONDecodeError:
        return {}
    return report if isinstance(report, dict) else {}


def format_duration(seconds: float) -> str:
    """0:07, 12:34, 1:02:03."""
    total = max(0, int(round(seconds)))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def format_progress(step: int, steps: int, loss: float, lr: float, tokens_per_s: float, eta_s: float) -> str:
    """The bundled trainer's progress line, which `parse_step` reads:

        step 120/300 | loss 2.3456 | lr 2.50e-03 | 12,345 tok/s | eta 0:07
    """
    return (f"step {step}/{steps} | loss {loss:.4f} | lr {lr:.2e} | "
            f"{tokens_per_s:,.0f} tok/s | eta {format_duration(eta_s)}")


def parse_step(text: str) -> tuple[int, int, float] | None:
    """(step, steps, loss) of a progress line (the text after the rank prefix), else None."""
    match = STEP_LINE.match(text)
    return (int(match.group(1)), int(match.group(2)), float(match.group(3))) if match else None


def env_line(env: dict) -> bytes:
    """The first line on a guard's stdin: the host's environment."""
    return (json.dumps(dict(env)) + "\n").encode()


def parse_env_line(line: bytes) -> dict[str, str]:
    """The environment of `env_line` (an empty line: none). Raises ValueError on bad JSON."""
    extra = json.loads(line or b"{}")
    if not isinstance(extra, dict):
        raise ValueError(f"expected a JSON object, got {type(extra).__name__}")
    return {str(k): str(v) for k, v in extra.items()}


def guard_signal_line(signame: str) -> str:
    """`signal USR1`: pass SIGUSR1 to every rank (signame without the SIG)."""
    return f"signal {signame}"


def parse_guard_line(line: bytes) -> str | None:
    """A control line on a guard's stdin -> GUARD_PING, GUARD_DUMP or a signal name (`USR1`);
    None for anything else."""
    text = line.strip().decode("utf-8", errors="replace")
    if text in (GUARD_PING, GUARD_DUMP):
        return text
    if text.startswith("signal "):
        return text[len("signal "):].strip() or None
    return None


def heartbeat_line(step: int) -> str:
    return f"{HEARTBEAT_MARK}{step}"


def parse_heartbeat(text: str) -> int | None:
    """The step of a heartbeat line (the text after the rank prefix), else None."""
    if text.startswith(HEARTBEAT_MARK):
        try:
            return int(text[len(HEARTBEAT_MARK):])
        except ValueError:
            return None
    return None


def install_stack_dump() -> None:
    """Write every thread's stack to stderr when DUMP_SIGNAL arrives (faulthandler: works while
    the main thread is blocked inside a C++ collective, where a Python handler would not run)."""
    if DUMP_SIGNAL is None or _dump_ready[0]:
        return
    import faulthandler

    faulthandler.register(DUMP_SIGNAL, file=sys.stderr, all_threads=True, chain=False)
    _dump_ready[0] = True


def heartbeat(step: int) -> None:
    """Tell a watching launcher this rank finished step `step` (no-op when none watches). A user
    script calls it once per step; the first call also installs the stack dump."""
    if not os.environ.get(HEARTBEAT_ENV):
        return
    install_stack_dump()
    print(heartbeat_line(step), flush=True)


def collective_timeout_s(default_s: float) -> float:
    """The collective timeout dsl set for this rank (COLLECTIVE_TIMEOUT_ENV), else `default_s`."""
    try:
        return float(os.environ[COLLECTIVE_TIMEOUT_ENV])
    except (KeyError, ValueError):
        return default_s
