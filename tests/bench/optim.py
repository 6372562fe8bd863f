"""Fused optimizer benchmark: GB/s of one Adam(W) step over N fp32 parameters on this CPU.

Run: `.venv/bin/python tests/bench/optim.py` (about 1-2 minutes; `--numel`, `--rounds`,
`--compile` to add a torch.compile version of the same math, `--no-write` to print only).

Every variant updates the same N-element buffers; the variants run round-robin (one step of each
per round, after a warm-up round), so that the load of other processes on this shared machine
falls on all of them alike. Reported: the best and the median step time over the rounds,
speed-ups as the median of per-round time ratios (robust to the load swinging between rounds), and
GB/s = bytes / time, where bytes counts the arrays each variant's operations read and write at
their interface, each once (per element):

| variant | reads | writes | bytes |
|---|---|---|---|
| copy_ (fp32), the physical limit | src 4 | dst 4 | 8 |
| add_ in place (fp32): the access pattern of an in-place update | 8 | 4 | 12 |
| torch AdamW for-loop / foreach / fused | grad, param, exp_avg, exp_avg_sq 16 | param, exp_avg, exp_avg_sq 12 | 28 |
| torch fused + `param_bf16.copy_(param)` | 16 + 4 | 12 + 2 | 34 |
| torch full step: bf16 grad -> fp32 buffer, GradScaler's check+unscale, fused(found_inf), copy | 2+4+16+4 | 4+4+12+2 | 48 |
| dsl plain (fp32 grad, no copy, no check) | 16 | 12 | 28 |
| dsl full, no check (bf16 grad, unscale, bf16 copy) | 14 | 14 | 28 |
| dsl full (the same + inf/nan scan first) | 14 + 2 | 14 | 30 |
| DeepSpeed CPU Adam (fp32, its own process) | 16 | 12 | 28 |

copy_ writes to lines it has not read, so the CPU reads each destination line first (an
uncounted 4 bytes per element); in-place updates (add_, every Adam) write lines they just read,
which is why they can exceed the copy's counted GB/s. The multi-pass torch variants (for-loop, foreach) move more bytes than they are credited with;
that is what makes them slow. Speed-ups are time ratios of variants that do the same work
(for "torch fused + copy" vs "dsl full" the torch side does less: no cast, unscale or check).

DeepSpeed's `DeepSpeedCPUAdam` (0.19.8, JIT-built on first use, ~35 s) runs in the bench's
DeepSpeed virtualenv (`.venv-bench`, tests/bench/setup_deepspeed.sh) as a worker process that
performs one timed step per request, interleaved with the rounds here. Its row is left out,
with the reason, when that virtualenv is missing.

The table goes to docs/benchmarks.md (section `optim`, via tests/bench/report.py).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from tests.bench.report import write_section  # noqa: E402

BENCH_PYTHON = ROOT / ".venv-bench/bin/python"
LR, BETAS, EPS, WD, LOSS_SCALE = 1e-3, (0.9, 0.999), 1e-8, 0.01, 1024.0

DS_WORKER = r"""
import sys, time, torch
from deepspeed.ops.adam import DeepSpeedCPUAdam
n = int(sys.argv[1])
torch.manual_seed(0)
p = torch.nn.Parameter(torch.randn(n))
p.grad = torch.randn(n) * 1e-3
opt = DeepSpeedCPUAdam([p], lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, adamw_mode=True)
opt.step()  # builds or loads the op, creates the states
print("DSL_READY", torch.get_num_threads(), flush=True)
for line in sys.stdin:
    t = time.perf_counter()
    opt.step()
    print("DSL_T", time.perf_counter() - t, flush=True)
