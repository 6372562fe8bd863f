"""`make bench`: every engine on the same job, side by side in one run; writes docs/benchmarks.md.

Variants (2 gloo ranks, 1 thread each, AdamW; shapes in engine_step.SHAPES):
dsl at ZeRO stages 0-3, DeepSpeed 0.19.8 at stages 0-3 (its own virtualenv, see
setup_deepspeed.sh), torch DDP (stage 0's peer), FSDP2 (stage 3's peer) and `local` (no engine,
no communication: the ceiling of any eager engine under the system allocator). Everything runs eager, as each
engine does by default (dsl's `engine.compile` is off by default), except one extra column. The `bench` shape (the DDP/DeepSpeed/FSDP2 peer baseline) runs in fp32 and
bf16, the communication-heavy `comm` shape in fp32. Ratios compare dsl with each peer on the
same shape, stage and precision. The `bench` shape's runs also take dsl with `compile: true`
(`--compiled`), shown in its own column.

Paired runs: this machine's speed drifts by 10-30% over tens of seconds (other tenants of the
host), so engines run one after the other would be compared at different moments. Instead, for
each (shape, precision, stage) the four engines of that row (dsl, DeepSpeed, the torch peer, the
no-comm ceiling) start together and take turns step by step (`run_set`, engine_step.py's baton):
their k-th steps run seconds apart, and each ratio is the median of the per-step ratios
(`paired`), with its interquartile range. A row's peer and ceiling are measured in that row's run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
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


def variant_argv(python: str, impl: str, stage: int, precision: str, shape: str, steps: int, warmup: int,
                 compile: str = "off") -> list[str]:
    return [python, "-m", "torch.distributed.run", "--nproc-per-node=2", "--rdzv-backend=c10d",
            "--rdzv-endpoint=localhost:0", str(STEP), "--impl", impl, "--stage", str(stage),
            "--precision", precision, "--steps", str(steps), "--warmup", str(warmup), "--shape", shape,
            "--compile", compile]


Variant = tuple[str, str, int, str, str, str]
"""(python, impl, stage, precision, shape, compile on|off)"""


def run_set(variants: list[Variant], steps: int, warmup: int, timeout: float = 1800) -> list[dict]:
    """Run `variants` at the same time, taking turns
    step by step (engine_step.py's baton): returns one result per variant, in order."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    n = len(variants)
    with tempfile.TemporaryDirectory(prefix="dsl-bench-") as d:
        for i in range(n):
            os.mkfifo(os.path.join(d, f"baton{i}"))
        procs, outs = [], []
        for i, (python, impl, stage, precision, shape, compile) in enumerate(variants):
            out = open(os.path.join(d, f"out{i}"), "w+")
            argv = variant_argv(python, impl, stage, precision, shape, steps, warmup, compile)
            argv += ["--baton", d, "--slot", str(i), "--slots", str(n)]
            procs.append(subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                          start_new_session=True))
            outs.append(out)
        deadline, started, why = time.monotonic() + timeout, False, ""
        while any(p.poll() is None for p in procs):
            if not started and all(os.path.exists(os.path.join(d, f"ready{i}")) for i in range(n)):
                fd = os.open(os.path.join(d, "baton0"), os.O_RDWR)
                os.write(fd, b"x")  # slot 0 starts; the byte stays in the FIFO after close (slots hold it open)
                os.close(fd)
                started = True
            dead = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
            if dead or time.monotonic() > deadline:  # the rotation cannot go on without every slot
                why = f"slot {dead[0]} exited {procs[dead[0]].returncode}" if dead else f"timeout {timeout:.0f}s"
                for p in procs:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(p.pid, signal.SIGKILL)
                break
            time.sleep(0.2)
        for p in procs:
            p.wait()
        results = []
        for out, (python, impl, stage, precision, shape, compile) in zip(outs, variants):
            out.seek(0)
            text = out.read()
            out.close()
            line = next((ln for ln in text.splitlines() if ln.startswith("BENCH ")), None)
            if line is not None:
                results.append(json.loads(line[6:]))
                continue
            tail = (text.strip().splitlines() or ["no output"])[-1]
            results.append({"impl": impl, "stage": stage, "precision": precision, "shape": shape,
                            "compile": compile, "error": f"{why or 'no result'}: {tail[:200]}"})
        return results


def paired(a: dict | None, b: dict | None) -> tuple[float, float, float] | None:
    """How much faster `a` ran than `b`, step by step (b's k-th step time / a's k-th, the two run
    seconds apart): (median, lower quartile, upper quartile) of those ratios."""
    ta, tb = (a or {}).get("steps_s"), (b or {}).get("steps_s")
    if not ta or not tb or len(ta) != len(tb):
        return None
    ratios = sorted(y / x for x, y in zip(ta, tb))
    q = statistics.quantiles(ratios, n=4)
    return statistics.median(ratios), q[0], q[2]


def _fmt_tps(r: dict | None) -> str:
    if r is None:
        return "-"
    return f"{r['tokens_per_s']:,.0f}" if "tokens_per_s" in r else f"n/a ({r.get('error', '?')[:60]})"


