"""The command and environment of each host, shared by every backend's render.

Per host the command is

    PYTHON -m dsl.launcher.host.guard --grace-s 3 --                  # owns and cleans up the tree
      PYTHON -m dsl.launcher.host.elastic --nnodes ... --tee 3 ...       # torch's elastic agent (torchrun)
        -m dsl.engine.train OUT/resolved.yaml  |  SCRIPT ARGS...  # the program of every rank

torchrun gives every rank its environment contract (RANK, LOCAL_RANK, WORLD_SIZE,
LOCAL_WORLD_SIZE, GROUP_RANK, ROLE_RANK, MASTER_ADDR, MASTER_PORT, TORCHELASTIC_*), so an
unchanged torchrun script works. NODE_RANK is added by dsl (DeepSpeed's launcher sets it too), and
the starter sets OMP_NUM_THREADS to the host's cores / its ranks unless the spec sets it.
"""

from __future__ import annotations

from dsl.engine import wire
from dsl.launcher import shell
from dsl.launcher.hosts import Host
from dsl.launcher.plan import GUARD_GRACE_S, HostLaunch, Job, LaunchPlan, SshTarget
from dsl.launcher.spec import SpecFile
from dsl.topology.cpubind import BIND_ENV

COLLECTIVE_MARGIN_S = 60.0
"""A collective times out this long after the watchdog would have fired: dsl's watchdog (with
the stacks) comes first where it watches; elsewhere the timeout is what ends a hang."""


def layout(hosts: list[Host]) -> list[tuple[int, Host, tuple[int, ...]]]:
    """(node_rank, host, global ranks) in host order: ranks fill hosts in hostfile order."""
    out, first = [], 0
    for node_rank, host in enumerate(hosts):
        out.append((node_rank, host, tuple(range(first, first + len(host.slots)))))
        first += len(host.slots)
    return out


def render_per_host(job: Job, hosts: list[Host], *, backend: str, master_addr: str,
                    target: SshTarget | None = None, nnodes: int | None = None,
                    first_node_rank: int = 0) -> LaunchPlan:
    """One guard + torchrun per host, started by dsl itself (local, ssh, pernode). `target`: the
    hosts are reached over ssh (the guard reads its environment from stdin and watches it).
    `nnodes`/`first_node_rank`: `hosts` are this job's hosts from `first_node_rank` on, out of
    `nnodes` (pernode: one host of many, each started by a scheduler); every host runs as many
    ranks as the first."""
    spec, inputs = job.spec, job.inputs
    nnodes = nnodes or len(hosts)
    nproc = len(hosts[0].slots)
    launches = []
    for index, (_, host, ranks) in enumerate(layout(hosts)):
        node_rank = first_node_rank + index
        ranks = tuple(r + first_node_rank * nproc for r in ranks)
        starter = starter_argv(job.python, nnodes, node_rank, len(host.slots), master_addr,
                               inputs.master_port, f"{job.output_dir}/logs/torchelastic/{host.name}")
        guard = guard_argv(job.python, remote=target is not None,
                           launcher_timeout_s=target.dead_after_s if target else None)
        launches.append(HostLaunch(
            host=host.name,
            node_rank=node_rank,
            ranks=ranks,
            slots=tuple(host.slots),
            argv=tuple(shell.with_setup(host_setup(spec), guard + starter + job.program)),
            env=host_env(job, host, node_rank),
            cwd=job.cwd,
            devices=host.devices if inputs.set_visible_devices else (),
        ))
    return LaunchPlan(
        name=spec.name,
        backend=backend,
        world_size=sum(len(h.slots) for h in hosts) if nnodes == len(hosts) else nnodes * nproc,
        master_addr=master_addr,
        master_port=inputs.master_port,
        output_dir=job.output_dir,
        max_restarts=spec.max_restarts,
        hosts=tuple(launches),
        secrets=job.secrets,
        files=job.files,
        ssh=target,
        watchdog_s=spec.watchdog_s,
    )


