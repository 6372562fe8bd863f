"""The spec sections of the backends that reach other machines: `resources.ssh` and
`resources.slurm` (pydantic v2 models, part of the schema of launcher/spec.py, which re-exports
them). Split from launcher/spec.py to keep each module small."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator, model_validator

from dsl.engine.config import StrictModel


class Ssh(StrictModel):
    """How the ssh backend (and preflight) reach the hosts."""

    user: str | None = None
    """Remote user; default: your ssh config's, else your local user name."""
    port: int = Field(22, ge=1, le=65535)
    """sshd port on every host."""
    identity_file: str | None = None
    """Private key to log in with (relative to the spec file); default: ssh agent and ~/.ssh keys."""
    known_hosts: str | None = None
    """known_hosts file to check host keys against; default: ~/.ssh/known_hosts."""
    config_file: str | None = None
    """An ssh_config file (ProxyJump, per-host users and keys); default: ~/.ssh/config."""
    strict_host_key_checking: bool = True
    """Refuse hosts whose key is unknown or changed. Turning it off is insecure and says so."""
    connect_timeout_s: float = Field(5.0, gt=0)
    """Give up on a host that does not answer within this many seconds."""
    keepalive_interval_s: float = Field(5.0, gt=0)
    """While a job runs, ask every host's sshd for an answer this often (OpenSSH's
    ServerAliveInterval), and tell its guard the launcher is still there."""
    keepalive_count_max: int = Field(3, ge=1)
    """A host that answers none of this many keepalives in a row is lost (OpenSSH's
    ServerAliveCountMax): the job is stopped and the host named, and the host's guard, hearing
    nothing from the launcher for as long, stops its ranks itself."""


class Slurm(StrictModel):
    """Batch-script settings for backend slurm (`dsl sbatch`, `dsl launch`)."""

    partition: str | None = None
    """Partition (`--partition`); default: the cluster's default partition."""
    account: str | None = None
    """Account to charge (`--account`)."""
    qos: str | None = None
    """Quality of service (`--qos`)."""
    time_min: int | None = Field(None, ge=1)
    """Time limit in minutes (`--time`); default: the partition's."""
    gpus_per_node: int | None = Field(None, ge=0)
    """GPUs per node (`--gpus-per-node`); default: procs_per_node on GPU clusters is up to you."""
    gres: str | None = None
    """Generic resources instead of gpus_per_node, e.g. `gpu:h100:8` (`--gres`)."""
    cpus_per_task: int | None = Field(None, ge=1)
    """CPUs for each node's task, which runs all ranks of the node (`--cpus-per-task`)."""
    mem_gb: int | None = Field(None, ge=1)
    """Memory per node in GB (`--mem`)."""
    exclusive: bool = False
    """Whole nodes only (`--exclusive`)."""
    constraint: str | None = None
    """Node features (`--constraint`)."""
    output: str = "slurm-%j.out"
    """Job output file, relative to output_dir; %j is the job id."""
    error: str | None = None
    """Separate error file (relative to output_dir); default: merged into `output`."""
    signal_before_end_s: int | None = Field(None, ge=1)
    """Send SIGUSR1 to every rank this many seconds before the time limit (`--signal=USR1@N`;
    `dsl launch --time-limit` uses it too). Default: 120 with run.train, whose trainer then
    checkpoints and exits 75; none for a script or module, which gets the signal only when this is
    set. Must be less than the time limit; Slurm may send it up to a minute earlier than asked."""
    requeue: bool | None = None
    """true: `--requeue`, and when every rank exits 75 (checkpointed at the SIGUSR1 above) the
    batch script requeues the job (`scontrol requeue`), which then resumes from that checkpoint.
    false: `--no-requeue`. Default: neither option, the cluster's own default."""
    extra_sbatch: list[str] = []
    """More `#SBATCH` options, one per entry, e.g. `--mail-type=END`."""
    srun_args: list[str] = []
    """More options of the srun that starts every node's ranks, one per entry, e.g. `--wait=60`
    (after dsl's own, so an entry can override one); each entry stays one word."""

    container_image: str | None = None
    """Run every node's ranks in this container (the pyxis plugin's `srun --container-image`,
    e.g. `nvcr.io#nvidia/pytorch:24.05-py3` or a .sqsh file). run.python and the working
    directory must exist inside it: mount them with container_mounts."""
    container_mounts: list[str] = []
    """Host paths in the container, `SRC:DST[:FLAGS]` each (pyxis' `--container-mounts`)."""

    @field_validator("container_mounts")
    @classmethod
    def _mounts(cls, value: list[str]) -> list[str]:
        for mount in value:
            if not mount or "," in mount or "\n" in mount:
                raise ValueError(f"{mount!r}: each entry is one mount SRC:DST[:FLAGS], without ','")
        return value

    @model_validator(mode="after")
    def _mounts_need_image(self) -> "Slurm":
        if self.container_mounts and not self.container_image:
            raise ValueError("container_mounts apply to a container: set container_image too")
        return self

    @field_validator("extra_sbatch", "srun_args")
    @classmethod
    def _options(cls, value: list[str], info: Any) -> list[str]:
        tool = "sbatch" if info.field_name == "extra_sbatch" else "srun"
        example = "--mail-type=END" if tool == "sbatch" else "--wait=60"
        for line in value:
            if "\n" in line or not line.startswith("-"):
                raise ValueError(f"{line!r}: each entry is one {tool} option such as {example}")
        return value

    def gres_gpus(self) -> int | None:
        """The GPUs per node that `gres` asks for (`gpu:8`, `gpu:h100:8,nvme:1` -> 8), else None."""
        for entry in (self.gres or "").split(","):
            fields = entry.strip().split(":")
            if fields[0] == "gpu" and len(fields) > 1 and fields[-1].isdigit():
                return int(fields[-1])
        return None
