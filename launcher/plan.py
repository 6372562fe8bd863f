"""The launch plan: exactly what `dsl launch` will start, per host, as plain data.

`render()` is a pure function of its inputs (no I/O): the spec, the resolved hosts, the chosen
port and the environment values read beforehand. `dsl launch --dry-run` prints its result and
stops; `dsl launch` hands the same object to a backend. There is no second code path.

Per host the command is

    PYTHON -m dsl.launcher.guard --grace-s 3 --                  # owns and cleans up the tree
      PYTHON -m dsl.engine.elastic --nnodes ... --tee 3 ...       # torch's elastic agent (torchrun)
        -m dsl.engine.train OUT/resolved.yaml  |  SCRIPT ARGS...  # the program of every rank

torchrun gives every rank its environment contract (RANK, LOCAL_RANK, WORLD_SIZE,
LOCAL_WORLD_SIZE, GROUP_RANK, ROLE_RANK, MASTER_ADDR, MASTER_PORT, TORCHELASTIC_*), so an
unchanged torchrun script works. NODE_RANK is added by dsl (DeepSpeed's launcher sets it too), and
the starter sets OMP_NUM_THREADS to the host's cores / its ranks unless the spec sets it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from dsl.engine import wire
from dsl.launcher import shell
from dsl.launcher.hosts import Host
from dsl.launcher.spec import SpecFile
from dsl.topology.cpubind import BIND_ENV

REDACTED = "<secret>"
GUARD_GRACE_S = 3.0
COLLECTIVE_MARGIN_S = 60.0
"""A collective times out this long after the watchdog would have fired: dsl's watchdog (with
the stacks) comes first where it watches; elsewhere the timeout is what ends a hang."""


@dataclass(frozen=True)
class HostLaunch:
    """What starts the ranks of one host."""

    host: str
    node_rank: int
    ranks: tuple[int, ...]
    slots: tuple[int, ...]
    argv: tuple[str, ...]
    env: Mapping[str, str]
    cwd: str
    devices: tuple[str, ...] = ()
    """The CUDA_VISIBLE_DEVICES entries dsl sets for this host's ranks, one per slot (indices, GPU
    UUIDs or MIG ids, see launcher/hosts.py). Empty when dsl does not write CUDA_VISIBLE_DEVICES
    into `env`: no GPU found, the spec's env sets it, Slurm binds the devices, or mpi, where
    dsl.launcher.mpirank derives it from the slots on the host."""

    @property
    def python(self) -> str:
        """The interpreter this host runs (argv[0], behind run.setup's bash when there is one)."""
        return shell.unwrapped(self.argv)[0]


@dataclass(frozen=True)
class SshTarget:
    """How to reach the hosts over ssh (paths resolved, as the spec's `resources.ssh` says)."""

    user: str | None
    port: int
    identity_file: str | None
    known_hosts: str | None
    config_file: str | None
    strict_host_key_checking: bool
    connect_timeout_s: float
    keepalive_interval_s: float = 5.0
    keepalive_count_max: int = 3

    @property
    def dead_after_s(self) -> float:
        """Silence after which a host (or, seen from a host, the launcher) counts as lost."""
        return self.keepalive_interval_s * self.keepalive_count_max

    def options(self) -> list[str]:
        """These settings as OpenSSH client options (for plans shown to people, and mpirun)."""
        argv = ["-p", str(self.port), "-o", f"ConnectTimeout={self.connect_timeout_s:g}"]
        if self.config_file:
            argv += ["-F", self.config_file]
        if self.identity_file:
            argv += ["-i", self.identity_file]
        if self.known_hosts:
            argv += ["-o", f"UserKnownHostsFile={self.known_hosts}"]
        argv += ["-o", f"StrictHostKeyChecking={'yes' if self.strict_host_key_checking else 'no'}"]
        if self.user:
            argv += ["-l", self.user]
        return argv

    def describe(self, host: str) -> str:
        """An equivalent OpenSSH command line, for people reading a plan."""
        return shell.join(["ssh", *self.options(), host])


@dataclass(frozen=True)
class LaunchPlan:
    name: str
    backend: str
    world_size: int
    master_addr: str
    master_port: int | str
    """A port, or the shell expression that computes it on the host (Slurm, `auto`)."""
    output_dir: str
    max_restarts: int
    hosts: tuple[HostLaunch, ...]
    """What runs on each host. For mpi and slurm, `submit` starts these, not dsl."""
    secrets: frozenset[str] = frozenset()
    files: Mapping[str, str] = field(default_factory=dict)
    """Files written before the ranks start: path -> content."""
    ssh: SshTarget | None = None
    """Set for backends that reach hosts over ssh."""
    submit: HostLaunch | None = None
    """The one command run on this machine for mpi (mpirun) and slurm (sbatch, or bash of the
    batch script inside an allocation)."""
    job_output: str | None = None
    """Slurm: the file the job's output goes to (`%j` = the job id)."""
    watchdog_s: float | None = None
    """The hang watchdog's limit (spec `watchdog_s`), for the backends dsl watches (local, ssh)."""

    def redacted_env(self, env: Mapping[str, str]) -> dict[str, str]:
        return {k: (REDACTED if k in self.secrets else v) for k, v in env.items()}

    def to_json(self) -> dict[str, Any]:
        """The plan as data (secrets redacted): printed by --dry-run --json, saved as plan.json."""
        out = asdict(self)
        out["secrets"] = sorted(self.secrets)
        out["files"] = sorted(self.files)
        out["hosts"] = [
            {**asdict(h), "argv": list(h.argv), "env": self.redacted_env(h.env)} for h in self.hosts
        ]
        if self.submit is not None:
            out["submit"] = {**asdict(self.submit), "argv": list(self.submit.argv),
                             "env": self.redacted_env(self.submit.env)}
        return out

    def describe(self) -> str:
        """A human-readable plan: one shell line per host (copy-pasteable, secrets redacted),
        as its backend starts it (launcher/describe.py)."""
        from dsl.launcher.backends import get_backend

        return get_backend(self.backend).describe(self)


@dataclass(frozen=True)
class RenderInputs:
    """Everything `render` needs that had to be looked up (I/O happens before, not inside)."""

    python: str
    cwd: str
    master_port: int | str
    env_values: Mapping[str, str]
    set_visible_devices: bool
    in_slurm_allocation: bool = False
    is_root: bool = False
    secrets: frozenset[str] = frozenset()
    """Names to show as <secret> beyond env.secret: credential-like names from the launching
    shell or env files (launcher/envsources.py)."""


@dataclass(frozen=True)
class Job:
    """What every backend's render shares: paths, interpreter, program, master address."""

    spec_file: SpecFile
    inputs: RenderInputs
    output_dir: str
    python: str
    cwd: str
    program: list[str]
    files: dict[str, str]

    @property
    def spec(self):  # -> Spec
        return self.spec_file.spec

    @property
    def secrets(self) -> frozenset[str]:
        """Names whose values are never printed or written: env.secret and credential-like names."""
        return frozenset(self.spec.env.secret) | self.inputs.secrets


def job_of(spec_file: SpecFile, inputs: RenderInputs) -> Job:
    spec = spec_file.spec
    output_dir = str(spec_file.output_dir) if spec_file.output_dir.is_absolute() \
        else str((Path(inputs.cwd) / spec_file.output_dir).resolve())
    resolved_spec_path = f"{output_dir}/resolved.yaml"
    return Job(
        spec_file=spec_file,
        inputs=inputs,
        output_dir=output_dir,
        python=spec.run.python or inputs.python,
        cwd=spec.run.workdir or inputs.cwd,
        program=_program(spec_file, resolved_spec_path),
        files={resolved_spec_path: resolved_spec_yaml(spec_file, output_dir)},
    )


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
    """torchrun (through dsl.engine.elastic) for one host. nnodes, node_rank, master_addr,
    master_port and log_dir may be `shell.Var`s, expanded on the host (Slurm knows them only there)."""
    def flag(name: str, value: int | str) -> str:
        if isinstance(value, shell.Var):
            return shell.Var(f"--{name}={value.prefix}", value.name)
        return f"--{name}={value}"

    return [
        python, "-m", "dsl.engine.elastic",
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
    guard = [python, "-m", "dsl.launcher.guard", f"--grace-s={GUARD_GRACE_S:g}"]
    if remote:
        # The environment arrives on stdin (no secret on a command line) and the end of stdin
        # (connection closed or lost) stops every rank of the host.
        guard += ["--env-stdin", "--watch-stdin"]
    if launcher_timeout_s is not None:
        # The launcher writes to stdin every keepalive interval: silence this long means the
        # connection is dead without a close (a partition), and the host stops its own ranks.
        guard.append(f"--launcher-timeout-s={launcher_timeout_s:g}")
    return guard + ["--"]


def _program(spec_file: SpecFile, resolved_spec_path: str) -> list[str]:
    run = spec_file.spec.run
    if run.train is not None:
        return ["-m", "dsl.engine.train", resolved_spec_path]
    if run.module is not None:
        return ["-m", run.module, *run.args]
    return [str(spec_file.resolve(run.script)), *run.args]


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


def resolved_spec_yaml(spec_file: SpecFile, output_dir: str) -> str:
    """The spec as it runs (defaults filled in, output_dir absolute, secret values redacted)."""
    data = spec_file.spec.model_dump(mode="json")
    data["output_dir"] = output_dir
    train = data["run"].get("train") or {}
    token_file = (train.get("data") or {}).get("path")
    if token_file:  # spec paths are relative to the spec file; the ranks may run elsewhere
        train["data"]["path"] = str(spec_file.resolve(token_file))
    model = train.get("model") or {}
    for key in ("hf", "hf_config"):  # a Hugging Face model's folder or config.json, the same way
        if model.get(key):
            model[key] = str(spec_file.resolve(model[key]))
    secrets = set(spec_file.spec.env.secret)
    data["env"]["vars"] = {k: (REDACTED if k in secrets else v) for k, v in data["env"]["vars"].items()}
    header = f"# resolved from {spec_file.path.resolve()} by dsl launch; what actually ran\n"
    return header + yaml.safe_dump(data, sort_keys=False)


def plan_json(plan: LaunchPlan) -> str:
    return json.dumps(plan.to_json(), indent=2)
