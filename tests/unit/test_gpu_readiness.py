"""GPU code paths that a CPU machine can still check: CUDA calls are replaced by fakes that
behave as torch's do on a GPU host (and fail as they would), the rest runs for real.

The device-mixing bugs of the engine's tensor math are in tests/unit/test_meta_device.py.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dsl.engine import checkpoint, compile as engine_compile, dist, memory, offload, precision, transfer
from dsl.engine.config import EngineConfig


class FakeCuda:
    """torch.cuda of a host with `count` GPUs, as far as RNG and device selection go."""

    def __init__(self, monkeypatch, count: int, current: int = 0):
        self.count, self.current, self.set_states = count, current, {}
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(torch.cuda, "set_device", self._set_device)
        monkeypatch.setattr(torch.cuda, "get_rng_state", self._get)
        monkeypatch.setattr(torch.cuda, "set_rng_state", self._set)
        # As torch defines them: one state per device index, in order.
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [self._get(i) for i in range(count)])
        monkeypatch.setattr(torch.cuda, "set_rng_state_all",
                            lambda states: [self._set(s, i) for i, s in enumerate(states)])

    def _index(self, device) -> int:
        index = torch.device("cuda", device).index if isinstance(device, int) else torch.device(device).index
        index = self.current if index is None else index
        if not 0 <= index < self.count:
            raise RuntimeError("CUDA error: invalid device ordinal")
        return index

    def _set_device(self, device) -> None:
        self.current = self._index(device)

    def _get(self, device="cuda") -> torch.Tensor:
        return torch.full((8,), self._index(device), dtype=torch.uint8)

    def _set(self, state, device="cuda") -> None:
        self.set_states[self._index(device)] = state


# Item 4: the CUDA RNG state of a checkpoint ------------------------------------------------


def test_rng_resume_with_fewer_visible_gpus_than_the_save(monkeypatch):
    """A checkpoint of an older dsl (every GPU's state, 8 of them) resumed where a rank sees 2."""
    saved = {"torch": torch.get_rng_state(), "python": __import__("random").getstate(),
             "cuda": [torch.full((8,), i, dtype=torch.uint8) for i in range(8)]}
    fake = FakeCuda(monkeypatch, count=2)
    checkpoint._set_rng_state(saved, torch.device("cuda", 1))
    assert list(fake.set_states) == [1] and int(fake.set_states[1][0]) == 1


def test_rng_state_is_the_ranks_own_device(monkeypatch):
    fake = FakeCuda(monkeypatch, count=4)
    state = checkpoint._rng_state(torch.device("cuda", 3))
    assert int(state["cuda"][0]) == 3  # one state, of this rank's GPU
    checkpoint._set_rng_state(state, torch.device("cuda", 0))  # resumed as local rank 0 elsewhere
    assert list(fake.set_states) == [0] and int(fake.set_states[0][0]) == 3
    assert checkpoint._rng_state(torch.device("cpu"))["cuda"] is None


# Item 5 and "no silent CPU": the rank's device ------------------------------------------------


def test_user_created_nccl_group_makes_the_ranks_gpu_current(monkeypatch):
    fake = FakeCuda(monkeypatch, count=2)
    monkeypatch.setattr(dist.tdist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist.tdist, "get_backend", lambda: "nccl")
    monkeypatch.setattr(dist.tdist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist.tdist, "get_world_size", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    ctx = dist.current()
    assert ctx.device == torch.device("cuda", 1)
    assert fake.current == 1  # object collectives and Triton launches now go to cuda:1


def test_single_process_on_a_gpu_host_uses_the_gpu(monkeypatch):
    FakeCuda(monkeypatch, count=1)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert dist.setup().device == torch.device("cuda", 0)
    assert dist.current().device == torch.device("cuda", 0)


def test_single_process_on_cpu_says_why(caplog):
    from dsl.engine import core

    with caplog.at_level(logging.INFO, logger="dsl.engine.core"):
        engine = core.initialize(nn.Linear(4, 4))
    assert engine.device.type == "cpu"
    assert "torch sees no CUDA device" in caplog.text


# compile: auto prints its fallback -------------------------------------------------------------


class _Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_compile_auto_failure_is_printed_and_runs_eagerly(monkeypatch, caplog):
    from torch._dynamo.exc import InternalTorchDynamoError

    def broken_compile(fn):
        def run(*args, **kwargs):
            raise InternalTorchDynamoError("inductor: no working C++ compiler")
        return run

    monkeypatch.delenv("TORCHDYNAMO_DISABLE", raising=False)
    monkeypatch.setattr(engine_compile.torch, "compile", broken_compile)
    model = _Blocks()
    x = torch.randn(3, 8)
    expected = model(x)
    names = engine_compile.compile_blocks(model, fallback=True)
    assert names == ["layers.0", "layers.1"]
    with caplog.at_level(logging.WARNING, logger="dsl.engine.compile"):
        out = model(x)
        model(x)
    assert torch.equal(out, expected)
    warnings = [r for r in caplog.records if "torch.compile failed" in r.getMessage()]
    assert len(warnings) == 1 and "layers.0" in warnings[0].getMessage()
    assert "InternalTorchDynamoError" in warnings[0].getMessage()
    # compile: true lets the error surface
    strict = _Blocks()
    engine_compile.compile_blocks(strict, fallback=False)
    with pytest.raises(InternalTorchDynamoError):
        strict(x)


def test_compile_auto_does_not_touch_dynamo_globally(monkeypatch):
    import torch._dynamo as dynamo

    monkeypatch.delenv("TORCHDYNAMO_DISABLE", raising=False)
    monkeypatch.setattr(engine_compile, "blockers", lambda *a: [])
    monkeypatch.setattr(engine_compile.torch, "compile", lambda fn: fn)
    before = dynamo.config.suppress_errors
    engine_compile.apply(_Blocks(), EngineConfig(compile="auto"), torch.device("cpu"))
    assert dynamo.config.suppress_errors == before


# TF32, attention kernel, Triton's compiler -----------------------------------------------------


def test_tf32_is_set_for_cuda_devices_only():
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    try:
        assert precision.apply_tf32(EngineConfig(), torch.device("cuda", 0))
        assert matmul.fp32_precision == "tf32"
        assert precision.apply_tf32(EngineConfig(tf32=False), torch.device("cuda", 0))
        assert matmul.fp32_precision == "ieee"
        matmul.fp32_precision = "ieee"
        assert not precision.apply_tf32(EngineConfig(), torch.device("cpu"))
        assert matmul.fp32_precision == "ieee"
    finally:
        matmul.fp32_precision = before


def test_explicit_gpu_only_settings_on_cpu_are_noted():
    from dsl.engine.core import device_notes

    cpu = torch.device("cpu")
    assert device_notes(EngineConfig(), cpu) == []  # defaults are not the user's settings
    assert device_notes(EngineConfig(tf32=True, offload={"optimizer": "cpu", "pin_memory": True}), cpu) == []
    notes = device_notes(EngineConfig(zero_stage=2, tf32=False, offload={"optimizer": "cpu", "pin_memory": False}), cpu)
    assert any("tf32" in n for n in notes) and any("pin_memory" in n for n in notes)
    assert device_notes(EngineConfig(tf32=False), torch.device("cuda", 0)) == []


def test_fp32_gqa_on_cuda_repeats_kv_heads_for_a_memory_efficient_kernel(monkeypatch):
    from dsl.engine import sdpa

    assert sdpa.expand_kv("cuda", torch.float32)  # flash (the only enable_gqa kernel) has no fp32
    assert not sdpa.expand_kv("cuda", torch.bfloat16)
    assert not sdpa.expand_kv("cpu", torch.float32)
    q, k, v = torch.randn(2, 8, 16, 4), torch.randn(2, 2, 16, 4), torch.randn(2, 2, 16, 4)
    shared = sdpa.causal_sdpa(q, k, v)
    calls = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        calls.append((k.shape[1], kwargs))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(sdpa, "expand_kv", lambda device_type, dtype: True)
    monkeypatch.setattr(sdpa.F, "scaled_dot_product_attention", spy)
    repeated = sdpa.causal_sdpa(q, k, v)
    assert calls == [(8, {"is_causal": True})]  # 8 kv heads, no enable_gqa
    torch.testing.assert_close(repeated, shared)


def test_triton_needs_a_host_c_compiler(monkeypatch):
    import dsl.ops.adam as adam

    monkeypatch.setattr(adam, "_cpu_state", {})
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("CC", raising=False)
    reason = adam.triton_reason()
    assert reason is not None and "C compiler" in reason  # triton itself is installed by make test


# Pinned, asynchronous offload buffers ----------------------------------------------------------


def test_offload_host_buffers_are_pinned_on_a_gpu_and_counted(monkeypatch, tmp_path):
    """On a CUDA device every host buffer of the CPU and NVMe offloads is requested page-locked
    (pin_memory() itself needs a GPU, so the request is recorded), the gradient comes down
    through two buffers, and state_summary's bytes equal the memory model's."""
    from dsl.engine.zero import build_stage
    from dsl.engine.zero.base import named_trainable
    from dsl.engine.optim import Hyper

    requested = []

    def host_empty(numel, dtype, *, pinned):
        requested.append(pinned)
        return torch.empty(numel, dtype=dtype)

    monkeypatch.setattr(transfer, "use_pinned", lambda device: True)
    monkeypatch.setattr(transfer, "host_empty", host_empty)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8))
    named = named_trainable(model)
    params = sum(p.numel() for _, p in named)
    # Stage 1: its gradient shard stays on the device and streams through the offload's buffers.
    stage = build_stage(1, model, named, bucket_bytes=1 << 20, grad_accum=1, world_size=1, rank=0,
                        dtype=torch.float32, device=torch.device("cpu"), work_dtype=None)
    sub_mib = 1024 * 4 / (1 << 20)  # 1024 fp32 elements per sub-group
    for kind in ("cpu", "nvme"):
        requested.clear()
        states = offload.build_states(stage, Hyper("adamw"), offload=kind, dtype=torch.float32,
                                      device=torch.device("cpu"), sub_group_mib=sub_mib, nvme_path=str(tmp_path))
        assert requested and all(requested), kind
        assert len(states._grads.bufs) == 2
        terms = {t.name: t for t in memory.model_states(params, stage=1, shards=1, precision="fp32",
                                                         offload_optimizer=kind, sub_group_mib=sub_mib)}
        host = sum(t.host_bytes for t in terms.values())
        assert states.memory()["offload_cpu_bytes"] == host, kind
        states.close()
    requested.clear()
    offload.build_states(stage, Hyper("adamw"), offload="cpu", dtype=torch.float32, device=torch.device("cpu"),
                         sub_group_mib=sub_mib, nvme_path=None, pin_memory=False)
    assert requested and not any(requested)


