"""The engine in a single process (world_size 1): training, accumulation, clipping, refusals."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.distributed

from dsl.engine import initialize
from dsl.engine.config import EngineConfig, unsupported_reason
from dsl.engine.train_config import DataConfig, ModelConfig
from dsl.engine.data import SyntheticData
from dsl.engine.errors import UserError
from dsl.engine.model import GPT

SMALL = ModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, seq_len=32)


def _engine(model_cfg: ModelConfig = SMALL, seed: int = 0, lr: float = 0.1, **engine: Any):
    torch.manual_seed(seed)
    return initialize(GPT(model_cfg), {"grad_clip": None, **engine}, lr=lr)


def _batches(n: int, micro_batch: int, cfg: ModelConfig = SMALL, step: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    data = SyntheticData(DataConfig(), vocab_size=cfg.vocab_size, seq_len=cfg.seq_len, micro_batch=micro_batch)
    return [data.batch(step, i) for i in range(n)]


def _params(engine) -> list[torch.Tensor]:
    return [p.detach().clone() for p in engine.module.parameters()]


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def test_loss_falls_within_50_steps() -> None:
    cfg = ModelConfig()  # the defaults: vocab 256, hidden 64, 2 layers, seq 64
    engine = _engine(cfg, lr=3e-3, optimizer={"type": "adamw"}, grad_clip=1.0)
    data = SyntheticData(DataConfig(), vocab_size=cfg.vocab_size, seq_len=cfg.seq_len, micro_batch=8)
    losses = []
    for step in range(1, 51):
        loss = engine(*data.batch(step))
        loss.backward()
        engine.step()
        engine.zero_grad()
        losses.append(loss.item())
    assert abs(losses[0] - math.log(cfg.vocab_size)) < 0.1
    assert sum(losses[-5:]) / 5 < losses[0] - 1.5, losses[::10]


# AdamW's first update is about lr * sign(grad), so its parameters amplify the fp32 rounding of
# tiny gradient elements; a smaller lr keeps the comparison at the 1e-6 tolerance. SGD's first
# update is lr * grad: the sharper check that the accumulated gradient is the mean.
@pytest.mark.parametrize(("optimizer", "lr"), [("sgd", 0.1), ("adamw", 1e-3)])
def test_grad_accum_2x4_equals_1x8(optimizer: str, lr: float) -> None:
    (x0, y0), (x1, y1) = _batches(2, micro_batch=4)
    accum = _engine(optimizer={"type": optimizer}, lr=lr, grad_accum=2, bucket_mib=0.01)  # several buckets
    assert len(accum.reducer.buckets) > 3
    for x, y in ((x0, y0), (x1, y1)):
        assert accum.is_accumulation_boundary == (accum.micro_step == 1)
        accum(x, y).backward()
    accum.step()
    whole = _engine(optimizer={"type": optimizer}, lr=lr, grad_accum=1)
    whole(torch.cat([x0, x1]), torch.cat([y0, y1])).backward()
    whole.step()
    grads = lambda e: [p.grad for p in e.module.parameters()]  # noqa: E731
    torch.testing.assert_close(grads(accum), grads(whole), atol=1e-7, rtol=0)
    assert _max_diff(_params(accum), _params(whole)) < 1e-6
    assert _max_diff(_params(whole), _params(_engine())) > 5e-4  # the step did move the weights


def test_gradients_are_views_of_buckets_and_summary_counts_bytes() -> None:
    engine = _engine(optimizer={"type": "adamw"}, bucket_mib=0.01)
    n = sum(p.numel() for p in engine.module.parameters())
    before = engine.state_summary()
    assert before == {"params_bytes": 4 * n, "grads_bytes": 4 * n, "optimizer_states_bytes": 0, "total_bytes": 8 * n}
    engine(*_batches(1, 4)[0]).backward()
    engine.step()
    after = engine.state_summary()
    # AdamW: exp_avg and exp_avg_sq (fp32) per element, plus a scalar step per tensor.
    n_tensors = len(list(engine.module.parameters()))
    assert after["optimizer_states_bytes"] == 8 * n + 4 * n_tensors
    flats = {b.flat.data_ptr(): b.flat for b in engine.reducer.buckets}
    for p in engine.module.parameters():
        assert any(f.data_ptr() <= p.grad.data_ptr() < f.data_ptr() + f.numel() * 4 for f in flats.values())


def test_clipping_bounds_the_global_norm_and_the_update() -> None:
    max_norm = 0.05
    x, y = _batches(1, 8)[0]
    engine = _engine(optimizer={"type": "sgd"}, lr=1.0, grad_clip=max_norm)
    start = _params(engine)
    engine(x, y).backward()
    engine.step()
    assert engine.last_grad_norm > 10 * max_norm  # clipping was active
    grads = [p.grad for p in engine.module.parameters()]
    assert float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))) == pytest.approx(max_norm, rel=1e-4)
    # SGD's first step moves by lr * (clipped) gradient: the update norm is bounded too.
    update = torch.linalg.vector_norm(torch.stack([(a - b).norm() for a, b in zip(start, _params(engine))]))
    assert float(update) == pytest.approx(max_norm, rel=1e-4)
    # Same as torch's own clipping on an unclipped copy.
    ref = _engine(optimizer={"type": "sgd"}, lr=1.0, grad_clip=None)
    ref(x, y).backward()
    ref.reducer.finish()
    torch.nn.utils.clip_grad_norm_(list(ref.module.parameters()), max_norm)
    torch.testing.assert_close([p.grad for p in ref.module.parameters()], grads, atol=1e-8, rtol=1e-5)


def test_no_clipping_leaves_gradients_untouched() -> None:
    x, y = _batches(1, 8)[0]
    engine = _engine(optimizer={"type": "sgd"}, grad_clip=None)
    engine(x, y).backward()
    torch.manual_seed(0)
    model = GPT(SMALL)
    model(x, y).backward()
    engine.step()
    assert engine.last_grad_norm > 0.05
    torch.testing.assert_close([p.grad for p in engine.module.parameters()], [p.grad for p in model.parameters()])


def test_world_size_1_never_communicates(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("all_reduce called at world_size 1")

    monkeypatch.setattr(torch.distributed, "all_reduce", refuse)
    engine = _engine(grad_accum=2, bucket_mib=0.01)
    for x, y in _batches(2, 4):
        engine(x, y).backward()
    engine.step()
    assert engine.reducer.collectives_launched == 0
    assert engine.global_step == 1


def test_optimizer_zero_grad_set_to_none_does_not_break_buckets() -> None:
    batches = _batches(2, 4)
    results = []
    for use_optimizer_zero_grad in (False, True):
        engine = _engine(optimizer={"type": "sgd"})
        for x, y in batches:
            engine(x, y).backward()
            engine.step()
            if use_optimizer_zero_grad:
                engine.optimizer.zero_grad(set_to_none=True)
            else:
                engine.zero_grad()
        results.append(_params(engine))
    assert _max_diff(*results) < 1e-7


def test_bf16_trains_with_fp32_params_and_grads() -> None:
    engine = _engine(lr=3e-3, optimizer={"type": "adamw"}, precision="bf16")
    batches = _batches(30, 8)
    losses = []
    for x, y in batches:
        assert engine(x).dtype == torch.bfloat16  # the forward runs under autocast
        loss = engine(x, y)
        loss.backward()
        engine.step()
        engine.zero_grad()
        losses.append(loss.item())
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in engine.module.parameters())
    assert losses[-1] < losses[0] - 0.5


def test_schedule_sets_the_lr_of_each_step() -> None:
    torch.manual_seed(0)
    engine = initialize(GPT(SMALL), EngineConfig(), lr=1.0, schedule=lambda step: 0.01 * step)
    for step, (x, y) in enumerate(_batches(3, 2), start=1):
        engine(x, y).backward()
        engine.step()
        engine.zero_grad()
        assert engine.lr == pytest.approx(0.01 * step)
        assert all(g["lr"] == pytest.approx(0.01 * step) for g in engine.optimizer.param_groups)


@pytest.mark.parametrize("engine_cfg", [{"zero_stage": 1}, {"zero_stage": 3}, {"precision": "fp16"}])
def test_unsupported_configs_raise_user_error_with_the_reason(engine_cfg: dict[str, Any]) -> None:
    reason = unsupported_reason(EngineConfig(**engine_cfg))
    assert reason
    with pytest.raises(UserError) as info:
        initialize(GPT(SMALL), engine_cfg)
    assert str(info.value) == reason


def test_invalid_engine_mapping_names_the_field() -> None:
    with pytest.raises(UserError, match=r"engine\.micro_batch: .*greater than or equal to 1"):
        initialize(GPT(SMALL), {"micro_batch": 0})
    with pytest.raises(UserError, match=r"engine\.bucket_mb: Extra inputs"):
        initialize(GPT(SMALL), {"bucket_mb": 4})


def test_a_model_can_be_wrapped_only_once() -> None:
    model = GPT(SMALL)
    initialize(model)
    with pytest.raises(UserError, match="already wrapped"):
        initialize(model)


def test_step_and_backward_counts_must_match_grad_accum() -> None:
    x, y = _batches(1, 2)[0]
    engine = _engine(grad_accum=2)
    engine(x, y).backward()
    with pytest.raises(UserError, match="after 1 backward passes, but grad_accum is 2"):
        engine.step()
    engine(x, y).backward()
    with pytest.raises(UserError, match="backward pass 3 since the last engine.step"):
        engine(x, y).backward()
