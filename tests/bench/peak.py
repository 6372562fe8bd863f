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
from dsl.engine.presets import PRESETS  # noqa: E402

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


def live_peaks(results: list[dict]) -> None:
    """Add each case's live heap peak (tests/heap_measure.py: the engine alone, the same settings)
    and the model's peak without its runtime term, for the cases of the engine's own model."""
    from tests.heap_measure import measure_heap, predicted_live

    for model in (SMALL, LARGE):
        cases = [(r, {"micro_batch": 8, "compile": False, **engine}) for r in results
                 for name, m, engine in CASES if name == r["case"] and m is model and "onebit" not in str(engine) and "sequence_parallel" not in engine]
        if not cases:
            continue
        shape = dict(PRESETS["bench"]) if model is SMALL else dict(model)
        ranks = measure_heap([dict(c) for _, c in cases], shape)
        for i, (r, case) in enumerate(cases):
            r["live"] = max(rank[i]["peak"] for rank in ranks)
            r["live_predicted"] = predicted_live(shape, case, dp=2 // case.get("sequence_parallel", 1))[0]


def table(results: list[dict]) -> list[str]:
    lines = ["| configuration | peak phase | predicted MiB | RSS rank 0 MiB | RSS rank 1 MiB | RSS / predicted "
             "| live heap MiB | live / predicted live |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        worst = max(r["peaks"])
        live = (f"{r['live'] / 2**20:,.0f} | {r['live'] / r['live_predicted']:.3f}" if r.get("live")
                else "- | -")
        lines.append(f"| {r['case']} | {r['phase'] or '-'} | {r['predicted'] / 2**20:,.0f} | "
                     f"{r['peaks'][0] / 2**20:,.0f} | {r['peaks'][1] / 2**20:,.0f} | {worst / r['predicted']:.3f} | "
                     f"{live} |")
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
    live_peaks(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    lines = table(results)
    print("\n".join(lines))
    if not args.only:
        ratios = [max(r["peaks"]) / r["predicted"] for r in results]
        write_section("peak", "Peak memory: measured per rank against the model's peak", "python tests/bench/peak.py",
                      "\n".join([
                          f"CPU: {cpu_model()}. {len(results)} cases, 2 gloo ranks, {STEPS} steps with a checkpoint "
                          "save. predicted: `predicted_peak_bytes` of metrics.jsonl, the memory model's peak by phase "
                          "(engine/memory_peak.py; the figure `dsl plan` shows per device; runtime term 400 MiB "
                          "included) and its phase; RSS: each rank's VmHWM, the whole process. live heap: the "
                          "same engine settings without the trainer, glibc's in-use bytes sampled through a step "
                          "(tests/heap_measure.py), against the predicted peak without the runtime term (1-bit and "
                          "sp rows not measured there).", "",
                          *lines, "",
                          f"RSS / predicted: {min(ratios):.3f} to {max(ratios):.3f}. The live bytes follow the "
                          "model; the resident set adds what malloc keeps of freed memory: with `cpu_allocator: "
                          "reuse` (the default: no block is returned) and `system` (glibc's dynamic mmap threshold "
                          "moves mid-size tensors into the heap) the heap's fragmentation, which depends on the "
                          "order of allocations (checkpointing's recomputation fragments most) and differs between the "
                          "two ranks of one run and between runs. So the live peak follows the model, while the "
                          "resident set under the default allocator carries an allowance the model does not "
                          "claim: compare the live column with the model, and the RSS column with the plan's "
                          "margin."]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
