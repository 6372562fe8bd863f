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


def test_a_deepspeed_training_loop_runs_unchanged() -> None:
    """`engine.backward(loss)` then `engine.step()` after every micro-batch, no zero_grad: the
    loop of a DeepSpeed script. With grad_accum 2 over 3 steps it updates at the boundaries only
    and gives the parameters of dsl's own loop, bit for bit."""
    batches = [_batches(2, micro_batch=4, step=step) for step in (1, 2, 3)]
    ds = _engine(optimizer={"type": "adamw"}, lr=1e-3, grad_accum=2)
    for pair in batches:
        for micro, (x, y) in enumerate(pair):
            assert ds.is_gradient_accumulation_boundary() == (micro == 1)
            ds.backward(ds(x, y))
            before = ds.optimizer_steps
            ds.step()  # a no-op after the first micro-batch, the update after the second
            assert ds.optimizer_steps == before + (micro == 1)
    own = _engine(optimizer={"type": "adamw"}, lr=1e-3, grad_accum=2)
    for pair in batches:
        for x, y in pair:
            own(x, y).backward()
        own.step()
        own.zero_grad()
    assert ds.optimizer_steps == own.optimizer_steps == 3
    assert _max_diff(_params(ds), _params(own)) == 0.0
    assert all(float(p.grad.abs().max()) == 0.0 for p in ds.module.parameters())  # zeroed by step()


def test_activation_measurement_is_off_until_a_summary_asks_for_it() -> None:
    engine = _engine()
    packed: list[int] = []
    original = engine._before_forward

    def spy(module, args):  # records whether a forward installed the saved-tensor counter
        original(module, args)
        packed.append(engine._act_ctx is not None)

    engine._module_hooks[0].remove()
    engine._module_hooks[0] = engine.module.register_forward_pre_hook(spy, prepend=True)
    x, y = _batches(1, 4)[0]
    engine(x, y).backward()
    engine.step()
    engine.zero_grad()
    assert packed == [False]  # no per-saved-tensor hook on an ordinary training forward
    assert engine.state_summary()["activations_bytes"] == 0  # nothing was measured yet
    engine(x, y)
    assert packed == [False, True]
    assert engine.state_summary()["activations_bytes"] > 0


def test_gradients_are_views_of_buckets_and_summary_counts_bytes() -> None:
    engine = _engine(optimizer={"type": "adamw"}, bucket_mib=0.01)
    n = sum(p.numel() for p in engine.module.parameters())
    before = engine.state_summary()
    # AdamW's exp_avg and exp_avg_sq (fp32) exist from initialize on; no activations yet.
    assert before == {"params_bytes": 4 * n, "grads_bytes": 4 * n, "optimizer_states_bytes": 8 * n,
                      "activations_bytes": 0, "total_bytes": 16 * n,
                      "offload_cpu_bytes": 0, "offload_nvme_bytes": 0}
    x, y = _batches(1, 4)[0]
    engine(x, y).backward()
    engine.step()
    after = engine.state_summary()
    assert after["optimizer_states_bytes"] == 8 * n
    assert after["activations_bytes"] > 0
    assert after["total_bytes"] == 16 * n + after["activations_bytes"]
    # The same forward saves the same bytes; a larger batch saves more.
    engine(x, y)
    assert engine.state_summary()["activations_bytes"] == after["activations_bytes"]
    x2, y2 = _batches(1, 8)[0]
    engine(x2, y2)
    assert engine.state_summary()["activations_bytes"] > after["activations_bytes"]
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


@pytest.mark.parametrize(("layout", "param_dtype"), [("autocast", torch.float32), (None, torch.bfloat16)])
def test_bf16_trains_in_both_precision_layouts(layout, param_dtype) -> None:
    """autocast: fp32 parameters and gradients; master (the default): bf16 parameters whose
    gradients are taken into fp32 buffers at once (param.grad stays None), fp32 master apart."""
    engine = _engine(lr=3e-3, optimizer={"type": "adamw"}, precision="bf16", precision_layout=layout)
    batches = _batches(30, 8)
    losses = []
    for x, y in batches:
        assert engine(x).dtype == torch.bfloat16  # the forward runs under autocast
        loss = engine(x, y)
        loss.backward()
        engine.step()
        engine.zero_grad()
        losses.append(loss.item())
    assert all(p.dtype == param_dtype for p in engine.module.parameters())
    if param_dtype == torch.float32:
        assert all(p.grad.dtype == torch.float32 for p in engine.module.parameters())
    else:
        assert engine.stage.master.flat.dtype == torch.float32 and engine.stage.grad_flat.dtype == torch.float32
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


