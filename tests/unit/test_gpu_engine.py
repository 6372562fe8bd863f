"""The engine's CUDA paths on a real GPU (marked `gpu`: `make test-gpu` runs them; skipped here).

What only a GPU can show: the precision layouts' dtypes and device bytes as the CUDA allocator
counts them, page-locked host buffers and asynchronous copies of the CPU/NVMe offloads
(engine/transfer.py), the device-side gradient statistics, TF32, the kv-head choice of
engine/sdpa.py, activation offload's pinned copies. Each compares with the CPU run of the same
case where numbers are involved. The same logic is checked on CPU through fakes and the meta
device in tests/unit/test_gpu_readiness.py and tests/unit/test_meta_device.py.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CUDA = torch.device("cuda", 0)


def _model(kv_heads: int = 4, checkpointing: bool = False):
    from dsl.engine.model import Llama
    from dsl.engine.train_config import ModelConfig

    torch.manual_seed(0)
    return Llama(ModelConfig(preset="tiny", num_key_value_heads=kv_heads), activation_checkpointing=checkpointing)


def _train(config: dict, device: torch.device, steps: int = 5, **model_kw) -> tuple[list[float], object]:
    from dsl.engine import initialize

    engine = initialize(_model(**model_kw), {"grad_clip": 1.0, **config}, device=device)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        tokens = torch.randint(0, 256, (4, 65), generator=g).to(device)
        loss = engine(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        engine.step()
        engine.zero_grad()
        losses.append(float(loss.detach()))
    return losses, engine


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("layout", ["master", "autocast"])
def test_bf16_layouts_on_cuda_follow_the_cpu_run(stage, layout):
    cfg = {"zero_stage": stage, "precision": "bf16", "precision_layout": layout}
    gpu, engine = _train(cfg, CUDA)
    cpu, _ = _train(cfg, torch.device("cpu"))
    assert max(abs(a - b) for a, b in zip(gpu, cpu)) < 5e-2
    p = next(engine.module.parameters())
    if stage < 3:
        assert p.dtype == (torch.bfloat16 if layout == "master" else torch.float32) and p.device.type == CUDA.type


@pytest.mark.parametrize("stage", [2, 3])
def test_cpu_offload_leaves_only_16_bit_parameters_on_the_device(stage):
    """Master and gradient partitions page-locked in host memory; the CUDA allocator's bytes
    after a step are the 16-bit parameters (plus at stage 3 nothing gathered), not more."""
    cfg = {"zero_stage": stage, "precision": "bf16", "offload": {"optimizer": "cpu"}}
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(CUDA)
    _, engine = _train(cfg, CUDA, steps=2)
    assert engine.stage.grads_on_host and engine.stage.grad_flat.is_pinned()
    assert engine.stage.host_master() is not None and engine.stage.host_master().is_pinned()
    assert all(f.is_pinned() for f in engine.states.flats.values())
    summary = engine.state_summary()
    assert summary["grads_bytes"] == 0 and summary["optimizer_states_bytes"] == 0
    held = torch.cuda.memory_allocated(CUDA) - before
    assert held <= summary["params_bytes"] + 4 * 2**20  # parameters + allocator rounding


@pytest.mark.parametrize("kind", ["cpu", "nvme"])
def test_offload_matches_no_offload_on_cuda(kind, tmp_path):
    base = {"zero_stage": 2, "precision": "fp32", "tf32": False}
    ref, _ = _train(base, CUDA)
    got, engine = _train({**base, "offload": {"optimizer": kind, "nvme_path": str(tmp_path), "sub_group_mib": 0.05}},
                         CUDA)
    assert max(abs(a - b) for a, b in zip(ref, got)) < 1e-5
    engine.close()


@pytest.mark.parametrize("params", ["cpu", "nvme"])
def test_parameter_offload_on_cuda_matches_no_offload_and_leaves_only_gathers(params, tmp_path):
    """Stage 3 with offload.params: the same fp32 losses as no offload; the partitions are in
    page-locked host memory (cpu) or a file read through a page-locked buffer (nvme), and after a
    step the CUDA allocator holds no parameter bytes (every unit released)."""
    base = {"zero_stage": 3, "precision": "fp32", "tf32": False}
    ref, _ = _train(base, CUDA)
    torch.cuda.empty_cache()
    cfg = {**base, "offload": {"optimizer": "cpu", "params": params, "nvme_path": str(tmp_path),
                               "sub_group_mib": 0.05}}
    got, engine = _train(cfg, CUDA)
    assert max(abs(a - b) for a, b in zip(ref, got)) < 1e-5
    stage = engine.stage
    if params == "cpu":
        assert stage.master.is_pinned() and stage.master.device.type == "cpu"
    else:
        assert stage.work is None and stage._read_buf is not None and stage._read_buf.is_pinned()
        assert stage.files.bytes_read > 0 and stage.files.bytes_written > 0
    assert stage.live_numel == 0 and engine.state_summary()["params_bytes"] == 0
    engine.close()


def test_module_granularity_with_a_cap_on_cuda_matches_layer_gathers():
    base = {"zero_stage": 3, "precision": "bf16"}
    ref, layer = _train(base, CUDA)
    units = sorted(u.group.padded for u in layer.stage.units)
    got, engine = _train({**base, "stage3": {"gather": "module", "max_live_params": sum(units[-3:]),
                                             "prefetch_params": 10 ** 9}}, CUDA)
    assert max(abs(a - b) for a, b in zip(ref, got)) < 1e-2
    assert engine.stage.peak_live_numel <= sum(units[-3:]) and not engine.stage.notes


def test_transfer_copies_are_asynchronous_and_waited_for():
    from dsl.engine import transfer

    src = torch.randn(1 << 22, device=CUDA)
    host = transfer.host_empty(src.numel(), src.dtype, pinned=True)
    pending = transfer.to_host(host, src)
    pending.wait()
    assert torch.equal(host, src.cpu())
    back = torch.empty_like(src)
    transfer.to_device(back, host).wait()
    assert torch.equal(back, src)


def test_grad_stats_run_on_the_device_and_flag_inf():
    from dsl.engine.core import local_grad_stats, mark_nonfinite

    g = torch.ones(1000, device=CUDA)
    stats = local_grad_stats(g)
    assert stats.is_cuda and stats.tolist() == [1000.0, 0.0]
    g[3] = float("inf")
    stats = local_grad_stats(g)
    mark_nonfinite(stats, g)
    assert stats[1].item() == 1.0


def test_tf32_default_and_off():
    _train({"precision": "fp32"}, CUDA, steps=1)
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    _train({"precision": "fp32", "tf32": False}, CUDA, steps=1)
    assert torch.backends.cuda.matmul.fp32_precision == "ieee"


def test_fp32_gqa_attention_avoids_the_math_kernel():
    """With kv heads repeated (engine/sdpa.py) fp32 GQA runs without the T x T score matrix:
    the math backend alone is disabled and attention still runs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from dsl.engine.sdpa import causal_sdpa

    q = torch.randn(1, 8, 4096, 64, device=CUDA)
    k = v = torch.randn(1, 2, 4096, 64, device=CUDA)
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        out = causal_sdpa(q, k, v)
    assert out.shape == q.shape


def test_activation_offload_on_cuda_matches_plain_checkpointing():
    base = {"zero_stage": 0, "precision": "fp32", "tf32": False, "activation_checkpointing": True}
    plain, _ = _train(base, CUDA, checkpointing=True)
    off, _ = _train({**base, "activation_offload": True}, CUDA, checkpointing=True)
    assert plain == off
