"""Render the Slurm batch script of a spec (pure; `backends/slurm.py` submits and follows it).

The script starts one task per node with `srun`; each task runs the same guard + torchrun
command as every other backend, with the node count, node rank, master address and port expanded
on the node from Slurm's own variables (the node count is the allocation's, `$SLURM_JOB_NUM_NODES`,
so `sbatch --nodes=N SCRIPT` runs the same script on N nodes; `#SBATCH --nodes` is the spec's) (`$SLURM_NODEID`, the allocation's first host, a port derived
from the job id when the spec says `master_port: auto`). The same script runs under `sbatch`
and, inside an existing allocation, under plain `bash`.

Time limits: `--signal=USR1@N` is added for run.train specs (N = signal_before_end_s, default
120: the bundled trainer checkpoints at SIGUSR1 and exits 75) and for a script or module only
when the spec sets signal_before_end_s. `--requeue` / `--no-requeue` only when the spec sets
`requeue: true` / `false`. With `requeue: true` the script runs `scontrol requeue $SLURM_JOB_ID`
when srun exits 75 (EXIT_CHECKPOINTED: every rank checkpointed at the signal), so the job starts
again and resumes from that checkpoint. With more than one node each node's guard holds a 75 for
CHECKPOINTED_LINGER_S before exiting: srun's --kill-on-bad-exit stops every other node at the
first non-zero exit, and they must still be able to report 75 (see launcher/host/guard.py).

What batch scripts people write also need: run.setup runs before srun and again on every node
inside srun's command; env.prepend's exports come after it, once (srun passes them on);
resources.slurm.container_image / container_mounts become pyxis' srun options, and
resources.slurm.srun_args are added after dsl's srun options; the script's own arguments
(`sbatch SCRIPT ARGS...`) reach a script or module on every node (srun's `bash -c ... dsl-node
"$@"`) and are refused for run.train, which takes none; a `gres` with fewer GPUs than
procs_per_node is refused (launcher/spec.py check_gres).
"""

from __future__ import annotations

import string
from importlib import metadata, resources

from dsl.engine.wire import EXIT_CHECKPOINTED
from dsl.launcher import shell
from dsl.launcher.hosts import Host
from dsl.launcher.hostcmd import base_env, guard_argv, layout, starter_argv
from dsl.launcher.plan import HostLaunch, Job, LaunchPlan
from dsl.launcher.spec import SpecFile, check_gres, warning_before_end_s

SCRIPT_NAME = "sbatch.sh"
AUTO_PORT = "$((20000 + SLURM_JOB_ID % 20000))"  # distinct for concurrent jobs of one node
CHECKPOINTED_LINGER_S = 5
NODES_VAR = "NNODES"
NODES_LINES = (
    "# Nodes: the allocation's, so `sbatch --nodes=N` runs this script on N nodes (DSL_NNODES: what\n"
    "# `dsl launch` asks for inside an existing allocation)\n"
    f"{NODES_VAR}=${{DSL_NNODES:-$SLURM_JOB_NUM_NODES}}\nexport {NODES_VAR}")
NODE_SHELL_NAME = "dsl-node"
"""$0 of the bash that srun starts on every node (its $1... are the batch script's arguments)."""


class _Template(string.Template):
    delimiter = "@@"


def sbatch_options(spec_file: SpecFile, output_dir: str, nodes: int) -> list[str]:
    s = spec_file.spec.resources.slurm
    opts = [f"--job-name={spec_file.spec.name}", f"--nodes={nodes}", "--ntasks-per-node=1"]
    for flag, value in (("partition", s.partition), ("account", s.account), ("qos", s.qos),
                        ("time", s.time_min), ("gpus-per-node", s.gpus_per_node), ("gres", s.gres),
                        ("cpus-per-task", s.cpus_per_task), ("constraint", s.constraint)):
        if value is not None:
            opts.append(f"--{flag}={value}")
    if s.mem_gb is not None:
        opts.append(f"--mem={s.mem_gb}G")
    if s.exclusive:
        opts.append("--exclusive")
    opts.append(f"--output={output_dir}/{s.output}")
    if s.error:
        opts.append(f"--error={output_dir}/{s.error}")
    warn_s = warning_before_end_s(spec_file.spec)
    if warn_s is not None:
        opts.append(f"--signal=USR1@{warn_s}")
    if s.requeue is not None:
        opts.append("--requeue" if s.requeue else "--no-requeue")
    opts.append("--open-mode=append")  # a requeued job adds to its output file
    opts.extend(s.extra_sbatch)
    return opts


