"""The memory and long-sequence GPU smoke checks of part 1 (activation checkpointing/offload,
tiled loss/MLP, the memory model vs measured), moved out of tests/gpu/checks_single.py.

The functions here are plain; tests/gpu/checks_single.py registers them with `check(...)` at their
original places so `tests/gpu/smoke.py --list` keeps its order.
"""

from __future__ import annotations

from typing import Any

from tests.gpu.common import MEMORY_MARGIN, SAME_TOL, Ctx, build, engine_case, model_config, release, train

# Long-sequence shapes (activation checkpointing/offload, tiled loss/MLP). The self-test keeps the
# architecture at a tenth of the width and an eighth of the sequence, and says so in its JSON.
LONG = {
    "cuda": dict(vocab_size=8192, hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                 intermediate_size=1376, seq_len=2048),
    "cpu": dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=176, seq_len=256),
}
LONG_MICRO = 2
LONG_STEPS = 2
TILE_TOKENS = {"cuda": 1024, "cpu": 128}

# The memory model's shapes: on a GPU large enough that the CUDA runtime is not most of the bytes.
MEMORY_MODEL = {
    "cuda": dict(vocab_size=32000, hidden_size=1024, num_hidden_layers=8, num_attention_heads=16,
                 num_key_value_heads=8, intermediate_size=2816, seq_len=1024, tie_word_embeddings=False),
    "cpu": dict(preset="tiny", num_key_value_heads=2, tie_word_embeddings=False),
}
MEMORY_CASES = [
    {"zero_stage": 0, "precision": "fp32"},
    {"zero_stage": 2, "precision": "bf16"},
    {"zero_stage": 3, "precision": "bf16", "activation_checkpointing": True},
    {"zero_stage": 2, "precision": "fp32", "offload": {"optimizer": "cpu"}},
]
MEMORY_MICRO = 4


# 6. Activation checkpointing and offload ------------------------------------------------------


