"""The host side of a topology: CPU, RAM (and cgroup limits), NUMA nodes, NVMe devices, NICs.

Read from psutil, /proc and /sys only (no subprocess, no root). `probe_host(sys_root, proc_root)`
returns a dict of `HostTopology` fields in their JSON form, which is also the `host` section of a
recording, so recorded and live hosts go through the same constructor (`probe.assemble`).
Anything that cannot be read is None plus a reason in `unknown`.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Any

INTERESTING_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "asimd", "sve", "sve2", "bf16")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def parse_cpulist(text: str) -> tuple[int, ...]:
    """'0-3,8,10-11' -> (0, 1, 2, 3, 8, 10, 11)."""
    cpus: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-", 1)
            cpus.extend(range(int(lo), int(hi) + 1))
        else:
            cpus.append(int(part))
    return tuple(cpus)


def _cpu(proc: Path, sys_root: Path, unknown: dict[str, str]) -> dict[str, Any]:
    import psutil

    cpu_unknown: dict[str, str] = {}
    info = _read(proc / "cpuinfo") or ""
    model = None
    for key in ("model name", "Model", "cpu model"):
        m = re.search(rf"^{key}\s*:\s*(.+)$", info, re.M)
        if m:
            model = m.group(1).strip()
            break
    if model is None:
        cpu_unknown["model"] = "no model name in /proc/cpuinfo"
    sockets = len(set(re.findall(r"^physical id\s*:\s*(\d+)", info, re.M))) or None
    if sockets is None:
        packages = {(_read(p / "topology/physical_package_id") or "")
                    for p in (sys_root / "devices/system/cpu").glob("cpu[0-9]*")}
        packages.discard("")
        sockets = len(packages) or None
    if sockets is None:
        cpu_unknown["sockets"] = "no physical id in /proc/cpuinfo or /sys"
    flags_line = re.search(r"^(flags|Features)\s*:\s*(.+)$", info, re.M)
    present = set(flags_line.group(2).split()) if flags_line else set()
    logical = psutil.cpu_count(logical=True)
    physical = psutil.cpu_count(logical=False)
    if physical is None:
        cpu_unknown["physical_cores"] = "psutil.cpu_count(logical=False) returned None"
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else logical
    quota = _cgroup_cpu_quota(sys_root)
    if quota is not None and usable is not None:
        usable = max(1, min(usable, int(quota)))
    return {"model": model, "sockets": sockets, "physical_cores": physical, "logical_cpus": logical,
            "usable_cpus": usable, "flags": [f for f in INTERESTING_FLAGS if f in present],
            "unknown": cpu_unknown}


def _cgroup_cpu_quota(sys_root: Path) -> float | None:
    text = _read(sys_root / "fs/cgroup/cpu.max")  # cgroup v2: "max 100000" or "200000 100000"
    if text:
        quota, _, period = text.partition(" ")
        if quota != "max" and period:
            return int(quota) / int(period)
    return None


def _cgroup_memory_limit(sys_root: Path) -> int | None:
    for rel in ("fs/cgroup/memory.max", "fs/cgroup/memory/memory.limit_in_bytes"):
        text = _read(sys_root / rel)
        if text and text != "max":
            value = int(text)
            if value < 1 << 60:  # cgroup v1 writes ~2^63 for "no limit"
                return value
    return None


def _numa(sys_root: Path) -> list[dict[str, Any]]:
    nodes = []
    for node in sorted((sys_root / "devices/system/node").glob("node[0-9]*"),
                       key=lambda p: int(p.name[4:])):
        cpus = parse_cpulist(_read(node / "cpulist") or "")
        meminfo = _read(node / "meminfo") or ""
        m = re.search(r"MemTotal:\s*(\d+)\s*kB", meminfo)
        nodes.append({"id": int(node.name[4:]), "cpus": list(cpus),
                      "memory_bytes": int(m.group(1)) * 1024 if m else None})
    return nodes


def _nvme(sys_root: Path) -> list[dict[str, Any]]:
    import psutil

    mounts: dict[str, str] = {}
    try:
        for part in psutil.disk_partitions(all=False):
            mounts.setdefault(os.path.basename(part.device), part.mountpoint)
    except OSError:
        pass
    out = []
    for block in sorted((sys_root / "block").glob("nvme*n*")):
        name = block.name
        unknown: dict[str, str] = {}
        sectors = _read(block / "size")
        model = _read(block / "device/model")
        if model is None:
            unknown["model"] = f"{block}/device/model unreadable"
        mountpoint = mounts.get(name) or next(
            (mounts[p.name] for p in sorted(block.glob(f"{name}p*")) if p.name in mounts), None)
        free = None
        if mountpoint:
            try:
                free = psutil.disk_usage(mountpoint).free
            except OSError as exc:
                unknown["free_bytes"] = f"disk_usage({mountpoint}): {exc.strerror}"
        else:
            unknown["mountpoint"] = "not mounted"
        unknown["read_gb_s"] = unknown["write_gb_s"] = "not measured (dsl probe --measure-nvme DIR)"
        out.append({"name": name, "model": model, "size_bytes": int(sectors) * 512 if sectors else None,
                    "mountpoint": mountpoint, "free_bytes": free, "read_gb_s": None, "write_gb_s": None,
                    "unknown": unknown})
    return out


def _nics(sys_root: Path) -> list[dict[str, Any]]:
    out = []
    for dev in sorted((sys_root / "class/infiniband").glob("*")):
        for port in sorted((dev / "ports").glob("*")):
            rate = _read(port / "rate") or ""  # "400 Gb/sec (4X NDR)"
            m = re.match(r"([\d.]+)\s*Gb/sec", rate)
            state = _read(port / "state") or ""
            if "ACTIVE" in state or not state:
                out.append({"name": f"{dev.name}/{port.name}", "kind": "infiniband",
                            "speed_gbit_s": float(m.group(1)) if m else None})
    for dev in sorted((sys_root / "class/net").glob("*")):
        if dev.name == "lo" or not (dev / "device").exists():
            continue  # virtual interfaces (bridges, veth, docker) have no device
        if (dev / "device/infiniband").exists() or _read(dev / "type") == "32":
            continue  # IPoIB: already counted as an infiniband port
        speed = _read(dev / "speed")  # Mb/s; -1 or unreadable when unknown or down
        mbit = int(speed) if speed and speed.lstrip("-").isdigit() and int(speed) > 0 else None
        out.append({"name": dev.name, "kind": "ethernet", "speed_gbit_s": mbit / 1000 if mbit else None})
    return out


def _nvidia_pci(sys_root: Path) -> int | None:
    root = sys_root / "bus/pci/devices"
    if not root.is_dir():
        return None
    count = 0
    for dev in root.iterdir():
        if _read(dev / "vendor") == "0x10de" and (_read(dev / "class") or "").startswith("0x03"):
            count += 1
    return count


JEMALLOC_SONAME = "libjemalloc.so.2"
LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
                "/usr/local/lib", "/lib/x86_64-linux-gnu", "/lib64")


def find_library(soname: str, dirs: tuple[str, ...] = LIBRARY_DIRS) -> str | None:
    """The path of shared library `soname` in the usual library folders, else as the dynamic
    linker's cache knows it (ctypes.util.find_library), else None."""
    import ctypes.util

    for d in dirs:
        path = os.path.join(d, soname)
        if os.path.exists(path):
            return path
    name = ctypes.util.find_library(soname.removeprefix("lib").split(".so")[0])
    return name if name and name.startswith("/") else None


