"""What every rank runs first under `mpirun`: OpenMPI's environment -> torchrun's, then exec.

`python -m dsl.launcher.host.mpirank --slots "0,1;1,3" -- PROGRAM...` sets RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK/NODE_RANK, ROLE_RANK, ROLE_WORLD_SIZE and
GROUP_WORLD_SIZE from `OMPI_COMM_WORLD_*` and dsl's layout (--slots) (never OMPI_UNIVERSE_SIZE,
which also counts mpirun's machine), CUDA_VISIBLE_DEVICES from this node's selected slots (with
--visible-devices; a different value the node's environment had is replaced, and local rank 0
says so on stderr), OMP_NUM_THREADS from the cores per local rank (unless set), then runs
PROGRAM, so an unchanged torchrun script (and the bundled trainer) finds the contract it
expects. MASTER_ADDR/MASTER_PORT come from mpirun's `-x`. With DSL_BIND (resources.bind) it
pins itself to its local rank's CPUs first (topology/cpubind.py), which PROGRAM inherits.

PROGRAM's output is passed on line by line, each line prefixed `[dsl:RANK:LOCAL_RANK] ` and
written with one write() (mpirun's own `--tag-output` tags chunks, not lines, and splits a line a
program wrote in two pieces). Signals are forwarded to PROGRAM; the exit code is PROGRAM's
(128+N when it died of signal N). Torch-free, stdlib only.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading

from dsl.engine import wire


def torchrun_env(ompi: dict[str, str], node_slots: list[list[int]]) -> dict[str, str]:
    """torchrun's variables for this rank. The node index comes from dsl's layout (ranks fill
    nodes in hostfile order), not from OMPI_COMM_WORLD_NODE_RANK, which is OpenMPI's rank of the
    process *within* its node across jobs, not the node's index."""
    try:
        rank, size = int(ompi["OMPI_COMM_WORLD_RANK"]), int(ompi["OMPI_COMM_WORLD_SIZE"])
        local_rank = int(ompi["OMPI_COMM_WORLD_LOCAL_RANK"])
        local_size = int(ompi["OMPI_COMM_WORLD_LOCAL_SIZE"])
    except KeyError as exc:
        raise SystemExit(f"dsl.launcher.host.mpirank: {exc.args[0]} is not set; run me under OpenMPI's mpirun")
    first, node_rank = 0, None
    for index, slots in enumerate(node_slots):
        if first <= rank < first + len(slots):
            node_rank = index
            break
        first += len(slots)
    if node_rank is None or rank - first != local_rank or len(node_slots[node_rank]) != local_size:
        raise SystemExit(f"dsl.launcher.host.mpirank: mpirun placed rank {rank} as local rank {local_rank} "
                         f"of {local_size}, which is not dsl's layout {node_slots}; "
                         "was --map-by slot changed?")
    slots = node_slots[node_rank]
    return {
        "RANK": str(rank), "WORLD_SIZE": str(size),
        "LOCAL_RANK": str(local_rank), "LOCAL_WORLD_SIZE": str(local_size),
        "GROUP_RANK": str(node_rank), "NODE_RANK": str(node_rank),
        "GROUP_WORLD_SIZE": str(len(node_slots)),
        "ROLE_RANK": str(rank), "ROLE_WORLD_SIZE": str(size), "ROLE_NAME": "default",
        "CUDA_VISIBLE_DEVICES": ",".join(map(str, slots)),
    }


def replaced_devices_note(inherited: str | None, pinned: str) -> str | None:
    """What to say when this host's environment already had another CUDA_VISIBLE_DEVICES: the
    hostfile's slots are physical indices and win (as with DeepSpeed's launcher), which must not
    happen silently. dsl passes no --visible-devices when the spec sets CUDA_VISIBLE_DEVICES
    itself (launcher/launch.py), so a value found here came from the host's own environment."""
    if not inherited or inherited == pinned:
        return None
    return (f"dsl: CUDA_VISIBLE_DEVICES={inherited} of this host is replaced by {pinned}, the slots the "
            "hostfile selects; select other slots with resources.include to use other devices")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsl.launcher.host.mpirank")
    parser.add_argument("--slots", required=True, help="per node, in node order: '0,1;1,3'")
    parser.add_argument("--visible-devices", action="store_true")
    parser.add_argument("program", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    program = args.program[1:] if args.program[:1] == ["--"] else args.program
    if not program:
        parser.error("no program given")
    slots = [[int(s) for s in node.split(",") if s] for node in args.slots.split(";")]
    env = torchrun_env(dict(os.environ), slots)
    prefix = wire.rank_prefix(env["RANK"], env["LOCAL_RANK"]).encode()
    if not args.visible_devices:
        env.pop("CUDA_VISIBLE_DEVICES", None)
    else:
        note = replaced_devices_note(os.environ.get("CUDA_VISIBLE_DEVICES"), env["CUDA_VISIBLE_DEVICES"])
        if note and env["LOCAL_RANK"] == "0":  # once per host
            os.write(2, prefix + note.encode() + b"\n")
    os.environ.update(env)
    from dsl.launcher.host.elastic import set_omp_threads

    bind = os.environ.get("DSL_BIND", "none")
    if bind != "none":  # resources.bind: pinned here, the program and its threads inherit it
        from dsl.engine.cpubind import bind_self
        from dsl.topology.cpubind import BindError, numa_layout, rank_cores

        try:
            sets = rank_cores(bind, int(env["LOCAL_WORLD_SIZE"]), frozenset(os.sched_getaffinity(0)),
                              numa_layout())
        except BindError as exc:
            os.write(2, prefix + f"dsl: {exc}\n".encode())
            return 2
        bind_self(int(env["LOCAL_RANK"]), sets, "OMP_NUM_THREADS" not in os.environ)
    set_omp_threads(int(env["LOCAL_WORLD_SIZE"]))
    return run_prefixed(program, prefix)


def run_prefixed(program: list[str], prefix: bytes) -> int:
    try:
        child = subprocess.Popen(program, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE)
    except OSError as exc:
        os.write(2, prefix + f"cannot start {program[0]!r}: {exc}\n".encode())
        return 127
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, lambda signum, _frame: child.send_signal(signum))
    pumps = [threading.Thread(target=_pump, args=(stream, fd, prefix))
             for stream, fd in ((child.stdout, 1), (child.stderr, 2))]
    for pump in pumps:
        pump.start()
    code = child.wait()
    for pump in pumps:
        pump.join()
    return 128 - code if code < 0 else code


def _pump(stream, fd: int, prefix: bytes) -> None:
    with stream:
        for line in iter(stream.readline, b""):
            os.write(fd, prefix + (line if line.endswith(b"\n") else line + b"\n"))


if __name__ == "__main__":
    sys.exit(main())
