"""The `dsl` command: parse, call a launcher function, print. Nothing else lives here.

Imports are deferred into the commands so that `dsl --help` loads neither pydantic nor torch.
Errors of the `DslError` family print as one message without a traceback (exit 2 for bad input,
1 for runtime failures); `DSL_DEBUG=1` shows the traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(
    name="dsl",
    help="Launch distributed training jobs from a YAML spec (local, SSH, Slurm, MPI).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

SpecArg = typer.Argument(..., help="The experiment spec (YAML).", exists=False)


@app.command()
def launch(
    spec: Path = SpecArg,
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the per-host commands; start nothing."),
    as_json: bool = typer.Option(False, "--json", help="With --dry-run: print the plan as JSON."),
    preflight: bool = typer.Option(True, "--preflight/--no-preflight",
                                   help="Check remote hosts before starting (ssh/mpi backends)."),
    time_limit: Optional[str] = typer.Option(
        None, "--time-limit", metavar="DURATION",
        help="Stop the job this long after it starts (2h, 90m, 1h30m, 45s; local and ssh backends). "
             "resources.slurm.signal_before_end_s before it (default 120 s with run.train) every "
             "rank gets SIGUSR1, as under Slurm's --signal: the bundled trainer checkpoints and "
             "exits 75. Exit 124 if the limit itself is reached."),
    node_rank: Optional[int] = typer.Option(
        None, "--node-rank", min=0, help="Start this node's ranks only, as node N of a job whose other "
                                         "nodes a scheduler starts the same way (backend pernode)."),
    nnodes: Optional[int] = typer.Option(None, "--nnodes", min=1, help="With --node-rank: the job's node count."),
    master_addr: Optional[str] = typer.Option(None, "--master-addr",
                                              help="With --node-rank: the address of node 0."),
    master_port: Optional[int] = typer.Option(None, "--master-port", min=1, max=65535,
                                              help="With --node-rank: the rendezvous port (default 29500)."),
) -> None:
    """Run SPEC on its hosts, streaming every rank's output with a [host:rank] prefix."""
    from dsl.launcher import console

    console.setup_logging()
    from dsl.launcher.backends.pernode import NodeArgs
    from dsl.launcher.launch import Mode, execute, prepare

    mode = Mode.DRY_RUN if dry_run else Mode.RUN
    node = NodeArgs(node_rank, nnodes, master_addr, master_port)
    code = execute(prepare(spec, mode, node=node), mode, as_json=as_json, time_limit=time_limit,
                   preflight=preflight)
    if code:
        raise typer.Exit(code)


@app.command("preflight")
def preflight_cmd(spec: Path = SpecArg) -> None:
    """Check every host of SPEC (reachable, versions, master address, port, slots); start nothing."""
    from dsl.launcher import console

    console.setup_logging()
    from dsl.launcher.launch import Mode, prepare
    from dsl.launcher.run import check_hosts

    check_hosts(prepare(spec, Mode.DRY_RUN).plan)


@app.command()
def sbatch(
    spec: Path = SpecArg,
    output: Optional[Path] = typer.Option(None, "-o", "--output",
                                          help="Write the script here (default: print it)."),
) -> None:
    """Write the Slurm batch script of SPEC (and the resolved spec it runs) for `sbatch`."""
    from dsl.launcher import console

    console.setup_logging()
    from dsl.launcher.launch import Mode, prepare, write_run_folder
    from dsl.launcher.slurm import SCRIPT_NAME

    from dsl.launcher.runlock import acquire

    prepared = prepare(spec, Mode.DRY_RUN, backend="slurm")
    plan = prepared.plan
    with acquire(Path(plan.output_dir), plan.name, prepared.spec_file.where("output_dir")):
        write_run_folder(plan)
    script = next(text for path, text in plan.files.items() if path.endswith("/" + SCRIPT_NAME))
    if output is None:
        print(script, end="")
        return
    output.write_text(script)
    output.chmod(0o755)
    console.message(f"dsl: wrote {output}; submit it with: sbatch {output}")


