"""`make bench`: every engine on the same job, side by side in one run; writes docs/benchmarks.md.

Variants (2 gloo ranks, 1 thread each, AdamW; shapes in engine_step.SHAPES):
dsl at ZeRO stages 0-3 as it runs by default (decoder layers under torch.compile, `engine.compile:
auto`), DeepSpeed 0.19.8 at stages 0-3 as it runs by default (eager; its own virtualenv, see
setup_deepspeed.sh), torch DDP (stage 0's peer), FSDP2 (stage 3's peer) and `local` (no engine,
no communication: the ceiling of any data-parallel engine here). The peers and `local` get the
same per-layer torch.compile as dsl (the strongest version of each). On the `bench` shape two more
columns separate the engine from the compiler: DeepSpeed with the same per-layer compile, and dsl
with `compile: false`. The `bench` shape (the peer
baseline of shared/docs/FACTS.md) runs in fp32 and bf16, the communication-heavy `comm` shape in
fp32. Ratios compare dsl with each peer on the same shape, stage and precision. Differences under
~5% are noise on this machine (shared/docs/FACTS.md).

Before the engines, a probe measures one-thread GEMM throughput in fp32 and bf16 and lists the
CPU's bf16/AMX flags: whether bf16 can be faster than fp32 on this machine at all.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
STEP = ROOT / "tests/bench/engine_step.py"


SHAPE_TEXT = {
    "bench": "model preset `bench` (vocab 8192, hidden 256, 4 layers, 8 heads, SwiGLU 688, seq 256; "
             "7.36M parameters), micro-batch 8 per rank",
    "comm": "communication-heavy: vocab 32000, hidden 512, 4 layers, 8 heads, SwiGLU 1376, seq 128 "
            "(45.4M parameters), micro-batch 2 per rank",
}
PRECISIONS = {"bench": ("fp32", "bf16"), "comm": ("fp32",)}
EXTRA_SHAPES = {"bench"}
"""Shapes that also run DeepSpeed with per-layer compile and dsl with compile: false."""

PROBE = r"""
import json, time, torch
torch.set_num_threads(1)
def gflops(dtype, m=2048, k=1024, n=1024):
    a, w = torch.randn(m, k).to(dtype), torch.randn(n, k).to(dtype)
    for _ in range(3):
        torch.nn.functional.linear(a, w)
    best = min(_timed(lambda: torch.nn.functional.linear(a, w)) for _ in range(5))
    return 2 * m * k * n / best / 1e9
def _timed(f):
    t = time.perf_counter(); f(); return time.perf_counter() - t
flags = open("/proc/cpuinfo").read().split("flags")[1].splitlines()[0].split()
print(json.dumps({"fp32_gflops": gflops(torch.float32), "bf16_gflops": gflops(torch.bfloat16),
                  "cpu_flags": sorted(f for f in flags if "bf16" in f or f.startswith("amx")),
                  "torch": torch.__version__}))
