"""Render an OpenMPI launch: a hostfile and one `mpirun` run on this machine (pure).

mpirun starts every rank itself (ranks fill hosts in hostfile order, slot by slot, as dsl numbers
them); each rank runs `dsl.launcher.host.mpirank`, which maps `OMPI_COMM_WORLD_*` to torchrun's
environment, runs the program and prefixes its lines `[dsl:RANK:LOCAL] ` like torchrun does. Environment values travel by name (`-x NAME`, the value
taken from mpirun's own environment), so no secret appears on a command line. ssh options reach
mpirun's rsh agent through `--mca plm_rsh_args`, which mpirun splits on spaces itself: paths in
the ssh settings must therefore not contain spaces (refused with a message). run.setup runs in a
bash before each rank's program (behind mpirank, so its output is prefixed like the rank's).
"""

from __future__ import annotations

from dsl.engine.errors import UserError
from dsl.launcher import shell
from dsl.launcher.hosts import Host
from dsl.launcher.hostcmd import base_env, host_setup, layout, ssh_target
from dsl.launcher.plan import HostLaunch, Job, LaunchPlan, SshTarget

HOSTFILE_NAME = "mpi-hostfile"


def rsh_args(target: SshTarget) -> str:
    words = [*target.options(), "-o", "BatchMode=yes"]
    for word in words:
        if any(ch.isspace() for ch in word) or not word:
            raise UserError(f"mpirun splits its ssh options on spaces; {word!r} cannot be passed "
                            "(resources.ssh): use a path without spaces")
    return " ".join(words)


def render_plan(job: Job, hosts: list[Host]) -> LaunchPlan:
    spec, inputs = job.spec, job.inputs
    master_addr = spec.resources.master_addr or hosts[0].name
    world_size = sum(len(h.slots) for h in hosts)
    hostfile_path = f"{job.output_dir}/{HOSTFILE_NAME}"
    hostfile = "".join(f"{h.name} slots={len(h.slots)}\n" for h in hosts)
    env = {**base_env(job), "MASTER_ADDR": master_addr, "MASTER_PORT": str(inputs.master_port)}
    rank_argv = [job.python, "-m", "dsl.launcher.host.mpirank",
                 "--slots=" + ";".join(",".join(map(str, h.slots)) for h in hosts)]
    if inputs.set_visible_devices:
        rank_argv.append("--visible-devices")
    rank_argv += ["--", *shell.with_setup(host_setup(spec), [job.python, *job.program])]
    target = ssh_target(job.spec_file)
    mpirun = ["mpirun"]
    if inputs.is_root:
        mpirun.append("--allow-run-as-root")
    mpirun += ["--hostfile", hostfile_path, "-np", str(world_size),
               "--map-by", "slot", "--bind-to", "none",  # bound to one core, ranks would share it
               "--mca", "plm_rsh_args", rsh_args(target)]
    for name in env:
        mpirun += ["-x", name]
    mpirun += rank_argv
    launches = [
        HostLaunch(host=host.name, node_rank=node_rank, ranks=ranks, slots=tuple(host.slots),
                   argv=tuple(rank_argv), env={}, cwd=job.cwd)
        for node_rank, host, ranks in layout(hosts)
    ]
    return LaunchPlan(
        name=spec.name,
        backend="mpi",
        world_size=world_size,
        master_addr=master_addr,
        master_port=inputs.master_port,
        output_dir=job.output_dir,
        max_restarts=spec.max_restarts,
        hosts=tuple(launches),
        secrets=job.secrets,
        files={**job.files, hostfile_path: hostfile},
        ssh=target,
        submit=HostLaunch(host="mpirun", node_rank=-1, ranks=(), slots=(), argv=tuple(mpirun),
                          env=env, cwd=job.cwd),
    )
