"""The launch plan: exactly what `dsl launch` will start, per host, as plain data.

`render()` is a pure function of its inputs (no I/O): the spec, the resolved hosts, the chosen
port and the environment values read beforehand. `dsl launch --dry-run` prints its result and
stops; `dsl launch` hands the same object to a backend. There is no second code path.

What runs on each host (guard + starter + program, and its environment) is rendered by
launcher/hostcmd.py.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from dsl.launcher import shell
from dsl.launcher.spec import SpecFile

REDACTED = "<secret>"
GUARD_GRACE_S = 3.0


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
    dsl.launcher.host.mpirank derives it from the slots on the host."""

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


def _program(spec_file: SpecFile, resolved_spec_path: str) -> list[str]:
    run = spec_file.spec.run
    if run.train is not None:
        return ["-m", "dsl.engine.train", resolved_spec_path]
    if run.module is not None:
        return ["-m", run.module, *run.args]
    return [str(spec_file.resolve(run.script)), *run.args]


def resolved_spec_yaml(spec_file: SpecFile, output_dir: str) -> str:
    """The spec as it runs (defaults filled in, output_dir absolute, secret values redacted)."""
    data = spec_file.spec.model_dump(mode="json")
    data["output_dir"] = output_dir
    train = data["run"].get("train") or {}
    # Spec paths are relative to the spec file; the ranks read this copy in the run folder and
    # may run elsewhere: the data file and tokenizer, a Hugging Face model's folder or
    # config.json, the folder a run starts from.
    for section, keys in (("data", ("path", "tokenizer")), ("model", ("hf", "hf_config")),
                          ("init_from", ("deepspeed", "hf"))):
        values = train.get(section) or {}
        for key in keys:
            if values.get(key):
                values[key] = str(spec_file.resolve(values[key]))
    secrets = set(spec_file.spec.env.secret)
    data["env"]["vars"] = {k: (REDACTED if k in secrets else v) for k, v in data["env"]["vars"].items()}
    header = f"# resolved from {spec_file.path.resolve()} by dsl launch; what actually ran\n"
    return header + yaml.safe_dump(data, sort_keys=False)


def plan_json(plan: LaunchPlan) -> str:
    return json.dumps(plan.to_json(), indent=2)
