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
    data = _with_deepspeed_config(data, path, locations)
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


def check_gres(spec_file: SpecFile, ranks_per_node: int) -> None:
    """Backend slurm: more ranks per node than the GPUs `gres` asks for is a UserError at gres."""
    gpus = spec_file.spec.resources.slurm.gres_gpus()
    if gpus is None or ranks_per_node <= gpus:
        return
    raise UserError(
        f"{spec_file.where('resources', 'slurm', 'gres')}: {spec_file.spec.resources.slurm.gres!r} "
        f"gives each node {gpus} GPU(s) but procs_per_node is {ranks_per_node}: ranks would share "
        f"GPUs. Ask for gpu:{ranks_per_node}, or set procs_per_node to {gpus}.")


DEFAULT_TRAIN_WARNING_S = 120
"""signal_before_end_s when a run.train spec leaves it unset (the trainer checkpoints at it)."""


def warning_before_end_s(spec: Spec) -> int | None:
    """Seconds before a time limit at which the ranks get SIGUSR1 (Slurm's `--signal`, `dsl
    launch --time-limit`): resources.slurm.signal_before_end_s; unset, DEFAULT_TRAIN_WARNING_S
    with run.train (the bundled trainer checkpoints at it) and None for a script or module (a
    user program gets the signal only when the spec asks)."""
    asked = spec.resources.slurm.signal_before_end_s
    if asked is not None:
        return asked
    return DEFAULT_TRAIN_WARNING_S if spec.run.train is not None else None


