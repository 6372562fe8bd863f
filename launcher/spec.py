"""The experiment spec: the YAML a user writes for `dsl launch`, as pydantic v2 models.

The models are the single source of truth for the YAML (`dsl schema` prints their JSON schema).
`load_spec(path)` parses a file and turns every validation error into one line
`file:line:col field.path: message`, with the valid choices and a did-you-mean for typos.

Paths inside a spec (hostfile, env file, script) are relative to the spec file's folder, so a
spec works from any working directory; `output_dir` is relative to where `dsl launch` runs, like
every other tool's output flag.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BeforeValidator, Field, field_validator, model_validator

from dsl.engine.config import EngineConfig, StrictModel
from dsl.engine.train_config import TrainConfig
from dsl.engine.errors import UserError
from dsl.engine.located import Locations, dotted, load_located, validate_located
from dsl.launcher.spec_backends import Slurm, Ssh  # noqa: F401  (part of the spec; re-exported)
from dsl.launcher.spec_checks import (  # noqa: F401  (re-exported: the spec's checks)
    DEFAULT_TRAIN_WARNING_S, check_engine, check_gres, check_warning_time, spec_world, warning_before_end_s)

log = logging.getLogger(__name__)
Backend = Literal["local", "ssh", "slurm", "mpi", "pernode"]


def _int_or_auto(value: Any) -> Any:
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    raise ValueError(f"expected a positive integer or 'auto', got {value!r}")


IntOrAuto = Annotated[Union[int, Literal["auto"]], BeforeValidator(_int_or_auto)]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class Run(StrictModel):
    """What every rank runs: the bundled trainer (`train:`), or a user program (`script:` or
    `module:` with `args:`), started the way torchrun starts it."""

    train: TrainConfig | None = None
    """Train with the bundled engine; the engine settings are in the top-level `engine:`."""
    script: str | None = None
    """A Python script to run on every rank (relative to the spec file), like `torchrun script.py`."""
    module: str | None = None
    """A Python module to run on every rank, like `torchrun -m module`."""
    args: list[str] = []
    """Arguments passed to the script or module, unchanged."""
    python: str | None = None
    """The Python interpreter on the hosts; default: the one running `dsl`."""
    workdir: str | None = None
    """Working directory of every rank; default: the directory `dsl launch` runs in."""
    setup: list[str] = []
    """Shell lines run by bash on every host before its ranks start, in the working directory,
    e.g. `module load cuda/12.4` or `source /opt/venv/bin/activate`; what they export or source
    reaches every rank (env.vars still win). The first line that fails stops the host with its
    exit code and a message naming the line. Backend slurm runs them in the batch script before
    srun and again on every node inside srun's command; backend mpi before each rank."""

    @field_validator("setup")
    @classmethod
    def _setup_lines(cls, value: list[str]) -> list[str]:
        for index, line in enumerate(value):
            if not line.strip() or "\0" in line:
                raise ValueError(f"entry {index} ({line!r}) is not a shell line: give a command such "
                                 "as `module load cuda/12.4`, or remove the entry")
        return value

    @model_validator(mode="after")
    def _exactly_one_program(self) -> "Run":
        chosen = [k for k in ("train", "script", "module") if getattr(self, k) is not None]
        if len(chosen) != 1:
            got = " and ".join(chosen) if chosen else "none of them"
            raise ValueError(f"set exactly one of train, script, module (got {got})")
        if self.train is not None and self.args:
            raise ValueError("args only apply to script or module; the bundled trainer reads train:")
        return self