def _ratio(a: dict | None, b: dict | None) -> str:
    """a/b speed from paired steps: median and, in brackets, the interquartile range."""
    r = paired(a, b)
    return "-" if r is None else f"{r[0]:.2f}x [{r[1]:.2f}-{r[2]:.2f}]"


def _gib(r: dict | None) -> str:
    return f"{r['peak_rss_bytes'] / 2**30:.2f}" if r and "peak_rss_bytes" in r else "-"


def set_name(shape: str, precision: str, stage: int) -> str:
    return f"{shape}/{precision}/stage{stage}"


def set_variants(shape: str, precision: str, stage: int, ds_python: str, compiled: bool) -> list[Variant]:
    """The engines of one paired run: dsl and DeepSpeed at `stage`, its torch peer (DDP at 0-2,
    FSDP2 at 3) and the no-communication ceiling, all eager; with `compiled`, also dsl with
    `engine.compile: true`."""
    peer = ("fsdp2", 3) if stage == 3 else ("ddp", 0)
    extra = [(sys.executable, "dsl", stage, precision, shape, "on")] if compiled else []
    return [(sys.executable, "dsl", stage, precision, shape, "off"),
            (ds_python, "deepspeed", stage, precision, shape, "off"),
            (sys.executable, peer[0], peer[1], precision, shape, "off"),
            (sys.executable, "local", 0, precision, shape, "off")] + extra


def table(results: list[dict], shape: str = "bench") -> str:
    def get(impl, precision, stage, compile="off"):
        return next((r for r in results if r["impl"] == impl and r.get("compile", "off") == compile
                     and r.get("set") == set_name(shape, precision, stage)), None)

    compiled = any(r.get("compile") == "on" and r.get("shape") == shape for r in results)
    head = "| precision | stage | dsl tok/s | DeepSpeed tok/s | dsl/DS | "
    head += "dsl compiled tok/s | compiled/DS | " if compiled else ""
    head += "peer | peer tok/s | dsl/peer | no-comm tok/s | dsl/no-comm | dsl peak GiB | DS peak GiB |"
    lines = [head, "|" + "---|" * head.count(" |")]
    for precision in PRECISIONS[shape]:
        for stage in range(4):
            dsl, ds, local = get("dsl", precision, stage), get("deepspeed", precision, stage), get("local", precision, stage)
            if dsl is None and ds is None:
                continue
            peer_name = "FSDP2" if stage == 3 else "DDP"
            peer = get(peer_name.lower(), precision, stage)
            row = f"| {precision} | {stage} | {_fmt_tps(dsl)} | {_fmt_tps(ds)} | {_ratio(dsl, ds)} | "
            if compiled:
                dslc = get("dsl", precision, stage, "on")
                row += f"{_fmt_tps(dslc)} | {_ratio(dslc, ds)} | "
            row += (f"{peer_name} | {_fmt_tps(peer)} | {_ratio(dsl, peer)} | {_fmt_tps(local)} "
                    f"| {_ratio(dsl, local)} | {_gib(dsl)} | {_gib(ds)} |")
            lines.append(row)
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


def _drift_note(results: list[dict]) -> str:
    """How much the machine's speed moved during the run, seen by the same engine: the spread of
    its step times (what unpaired runs would have compared), against the spread of paired ratios."""
    spreads = []
    for r in results:
        steps = sorted(r.get("steps_s") or [])
        if len(steps) >= 4:
            q = statistics.quantiles(steps, n=4)
            spreads.append(q[2] / q[0] - 1)
    if not spreads:
        return ""
    return (f"- Noise: one engine's own step times in one set vary by {statistics.median(spreads):.0%} between "
            f"quartiles (median over variants, up to {max(spreads):.0%}): this machine's speed drifts. "
            "Ratios are therefore taken step by step between engines that ran seconds apart "
            "(the bracket is their interquartile range), not between medians of separate runs.")


