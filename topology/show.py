"""`dsl probe`'s human-readable view of a HostTopology (rich is imported when called)."""

from __future__ import annotations

from typing import Any

from dsl.topology.model import HostTopology

GB = 10**9
GiB = 1 << 30
MiB = 1 << 20


def _size(n: int | None, unit: int = GiB, suffix: str = "GiB") -> str:
    return "?" if n is None else f"{n / unit:,.1f} {suffix}"


def render(topo: HostTopology, console: Any) -> None:
    from rich.markup import escape
    from rich.table import Table

    p = console.print
    cpu = topo.cpu
    p(f"[bold]{escape(topo.hostname)}[/bold] [dim]({escape(topo.source)})[/dim]"
      + (f": {escape(topo.description)}" if topo.description else ""))
    cores = f"{cpu.physical_cores} cores" if cpu.physical_cores else "? cores"
    p(f"CPU: {escape(cpu.model or '?')}, {cpu.sockets or '?'} socket(s), {cores}, {cpu.logical_cpus} logical CPUs"
      f" ({cpu.usable_cpus} usable by this process)" + (f"; {', '.join(cpu.flags)}" if cpu.flags else ""))
    ram = f"RAM: {_size(topo.ram_bytes)} total"
    if topo.usable_ram_bytes != topo.ram_bytes:
        ram += f", {_size(topo.usable_ram_bytes)} usable as host RAM"
    if topo.ram_available_bytes is not None:
        ram += f", {_size(topo.ram_available_bytes)} available now"
    if topo.ram_limit_bytes is not None:
        ram += f" (cgroup limit {_size(topo.ram_limit_bytes)})"
    if topo.memory_bandwidth_gb_s:
        ram += f", {topo.memory_bandwidth_gb_s:g} GB/s"
    p(ram)
    for node in topo.numa_nodes:
        cpus = f"CPUs {_ranges(node.cpus)}" if node.cpus else "no CPUs (device memory)"
        p(f"  NUMA node {node.id}: {cpus}, {_size(node.memory_bytes)}")
    if not topo.accelerators:
        p(f"[bold]GPUs: none[/bold] — {escape(topo.gpu_reason.removeprefix('no GPUs: '))}")
    else:
        p(f"GPUs: {len(topo.accelerators)} ({escape(topo.gpu_reason)}"
          + (f", CUDA {topo.cuda_driver_version}" if topo.cuda_driver_version else "") + ")")
        table = Table(box=None, header_style="bold", pad_edge=False)
        for col in ("#", "name", "memory", "cc", "host link", "NVLink", "NUMA", "CPUs"):
            table.add_column(col)
        for a in topo.accelerators:
            nvlink = "-" if not a.nvlink_links else (
                f"{a.nvlink_links} x NVLink {a.nvlink_version or '?'} = {a.nvlink_gb_s or '?'} GB/s"
                + (" (NVSwitch)" if a.nvswitch else ""))
            cc = ".".join(map(str, a.compute_capability)) if a.compute_capability else "?"
            table.add_row(str(a.index), escape(a.name), _size(a.memory_bytes), cc, escape(a.host_link.describe()),
                          nvlink, "?" if a.numa_node is None else str(a.numa_node),
                          _ranges(a.cpus) if a.cpus else "?")
        p(table)
        if topo.links:
            kinds: dict[str, list[str]] = {}
            for link in topo.links:
                desc = link.kind + (f" {link.bandwidth_gb_s:g} GB/s" if link.bandwidth_gb_s else "")
                if link.kind == "pcie":
                    desc += f" via {link.pcie_path}, P2P {'yes' if link.p2p else 'no' if link.p2p is False else '?'}"
                kinds.setdefault(desc, []).append(f"{link.a}-{link.b}")
            p("GPU pairs:")
            for desc, pairs in kinds.items():
                shown = " ".join(pairs[:8]) + (f" (+{len(pairs) - 8})" if len(pairs) > 8 else "")
                p(f"  {escape(desc)}: {shown}")
    if topo.nvme:
        for d in topo.nvme:
            bw = (f"read {d.read_gb_s:g} / write {d.write_gb_s:g} GB/s"
                  if d.read_gb_s is not None and d.write_gb_s is not None
                  else escape(d.unknown.get("read_gb_s", "bandwidth unknown")))
            where = f" at {d.mountpoint}" if d.mountpoint else ""
            free = f", {_size(d.free_bytes, GB, 'GB')} free" if d.free_bytes is not None else ""
            p(f"NVMe {d.name}: {escape(d.model or '?')}, {_size(d.size_bytes, GB, 'GB')}{where}{free}, {bw}")
    else:
        p("NVMe: none")
    if topo.nics:
        p("network: " + ", ".join(f"{n.name} ({n.kind}, {f'{n.speed_gbit_s:g} Gb/s' if n.speed_gbit_s else 'speed ?'})"
                                  for n in topo.nics))
    if topo.jemalloc is not None:
        p(f"malloc for CPU ranks: {escape(topo.jemalloc) if topo.jemalloc else 'no libjemalloc.so.2 (glibc)'}")
    b = topo.process_baseline
    if b is not None:
        p(f"process baseline (CPU rank): {_size(b.bytes, MiB, 'MiB')}, {_size(b.checkpointing_bytes, MiB, 'MiB')} with "
          f"checkpointing; measured {escape(b.measured_at)} with torch {escape(str(b.torch))}, {escape(b.allocator)}")
        if b.cuda_runtime_bytes is not None:
            p(f"GPU rank's runtime on its device (CUDA context, cuBLAS, NCCL): {_size(b.cuda_runtime_bytes, MiB, 'MiB')}")
    for key, why in topo.unknown.items():
        p(f"[dim]{key}: {escape(why)}[/dim]")


def _ranges(cpus: tuple[int, ...] | None) -> str:
    if not cpus:
        return "-"
    out, start, prev = [], cpus[0], cpus[0]
    for c in list(cpus[1:]) + [None]:  # type: ignore[list-item]
        if c is not None and c == prev + 1:
            prev = c
            continue
        out.append(f"{start}-{prev}" if prev != start else str(start))
        if c is not None:
            start = prev = c
    return ",".join(out)
