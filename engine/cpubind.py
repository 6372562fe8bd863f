"""What a rank runs first under `resources.bind`: pin itself to its cores, then exec the program.

`python -m dsl.engine.cpubind -- PROGRAM...` reads its local rank (LOCAL_RANK) and the per-rank
CPU sets the starter computed for the host (DSL_CPU_SETS, topology/cpubind.py), calls
os.sched_setaffinity(0, its set), sets OMP_NUM_THREADS to its share of that set (its CPUs / the
ranks given the same set) when the starter says the value is dsl's to choose (DSL_CPU_OMP=1, i.e.
neither the spec nor the host set it), and execs PROGRAM. The affinity mask survives exec and is
inherited by every thread the program starts afterwards (torch's intra-op pool, OpenMP, gloo), so
binding before the program runs binds all of them; the rank keeps its pid, so signals and
torchrun's monitoring see the program itself. Torch-free, stdlib only (it runs before torch).
"""

from __future__ import annotations

import os
import sys

from dsl.topology.cpubind import CPU_SETS_ENV, decode

OMP_ENV = "DSL_CPU_OMP"
"""`1`: OMP_NUM_THREADS follows the rank's CPU share (the starter found it unset)."""


def bind_self(local_rank: int, sets: list[tuple[int, ...]], set_omp: bool) -> tuple[int, ...]:
    """Pin this process to `sets[local_rank]`; with set_omp, OMP_NUM_THREADS = its share."""
    mine = sets[local_rank]
    os.sched_setaffinity(0, mine)
    if set_omp:
        sharing = sum(1 for s in sets if s == mine)
        os.environ["OMP_NUM_THREADS"] = str(max(1, len(mine) // sharing))
    return mine


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    program = argv[1:] if argv[:1] == ["--"] else argv
    if not program:
        print("usage: python -m dsl.engine.cpubind -- PROGRAM...", file=sys.stderr)
        return 2
    try:
        local_rank = int(os.environ["LOCAL_RANK"])
        sets = decode(os.environ[CPU_SETS_ENV])
        bind_self(local_rank, sets, os.environ.get(OMP_ENV) == "1")
    except (KeyError, ValueError, IndexError, OSError) as exc:
        print(f"dsl.engine.cpubind: cannot bind local rank {os.environ.get('LOCAL_RANK')!r} to "
              f"{os.environ.get(CPU_SETS_ENV)!r}: {exc}", file=sys.stderr)
        return 2
    os.environ.pop(OMP_ENV, None)
    try:
        os.execvp(program[0], program)
    except OSError as exc:
        print(f"dsl.engine.cpubind: cannot start {program[0]!r}: {exc}", file=sys.stderr)
        return 127
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
