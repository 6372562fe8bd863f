"""Tiled loss and tiled MLP (engine/long/) against their untiled references: the same loss and
the same gradients, for chunk sizes that do and do not divide the token count, in fp32 and under
bf16 autocast; and through the bundled model, with the engine switches on."""

from __future__ import annotations

import pytest
import torch

from dsl.engine.long.tiled_loss import reference_cross_entropy, tiled_cross_entropy
from dsl.engine.long.tiled_mlp import swiglu, tiled_swiglu

N, H, V, F = 37, 16, 50, 24
# Tolerances: fp32 1e-6 on values, ~1e-5 on gradients (sums over chunks instead of inside one
# matmul); bf16 gradients within 1% in norm (each chunk's bf16 weight gradient is rounded before
# the fp32 sum).


def _grads(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    (out.float() * torch.linspace(0.5, 1.5, out.numel()).view_as(out)).sum().backward()
    return out.detach(), [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("chunk", [1, 8, 37, 100])
def test_tiled_loss_matches_cross_entropy_fp32(chunk: int) -> None:
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g)
    targets = torch.randint(V, (N,), generator=g)
    loss, grads = _grads(lambda h, w: tiled_cross_entropy(h, w, targets, chunk), hidden, weight)
    ref, ref_grads = _grads(lambda h, w: reference_cross_entropy(h, w, targets), hidden, weight)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_tiled_loss_under_bf16_autocast_matches_the_autocast_reference() -> None:
    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g)
    targets = torch.randint(V, (N,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = _grads(lambda h, w: tiled_cross_entropy(h, w, targets, 8), hidden, weight)
        ref, ref_grads = _grads(lambda h, w: reference_cross_entropy(h, w, targets), hidden, weight)
    assert loss.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)  # same bf16 logits, fp32 log-softmax
    for got, want in zip(grads, ref_grads):
        assert got.dtype == want.dtype == torch.float32
        assert (got - want).norm() <= 1e-2 * want.norm()  # bf16 rounds each chunk's weight gradient


def test_tiled_loss_never_saves_logits_sized_tensors() -> None:
    saved: list[int] = []
    hidden = torch.randn(N, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        tiled_cross_entropy(hidden, weight, torch.randint(V, (N,)), 8)
    assert max(saved) == max(N * H, V * H)  # hidden and weight; nothing of size N x V
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        reference_cross_entropy(hidden, weight, torch.randint(V, (N,)))
    assert N * V in saved  # the reference keeps the log-softmax output


@pytest.mark.parametrize("chunk", [1, 5, 37, 64])
@pytest.mark.parametrize("shape", [(N, H), (3, 13, H)])
def test_tiled_mlp_matches_swiglu_fp32(chunk: int, shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(*shape, generator=g)
    ws = [torch.randn(F, H, generator=g) * 0.2, torch.randn(F, H, generator=g) * 0.2, torch.randn(H, F, generator=g) * 0.2]
    out, grads = _grads(lambda *t: tiled_swiglu(*t, chunk_tokens=chunk), x, *ws)
    ref, ref_grads = _grads(swiglu, x, *ws)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, ref_grads):  # weight gradients: a sum over chunks instead of one matmul
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_tiled_mlp_under_bf16_autocast_matches_the_autocast_reference() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N, H, generator=g)
    ws = [torch.randn(F, H, generator=g) * 0.2, torch.randn(F, H, generator=g) * 0.2, torch.randn(H, F, generator=g) * 0.2]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = _grads(lambda *t: tiled_swiglu(*t, chunk_tokens=8), x, *ws)
        ref, ref_grads = _grads(swiglu, x, *ws)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref)  # the same bf16 arithmetic row by row
    for got, want in zip(grads, ref_grads):
        assert got.dtype == want.dtype == torch.float32
        # bf16 rounds each chunk's weight gradient before the fp32 sum (the reference rounds once)
        assert (got - want).norm() <= 1e-2 * want.norm()


def test_tiled_mlp_weight_gradient_hook_fires_once_per_backward() -> None:
    # ZeRO stages 2-3 reduce a parameter's gradient when its accumulate hook fires: once, not per chunk.
    from dsl.engine.long.tiled_mlp import tiled_swiglu as tiled

    ws = [torch.nn.Parameter(torch.randn(F, H)), torch.nn.Parameter(torch.randn(F, H)), torch.nn.Parameter(torch.randn(H, F))]
    fired: list[int] = []
    for i, w in enumerate(ws):
        w.register_post_accumulate_grad_hook(lambda p, i=i: fired.append(i))
    tiled(torch.randn(N, H), *ws, chunk_tokens=4).sum().backward()
    assert sorted(fired) == [0, 1, 2]