"""


def probe_gemm(python: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([python, "-c", PROBE], capture_output=True, text=True, env=env, timeout=300)
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]}


def run_variant(python: str, impl: str, stage: int, precision: str, steps: int, warmup: int,
                shape: str = "bench", compile: str = "on") -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    argv = [python, "-m", "torch.distributed.run", "--nproc-per-node=2", "--rdzv-backend=c10d",
            "--rdzv-endpoint=localhost:0", str(STEP), "--impl", impl, "--stage", str(stage),
            "--precision", precision, "--steps", str(steps), "--warmup", str(warmup), "--shape", shape,
            "--compile", compile]
    started = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=1800, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH "):
            result = json.loads(line[6:])
            result["wall_s"] = time.monotonic() - started
            return result
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"impl": impl, "stage": stage, "precision": precision, "shape": shape, "compile": compile,
            "error": f"exit {proc.returncode}: {tail[:200]}"}


def _fmt_tps(r: dict | None) -> str:
    if r is None:
        return "-"
    return f"{r['tokens_per_s']:,.0f}" if "tokens_per_s" in r else f"n/a ({r.get('error', '?')[:60]})"


def _ratio(a: dict | None, b: dict | None) -> str:
    if not a or not b or "tokens_per_s" not in a or "tokens_per_s" not in b:
        return "-"
    return f"{a['tokens_per_s'] / b['tokens_per_s']:.2f}x"


def _gib(r: dict | None) -> str:
    return f"{r['peak_rss_bytes'] / 2**30:.2f}" if r and "peak_rss_bytes" in r else "-"


def table(results: list[dict], shape: str = "bench") -> str:
    def get(impl, stage, precision, compile="on"):
        return next((r for r in results if r["impl"] == impl and r["stage"] == stage
                     and r["precision"] == precision and r.get("shape", "bench") == shape
                     and r.get("compile", "on") == compile), None)

    extra = shape in EXTRA_SHAPES
    head = ["precision", "stage", "dsl tok/s", "DeepSpeed tok/s", "dsl/DS"]
    if extra:
        head += ["DS+compile tok/s", "dsl/DS+compile", "dsl eager tok/s", "dsl eager/DS"]
    head += ["peer", "peer tok/s", "dsl/peer", "no-comm tok/s", "dsl/no-comm", "dsl peak GiB", "DS peak GiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for precision in PRECISIONS[shape]:
        local = get("local", 0, precision)
        for stage in range(4):
            dsl, ds = get("dsl", stage, precision), get("deepspeed", stage, precision, "off")
            row = [precision, str(stage), _fmt_tps(dsl), _fmt_tps(ds), _ratio(dsl, ds)]
            if extra:
                ds_c, eager = get("deepspeed", stage, precision), get("dsl", stage, precision, "off")
                row += [_fmt_tps(ds_c), _ratio(dsl, ds_c), _fmt_tps(eager), _ratio(eager, ds)]
            peer_name = "FSDP2" if stage == 3 else "DDP"
            peer = get("fsdp2" if stage == 3 else "ddp", 3 if stage == 3 else 0, precision)
            row += [peer_name, _fmt_tps(peer), _ratio(dsl, peer), _fmt_tps(local), _ratio(dsl, local),
                    _gib(dsl), _gib(ds)]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _bf16_note(probe: dict, gemm: str) -> str:
    """What this CPU does with bf16 (machines differ: the probe says which kind ran the table)."""
    fp32, bf16 = probe.get("fp32_gflops"), probe.get("bf16_gflops")
    amx = any(f.startswith("amx") for f in probe.get("cpu_flags", []))
    if fp32 and bf16 and bf16 > 1.2 * fp32:
        return (f"- bf16 GEMMs run {bf16 / fp32:.1f}x as fast as fp32 on this CPU ({gemm}"
                + (", AMX tiles" if amx else "") + "): the bf16 rows are faster where matmuls dominate; "
                "the rest of a step (norms, softmax, optimizer on fp32 masters, communication) is not.")
    return (f"- bf16 is not faster than fp32 on this CPU ({gemm}): without AMX, AVX-512 BF16 has one "
            "VDPBF16PS port (the same FLOPs per cycle as two fp32 FMA ports), so oneDNN's bf16 GEMM "
            "cannot beat MKL's fp32 GEMM, and autocast adds the casts. It is not a harness setting "
            "(same threads, same autocast for every engine).")


def notes(probe: dict) -> str:
    fp32, bf16 = probe.get("fp32_gflops"), probe.get("bf16_gflops")
    gemm = (f"{bf16:.0f} GFLOP/s bf16 vs {fp32:.0f} fp32 per core in this run's probe"
            if fp32 and bf16 else "see the probe below")
    return "\n".join([
        "Notes:",
        "- Compilation: dsl runs as it does by default (`engine.compile: auto`: each decoder layer's "
        "forward under torch.compile, engine/compile.py); DeepSpeed runs as it does by default "
        "(eager). Because that is where most of dsl's lead on the compute-bound `bench` shape comes "
        "from, two more columns separate engine from compiler: DS+compile gives DeepSpeed exactly "
        "the same per-layer torch.compile (dsl/DS+compile), and dsl eager is dsl with "
        "`compile: false` (dsl eager/DS: engine against engine, both eager). DDP, FSDP2 and the "
        "no-comm run get the same per-layer compile as dsl.",
        "- `bench` is compute-bound: the no-comm column is what the same (compiled) forward, "
        "backward and AdamW cost without any communication. An engine can only remove "
        "communication and copies, so no engine can be faster than that column; dsl/no-comm "
        "shows how close dsl is.",
        _bf16_note(probe, gemm),
        "- `comm` moves 6x the parameters for 1/8 of the tokens: gradient exchange and parameter "
        "gathers cost about as much as compute, so the engines' communication plans show. dsl "
        "builds its reduce-scatter and all-gather from point-to-point messages and broadcasts on "
        "gloo (engine/zero/collectives.py), which are 2-5x cheaper than gloo's "
        "reduce_scatter/all_gather collectives that the peers use.",
    ])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--deepspeed-python", default=str(ROOT / ".venv-bench/bin/python"))
    parser.add_argument("--out", default=str(ROOT / "docs/benchmarks.md"))
    parser.add_argument("--shapes", default="bench,comm", help="comma-separated engine_step.SHAPES")
    parser.add_argument("--render", metavar="LOG", default=None,
                        help="rebuild the tables from LOG (this script's stderr: the probe's JSON line, "
                             "then one per variant) instead of running anything")
    args = parser.parse_args()
    if args.render:
        lines = [json.loads(ln) for ln in Path(args.render).read_text().splitlines() if ln.startswith("{")]
        probe = next(r for r in lines if "fp32_gflops" in r or ("error" in r and "impl" not in r))
        results = [r for r in lines if "impl" in r]
        shapes = sorted({r.get("shape", "bench") for r in results}, key=list(SHAPE_TEXT).index)
        return _write(results, probe, shapes, args)
    if args.steps < 20:
        parser.error(f"--steps {args.steps}: use at least 20 measured steps (the median needs them)")
    shapes = [s for s in args.shapes.split(",") if s]
    plan = [(sys.executable, "local", 0, "on"), (sys.executable, "ddp", 0, "on"), (sys.executable, "fsdp2", 3, "on")]
    plan += [(sys.executable, "dsl", s, "on") for s in range(4)]
    plan += [(args.deepspeed_python, "deepspeed", s, "off") for s in range(4)]
    extra = [(args.deepspeed_python, "deepspeed", s, "on") for s in range(4)]
    extra += [(sys.executable, "dsl", s, "off") for s in range(4)]
    probe = probe_gemm(sys.executable)
    print(json.dumps(probe), file=sys.stderr, flush=True)
    results = []
    for shape in shapes:
        for precision in PRECISIONS[shape]:
            for python, impl, stage, compile in plan + (extra if shape in EXTRA_SHAPES else []):
                result = run_variant(python, impl, stage, precision, args.steps, args.warmup, shape, compile)
                print(json.dumps(result), file=sys.stderr, flush=True)
                results.append(result)
    return _write(results, probe, shapes, args)


def _write(results: list[dict], probe: dict, shapes: list[str], args: argparse.Namespace) -> int:
    tables = []
    for shape in shapes:
        text = table(results, shape)
        print(text)
        tables.append(f"### Shape `{shape}`: {SHAPE_TEXT[shape]}\n\n{text}\n")
    body = ("2 gloo ranks, 1 thread per rank, AdamW (lr 1e-3, no clipping), median of "
            f"{args.steps} steps after {args.warmup} warm-up steps. tokens/s count all ranks. "
            "Peak = the largest rank's peak resident memory (importing torch.compile's modules adds 0.1-0.2 GiB to "
            "every compiled run). no-comm = `local`: each rank trains its own replica (same compiled "
            "layers) with torch's fused AdamW and communicates nothing, the ceiling of any "
            "data-parallel engine on this machine. Differences under ~5% are run-to-run noise here.\n\n"
            + "\n".join(tables) + "\n" + notes(probe) + "\n\nGEMM probe (1 thread, 2048x1024x1024): "
            + json.dumps(probe) + "\n\nRaw results:\n\n```\n"
            + "\n".join(json.dumps(r) for r in results) + "\n```\n")
    command = "make bench  (python tests/bench/run.py)"
    if args.render:
        command += f"; tables rebuilt from that run's log with `python tests/bench/run.py --render LOG`"
    write_section("engine", "Engine step: dsl vs DeepSpeed 0.19.8, DDP, FSDP2", command, body, Path(args.out))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
