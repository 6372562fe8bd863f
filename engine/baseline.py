"""Measure this host's CPU process baseline: `python -m dsl.engine.baseline` (what
`dsl probe --measure-baseline` runs on each host; torch-free itself: the trainer runs in children).

A CPU rank's resident set is its process baseline (Python, torch, its libraries' heap, gloo, the
trainer's own modules), the step's live bytes and what malloc keeps (engine/memory_peak.py). The
memory model counts the baseline as its `runtime` term; the figure differs between machines,
Python builds and torch builds, so this measures it where the job runs:

1. the bundled trainer (`python -m dsl.engine.train`, as `dsl launch` starts every rank: under
   `engine.cpu_allocator: auto` it re-executes itself with jemalloc where the host has it) trains
   `STEPS` steps of the `tiny` preset (~1 MiB of live bytes) as rank 0 of a one-rank gloo group;
2. its peak resident set less its file-backed pages (metrics.jsonl `host_peak_anon_bytes`,
   engine/peak.py) minus the memory model's bytes of that step other than the runtime term (the
   live bytes and the allocator's retention of them, engine/memory.py) is the baseline;
3. the same again with activation checkpointing, which imports torch._dynamo (~77 MiB more).

The result is a `ProcessBaseline` (topology/model.py), printed as JSON and, unless `--no-save`,
stored for this Python in dsl's cache folder (topology/baseline.py), where every later probe of
the host finds it: `dsl plan` and the ranks' own prediction then use it. Measured on the
project's machine: 161 MiB (238 MiB with checkpointing) for one rank, 162 (239) for each of two
(docs/benchmarks.md "Peak memory").
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

STEPS = 3
TIMEOUT_S = 300
ENGINE = {"zero_stage": 0, "precision": "fp32", "micro_batch": 2, "grad_accum": 1, "compile": False,
          "optimizer": {"type": "adamw", "lr": 1e-3}, "scheduler": {"type": "constant", "warmup_steps": 0}}
"""The measured run's engine section (with the allocator setting and checkpointing added)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(python: str, engine: dict, folder: Path) -> dict:
    """One trainer run of the tiny preset; its last metrics row."""
    import yaml

    out = folder / "out"
    spec = folder / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "run": {"train": {"model": {"preset": "tiny"}, "steps": STEPS, "log_every": 1, "seed": 0}},
        "engine": engine, "output_dir": str(out)}, sort_keys=False), encoding="utf-8")
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1"}
    env.pop("DSL_JEMALLOC_PRELOADED", None)  # a fresh rank decides its allocator itself
    proc = subprocess.run([python, "-m", "dsl.engine.train", str(spec)], env=env, cwd=folder,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        raise RuntimeError(f"the trainer exited {proc.returncode}: {tail}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    return rows[-1]


def _baseline(row: dict, engine: dict) -> tuple[int, str]:
    """(the run's baseline bytes, its allocator): its anonymous peak less the model's bytes of the
    step other than the runtime term."""
    from dsl.engine.config import EngineConfig
    from dsl.engine.memory import RUNTIME, estimate
    from dsl.engine.memory_shape import planned_allocator
    from dsl.engine.train_config import ModelConfig

    allocator = row.get("cpu_allocator") or planned_allocator(engine["cpu_allocator"])
    b = estimate(ModelConfig(preset="tiny"), EngineConfig(**engine), dp=1, accelerator=False, allocator=allocator)
    step = b.device_bytes - b.term(RUNTIME).device_bytes
    return int(row["host_peak_anon_bytes"][0]) - step, allocator


def measure(allocator: str = "auto"):
    """This host's ProcessBaseline (topology/model.py) for this Python under `allocator`."""
    from dsl.topology.baseline import identity
    from dsl.topology.model import ProcessBaseline

    python = sys.executable
    figures = []
    for checkpointing in (False, True):
        engine = {**ENGINE, "cpu_allocator": allocator, "activation_checkpointing": checkpointing}
        with tempfile.TemporaryDirectory(prefix="dsl-baseline-") as tmp:
            figures.append(_baseline(_run(python, engine, Path(tmp)), engine))
    (plain, used), (ckpt, _) = figures
    me = identity()
    return ProcessBaseline(bytes=plain, checkpointing_bytes=max(ckpt, plain), allocator=used, python=me["python"],
                           torch=me["torch"], dsl=me["dsl"],
                           measured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsl.engine.baseline", description=__doc__.splitlines()[0])
    parser.add_argument("--allocator", default="auto", help="engine.cpu_allocator of the measured run (auto)")
    parser.add_argument("--no-save", action="store_true", help="print only; do not store it in dsl's cache")
    args = parser.parse_args(argv)
    from dsl.topology.baseline import save
    from dsl.topology.model import _to_json

    try:
        found = measure(allocator=args.allocator)
    except (RuntimeError, OSError, subprocess.SubprocessError, KeyError, ValueError) as exc:
        print(f"dsl.engine.baseline: cannot measure the process baseline: {exc}", file=sys.stderr)
        return 1
    if not args.no_save:
        path = save(found)
        print(f"dsl.engine.baseline: stored in {path}", file=sys.stderr)
    print(json.dumps(_to_json(found)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
