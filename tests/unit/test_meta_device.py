"""The engine's device-side tensor math on the `meta` device: a CPU tensor mixed in fails here.

No GPU runs in CI, and a CPU-created tensor mixed into CUDA math (`torch.stack([cuda_scalar,
torch.tensor(x)])`, a gradient slice handed to a CPU update) only fails on a GPU. PyTorch's
`meta` device raises on the same mix ("Tensor on device cpu is not on the expected device
meta!"), so these tests run the whole engine step with the model, its buffers and its states on
`meta`. A meta tensor has no values: the few places where the engine reads a device value in
Python or copies between the device and host memory (engine/transfer.py, their only home) are
replaced by stand-ins that produce placeholder values, and autocast (which has no meta backend)
is left out: the model then computes in fp32 while every buffer keeps its configured dtype.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from dsl.engine import core, precision, transfer
from dsl.engine.model import Llama
from dsl.engine.train_config import ModelConfig

META = torch.device("meta")


@pytest.fixture
def on_meta(monkeypatch):
    """Host reads and host<->device copies of meta tensors give placeholders; `norm` sets the
    value the engine reads back for the gradient statistics."""
    read = {"sumsq": 1.0, "flag": 0.0}

    def host_floats(t: torch.Tensor) -> list[float]:
        if not t.is_meta:
            return [float(v) for v in t.reshape(-1).tolist()]
        return [read["sumsq"], read["flag"]][: t.numel()] if t.numel() <= 2 else [0.0] * t.numel()

    def to_host(dst: torch.Tensor, src: torch.Tensor):
        assert not dst.is_meta, "to_host wrote into a device tensor"
        dst.zero_() if src.is_meta else dst.copy_(src)
        return transfer._DONE

    def to_device(dst: torch.Tensor, src: torch.Tensor):
        assert not src.is_meta, "to_device read from a device tensor"
        dst.copy_(src)
        return transfer._DONE

    def autocast(config, device):
        return contextlib.nullcontext() if device.type == "meta" else real_autocast(config, device)

    real_autocast = precision.autocast
    monkeypatch.setattr(transfer, "host_floats", host_floats)
    monkeypatch.setattr(transfer, "to_host", to_host)
    monkeypatch.setattr(transfer, "to_device", to_device)
    monkeypatch.setattr(precision, "autocast", autocast)
    return read


def _steps(engine: core.Engine, steps: int = 2, accum: int = 1) -> None:
    tokens = torch.randint(0, 256, (2, 16), device=META)
    for _ in range(steps):
        for _ in range(accum):
            engine(tokens, tokens).backward()
        engine.step()
        engine.zero_grad()


def _engine(tmp_path, stage, prec="fp32", offload="none", params="none", **extra) -> core.Engine:
    torch.manual_seed(0)
    model = Llama(ModelConfig(preset="tiny", num_key_value_heads=2),
                  activation_checkpointing=bool(extra.pop("activation_checkpointing", False)))
    off = {"optimizer": offload, "params": params, "nvme_path": str(tmp_path), "sub_group_mib": 0.01}
    conf = {"zero_stage": stage, "precision": prec, "grad_clip": 0.5, "offload": off, **extra}
    engine = core.initialize(model, conf, device=META)
    assert all(p.is_meta for p in engine.module.parameters())
    return engine


@pytest.mark.parametrize(("stage", "offload"), [(0, "none")] + [(s, o) for s in (1, 2, 3) for o in ("none", "cpu", "nvme")])
@pytest.mark.parametrize("prec", ["fp32", "bf16", "fp16"])
def test_engine_step_keeps_device_math_on_the_device(on_meta, tmp_path, stage, prec, offload):
    """Flatten/partition views, hooks, gradient statistics, clipping, loss-scale unscaling, the
    optimizer update (on the device, or handed to the host by the offload), the stage-3
    working-copy cast and the parameter refresh: all of it on meta."""
    engine = _engine(tmp_path, stage, prec, offload, grad_accum=2)
    _steps(engine, accum=2)
    assert engine.optimizer_steps == 2
    if offload != "none":  # the host side really is host memory
        assert engine.states.read("exp_avg").device.type == "cpu"
    engine.close()


@pytest.mark.parametrize("extra", [
    {"precision": "bf16", "low_precision_states": True},
    {"activation_checkpointing": True},
    {"tiled_loss": {"enabled": True, "chunk_tokens": 8}, "tiled_mlp": {"enabled": True, "chunk_tokens": 8}},
    {"optimizer": {"type": "sgd"}},
    {"comm": {"quantize_gradients": True}},
], ids=["low_precision_states", "checkpointing", "tiled", "sgd", "quantized"])
@pytest.mark.parametrize("stage", [2, 3])
def test_engine_variants_on_meta(on_meta, tmp_path, stage, extra):
    extra = dict(extra)
    engine = _engine(tmp_path, stage, **extra)
    _steps(engine)
    assert engine.optimizer_steps == 2


@pytest.mark.parametrize("prec", ["fp32", "bf16"])
def test_parameter_offload_on_meta(on_meta, tmp_path, prec):
    """Stage 3 with offload.params: cpu: host partitions copied up into each gathered unit."""
    engine = _engine(tmp_path, 3, prec, offload="cpu", params="cpu")
    _steps(engine)
    assert engine.stage.master.device.type == "cpu" and engine.stage.work.device.type == "cpu"
    assert all(u.full.is_meta for u in engine.stage.units)


def test_fp16_overflow_skip_on_meta(on_meta, tmp_path):
    """A non-finite norm makes the engine look for inf/nan in the gradient (mark_nonfinite) and
    skip the step: the flag is computed on the device too."""
    engine = _engine(tmp_path, 2, "fp16")
    on_meta["sumsq"], on_meta["flag"] = math.inf, 1.0
    _steps(engine, steps=1)
    assert engine.last_step_skipped and engine.skipped_steps == 1


@pytest.mark.parametrize("numel", [0, 1000])
def test_grad_stats_stay_on_the_gradient_device(numel):
    grads = torch.empty(numel, device=META)
    stats = core.local_grad_stats(grads)
    core.mark_nonfinite(stats, grads)
    assert stats.is_meta and stats.shape == (2,) and stats.dtype == torch.float32


def test_grad_stats_values_on_cpu():
    g = torch.tensor([3.0, 4.0])
    stats = core.local_grad_stats(g)
    assert stats.tolist() == [25.0, 0.0]
    core.mark_nonfinite(stats, torch.tensor([1.0, float("inf")]))
    assert stats.tolist() == [25.0, 1.0]
    assert core.local_grad_stats(torch.empty(0)).tolist() == [0.0, 0.0]


def test_loss_scaling_and_casts_on_meta():
    x = torch.ones(4, 3, device=META, requires_grad=True)
    y = precision.scale_outputs({"loss": x.sum(), "n": 3}, 1024.0)
    y["loss"].backward()
    assert x.grad.is_meta


def test_onebit_packing_and_int8_blocks_on_meta():
    from dsl.ops.comm import qreduce, signs

    bits = torch.empty(64, dtype=torch.bool, device=META)
    packed = signs.pack_bits(bits)
    assert packed.is_meta and signs.unpack_bits(packed).is_meta
    error = torch.zeros(64, device=META)
    packed, scales = signs.compress_(torch.zeros(64, device=META), error, 16, native=False)
    assert packed.is_meta and scales.is_meta
    assert signs.decompress(packed, scales, 16, native=False).is_meta
    q, s = qreduce.quantize_blocks(torch.zeros(4, 32, device=META), 8)
    assert qreduce.dequantize_blocks(q, s).is_meta


def test_tiled_loss_on_meta():
    from dsl.engine.long.tiled_loss import tiled_cross_entropy

    hidden = torch.empty(32, 8, device=META, requires_grad=True)
    weight = torch.empty(50, 8, device=META, requires_grad=True)
    loss = tiled_cross_entropy(hidden, weight, torch.zeros(32, dtype=torch.long, device=META), 8)
    loss.backward()
    assert hidden.grad.is_meta and weight.grad.is_meta


def test_optimizer_update_refuses_a_gradient_on_another_device():
    """The fused kernels read raw pointers: a device gradient handed to a host update must be an
    error (it was NVMe offload's bug: device gradient slices next to host buffers)."""
    from dsl.engine.optim import Hyper, update

    p, m, v = (torch.zeros(8) for _ in range(3))
    with pytest.raises(RuntimeError, match="gradient piece is on meta"):
        update(Hyper("adamw"), [p], [torch.zeros(8, device=META)], {"exp_avg": [m], "exp_avg_sq": [v]},
               [True], step=1, lr=1e-3)
