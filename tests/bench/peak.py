"""`make bench BENCH=peak`: each rank's measured peak memory against the memory model's peak.

Every case is a real `dsl launch` of the bundled trainer on 2 gloo ranks (one process per rank,
so each process's VmHWM is that case's alone), a few steps with a checkpoint save; the trainer
writes each rank's peak resident set (VmHWM, and VmHWM less the file-backed pages:
`host_peak_anon_bytes`, what a CPU rank's plan is compared with) and the prediction
(`predicted_peak_bytes`, what `dsl plan` shows per device) to metrics.jsonl (engine/peak.py). The
table gives the worst rank's peak over the prediction per case. Writes the `peak` section of docs/benchmarks.md.

A resident set is three things: the process baseline (Python, torch's libraries, gloo, the
trainer's imports; torch._dynamo too when checkpointing imports it), the live bytes of the step
(what the memory model's phases count) and what malloc keeps of freed memory. So each case runs
under one of four allocator settings (`ALLOCATORS`, engine/cpu_alloc.py):

- `auto` (the engine's default): the trainer re-executes itself with jemalloc preloaded (decay
  off, oversize_threshold 0): freed pages are kept per size class; the model counts that
  retention (engine/memory_shape.py ALLOCATOR_RETENTION);
- `reuse`: glibc keeps every freed block in the heap (mallopt), holes included;
- `system`: glibc's defaults (its dynamic mmap threshold moves blocks up to 32 MiB into the heap);
- `return`: `cpu_allocator: system` with glibc's mmap threshold fixed at 1 MiB and its trim
  threshold at 1 MiB (GLIBC_TUNABLES in the ranks' environment): every block of 1 MiB or more is
  mapped on allocation and unmapped on free, so the resident set is the baseline plus the live
  bytes (and a small heap). `alloc_speed` measures what each setting costs in step time.

and the process baseline is measured per allocator setting as `dsl probe --measure-baseline`
measures it on a host (`measure_baseline`, engine/baseline.py: the trainer on the `tiny` preset,
peak RSS less file pages minus the model's bytes of that tiny step, with and without
checkpointing), giving a second prediction: the model's peak with the measured baseline in place
of its runtime term, which is what `dsl plan` shows on a host whose baseline was measured
(without one, the plan's runtime is engine/memory_shape.py CPU_RUNTIME_BYTES, this measurement
on the machine named in docs/benchmarks.md).

`python tests/bench/peak.py [--only SUBSTRING] [--json FILE] [--parallel 2]`.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.bench.layout import cpu_model  # noqa: E402
from tests.bench.report import write_section  # noqa: E402
from dsl.engine.baseline import measure  # noqa: E402
from dsl.engine.cpu_alloc import JEMALLOC_CONF  # noqa: E402
from dsl.engine.memory_shape import ALLOCATOR_RETENTION, cpu_runtime_bytes, planned_allocator  # noqa: E402
from dsl.engine.presets import PRESETS  # noqa: E402

SMALL = {"preset": "bench"}
"""7.36M parameters: vocab 8192, hidden 256, 4 layers, seq 256 (engine/presets.py)."""
LARGE = {"vocab_size": 16384, "hidden_size": 512, "num_hidden_layers": 4, "num_attention_heads": 8,
         "num_key_value_heads": 4, "intermediate_size": 1376, "seq_len": 512, "tie_word_embeddings": False}
"""~30M parameters, seq 512: the embedding and head dominate less, activations more."""

FP32 = {"precision": "fp32"}
BF16 = {"precision": "bf16"}
CKPT = {"activation_checkpointing": True}
CONFIGS: list[tuple[str, dict, dict]] = [
    *((f"small s{s} fp32", SMALL, {"zero_stage": s, **FP32}) for s in range(4)),
    *((f"small s{s} bf16", SMALL, {"zero_stage": s, **BF16}) for s in range(4)),
    ("small s0 fp32 ckpt", SMALL, {"zero_stage": 0, **FP32, **CKPT}),
    ("small s2 fp32 ckpt", SMALL, {"zero_stage": 2, **FP32, **CKPT}),
    ("small s1 bf16 ckpt", SMALL, {"zero_stage": 1, **BF16, **CKPT}),
    ("small s3 bf16 ckpt", SMALL, {"zero_stage": 3, **BF16, **CKPT}),
    ("small s2 bf16 offload", SMALL, {"zero_stage": 2, **BF16, "offload": {"optimizer": "cpu"}}),
    ("small s2 fp32 sp2", SMALL, {"zero_stage": 2, **FP32, "sequence_parallel": 2, "grad_accum": 2}),
    ("small s2 fp32 tiled", SMALL, {"zero_stage": 2, **FP32, "tiled_loss": {"enabled": True, "chunk_tokens": 512},
                                    "tiled_mlp": {"enabled": True, "chunk_tokens": 512}}),
    ("small s2 bf16 lowprec", SMALL, {"zero_stage": 2, **BF16, "low_precision_states": True}),
    ("small s0 fp32 1bit", SMALL, {"zero_stage": 0, **FP32, "optimizer": {"type": "onebit_adam", "lr": 1e-3,
                                                                          "freeze_step": 2}}),
    ("large s0 fp32", LARGE, {"zero_stage": 0, **FP32, "micro_batch": 4}),
    ("large s2 bf16", LARGE, {"zero_stage": 2, **BF16, "micro_batch": 4}),
    ("large s2 fp32", LARGE, {"zero_stage": 2, **FP32, "micro_batch": 4}),
    ("large s3 fp32 ckpt", LARGE, {"zero_stage": 3, **FP32, "micro_batch": 4, **CKPT}),
]
"""21 configurations: 17 of the `bench` preset, 4 of a larger shape."""
RETURN_TUNABLES = "glibc.malloc.mmap_threshold=1048576:glibc.malloc.trim_threshold=1048576"
ALLOCATORS: dict[str, tuple[str, dict[str, str]]] = {
    "auto": ("auto", {}),
    "reuse": ("reuse", {}),
    "system": ("system", {}),
    "return": ("system", {"GLIBC_TUNABLES": RETURN_TUNABLES}),
}
"""Setting -> (engine.cpu_allocator, extra environment of the ranks); module docstring."""
SYSTEM_CONFIGS = {"small s2 fp32", "small s3 bf16 ckpt", "large s2 fp32", "large s3 fp32 ckpt"}
"""`system` runs for a few configurations only (its retention lies between the other two)."""
CASES: list[tuple[str, dict, dict, str]] = [
    (f"{name} {alloc}", model, engine, alloc) for name, model, engine in CONFIGS
    for alloc in ALLOCATORS if alloc != "system" or name in SYSTEM_CONFIGS]
STEPS = 4


def spec_for(name: str, model: dict, engine: dict, out: Path) -> dict:
    engine = {"micro_batch": 8, "grad_accum": 1, "optimizer": {"type": "adamw", "lr": 1e-3},
              "scheduler": {"type": "constant", "warmup_steps": 0}, **engine}
    return {"name": name.replace(" ", "-"),
            "run": {"train": {"model": model, "steps": STEPS, "log_every": 1, "seed": 0,
                              "checkpoint_every": STEPS // 2}},
            "resources": {"backend": "local", "procs_per_node": 2, "master_port": "auto"},
            "engine": engine, "output_dir": str(out), "max_restarts": 0}


def run_case(name: str, model: dict, engine: dict, alloc: str) -> dict:
    setting, env = ALLOCATORS[alloc]
    with tempfile.TemporaryDirectory(prefix="dsl-peak-") as tmp:
        out = Path(tmp) / "out"
        spec = Path(tmp) / "job.yaml"
        spec.write_text(yaml.safe_dump(spec_for(name, model, {**engine, "cpu_allocator": setting}, out),
                                       sort_keys=False))
        started = time.monotonic()
        # an empty cache: the plan's runtime term is the reference figure (engine/memory_shape.py),
        # not a baseline `dsl probe --measure-baseline` stored on this host; `calibrated` measures its own
        proc = subprocess.run([sys.executable, "-m", "dsl.launcher", "launch", str(spec)], capture_output=True,
                              text=True, timeout=1800,
                              env={**os.environ, **env, "DSL_CACHE_DIR": str(Path(tmp) / "cache")})
        if proc.returncode != 0:
            raise SystemExit(f"{name}: dsl launch exited {proc.returncode}:\n{proc.stderr[-3000:]}")
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    return {"case": name, "alloc": alloc, "peaks": last["host_peak_anon_bytes"], "vmhwm": last["host_peak_rss_bytes"],
            "predicted": last["predicted_peak_bytes"], "phase": last.get("predicted_peak_phase"),
            "seconds": time.monotonic() - started}


def measure_baseline(alloc: str) -> dict[tuple[str, bool], int]:
    """The process baseline under `alloc`, without and with checkpointing: what `dsl probe
    --measure-baseline` measures (engine/baseline.py), with the allocator's environment."""
    setting, env = ALLOCATORS[alloc]
    with tempfile.TemporaryDirectory(prefix="dsl-peak-base-") as tmp:
        b = measure(allocator=setting, environ={**os.environ, **env, "DSL_CACHE_DIR": tmp})
    return {(alloc, False): b.bytes, (alloc, True): b.checkpointing_bytes}