def node_argv(python: str, nodes: int, nproc: int, output_dir: str, program: list[str],
              setup: list[str] = ()) -> list[str]:
    starter = starter_argv(python, shell.Var("", NODES_VAR), shell.Var("", "SLURM_NODEID"), nproc,
                           shell.Var("", "MASTER_ADDR"), shell.Var("", "MASTER_PORT"),
                           shell.Var(f"{output_dir}/logs/torchelastic/", "SLURMD_NODENAME"))
    guard = guard_argv(python)
    if nodes > 1:
        guard.insert(guard.index("--"), f"--checkpointed-linger-s={CHECKPOINTED_LINGER_S}")
    return shell.with_setup(setup, guard + starter + program)


def setup_lines(setup: list[str], prepend: dict[str, str]) -> str:
    """run.setup and env.prepend in the batch script, before srun: what they export reaches srun
    (--export=ALL). Setup runs without the script's `set -eu` (activate scripts read unset
    variables); each line stops the script itself when it fails (shell.setup_script). prepend
    is applied here only: every node gets the result from srun, prepending again would repeat it."""
    text = ""
    if setup:
        text += "# run.setup (run again on every node before its ranks)\nset +eu\n" + \
            shell.setup_script(setup) + "\nset -eu\n\n"
    if prepend:
        text += "# env.prepend: in front of the value the job has here\n" + \
            "\n".join(shell.prepend_export(k, v) for k, v in prepend.items()) + "\n\n"
    return text


def container_options(s) -> list[str]:
    """pyxis' srun options for resources.slurm.container_image / container_mounts."""
    if not s.container_image:
        return []
    opts = [f"--container-image={s.container_image}"]
    if s.container_mounts:
        opts.append("--container-mounts=" + ",".join(s.container_mounts))
    return opts


def arguments_lines(train: bool) -> str:
    """The script's own arguments (`sbatch SCRIPT ARGS...`) go to a script or module (srun's
    `"$@"`); the bundled trainer takes none, so arguments given to it are refused."""
    if not train:
        return ""
    return ('if [ "$#" -gt 0 ]; then\n'
            '    echo "dsl: this job runs the bundled trainer (run.train), which takes no arguments; '
            'got: $*" >&2\n    exit 2\nfi\n')


def passthrough(spec, program: list[str]) -> list[str]:
    """A script or module gets the batch script's arguments (`"$@"` on the node) after its own."""
    return program if spec.run.train is not None else [*program, shell.Var("", "@")]


def srun_lines(srun_command: str, requeue: bool) -> str:
    """The script's last lines: srun, and with requeue its exit code 75 requeues the job."""
    if not requeue:
        return srun_command
    return "\n".join([
        f"# requeue: true. Exit {EXIT_CHECKPOINTED}: every rank checkpointed at the time-limit signal; "
        "requeued, the job",
        "# starts again and resumes from that checkpoint.",
        "code=0",
        f"{srun_command} || code=$?",
        f'if [ "$code" -eq {EXIT_CHECKPOINTED} ]; then',
        f'    echo "dsl: every rank checkpointed at the time-limit signal (exit {EXIT_CHECKPOINTED}); '
        'requeueing job $SLURM_JOB_ID to resume" >&2',
        '    scontrol requeue "$SLURM_JOB_ID" || echo "dsl: scontrol requeue failed (not a batch job?); '
        'submit the script again to resume" >&2',
        "fi",
        'exit "$code"',
    ])


