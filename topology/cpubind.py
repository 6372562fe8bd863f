"""Which cores each local rank of a host runs on (`resources.bind`), as plain data.

`rank_cores(mode, nproc, usable, numa)` is pure: the host's usable CPUs (its affinity mask) and
its NUMA layout (`numa_layout`, read from /sys the way topology/host.py reads it) in, one CPU set
per local rank out.

- `cores`: the usable CPUs, ordered by NUMA node then index, cut into `nproc` contiguous,
  disjoint shares (the first `usable % nproc` ranks get one more), so a share stays inside one
  node where the counts allow (DeepSpeed's `--bind_cores_to_rank` does the same split). More
  ranks than usable CPUs cannot give each rank a core of its own: BindError.
- `numa`: local rank i runs on every usable CPU of NUMA node i mod N (N = nodes with a usable
  CPU), round-robin, shared with the other ranks of that node; its memory then comes from that
  node by first touch (dsl sets no memory policy of its own). A host whose /sys shows no NUMA
  node cannot be bound by node: BindError.

The starter (launcher/host/elastic.py) computes the sets once per host and hands them to every rank in
`CPU_SETS_ENV`; engine/cpubind.py, run first in each rank, applies its own before the program
starts a thread.
"""

from __future__ import annotations

from pathlib import Path

from dsl.topology.host import parse_cpulist

MODES = ("none", "numa", "cores")
BIND_ENV = "DSL_BIND"
"""Set by the launcher on every host from resources.bind (unset or `none`: no binding)."""
CPU_SETS_ENV = "DSL_CPU_SETS"
"""Set by the starter: one CPU list per local rank, `;`-separated, e.g. `0-3;4-7`."""


class BindError(ValueError):
    """A binding that cannot apply on this host (the message says why and what to do)."""


def numa_layout(sys_root: str | Path = "/sys") -> dict[int, tuple[int, ...]]:
    """NUMA node id -> its CPUs, from /sys/devices/system/node/node*/cpulist ({} when absent)."""
    out: dict[int, tuple[int, ...]] = {}
    for node in (Path(sys_root) / "devices/system/node").glob("node[0-9]*"):
        try:
            out[int(node.name[4:])] = _parse((node / "cpulist").read_text())
        except (OSError, ValueError):
            continue
    return dict(sorted(out.items()))


def rank_cores(mode: str, nproc: int, usable: set[int] | frozenset[int],
               numa: dict[int, tuple[int, ...]]) -> list[tuple[int, ...]]:
    """One sorted CPU tuple per local rank (see the module docstring); BindError when it cannot."""
    if mode not in MODES or mode == "none":
        raise BindError(f"resources.bind: {mode!r} is not a binding (choose numa or cores)")
    if nproc < 1:
        raise BindError(f"resources.bind: {nproc} ranks on this host")
    nodes = [tuple(c for c in cpus if c in usable) for cpus in numa.values()]
    nodes = [cpus for cpus in nodes if cpus]
    if mode == "numa":
        if not nodes:
            raise BindError("resources.bind: numa, but this host shows no NUMA node with a usable CPU "
                            "(no /sys/devices/system/node/node*/cpulist): use bind: cores")
        return [nodes[i % len(nodes)] for i in range(nproc)]
    placed = {c for cpus in nodes for c in cpus}
    ordered = [c for cpus in nodes for c in cpus] + sorted(set(usable) - placed)
    if nproc > len(ordered):
        raise BindError(f"resources.bind: cores gives each rank cores of its own, but this host runs "
                        f"{nproc} ranks on {len(ordered)} usable CPU(s) {format_cpus(ordered)}: lower "
                        f"procs_per_node to {len(ordered)} or less, or use bind: none")
    base, extra = divmod(len(ordered), nproc)
    out, first = [], 0
    for i in range(nproc):
        size = base + (1 if i < extra else 0)
        out.append(tuple(sorted(ordered[first:first + size])))
        first += size
    return out


def format_cpus(cpus) -> str:
    """(0, 1, 2, 5) -> '0-2,5' (the kernel's cpulist form)."""
    cpus = sorted(cpus)
    parts, i = [], 0
    while i < len(cpus):
        j = i
        while j + 1 < len(cpus) and cpus[j + 1] == cpus[j] + 1:
            j += 1
        parts.append(str(cpus[i]) if i == j else f"{cpus[i]}-{cpus[j]}")
        i = j + 1
    return ",".join(parts)


def encode(sets: list[tuple[int, ...]]) -> str:
    return ";".join(format_cpus(s) for s in sets)


def decode(text: str) -> list[tuple[int, ...]]:
    return [_parse(part) for part in text.split(";")]


def _parse(text: str) -> tuple[int, ...]:
    return parse_cpulist(text.strip())