def test_offload_step_waits_for_copies_before_reading_them(monkeypatch):
    """The update reads a gradient sub-group only after its copy reported done, and the step
    returns only after the last upload did (asynchronous copies on a GPU)."""
    from dsl.engine.zero import build_stage
    from dsl.engine.zero.base import named_trainable
    from dsl.engine.optim import Hyper

    events = []

    class Pending:
        def __init__(self, what):
            self.what = what

        def wait(self):
            events.append(("wait", self.what))

    real_to_host, real_to_device = transfer.to_host, transfer.to_device

    def to_host(dst, src):
        real_to_host(dst, src)
        events.append(("down", dst.numel()))
        return Pending("down")

    def to_device(dst, src):
        real_to_device(dst, src)
        events.append(("up", dst.numel()))
        return Pending("up")

    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8))
    named = named_trainable(model)
    stage = build_stage(2, model, named, bucket_bytes=1 << 20, grad_accum=1, world_size=1, rank=0,
                        dtype=torch.float32, device=torch.device("cpu"), work_dtype=None)
    monkeypatch.setattr(transfer, "use_pinned", lambda device: True)
    monkeypatch.setattr(transfer, "host_empty", lambda n, dtype, pinned: torch.empty(n, dtype=dtype))
    states = offload.build_states(stage, Hyper("adamw"), offload="cpu", dtype=torch.float32,
                                  device=torch.device("cpu"), sub_group_mib=1024 * 4 / (1 << 20), nvme_path=None)
    monkeypatch.setattr(transfer, "to_host", to_host)
    monkeypatch.setattr(transfer, "to_device", to_device)
    update_calls = []
    real_update = offload.update
    monkeypatch.setattr(offload, "update", lambda *a, **k: (update_calls.append(len(events)), real_update(*a, **k)))
    states.step(torch.zeros(stage.layout.shard_numel), step=1, lr=1e-3)
    assert len(states.chunks) >= 3
    for at in update_calls:  # before each update: its sub-group's copy was waited for
        assert events[at - 1] == ("wait", "down")
    assert events[-1] == ("wait", "up")
    # the next sub-group's copy is issued before the current one is updated (overlap)
    first_update = update_calls[0]
    assert len([e for e in events[:first_update] if e[0] == "down"]) == 2


