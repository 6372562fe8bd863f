"""Each rank's live heap peak during a training step, for cases run on 2 gloo ranks.

The peak a memory model predicts is the bytes live at once; what a CPU process's resident set
shows on top (freed memory the allocator keeps, fragmentation) depends on malloc. So this
measures the live bytes themselves: glibc's `mallinfo2()` in-use bytes (`uordblks + hblkhd`,
every arena), sampled every 0.2 ms by a thread through the second step of each case (the first
allocates the optimizer states), minus the in-use bytes before the case built its model. A
tensor lives for at least one kernel, well above the sampling period at these sizes.

Used by tests/unit/test_memory_peak_measured.py and tests/bench/peak.py.
"""

from __future__ import annotations

import json

WORKER = r"""
import ctypes, gc, json, sys, threading, time, torch
from dsl.engine import dist, initialize
from dsl.engine.model import Llama
from dsl.engine.train_config import ModelConfig

class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Mallinfo2
def in_use():
    m = libc.mallinfo2()
    return m.uordblks + m.hblkhd
high = [0]
def sample():
    while True:
        v = in_use()
        if v > high[0]:
            high[0] = v
        time.sleep(0.0002)
threading.Thread(target=sample, daemon=True).start()
cases, model = json.loads(sys.argv[1]), json.loads(sys.argv[2])
ctx = dist.setup()
cfg = ModelConfig(**model)
out = []
for case in cases:
    gc.collect()
    base = in_use()
    torch.manual_seed(0)
    net = Llama(cfg, activation_checkpointing=case.get("activation_checkpointing") is True)
    engine = initialize(net, case)
    g = torch.Generator().manual_seed(ctx.rank)
    mb = case["micro_batch"]
    tokens = torch.randint(cfg.vocab_size, (mb, cfg.seq_len), generator=g)
    targets = torch.randint(cfg.vocab_size, (mb, cfg.seq_len), generator=g)
    for step in range(2):
        if step == 1:
            time.sleep(0.002)
            high[0] = 0
        engine(tokens, targets).backward()
        engine.step()
        engine.zero_grad()
    time.sleep(0.002)
    out.append({"base": base, "peak": high[0] - base})
    engine.close()
    del engine, net
print("RESULT " + json.dumps(out), flush=True)
dist.teardown(ctx)
from dsl.engine.train import exit_now  # as a dsl rank ends: no C++ static destructors
exit_now(0)
"""


def measure_heap(cases: list[dict], model: dict, timeout: float = 900) -> list[list[dict]]:
    """[rank][case] -> {"base": in-use bytes before the case, "peak": live peak above it}."""
    from tests.memory_measure import run_pair

    return [json.loads(out) for out in run_pair(WORKER, [json.dumps(cases), json.dumps(model)], timeout,
                                                 prefix="dsl-heap-")]


def predicted_live(model: dict, case: dict, dp: int = 2) -> tuple[int, str]:
    """The memory model's device peak of `case` without the runtime and allocator terms (the live
    bytes a case allocates), and the phase of that peak."""
    from dsl.engine.config import EngineConfig
    from dsl.engine.memory import ALLOCATOR, RUNTIME, estimate
    from dsl.engine.train_config import ModelConfig

    engine = EngineConfig(**case)
    b = estimate(ModelConfig(**model), engine, dp=dp, sp=engine.sequence_parallel, accelerator=False)
    return b.device_bytes - b.term(RUNTIME).device_bytes - b.term(ALLOCATOR).device_bytes, b.peak.phase
