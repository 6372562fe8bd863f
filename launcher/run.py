"""The run half of `dsl launch` (launch.execute with Mode.RUN): preflight, the run folder, the
backend's start under supervision (launcher/supervise.py), and the one message saying how the job
ended, with the exit code `dsl launch` returns.
"""

from __future__ import annotations

import time
from pathlib import Path

from dsl.engine.errors import UserError
from dsl.engine.writefail import EXIT_WRITE_FAILED
from dsl.launcher import console


def check_hosts(plan) -> None:  # type: ignore[no-untyped-def]
    """`dsl preflight`, and `dsl launch` before a backend that wants it: the table, then a
    UserError naming every failed check."""
    from dsl.launcher.preflight import failures, run_preflight, table

    rows = run_preflight(plan)
    console.err.print(table(rows))
    problem = failures(rows)
    if problem:
        raise UserError(problem)


def run(prepared, time_limit=None, *, preflight: bool = True) -> int:  # type: ignore[no-untyped-def]
    """Run a prepared plan (its port released at the end, held until then) -> the exit code."""
    from dsl.launcher.runlock import acquire

    plan = prepared.plan
    lock = None
    try:
        if preflight:
            check_hosts(plan)
        # Before anything is written there: a second launch into this run folder is refused.
        lock = acquire(Path(plan.output_dir), plan.name, prepared.spec_file.where("output_dir"),
                       prepared.backend.lock_name(plan))
        return _run_locked(prepared, prepared.backend, time_limit)
    finally:
        if lock is not None:
            lock.release()
        if prepared.port is not None:
            prepared.port.release()


def _run_locked(prepared, backend, time_limit) -> int:  # type: ignore[no-untyped-def]
    from dsl.launcher.launch import write_run_folder
    from dsl.launcher.output import RankOutput
    from dsl.launcher.supervise import supervise

    plan = prepared.plan
    out = write_run_folder(plan, prepared.memory)
    hosts = backend.where(plan)
    console.message(f"dsl: launching {plan.name}: {plan.world_size} rank(s) on {hosts} "
                    f"({plan.backend}), master {plan.master_addr}:{plan.master_port}; run folder {out}")
    started = time.monotonic()
    with console.StepProgress() as progress:
        output = RankOutput(out / "logs", on_step=progress.update)
        try:
            outcome = supervise(plan, backend, output, time_limit)
        finally:
            output.close()
    elapsed = time.monotonic() - started
    if outcome.write_error or (outcome.ok and output.write_error):
        console.message(f"dsl: job {plan.name} stopped: {outcome.write_error or output.write_error} "
                        f"(exit {EXIT_WRITE_FAILED})", style="bold red")
        return EXIT_WRITE_FAILED
    if outcome.ok:
        console.message(f"dsl: job {plan.name} finished in {elapsed:.1f} s "
                        f"({plan.world_size} ranks, attempt {outcome.attempts}); logs in {out / 'logs'}")
        return 0
    if outcome.interrupted_by:
        console.message(f"dsl: job {plan.name} interrupted; every rank was stopped "
                        f"(exit {outcome.exit_code})", style="yellow")
        return outcome.exit_code
    if outcome.checkpointed:
        console.message(f"dsl: job {plan.name} stopped at a time-limit signal after every rank "
                        f"checkpointed (exit {outcome.exit_code}); launch it again to resume from "
                        f"that checkpoint; logs in {out / 'logs'}", style="yellow")
        return outcome.exit_code
    if outcome.timed_out:
        console.message(f"dsl: job {plan.name} reached its time limit ({time_limit.text}); every "
                        f"rank still running was stopped (exit {outcome.exit_code})", style="bold red")
        return outcome.exit_code
    if outcome.hung:
        console.message(f"dsl: job {plan.name} hung: no rank finished a step for {plan.watchdog_s:g} s "
                        f"(watchdog_s); every rank was stopped (exit {outcome.exit_code}). Each rank's "
                        f"Python stack is above and in its log ({out / 'logs'}). Last steps:",
                        style="bold red")
        newest = max(step for _, _, step, _, _ in outcome.hung)
        for host, rank, step, age_s, lines in outcome.hung:
            behind = " (behind)" if step < newest else ""
            console.message(f"  {host}:{rank} step {step}, {age_s:.0f} s ago{behind}; last lines:")
            for line in lines:
                console.message(f"    {line}")
        return outcome.exit_code
    if outcome.lost:
        console.message(f"dsl: job {plan.name} failed: lost contact with host {outcome.failed_host} "
                        f"({outcome.lost}); every other rank was stopped (exit {outcome.exit_code}, "
                        f"attempt {outcome.attempts} of {plan.max_restarts + 1})", style="bold red")
        return outcome.exit_code
    who = (f"rank {outcome.failed_rank} on {outcome.failed_host}" if outcome.failed_rank is not None
           else f"host {outcome.failed_host}")
    how = f"was killed by {outcome.signal_name}" if outcome.signal_name else f"exited with code {outcome.exit_code}"
    if outcome.exit_code == EXIT_WRITE_FAILED and not outcome.signal_name:
        how += " (a write of its output failed: see its last lines)"
    detail = f" ({outcome.detail})" if outcome.detail else ""
    console.message(f"dsl: job {plan.name} failed: {who} {how}{detail}; every other rank was stopped "
                    f"(attempt {outcome.attempts} of {plan.max_restarts + 1})", style="bold red")
    if outcome.failed_rank is not None:
        tail = list(output.tails.get(outcome.failed_rank, []))
        if tail:
            console.message(f"last lines of rank {outcome.failed_rank} "
                            f"(full log: {output.log_path(outcome.failed_rank)}):")
            for line in tail[-10:]:
                console.message(f"  {line}")
    return outcome.exit_code
