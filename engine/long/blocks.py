"""Activation checkpointing (and checkpoint offload) on any model: find its repeated blocks and
recompute each in backward.

Which blocks (`find_blocks`):
- `engine.checkpoint_module: ClassName`: every module of that class (the name of its Python
  class, e.g. `LlamaDecoderLayer`, `GPT2Block`), outermost ones only (a match inside a match is
  already recomputed by it);
- otherwise the repeated block list, found as FSDP's transformer auto-wrap policy would be told:
  an `nn.ModuleList` whose children are two or more modules of one class (the decoder layers),
  outermost lists only (an MoE layer's list of experts lies inside its block); of several, the
  one holding the most parameters.
Nothing found is a UserError (validity.py `Refusal`, so the trainer locates it in the spec)
naming the setting and what to write, never a silent no-op.

How (`checkpoint_blocks`): each block's `forward` (an instance attribute, so the module's hooks
— ZeRO-3's gather/release, the engine's accounting — stay outside and run once) becomes
`torch.utils.checkpoint.checkpoint(forward, ..., use_reentrant=False)` while gradients are
enabled: backward keeps each block's inputs only and recomputes its internals (about one extra
forward of the blocks per step). The RNG state is preserved, so a block with dropout recomputes
the same mask. With an `ActivationOffload` (engine/long/act_offload.py) the saved inputs live in
host memory; its bookkeeping restarts at each forward of the root module (a forward pre-hook).
No communication of its own.
"""

from __future__ import annotations

import contextlib
import difflib
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dsl.engine.validity import Problem, Refusal

__all__ = ["find_blocks", "checkpoint_blocks", "block_lists"]


def block_lists(model: nn.Module) -> list[tuple[str, list[nn.Module]]]:
    """(name, children) of every outermost ModuleList of two or more children of one class."""
    found: list[tuple[str, list[nn.Module]]] = []
    for name, module in model.named_modules():
        if any(name.startswith(f"{taken}.") for taken, _ in found):
            continue
        if isinstance(module, nn.ModuleList) and len(module) >= 2 and len({type(m) for m in module}) == 1:
            found.append((name, list(module)))
    return found


def find_blocks(model: nn.Module, class_name: str | None, *, setting: str) -> list[nn.Module]:
    """The blocks to recompute (see the module docstring); `setting` names the engine field that
    asked (activation_checkpointing, activation_offload) in the error. Raises UserError."""
    if class_name is not None:
        names = [(n, m) for n, m in model.named_modules() if type(m).__name__ == class_name]
        outer = [m for n, m in names if not any(n.startswith(f"{o}.") for o, _ in names if o != n)]
        if outer:
            return outer
        classes = sorted({type(m).__name__ for m in model.modules()})
        close = difflib.get_close_matches(class_name, classes, n=1)
        repeated = sorted({type(blocks[0]).__name__ for _, blocks in block_lists(model)})
        raise Refusal([Problem(("checkpoint_module",), f"no module of class {class_name!r} in the model"
                        + (f" (did you mean {close[0]!r}?)" if close else "")
                        + (f"; its repeated blocks are {', '.join(repeated)}" if repeated else
                           f"; its module classes: {', '.join(classes)}"))])
    lists = block_lists(model)
    if not lists:
        classes = sorted({type(m).__name__ for m in model.modules() if m is not model})
        raise Refusal([Problem((setting,), f"true, but {type(model).__name__} has no list of repeated blocks (an "
                        f"nn.ModuleList of two or more modules of one class) to recompute in backward; name the "
                        f"class of its blocks with engine.checkpoint_module (its module classes: "
                        f"{', '.join(classes) or 'none'}), or set {setting}: false")])
    _, blocks = max(lists, key=lambda item: sum(p.numel() for b in item[1] for p in b.parameters()))
    return blocks


def checkpoint_blocks(model: nn.Module, blocks: list[nn.Module], offload: Any = None) -> None:
    """Recompute every block of `blocks` in backward; with `offload` (an ActivationOffload) their
    saved inputs live in host memory (see the module docstring)."""
    for block in blocks:
        block.forward = _recomputed(block.forward, offload)
    if offload is not None:
        model.register_forward_pre_hook(lambda _module, _args: offload.begin_forward())


def _recomputed(forward: Any, offload: Any) -> Any:
    def recomputed(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        with offload.hooks() if offload is not None else contextlib.nullcontext():
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return recomputed