"""


class DeepSpeedWorker:
    """DeepSpeedCPUAdam in the DeepSpeed virtualenv; `step()` runs one step there, returns seconds."""

    def __init__(self, numel: int) -> None:
        env = {**os.environ, "DS_BUILD_OPS": "0"}
        self.proc = subprocess.Popen([str(BENCH_PYTHON), "-c", DS_WORKER, str(numel)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        self._read("DSL_READY")

    def _read(self, tag: str) -> str:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(tag):
                return line.split(maxsplit=1)[1].strip()
        raise RuntimeError(f"DeepSpeed worker exited ({self.proc.wait()}) before printing {tag}")

    def step(self) -> float:
        assert self.proc.stdin is not None
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        return float(self._read("DSL_T"))

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


def build_variants(n: int, with_compile: bool) -> dict[str, tuple[int, Callable[[], None]]]:
    """name -> (bytes per element, one step)."""
    from torch.optim import adamw as torch_adamw

    from dsl.ops.adam import adam_step, cpu_backend

    if cpu_backend() != "cpu":
        raise SystemExit("the fused CPU kernel did not build (see the warning above); nothing to measure")
    gen = torch.Generator().manual_seed(0)
    param = torch.randn(n, generator=gen)
    grad32 = torch.randn(n, generator=gen) * 1e-3
    grad16 = (grad32 * LOSS_SCALE).to(torch.bfloat16)  # the full step's input: a loss-scaled bf16 grad
    exp_avg, exp_avg_sq = torch.zeros(n), torch.zeros(n)
    param_bf16 = torch.empty(n, dtype=torch.bfloat16).fill_(0)
    grad_buf = torch.zeros(n)  # the fp32 gradient buffer the torch full step casts into
    copy_dst = torch.zeros(n)
    found_inf, inv_scale = torch.zeros(1), torch.full((1,), 1.0 / LOSS_SCALE)

    def torch_adam(**kind: bool) -> None:
        # The step count stays 1 (a fresh tensor each call): timing does not depend on it.
        torch_adamw.adamw([param], [grad32], [exp_avg], [exp_avg_sq], [], [torch.tensor(0.0)],
                          amsgrad=False, beta1=BETAS[0], beta2=BETAS[1], lr=LR, weight_decay=WD, eps=EPS,
                          maximize=False, **kind)

    def torch_fused_copy() -> None:
        torch_adam(fused=True)
        param_bf16.copy_(param)

    def torch_full() -> None:
        grad_buf.copy_(grad16)
        found_inf.zero_()
        torch._amp_foreach_non_finite_check_and_unscale_([grad_buf], found_inf, inv_scale)
        torch._fused_adamw_([param], [grad_buf], [exp_avg], [exp_avg_sq], [], [torch.tensor(0.0)], lr=LR,
                            beta1=BETAS[0], beta2=BETAS[1], weight_decay=WD, eps=EPS, amsgrad=False,
                            maximize=False, found_inf=found_inf)
        param_bf16.copy_(param)

    def dsl(grad: torch.Tensor, **kw) -> Callable[[], None]:
        def run() -> None:
            adam_step(param, grad, exp_avg, exp_avg_sq, step=1, lr=LR, beta1=BETAS[0], beta2=BETAS[1],
                      eps=EPS, weight_decay=WD, **kw)
        return run

    variants: dict[str, tuple[int, Callable[[], None]]] = {
        "copy_ fp32 (physical limit)": (8, lambda: copy_dst.copy_(param)),
        "add_ in place fp32 (read 2, write 1)": (12, lambda: copy_dst.add_(grad32)),
        "torch AdamW for-loop": (28, lambda: torch_adam(foreach=False)),
        "torch AdamW foreach": (28, lambda: torch_adam(foreach=True)),
        # Compared pairs run next to each other.
        "torch AdamW fused": (28, lambda: torch_adam(fused=True)),
        "dsl fused, plain": (28, dsl(grad32, check_finite=False)),
        "torch fused + bf16 copy": (34, torch_fused_copy),
        "dsl fused, full without check": (28, dsl(grad16, grad_scale=LOSS_SCALE, param_lp=param_bf16,
                                                  check_finite=False)),
        "dsl fused, full": (30, dsl(grad16, grad_scale=LOSS_SCALE, param_lp=param_bf16, check_finite=True)),
        "torch full step (cast, check+unscale, fused, copy)": (48, torch_full),
    }
    if with_compile:
        coef = torch.tensor([1 / LOSS_SCALE, 1 - LR * WD, BETAS[0], 1 - BETAS[0], BETAS[1], 1 - BETAS[1],
                             LR / (1 - BETAS[0]), 1 / (1 - BETAS[1]) ** 0.5, EPS])

        @torch.compile(fullgraph=True, dynamic=False)
        def compiled(g, p, m, v, lp, c):
            g = g.float() * c[0]
            p2 = p * c[1]
            m2 = c[2] * m + c[3] * g
            v2 = c[4] * v + (c[5] * g) * g
            p2 = p2 - (c[6] * m2) / (v2.sqrt() * c[7] + c[8])
            p.copy_(p2)
            m.copy_(m2)
            v.copy_(v2)
            if lp is not None:
                lp.copy_(p2)

        variants["torch.compile, plain"] = (28, lambda: compiled(grad32, param, exp_avg, exp_avg_sq, None, coef))
        variants["torch.compile, full without check"] = (
            28, lambda: compiled(grad16, param, exp_avg, exp_avg_sq, param_bf16, coef))
    return variants


def measure(n: int, rounds: int, with_compile: bool) -> tuple[dict[str, tuple[int, list[float]]], str]:
    variants = build_variants(n, with_compile)
    times: dict[str, list[float]] = {k: [] for k in variants}
    ds, ds_note = None, ""
    if BENCH_PYTHON.exists():
        try:
            ds = DeepSpeedWorker(n)
            times["DeepSpeed CPU Adam (fp32)"] = []
        except (RuntimeError, OSError) as e:
            ds_note = f"DeepSpeed CPU Adam left out: {e}"
    else:
        ds_note = f"DeepSpeed CPU Adam left out: {BENCH_PYTHON} missing (run tests/bench/setup_deepspeed.sh)"
    try:
        for r in range(rounds + 1):  # round 0 warms up (first touch, compiles, caches)
            for name, (_, step) in variants.items():
                t = time.perf_counter()
                step()
                dt = time.perf_counter() - t
                if r:
                    times[name].append(dt)
            if ds is not None:
                dt = ds.step()
                if r:
                    times["DeepSpeed CPU Adam (fp32)"].append(dt)
            print(f"round {r}/{rounds} done", file=sys.stderr)
    finally:
        if ds is not None:
            ds.close()
    out = {name: (variants[name][0] if name in variants else 28, ts) for name, ts in times.items()}
    return out, ds_note


def render(results: dict[str, tuple[int, list[float]]], n: int, rounds: int, note: str) -> str:
    best = {k: min(ts) for k, (_, ts) in results.items()}
    med = {k: statistics.median(ts) for k, (_, ts) in results.items()}
    copy = "copy_ fp32 (physical limit)"
    lines = [
        f"{n / 1e6:.0f}M fp32 parameters, {torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"{rounds} round-robin rounds after a warm-up; load average at the end "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (other jobs share this machine: compare "
        "within this table only).",
        "",
        "| variant | bytes/param | best ms | median ms | GB/s (best) | GB/s (median) | % of copy GB/s (best) |",
        "|---|---|---|---|---|---|---|",
    ]
    for k, (nbytes, _) in results.items():
        gbs_best, gbs_med = nbytes * n / best[k] / 1e9, nbytes * n / med[k] / 1e9
        share = gbs_best / (8 * n / best[copy] / 1e9) * 100
        lines.append(f"| {k} | {nbytes} | {best[k] * 1e3:.1f} | {med[k] * 1e3:.1f} | {gbs_best:.1f} | "
                     f"{gbs_med:.1f} | {share:.0f}% |")

    def ratio(base: str, mine: str) -> str:
        # Per-round ratios pair steps run seconds apart, so slow swings of the other jobs' load
        # cancel; their median is the headline figure, best-vs-best and median-vs-median follow.
        paired = statistics.median(b / m for b, m in zip(results[base][1], results[mine][1]))
        return (f"{paired:.2f}x (median of per-round ratios; best {best[base] / best[mine]:.2f}x, "
                f"median {med[base] / med[mine]:.2f}x)")

    lines += [
        "",
        "Speed-ups (time of the torch side / time of dsl's):",
        f"- plain step, same bytes (acceptance: >= 1.0x): dsl fused plain vs torch AdamW fused: "
        f"{ratio('torch AdamW fused', 'dsl fused, plain')}",
        f"- full step, same work (bf16 grad in, unscale, inf/nan check, bf16 copy out): "
        f"{ratio('torch full step (cast, check+unscale, fused, copy)', 'dsl fused, full')}",
        f"- full step vs torch fused + separate bf16 copy (acceptance: >= 1.3x; torch gets an fp32 grad "
        f"and does no unscale or check): dsl full {ratio('torch fused + bf16 copy', 'dsl fused, full')}; "
        f"dsl full without check {ratio('torch fused + bf16 copy', 'dsl fused, full without check')}",
    ]
    if "DeepSpeed CPU Adam (fp32)" in results:
        lines.append(f"- plain step vs DeepSpeed CPU Adam: {ratio('DeepSpeed CPU Adam (fp32)', 'dsl fused, plain')}")
    if note:
        lines += ["", note]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=float, default=100e6, help="parameters (default 100M)")
    ap.add_argument("--rounds", type=int, default=9, help="timed rounds after the warm-up round")
    ap.add_argument("--compile", action="store_true", help="add torch.compile versions (compiles ~10-45 s)")
    ap.add_argument("--no-write", action="store_true", help="print the table, leave docs/benchmarks.md alone")
    args = ap.parse_args(argv)
    n = int(args.numel)
    results, note = measure(n, args.rounds, args.compile)
    body = render(results, n, args.rounds, note)
    print(body)
    if not args.no_write:
        path = write_section("optim", "Fused optimizer: one Adam(W) step on CPU, GB/s",
                             "make bench  (python tests/bench/optim.py)", body)
        print(f"wrote {path.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
