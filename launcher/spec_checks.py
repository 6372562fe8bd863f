"""The spec's rules that need more than one field: the world it fixes, the engine rules of
engine/validity.py located in the spec file, Slurm's gres against the ranks per node, the
time-limit warning against the limit. launcher/spec.py re-exports them and runs them on load.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dsl.engine.errors import UserError
from dsl.engine.located import dotted

if TYPE_CHECKING:
    from dsl.launcher.spec import Spec, SpecFile


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