@pytest.mark.parametrize(
    ("engine_cfg", "words"),
    [
        ({"low_precision_states": True}, "precision: fp32"),
        ({"zero_stage": 2, "offload": {"optimizer": "nvme"}}, "nvme_path"),
        ({"zero_stage": 3, "offload": {"params": "cpu"}}, "offload.params"),
        ({"activation_offload": True}, "activation_checkpointing: true"),
    ],
)
def test_unsupported_configs_raise_user_error_with_the_reason(engine_cfg: dict[str, Any], words: str) -> None:
    reason = unsupported_reason(EngineConfig(**engine_cfg))  # `engine.<field>: <message>`
    assert reason and words in reason
    with pytest.raises(UserError) as info:
        initialize(GPT(SMALL), engine_cfg)
    assert str(info.value) == reason


@pytest.mark.parametrize("engine_cfg", [{"zero_stage": s} for s in (0, 1, 2, 3)] + [
    {"precision": "fp16"}, {"precision": "bf16", "low_precision_states": True},
    {"zero_stage": 1, "offload": {"optimizer": "cpu"}}, {"zero_stage": "auto", "offload": {"optimizer": "auto"}}])
def test_implemented_features_are_supported(engine_cfg: dict[str, Any]) -> None:
    assert unsupported_reason(EngineConfig(**engine_cfg)) is None


def test_invalid_engine_mapping_names_the_field() -> None:
    with pytest.raises(UserError, match=r"engine\.micro_batch: .*greater than or equal to 1"):
        initialize(GPT(SMALL), {"micro_batch": 0})
    with pytest.raises(UserError, match=r"engine\.bucket_mb: unknown field 'bucket_mb'; did you mean 'bucket_mib'\?"):
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


def test_lr_and_weight_decay_default_to_the_config_and_total_steps_builds_its_schedule() -> None:
    torch.manual_seed(0)
    cfg = {"optimizer": {"lr": 0.02, "weight_decay": 0.1}, "scheduler": {"type": "linear", "warmup_steps": 2, "min_lr_ratio": 0.5}}
    engine = initialize(GPT(SMALL), cfg, total_steps=6)
    assert engine.lr == pytest.approx(0.01)  # step 1 of a 2-step warm-up
    assert engine.optimizer.param_groups[0]["weight_decay"] == 0.1
    lrs = []
    for x, y in _batches(6, 2):
        engine(x, y).backward()
        engine.optimizer.step()  # the whole engine step
        engine.optimizer.zero_grad()
        lrs.append(engine.lr)
    assert engine.global_step == 6
    assert lrs == pytest.approx([0.01, 0.02, 0.02 - 0.01 / 4, 0.02 - 0.01 / 2, 0.02 - 0.03 / 4, 0.01])
    # Without a schedule or total_steps: the config's lr, constant; explicit kwargs override.
    assert initialize(GPT(SMALL), cfg).lr == 0.02
    assert initialize(GPT(SMALL), cfg, lr=0.5, weight_decay=0.0).optimizer.param_groups[0]["weight_decay"] == 0.0


