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
   Both runs hide the GPUs (CUDA_VISIBLE_DEVICES=""): this is the figure of a CPU rank;
4. on a host with an NVIDIA GPU, one more child (`--cuda-child`) measures what a GPU rank holds on
   its device besides torch's allocations: NVML's used memory of device 0 before the child
   touches CUDA and after a matmul (cuBLAS) and an all_reduce on a one-rank NCCL group, less
   torch's reserved bytes (`cuda_runtime_bytes`; the GPU's runtime term then, instead of the
   documented 1 GiB, engine/memory_shape.py). Another process using the GPU meanwhile would
   count: measure on an idle GPU. A one-rank communicator holds no buffers for peers, so NCCL's
   share for a larger job is above this figure.

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


def _run(python: str, engine: dict, folder: Path, environ: dict[str, str] | None = None) -> dict:
    """One trainer run of the tiny preset; its last metrics row."""
    import yaml

    out = folder / "out"
    spec = folder / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "run": {"train": {"model": {"preset": "tiny"}, "steps": STEPS, "log_every": 1, "seed": 0}},
        "engine": engine, "output_dir": str(out)}, sort_keys=False), encoding="utf-8")
    env = {**(os.environ if environ is None else environ), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
           "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "OMP_NUM_THREADS": "1"}
    env.pop("DSL_JEMALLOC_PRELOADED", None)  # a fresh rank decides its allocator itself
    env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU rank's figure, on a GPU host too
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


CUDA_CHILD = "--cuda-child"


def _cuda_child() -> int:
    """Run in a fresh process: print the device bytes this process holds outside torch's
    allocator after CUDA, cuBLAS and NCCL are initialised, or null without a GPU."""
    import pynvml
    import torch
    import torch.distributed as tdist

    if not torch.cuda.is_available():
        print(json.dumps(None))
        return 0
    pynvml.nvmlInit()
    try:
        first = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0].strip()
        # cuda:0 as NVML names it: a visible-devices entry is an index or a GPU UUID
        handle = (pynvml.nvmlDeviceGetHandleByIndex(int(first)) if first.isdigit()
                  else pynvml.nvmlDeviceGetHandleByUUID(first))
        before = pynvml.nvmlDeviceGetMemoryInfo(handle).used
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
        a = torch.randn(1024, 1024, device=device)
        (a @ a).sum().item()
        tdist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                                 device_id=device)
        tdist.all_reduce(a)
        torch.cuda.synchronize(device)
        used = pynvml.nvmlDeviceGetMemoryInfo(handle).used - before
        print(json.dumps(max(0, used - torch.cuda.memory_reserved(device))))
        tdist.destroy_process_group()
    finally:
        pynvml.nvmlShutdown()
    return 0


def cuda_runtime(python: str, environ: dict[str, str] | None = None) -> int | None:
    """`_cuda_child` in a fresh process: the device runtime bytes, or None without a GPU (NVML
    finds none) or when the child fails."""
    from dsl.engine.cpu_alloc import gpu_host

    env = dict(os.environ if environ is None else environ)
    if not gpu_host(env):
        return None
    proc = subprocess.run([python, "-m", "dsl.engine.baseline", CUDA_CHILD], env=env, capture_output=True,
                          text=True, timeout=TIMEOUT_S)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        print(f"dsl.engine.baseline: the GPU's runtime was not measured: {tail}", file=sys.stderr)
        return None
    value = json.loads(proc.stdout.strip().splitlines()[-1])
    return int(value) if value is not None else None


def measure(allocator: str = "auto", environ: dict[str, str] | None = None):
    """This host's ProcessBaseline (topology/model.py) for this Python under `allocator`, the
    trainer started with `environ` (default: this process's environment)."""
    from dsl.topology.baseline import identity
    from dsl.topology.model import ProcessBaseline

    python = sys.executable
    figures = []
    for checkpointing in (False, True):
        engine = {**ENGINE, "cpu_allocator": allocator, "activation_checkpointing": checkpointing}
        with tempfile.TemporaryDirectory(prefix="dsl-baseline-") as tmp:
            figures.append(_baseline(_run(python, engine, Path(tmp), environ), engine))
    (plain, used), (ckpt, _) = figures
    me = identity()
    return ProcessBaseline(bytes=plain, checkpointing_bytes=max(ckpt, plain), allocator=used, python=me["python"],
                           torch=me["torch"], dsl=me["dsl"],
                           measured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                           cuda_runtime_bytes=cuda_runtime(python, environ))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsl.engine.baseline", description=__doc__.splitlines()[0])
    parser.add_argument("--allocator", default="auto", help="engine.cpu_allocator of the measured run (auto)")
    parser.add_argument("--no-save", action="store_true", help="print only; do not store it in dsl's cache")
    parser.add_argument(CUDA_CHILD, action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cuda_child:
        return _cuda_child()
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
