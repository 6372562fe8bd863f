"""`make bench`: every engine on the same job, side by side in one run; writes docs/benchmarks.md.

Variants (2 gloo ranks, 1 thread each, AdamW; shapes in engine_step.SHAPES):
dsl at ZeRO stages 0-3, DeepSpeed 0.19.8 at stages 0-3 (its own virtualenv, see
setup_deepspeed.sh), torch DDP (stage 0's peer), FSDP2 (stage 3's peer) and `local` (no engine,
no communication: the ceiling of any data-parallel engine here). Everything runs eager, as each
engine does by default (dsl's `engine.compile` is off by default; `engine_step.py --compile on`
measures it). The `bench` shape (the peer baseline of shared/docs/FACTS.md) runs in fp32 and
bf16, the communication-heavy `comm` shape in fp32. Ratios compare dsl with each peer on the
same shape, stage and precision.

Rounds: this machine's speed drifts by 10-30% over tens of seconds (other tenants of the host),
so one run per variant would compare variants measured at different moments. Every variant runs
`--rounds` times (default 2), all variants once per round, each round in the reverse order of the
previous one; a variant's figure is the median over the steps of all its rounds (`steps_s`), and
the raw results keep each round's tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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
                shape: str = "bench", compile: str = "off") -> dict:
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


def combine(rounds: list[dict]) -> dict:
    """One variant's figure from its rounds: the median of all their measured steps."""
    ok = [r for r in rounds if "steps_s" in r]
    if not ok:
        return rounds[-1]  # every round failed (or predates steps_s): its error or figures as they are
    steps = sorted(t for r in ok for t in r["steps_s"])
    median = statistics.median(steps)
    tokens_per_step = ok[0]["tokens_per_s"] * ok[0]["step_s"]
    out = {k: v for k, v in ok[0].items() if k not in ("steps_s", "round", "wall_s")}
    out.update(step_s=median, tokens_per_s=tokens_per_step / median, step_s_min=steps[0],
               peak_rss_bytes=max(r["peak_rss_bytes"] for r in ok),
               cpu_s=statistics.median(r["cpu_s"] for r in ok), final_loss=ok[-1]["final_loss"],
               rounds_tokens_per_s=[round(r["tokens_per_s"]) for r in ok])
    return out


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
    def get(impl, stage, precision):
        return next((r for r in results if r["impl"] == impl and r["stage"] == stage
                     and r["precision"] == precision and r.get("shape", "bench") == shape
                     and r.get("compile", "off") == "off"), None)

    lines = ["| precision | stage | dsl tok/s | DeepSpeed tok/s | dsl/DS | peer | peer tok/s | dsl/peer "
             "| no-comm tok/s | dsl/no-comm | dsl peak GiB | DS peak GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for precision in PRECISIONS[shape]:
        local = get("local", 0, precision)
        for stage in range(4):
            dsl, ds = get("dsl", stage, precision), get("deepspeed", stage, precision)
            peer_name = "FSDP2" if stage == 3 else "DDP"
            peer = get("fsdp2" if stage == 3 else "ddp", 3 if stage == 3 else 0, precision)
            lines.append(f"| {precision} | {stage} | {_fmt_tps(dsl)} | {_fmt_tps(ds)} | {_ratio(dsl, ds)} "
                         f"| {peer_name} | {_fmt_tps(peer)} | {_ratio(dsl, peer)} | {_fmt_tps(local)} "
                         f"| {_ratio(dsl, local)} | {_gib(dsl)} | {_gib(ds)} |")
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


def _spread_note(results: list[dict]) -> str:
    """How far apart the rounds of one variant came out in this run (the noise floor of a ratio)."""
    spreads = []
    for r in results:
        rounds = r.get("rounds_tokens_per_s") or []
        if len(rounds) > 1 and min(rounds) > 0:
            spreads.append((max(rounds) / min(rounds) - 1, f"{r['impl']} stage {r['stage']} {r['precision']} "
                            f"{r.get('shape', 'bench')}"))
    if not spreads:
        return ""
    spreads.sort()
    median = spreads[len(spreads) // 2][0]
    worst = spreads[-1]
    return (f"- Noise in this run: the rounds of one variant differ by {median:.0%} (median over variants) "
            f"and up to {worst[0]:.0%} ({worst[1]}), with nothing else running. A ratio between two "
            "variants is only as good as that: compare the per-round figures in the raw results before "
            "reading a difference smaller than the spread.")


def notes(probe: dict, results: list[dict] | None = None) -> str:
    fp32, bf16 = probe.get("fp32_gflops"), probe.get("bf16_gflops")
    gemm = (f"{bf16:.0f} GFLOP/s bf16 vs {fp32:.0f} fp32 per core in this run's probe"
            if fp32 and bf16 else "see the probe below")
    return "\n".join([
        "Notes:",
        "- `bench` is compute-bound: the no-comm column is what the same forward, "
        "backward and AdamW cost without any communication. An engine can only remove "
        "communication and copies, so no engine can be faster than that column; dsl/no-comm "
        "shows how close dsl is.",
        _bf16_note(probe, gemm),
        "- `comm` moves 6x the parameters for 1/8 of the tokens: gradient exchange and parameter "
        "gathers cost about as much as compute, so the engines' communication plans show. dsl "
        "builds its reduce-scatter and all-gather from point-to-point messages and broadcasts on "
        "gloo (engine/zero/collectives.py), which are 2-5x cheaper than gloo's "
        "reduce_scatter/all_gather collectives that the peers use.",
        _spread_note(results or []),
    ])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--deepspeed-python", default=str(ROOT / ".venv-bench/bin/python"))
    parser.add_argument("--out", default=str(ROOT / "docs/benchmarks.md"))
    parser.add_argument("--shapes", default="bench,comm", help="comma-separated engine_step.SHAPES")
    parser.add_argument("--rounds", type=int, default=2, help="runs of every variant, interleaved")
    parser.add_argument("--render", metavar="LOG", default=None,
                        help="rebuild the tables from LOG (this script's stderr: the probe's JSON line, "
                             "then one per variant) instead of running anything")
    args = parser.parse_args()
    if args.render:
        lines = [json.loads(ln) for ln in Path(args.render).read_text().splitlines() if ln.startswith("{")]
        probe = next(r for r in lines if "fp32_gflops" in r or ("error" in r and "impl" not in r))
        grouped: dict[tuple, list[dict]] = {}
        for r in lines:
            if "impl" in r:
                key = (r["impl"], r["stage"], r["precision"], r.get("shape", "bench"), r.get("compile", "off"))
                grouped.setdefault(key, []).append(r)
        results = [combine(rs) for rs in grouped.values()]
        shapes = sorted({r.get("shape", "bench") for r in results}, key=list(SHAPE_TEXT).index)
        return _write(results, probe, shapes, args)
    if args.steps < 20:
        parser.error(f"--steps {args.steps}: use at least 20 measured steps (the median needs them)")
    shapes = [s for s in args.shapes.split(",") if s]
    plan = [(sys.executable, "local", 0), (sys.executable, "ddp", 0), (sys.executable, "fsdp2", 3)]
    plan += [(sys.executable, "dsl", s) for s in range(4)]
    plan += [(args.deepspeed_python, "deepspeed", s) for s in range(4)]
    variants = [(python, impl, stage, precision, shape) for shape in shapes for precision in PRECISIONS[shape]
                for python, impl, stage in plan]
    probe = probe_gemm(sys.executable)
    print(json.dumps(probe), file=sys.stderr, flush=True)
    runs: dict[int, list[dict]] = {i: [] for i in range(len(variants))}
    for round_ in range(args.rounds):
        order = list(range(len(variants)))
        for i in order if round_ % 2 == 0 else order[::-1]:
            python, impl, stage, precision, shape = variants[i]
            result = run_variant(python, impl, stage, precision, args.steps, args.warmup, shape, "off")
            result["round"] = round_
            print(json.dumps(result), file=sys.stderr, flush=True)
            runs[i].append(result)
    results = [combine(runs[i]) for i in range(len(variants))]
    return _write(results, probe, shapes, args)


def _write(results: list[dict], probe: dict, shapes: list[str], args: argparse.Namespace) -> int:
    tables = []
    for shape in shapes:
        text = table(results, shape)
        print(text)
        tables.append(f"### Shape `{shape}`: {SHAPE_TEXT[shape]}\n\n{text}\n")
    body = ("2 gloo ranks, 1 thread per rank, AdamW (lr 1e-3, no clipping), all eager; every variant run "
            f"{args.rounds} times, interleaved (each round in the reverse order of the one before), "
            f"{args.steps} measured steps after {args.warmup} warm-up steps each; a figure is the median "
            "over all measured steps of its rounds (raw results: each round's tokens/s). tokens/s count all ranks. "
            "Peak = the largest rank's peak resident memory. no-comm = `local`: each rank trains its own "
            "replica with torch's fused AdamW and communicates nothing, the ceiling of any "
            "data-parallel engine on this machine. Differences under ~5% are run-to-run noise here.\n\n"
            + "\n".join(tables) + "\n" + notes(probe, results) + "\n\nGEMM probe (1 thread, 2048x1024x1024): "
            + json.dumps(probe) + "\n\nRaw results:\n\n```\n"
            + "\n".join(json.dumps(r) for r in results) + "\n```\n")
    command = "make bench  (python tests/bench/run.py)"
    if args.render:
        command += "; tables rebuilt from that run's log with `python tests/bench/run.py --render LOG`"
    write_section("engine", "Engine step: dsl vs DeepSpeed 0.19.8, DDP, FSDP2", command, body, Path(args.out))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
