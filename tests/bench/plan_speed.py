"""`make bench BENCH=plan_speed`: how long `dsl plan --json` takes, end to end, as a user runs it.

Every spec in configs/ and a spec per published Hugging Face config in tests/fixtures/hf_configs
(planned on the recorded `h100-sxm-8x` with ZeRO stage, offload, sequence parallelism and
checkpointing left to the planner) is planned 5 times in a fresh process each; the table gives
the median wall time and the median CPU time (user + sys) of the process, and whether torch was
imported (it must not be: `python -X importtime` lists every module). Issue 15's target: under
0.5 s. Wall time includes the interpreter's start; on a shared VM it varies with the load, which
the section records.
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from layout import cpu_model  # noqa: E402
from report import write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
RUNS = 5
TARGET_S = 0.5
HF_SPEC = """name: {name}
run:
  train:
    model: {{hf_config: {config}}}
resources: {{backend: local, procs_per_node: auto, topology: h100-sxm-8x}}
engine: {{precision: bf16, train_batch: 64, zero_stage: auto, offload: {{optimizer: auto}},
  sequence_parallel: auto, activation_checkpointing: auto}}
"""


def _specs(tmp: Path) -> list[tuple[str, Path]]:
    out = [(f"configs/{p.name}", p) for p in sorted((ROOT / "configs").glob("*.yaml"))]
    for config in sorted((ROOT / "tests/fixtures/hf_configs").glob("*.json")):
        spec = tmp / f"{config.stem}.yaml"
        spec.write_text(HF_SPEC.format(name=config.stem, config=config))
        out.append((f"hf_config {config.name}", spec))
    return out


def _run(spec: Path, *extra: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *extra, "-m", "dsl.launcher", "plan", str(spec), "--json"],
                          capture_output=True, text=True, cwd=ROOT)
    if proc.returncode not in (0, 1):  # 1: nothing fits (the JSON is still there)
        raise SystemExit(f"dsl plan {spec} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    return proc


def _timed(spec: Path) -> tuple[float, float]:
    """(wall s, CPU s) of one `dsl plan SPEC --json` process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    _run(spec)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _imports_torch(spec: Path) -> bool:
    """`python -X importtime` lists every module the process imported (a separate, untimed run)."""
    return any(line.rstrip().endswith("| torch") for line in _run(spec, "-X", "importtime").stderr.splitlines())


def main() -> int:
    rows = ["| spec | median wall s | median CPU s | torch imported |", "|---|---|---|---|"]
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for name, spec in _specs(Path(tmp)):
            runs = [_timed(spec) for _ in range(RUNS)]
            wall = statistics.median(r[0] for r in runs)
            cpu = statistics.median(r[1] for r in runs)
            torch = _imports_torch(spec)
            worst = max(worst, wall)
            rows.append(f"| {name} | {wall:.3f} | {cpu:.3f} | {'yes' if torch else 'no'} |")
            if torch:
                print(f"{name}: torch imported", file=sys.stderr)
                return 1
    load = os.getloadavg()[0]
    body = (f"CPU: {cpu_model()}; load average at the end {load:.1f} on {os.cpu_count()} cores. Each spec "
            f"planned {RUNS} times, one process each (`python -m dsl.launcher plan SPEC --json`, interpreter "
            f"start included). Slowest median wall time: {worst:.3f} s (target: under {TARGET_S} s).\n\n"
            + "\n".join(rows) + "\n")
    print(body)
    write_section("plan_speed", "dsl plan: time per plan, end to end",
                  "make bench BENCH=plan_speed  (python tests/bench/plan_speed.py)", body)
    return 0 if worst < TARGET_S else 1


if __name__ == "__main__":
    sys.exit(main())
