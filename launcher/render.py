"""`render(spec, hosts, inputs) -> LaunchPlan`: pure, one function per backend family.

local and ssh run one guard + torchrun per host, started by dsl (`plan.render_per_host`); mpi
runs one mpirun here (`mpi.render_plan`); slurm writes a batch script and submits it
(`slurm.render_plan`). Nothing here touches the disk, the network or a process.
"""

from __future__ import annotations

from dsl.launcher import mpi, slurm
from dsl.launcher.hosts import Host
from dsl.launcher.plan import LaunchPlan, RenderInputs, job_of, render_per_host
from dsl.launcher.spec import SpecFile


def render(spec_file: SpecFile, hosts: list[Host], inputs: RenderInputs) -> LaunchPlan:
    job = job_of(spec_file, inputs)
    backend = spec_file.spec.resources.backend
    if backend == "slurm":
        return slurm.render_plan(job, hosts)
    if backend == "mpi":
        return mpi.render_plan(job, hosts)
    return render_per_host(job, hosts)