def live_peaks(results: list[dict]) -> None:
    """Add each configuration's live heap peak (tests/heap_measure.py: the engine alone, the same
    settings; allocator-independent) and the model's peak without its runtime term."""
    from tests.heap_measure import measure_heap, predicted_live

    for model in (SMALL, LARGE):
        configs = [(name, {"micro_batch": 8, "compile": False, **engine}) for name, m, engine in CONFIGS
                   if m is model and "onebit" not in str(engine) and "sequence_parallel" not in engine
                   and any(r["case"].startswith(name + " ") for r in results)]
        if not configs:
            continue
        shape = dict(PRESETS["bench"]) if model is SMALL else dict(model)
        ranks = measure_heap([dict(c) for _, c in configs], shape)
        for i, (name, case) in enumerate(configs):
            live = max(rank[i]["peak"] for rank in ranks)
            predicted = predicted_live(shape, case, dp=2 // case.get("sequence_parallel", 1))[0]
            for r in results:
                if r["case"].startswith(name + " "):
                    r["live"], r["live_predicted"] = live, predicted


def calibrated(r: dict, baselines: dict) -> int:
    """The case's prediction with the measured baseline in place of the runtime term."""
    ckpt = " ckpt " in r["case"] + " "
    return r["predicted"] - cpu_runtime_bytes(ckpt) + baselines[(r["alloc"], ckpt)]


def table(results: list[dict], baselines: dict) -> list[str]:
    lines = ["| configuration | allocator | peak phase | plan MiB | RSS rank 0 MiB | RSS rank 1 MiB "
             "| RSS / plan | calibrated MiB | RSS / calibrated (min, max rank) | live heap MiB | live / model live |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        cal = calibrated(r, baselines)
        live = (f"{r['live'] / 2**20:,.0f} | {r['live'] / r['live_predicted']:.3f}" if r.get("live")
                else "- | -")
        lines.append(f"| {r['case'].rsplit(' ', 1)[0]} | {r['alloc']} | {r['phase'] or '-'} | "
                     f"{r['predicted'] / 2**20:,.0f} | {r['peaks'][0] / 2**20:,.0f} | {r['peaks'][1] / 2**20:,.0f} | "
                     f"{max(r['peaks']) / r['predicted']:.3f} | {cal / 2**20:,.0f} | "
                     f"{min(r['peaks']) / cal:.3f}, {max(r['peaks']) / cal:.3f} | {live} |")
    return lines


def summary(results: list[dict], baselines: dict) -> list[str]:
    out = []
    for alloc in ALLOCATORS:
        rows = [r for r in results if r["alloc"] == alloc]
        if not rows:
            continue
        plan = [max(r["peaks"]) / r["predicted"] for r in rows]
        lo = [min(r["peaks"]) / calibrated(r, baselines) for r in rows]
        hi = [max(r["peaks"]) / calibrated(r, baselines) for r in rows]
        plan_lo = [min(r["peaks"]) / r["predicted"] for r in rows]
        within_plan = sum(1 for a, b in zip(plan_lo, plan) if a >= 0.9 and b <= 1.1)
        within = sum(1 for a, b in zip(lo, hi) if a >= 0.9 and b <= 1.1)
        out.append(f"- `{alloc}` ({len(rows)} cases): RSS / plan {min(plan_lo):.3f} to {max(plan):.3f}, both ranks "
                   f"within +-10% of the plan in {within_plan} of {len(rows)}; RSS / calibrated {min(lo):.3f} to "
                   f"{max(hi):.3f}, both ranks within +-10% in {within} of {len(rows)}.")
    return out


STEP_WORKER = r"""
import json, sys, time, torch
from dsl.engine import dist, initialize
from dsl.engine.model import Llama
from dsl.engine.peak import host_peak_anon_bytes
from dsl.engine.train_config import ModelConfig
case, model, steps = json.loads(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(1)
ctx = dist.setup()
cfg = ModelConfig(**model)
torch.manual_seed(0)
engine = initialize(Llama(cfg), case)
g = torch.Generator().manual_seed(ctx.rank)
tokens = torch.randint(cfg.vocab_size, (case["micro_batch"], cfg.seq_len), generator=g)
targets = torch.randint(cfg.vocab_size, (case["micro_batch"], cfg.seq_len), generator=g)
cpu, peaks = [], []
for i in range(steps):
    start = time.process_time()
    engine(tokens, targets).backward()
    engine.step()
    engine.zero_grad()
    cpu.append(time.process_time() - start)
    peaks.append(host_peak_anon_bytes())
print("RESULT " + json.dumps({"cpu": cpu, "peaks": peaks}), flush=True)
dist.teardown(ctx)
from dsl.engine.train import exit_now  # as a dsl rank ends: no C++ static destructors
exit_now(0)
"""
"""Trains `steps` steps of one case on a rank and prints each step's CPU seconds (its process
time) and the rank's peak resident set less file pages after it (engine/peak.py)."""
SPEED_CASES = [("small s2 fp32", SMALL, {"zero_stage": 2, **FP32}), ("small s2 bf16", SMALL, {"zero_stage": 2, **BF16}),
               ("large s2 fp32", LARGE, {"zero_stage": 2, **FP32, "micro_batch": 4})]


GROWTH_CASE = ("small s2 fp32", SMALL, {"zero_stage": 2, **FP32})
GROWTH_SHOWN = (1, 2, 4, 8, 16, 32)
"""The steps whose peak the growth table shows (up to --growth-steps)."""


def growth(steps: int) -> list[dict]:
    """Each rank's peak resident set (less file pages) after every one of `steps` steps, per
    allocator setting, the settings' process pairs running at the same time: whether the peak a
    few steps reach is the run's peak."""
    name, model, engine = GROWTH_CASE
    shape = dict(PRESETS["bench"]) if model is SMALL else dict(model)
    out = []
    for alloc, found in _run_pairs(name, engine, shape, steps).items():
        ranks = [r["peaks"] for r in found]
        out.append({"case": name, "alloc": alloc, "peaks": [max(r[i] for r in ranks) for i in range(steps)]})
        print(f"growth {name} {alloc}: " + ", ".join(f"{p / 2**20:,.0f}" for p in out[-1]["peaks"]) + " MiB",
              file=sys.stderr, flush=True)
    return out


def growth_lines(rows: list[dict]) -> list[str]:
    if not rows:
        return ["not measured in this run."]
    steps = len(rows[0]["peaks"])
    shown = [s for s in GROWTH_SHOWN if s <= steps]
    lines = ["| allocator | " + " | ".join(f"after step {s} MiB" for s in shown)
             + f" | last / step {min(STEPS, steps)} |",
             "|---|" + "---|" * (len(shown) + 1)]
    for r in rows:
        p = r["peaks"]
        lines.append(f"| {r['alloc']} | " + " | ".join(f"{p[s - 1] / 2**20:,.0f}" for s in shown)
                     + f" | {p[-1] / p[min(STEPS, steps) - 1]:.2f} |")
    return lines


def _run_pairs(name: str, engine: dict, shape: dict, steps: int) -> dict[str, list[dict]]:
    """STEP_WORKER's result on each of 2 ranks, per allocator setting, every setting's pair
    running at the same time (so the machine's load hits them alike)."""
    pairs = {alloc: _start_pair({"micro_batch": 8, "compile": False, **engine, "cpu_allocator": setting},
                                shape, steps, _preloaded(setting, env))
             for alloc, (setting, env) in ALLOCATORS.items()}
    found = {}
    for alloc, procs in pairs.items():
        outs = [p.communicate(timeout=1800)[0] for p in procs]
        if any(p.returncode for p in procs):
            raise SystemExit(f"{name} {alloc}: a rank failed")
        found[alloc] = [json.loads(o.split("RESULT ", 1)[1]) for o in outs]
    return found


def _start_pair(case: dict, model: dict, steps: int, env: dict) -> list[subprocess.Popen]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return [subprocess.Popen([sys.executable, "-c", STEP_WORKER, json.dumps(case), json.dumps(model), str(steps)],
                             env={**os.environ, **env, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
                                  "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                                  "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, text=True, cwd=ROOT)
            for rank in range(2)]


def _preloaded(setting: str, env: dict) -> dict:
    """The speed worker calls initialize() itself (no trainer to re-execute it): under `auto` it is
    started with the environment the trainer would re-execute with (jemalloc preloaded)."""
    from dsl.engine import cpu_alloc

    return cpu_alloc.preload_env(setting, {}, cpu_alloc.find_jemalloc()) or env if setting == "auto" else env


def alloc_speed(steps: int, rounds: int) -> list[dict]:
    """CPU seconds per training step (median over `steps`, rank 0's process time: all its threads,
    the kernel's page faults included, robust to other load on the machine) of each allocator
    setting, the settings' process pairs running at the same time, `rounds` times."""
    out = []
    for name, model, engine in SPEED_CASES:
        shape = dict(PRESETS["bench"]) if model is SMALL else dict(model)
        for _ in range(rounds):
            cpu = {alloc: statistics.median(ranks[0]["cpu"][2:])
                   for alloc, ranks in _run_pairs(name, engine, shape, steps + 2).items()}
            out.append({"case": name, **cpu})
            print(f"speed {name}: " + ", ".join(f"{a} {c:.3f} s" for a, c in cpu.items()), file=sys.stderr, flush=True)
    return out


def ratio_range(results: list[dict], alloc: str, plan: bool = False, baselines: dict | None = None) -> str:
    rows = [r for r in results if r["alloc"] == alloc]
    lo = [min(r["peaks"]) / (r["predicted"] if plan else calibrated(r, baselines)) for r in rows]
    hi = [max(r["peaks"]) / (r["predicted"] if plan else calibrated(r, baselines)) for r in rows]
    return f"{min(lo):.2f}-{max(hi):.2f}x"


def retention_range(results: list[dict], baselines: dict, alloc: str = "auto") -> str:
    """What `alloc` kept beyond the live bytes, as a share of them, over its cases and ranks: each
    rank's RSS less the measured baseline and the model's live peak (the plan less its runtime and
    retention terms), over that live peak; "lo-hi% (median m%)"."""
    share = ALLOCATOR_RETENTION.get(planned_allocator(ALLOCATORS[alloc][0]), 0.0)
    found = []
    for r in results:
        if r["alloc"] != alloc:
            continue
        ckpt = " ckpt " in r["case"] + " "
        live = (r["predicted"] - cpu_runtime_bytes(ckpt)) / (1 + share)
        found += [(p - baselines[(alloc, ckpt)] - live) / live for p in r["peaks"]]
    if not found:
        return "not measured"
    found.sort()
    return f"{found[0]:.0%}-{found[-1]:.0%} (median {found[len(found) // 2]:.0%})"


def rank_spread(results: list[dict]) -> float:
    """The largest difference between the two ranks of one case, over the smaller rank."""
    return max(max(r["peaks"]) / min(r["peaks"]) - 1 for r in results)


def speed_summary(speed: list[dict]) -> str:
    if not speed:
        return "not measured in this run."
    ratios = {a: [r[a] / r["reuse"] for r in speed] for a in ALLOCATORS if a != "reuse"}
    return ", ".join(f"`{a}` {min(v):.2f}-{max(v):.2f}x" for a, v in ratios.items()) + \
        " the CPU time of `reuse` per step."


def speed_lines(speed: list[dict]) -> list[str]:
    others = [a for a in ALLOCATORS if a != "reuse"]
    lines = ["| configuration | reuse CPU s/step | " + " | ".join(f"{a} / reuse" for a in others) + " |",
             "|---|---|" + "---|" * len(others)]
    for r in speed:
        lines.append(f"| {r['case']} | {r['reuse']:.3f} | " + " | ".join(f"{r[a] / r['reuse']:.2f}" for a in others) + " |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default="")
    parser.add_argument("--json", default="")
    parser.add_argument("--speed-steps", type=int, default=8, help="steps per allocator speed run (0: none)")
    parser.add_argument("--speed-rounds", type=int, default=2)
    parser.add_argument("--from-json", default="", help="write the section from a --json file of an earlier run")
    parser.add_argument("--growth-steps", type=int, default=32, help="steps of the peak-growth run (0: none)")
    parser.add_argument("--growth-only", default="", help="run the growth part only and add it to this --json file")
    parser.add_argument("--parallel", type=int, default=2,
                        help="cases at once (peaks are per process, so concurrency does not change them)")
    args = parser.parse_args()
    if args.growth_only:
        saved = json.loads(Path(args.growth_only).read_text())
        saved["growth"] = growth(args.growth_steps)
        Path(args.growth_only).write_text(json.dumps(saved, indent=1))
        return 0
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        baselines = {(alloc, ckpt): b for alloc, ckpt, b in saved["baselines"]}
        write_section("peak", "Peak memory: measured per rank against the model's peak",
                      "python tests/bench/peak.py --json FILE; python tests/bench/peak.py --from-json FILE",
                      "\n".join(body(saved["results"], baselines, table(saved["results"], baselines),
                                     saved.get("speed", []), saved.get("growth", []))))
        return 0
    cases = [c for c in CASES if not args.only or args.only in c[0]]
    allocs = sorted({c[3] for c in cases})
    with ThreadPoolExecutor(args.parallel) as pool:
        baselines = {k: v for found in pool.map(measure_baseline, allocs) for k, v in found.items()}
        for (alloc, ckpt), b in baselines.items():
            print(f"baseline {alloc}{' ckpt' if ckpt else ''}: {b / 2**20:,.0f} MiB", file=sys.stderr, flush=True)

        def one(case: tuple) -> dict:
            r = run_case(*case)
            print(f"{r['case']}: plan {r['predicted'] / 2**20:,.0f} MiB, calibrated "
                  f"{calibrated(r, baselines) / 2**20:,.0f} MiB, peaks {', '.join(f'{p / 2**20:,.0f}' for p in r['peaks'])}"
                  f" MiB; {r['seconds']:.0f} s", file=sys.stderr, flush=True)
            return r

        results = list(pool.map(one, cases))
    if args.json:  # kept before the slower parts below
        Path(args.json).write_text(json.dumps({"results": results, "baselines": [[*k, v] for k, v in baselines.items()]}))
    live_peaks(results)
    speed = alloc_speed(args.speed_steps, args.speed_rounds) if args.speed_steps else []
    grown = growth(args.growth_steps) if args.growth_steps else []
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "speed": speed, "growth": grown,
                                               "baselines": [[*k, v] for k, v in baselines.items()]}, indent=1))
    lines = table(results, baselines)
    print("\n".join(lines))
    print("\n".join(summary(results, baselines)))
    if not args.only:
        write_section("peak", "Peak memory: measured per rank against the model's peak", "python tests/bench/peak.py",
                      "\n".join(body(results, baselines, lines, speed, grown)))
    return 0


def body(results: list[dict], baselines: dict, lines: list[str], speed: list[dict],
         grown: list[dict] | None = None) -> list[str]:
    base = ", ".join(f"{alloc}{' + checkpointing' if ckpt else ''} {b / 2**20:,.0f} MiB"
                     for (alloc, ckpt), b in baselines.items())
    glibc = [r for r in results if r["alloc"] in ("reuse", "system")]
    return [
        f"CPU: {cpu_model()}. {len(results)} cases ({len(CONFIGS)} configurations x allocator settings), 2 gloo "
        f"ranks, {STEPS} steps with a checkpoint save, each case a `dsl launch` of the bundled trainer. plan: "
        "`predicted_peak_bytes` of metrics.jsonl (the memory model's peak by phase, engine/memory_peak.py, for the "
        "allocator the rank runs with: the figure `dsl plan` shows) and its phase; RSS: each rank's peak resident "
        "set less its file-backed pages (`host_peak_anon_bytes`, engine/peak.py: VmHWM less the mapped libraries, "
        "whose resident share depends on the page cache: the same torch wheel's libtorch_cpu.so was 49 MB resident "
        "in one install and 97 MB in a fresh one). "
        "The plan's runtime term is the reference process baseline (engine/memory_shape.py: "
        f"{cpu_runtime_bytes(False) / 2**20:,.0f} MiB, {cpu_runtime_bytes(True) / 2**20:,.0f} MiB with activation "
        "checkpointing, which imports torch._dynamo; the ranks ran with an empty dsl cache); calibrated: the same "
        "model with the baseline `dsl probe --measure-baseline` measures on this host in its place (engine/baseline.py, "
        f"measured by this run per allocator: {base}). live heap: the engine alone with "
        "the same settings, glibc's in-use bytes sampled through a step (tests/heap_measure.py), against the "
        "model's peak without the runtime and allocator terms (1-bit and sp rows not measured there). "
        "Allocators (engine/cpu_alloc.py): `auto` = the default: each rank re-executed with jemalloc preloaded "
        f"(`MALLOC_CONF={JEMALLOC_CONF}`), the model adding its retention (15% of the live peak); `reuse` = glibc "
        "keeping every freed block (mallopt); `system` = glibc defaults; `return` = `cpu_allocator: system` with "
        f"`GLIBC_TUNABLES={RETURN_TUNABLES}` in the ranks' environment (blocks of 1 MiB or more mapped and "
        "unmapped with their tensors).", "",
        *lines, "",
        *summary(results, baselines), "",
        "What the figures say. The resident set is the process baseline, the live bytes and what malloc keeps. "
        f"Under the default (`auto`: jemalloc) the two ranks of a case peak within a few MiB of each other and "
        f"within {ratio_range(results, 'auto', plan=True)} the plan: jemalloc keeps freed memory per size class, "
        "so a block of one size never lands in the hole of another, and what it keeps (its size classes' "
        f"rounding and the extents of each class) is a share of the live bytes, measured {retention_range(results, baselines)} over these "
        "configurations (the model's 15% sits in that range). Under `return` nothing large is kept: RSS is "
        f"the baseline plus the model's live peak ({ratio_range(results, 'return', plan=True)} the plan). (The "
        "tiled row was 1.13x until 2026-12-06: the tiled MLP's backward called torch.autograd.grad with an "
        "output gradient, which imports torch.fx's symbolic shapes, sympy and mpmath: 12 MiB of modules resident "
        "in every rank that no term counts; engine/long/tiled_mlp.py now differentiates a scalar instead.) "
        "Under `reuse` and `system` glibc's heap keeps the "
        "holes freed blocks leave, which depend on the order of allocations (a 64 MiB logits block that no "
        "longer fits its old place extends the heap by 64 MiB at a time) and on when the communication threads "
        f"free their buffers: the two ranks of one case differ by up to {rank_spread(glibc):.0%} "
        f"(RSS {ratio_range(results, 'reuse', plan=True)} the plan under `reuse`), so the model does not count "
        "them and says so (`allocator retention: not counted`), and `dsl plan` notes a CPU host whose probe "
        "found no libjemalloc.so.2.", "",
        f"What each setting costs in step time: {speed_summary(speed)} CPU seconds per step of rank 0 (its "
        "process time: every thread, the kernel's page faults included; the median of the steps after 2 "
        "warm-up steps), eager, the settings' process pairs running at the same time (so the machine's load "
        "hits them alike), each row one such round:", "",
        *speed_lines(speed), "",
        *growth_text(grown or [])]


def growth_text(rows: list[dict]) -> list[str]:
    """Whether a case's 4 steps reach the run's peak: the growth run's table and what it says."""
    if not rows:
        return []
    steps = len(rows[0]["peaks"])
    ratio = {r["alloc"]: r["peaks"][-1] / r["peaks"][min(STEPS, steps) - 1] for r in rows}
    held = [a for a, x in ratio.items() if x <= 1.01]
    grew = [f"`{a}` {x:.2f}x" for a, x in ratio.items() if x > 1.01]
    return [
        f"Is the peak of {STEPS} steps the run's peak? `{GROWTH_CASE[0]}` trained {steps} steps under each setting "
        "(the settings' process pairs at the same time; the larger rank's peak resident set less file pages "
        "after each step, `host_peak_anon_bytes`):", "",
        *growth_lines(rows), "",
        f"After {steps} steps the peak is that of step {STEPS} under "
        + (", ".join(f"`{a}`" for a in held) or "no setting") + " (within 1%)"
        + (f"; it kept growing under {', '.join(grew)}: glibc's heap extends by a logits-sized block whenever "
           "one no longer fits the holes, so the table above understates those settings' peak in a long run"
           if grew else "") + "."]


if __name__ == "__main__":
    sys.exit(main())
