"""Prints this rank's CPU affinity, OMP_NUM_THREADS and a variable's value as one JSON line
(tests/integration/test_cpu_bind.py, tests/integration/test_setup_lines.py)."""

import json
import os
import sys

print("AFFINITY " + json.dumps({
    "rank": int(os.environ["RANK"]),
    "world_size": int(os.environ["WORLD_SIZE"]),
    "host": os.uname().nodename,
    "cpus": sorted(os.sched_getaffinity(0)),
    "omp": os.environ.get("OMP_NUM_THREADS"),
    "var": os.environ.get(sys.argv[1]) if len(sys.argv) > 1 else None,
}), flush=True)