def notes(probe: dict, results: list[dict] | None = None) -> str:
    fp32, bf16 = probe.get("fp32_gflops"), probe.get("bf16_gflops")
    gemm = (f"{bf16:.0f} GFLOP/s bf16 vs {fp32:.0f} fp32 per core in this run's probe"
            if fp32 and bf16 else "see the probe below")
    return "\n".join([
        "Notes:",
        "- `bench` is compute-bound: the no-comm column is the same eager forward, backward and "
        "AdamW with no communication, under the system allocator. dsl can go past it because dsl "
        "on a CPU device keeps freed large blocks in the process (engine/cpu_alloc.py: the trainer's "
        "ranks preload jemalloc, `cpu_allocator: auto`; these in-process workers, started without it, "
        "fall back to glibc keeping them, `reuse`, as fast: docs/benchmarks.md \"Peak memory\"), so a "
        "step does not page-fault its gradients, logits and buffers in again. The setting is process-wide and would speed up the peers "
        "too (DDP 1.13x with it, dsl ZeRO-2 1.15x, in a paired check on the `comm` shape); it is "
        "part of dsl and of none of them. dsl compiled adds torch.compile's fused kernels on top.",
        _bf16_note(probe, gemm),
        "- `comm` moves 6x the parameters for 1/8 of the tokens: gradient exchange and parameter "
        "gathers cost about as much as compute, so the engines' communication plans show. dsl "
        "builds its reduce-scatter and all-gather from point-to-point messages and broadcasts on "
        "gloo (engine/zero/collectives.py), which are 2-5x cheaper than gloo's "
        "reduce_scatter/all_gather collectives that the peers use.",
        _drift_note(results or []),
    ])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--deepspeed-python", default=str(ROOT / ".venv-bench/bin/python"))
    parser.add_argument("--out", default=str(ROOT / "docs/benchmarks.md"))
    parser.add_argument("--shapes", default="bench,comm", help="comma-separated engine_step.SHAPES")
    parser.add_argument("--stages", default="0,1,2,3", help="comma-separated ZeRO stages")
    parser.add_argument("--compiled", default="bench",
                        help="comma-separated shapes whose runs also take dsl with `compile: true`")
    parser.add_argument("--render", metavar="LOG", default=None,
                        help="rebuild the tables from LOG (this script's stderr: the probe's JSON line, "
                             "then one per variant) instead of running anything")
    args = parser.parse_args()
    if args.render:
        lines = [json.loads(ln) for ln in Path(args.render).read_text().splitlines() if ln.startswith("{")]
        probe = next(r for r in lines if "fp32_gflops" in r or ("error" in r and "impl" not in r))
        results = [r for r in lines if "impl" in r and "set" in r]
        shapes = sorted({r["shape"] for r in results}, key=list(SHAPE_TEXT).index)
        return _write(results, probe, shapes, args)
    if args.steps < 20:
        parser.error(f"--steps {args.steps}: use at least 20 measured steps (the median needs them)")
    shapes = [s for s in args.shapes.split(",") if s]
    stages = [int(s) for s in args.stages.split(",") if s]
    from layout import cpu_model  # tests/bench/layout.py

    probe = {**probe_gemm(sys.executable), "cpu_model": cpu_model()}  # the log names its machine
    print(json.dumps(probe), file=sys.stderr, flush=True)
    results = []
    for shape in shapes:
        for precision in PRECISIONS[shape]:
            for stage in stages:
                name = set_name(shape, precision, stage)
                started = time.monotonic()
                variants = set_variants(shape, precision, stage, args.deepspeed_python,
                                        shape in args.compiled.split(","))
                for result in run_set(variants, args.steps, args.warmup):
                    result.update(set=name, wall_s=round(time.monotonic() - started, 1))
                    print(json.dumps(result), file=sys.stderr, flush=True)
                    results.append(result)
    return _write(results, probe, shapes, args)


def _write(results: list[dict], probe: dict, shapes: list[str], args: argparse.Namespace) -> int:
    tables = []
    for shape in shapes:
        text = table(results, shape)
        print(text)
        tables.append(f"### Shape `{shape}`: {SHAPE_TEXT[shape]}\n\n{text}\n")
    steps = next((len(r["steps_s"]) for r in results if r.get("steps_s")), args.steps)
    from layout import cpu_model  # tests/bench/layout.py: lscpu's model name and bf16/AMX flags

    # the run's CPU: recorded by its GEMM probe since 2026-12-06; for an older log, this machine's
    cpu = probe.get("cpu_model") or cpu_model()
    body = (f"CPU: {cpu}. 2 gloo ranks, 1 thread per rank, AdamW (lr 1e-3, no clipping), all eager. Each row is one "
            "*paired* run: dsl, DeepSpeed, the torch peer and the no-comm ceiling run at the same time and "
            "take turns step by step (one step each, in that order, round and round; the others wait), "
            f"{steps} measured steps each after warm-up steps taken the same way. "
            "tok/s = tokens of all ranks / median step time. A ratio x/y is the median over k of "
            "y's k-th step time / x's k-th step time, [its interquartile range]. "
            "Peak = the largest rank's peak resident memory. no-comm = `local`: each rank trains its own "
            "replica with torch's fused AdamW and communicates nothing, the ceiling of any eager "
            "data-parallel engine under the system allocator (see the notes). dsl compiled = dsl with `engine.compile: true` "
            "(opt-in: each decoder layer's forward under torch.compile, the engine's hooks outside; "
            "its warm-up steps include the compilation); every other column runs eager, each engine's "
            "default.\n\n"
            + "\n".join(tables) + "\n" + notes(probe, results) + "\n\nGEMM probe (1 thread, 2048x1024x1024): "
            + json.dumps(probe) + "\n\nRaw results (steps_s: every measured step, in turn order):\n\n```\n"
            + "\n".join(json.dumps({k: v for k, v in r.items() if k != "starts_unix"}) for r in results)
            + "\n```\n")
    command = "make bench  (python tests/bench/run.py)"
    if args.render:
        command += "; tables rebuilt from that run's log with `python tests/bench/run.py --render LOG`"
    write_section("engine", "Engine step: dsl vs DeepSpeed 0.19.8, DDP, FSDP2", command, body, Path(args.out))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