def check_warning_time(spec_file: SpecFile, limit_s: float, limit_text: str,
                       limit_field: tuple[str, ...] | None) -> None:
    """The warning must come after the job starts: signal_before_end_s < the time limit. Else a
    UserError at signal_before_end_s when the spec sets it, else at `limit_field` (the time
    limit, or run.train whose default the warning is)."""
    warn_s = warning_before_end_s(spec_file.spec)
    if warn_s is None or warn_s < limit_s:
        return
    field = ("resources", "slurm", "signal_before_end_s")
    written = field in spec_file.locations.values
    suggestion = max(1, int(limit_s) // 2)
    what = f"{warn_s} s" if written else f"{warn_s} s (its default with run.train)"
    where = spec_file.where(*field) if written else         f"{spec_file.locations.where(limit_field or ('run', 'train'))} {dotted(field)}"
    raise UserError(
        f"{where}: {what} is not less than {limit_text}: the SIGUSR1 that asks the ranks to "
        f"checkpoint would be due before the job starts. Set resources.slurm.signal_before_end_s "
        f"below {limit_s:g} (e.g. {suggestion}), or give the job more time.")


def spec_world(spec: Spec) -> tuple[int, int] | None:
    """(ranks, ranks per host) when the spec alone fixes them, else None (`dsl launch` knows them
    once it has resolved the hosts). Fixed: procs_per_node is a number and no hostfile decides the
    hosts: the local backend's one host, or backend slurm's `nodes` (default 1). With a hostfile
    the count depends on its slots and include/exclude, with procs_per_node auto on the devices
    found at launch."""
    from dsl.launcher.backends import get_backend

    return get_backend(spec.resources.backend).spec_world(spec.resources)


def check_engine(spec_file: SpecFile, world_size: int | None = None, ranks_per_host: int | None = None) -> None:
    """The rules of engine/validity.py on the spec's engine section, located in the spec file.

    With run.train the model and (when given) the world take part, and the fields the planner
    still fills at launch (micro_batch, grad_accum left out; `auto` values) only need a value to
    exist; a script or module gets the rules of the section alone."""
    from dsl.engine.validity import problems, refuse_located

    spec = spec_file.spec
    if spec.run.train is None:
        refuse_located(problems(spec.engine), spec_file.locations)
        return
    written = spec_file.locations.values
    planned = [name for name in ("micro_batch", "grad_accum") if ("engine", name) not in written]
    refuse_located(problems(spec.engine, model=spec.run.train.model, world_size=world_size,
                            ranks_per_host=ranks_per_host, planned=planned), spec_file.locations)


def _with_deepspeed_config(data: dict[str, Any], path: Path, locations: Locations) -> dict[str, Any]:
    """engine.deepspeed_config: the DeepSpeed JSON's settings (engine/dsconfig.py: DeepSpeed's
    semantics, Hugging Face's `auto`), under what the spec writes itself. The resolved spec then
    carries plain engine settings; the engine never reads the JSON.

    An `auto` takes the spec's setting (or dsl's default, or the planner's choice for micro_batch /
    grad_accum left out), the bucket sizes Hugging Face derives from the hidden size take
    run.train.model's, total_num_steps takes run.train.steps. When the spec fixes the ranks
    (`spec_world`) DeepSpeed's batch arithmetic runs here, with its messages located in the JSON.
    The engine settings the JSON decides count as written in the spec (located at
    engine.deepspeed_config), so the planner keeps them. What each `auto` became and the notes on
    the keys dsl handles its own way are printed on stderr (`dsl validate`, `dsl plan`, `dsl launch`)."""
    engine = data.get("engine")
    if not isinstance(engine, dict) or not engine.get("deepspeed_config"):
        return data
    from dsl.engine.config import EngineConfig
    from dsl.engine.ds_json import load_json_located
    from dsl.engine.dsconfig import Context, import_deepspeed, merge, report

    key = ("engine", "deepspeed_config")
    where = f"{locations.where(key)} engine.deepspeed_config"
    json_path = (path.parent / os.path.expanduser(str(engine["deepspeed_config"]))).resolve()
    try:
        text = json_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise UserError(f"{where}: cannot read DeepSpeed config {json_path}: {reason}") from None
    ds, ds_locations = load_json_located(text, str(json_path))
    explicit = {k: v for k, v in engine.items() if k != "deepspeed_config"}
    train = (data.get("run") or {}).get("train") if isinstance(data.get("run"), dict) else None
    context = Context(explicit=explicit, steps=_train_steps(train), hidden_size=_hidden_size(train),
                      dp=_data_parallel(data, explicit, ds))
    imported = import_deepspeed(ds, ds_locations, context)
    merged = merge(imported.engine, explicit)
    # The JSON's settings count as written (at engine.deepspeed_config): the planner keeps them.
    mark = locations.values[key]
    for name in _leaves(imported.engine):
        locations.values.setdefault(("engine",) + name, mark)
    try:
        final = EngineConfig.model_validate(merged)
    except ValueError:
        final = None  # load_spec reports it, located
    if final is not None and (imported.notes or imported.autos):
        from dsl.launcher.console import message

        planned = frozenset(n for n in ("micro_batch", "grad_accum") if n not in merged)
        for line in imported.notes + report(imported, final, planned):
            message(line)
    overridden = sorted(set(explicit) & set(imported.engine))
    if overridden:
        log.info("%s: the spec's engine.%s override the DeepSpeed config", json_path.name,
                 ", engine.".join(overridden))
    return {**data, "engine": merged}


def _leaves(node: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for name, value in node.items():
        out += _leaves(value, prefix + (name,)) if isinstance(value, dict) else [prefix + (name,)]
    return out


def _train_steps(train: Any) -> int | None:
    if not isinstance(train, dict):
        return None
    steps = train.get("steps", TrainConfig.model_fields["steps"].default)
    return steps if isinstance(steps, int) and not isinstance(steps, bool) else None


def _hidden_size(train: Any) -> int | None:
    """run.train.model's hidden size (for the bucket sizes Hugging Face derives from it), when known."""
    if not isinstance(train, dict):
        return None
    from dsl.engine.train_config import ModelConfig

    try:
        model = ModelConfig.model_validate(train.get("model") or {})
    except ValueError:
        return None
    hidden = getattr(model, "hidden_size", None)
    return hidden if isinstance(hidden, int) else None


def _data_parallel(data: dict[str, Any], explicit: dict[str, Any], ds: Any) -> int | None:
    """The data-parallel size when the spec alone fixes the ranks (`spec_world`), else None."""
    from types import SimpleNamespace

    try:
        resources = Resources.model_validate(data.get("resources") or {})
    except ValueError:
        return None
    world = spec_world(SimpleNamespace(resources=resources))  # type: ignore[arg-type]
    sp = explicit.get("sequence_parallel", ds.get("sequence_parallel_size", 1) if isinstance(ds, dict) else 1)
    if world is None or not isinstance(sp, int) or isinstance(sp, bool) or sp < 1 or world[0] % sp:
        return None
    return world[0] // sp


def json_schema() -> dict[str, Any]:
    from dsl.engine.fielddocs import describe_schema

    return describe_schema(Spec.model_json_schema(), Spec)
