"""The per-host rank starter: torch's own elastic agent (torchrun), with a structured report.

`python -m dsl.engine.elastic TORCHRUN_ARGS...` takes exactly torchrun's arguments and runs
torchrun's `run()`; dsl does not reimplement rank spawning. It adds two things the launcher needs:

- every line a rank prints is prefixed `[dsl:RANK:LOCAL_RANK] ` (torchrun's log-line prefix
  template, applied with `--tee`), so the launcher can demultiplex one stream per host into
  `[host:rank]` lines and per-rank log files;
- instead of torchrun's Python traceback, a failure is reported as one line
  `[dsl-agent] {"event": "failed", "rank": R, "exitcode": C, ...}` on stderr (the first failing rank,
  torchrun's "root cause"), and this process exits with that rank's exit code (128+N for a rank
  killed by signal N), the way `deepspeed` and `srun` report a failed rank;
- SIGUSR1/SIGUSR2 (Slurm's warning before the time limit) are passed on to every rank and the
  job goes on (torchrun alone would die of them: their default action is to terminate);
- OMP_NUM_THREADS = this host's usable cores / its ranks (at least 1) unless already set: ranks
  sharing a host otherwise start one thread per core each and fight over the cores (torchrun
  would set 1, DeepSpeed nothing).
"""

from __future__ import annotations

import json
import os
import signal
import sys

PREFIX_TEMPLATE = "[dsl:${rank}:${local_rank}] "
AGENT_MARK = "[dsl-agent] "


def _exit_code(exitcode: int) -> int:
    return 128 - exitcode if exitcode < 0 else (exitcode or 1)


def set_omp_threads(ranks_on_host: int) -> None:
    """OMP_NUM_THREADS = usable cores / ranks on this host (at least 1), unless already set."""
    if "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        os.environ["OMP_NUM_THREADS"] = str(max(1, (cores or 1) // max(1, ranks_on_host)))


def _collateral(exitcode: int) -> int:
    """How likely a failure is the consequence of another rank's, not the cause (0 = least)."""
    if exitcode < 0:
        return 2  # killed by a signal: gloo aborts (SIGABRT) or torchrun's SIGTERM after a peer died
    return 1 if exitcode == 1 else 0  # 1 is what Python exits with when a collective's peer vanished


def root_cause(failures: dict) -> int:
    """The rank whose failure caused the others'.

    torchrun's `get_first_failure` takes the earliest timestamp, but a rank that exits without an
    error file is stamped to the whole second when the agent notices it, so the failing rank and
    the peers it takes down (a gloo rank typically aborts with SIGABRT when its peer's socket
    closes) usually tie, and the lowest rank wins the tie. Within the earliest second we prefer a
    specific exit code over exit 1 over death by signal, then the lowest rank.
    """
    return min(failures, key=lambda r: (int(failures[r].timestamp), _collateral(failures[r].exitcode), r))


def _forward_to_ranks(signum: int, _frame: object) -> None:
    import psutil

    for child in psutil.Process().children():
        try:
            child.send_signal(signum)
        except psutil.Error:
            pass


def main(argv: list[str] | None = None) -> int:
    os.environ["TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE"] = PREFIX_TEMPLATE
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(sys.argv[1:] if argv is None else argv)
    for sig in (signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, _forward_to_ranks)
    if str(args.nproc_per_node).isdigit():
        set_omp_threads(int(args.nproc_per_node))
    try:
        run(args)
    except ChildFailedError as exc:
        rank = root_cause(exc.failures)
        first = exc.failures[rank]
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
