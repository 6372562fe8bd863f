"""`engine.compile`: torch.compile the model's blocks, keeping the engine's hooks outside.

What is compiled: the `forward` of each *block*, the children of the model's outermost
ModuleList (the bundled Llama's decoder layers; the same units ZeRO-3 gathers,
`zero.stage3.choose_units`). Only `forward` is replaced (an instance attribute), not
`__call__`, so the module hooks the engine registers (ZeRO-3's gather/release and pre-backward
hooks, activation accounting, fp16 loss scaling) run in eager Python around the compiled code,
and each block's backward is one compiled node after which its gradients are accumulated: the
gradient hooks of stages 0-2 still fire block by block, overlapping communication with the rest
of the backward. The blocks of one model share their compiled code (their parameters are graph
inputs), so N layers compile once.

What it buys, measured on this project's machine (2 CPU cores with AMX, 2 gloo ranks, the `bench`
preset, docs/benchmarks.md and the session notes): a compiled forward+backward alone is 1.26x
(fp32) / 1.5x (bf16) faster in one process (inductor fuses RMSNorm, RoPE, SiLU x up and the
residual adds around the matmuls); 2-rank training steps are 1.07-1.08x (fp32) and 1.08-1.13x
(bf16) faster than eager at ZeRO 0-3 (paired runs: compiled and eager take turns step by step),
where communication threads share the two cores. Its partitioner also saves fewer activation bytes than eager
autograd (0.78-0.84 of them in the memory bench; `engine.memory` predicts the eager bytes, so a
plan errs on the safe side). Hence
off by default (`compile: false`): opt in where compute dominates (GPUs, bf16).

`auto` compiles the bundled Llama unless a layer runs its own autograd.Function with
collectives or recomputation inside (Ulysses all-to-all, tiled MLP, activation offload) or, on
CPU, no C++ compiler is installed (inductor's CPU backend compiles C++). Under `auto` a compile
error in a block's forward (a `torch._dynamo` exception: dynamo, AOT autograd or inductor
failing, e.g. Triton or the C++ compiler missing) is printed as a warning naming the block and
the error, and every block runs eagerly from then on (the failing call is re-run eagerly).
`true` compiles any model's blocks and lets errors surface. TORCHDYNAMO_DISABLE=1 (torch's own
switch) makes both a no-op; the engine logs that it did.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import TYPE_CHECKING

import torch
from torch import nn

from dsl.engine.errors import UserError

if TYPE_CHECKING:
    from dsl.engine.config import EngineConfig

__all__ = ["apply", "blockers", "compile_blocks", "dynamo_disabled"]

log = logging.getLogger(__name__)


def dynamo_disabled() -> bool:
    """torch.compile is a no-op in this process (TORCHDYNAMO_DISABLE=1)."""
    return os.environ.get("TORCHDYNAMO_DISABLE", "") in ("1", "true", "True")


def _has_cxx() -> bool:
    return any(shutil.which(c) for c in (os.environ.get("CXX", ""), "c++", "g++", "clang++") if c)


def blockers(model: nn.Module, config: "EngineConfig", device: torch.device) -> list[str]:
    """Why `compile` cannot be used for this model and config (empty: it can)."""
    from dsl.engine.long.setup import sequence_degree
    from dsl.engine.model import Llama

    reasons = []
    sp = sequence_degree(config)
    if sp > 1:
        reasons.append(f"sequence_parallel {sp} (Ulysses all-to-all inside attention)")
    if config.tiled_mlp.enabled:
        reasons.append("tiled_mlp (per-chunk recomputation inside the MLP)")
    if config.activation_offload:
        reasons.append("activation_offload (host copies of each layer's input)")
    if device.type == "cpu" and not _has_cxx():
        reasons.append("no C++ compiler on PATH (inductor compiles C++ for CPU; apt install g++)")
    if config.compile == "auto" and not isinstance(model, Llama):
        reasons.append("auto compiles the bundled Llama only (set compile: true for your model)")
    return reasons


def apply(model: nn.Module, config: "EngineConfig", device: torch.device) -> list[str]:
    """Compile the blocks of `model` as `config.compile` says; returns the compiled blocks' names."""
    if config.compile is False:
        return []
    found = blockers(model, config, device)
    if found:
        if config.compile is True:
            raise UserError("engine.compile: true cannot be used with " + "; ".join(found)
                            + " (set compile: auto or false)")
        log.info("compile: auto leaves the model eager: %s", "; ".join(found))
        return []
    if dynamo_disabled():
        log.warning("compile: %s has no effect: TORCHDYNAMO_DISABLE=1 is set", config.compile)
        return []
    return compile_blocks(model, fallback=config.compile == "auto")


def compile_blocks(model: nn.Module, *, fallback: bool = False) -> list[str]:
    """Replace the `forward` of every block of `model` that has parameters by its torch.compile
    (hooks untouched); returns the blocks' names. No checks: `apply` decides whether to.
    `fallback`: a compile error turns every block eager with a warning (module docstring)."""
    from dsl.engine.zero.stage3 import choose_units

    names = []
    state = {"eager": False}
    for name, block in choose_units(model):
        if next(block.parameters(), None) is not None:
            compiled = torch.compile(block.forward)
            block.forward = _with_fallback(name, block.forward, compiled, state) if fallback else compiled
            names.append(name)
    return names


def _with_fallback(name: str, eager, compiled, state: dict[str, bool]):
    """`compiled`, until a torch._dynamo error in any block sets `state["eager"]`; then `eager`."""
    from torch._dynamo.exc import TorchDynamoException

    def forward(*args, **kwargs):
        if state["eager"]:
            return eager(*args, **kwargs)
        try:
            return compiled(*args, **kwargs)
        except TorchDynamoException as exc:
            state["eager"] = True
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            log.warning("compile: auto: torch.compile failed in %s (%s: %s); every block runs eagerly "
                        "from now on (set compile: false to skip compiling, or true to see the error)",
                        name, type(exc).__name__, first)
            return eager(*args, **kwargs)

    return forward