@app.command("render")
def render_cmd(
    spec: Path = SpecArg,
    fmt: str = typer.Option(..., "--format", help="k8s: an example Kubernetes Indexed Job (+ headless "
                                                  "Service) running SPEC with one pod per node."),
    image: str = typer.Option("dsl:latest", "--image", help="The container image (dsl and the job's code installed)."),
    gpus_per_node: Optional[int] = typer.Option(None, "--gpus-per-node", min=1,
                                                help="Ask Kubernetes for this many nvidia.com/gpu per pod."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write the manifest here (default: print it)."),
) -> None:
    """Render SPEC for a scheduler that starts one process per node (each runs `dsl launch --node-rank`)."""
    from dsl.engine.errors import UserError

    if fmt != "k8s":
        raise UserError(f"--format {fmt}: dsl render writes k8s (a Kubernetes Indexed Job) only")
    from dsl.launcher.k8s import DEFAULT_IMAGE, render_k8s
    from dsl.launcher.spec import load_spec

    text = render_k8s(load_spec(spec), image=image, gpus_per_node=gpus_per_node)
    if image == DEFAULT_IMAGE:
        print(f"dsl: image {image} is a placeholder: pass --image with an image that has dsl, torch "
              "and the job's code", file=sys.stderr)
    if output is None:
        print(text, end="")
        return
    output.write_text(text)
    print(f"dsl: wrote {output}; run it with: kubectl apply -f {output}", file=sys.stderr)


@app.command()
def validate(specs: List[Path] = typer.Argument(..., help="Spec files to check.")) -> None:
    """Check spec files (the schema and the engine rules dsl launch and the engine apply; the
    rules about the ranks when the spec fixes them); print every problem as file:line:col field: message."""
    from dsl.engine.errors import UserError
    from dsl.launcher.spec import load_spec

    problems = []
    for path in specs:
        try:
            load_spec(path)
            print(f"{path}: ok")
        except UserError as exc:
            problems.append(str(exc))
    if problems:
        raise UserError("\n".join(problems))


@app.command()
def export(
    checkpoint: Path = typer.Argument(..., help="A checkpoints folder (its latest) or one step-* folder."),
    out: Path = typer.Option(..., "--out", help="The folder to write config.json and *.safetensors to."),
    fmt: str = typer.Option("hf", "--format", help="Only hf: a Hugging Face folder from_pretrained loads."),
    config: Optional[Path] = typer.Option(None, "--config",
                                          help="The model's folder or config.json (default: the run's resolved.yaml)."),
    max_shard_mib: float = typer.Option(2048.0, "--max-shard-mib", help="Largest weight file in MiB."),
) -> None:
    """Write a checkpoint of a Hugging Face model as config.json + *.safetensors, tensor by tensor
    (no rank gathers the whole model; engine/hf_export.py)."""
    from dsl.engine.errors import UserError

    if fmt != "hf":
        raise UserError(f"--format {fmt}: dsl export writes hf (a Hugging Face folder) only")
    from dsl.engine.hf_export import export_hf

    written = export_hf(checkpoint, out, config=config, max_shard_bytes=max(1, int(max_shard_mib * 2**20)))
    print(f"dsl export: wrote {len(written)} weight file(s) and config.json to {out}", file=sys.stderr)


@app.command()
def schema() -> None:
    """Print the JSON schema of the spec (every field with its description)."""
    import json

    from dsl.launcher.spec import json_schema

    print(json.dumps(json_schema(), indent=2))


@app.command()
def hosts(
    hostfile: Optional[Path] = typer.Option(None, "--hostfile", "-H", help="DeepSpeed-style hostfile."),
    include: Optional[str] = typer.Option(None, "--include", "-i", help="e.g. host1:0,2@host2"),
    exclude: Optional[str] = typer.Option(None, "--exclude", "-e", help="e.g. host1:1"),
    num_nodes: Optional[int] = typer.Option(None, "--num-nodes", "--num_nodes", help="Use the first N hosts."),
    num_procs: Optional[int] = typer.Option(None, "--num-procs", "--num_gpus", "--num-gpus",
                                            help="Use the first N selected slots of each host."),
    as_json: bool = typer.Option(False, "--json", help='Print {"hosts": [{"name", "slots"}]}.'),
) -> None:
    """Resolve hosts and slots the way `deepspeed` does (with its bugs fixed)."""
    import json

    from dsl.engine.errors import UserError
    from dsl.launcher import hosts as hostlib

    if include and exclude:
        raise UserError("--include and --exclude are mutually exclusive; keep one of them")
    if hostfile is not None:
        pool = hostlib.load_hostfile(hostfile)
        selected = hostlib.select_hosts(pool, include, exclude, num_nodes, num_procs)
    else:
        if include or exclude:
            raise UserError("--include/--exclude select from a hostfile; pass --hostfile")
        if num_nodes not in (None, 1):
            raise UserError(f"--num-nodes {num_nodes} needs --hostfile; without one dsl uses this host")
        from dsl.topology.gpus import count_gpus

        selected = hostlib.local_host(num_procs or count_gpus().count or 1)
    if as_json:
        print(json.dumps({"hosts": [{"name": h.name, "slots": list(h.slots)} for h in selected]}))
    else:
        for h in selected:
            print(f"{h.name} slots={','.join(map(str, h.slots))}")


@app.command("plan")
def plan_cmd(
    spec: Path = SpecArg,
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON (choice, candidates, terms)."),
    topology: Optional[str] = typer.Option(None, "--topology", "-t",
                                           help="Plan for a recorded machine (dsl probe --list) or a "
                                                "topology/recording file instead of this host."),
) -> None:
    """Choose ZeRO stage, offload, sequence parallelism, checkpointing and batch split for SPEC's
    `auto` fields; show memory per term, candidates, and the commands dsl launch would run.
    Exit 1 when nothing fits (the report says what would)."""
    from dsl.launcher import console

    console.setup_logging()
    from dsl.launcher.launch import Mode, execute, prepare

    code = execute(prepare(spec, Mode.PLAN, topology=topology), Mode.PLAN, as_json=as_json)
    if code:
        raise typer.Exit(code)


@app.command()
def probe(
    spec: Optional[Path] = typer.Argument(None, help="Probe every host of this spec over its backend "
                                                     "(ssh, mpi, Slurm inside an allocation) instead "
                                                     "of this host.", show_default=False),
    as_json: bool = typer.Option(False, "--json", help="Print the topology as JSON."),
    record: Optional[Path] = typer.Option(None, "--record",
                                          help="Write the raw NVML answers and host facts to FILE "
                                               "(a recording: usable as --topology and as a fixture)."),
    topology: Optional[str] = typer.Option(None, "--topology", "-t",
                                           help="Show a recorded machine (fixture name or file) instead."),
    measure_nvme: Optional[Path] = typer.Option(None, "--measure-nvme", metavar="DIR",
                                                help="Measure sequential O_DIRECT read/write bandwidth by "
                                                     "writing a temporary file (<= 512 MiB, <= 5 s each way) "
                                                     "in DIR."),
    list_fixtures: bool = typer.Option(False, "--list", help="List the recorded machines shipped with dsl."),
    measure_baseline: bool = typer.Option(False, "--measure-baseline",
                                          help="Run the bundled trainer once (~5 s) to measure what a CPU rank's "
                                               "process holds before its model (Python, torch, gloo) and keep it "
                                               "for this host's plans and runs."),
) -> None:
    """Show this host (or every host of SPEC): GPUs (NVML), their links, CPU, RAM, NUMA, NVMe,
    network. Nothing is initialised on the GPUs (no CUDA context); NVMe is measured only with
    --measure-nvme, the process baseline only with --measure-baseline."""
    import json

    from dsl.engine.errors import UserError
    from dsl.topology import probe as probelib

    if spec is not None:
        if record is not None or measure_nvme is not None or topology is not None or list_fixtures:
            raise UserError("dsl probe SPEC probes the spec's hosts; --record, --measure-nvme, "
                            "--topology and --list apply to this host only")
        from dsl.launcher.launch import probe_spec_hosts

        probed = probe_spec_hosts(spec, measure_baseline=measure_baseline)
        if as_json:
            print(json.dumps({"hosts": {h: t.to_json() for h, t in probed.items()}}, indent=1))
            return
        from rich.console import Console

        from dsl.topology.show import render

        console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
        for topo in probed.values():
            render(topo, console)
        return
    if list_fixtures:
        for name in probelib.fixture_names():
            topo = probelib.load_topology(name)
            print(f"{name:28} {topo.description or ''}")
        return
    if topology is not None:
        if record is not None or measure_nvme is not None or measure_baseline:
            raise UserError("--record, --measure-nvme and --measure-baseline probe this host; they do not apply "
                            "to --topology")
        topo = probelib.load_topology(topology)
    else:
        if measure_baseline:
            probelib.measure_baseline()
        topo, recording = probelib.probe_local()
        if measure_nvme is not None:
            topo, recording = probelib.with_disk_measurement(recording, measure_nvme)
        if record is not None:
            record.write_text(json.dumps(recording, indent=1) + "\n")
            print(f"dsl: wrote {record} (use it as --topology {record})", file=sys.stderr)
    if as_json:
        print(json.dumps(topo.to_json(), indent=1))
        return
    from rich.console import Console

    from dsl.topology.show import render

    render(topo, Console(highlight=False, width=None if sys.stdout.isatty() else 160))


def main() -> None:
    # pydantic scans every installed distribution's entry points for plugins on first use (~20 ms
    # of every command); the CLI uses none. An explicit setting in the environment wins.
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    from dsl.engine.errors import DslError

    try:
        app()  # standalone: exits with the command's code; usage errors exit 2
    except DslError as exc:
        if os.environ.get("DSL_DEBUG"):
            raise
        text = str(exc)
        print(f"dsl: error:\n{text}" if "\n" in text else f"dsl: error: {text}", file=sys.stderr)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
