"""The rank <-> launcher wire format, in one place: what ranks print that dsl reads.

Producers are the rank starter (engine/elastic.py), the bundled trainer (engine/train.py) and
user scripts (`heartbeat()`); the consumer is launcher/output.py. Torch-free, import-light (the
rank starter imports it before torch).

- `[dsl:RANK:LOCAL_RANK] ` prefixes every line a rank prints (torchrun's log-line prefix
  template, PREFIX_TEMPLATE; RANK_LINE parses it);
- `[dsl-agent] {json}`: the starter's report of a host's failed or checkpointed ranks;
- `step N/M | loss X | ...`: the bundled trainer's progress line on rank 0 (STEP_LINE);
- `[dsl-beat] N`: a heartbeat, one per step on every rank, printed only when the launcher
  watches for hangs (HEARTBEAT_ENV is set: local and ssh backends with `watchdog_s`). dsl
  neither prints nor logs these lines (torchrun's raw per-rank files under
  logs/torchelastic/ keep them); a job whose ranks all stop sending them for
  `watchdog_s` is hung (launcher/supervise.py). A line of ~20 bytes per step per rank;
- DUMP_SIGNAL: a rank that registered for it (`heartbeat()` and the bundled trainer do, with
  faulthandler) writes every thread's Python stack to stderr when it arrives; the guard sends it
  only to processes that catch it (launcher/guard.py), so a script without it is not killed.
- COLLECTIVE_TIMEOUT_ENV: seconds after which a collective of the engine's process group
  (engine/dist.py) raises instead of waiting; dsl sets it from `watchdog_s`.
"""

from __future__ import annotations

import os
import re
import signal
import sys

PREFIX_TEMPLATE = "[dsl:${rank}:${local_rank}] "
RANK_LINE = re.compile(r"^\[dsl:(\d+):(\d+)\] ?(.*)$", re.DOTALL)
AGENT_MARK = "[dsl-agent] "
STEP_LINE = re.compile(r"^step (\d+)/(\d+) \| loss ([0-9.]+|nan|inf)")
HEARTBEAT_MARK = "[dsl-beat] "
HEARTBEAT_ENV = "DSL_HEARTBEAT"
COLLECTIVE_TIMEOUT_ENV = "DSL_COLLECTIVE_TIMEOUT_S"
DUMP_SIGNAL = signal.SIGRTMIN + 6 if hasattr(signal, "SIGRTMIN") else None
"""A real-time signal: nothing else in a training process uses it (SIGUSR1/2 are the time-limit
warnings), and its default action ends a process, which is why only catchers receive it."""

_dump_ready = [False]


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
