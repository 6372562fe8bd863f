"""Run engine cases on 2 ranks and return each rank's `Engine.state_summary()`.

gloo ranks on the CPU here; on a machine with 2+ GPUs the same workers run on NCCL and
cuda:0/cuda:1 (engine/dist.py), and each summary then also carries the CUDA allocator's peaks
for its case (`device_peak_allocated_bytes`, `device_peak_reserved_bytes`).

Shared by the predicted-vs-measured test (tests/unit/test_memory_measured.py) and its benchmark
(tests/bench/memory.py). Both ranks run in one pair of processes, case after case, so a whole
comparison costs one torch start-up per rank.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile

WORKER = r"""
import json, sys, torch
from dsl.engine import dist, initialize
from dsl.engine.model import Llama
from dsl.engine.train_config import ModelConfig
cases, model = json.loads(sys.argv[1]), json.loads(sys.argv[2])
ctx = dist.setup()
cfg = ModelConfig(**model)
out = []
for case in cases:
    steps = case.pop("steps", 1)
    torch.manual_seed(0)
    net = Llama(cfg, activation_checkpointing=case.get("activation_checkpointing") is True)
    engine = initialize(net, case)
    if engine.device.type == "cuda":  # device peaks per case (state_summary reports them on CUDA)
        torch.cuda.synchronize(engine.device)
        torch.cuda.reset_peak_memory_stats(engine.device)
    engine.measure_activations = True  # state_summary() reports the forward below
    g = torch.Generator().manual_seed(ctx.rank)
    tokens = torch.randint(cfg.vocab_size, (case["micro_batch"], cfg.seq_len), generator=g).to(engine.device)
    targets = torch.randint(cfg.vocab_size, (case["micro_batch"], cfg.seq_len), generator=g).to(engine.device)
    for _ in range(steps):
        engine(tokens, targets).backward()
        engine.step()
        engine.zero_grad()
    out.append(engine.state_summary())
    engine.close()
print("RESULT " + json.dumps(out), flush=True)
dist.teardown(ctx)
from dsl.engine.train import exit_now  # as a dsl rank ends: no C++ static destructors
exit_now(0)
"""

TERMS = ("params_bytes", "grads_bytes", "optimizer_states_bytes", "activations_bytes", "offload_cpu_bytes",
         "offload_nvme_bytes")


def run_pair(worker: str, args: list[str], timeout: float = 900, prefix: str = "dsl-measure-") -> list[str]:
    """Run `python -c worker ARGS...` as ranks 0 and 1 of a gloo job; each rank's stdout after
    its `RESULT ` marker. Raises AssertionError with a rank's stderr when one fails."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    with tempfile.TemporaryDirectory(prefix=prefix) as cwd:
        for rank in range(2):
            env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
            procs.append(subprocess.Popen([sys.executable, "-c", worker, *args], env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True, cwd=cwd))
        outputs = [p.communicate(timeout=timeout) for p in procs]
    for proc, (out, err) in zip(procs, outputs):
        if proc.returncode != 0 or "RESULT " not in out:
            raise AssertionError(f"rank exited {proc.returncode}:\n{err[-4000:]}")
    return [out.split("RESULT ", 1)[1] for out, _ in outputs]


def measure(cases: list[dict], model: dict, timeout: float = 900) -> list[list[dict]]:
    """[rank][case] -> state_summary of that case after one training step."""
    return [json.loads(out) for out in run_pair(WORKER, [json.dumps(cases), json.dumps(model)], timeout)]


def expected(model: dict, case: dict, dp: int = 2) -> dict:
    case = {k: v for k, v in case.items() if k != "steps"}
    from dsl.engine.config import EngineConfig
    from dsl.engine.memory import expected_state_summary
    from dsl.engine.train_config import ModelConfig

    return expected_state_summary(ModelConfig(**model), EngineConfig(**case), dp=dp, micro_batch=case["micro_batch"])


def case_id(case: dict) -> str:
    extra = [k for k in ("activation_checkpointing", "offload") if k in case]
    if "optimizer" in case:
        extra.append(case["optimizer"]["type"])
    if case.get("compile") is True:
        extra.append("compiled")
    if case.get("precision_layout"):
        extra.append(case["precision_layout"])
    if case.get("offload", {}).get("ratio", 1.0) < 1.0:
        extra.append(f"ratio{case['offload']['ratio']:g}")
    if case.get("offload", {}).get("optimizer", "cpu") not in ("cpu", "none"):
        extra.append("optimizer_" + case["offload"]["optimizer"])
    if case.get("offload", {}).get("params", "none") != "none":
        extra.append("params_" + case["offload"]["params"])
    if case.get("stage3", {}).get("gather", "layer") != "layer":
        extra.append("gather_" + case["stage3"]["gather"])
    return f"stage{case['zero_stage']}-{case['precision']}" + "".join(f"-{k}" for k in extra)