def test_schedule_shapes() -> None:
    from dsl.engine.config import SchedulerConfig
    from dsl.engine.schedule import WarmupConstant, WarmupLinear, from_config

    linear = WarmupLinear(lr=1.0, warmup_steps=10, total_steps=110, min_lr_ratio=0.0)
    assert [linear(s) for s in (5, 10, 60, 110, 200)] == pytest.approx([0.5, 1.0, 0.5, 0.0, 0.0])
    const = WarmupConstant(lr=1.0, warmup_steps=4, total_steps=10)
    assert [const(s) for s in (2, 4, 10, 50)] == pytest.approx([0.5, 1.0, 1.0, 1.0])
    cosine = from_config(SchedulerConfig(type="cosine", warmup_steps=0, min_lr_ratio=0.0), 1.0, 100)
    assert cosine(50) == pytest.approx(0.5) and cosine(100) == pytest.approx(0.0)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_every_stage_trains_like_stage_0_in_one_process(stage: int) -> None:
    """world_size 1 runs the stages' own code (partition = everything); same losses and weights."""
    runs = []
    for s in (0, stage):
        engine = _engine(lr=1e-2, optimizer={"type": "adamw"}, zero_stage=s, grad_accum=2, bucket_mib=0.01)
        losses = []
        for step in range(1, 6):
            for m, (x, y) in enumerate(_batches(2, 4, step=step)):
                loss = engine(x, y)
                loss.backward()
            engine.step()
            engine.zero_grad()
            losses.append(loss.item())
        runs.append((losses, engine.full_state_dict()))
    (l0, p0), (l1, p1) = runs
    assert l0 == pytest.approx(l1, abs=1e-6)
    assert max(float((p0[n] - p1[n]).abs().max()) for n in p0) < 1e-6
    assert l0[-1] < l0[0]


def test_fp16_scales_gradients_and_grows_the_scale_after_the_interval() -> None:
    x, y = _batches(1, 8)[0]
    ref = _engine(optimizer={"type": "sgd"}, lr=0.1)
    ref(x, y).backward()
    ref.reducer.finish()
    engine = _engine(optimizer={"type": "sgd"}, lr=0.1, precision="fp16",
                     loss_scale={"initial_scale_power": 8, "growth_interval": 2})
    loss = engine(x, y)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(ref.module(x, y).item(), abs=1e-2)
    loss.backward()
    # Gradients arrive multiplied by the loss scale (fp16 compute: about 3 significant digits),
    # in the stage's fp32 gradient buffer (the master layout's fp16 parameters keep no .grad).
    torch.testing.assert_close(engine.stage.grads_full / 256, ref.stage.grads_full, atol=2e-4, rtol=2e-2)
    engine.step()
    engine.zero_grad()
    assert engine.last_grad_norm == pytest.approx(ref._grad_stats(ref.stage.grad_flat)[0] ** 0.5, rel=2e-2)
    assert not engine.last_step_skipped and engine.loss_scale == 256
    for _ in range(2):
        engine.zero_grad()
        engine(x, y).backward()
        engine.step()
    assert engine.loss_scale == 512  # the clean step after 2 (= growth_interval) clean steps, DeepSpeed's count


def test_static_loss_scale_never_changes_and_overflow_still_skips() -> None:
    engine = _engine(optimizer={"type": "sgd"}, precision="fp16", loss_scale={"static": 4.0})
    x, y = _batches(1, 4)[0]
    before = _params(engine)
    engine(x, y).backward()
    engine.stage.grad_flat[0] = float("nan")  # the fp32 gradient buffer (any precision layout)
    engine.step()
    assert engine.last_step_skipped and engine.loss_scale == 4.0
    assert _max_diff(before, _params(engine)) == 0.0


def test_low_precision_states_keep_bf16_parameters_and_states_and_train() -> None:
    engine = _engine(lr=3e-3, optimizer={"type": "adamw"}, precision="bf16", low_precision_states=True)
    n = sum(p.numel() for p in engine.module.parameters())
    assert all(p.dtype == torch.bfloat16 for p in engine.module.parameters())
    s = engine.state_summary()
    assert (s["params_bytes"], s["grads_bytes"], s["optimizer_states_bytes"]) == (2 * n, 2 * n, 4 * n)
    losses = []
    for x, y in _batches(30, 8):
        loss = engine(x, y)
        loss.backward()
        engine.step()
        engine.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_seed_everything_makes_models_identical() -> None:
    from dsl.engine.core import seed_everything

    seed_everything(7)
    a = [p.detach().clone() for p in GPT(SMALL).parameters()]
    seed_everything(7)
    b = [p.detach().clone() for p in GPT(SMALL).parameters()]
    assert _max_diff(a, b) == 0.0


def test_close_removes_the_hooks() -> None:
    engine = _engine()
    model = engine.module
    engine.close()
    x, y = _batches(1, 2)[0]
    for _ in range(3):  # more backwards than grad_accum: nobody counts them any more
        model(x, y).backward()
