"""Probe this host, or load a recorded one: the entry points of `dsl.topology`.

- `probe_local()` -> (HostTopology, recording): NVML + /sys + psutil on this machine.
- `load_topology(name_or_path)`: a shipped fixture by name (`dsl probe --list`), a recording
  (`dsl probe --record FILE` output: raw NVML answers + host facts) or a HostTopology JSON
  (`dsl probe --json` output).
- `assemble(host, nvml_recording, source)`: the one constructor both paths share.

A recording keeps what NVML said, not what dsl concluded, so a better `derive` later re-reads
old recordings correctly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from dsl.engine.errors import UserError
from dsl.topology import nvml as nvmllib
from dsl.topology.model import Cpu, HostTopology, Nic, NumaNode, Nvme, ProcessBaseline, _from_json

RECORDING_SCHEMA = "dsl.topology.recording/1"
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def assemble(host: dict[str, Any], recording: dict[str, Any], source: str,
             description: str | None = None) -> HostTopology:
    accelerators, links, reason, driver, cuda = nvmllib.derive(recording)
    init = recording.get("nvmlInit")
    if isinstance(init, dict) and "pynvml" in str(init.get("message", "")):
        reason = f"no GPUs: {init['message']}"
    pci = host.get("nvidia_pci_devices")
    if not accelerators and pci:
        reason += f"; {pci} NVIDIA device(s) are on the PCI bus"
    return HostTopology(
        hostname=host.get("hostname", "?"),
        source=source,
        cpu=_from_json(Cpu, host["cpu"]),
        ram_bytes=host.get("ram_bytes"),
        ram_limit_bytes=host.get("ram_limit_bytes"),
        ram_available_bytes=host.get("ram_available_bytes"),
        memory_bandwidth_gb_s=host.get("memory_bandwidth_gb_s"),
        numa_nodes=tuple(_from_json(NumaNode, n) for n in host.get("numa_nodes", [])),
        accelerators=tuple(accelerators),
        links=tuple(links),
        nvme=tuple(_from_json(Nvme, n) for n in host.get("nvme", [])),
        nics=tuple(_from_json(Nic, n) for n in host.get("nics", [])),
        gpu_reason=reason,
        driver_version=driver,
        cuda_driver_version=cuda,
        nvidia_pci_devices=pci,
        jemalloc=host.get("jemalloc"),
        process_baseline=_from_json(ProcessBaseline, host["process_baseline"]) if host.get("process_baseline") else None,
        description=description,
        unknown=dict(host.get("unknown", {})),
    )


def probe_local(nvml: Any = None, sys_root: str = "/sys", proc_root: str = "/proc") -> tuple[HostTopology, dict[str, Any]]:
    """This machine: (topology, recording). `nvml` replaces the pynvml module (tests)."""
    from dsl.topology.host import probe_host

    host = probe_host(sys_root, proc_root)
    recording, _ = nvmllib.probe(nvml, host["cpu"].get("logical_cpus"))
    return assemble(host, recording, "probe"), {
        "schema": RECORDING_SCHEMA, "name": host["hostname"], "host": host, "nvml": recording}


def fixture_names() -> list[str]:
    return sorted(p.stem for p in FIXTURES.glob("*.json"))


def from_data(data: Any, source: str) -> HostTopology:
    if not isinstance(data, dict):
        raise UserError(f"{source}: a topology is a JSON object")
    try:
        if "nvml" in data and "host" in data:
            return assemble(data["host"], data["nvml"], source, data.get("description"))
        if str(data.get("schema", "")).startswith("dsl.topology/"):
            return HostTopology.from_json(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{source}: not a valid topology: {exc}") from None
    raise UserError(f"{source}: neither a recording (dsl probe --record) nor a topology (dsl probe --json)")


def load_topology(name_or_path: str, base: Path | None = None) -> HostTopology:
    """A fixture by name, else a file (relative to `base`, e.g. the spec's folder)."""
    fixture = FIXTURES / f"{name_or_path}.json"
    if "/" not in name_or_path and fixture.is_file():
        path, source = fixture, f"fixture:{name_or_path}"
    else:
        path = Path(os.path.expanduser(name_or_path))
        if base is not None and not path.is_absolute():
            path = base / path
        source = f"file:{path}"
        if not path.is_file():
            raise UserError(f"topology {name_or_path!r}: no such fixture or file; fixtures: "
                            f"{', '.join(fixture_names())}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: cannot read topology: {exc}") from None
    return from_data(data, source)


def with_disk_measurement(recording: dict[str, Any], folder: os.PathLike[str] | str) -> tuple[HostTopology, dict[str, Any]]:
    """Measure `folder`'s disk (topology.disk) and attach the figures to the NVMe device mounted
    there (or a new entry named after the folder when it is not an NVMe mount)."""
    from dsl.topology.disk import measure

    result = measure(folder)
    if result.reason and result.read_gb_s is None:
        raise UserError(f"--measure-nvme {folder}: {result.reason}")
    host = dict(recording["host"])
    disks = [dict(d) for d in host.get("nvme", [])]
    real = os.path.realpath(folder)
    target = None
    for d in disks:
        mount = d.get("mountpoint")
        if mount and (real == mount or real.startswith(mount.rstrip("/") + "/")):
            if target is None or len(mount) > len(target.get("mountpoint", "")):
                target = d
    if target is None:
        import shutil

        target = {"name": f"disk at {real}", "model": None, "size_bytes": None, "mountpoint": real,
                  "free_bytes": shutil.disk_usage(real).free, "unknown": {"model": "not an NVMe mount"}}
        disks.append(target)
    target["read_gb_s"], target["write_gb_s"] = result.read_gb_s, result.write_gb_s
    unknown = dict(target.get("unknown", {}))
    unknown.pop("read_gb_s", None)
    unknown.pop("write_gb_s", None)
    target["unknown"] = unknown
    host["nvme"] = disks
    recording = {**recording, "host": host}
    return assemble(host, recording["nvml"], "probe"), recording


def measure_baseline() -> None:
    """Measure this host's process baseline and store it (`python -m dsl.engine.baseline`, a
    child process: it runs the trainer, torch included). Raises UserError when it cannot."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "dsl.engine.baseline"], capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        raise UserError(f"--measure-baseline: {last}")


def main(argv: list[str] | None = None) -> int:
    """`python -m dsl.topology.probe [--measure-baseline]`: this host's recording as one JSON line
    on stdout (what `dsl probe SPEC` and the planner run on every remote host; stdlib + psutil +
    pynvml only; --measure-baseline first runs the trainer once, engine/baseline.py)."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if args and args != ["--measure-baseline"]:
        print(f"usage: python -m dsl.topology.probe [--measure-baseline] (got {' '.join(args)})", file=sys.stderr)
        return 2
    if args:
        try:
            measure_baseline()
        except UserError as exc:
            print(f"dsl.topology.probe: {exc}", file=sys.stderr)
            return 1
    _, recording = probe_local()
    print(json.dumps(recording))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