class Resources(StrictModel):
    """Where the ranks run."""

    backend: Backend = "local"
    """How ranks are started: local (this machine), ssh, slurm, mpi, or pernode (this machine's
    ranks of a job whose other nodes a scheduler starts the same way: `dsl launch SPEC --node-rank N`
    on each node, see launcher/backends/pernode.py)."""
    nodes: int | None = Field(None, ge=1)
    """Number of hosts to use (the first N selected hosts); default: all selected hosts, or 1."""
    procs_per_node: IntOrAuto = "auto"
    """Ranks per host. `auto`: one per GPU; on a CPU-only host, 1."""
    hostfile: str | None = None
    """A DeepSpeed-style hostfile (`hostname slots=N` per line), relative to the spec file."""
    include: str | None = None
    """Hosts/slots to use, DeepSpeed grammar: `host1:0,2@host2` (a bare host = all its slots)."""
    exclude: str | None = None
    """Hosts/slots to leave out, same grammar as include. Not together with include."""
    master_addr: str | None = None
    """Address of rank 0's host; default: the first host (127.0.0.1 for a local run)."""
    master_port: IntOrAuto = "auto"
    """Port of the rendezvous on the master host; `auto` picks a free one per launch (backend
    pernode: 29500, torchrun's default, the same on every node)."""
    node_rank: int | None = Field(None, ge=0)
    """Backend pernode only: this node's index, 0 .. nodes-1 (node 0 hosts the rendezvous). Usually
    given per node as `dsl launch SPEC --node-rank N`; unset, Kubernetes' JOB_COMPLETION_INDEX of an
    Indexed Job is used."""
    ssh: Ssh = Ssh()
    """SSH settings for backend ssh (and for preflight checks of remote hosts)."""
    slurm: Slurm = Slurm()
    """Batch settings for backend slurm."""
    topology: str | None = None
    """The machine type to plan for instead of probing this host: a recorded fixture
    (`dsl probe --list`, e.g. h100-sxm-8x) or a file written by `dsl probe --record` or
    `dsl probe --json` (relative to the spec file). Every host is assumed to be like it."""
    bind: Literal["none", "numa", "cores"] = "none"
    """Pin each rank to CPUs of its host. `cores`: each local rank gets its own share of the
    host's usable cores (disjoint, contiguous, within one NUMA node where the counts allow);
    more ranks than cores on a host stops the job with a message. `numa`: local rank i runs on the
    cores of NUMA node i mod (number of nodes), round-robin, and its memory comes from that node
    by first touch; a host that shows no NUMA node stops the job with a message. OMP_NUM_THREADS
    follows the rank's share unless set. `none`: no pinning (the OS schedules). See
    topology/cpubind.py."""

    @field_validator("procs_per_node", "master_port")
    @classmethod
    def _positive(cls, value: int | str, info: Any) -> int | str:
        if isinstance(value, int):
            upper = 65535 if info.field_name == "master_port" else 1 << 16
            if not 1 <= value <= upper:
                raise ValueError(f"must be between 1 and {upper} or 'auto', got {value}")
        return value

    @model_validator(mode="after")
    def _include_xor_exclude(self) -> "Resources":
        if self.include and self.exclude:
            raise ValueError("include and exclude are mutually exclusive; keep one of them")
        if (self.include or self.exclude) and not self.hostfile:
            raise ValueError("include/exclude select from a hostfile; set resources.hostfile")
        return self


class Env(StrictModel):
    """Environment of every rank (on top of what the backend passes on)."""

    vars: dict[str, str] = {}
    """Variables to set on every rank."""
    prepend: dict[str, str] = {}
    """Values put in front of a variable's value on the host, separated by `:`, e.g.
    `{LD_LIBRARY_PATH: /opt/x/lib}` -> `LD_LIBRARY_PATH=/opt/x/lib:$LD_LIBRARY_PATH`, the
    variable expanded where the ranks run (after run.setup; no trailing `:` when it was unset or
    empty). The value itself is taken literally, as are all of `vars`. Backend slurm prepends
    once, in the batch script (srun passes the result to every node)."""
    file: str | None = None
    """A dotenv file (`NAME=value` lines) read at launch, relative to the spec file."""
    secret: list[str] = []
    """Names whose values are passed to ranks but never printed or written to the run folder."""
    forward: list[str] = []
    """Names copied from the environment of `dsl launch` (remote backends pass nothing else)."""
    forward_prefixes: list[str] = ["NCCL", "PYTHON", "UCX", "MLFLOW", "MV2"]
    """Every variable of the environment of `dsl launch` whose name starts with one of these is
    passed to every rank. The default is DeepSpeed's (its launcher's EXPORT_ENVS plus the CUDA
    accelerator's NCCL); `[]` turns it off. Backend slurm: sbatch passes the whole environment
    itself. See launcher/envsources.py for the precedence."""
    dotfiles: bool = True
    """Read `.deepspeed_env` (or the file DS_ENV_FILE names) and `.dsl_env` from the home folder
    and the working folder of `dsl launch`, as DeepSpeed's launcher reads `.deepspeed_env`:
    `NAME=value` lines, the value taken literally."""

    @field_validator("vars")
    @classmethod
    def _names(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not _ENV_NAME.match(name):
                raise ValueError(f"{name!r} is not a valid environment variable name")
        return value

    @field_validator("prepend")
    @classmethod
    def _prepend_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not _ENV_NAME.match(name):
                raise ValueError(f"{name!r} is not a valid environment variable name")
        return value

    @model_validator(mode="after")
    def _prepend_or_set(self) -> "Env":
        both = sorted(set(self.prepend) & set(self.vars))
        if both:
            raise ValueError(f"{', '.join(both)} both set (vars) and prepended to (prepend): keep one")
        return self

    @field_validator("forward_prefixes")
    @classmethod
    def _prefixes(cls, value: list[str]) -> list[str]:
        for prefix in value:
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", prefix):
                raise ValueError(f"{prefix!r} is not the start of an environment variable name")
        return value

    @field_validator("vars", "prepend", mode="before")
    @classmethod
    def _stringify(cls, value: Any) -> Any:
        # YAML turns `1` and `true` into int/bool; environment values are strings.
        if isinstance(value, dict):
            return {k: _env_str(v) for k, v in value.items()}
        return value


def _env_str(value: Any) -> Any:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (int, float)):
        return str(value)
    return value


