"""`make bench BENCH=layout`: dsl's two bf16 precision layouts against each other and DeepSpeed.

For each shape (`bench`, `comm`; engine_step.SHAPES) and ZeRO stage 0-2 in bf16, three engines run
paired (run.py's `run_set`: they take turns step by step, so this machine's drift cancels in the
per-step ratios): dsl with `precision_layout: master` (16-bit parameters, fp32 master partition;
engine/zero/master.py), dsl with `precision_layout: autocast` (fp32 parameters under autocast),
and DeepSpeed 0.19.8 (bf16). Stage 3 is left out: both layouts are the same there. Writes the
"Precision layouts" section of docs/benchmarks.md with the CPU it ran on; the engine's default
(engine/config.py `mixed_layout`: master) should not be the slower layout on CPU at any stage.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import write_section  # noqa: E402
from run import ROOT, _fmt_tps, _ratio, run_set  # noqa: E402


def cpu_model() -> str:
    """`lscpu`'s model name and the CPU's bf16/AMX flags (the GEMM speed of bf16 depends on them)."""
    text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("Model name")), "?")
    flags = open("/proc/cpuinfo").read().split("flags", 1)[1].splitlines()[0].split()
    return f"{name}; flags: {' '.join(sorted(f for f in flags if 'bf16' in f or f.startswith('amx'))) or 'no bf16/AMX'}"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--shapes", default="bench,comm")
    parser.add_argument("--stages", default="0,1,2")
    args = parser.parse_args()
    ds_python = str(ROOT / ".venv-bench/bin/python")
    rows = ["| shape | stage | master tok/s | autocast tok/s | master/autocast | DeepSpeed tok/s | master/DS "
            "| autocast/DS | default | master peak GiB | autocast peak GiB | DS peak GiB |",
            "|" + "---|" * 12]
    from dsl.engine.config import EngineConfig, mixed_layout

    for shape in args.shapes.split(","):
        for stage in map(int, args.stages.split(",")):
            variants = [(sys.executable, "dsl-master", stage, "bf16", shape, "off"),
                        (sys.executable, "dsl-autocast", stage, "bf16", shape, "off"),
                        (ds_python, "deepspeed", stage, "bf16", shape, "off")]
            master, autocast, ds = run_set(variants, args.steps, args.warmup)
            default = mixed_layout(EngineConfig(zero_stage=stage, precision="bf16"))

            def gib(r):
                return f"{r['peak_rss_bytes'] / 2**30:.2f}" if "peak_rss_bytes" in r else "-"

            row = (f"| {shape} | {stage} | {_fmt_tps(master)} | {_fmt_tps(autocast)} | {_ratio(master, autocast)} | "
                   f"{_fmt_tps(ds)} | {_ratio(master, ds)} | {_ratio(autocast, ds)} | {default} | "
                   f"{gib(master)} | {gib(autocast)} | {gib(ds)} |")
            print(row, flush=True)
            rows.append(row)
    body = (f"CPU: {cpu_model()}. 2 gloo ranks, 1 thread each, bf16, AdamW, eager, {args.steps} paired "
            f"steps after {args.warmup} warm-up; ratios are medians of per-step ratios [interquartile "
            "range]. master: 16-bit parameters + fp32 master partition (engine/zero/master.py); "
            "autocast: fp32 parameters cast by autocast in every forward. `default` is the layout "
            "dsl picks at that stage without `precision_layout` (engine/config.py mixed_layout). Peak "
            "GiB: resident memory of the larger rank (CPU: device and host are the same RAM).\n\n"
            + "\n".join(rows) + "\n")
    write_section("layout", "Precision layouts (bf16): master vs autocast vs DeepSpeed",
                  "make bench BENCH=layout  (python tests/bench/layout.py)", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
