"""The engine's parts on their own: partition layout, the optimizer update against a float64
reference, stochastic rounding, the loss scaler, stage-3 units, gathers and prefetch, stage 3's
bf16 working copy, and stage 2 keeping no full gradient. One process (world_size 1 runs the
stages' own code)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from dsl.engine import initialize
from dsl.engine.config import LossScaleConfig
from dsl.engine.optim import Hyper, stochastic_round_bf16, update, update_reference
from dsl.engine.precision import LossScaler
from dsl.engine.zero.layout import Layout, split_buckets
from dsl.engine.zero.stage3 import choose_units


def _named(shapes: list[tuple[int, ...]]) -> list[tuple[str, nn.Parameter]]:
    return [(f"p{i}", nn.Parameter(torch.randn(*s))) for i, s in enumerate(shapes)]


@pytest.mark.parametrize("parts", [1, 2, 3, 4])
def test_partitions_are_equal_and_cover_every_element_once(parts: int) -> None:
    rng = random.Random(parts)
    shapes = [tuple(rng.randint(1, 9) for _ in range(rng.randint(1, 2))) for _ in range(17)]
    named = _named(shapes)
    groups = split_buckets(named, bucket_bytes=4 * 40)
    layouts = [Layout(groups, parts=parts, rank=r) for r in range(parts)]
    assert len({lay.shard_numel for lay in layouts}) == 1  # equal sizes: gloo needs them
    owner: dict[tuple[str, int], int] = {}
    for r, lay in enumerate(layouts):
        for g in lay.groups:
            assert g.padded % parts == 0 and g.padded - g.numel < parts
            for slot, p_lo, shard_lo, n in lay.pieces(g):
                for i in range(p_lo, p_lo + n):
                    assert (slot.name, i) not in owner
                    owner[(slot.name, i)] = r
        # Segments: inside the shard, one decay class each, covering exactly the pieces.
        covered = sum(s.numel for s in lay.segments)
        assert covered == sum(n for g in lay.groups for *_, n in lay.pieces(g))
        assert all(0 <= s.shard_lo and s.shard_lo + s.numel <= lay.shard_numel for s in lay.segments)
    assert len(owner) == sum(p.numel() for _, p in named)


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_update_matches_the_float64_reference(kind: str) -> None:
    torch.manual_seed(0)
    hyper = Hyper(kind, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, momentum=0.9)
    names = ("exp_avg", "exp_avg_sq") if kind == "adamw" else ("momentum_buffer",)
    params = [torch.randn(n) for n in (5, 1000, 33)]
    decay = [True, False, True]
    states = {k: [torch.zeros_like(p) for p in params] for k in names}
    ref_params = [p.clone() for p in params]
    ref_states = [{k: torch.zeros_like(p) for k in names} for p in params]
    for step in range(1, 4):
        grads = [torch.randn_like(p) * 1e-2 for p in params]
        update(hyper, params, grads, states, decay, step=step, lr=1e-2)
        for p, g, st, d in zip(ref_params, grads, ref_states, decay):
            update_reference(hyper, p, g, st, decay=d, step=step, lr=1e-2)
    for p, r in zip(params, ref_params):
        torch.testing.assert_close(p, r, atol=1e-6, rtol=1e-6)
    # Against torch's own optimizer, too (decay pieces only: torch applies one wd per group).
    if kind == "adamw":
        torch.manual_seed(1)
        mine = torch.randn(100)
        theirs = nn.Parameter(mine.clone())
        opt = torch.optim.AdamW([theirs], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
        st = {"exp_avg": [torch.zeros(100)], "exp_avg_sq": [torch.zeros(100)]}
        for step in range(1, 4):
            g = torch.randn(100)
            theirs.grad = g.clone()
            opt.step()
            update(hyper, [mine], [g], st, [True], step=step, lr=1e-2)
        torch.testing.assert_close(mine, theirs.detach(), atol=1e-7, rtol=1e-6)


def test_bf16_update_follows_fp32_in_expectation() -> None:
    """Updates far below bf16 resolution survive on average (stochastic rounding)."""
    hyper = Hyper("sgd", momentum=0.0)
    p = torch.ones(100_000, dtype=torch.bfloat16)
    buf = {"momentum_buffer": [torch.zeros_like(p)]}
    g = torch.full_like(p, 1.0)
    lr = 1e-4  # bf16 spacing at 1.0 is 2**-7 (below) / 2**-8: a plain rounding would lose it
    for step in range(1, 11):
        update(hyper, [p], [g], buf, [False], step=step, lr=lr)
    assert float(p.float().mean()) == pytest.approx(1 - 10 * lr, abs=2e-5)
    plain = (torch.ones(10) - lr).to(torch.bfloat16)
    assert bool((plain == 1.0).all())  # what round-to-nearest would have kept


def test_stochastic_rounding_is_unbiased_and_lands_on_a_neighbour() -> None:
    x = torch.full((200_000,), 1.0 + 2**-9)  # a quarter of the way from 1.0 to the next bf16
    gen = torch.Generator().manual_seed(0)
    r = stochastic_round_bf16(x, gen).float()
    assert set(r.unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert float(r.mean()) == pytest.approx(1.0 + 2**-9, abs=1e-5)
    special = torch.tensor([float("inf"), float("-inf"), 0.0, -2.0])
    assert torch.equal(stochastic_round_bf16(special, gen).float(), special)
    assert torch.isnan(stochastic_round_bf16(torch.tensor([float("nan")]), gen)).all()


def test_loss_scaler_follows_hysteresis_growth_and_floor() -> None:
    s = LossScaler(LossScaleConfig(initial_scale_power=4, growth_interval=3, hysteresis=2, min_scale=4))
    seen = []
    for overflow in [True, True, True, False, False, False, False, True, True, True, True]:
        s.update(overflow)
        seen.append(s.scale)
    # 1st overflow tolerated, then halvings to the floor of 4; the clean step after 3 clean steps
    # doubles and resets the tolerance (DeepSpeed's count; the same sequence as DeepSpeed 0.19.8's
    # DynamicLossScaler), so the next overflow is tolerated again.
    assert seen == [16, 8, 4, 4, 4, 4, 8, 8, 4, 4, 4]
    assert s.overflows == 7
    static = LossScaler(LossScaleConfig(static=128.0))
    for overflow in (True, False, False, False):
        static.update(overflow)
    assert static.scale == 128.0
    restored = LossScaler(LossScaleConfig())
    restored.load_state_dict(s.state_dict())
    assert restored.state_dict() == s.state_dict()


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.GELU()) for _ in range(3))
        self.head = nn.Linear(8, 16, bias=False)
        self.head.weight = self.emb.weight
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.emb(tokens)
        for layer in self.layers:
            x = x + layer(x)
        x = self.frozen(x)
        return nn.functional.cross_entropy(self.head(x).flatten(0, 1), targets.flatten())


def _tied_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 16, (4, 5), generator=g), torch.randint(0, 16, (4, 5), generator=g)


def test_stage3_units_gather_prefetch_and_release() -> None:
    torch.manual_seed(0)
    model = _Tied()
    assert [n for n, _ in choose_units(model)] == ["layers.0", "layers.1", "layers.2"]
    engine = initialize(model, {"zero_stage": 3, "grad_clip": None}, lr=1e-2)
    stage = engine.stage
    # The tied embedding/head and nothing else is the root's; frozen parameters are not sharded.
    assert stage.unit_names == [["emb.weight"], *[[f"layers.{i}.0.weight", f"layers.{i}.0.bias"] for i in range(3)]]
    gathered_at: dict[str, list[bool]] = {}

    def spy(name: str):
        def hook(module: nn.Module, args: Any) -> None:
            gathered_at[name] = [u.full.untyped_storage().nbytes() > 0 for u in stage.units]
        return hook

    for i, layer in enumerate(model.layers):
        layer.register_forward_pre_hook(spy(f"layers.{i}"))
    for step in range(2):
        engine(*_tied_batch(step)).backward()
        engine.step()
        engine.zero_grad()
        # Between steps nothing is gathered: only the partitions are held.
        assert all(u.full.untyped_storage().nbytes() == 0 for u in stage.units)
        assert engine.state_summary()["params_bytes"] == stage.master.numel() * 4 + 8 * 8 * 4 + 8 * 4
    # Second step (order recorded): when layer i runs, the root, layer i and layer i+1
    # (prefetched) are gathered; layer i-1 was released. Units: root, layers.0, .1, .2.
    assert gathered_at["layers.0"] == [True, True, True, False]
    assert gathered_at["layers.1"] == [True, False, True, True]
    assert gathered_at["layers.2"] == [True, False, False, True]
    # The same training as stage 0.
    torch.manual_seed(0)
    ref = initialize(_Tied(), {"zero_stage": 0, "grad_clip": None}, lr=1e-2)
    for step in range(2):
        ref(*_tied_batch(step)).backward()
        ref.step()
        ref.zero_grad()
    mine, theirs = engine.full_state_dict(), ref.full_state_dict()
    assert max(float((mine[n] - theirs[n]).abs().max()) for n in mine) < 1e-6


class _Untied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.GELU()) for _ in range(2))
        self.head = nn.Linear(8, 16, bias=False)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.emb(tokens)
        for layer in self.layers:
            x = x + layer(x)
        return nn.functional.cross_entropy(self.head(x).flatten(0, 1), targets.flatten())


def test_stage3_reduces_the_output_head_first_and_the_embedding_last() -> None:
    torch.manual_seed(0)
    engine = initialize(_Untied(), {"zero_stage": 3, "grad_clip": None}, lr=1e-2)
    stage = engine.stage
    # No root unit: the embedding and the head are resident units of their own.
    assert stage.unit_names == [["emb.weight"], ["head.weight"],
                                *[[f"layers.{i}.0.weight", f"layers.{i}.0.bias"] for i in range(2)]]
    launched: list[list[str]] = []
    launch = stage._launch

    def spy(unit):  # the order in which units' gradients start their reduce-scatter
        launched.append(stage.unit_names[unit.index])
        launch(unit)

    stage._launch = spy
    gathered_in_layer: list[list[bool]] = []
    engine.module.layers[0].register_forward_pre_hook(
        lambda m, a: gathered_in_layer.append([u.full.untyped_storage().nbytes() > 0 for u in stage.units]))
    for step in range(2):
        engine(*_tied_batch(step)).backward()
        engine.step()
        engine.zero_grad()
    # The head's gradient is ready first in backward and is reduced first, not after the
    # embedding's at the end; both stay gathered through the layers' forward.
    assert launched[-4:] == [["head.weight"], *[[f"layers.{i}.0.weight", f"layers.{i}.0.bias"] for i in (1, 0)],
                             ["emb.weight"]]
    assert gathered_in_layer[-1][:2] == [True, True]
    assert all(u.full.untyped_storage().nbytes() == 0 for u in stage.units)
    torch.manual_seed(0)
    ref = initialize(_Untied(), {"zero_stage": 0, "grad_clip": None}, lr=1e-2)
    for step in range(2):
        ref(*_tied_batch(step)).backward()
        ref.step()
        ref.zero_grad()
    mine, theirs = engine.full_state_dict(), ref.full_state_dict()
    assert max(float((mine[n] - theirs[n]).abs().max()) for n in mine) < 1e-6


def test_stage3_mixed_precision_gathers_a_bf16_copy_of_the_fp32_master(tmp_path: Path) -> None:
    torch.manual_seed(0)
    engine = initialize(_Untied(), {"zero_stage": 3, "precision": "bf16", "grad_clip": None}, lr=1e-2)
    stage = engine.stage
    n = stage.layout.shard_numel
    assert stage.master.dtype == torch.float32 and stage.work.dtype == torch.bfloat16
    seen: list[tuple[set[torch.dtype], int, int]] = []

    def spy(module: nn.Module, args: Any) -> None:  # in layers.0's forward: emb, head, layers.0, .1
        gathered = [u for u in stage.units if u.full.untyped_storage().nbytes() > 0]
        seen.append(({p.dtype for p in module.parameters()}, stage.memory()["params_bytes"],
                     4 * n + 2 * n + sum(2 * u.group.padded for u in gathered)))

    engine.module.layers[0].register_forward_pre_hook(spy)
    grad_dtypes: set[torch.dtype] = set()
    engine.module.head.weight.register_hook(lambda g: grad_dtypes.add(g.dtype))
    for step in range(2):
        engine(*_tied_batch(step)).backward()
        assert stage.grad_flat.dtype == torch.float32
        engine.step()
        engine.zero_grad()
        assert torch.equal(stage.work, stage.master.to(torch.bfloat16))  # refreshed by the update
    assert grad_dtypes == {torch.bfloat16}
    assert all(dtypes == {torch.bfloat16} and got == want for dtypes, got, want in seen)
    assert engine.state_summary()["params_bytes"] == 4 * n + 2 * n  # master + work, nothing gathered
    # Checkpoints hold the fp32 master; a load refreshes the working copy of the engine loading it.
    engine.save_checkpoint(tmp_path, step=2)
    saved = engine.full_state_dict()
    torch.manual_seed(1)
    resumed = initialize(_Untied(), {"zero_stage": 3, "precision": "bf16", "grad_clip": None}, lr=1e-2)
    resumed.load_checkpoint(tmp_path)
    assert all(t.dtype == torch.float32 and torch.equal(t, resumed.full_state_dict()[k]) for k, t in saved.items())
    assert torch.equal(resumed.stage.work, resumed.stage.master.to(torch.bfloat16))
    assert torch.equal(resumed.stage.work, stage.work)
    # fp32 and low_precision_states gather the parameters themselves: no copy.
    for cfg in ({"zero_stage": 3}, {"zero_stage": 3, "precision": "bf16", "low_precision_states": True}):
        plain = initialize(_Untied(), cfg).stage
        assert plain.work is plain.master


def test_stage3_keeps_the_llama_residual_stream_fp32_under_bf16() -> None:
    from dsl.engine.model import Llama
    from dsl.engine.train_config import ModelConfig

    torch.manual_seed(0)
    model = Llama(ModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, seq_len=16))
    engine = initialize(model, {"zero_stage": 3, "precision": "bf16"})
    seen: list[tuple[torch.dtype, torch.dtype]] = []
    model.layers[0].register_forward_pre_hook(lambda m, args: seen.append((args[0].dtype, m.mlp.up_proj.weight.dtype)))
    tokens = torch.randint(0, 64, (2, 16))
    engine(tokens, tokens).backward()
    assert seen == [(torch.float32, torch.bfloat16)]  # fp32 residual, bf16 gathered weights


def test_stage2_keeps_no_full_gradient() -> None:
    torch.manual_seed(0)
    engine = initialize(_Tied(), {"zero_stage": 2, "bucket_mib": 0.0002, "grad_accum": 2})
    part = engine.stage.layout.shard_numel
    for micro in range(2):
        engine(*_tied_batch(micro)).backward()
        assert all(p.grad is None for p in engine.module.parameters())
        assert engine.state_summary()["grads_bytes"] == 4 * part  # staging buffers all freed
    assert float(engine.stage.grad_flat.abs().sum()) > 0
    engine.step()