def probe_host(sys_root: str | os.PathLike[str] = "/sys", proc_root: str | os.PathLike[str] = "/proc") -> dict[str, Any]:
    """This host's CPU, memory, NUMA, NVMe and NICs as `HostTopology` fields (JSON form)."""
    import psutil

    from dsl.topology import baseline as baselib
    from dsl.topology.model import _to_json

    sys_path, proc = Path(sys_root), Path(proc_root)
    unknown: dict[str, str] = {}
    measured, why = baselib.load()
    if measured is None:
        unknown["process_baseline"] = why
    vm = psutil.virtual_memory()
    limit = _cgroup_memory_limit(sys_path)
    unknown["memory_bandwidth_gb_s"] = "not measured; the planner assumes a per-socket figure"
    numa = _numa(sys_path)
    numa_total = sum(n["memory_bytes"] or 0 for n in numa)
    if numa and abs(numa_total - vm.total) > 0.05 * vm.total:
        unknown["numa_nodes"] = (f"NUMA nodes hold {numa_total / 2**30:.1f} GiB but RAM is {vm.total / 2**30:.1f} GiB "
                                 "(as /sys reports it; memory outside the nodes' counts, e.g. a virtual machine)")
    return {
        "hostname": socket.gethostname(),
        "cpu": _cpu(proc, sys_path, unknown),
        "ram_bytes": vm.total,
        "ram_limit_bytes": limit if limit is not None and limit < vm.total else None,
        "ram_available_bytes": vm.available,
        "memory_bandwidth_gb_s": None,
        "numa_nodes": numa,
        "nvme": _nvme(sys_path),
        "nics": _nics(sys_path),
        "nvidia_pci_devices": _nvidia_pci(sys_path),
        "jemalloc": find_library(JEMALLOC_SONAME) or "",
        "process_baseline": _to_json(measured) if measured is not None else None,
        "unknown": unknown,
    }