def test_onebit_unpack_table_is_made_once_per_device():
    from dsl.ops.comm import signs

    meta = torch.device("meta")
    assert signs._shifts_on(meta) is signs._shifts_on(meta)
    assert signs._shifts_on(meta).is_meta


def test_cpu_suite_hides_gpus():
    """tests/conftest.py hides GPUs from the CPU suite (a GPU host would pick NCCL otherwise)."""
    from tests.conftest import wants_gpu

    assert os.environ.get("CUDA_VISIBLE_DEVICES") == ""
    assert wants_gpu("gpu") and wants_gpu("gpu and not slow")
    assert not wants_gpu("") and not wants_gpu("not gpu") and not wants_gpu("integration")



def test_state_summary_reports_the_cuda_allocator_on_a_gpu(monkeypatch):
    from dsl.engine import core

    engine = core.initialize(nn.Linear(4, 4), device="meta")
    assert "device_peak_reserved_bytes" not in engine.state_summary()  # not a CUDA device
    calls = []
    for name, value in (("memory_allocated", 1), ("memory_reserved", 2), ("max_memory_allocated", 3),
                        ("max_memory_reserved", 4)):
        monkeypatch.setattr(torch.cuda, name, lambda device=None, v=value: v)
    monkeypatch.setattr(transfer, "wait_device", lambda device: calls.append(device))
    engine.device = torch.device("cuda", 0)
    summary = engine.state_summary()
    assert calls == [torch.device("cuda", 0)]  # synchronized before reading
    assert (summary["device_allocated_bytes"], summary["device_reserved_bytes"],
            summary["device_peak_allocated_bytes"], summary["device_peak_reserved_bytes"]) == (1, 2, 3, 4)
