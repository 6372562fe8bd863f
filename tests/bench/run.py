"""`make bench`: every engine on the same job, side by side in one run; writes docs/benchmarks.md.

Variants (2 gloo ranks, 1 thread each, the `bench` model preset, micro-batch 8, AdamW):
dsl at ZeRO stages 0-3, DeepSpeed 0.19.8 at stages 0-3 (its own virtualenv, see
setup_deepspeed.sh), torch DDP (stage 0's peer) and FSDP2 (stage 3's peer), each in fp32 and bf16.
Ratios compare dsl with each peer on the same stage and precision. Differences under ~5% are
noise on this machine (shared/docs/FACTS.md).
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


def run_variant(python: str, impl: str, stage: int, precision: str, steps: int, warmup: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    argv = [python, "-m", "torch.distributed.run", "--nproc-per-node=2", "--rdzv-backend=c10d",
            "--rdzv-endpoint=localhost:0", str(STEP), "--impl", impl, "--stage", str(stage),
            "--precision", precision, "--steps", str(steps), "--warmup", str(warmup)]
    started = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=1800, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH "):
            result = json.loads(line[6:])
            result["wall_s"] = time.monotonic() - started
            return result
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"impl": impl, "stage": stage, "precision": precision, "error": f"exit {proc.returncode}: {tail[:200]}"}


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


def table(results: list[dict]) -> str:
    def get(impl, stage, precision):
        return next((r for r in results if r["impl"] == impl and r["stage"] == stage
                     and r["precision"] == precision), None)

    lines = ["| precision | stage | dsl tok/s | DeepSpeed tok/s | dsl/DS | peer | peer tok/s | dsl/peer "
             "| dsl peak GiB | DS peak GiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for precision in ("fp32", "bf16"):
        for stage in range(4):
            dsl, ds = get("dsl", stage, precision), get("deepspeed", stage, precision)
            peer_name = "FSDP2" if stage == 3 else "DDP"
            peer = get("fsdp2" if stage == 3 else "ddp", 3 if stage == 3 else 0, precision)
            lines.append(f"| {precision} | {stage} | {_fmt_tps(dsl)} | {_fmt_tps(ds)} | {_ratio(dsl, ds)} "
                         f"| {peer_name} | {_fmt_tps(peer)} | {_ratio(dsl, peer)} | {_gib(dsl)} | {_gib(ds)} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--deepspeed-python", default=str(ROOT / ".venv-bench/bin/python"))
    parser.add_argument("--out", default=str(ROOT / "docs/benchmarks.md"))
    args = parser.parse_args()
    plan = [(sys.executable, "ddp", 0), (sys.executable, "fsdp2", 3)]
    plan += [(sys.executable, "dsl", s) for s in range(4)]
    plan += [(args.deepspeed_python, "deepspeed", s) for s in range(4)]
    results = []
    for precision in ("fp32", "bf16"):
        for python, impl, stage in plan:
            result = run_variant(python, impl, stage, precision, args.steps, args.warmup)
            print(json.dumps(result), file=sys.stderr, flush=True)
            results.append(result)
    text = table(results)
    print(text)
    body = ("2 gloo ranks, 1 thread per rank, model preset `bench` (vocab 8192, hidden 256, 4 layers, "
            f"8 heads, SwiGLU 688, seq 256), micro-batch 8, AdamW, median of {args.steps} steps after "
            f"{args.warmup} warm-up steps. Peak = the largest rank's peak resident memory. "
            "Differences under ~5% are run-to-run noise here.\n\n" + text + "\n\nRaw results:\n\n```\n"
            + "\n".join(json.dumps(r) for r in results) + "\n```\n")
    write_section("engine", "Engine step: dsl vs DeepSpeed 0.19.8, DDP, FSDP2",
                  "make bench  (python tests/bench/run.py)", body, Path(args.out))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
