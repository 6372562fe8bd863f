"""`make bench BENCH=ds_parity`: dsl's planned device bytes of the model states against DeepSpeed's.

For `configs/plan-7b.yaml` on the recorded `h100-sxm-8x` (bf16, 8 GPUs), `dsl plan --json` lists
every candidate with its memory terms by location. For each ZeRO setting DeepSpeed 0.19.8's
estimators cover (deepspeed/runtime/zero/stage_1_and_2.py, stage3.py; engine/memory_reference.py),
this compares the device bytes of dsl's model-state terms (parameters, gradients, master weights,
optimizer states) with DeepSpeed's figure for the same setting, without the estimators' 4 B x the
largest layer at stage 3 (dsl counts its gathered units apart). The figures are arithmetic on the
planner's output, the same on every machine; tests/unit/test_plan_deepspeed_parity.py asserts
dsl <= DeepSpeed for every row.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SPEC, TOPOLOGY = "configs/plan-7b.yaml", "h100-sxm-8x"
STATES = ("parameters", "gradients", "master weights", "optimizer states")
SETTINGS = [  # (zero_stage, offload optimizer, offload params, DeepSpeed's figure as a function of P, N)
    (2, "none", "none", "2P + 18P/N", lambda p, n: 2 * p + int(18 * p / n)),
    (2, "cpu", "none", "2P", lambda p, n: 2 * p),
    (3, "none", "none", "18P/N", lambda p, n: int(18 * p / n)),
    (3, "cpu", "none", "2P/N", lambda p, n: int(2 * p / n)),
    (3, "cpu", "cpu", "0", lambda p, n: 0),
]


def plan_json(python: str = sys.executable) -> dict:
    out = subprocess.run([python, "-m", "dsl.launcher", "plan", SPEC, "--topology", TOPOLOGY, "--json"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def rows(plan: dict) -> list[dict]:
    """One row per setting: dsl's device bytes of the model states, DeepSpeed's, and whether the
    engine runs that candidate."""
    p, n = plan["model"]["params"], plan["hardware"]["hosts"] * plan["hardware"]["ranks_per_host"]
    out = []
    for stage, opt, params, formula, ds in SETTINGS:
        cand = next(c for c in plan["candidates"] if (c["zero_stage"], c["offload"], c["offload_params"])
                    == (stage, opt, params))
        terms = {t["name"]: t for t in cand["terms"]}
        out.append({"stage": stage, "offload": opt, "offload_params": params, "formula": formula,
                    "dsl_bytes": sum(terms[name]["device_bytes"] for name in STATES),
                    "deepspeed_bytes": ds(p, n), "unsupported": cand["unsupported"]})
    return out


def main() -> int:
    plan = plan_json()
    table = ["| ZeRO | optimizer offload | parameter offload | DeepSpeed 0.19.8 | DeepSpeed GB | dsl GB | dsl <= DS | engine runs it |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows(plan):
        table.append(f"| {r['stage']} | {r['offload']} | {r['offload_params']} | {r['formula']} | "
                     f"{r['deepspeed_bytes'] / 1e9:.2f} | {r['dsl_bytes'] / 1e9:.2f} | "
                     f"{'yes' if r['dsl_bytes'] <= r['deepspeed_bytes'] else 'NO'} | "
                     f"{'yes' if r['unsupported'] is None else 'no: ' + r['unsupported']} |")
    body = (f"`{SPEC}` (Llama-2-7B shape, P = {plan['model']['params']:,}) on `{TOPOLOGY}` (N = "
            f"{plan['hardware']['hosts'] * plan['hardware']['ranks_per_host']} GPUs), bf16, dsl's default precision layout (master). Device bytes "
            "of the model-state terms (parameters, gradients, master weights, optimizer states) that "
            f"`dsl plan {SPEC} --topology {TOPOLOGY} --json` reports per candidate, against DeepSpeed 0.19.8's "
            "estimate_zero2/zero3_model_states_mem_needs for the same setting (stage 3 without its 4 B x "
            "largest-layer term). Pure arithmetic on the plan: the same on every machine.\n\n" + "\n".join(table) + "\n")
    write_section("ds_parity", "Model-state device bytes: dsl vs DeepSpeed's estimators",
                  f"make bench BENCH=ds_parity  (python tests/bench/ds_parity.py)", body)
    print("\n".join(table))
    return 0 if all(r["dsl_bytes"] <= r["deepspeed_bytes"] and r["unsupported"] is None for r in rows(plan)) else 1


if __name__ == "__main__":
    sys.exit(main())
