"""Which CUDA devices this host shows its ranks, asked of NVML without initialising CUDA.

CUDA numbers whole GPUs and, on a GPU in MIG mode, its MIG instances instead of the GPU.
CUDA_VISIBLE_DEVICES narrows and orders them with entries that are indices (`4`), GPU UUIDs
(`GPU-8a1b...`; a unique prefix is enough) or MIG ids (`MIG-<uuid>`, or `MIG-GPU-<uuid>/<gi>/<ci>`
of older drivers). CUDA shows the listed devices up to the first entry that names none, so
`0,-1,1` shows device 0 only, and an empty value or `-1` hides every GPU.

The launcher needs the count to fill `procs_per_node: auto` and the entries that name each device
(launcher/launch.py), so this stays a few cheap calls; the full topology (links, NUMA, NVMe) is
`probe.probe_local()`. NVML is always shut down after use, and an absent driver is an answer
(0 GPUs, with the reason), not an exception.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping

from dsl.topology.nvml import MIG_ENABLED, ask, is_error, mig_mode_notes, record_migs, why


@dataclass(frozen=True)
class GpuCount:
    count: int
    reason: str  # how the count was found, or why there are none
    devices: tuple[str, ...] = ()
    """The CUDA_VISIBLE_DEVICES entry naming each counted device, in CUDA's order: the entries of
    CUDA_VISIBLE_DEVICES as written, or (when it is unset) the index of a whole GPU and the UUID
    of a MIG instance."""


@dataclass(frozen=True)
class CudaDevice:
    """One device CUDA would show: a whole GPU or a MIG instance."""

    entry: str
    """What names it in CUDA_VISIBLE_DEVICES when dsl writes it: index, or MIG UUID."""
    names: tuple[str, ...]
    """Every spelling that names it: index and GPU UUID, or MIG UUID and the older
    `MIG-GPU-<uuid>/<gi>/<ci>` form (UUIDs may be given as prefixes)."""


def visible_devices(value: str | None) -> tuple[str, ...] | None:
    """The entries of a CUDA_VISIBLE_DEVICES value: None when unset (every device is visible),
    () when it hides every GPU, else the entries as written (spaces trimmed) up to the first empty
    or negative one, after which CUDA shows nothing."""
    if value is None:
        return None
    entries: list[str] = []
    for raw in value.split(","):
        entry = raw.strip()
        if not entry or entry.startswith("-"):
            break
        entries.append(entry)
    return tuple(entries)


def cuda_devices(nvml: Any) -> tuple[list[CudaDevice], list[str]]:
    """(devices in CUDA's order, notes). Call between nvmlInit and nvmlShutdown."""
    devices: list[CudaDevice] = []
    notes: list[str] = []
    modes = []
    for index in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        uuid = ask(nvml, "nvmlDeviceGetUUID", handle)
        mode = ask(nvml, "nvmlDeviceGetMigMode", handle, convert=list)
        modes.append(mode)
        if is_error(mode) or mode[0] != MIG_ENABLED:
            devices.append(CudaDevice(str(index), (str(index),) if is_error(uuid) else (str(index), uuid)))
            continue
        migs = record_migs(nvml, handle)["migs"]
        instances = [m for m in migs if not is_error(m["nvmlDeviceGetMigDeviceHandleByIndex"])]
        notes.append(f"GPU {index} is in MIG mode with {len(instances)} MIG instance(s)")
        for mig in instances:
            mig_uuid = mig["nvmlDeviceGetUUID"]
            if is_error(mig_uuid):
                notes.append(f"GPU {index}: a MIG instance without a UUID "
                             f"({why('nvmlDeviceGetUUID', mig_uuid['error'])}) is not counted")
                continue
            names = [mig_uuid]
            gi, ci = mig.get("nvmlDeviceGetGpuInstanceId"), mig.get("nvmlDeviceGetComputeInstanceId")
            if not is_error(uuid) and isinstance(gi, int) and isinstance(ci, int):
                names.append(f"MIG-{uuid}/{gi}/{ci}")
            devices.append(CudaDevice(mig_uuid, tuple(names)))
    return devices, mig_mode_notes(modes) + notes


def _names(entry: str, device: CudaDevice) -> bool:
    if entry.isdigit():
        return any(name.isdigit() and int(name) == int(entry) for name in device.names)
    return any(name.startswith(entry) for name in device.names if not name.isdigit())


def count_gpus(nvml: Any = None, environ: Mapping[str, str] | None = None) -> GpuCount:
    """The devices CUDA would show ranks started with this environment (CUDA_VISIBLE_DEVICES
    narrows what NVML lists). `nvml` replaces the pynvml module and `environ` os.environ (tests)."""
    environ = os.environ if environ is None else environ
    raw = environ.get("CUDA_VISIBLE_DEVICES")
    visible = visible_devices(raw)
    if visible == ():
        return GpuCount(0, f"CUDA_VISIBLE_DEVICES={raw!r} hides every GPU")
    if nvml is None:
        try:
            import pynvml as nvml  # type: ignore[no-redef]
        except ImportError:
            return GpuCount(0, "pynvml (package nvidia-ml-py) is not installed")
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        return GpuCount(0, f"no NVIDIA driver ({exc})")
    try:
        total = nvml.nvmlDeviceGetCount()
        devices, notes = cuda_devices(nvml)
    except nvml.NVMLError as exc:  # a GPU lost while listing: an answer with the reason
        return GpuCount(0, f"NVML failed while listing GPUs ({type(exc).__name__}: {exc})")
    finally:
        nvml.nvmlShutdown()
    found = f"NVML: {total} GPU(s)" + "".join(f"; {note}" for note in notes)
    if visible is None:
        return GpuCount(len(devices), found, tuple(d.entry for d in devices))
    shown: list[str] = []
    for entry in visible:
        if not any(_names(entry, d) for d in devices):
            return GpuCount(len(shown), f"{found}, CUDA_VISIBLE_DEVICES={raw}: {entry!r} names no device "
                                        f"here, so CUDA shows only the {len(shown)} listed before it",
                            tuple(shown))
        shown.append(entry)
    return GpuCount(len(shown), f"{found}, CUDA_VISIBLE_DEVICES={raw}", tuple(shown))
