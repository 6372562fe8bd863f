"""Predicted vs measured memory: the bundled model trained one step by 2 gloo ranks on CPU at every
ZeRO stage (and with offload, bf16 autocast, checkpointing); every term of Engine.state_summary()
must agree with engine.memory.expected_state_summary within 10%.

Both ranks run in one pair of processes (torch.distributed with gloo over localhost), each case
after the other, so the whole comparison costs one torch start-up per rank.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

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
    torch.manual_seed(0)
    net = Llama(cfg, activation_checkpointing=case.get("activation_checkpointing") is True)
    engine = initialize(net, case)
    g = torch.Generator().manual_seed(ctx.rank)
    tokens = torch.randint(cfg.vocab_size, (case["micro_batch"], cfg.seq_len), generator=g)
    targets = torch.randint(cfg.vocab_size, (case["micro_batch"], cfg.seq_len), generator=g)
    engine(tokens, targets).backward()
    engine.step()
    engine.zero_grad()
    out.append(engine.state_summary())
    engine.close()
print("RESULT " + json.dumps(out), flush=True)
dist.teardown(ctx)
"""

# The bundled model's "tiny" shape, with grouped-query attention and an untied head so that every
# parameter group and the GQA path are exercised.
MODEL = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=176, seq_len=64, tie_word_embeddings=False)
CASES = [
    *({"zero_stage": s, "precision": "fp32", "micro_batch": 4} for s in range(4)),
    {"zero_stage": 1, "precision": "bf16", "micro_batch": 4},
    {"zero_stage": 3, "precision": "bf16", "micro_batch": 4, "activation_checkpointing": True},
    {"zero_stage": 2, "precision": "fp32", "micro_batch": 4, "offload": {"optimizer": "cpu", "sub_group_mib": 0.25}},
]
TERMS = ("params_bytes", "grads_bytes", "optimizer_states_bytes", "activations_bytes", "offload_cpu_bytes",
         "offload_nvme_bytes")


def _ids(case: dict) -> str:
    extra = [k for k in ("activation_checkpointing", "offload") if k in case]
    return f"stage{case['zero_stage']}-{case['precision']}" + "".join(f"-{k}" for k in extra)


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> list[dict]:
    from dsl.engine.config import EngineConfig, unsupported_reason

    for case in CASES:  # a case the engine refuses is a failure here, never a skip
        reason = unsupported_reason(EngineConfig(**case))
        assert reason is None, f"the engine cannot run {_ids(case)}: {reason}"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(CASES), json.dumps(MODEL)],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      cwd=tmp_path_factory.mktemp("ranks")))
    outputs = [p.communicate(timeout=600) for p in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0 and "RESULT " in out, err[-4000:]
    per_rank = [json.loads(out.split("RESULT ", 1)[1]) for out, _ in outputs]
    return per_rank[0]


@pytest.mark.parametrize("index", range(len(CASES)), ids=[_ids(c) for c in CASES])
def test_every_term_within_10_percent(measured: list[dict], index: int):
    from dsl.engine.config import EngineConfig
    from dsl.engine.memory import expected_state_summary
    from dsl.engine.train_config import ModelConfig

    case = CASES[index]
    got = measured[index]
    want = expected_state_summary(ModelConfig(**MODEL), EngineConfig(**case), dp=2, micro_batch=case["micro_batch"])
    for term in TERMS:
        if want[term] == 0:
            assert got[term] == 0, (term, got)
        else:
            assert abs(got[term] - want[term]) <= 0.10 * want[term], (term, got[term], want[term])
