"""What every rank runs first under `mpirun`: OpenMPI's environment -> torchrun's, then exec.

`python -m dsl.launcher.mpirank --slots "0,1;1,3" -- PROGRAM...` sets RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK/NODE_RANK, ROLE_RANK, ROLE_WORLD_SIZE and
GROUP_WORLD_SIZE from `OMPI_COMM_WORLD_*` (never OMPI_UNIVERSE_SIZE, which also counts mpirun's
machine), CUDA_VISIBLE_DEVICES from this node's selected slots, OMP_NUM_THREADS from the cores
per local rank (unless set), then replaces itself with PROGRAM, so an unchanged torchrun script
(and the bundled trainer) finds the contract it expects. MASTER_ADDR/MASTER_PORT come from
mpirun's `-x`. Torch-free, stdlib only.
"""

from __future__ import annotations

import argparse
import os
import sys


def torchrun_env(ompi: dict[str, str], node_slots: list[list[int]] | None) -> dict[str, str]:
    try:
        rank, size = int(ompi["OMPI_COMM_WORLD_RANK"]), int(ompi["OMPI_COMM_WORLD_SIZE"])
        local_rank = int(ompi["OMPI_COMM_WORLD_LOCAL_RANK"])
        local_size = int(ompi["OMPI_COMM_WORLD_LOCAL_SIZE"])
        node_rank = int(ompi["OMPI_COMM_WORLD_NODE_RANK"])
    except KeyError as exc:
        raise SystemExit(f"dsl.launcher.mpirank: {exc.args[0]} is not set; run me under OpenMPI's mpirun")
    env = {
        "RANK": str(rank), "WORLD_SIZE": str(size),
        "LOCAL_RANK": str(local_rank), "LOCAL_WORLD_SIZE": str(local_size),
        "GROUP_RANK": str(node_rank), "NODE_RANK": str(node_rank),
        "ROLE_RANK": str(rank), "ROLE_WORLD_SIZE": str(size), "ROLE_NAME": "default",
    }
    if node_slots is not None:
        env["GROUP_WORLD_SIZE"] = str(len(node_slots))
        slots = node_slots[node_rank] if node_rank < len(node_slots) else []
        if slots:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, slots))
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsl.launcher.mpirank")
    parser.add_argument("--slots", default=None, help="per node, in node order: '0,1;1,3'")
    parser.add_argument("--visible-devices", action="store_true")
    parser.add_argument("program", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    program = args.program[1:] if args.program[:1] == ["--"] else args.program
    if not program:
        parser.error("no program given")
    slots = [[int(s) for s in node.split(",") if s] for node in args.slots.split(";")] \
        if args.slots else None
    env = torchrun_env(dict(os.environ), slots)
    if not args.visible_devices:
        env.pop("CUDA_VISIBLE_DEVICES", None)
    os.environ.update(env)
    if "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        os.environ["OMP_NUM_THREADS"] = str(max(1, (cores or 1) // int(env["LOCAL_WORLD_SIZE"])))
    sys.stdout.flush()
    os.execvp(program[0], program)
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main())