def test_tiled_mlp_backward_loads_no_module_into_the_rank() -> None:
    # torch.autograd.grad given a gradient tensor imports torch.fx's symbolic shapes (sympy,
    # mpmath): ~12 MiB that stay resident in every rank and that no memory term counts
    # (tests/bench/peak.py measured the tiled row 13% over the plan with it).
    import subprocess
    import sys

    code = ("import sys, torch\n"
            "from dsl.engine.long.tiled_mlp import tiled_swiglu\n"
            "x = torch.randn(16, 8, requires_grad=True)\n"
            "ws = [torch.randn(12, 8, requires_grad=True), torch.randn(12, 8, requires_grad=True), "
            "torch.randn(8, 12, requires_grad=True)]\n"
            "before = set(sys.modules)\n"
            "tiled_swiglu(x, *ws, chunk_tokens=4).sum().backward()\n"
            "print(sorted(set(sys.modules) - before))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


@pytest.mark.parametrize("checkpointing", [False, True])
def test_model_with_tiled_loss_and_mlp_gives_the_plain_loss_and_gradients(checkpointing: bool) -> None:
    from dsl.engine.model import Llama
    from dsl.engine.train_config import ModelConfig

    cfg = ModelConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=48, seq_len=24, tie_word_embeddings=False)
    tokens = torch.randint(cfg.vocab_size, (3, cfg.seq_len), generator=torch.Generator().manual_seed(4))
    targets = tokens.roll(-1, 1)
    results = []
    for tiled in (False, True):
        torch.manual_seed(0)
        model = Llama(cfg, activation_checkpointing=checkpointing)
        if tiled:
            model.loss_chunk_tokens = 10
            for layer in model.layers:
                layer.mlp.chunk_tokens = 7
        loss = model(tokens, targets)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (plain, plain_g), (tiled_loss, tiled_g) = results
    torch.testing.assert_close(tiled_loss, plain, rtol=1e-6, atol=1e-6)
    for name in plain_g:
        torch.testing.assert_close(tiled_g[name], plain_g[name], rtol=1e-4, atol=1e-6, msg=name)


def test_activation_offload_copies_checkpoints_out_and_keeps_gradients_exact() -> None:
    from dsl.engine.long.act_offload import ActivationOffload
    from dsl.engine.model import Llama
    from dsl.engine.train_config import ModelConfig

    cfg = ModelConfig(vocab_size=97, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=48, seq_len=24)
    tokens = torch.randint(cfg.vocab_size, (2, cfg.seq_len), generator=torch.Generator().manual_seed(5))
    results = []
    for offload in (False, True):
        torch.manual_seed(0)
        model = Llama(cfg, activation_checkpointing=True)
        if offload:
            model.activation_offload = ActivationOffload()
        loss = model(tokens, tokens.roll(-1, 1))
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, model))
    (plain, plain_g, _), (off, off_g, model) = results
    assert torch.equal(off, plain)
    for name in plain_g:
        assert torch.equal(off_g[name], plain_g[name]), name
    # 3 layer inputs [2, 24, 32] fp32 plus the two RoPE tables [24, 8] fp32, each copied once
    assert model.activation_offload.offloaded_bytes == 3 * 2 * 24 * 32 * 4 + 2 * 24 * 8 * 4


def test_activation_offload_unpacks_a_separate_copy() -> None:
    from dsl.engine.long.act_offload import ActivationOffload

    off = ActivationOffload()
    off.begin_forward()
    x = torch.randn(4, 8, requires_grad=True)
    with off.hooks():
        y = (x * x).sum()  # mul saves x (twice, one copy)
    assert off.offloaded_bytes == 4 * 8 * 4
    y.backward()
    torch.testing.assert_close(x.grad, 2 * x.detach())
    packed = off._pack(x.detach())  # on CPU the "host copy" is still a copy (the GPU code path)
    assert packed.host.data_ptr() != x.data_ptr() and torch.equal(off._unpack(packed), x.detach())