def host_setup(spec) -> list[str]:
    """The shell lines run on a host before its ranks: run.setup, then env.prepend's exports."""
    return [*spec.run.setup, *(shell.prepend_export(k, v) for k, v in spec.env.prepend.items())]


def ssh_target(spec_file: SpecFile) -> SshTarget:
    ssh = spec_file.spec.resources.ssh

    def path(value: str | None) -> str | None:
        return str(spec_file.resolve(value)) if value else None

    return SshTarget(ssh.user, ssh.port, path(ssh.identity_file), path(ssh.known_hosts),
                     path(ssh.config_file), ssh.strict_host_key_checking, ssh.connect_timeout_s,
                     ssh.keepalive_interval_s, ssh.keepalive_count_max)


def starter_argv(python: str, nnodes: int | str, node_rank: int | str, nproc: int, master_addr: str,
                 master_port: int | str, log_dir: str) -> list[str]:
    """torchrun (through dsl.launcher.host.elastic) for one host. nnodes, node_rank, master_addr,
    master_port and log_dir may be `shell.Var`s, expanded on the host (Slurm knows them only there)."""
    def flag(name: str, value: int | str) -> str:
        if isinstance(value, shell.Var):
            return shell.Var(f"--{name}={value.prefix}", value.name)
        return f"--{name}={value}"

    return [
        python, "-m", "dsl.launcher.host.elastic",
        flag("nnodes", nnodes),
        flag("node-rank", node_rank),
        f"--nproc-per-node={nproc}",
        flag("master-addr", master_addr),
        flag("master-port", master_port),
        "--max-restarts=0",  # dsl restarts the whole job (max_restarts), on every backend
        "--monitor-interval=0.1",
        f"--shutdown-timeout={GUARD_GRACE_S:g}",
        "--tee=3",
        flag("log-dir", log_dir),
    ]


def guard_argv(python: str, remote: bool = False, launcher_timeout_s: float | None = None) -> list[str]:
    guard = [python, "-m", "dsl.launcher.host.guard", f"--grace-s={GUARD_GRACE_S:g}"]
    if remote:
        # The environment arrives on stdin (no secret on a command line) and the end of stdin
        # (connection closed or lost) stops every rank of the host.
        guard += ["--env-stdin", "--watch-stdin"]
    if launcher_timeout_s is not None:
        # The launcher writes to stdin every keepalive interval: silence this long means the
        # connection is dead without a close (a partition), and the host stops its own ranks.
        guard.append(f"--launcher-timeout-s={launcher_timeout_s:g}")
    return guard + ["--"]


def base_env(job: Job) -> dict[str, str]:
    """Variables dsl sets on every rank of every backend, then the spec's (which win)."""
    env = {
        # Rank output goes through a pipe; unbuffered, it streams as it is printed.
        "PYTHONUNBUFFERED": "1",
        "DSL_JOB_NAME": job.spec.name,
        "DSL_OUTPUT_DIR": job.output_dir,
    }
    if job.spec.resources.bind != "none":  # the starter (or mpirank) pins each rank's cores
        env[BIND_ENV] = job.spec.resources.bind
    if job.spec.watchdog_s is not None:
        env[wire.COLLECTIVE_TIMEOUT_ENV] = f"{job.spec.watchdog_s + COLLECTIVE_MARGIN_S:g}"
    env.update(job.inputs.env_values)
    return env


def host_env(job: Job, host: Host, node_rank: int) -> dict[str, str]:
    env = {"NODE_RANK": str(node_rank)}
    if job.inputs.set_visible_devices:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(host.devices)
    if job.spec.watchdog_s is not None:  # dsl watches local and ssh ranks for hangs
        env[wire.HEARTBEAT_ENV] = "1"
    env.update(base_env(job))  # the user's values win
    return env
