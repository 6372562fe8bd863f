"""What dsl prints for people, on stderr: messages and the training progress bar.

stdout carries data (plans, JSON, rank output); everything here goes to stderr. Only the CLI
configures logging; library modules log through `logging.getLogger(__name__)`.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from rich.console import Console
from rich.logging import RichHandler

err = Console(stderr=True, highlight=False)


def setup_logging(verbose: bool = False) -> None:
    level = logging.DEBUG if verbose or os.environ.get("DSL_DEBUG") else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", datefmt="[%X]",
                        handlers=[RichHandler(console=err, show_path=False, show_time=False)])
    # paramiko logs every connection and authentication at INFO.
    logging.getLogger("paramiko").setLevel(logging.WARNING)


def message(text: str, style: str | None = None) -> None:
    err.print(text, style=style, markup=False, soft_wrap=True)


class StepProgress:
    """A progress bar driven by the trainer's `step N/M | loss X` lines; inert without a terminal."""

    def __init__(self) -> None:
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> "StepProgress":
        if err.is_terminal and sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(),
                console=err, redirect_stdout=True, redirect_stderr=True, transient=True,
            )
            self._progress.start()
        return self

    def update(self, step: int, total: int, loss: float) -> None:
        if self._progress is None:
            return
        if self._task is None:
            self._task = self._progress.add_task("train", total=total, loss="-")
        self._progress.update(self._task, completed=step, total=total, loss=f"{loss:.4f}")

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