def _measured(ctx: Ctx, cfg: dict[str, Any], model: dict[str, Any], *, micro: int,
              steps: int) -> tuple[list[float], dict]:
    """Losses, plus what the run held: state_summary() after the last step, the activation bytes
    offloaded to the host, and on CUDA the allocator's peak over the run (torch.cuda)."""
    import torch

    dev = ctx.device
    cuda = dev.type == "cuda"
    if cuda:
        release()
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    engine = build({**cfg, "micro_batch": micro}, dev, model)
    engine.measure_activations = True
    try:
        losses = train(engine, model, steps=steps, micro_batch=micro)
        info: dict[str, Any] = {"state_summary": engine.state_summary()}
        off = getattr(engine.module, "activation_offload", None)
        if off is not None:
            info["offloaded_bytes"] = off.offloaded_bytes
        if cuda:
            torch.cuda.synchronize(dev)
            info["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(dev) - base
            info["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(dev)
    finally:
        release(engine)
    return losses, info


def _plain_case(ctx: Ctx, losses: list[float]) -> None:
    import math

    finite = all(math.isfinite(x) for x in losses)
    ctx.case("plain", finite, "" if finite else "non-finite loss", losses=losses)


def _held(info: dict[str, Any]) -> int:
    """The bytes a feature should shrink: the CUDA peak, or on CPU the activations autograd saved."""
    return info.get("peak_allocated_bytes", info["state_summary"]["activations_bytes"])


def activation_checkpointing(ctx: Ctx) -> None:
    model = LONG[ctx.mode]
    ctx.group()
    ctx.details.update(model=model, micro_batch=LONG_MICRO, seq_len=model["seq_len"],
                       measure="torch.cuda.max_memory_allocated" if ctx.mode == "cuda"
                       else "state_summary()['activations_bytes'] (the CPU has no allocator peak)",
                       note=None if ctx.mode == "cuda" else "self-test: seq 256 instead of 2048, a smaller model")
    runs: dict[str, tuple[list[float], dict]] = {}
    configs = {"plain": {}, "checkpointing": {"activation_checkpointing": True},
               "checkpointing+offload": {"activation_checkpointing": True, "activation_offload": True}}
    for name, cfg in configs.items():
        def run(name=name, cfg=cfg) -> list[float]:
            runs[name] = _measured(ctx, cfg, model, micro=LONG_MICRO, steps=LONG_STEPS)
            return runs[name][0]

        if name == "plain":
            ctx.attempt(name, lambda run=run: _plain_case(ctx, run()))
        else:
            engine_case(ctx, name, run, runs["plain"][0] if "plain" in runs else None, SAME_TOL, config=cfg)
    ctx.details["memory"] = {k: info for k, (_, info) in runs.items()}
    if {"plain", "checkpointing"} <= runs.keys():
        a, b = _held(runs["plain"][1]), _held(runs["checkpointing"][1])
        ctx.case("checkpointing_holds_less", b < a, "" if b < a else f"{b} bytes with checkpointing, {a} without",
                 plain_bytes=a, checkpointing_bytes=b)
    if {"checkpointing", "checkpointing+offload"} <= runs.keys():
        b, c = _held(runs["checkpointing"][1]), _held(runs["checkpointing+offload"][1])
        moved = runs["checkpointing+offload"][1].get("offloaded_bytes", 0)
        ok = c < b and moved > 0
        ctx.case("offload_holds_less", ok, "" if ok else f"{c} bytes with offload ({moved} offloaded), {b} without",
                 checkpointing_bytes=b, offload_bytes=c, offloaded_bytes=moved)


# 7. Tiled loss / MLP --------------------------------------------------------------------------


def tiled(ctx: Ctx) -> None:
    model = LONG[ctx.mode]
    chunk = TILE_TOKENS[ctx.mode]
    ctx.group()
    ctx.details.update(model=model, micro_batch=LONG_MICRO, chunk_tokens=chunk,
                       note=None if ctx.mode == "cuda" else "self-test: seq 256, a smaller model")
    tile = {"enabled": True, "chunk_tokens": chunk}
    configs = {"plain": {}, "tiled_loss": {"tiled_loss": tile}, "tiled_mlp": {"tiled_mlp": tile},
               "tiled_loss+mlp": {"tiled_loss": tile, "tiled_mlp": tile}}
    runs: dict[str, tuple[list[float], dict]] = {}
    for name, cfg in configs.items():
        def run(name=name, cfg=cfg) -> list[float]:
            runs[name] = _measured(ctx, cfg, model, micro=LONG_MICRO, steps=LONG_STEPS)
            return runs[name][0]

        if name == "plain":
            ctx.attempt(name, lambda run=run: _plain_case(ctx, run()))
        else:
            engine_case(ctx, name, run, runs["plain"][0] if "plain" in runs else None, SAME_TOL, config=cfg)
    ctx.details["memory_bytes"] = {k: _held(info) for k, (_, info) in runs.items()}



# 10. Memory model vs measured -----------------------------------------------------------------


def memory_model(ctx: Ctx) -> None:
    from dsl.engine.config import EngineConfig
    from dsl.engine.memory import RUNTIME, estimate, expected_state_summary

    model = MEMORY_MODEL[ctx.mode]
    ctx.group()
    ctx.details.update(model=model, micro_batch=MEMORY_MICRO, margin=MEMORY_MARGIN)
    for cfg in MEMORY_CASES:
        name = "-".join(f"{k}={v}" if not isinstance(v, dict) else f"{k}={v['optimizer']}" for k, v in cfg.items())

        def run(cfg=cfg, name=name) -> None:
            _, info = _measured(ctx, cfg, model, micro=MEMORY_MICRO, steps=2)
            ecfg = EngineConfig(**{**cfg, "micro_batch": MEMORY_MICRO})
            summary = info["state_summary"]
            if ctx.mode == "cuda":
                b = estimate(model_config(model), ecfg, dp=1, micro_batch=MEMORY_MICRO, accelerator=True)
                predicted = b.device_bytes - b.term(RUNTIME).device_bytes  # the CUDA context is not allocated memory
                measured = info["peak_allocated_bytes"]
                extra = {"peak_reserved_bytes": info["peak_reserved_bytes"], "predicted_phase": b.peak.phase,
                         "predicted_phases": dict(b.peak.phases),
                         "reserved_ratio": info["peak_reserved_bytes"] / predicted,
                         "predicted_terms": {t.name: t.device_bytes for t in b.terms if t.device_bytes},
                         "expected_state_summary": expected_state_summary(model_config(model), ecfg, dp=1,
                                                                          micro_batch=MEMORY_MICRO, accelerator=True)}
                what = "torch.cuda.max_memory_allocated vs estimate().device_bytes - runtime"
            else:
                want = expected_state_summary(model_config(model), ecfg, dp=1, micro_batch=MEMORY_MICRO)
                predicted, measured = want["total_bytes"], summary["total_bytes"]
                extra = {"expected_state_summary": want}
                what = "state_summary()['total_bytes'] vs expected_state_summary()['total_bytes']"
            ratio = measured / predicted
            ok = measured <= predicted * (1 + MEMORY_MARGIN)
            why = f"measured {measured:,} B > predicted {predicted:,} B x {1 + MEMORY_MARGIN}"
            ctx.case(name, ok, "" if ok else why,
                     config=cfg, measured_bytes=measured, predicted_bytes=predicted, ratio=ratio, compares=what,
                     state_summary=summary, **extra)

        ctx.attempt(name, run, config=cfg)
