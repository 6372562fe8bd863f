"""How many GPUs this host has, asked of NVML without initialising CUDA.

The launcher needs only the count to fill `procs_per_node: auto`, so this stays a few cheap calls;
the full topology (links, NUMA, NVMe) is `probe.probe_local()`. NVML is always shut down after
use, and an absent driver is an answer (0 GPUs, with the reason), not an exception.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class GpuCount:
    count: int
    reason: str  # how the count was found, or why there are none


def count_gpus() -> GpuCount:
    """GPUs visible to ranks on this host (CUDA_VISIBLE_DEVICES narrows what NVML sees)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return GpuCount(0, "CUDA_VISIBLE_DEVICES hides every GPU")
    try:
        import pynvml
    except ImportError:
        return GpuCount(0, "pynvml (package nvidia-ml-py) is not installed")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return GpuCount(0, f"no NVIDIA driver ({exc})")
    try:
        total = pynvml.nvmlDeviceGetCount()
    finally:
        pynvml.nvmlShutdown()
    if visible is not None:
        wanted = [v for v in visible.split(",") if v.strip()]
        return GpuCount(min(total, len(wanted)), f"NVML: {total} GPU(s), CUDA_VISIBLE_DEVICES={visible}")
    return GpuCount(total, f"NVML: {total} GPU(s)")