def render_script(spec_file: SpecFile, *, output_dir: str, script_path: str, nodes: int, nproc: int,
                  python: str, cwd: str, program: list[str], env: dict[str, str],
                  secrets: frozenset[str] | None = None) -> str:
    spec = spec_file.spec
    secrets = frozenset(spec.env.secret) if secrets is None else secrets
    port = spec.resources.master_port
    program = passthrough(spec, program)
    node_command = (f"export NODE_RANK=\"$SLURM_NODEID\"; "
                    f"{shell.remote_command(cwd, node_argv(python, nodes, nproc, output_dir, program, spec.run.setup))}")
    srun = [shell.Var("--nodes=", NODES_VAR), shell.Var("--ntasks=", NODES_VAR), "--ntasks-per-node=1",
            "--kill-on-bad-exit=1", "--label", "--export=ALL"]
    if spec.resources.slurm.cpus_per_task:
        # Since Slurm 22.05 srun does not inherit --cpus-per-task from sbatch: pass the job's own
        # value (the #SBATCH line's, or `sbatch --cpus-per-task=N script` when given there).
        srun.append(shell.Var("--cpus-per-task=", "SLURM_CPUS_PER_TASK"))
    srun += container_options(spec.resources.slurm)
    srun += spec.resources.slurm.srun_args
    srun += ["bash", "-c", node_command]
    if spec.run.train is None:
        srun += [NODE_SHELL_NAME, shell.Var("", "@")]  # the node's bash gets the script's arguments
    before_srun = (setup_lines(spec.run.setup, spec.env.prepend)
                   + arguments_lines(spec.run.train is not None)).rstrip("\n")
    before_srun = "\n\n" + before_srun if before_srun else ""
    template = resources.files("dsl.templates").joinpath("sbatch.sh.tmpl").read_text()
    return _Template(template).substitute(
        name=spec.name,
        version=_version(),
        spec_path=str(spec_file.path.resolve()),
        script_path=shell.quote(script_path),
        secrets=", ".join(sorted(secrets)) or "none",
        sbatch_lines="\n".join(f"#SBATCH {shell.quote(o)}" for o in sbatch_options(spec_file, output_dir, nodes)),
        master_port_line=f"MASTER_PORT={AUTO_PORT if port == 'auto' else port}\n" + NODES_LINES,
        exports=shell.exports({k: v for k, v in env.items() if k not in secrets}) + before_srun,
        srun_lines=srun_lines(f"srun {shell.join(srun)}", spec.resources.slurm.requeue is True),
    )


def _version() -> str:
    try:
        return metadata.version("dsl")
    except metadata.PackageNotFoundError:
        return "(not installed)"


def render_plan(job: Job, hosts: list[Host]) -> LaunchPlan:
    """The plan of a Slurm job: the batch script (a file), `sbatch` (or, inside an allocation,
    `bash`) as the one command run here, and per node what srun starts there."""
    spec, inputs = job.spec, job.inputs
    nodes, nproc = len(hosts), len(hosts[0].slots)
    script_path = f"{job.output_dir}/{SCRIPT_NAME}"
    env = base_env(job)
    check_gres(job.spec_file, nproc)  # procs_per_node auto: known only now
    script = render_script(job.spec_file, output_dir=job.output_dir, script_path=script_path,
                           nodes=nodes, nproc=nproc, python=job.python, cwd=job.cwd,
                           program=job.program, env=env, secrets=job.secrets)
    port = spec.resources.master_port
    launches = [
        HostLaunch(host=host.name, node_rank=node_rank, ranks=ranks, slots=tuple(host.slots),
                   argv=tuple(node_argv(job.python, nodes, nproc, job.output_dir, passthrough(spec, job.program),
                                        spec.run.setup)),
                   env={"NODE_RANK": str(node_rank)}, cwd=job.cwd)
        for node_rank, host, ranks in layout(hosts)
    ]
    submit_argv = ("bash", script_path) if inputs.in_slurm_allocation \
        else ("sbatch", "--parsable", script_path)
    # Inside an allocation the spec's node count, not the allocation's, as before.
    submit_env = {**env, "DSL_NNODES": str(nodes)} if inputs.in_slurm_allocation else env
    return LaunchPlan(
        name=spec.name,
        backend="slurm",
        world_size=nodes * nproc,
        master_addr=hosts[0].name if inputs.in_slurm_allocation else "$MASTER_ADDR (first host of the allocation)",
        master_port=AUTO_PORT if port == "auto" else port,
        output_dir=job.output_dir,
        max_restarts=spec.max_restarts,
        hosts=tuple(launches),
        secrets=job.secrets,
        files={**job.files, script_path: script},
        submit=HostLaunch(host="submit", node_rank=-1, ranks=(), slots=(), argv=submit_argv,
                          env=submit_env, cwd=job.cwd),
        job_output=f"{job.output_dir}/{spec.resources.slurm.output}",
    )
