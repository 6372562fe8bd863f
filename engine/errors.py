"""The one error family of dsl.

Every error that a user can fix (a bad spec, a bad hostfile, an unreachable host, an impossible
plan) is a `UserError`: the CLI prints its message alone and exits 2. A `RunError` is a runtime
failure of the job (a rank died, a backend failed): exit 1. Anything else is a bug and shows a
traceback only with DSL_DEBUG=1.

This module lives in the lowest torch-free layer (engine/, beside config and memory) so that
topology, engine and launcher can all raise the same family without importing upwards.
"""

from __future__ import annotations


class DslError(Exception):
    """Base of every error dsl raises on purpose."""

    exit_code = 1


class UserError(DslError):
    """Bad input: the message names where (file:line:col, host, flag), what, and the fix."""

    exit_code = 2


class RunError(DslError):
    """The job or a backend failed while running."""

    exit_code = 1


class WriteError(RunError):
    """Writing the run's output (logs, metrics.jsonl, a checkpoint) failed: a full disk, a quota,
    a read-only or vanished filesystem. The message names the path and the free space there
    (engine/writefail.py). Exit 74 (sysexits' EX_IOERR) from `dsl launch` and from a rank."""

    exit_code = 74

    def __init__(self, message: str, *, echoed: bool = False):
        super().__init__(message)
        self.echoed = echoed
        """True on a rank that did not fail itself but learned of another rank's failure (the
        message is that rank's): such a rank exits 74 quietly, so the message is printed once."""
