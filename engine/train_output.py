"""What the bundled trainer (engine/train.py) writes for people and tools: the progress line
the launcher parses, the training summary table, and metrics.jsonl rows (a failed write is a
WriteError naming the file, exit 74)."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any, TextIO

from dsl.engine.wire import format_duration, format_progress  # noqa: F401 - re-exported
from dsl.engine.writefail import write_failed


def _print_summary(summary: dict[str, Any], out: TextIO) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="training summary", show_header=False)
    table.add_column("", style="bold")
    # fold, not ellipsis: a long output_dir must stay complete (a pipe renders 80 columns).
    table.add_column("", overflow="fold")
    rows = {
        "steps": f"{summary['steps']:,}",
        **({"resumed at step": f"{summary['start_step']:,}"} if summary["start_step"] else {}),
        **({"stopped at step": f"{summary['end_step']:,} ({_signal_name(summary['stopped_by'])})"}
           if summary.get("stopped_by") else {}),
        "tokens seen": f"{summary['tokens']:,}",
        "tokens/s": f"{summary['tokens_per_s']:,.0f}",
        "first loss": f"{summary['first_loss']:.4f}",
        "final loss": f"{summary['final_loss']:.4f}",
        "time": f"{format_duration(summary['train_s'])} ({summary['train_s']:.1f} s)",
        "output_dir": str(summary["output_dir"]),
        "world size": str(summary["world_size"]),
    }
    for rank, values in enumerate(summary.get("peaks") or []):
        measured = _peak_of([values], torch_device_type=summary["device_type"])
        what = "CUDA reserved" if summary["device_type"] == "cuda" else "resident"  # less file pages: engine/peak.py
        rows[f"peak rank {rank}"] = (f"{measured / 2**30:.2f} GiB {what} (plan: "
                                            f"{summary['predicted_peak_bytes'] / 2**30:.2f} GiB at "
                                            f"{summary['predicted_peak_phase']}, "
                                            f"{measured / summary['predicted_peak_bytes']:.0%})")
    for key, value in rows.items():
        table.add_row(key, value)
    Console(file=out, force_terminal=False, highlight=False).print(table)


def _peak_of(peaks: list[list[int]], device: Any = None, *, torch_device_type: str | None = None) -> int:
    """The largest peak over ranks of what the plan predicts: CUDA reserved bytes on a GPU, the
    resident set less its file-backed pages on a CPU device (engine/peak.py)."""
    kind = torch_device_type or device.type
    return max(r[2] if kind == "cuda" else r[3] for r in peaks)


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _open_metrics(path: Path) -> TextIO:
    try:
        return path.open("a")
    except OSError as err:
        raise write_failed(path, err, "metrics file") from None


def _close_metrics(metrics: TextIO) -> None:
    try:  # a row a full disk refused is still buffered: close() tries it again
        metrics.close()
    except OSError as err:
        raise write_failed(metrics.name, err, "metrics file") from None


def _write_metrics(metrics: TextIO, row: dict[str, Any]) -> None:
    """One row of metrics.jsonl; a full disk is a WriteError naming the file (exit 74)."""
    try:
        metrics.write(json.dumps(row) + "\n")
        metrics.flush()
    except OSError as err:
        raise write_failed(metrics.name, err, "metrics file") from None
