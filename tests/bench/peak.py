"""`make bench BENCH=peak`: each rank's measured peak memory against the memory model's peak.

Every case is a real `dsl launch` of the bundled trainer on 2 gloo ranks (one process per rank,
so each process's VmHWM is that case's alone), a few steps with a checkpoint save; the trainer
writes each rank's peak resident set (VmHWM) and the prediction (`predicted_peak_bytes`, what
`dsl plan` shows per device) to metrics.jsonl (engine/peak.py). The table gives the worst rank's
peak over the prediction per case. Writes the `peak` section of docs/benchmarks.md.

`python tests/bench/peak.py [--only SUBSTRING] [--json FILE]`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.bench.layout import cpu_model  # noqa: E402
from tests.bench.report import write_section  # noqa: E402

SMALL = {"preset": "bench"}
"""7.36M parameters: vocab 8192, hidden 256, 4 layers, seq 256 (engine/presets.py)."""
LARGE = {"vocab_size": 16384, "hidden_size": 512, "num_hidden_layers": 4, "num_attention_heads": 8,
         "num_key_value_heads": 4, "intermediate_size": 1376, "seq_len": 512, "tie_word_embeddings": False}
"""~30M parameters, seq 512: the embedding and head dominate less, activations more."""

FP32 = {"precision": "fp32"}
BF16 = {"precision": "bf16"}
CASES: list[tuple[str, dict, dict]] = [
    *((f"small s{s} fp32", SMALL, {"zero_stage": s, **FP32}) for s in range(4)),
    *((f"small s{s} bf16", SMALL, {"zero_stage": s, **BF16}) for s in (0, 2, 3)),
    ("small s2 fp32 ckpt", SMALL, {"zero_stage": 2, **FP32, "activation_checkpointing": True}),
    ("small s3 bf16 ckpt", SMALL, {"zero_stage": 3, **BF16, "activation_checkpointing": True}),
    ("small s2 bf16 offload", SMALL, {"zero_stage": 2, **BF16, "offload": {"optimizer": "cpu"}}),
    ("small s2 fp32 sp2", SMALL, {"zero_stage": 2, **FP32, "sequence_parallel": 2, "grad_accum": 2}),
    ("small s2 fp32 tiled", SMALL, {"zero_stage": 2, **FP32, "tiled_loss": {"enabled": True, "chunk_tokens": 512},
                                    "tiled_mlp": {"enabled": True, "chunk_tokens": 512}}),
    ("small s2 bf16 lowprec", SMALL, {"zero_stage": 2, **BF16, "low_precision_states": True}),
    ("small s0 fp32 1bit", SMALL, {"zero_stage": 0, **FP32, "optimizer": {"type": "onebit_adam", "lr": 1e-3,
                                                                          "freeze_step": 2}}),
    ("small s2 fp32 system", SMALL, {"zero_stage": 2, **FP32, "cpu_allocator": "system"}),
    ("small s3 fp32 system", SMALL, {"zero_stage": 3, **FP32, "cpu_allocator": "system"}),
    ("large s0 fp32", LARGE, {"zero_stage": 0, **FP32, "micro_batch": 4}),
    ("large s2 bf16", LARGE, {"zero_stage": 2, **BF16, "micro_batch": 4}),
    ("large s3 fp32 ckpt system", LARGE, {"zero_stage": 3, **FP32, "micro_batch": 4,
                                          "activation_checkpointing": True, "cpu_allocator": "system"}),
    ("large s2 fp32 system", LARGE, {"zero_stage": 2, **FP32, "micro_batch": 4, "cpu_allocator": "system"}),
]
STEPS = 6


def spec_for(name: str, model: dict, engine: dict, out: Path) -> dict:
    engine = {"micro_batch": 8, "grad_accum": 1, "optimizer": {"type": "adamw", "lr": 1e-3},
              "scheduler": {"type": "constant", "warmup_steps": 0}, **engine}
    return {"name": name.replace(" ", "-"),
            "run": {"train": {"model": model, "steps": STEPS, "log_every": 1, "seed": 0,
                              "checkpoint_every": STEPS // 2}},
            "resources": {"backend": "local", "procs_per_node": 2, "master_port": "auto"},
            "engine": engine, "output_dir": str(out), "max_restarts": 0}


def run_case(name: str, model: dict, engine: dict) -> dict:
    with tempfile.TemporaryDirectory(prefix="dsl-peak-") as tmp:
        out = Path(tmp) / "out"
        spec = Path(tmp) / "job.yaml"
        spec.write_text(yaml.safe_dump(spec_for(name, model, engine, out), sort_keys=False))
        started = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "dsl.launcher", "launch", str(spec)], capture_output=True,
                              text=True, timeout=900)
        if proc.returncode != 0:
            raise SystemExit(f"{name}: dsl launch exited {proc.returncode}:\n{proc.stderr[-3000:]}")
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    peaks = last["host_peak_rss_bytes"]
    return {"case": name, "peaks": peaks, "predicted": last["predicted_peak_bytes"],
            "phase": last.get("predicted_peak_phase"), "seconds": time.monotonic() - started}


def table(results: list[dict]) -> list[str]:
    lines = ["| configuration | predicted MiB | rank 0 MiB | rank 1 MiB | worst / predicted | peak phase |",
             "|---|---|---|---|---|---|"]
    for r in results:
        worst = max(r["peaks"])
        lines.append(f"| {r['case']} | {r['predicted'] / 2**20:,.0f} | {r['peaks'][0] / 2**20:,.0f} | "
                     f"{r['peaks'][1] / 2**20:,.0f} | {worst / r['predicted']:.3f} | {r['phase'] or '-'} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default="")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    results = []
    for name, model, engine in CASES:
        if args.only and args.only not in name:
            continue
        results.append(run_case(name, model, engine))
        r = results[-1]
        print(f"{name}: predicted {r['predicted'] / 2**20:,.0f} MiB, peaks "
              f"{', '.join(f'{p / 2**20:,.0f}' for p in r['peaks'])} MiB "
              f"({max(r['peaks']) / r['predicted']:.3f}); {r['seconds']:.0f} s", file=sys.stderr, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    lines = table(results)
    print("\n".join(lines))
    if not args.only:
        ratios = [max(r["peaks"]) / r["predicted"] for r in results]
        write_section("peak", "Peak memory: measured per rank against the model's peak", "python tests/bench/peak.py",
                      "\n".join([f"CPU: {cpu_model()}. {len(results)} cases, 2 gloo ranks, {STEPS} steps with a "
            "checkpoint save each; measured: each rank's VmHWM; predicted: `predicted_peak_bytes` of "
            "metrics.jsonl, the figure `dsl plan` shows per device).", "",
            *lines, "",
            f"Worst / predicted: {min(ratios):.3f} to {max(ratios):.3f}."]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
