"""Stage 3's units: the groups of parameters gathered, released and reduce-scattered together
(engine/zero/stage3.py).

Two granularities (`engine.stage3.gather`):
- `layer` (the default): every child of an `nn.ModuleList` / `nn.ModuleDict` (the repeated
  blocks of a transformer; outermost lists only), or, for a model without such lists, the
  direct children of the root.
- `module` (DeepSpeed's granularity): every submodule that owns trainable parameters directly
  (a Linear, an embedding, a norm), so what is gathered at once is one such module; a module
  nested in another that also owns parameters is its own unit.

A parameter belongs to the unit with the longest name that prefixes its own; a parameter
reached from more than one unit (a tied embedding) or from none belongs to the root unit. Every
other direct child of the root with trainable parameters that no other child shares (the
embedding, the final norm, an untied output head at layer granularity) is a *resident unit*
(`split_root`), kept gathered from the root's forward until its gradients are reduced.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dsl.engine.zero.layout import FlatGroup

__all__ = ["GRANULARITIES", "choose_units", "assign", "split_root", "Unit", "RELEASED", "GATHERING", "GATHERED"]

GRANULARITIES = ("layer", "module")
RELEASED, GATHERING, GATHERED = 0, 1, 2


def choose_units(module: nn.Module, granularity: str = "layer") -> list[tuple[str, nn.Module]]:
    """(name, module) of the units at `granularity` (module docstring)."""
    if granularity == "module":
        return [(name, m) for name, m in module.named_modules()
                if name and any(p.requires_grad for p in m.parameters(recurse=False))]
    units: list[tuple[str, nn.Module]] = []
    taken: list[str] = []
    for name, m in module.named_modules():
        if any(name == t or name.startswith(t + ".") for t in taken):
            continue
        if isinstance(m, (nn.ModuleList, nn.ModuleDict)):
            for child_name, child in m.named_children():
                units.append((f"{name}.{child_name}" if name else child_name, child))
            taken.append(name)
    if not units:
        units = list(module.named_children())
    return units


def _owner(name: str, index: dict[str, int]) -> int:
    """The unit with the longest name prefixing parameter `name` (-1: none)."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        hit = index.get(".".join(parts[:cut]))
        if hit is not None:
            return hit
    return -1


def split_root(module: nn.Module, root: list[tuple[str, nn.Parameter]], units: list[tuple[str, nn.Module]]) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[nn.Module, list[tuple[str, nn.Parameter]]]]]:
    """The root's parameters that belong to exactly one direct child of the root (outside the
    units), as one *resident* unit per such child: (rest of the root, [(child, its params)])."""
    unit_names = {n for n, _ in units}
    reach: dict[int, set[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        reach.setdefault(id(p), set()).add(name.split(".", 1)[0] if "." in name else "")
    children = dict(module.named_children())
    rest: list[tuple[str, nn.Parameter]] = []
    per_child: dict[str, list[tuple[str, nn.Parameter]]] = {}
    for name, p in root:
        who = reach[id(p)]
        child = next(iter(who)) if len(who) == 1 else ""
        if child and child in children and child not in unit_names and not any(
                u.startswith(child + ".") for u in unit_names):
            per_child.setdefault(child, []).append((name, p))
        else:
            rest.append((name, p))
    return rest, [(children[c], named) for c, named in per_child.items()]


def assign(module: nn.Module, units: list[tuple[str, nn.Module]]) -> tuple[list[tuple[str, nn.Parameter]], list[list[tuple[str, nn.Parameter]]]]:
    """Trainable parameters of the root unit and of each unit; a parameter reached from more than
    one owner belongs to the root."""
    index = {unit_name: i for i, (unit_name, _) in enumerate(units)}
    owners: dict[int, set[int]] = {}
    first_name: dict[int, str] = {}
    params: dict[int, nn.Parameter] = {}
    canonical = {id(p): n for n, p in module.named_parameters()}
    for name, p in module.named_parameters(remove_duplicate=False):
        if not p.requires_grad:
            continue
        owners.setdefault(id(p), set()).add(_owner(name, index))
        first_name.setdefault(id(p), canonical[id(p)])
        params[id(p)] = p
    root: list[tuple[str, nn.Parameter]] = []
    per_unit: list[list[tuple[str, nn.Parameter]]] = [[] for _ in units]
    for key in params:  # definition order
        who = owners[key]
        entry = (first_name[key], params[key])
        if len(who) == 1 and -1 not in who:
            per_unit[next(iter(who))].append(entry)
        else:
            root.append(entry)
    return root, per_unit


class Unit:
    """One unit's gather state."""

    def __init__(self, group: FlatGroup, module: nn.Module, full: torch.Tensor) -> None:
        self.group = group
        self.index = group.index
        self.module = module
        self.full = full
        """[group.padded] flat parameter buffer; storage of size 0 while released."""
        self.state = RELEASED
        self.work: Any = None
        self.backward_ready = False
        self.reduced = False
        self.resident = False
        """A child of the root outside the units: stays gathered from forward to its reduce."""
