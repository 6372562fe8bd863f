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

from dsl.launcher import shell
from dsl.launcher.hosts import Host
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

    def describe(self, host: str) -> str:
        """An equivalent OpenSSH command line, for people reading a plan."""
        argv = ["ssh", "-p", str(self.port), "-o", f"ConnectTimeout={self.connect_timeout_s:g}"]
        if self.config_file:
            argv += ["-F", self.config_file]
        if self.identity_file:
            argv += ["-i", self.identity_file]
        if self.known_hosts:
            argv += ["-o", f"UserKnownHostsFile={self.known_hosts}"]
        argv += ["-o", f"StrictHostKeyChecking={'yes' if self.strict_host_key_checking else 'no'}"]
        argv.append(f"{self.user}@{host}" if self.user else host)
        return shell.join(argv)


@dataclass(frozen=True)
class LaunchPlan:
    name: str
    backend: str
    world_size: int
    master_addr: str
    master_port: int
    output_dir: str
    max_restarts: int
    hosts: tuple[HostLaunch, ...]
    secrets: frozenset[str] = frozenset()
    files: Mapping[str, str] = field(default_factory=dict)
    """Files written before the ranks start: path -> content."""
    ssh: SshTarget | None = None
    """Set for backends that reach hosts over ssh."""

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
        return out

    def describe(self) -> str:
        """A human-readable plan: one shell line per host (copy-pasteable, secrets redacted)."""
        lines = [
            f"job {self.name}: {self.world_size} rank(s) on {len(self.hosts)} host(s), "
            f"backend {self.backend}, master {self.master_addr}:{self.master_port}",
            f"output: {self.output_dir}",
        ]
        for path in sorted(self.files):
            lines.append(f"writes: {path}")
        for h in self.hosts:
            ranks = f"{h.ranks[0]}-{h.ranks[-1]}" if len(h.ranks) > 1 else str(h.ranks[0])
            env = " ".join(f"{k}={shell.quote(v)}" for k, v in self.redacted_env(h.env).items())
            lines.append(f"\n[{h.host}] node_rank {h.node_rank}, ranks {ranks}, slots {list(h.slots)}")
            if self.backend == "ssh" and self.ssh is not None:
                lines.append(f"{self.ssh.describe(h.host)} {shell.quote(shell.remote_command(h.cwd, h.argv))}")
                lines.append(f"  environment (sent on stdin): {env}")
            else:
                lines.append(f"cd {shell.quote(h.cwd)} && env {env} {shell.join(h.argv)}")
        return "\n".join(lines)


@dataclass(frozen=True)
class RenderInputs:
    """Everything `render` needs that had to be looked up (I/O happens before, not inside)."""

    python: str
    cwd: str
    master_port: int
    env_values: Mapping[str, str]
    set_visible_devices: bool


def render(spec_file: SpecFile, hosts: list[Host], inputs: RenderInputs) -> LaunchPlan:
    spec = spec_file.spec
    output_dir = str((Path(inputs.cwd) / spec_file.output_dir).resolve()) \
        if not spec_file.output_dir.is_absolute() else str(spec_file.output_dir)
    resolved_spec_path = f"{output_dir}/resolved.yaml"
    python = spec.run.python or inputs.python
    cwd = spec.run.workdir or inputs.cwd
    local = spec.resources.backend == "local"
    master_addr = spec.resources.master_addr or ("127.0.0.1" if local else hosts[0].name)
    world_size = sum(len(h.slots) for h in hosts)

    program = _program(spec_file, resolved_spec_path)
    launches = []
    first_rank = 0
    for node_rank, host in enumerate(hosts):
        nproc = len(host.slots)
        starter = [
            python, "-m", "dsl.engine.elastic",
            f"--nnodes={len(hosts)}",
            f"--node-rank={node_rank}",
            f"--nproc-per-node={nproc}",
            f"--master-addr={master_addr}",
            f"--master-port={inputs.master_port}",
            "--max-restarts=0",  # dsl restarts the whole job (max_restarts), on every backend
            "--monitor-interval=0.1",
            f"--shutdown-timeout={GUARD_GRACE_S:g}",
            "--tee=3",
            f"--log-dir={output_dir}/logs/torchelastic/{host.name}",
        ]
        guard = [python, "-m", "dsl.launcher.guard", f"--grace-s={GUARD_GRACE_S:g}"]
        if spec.resources.backend == "ssh":
            # The environment arrives on stdin (no secret on a command line) and the end of
            # stdin (connection closed or lost) stops every rank of the host.
            guard += ["--env-stdin", "--watch-stdin"]
        guard.append("--")
        env = _host_env(spec_file, host, node_rank, inputs, output_dir)
        launches.append(HostLaunch(
            host=host.name,
            node_rank=node_rank,
            ranks=tuple(range(first_rank, first_rank + nproc)),
            slots=tuple(host.slots),
            argv=tuple(guard + starter + program),
            env=env,
            cwd=cwd,
        ))
        first_rank += nproc

    return LaunchPlan(
        name=spec.name,
        backend=spec.resources.backend,
        world_size=world_size,
        master_addr=master_addr,
        master_port=inputs.master_port,
        output_dir=output_dir,
        max_restarts=spec.max_restarts,
        hosts=tuple(launches),
        secrets=frozenset(spec.env.secret),
        files={resolved_spec_path: resolved_spec_yaml(spec_file, output_dir)},
        ssh=ssh_target(spec_file) if spec.resources.backend in ("ssh", "mpi") else None,
    )


def ssh_target(spec_file: SpecFile) -> SshTarget:
    ssh = spec_file.spec.resources.ssh

    def path(value: str | None) -> str | None:
        return str(spec_file.resolve(value)) if value else None

    return SshTarget(ssh.user, ssh.port, path(ssh.identity_file), path(ssh.known_hosts),
                     path(ssh.config_file), ssh.strict_host_key_checking, ssh.connect_timeout_s)


def _program(spec_file: SpecFile, resolved_spec_path: str) -> list[str]:
    run = spec_file.spec.run
    if run.train is not None:
        return ["-m", "dsl.engine.train", resolved_spec_path]
    if run.module is not None:
        return ["-m", run.module, *run.args]
    return [str(spec_file.resolve(run.script)), *run.args]


def _host_env(spec_file: SpecFile, host: Host, node_rank: int, inputs: RenderInputs,
              output_dir: str) -> dict[str, str]:
    env: dict[str, str] = {
        # Rank output goes through a pipe; unbuffered, it streams as it is printed.
        "PYTHONUNBUFFERED": "1",
        "NODE_RANK": str(node_rank),
        "DSL_JOB_NAME": spec_file.spec.name,
        "DSL_OUTPUT_DIR": output_dir,
    }
    if inputs.set_visible_devices:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(s) for s in host.slots)
    env.update(inputs.env_values)  # the user's values win
    return env


def resolved_spec_yaml(spec_file: SpecFile, output_dir: str) -> str:
    """The spec as it runs (defaults filled in, output_dir absolute, secret values redacted)."""
    data = spec_file.spec.model_dump(mode="json")
    data["output_dir"] = output_dir
    secrets = set(spec_file.spec.env.secret)
    data["env"]["vars"] = {k: (REDACTED if k in secrets else v) for k, v in data["env"]["vars"].items()}
    header = f"# resolved from {spec_file.path.resolve()} by dsl launch; what actually ran\n"
    return header + yaml.safe_dump(data, sort_keys=False)


def plan_json(plan: LaunchPlan) -> str:
    return json.dumps(plan.to_json(), indent=2)
