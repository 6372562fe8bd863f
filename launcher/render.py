"""`render(spec, hosts, inputs) -> LaunchPlan`: pure, the spec's backend renders it.

local and ssh run one guard + torchrun per host, started by dsl (`hostcmd.render_per_host`); mpi
runs one mpirun here (`mpi.render_plan`); slurm writes a batch script and submits it
(`slurm.render_plan`); each backend object (launcher/backends/) picks its own. Nothing here
touches the disk, the network or a process.
"""

from __future__ import annotations

from dsl.launcher.backends import backend_of
from dsl.launcher.hosts import Host
from dsl.launcher.plan import LaunchPlan, RenderInputs, job_of
from dsl.launcher.spec import SpecFile


def render(spec_file: SpecFile, hosts: list[Host], inputs: RenderInputs) -> LaunchPlan:
    return backend_of(spec_file).render(job_of(spec_file, inputs), hosts)
