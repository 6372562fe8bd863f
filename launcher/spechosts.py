"""Host resolution the backends share: a spec's hostfile, or this machine's devices.

Which devices a local run without a hostfile uses: the entries of this shell's
CUDA_VISIBLE_DEVICES when it lists any (passed through verbatim, one rank each; DeepSpeed's
launcher reads it as `--include localhost:<entries>`), else the GPUs NVML finds
(topology/gpus.py) or a recorded topology lists (launcher/planspec.py). With a hostfile its slots
decide, and a CUDA_VISIBLE_DEVICES of this shell is ignored with a log line saying so. Several
MIG instances never go to the ranks of one host (launcher/hosts.py, `one_rank_per_mig`).
Each backend (launcher/backends/) decides which of these applies to it.
"""

from __future__ import annotations

import logging
import os

from dsl.engine.errors import UserError
from dsl.launcher import hosts as hostlib
from dsl.launcher.spec import SpecFile
from dsl.topology.gpus import count_gpus, visible_devices

log = logging.getLogger(__name__)


def in_slurm_allocation() -> bool:
    return bool(os.environ.get("SLURM_JOB_ID") and os.environ.get("SLURM_JOB_NODELIST"))


def num_procs(spec_file: SpecFile) -> int | None:
    ppn = spec_file.spec.resources.procs_per_node
    return ppn if isinstance(ppn, int) else None


def launching_visible_devices() -> tuple[str, ...] | None:
    """The CUDA_VISIBLE_DEVICES entries of the shell that runs dsl (None: unset)."""
    return visible_devices(os.environ.get("CUDA_VISIBLE_DEVICES"))


def _say_hostfile_wins(spec_file: SpecFile) -> None:
    """A hostfile's slots are physical indices and decide the devices, as in DeepSpeed; a
    CUDA_VISIBLE_DEVICES of this shell does not reach the ranks, which is worth a line."""
    raw = os.environ.get("CUDA_VISIBLE_DEVICES")
    if raw:
        log.warning("CUDA_VISIBLE_DEVICES=%s of this shell is ignored: the hostfile's slots (%s) choose "
                    "each host's devices, and its ranks get CUDA_VISIBLE_DEVICES from them; to use other "
                    "devices, select their slots with resources.include", raw,
                    spec_file.where("resources", "hostfile"))


def hostfile_hosts(spec_file: SpecFile, backend: str, required: bool) -> tuple[list[hostlib.Host], bool]:
    """The hosts the spec's hostfile and include/exclude select (CUDA_VISIBLE_DEVICES pinned).
    Without a hostfile: a located error when `required`, else this machine (`local_hosts`)."""
    res = spec_file.spec.resources
    if not res.hostfile:
        if required:
            raise UserError(f"{spec_file.where('resources', 'hostfile')}: backend {backend} needs "
                            "a hostfile (`hostname slots=N` lines)")
        if res.nodes and res.nodes > 1:
            raise UserError(f"{spec_file.where('resources', 'nodes')}: nodes: {res.nodes} needs "
                            "resources.hostfile (or backend slurm); without one dsl runs on this host")
        return local_hosts(spec_file)
    try:
        pool = hostlib.load_hostfile(spec_file.resolve(res.hostfile))
        selected = hostlib.select_hosts(pool, res.include, res.exclude, res.nodes, num_procs(spec_file))
    except UserError as exc:
        field = "include" if res.include else "exclude" if res.exclude else "hostfile"
        raise UserError(f"{spec_file.where('resources', field)}: {exc}") from None
    _say_hostfile_wins(spec_file)
    return selected, True


def local_hosts(spec_file: SpecFile) -> tuple[list[hostlib.Host], bool]:
    """This host: on the devices this shell's CUDA_VISIBLE_DEVICES lists, else on the GPUs NVML
    finds (topology/gpus.py), one rank per device unless procs_per_node says otherwise."""
    nproc = num_procs(spec_file)
    visible = launching_visible_devices()
    if visible:
        raw = os.environ["CUDA_VISIBLE_DEVICES"]
        try:
            hosts = one_rank_per_mig(spec_file, hostlib.visible_host(visible, nproc))
        except UserError as exc:
            raise UserError(f"{spec_file.where('resources', 'procs_per_node')}: {exc}") from None
        log.info("procs_per_node %s: %d rank(s) on CUDA_VISIBLE_DEVICES=%s of this shell (passed through)",
                 nproc or "auto", len(hosts[0].slots), raw)
        return hosts, True
    gpus = count_gpus()
    count = nproc or gpus.count or 1
    if nproc is None:
        log.info("procs_per_node auto: %d (%s)", count, gpus.reason)
    try:
        hosts = one_rank_per_mig(spec_file, hostlib.local_host(count, devices=gpus.devices))
    except UserError as exc:
        raise UserError(f"{spec_file.where('resources', 'procs_per_node')}: {exc}") from None
    return hosts, gpus.count > 0


def one_rank_per_mig(spec_file: SpecFile, hosts: list[hostlib.Host]) -> list[hostlib.Host]:
    """hosts.one_rank_per_mig on the local host, its note logged (its error is the caller's to
    locate)."""
    host, note = hostlib.one_rank_per_mig(hosts[0], isinstance(spec_file.spec.resources.procs_per_node, int))
    if note:
        log.warning(note)
    return [host]
