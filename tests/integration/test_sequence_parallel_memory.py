"""The long-context memory tricks, measured against the planner's memory model (engine/memory.py).

Two gloo ranks train the bundled Llama one step per case; each case's saved-activation bytes
(`Engine.state_summary()["activations_bytes"]`, distinct storages autograd saved, measured with
saved-tensor hooks) must match `expected_state_summary` within 10%, and so must the drop each
feature causes against its baseline (tiled loss, tiled MLP, activation offload, sp 2). The bytes
activation offload moved to host memory must match the model's `offloaded activations` term.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

WORKER = r"""
import json, sys, torch
from dsl.engine import dist, initialize
from dsl.engine.model import Llama
from dsl.engine.train_config import ModelConfig
cases, model = json.loads(sys.argv[1]), json.loads(sys.argv[2])
ctx = dist.setup()
out = []
for case in cases:
    cfg = ModelConfig(**{**model, **case.pop("model", {})})
    torch.manual_seed(0)
    net = Llama(cfg)
    engine = initialize(net, case)
    engine.measure_activations = True  # measuring is opt-in (a Python hook per saved tensor)
    sp, shard = engine.groups.sp, cfg.seq_len // engine.groups.sp
    g = torch.Generator().manual_seed(engine.groups.dp_rank)
    tokens = torch.randint(cfg.vocab_size, (case["micro_batch"], cfg.seq_len), generator=g)
    lo = engine.groups.sp_rank * shard
    loss = engine(tokens[:, lo:lo + shard], tokens[:, lo:lo + shard], positions=torch.arange(lo, lo + shard))
    loss.backward()
    engine.step()
    engine.zero_grad()
    summary = engine.state_summary()
    summary["offloaded"] = net.activation_offload.offloaded_bytes if net.activation_offload else 0
    out.append(summary)
    engine.close()
print("RESULT " + json.dumps(out), flush=True)
dist.teardown(ctx)
from dsl.engine.train import exit_now  # as a dsl rank ends: no C++ static destructors
exit_now(0)
"""

MODEL = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=176, seq_len=256, tie_word_embeddings=False)
TILED_LOSS = {"tiled_loss": {"enabled": True, "chunk_tokens": 128}}
TILED_MLP = {"tiled_mlp": {"enabled": True, "chunk_tokens": 128}}
OFFLOAD = {"activation_checkpointing": True, "activation_offload": True}
CASES = {
    "plain": {},
    "tiled-loss": TILED_LOSS,
    "tiled-mlp": TILED_MLP,
    "tiled-both": {**TILED_LOSS, **TILED_MLP},
    "checkpointing": {"activation_checkpointing": True},
    "checkpoint-offload": OFFLOAD,
    "bf16-plain": {"precision": "bf16"},
    "bf16-tiled-both": {"precision": "bf16", **TILED_LOSS, **TILED_MLP},
    "sp2": {"sequence_parallel": 2},
    "sp2-kv1": {"sequence_parallel": 2, "model": {"num_key_value_heads": 1}},
    "sp2-zero3-bf16-all": {"sequence_parallel": 2, "zero_stage": 3, "precision": "bf16", **TILED_LOSS,
                           **TILED_MLP, **OFFLOAD},
}
DROPS = [("plain", "tiled-loss"), ("plain", "tiled-mlp"), ("plain", "tiled-both"), ("checkpointing", "checkpoint-offload"),
         ("bf16-plain", "bf16-tiled-both"), ("plain", "sp2")]


def _expected(name: str) -> tuple[int, int]:
    from dsl.engine.config import EngineConfig
    from dsl.engine.memory import OFFLOADED_ACTIVATIONS, ModelShape, estimate, expected_state_summary
    from dsl.engine.train_config import ModelConfig

    case = {"micro_batch": 2, **CASES[name]}
    model = ModelConfig(**{**MODEL, **case.pop("model", {})})
    engine = EngineConfig(**case)
    sp = engine.sequence_parallel
    acts = expected_state_summary(model, engine, dp=2 // sp, sp=sp)["activations_bytes"]
    off = estimate(ModelShape.of(model), engine, dp=2 // sp, sp=sp, accelerator=False).term(OFFLOADED_ACTIVATIONS)
    return acts, off.host_bytes + off.device_bytes


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict[str, dict]:
    cases = [{"micro_batch": 2, **c} for c in CASES.values()]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(cases), json.dumps(MODEL)],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      cwd=tmp_path_factory.mktemp("ranks")))
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    line = next(l for l in outputs[0][0].splitlines() if l.startswith("RESULT "))
    return dict(zip(CASES, json.loads(line[len("RESULT "):])))


@pytest.mark.parametrize("name", list(CASES))
def test_saved_activation_bytes_match_the_memory_model(measured: dict[str, dict], name: str) -> None:
    want, want_off = _expected(name)
    got = measured[name]["activations_bytes"]
    assert abs(got - want) <= 0.10 * want, f"{name}: measured {got:,} B, predicted {want:,} B"
    got_off = measured[name]["offloaded"]
    assert abs(got_off - want_off) <= 0.10 * max(want_off, 1), f"{name}: offloaded {got_off:,} B, predicted {want_off:,} B"


@pytest.mark.parametrize(("base", "feature"), DROPS)
def test_each_feature_cuts_activations_as_predicted(measured: dict[str, dict], base: str, feature: str) -> None:
    got = measured[base]["activations_bytes"] - measured[feature]["activations_bytes"]
    want = _expected(base)[0] - _expected(feature)[0]
    assert want > 0.05 * _expected(base)[0]  # a real cut, not noise
    assert abs(got - want) <= 0.10 * want, f"{feature} vs {base}: measured drop {got:,} B, predicted {want:,} B"
