"""The optimizer section of a DeepSpeed config: its type and params -> engine.optimizer.

DeepSpeed's Adam and AdamW become dsl's AdamW, SGD its SGD, OneBitAdam its 1-bit Adam
(engine/onebit.py); every other type is refused with what to use. Each parameter is treated as
engine/ds_keys.py's OPTIMIZER_PARAMS says (mapped, accepted at DeepSpeed's default, noted, or
refused), and what the section leaves out takes the DeepSpeed optimizer's own default (lr 1e-3).
Without an optimizer section, engine.optimizer applies, with a note.

Part of the importer run by engine/dsconfig.py; the state and the helpers are engine/ds_state.py's.
"""

from __future__ import annotations

from typing import Any

from dsl.engine.ds_auto import auto_rule
from dsl.engine.ds_keys import NO_DEFAULT, OPTIMIZER_PARAMS, OPTIMIZER_TYPES, Key
from dsl.engine.ds_state import AUTO, NOT_AUTO, Importer, Path_, same, show_default

__all__ = ["map_optimizer"]


def map_optimizer(imp: Importer) -> None:
    opt = imp.data.get("optimizer")
    if opt is None:
        imp.note((), "no optimizer section: DeepSpeed would use the optimizer the script passes it "
                     "(Hugging Face's Trainer: AdamW from its arguments); dsl uses engine.optimizer "
                     f"({imp.spec('optimizer.type')}, lr {imp.spec('optimizer.lr'):g})")
        return
    if not isinstance(opt, dict):
        imp.refuse(("optimizer",), f"{opt!r} is not a section {{...}}")
        return
    kind = imp.get("optimizer", "type")
    if not isinstance(kind, str):
        imp.refuse(("optimizer", "type") if "type" in opt else ("optimizer",),
                   "an optimizer section needs a type (Adam, AdamW, SGD, OneBitAdam)")
        return
    name = OPTIMIZER_TYPES.get(kind.lower())
    if name is None:
        imp.refuse(("optimizer", "type"), _unsupported_optimizer(kind))
        return
    imp.set("optimizer.type", name)
    if name == "onebit_adam":
        imp.note(("optimizer", "type"), f"{kind}: removed from DeepSpeed 0.19.8 (it no longer runs there); dsl runs "
                                        "its own 1-bit Adam (engine/onebit.py) with the earlier DeepSpeed's semantics")
    params = imp.params("optimizer")
    if params is None:
        return
    table = {key.path: key for key in OPTIMIZER_PARAMS[name]}
    lower = kind.lower()
    for key, value in params.items():
        path = ("optimizer", "params", key)
        entry = imp.param_entry("optimizer", key, table, kind)
        if entry is None:
            continue
        if value == AUTO:
            if auto_rule(".".join(path)) is None:
                imp.refuse(path, f"{NOT_AUTO} (DeepSpeed's default: {show_default(entry.default)})")
            else:
                imp.auto(path)
            continue
        if entry.use == "mapped":
            _optimizer_param(imp, path, key, value, entry)
        elif entry.use == "default":
            if key == "adam_w_mode" and lower == "adamw":
                if value is not True:
                    imp.note(path, f"{value!r}: no effect with type AdamW (DeepSpeed keeps AdamW: 'Optimizer "
                                   "name of Adam forces AdamW logic unless adam_w_mode is explicitly set')")
            elif not same(value, entry.default):
                imp.refuse(path, f"{value!r}: {entry.why}")
        elif entry.use == "note":
            if not same(value, entry.default):
                imp.note(path, f"{value!r}: {entry.why}")
        else:
            imp.refuse(path, entry.why)
    decay = params.get("weight_decay", 0.01 if name == "adamw" and params.get("torch_adam") is True else 0.0)
    if decay == AUTO:
        decay = imp.spec("optimizer.weight_decay")
    if name != "sgd" and isinstance(decay, (int, float)) and decay > 0:
        imp.note(("optimizer", "params", "weight_decay") if "weight_decay" in params else ("optimizer",),
                 f"{decay:g}: dsl decays matrices and embeddings, not gains and biases (1-D parameters); "
                 "DeepSpeed decays every parameter the script passes it (Hugging Face's Trainer passes all of "
                 "them when the config has an optimizer section)")
    # DeepSpeed's defaults for what the section leaves out.
    for entry in OPTIMIZER_PARAMS[name]:
        if entry.use != "mapped" or entry.path in params or entry.default is NO_DEFAULT:
            continue
        default = entry.default
        if entry.path == "weight_decay" and name == "adamw" and params.get("torch_adam") is True:
            default = 0.01  # torch.optim.AdamW's default
        target = entry.to.removeprefix("engine.")
        imp.set(target, tuple(default) if isinstance(default, list) else default)


def _optimizer_param(imp: Importer, path: Path_, key: str, value: Any, entry: Key) -> None:
    target = entry.to.removeprefix("engine.")
    if key == "betas":
        if (not isinstance(value, list) or len(value) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
            imp.refuse(path, f"{value!r} is not a list of two numbers")
            return
        imp.set(target, (float(value[0]), float(value[1])))
        return
    if key == "freeze_step":
        number = imp.number(path, value, integer=True, positive=True)
    elif key in ("lr", "eps"):
        number = imp.number(path, value, positive=True)
    else:
        number = imp.number(path, value, minimum=0)
    if number is not None:
        imp.set(target, number)


_OPTIMIZER_WHY = {
    "lamb": "LAMB (layer-wise adaptive steps) is not implemented",
    "onebitlamb": "1-bit LAMB is not implemented",
    "zerooneadam": "0/1 Adam is not implemented",
    "adagrad": "Adagrad is not implemented",
    "lion": "Lion is not implemented",
    "muon": "Muon is not implemented",
    "muadam": "muP Adam is not implemented",
    "muadamw": "muP AdamW is not implemented",
    "musgd": "muP SGD is not implemented",
}


def _unsupported_optimizer(kind: str) -> str:
    why = _OPTIMIZER_WHY.get(kind.lower(), f"optimizer {kind!r} is not supported")
    return f"{why}: dsl has AdamW (DeepSpeed's Adam and AdamW), SGD and 1-bit Adam (OneBitAdam); use one of them"