class Spec(StrictModel):
    """An experiment: what to run, where, and how to train."""

    name: str
    """Name of the experiment (letters, digits, `.`, `_`, `-`); used in paths and job names."""
    run: Run
    """What every rank runs."""
    resources: Resources = Resources()
    """Hosts, ranks per host, backend and rendezvous."""
    env: Env = Env()
    """Environment of every rank."""
    engine: EngineConfig = EngineConfig()
    """Settings of the bundled engine (ZeRO stage, precision, batch)."""
    output_dir: str = "runs/{name}"
    """Folder of the run's logs, metrics, resolved spec and checkpoints; `{name}` is replaced.
    Relative to the directory `dsl launch` runs in."""
    max_restarts: int = Field(0, ge=0)
    """Restart the whole job this many times after a failure."""
    watchdog_s: float | None = Field(300.0, gt=0)
    """Hang watchdog (backends local and ssh): when no rank has finished a step for this many
    seconds, dsl names the ranks and their last step, prints every rank's Python stack, stops
    the job and exits 70. Ranks report steps with heartbeats (the bundled trainer does; a script
    calls `dsl.engine.wire.heartbeat(step)`), and the watchdog starts with the first one. Set
    it above your longest step, a checkpoint save included (a save sends no heartbeat).
    Collectives of the engine's process group also time out after this + 60 s (every backend),
    so a rank stuck in one raises. null: neither."""

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(f"{value!r} may hold only letters, digits, '.', '_' and '-'")
        return value


@dataclass(frozen=True)
class SpecFile:
    """A validated spec with where it came from (for paths and located messages)."""

    spec: Spec
    path: Path
    locations: Locations

    def where(self, *field_path: str | int) -> str:
        """`file:line:col field.path` of a field, for messages about values found wrong later."""
        return f"{self.locations.where(field_path)} {dotted(field_path)}"

    def resolve(self, relative: str) -> Path:
        """A path written in the spec, relative to the spec file's folder."""
        return (self.path.parent / os.path.expanduser(relative)).resolve()

    @property
    def output_dir(self) -> Path:
        return Path(self.spec.output_dir.replace("{name}", self.spec.name))


def load_spec(path: str | os.PathLike[str]) -> SpecFile:
    """Read and validate a spec; every problem becomes one located line of one UserError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no such spec file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read spec: {exc}") from None
    data, locations = load_located(text, str(path))
    if not isinstance(data, dict):
        raise UserError(f"{path}:1:1: a spec is a mapping of fields (name, run, resources, ...); "
                        f"got {type(data).__name__ if data is not None else 'an empty file'}")
    from dsl.launcher.spec_deepspeed import with_deepspeed_config  # it reads this module's models

    data = with_deepspeed_config(data, path, locations)
    spec = validate_located(Spec, data, locations)
    spec_file = SpecFile(spec, path, locations)
    check_engine(spec_file, *(spec_world(spec) or (None, None)))
    from dsl.launcher.backends import backend_of  # the backends import this module

    backend_of(spec_file).check_spec(spec_file)
    time_min = spec.resources.slurm.time_min
    if time_min is not None:
        check_warning_time(spec_file, time_min * 60, f"the time limit (time_min: {time_min} = "
                           f"{time_min * 60} s)", ("resources", "slurm", "time_min"))
    return spec_file


def json_schema() -> dict[str, Any]:
    from dsl.engine.fielddocs import describe_schema

    return describe_schema(Spec.model_json_schema(), Spec)
