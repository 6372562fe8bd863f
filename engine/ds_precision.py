"""The precision keys of a DeepSpeed config: fp16 / bf16 (and the old `bfloat16`), the fp16 loss
scale, and the gradient-reduction dtype (`communication_data_type`).

Mapped onto engine.precision, engine.loss_scale and engine.comm.reduce_dtype with DeepSpeed
0.19.8's defaults (loss scale 2**16, window 1000, hysteresis 2, minimum 1; reduction in the
training dtype). Part of the importer run by engine/dsconfig.py; the state and the helpers are
engine/ds_state.py's.
"""

from __future__ import annotations

from typing import Any

from dsl.engine.ds_state import AUTO, Importer

__all__ = ["map_precision", "map_communication"]


def map_precision(imp: Importer) -> None:
    """fp16 / bf16 -> engine.precision (and imp.precision, imp.disabled); fp16's loss scale."""
    flags = {}
    for section in ("fp16", "bf16"):
        name = section
        if section == "bf16" and not imp.has("bf16") and imp.has("bfloat16"):
            name = "bfloat16"
            imp.note(("bfloat16",), "DeepSpeed's old name of the bf16 section, read as bf16")
        node = imp.data.get(name)
        if node is not None and not isinstance(node, dict):
            imp.refuse((name,), f"{node!r} is not a section {{...}}")
            flags[section] = False
            continue
        value = imp.get(name, "enabled", default=False)
        if value == AUTO:
            imp.auto((name, "enabled"))
            value = imp.spec("precision") == section
        elif not isinstance(value, bool):
            imp.refuse((name, "enabled"), f"{value!r} is not true, false or \"auto\"")
            value = False
        flags[section] = value
        if not value:
            imp.disabled.add(name)
    imp.precision = "bf16" if flags["bf16"] else "fp16" if flags["fp16"] else "fp32"
    if flags["fp16"] and flags["bf16"]:
        at = ("bf16" if imp.has("bf16") else "bfloat16", "enabled")
        imp.refuse(at, "DeepSpeed's rule: bfloat16 and fp16 modes cannot be simultaneously enabled; "
                       "enable one of them")
        return
    any_auto = any(use.path[-1] == "enabled" for use in imp.autos)
    if flags["bf16"] and not _auto_at(imp, "bf16", "bfloat16"):
        imp.set("precision", "bf16")
    elif flags["fp16"] and not _auto_at(imp, "fp16"):
        imp.set("precision", "fp16")
    elif not any_auto:
        imp.set("precision", "fp32")
    if flags["fp16"]:
        _loss_scale(imp)


def _auto_at(imp: Importer, *sections: str) -> bool:
    return any(use.path[0] in sections and use.path[-1] == "enabled" for use in imp.autos)


def _loss_scale(imp: Importer) -> None:
    scale: dict[str, Any] = {}
    static = imp.get("fp16", "loss_scale", default=0)
    static = imp.number(("fp16", "loss_scale"), static, minimum=0)
    if static:
        scale["static"] = static
    for key, target, lowest in (("initial_scale_power", "initial_scale_power", 0),
                                ("loss_scale_window", "growth_interval", 1),
                                ("hysteresis", "hysteresis", 1), ("min_loss_scale", "min_scale", None)):
        if not imp.has("fp16", key):
            continue
        value = imp.get("fp16", key)
        if key == "min_loss_scale":
            number = imp.number(("fp16", key), value, positive=True)
        else:
            number = imp.number(("fp16", key), value, integer=True, minimum=lowest)
        if number is not None:
            scale[target] = number
    if scale:
        imp.set("loss_scale", scale)


def map_communication(imp: Importer) -> None:
    """communication_data_type -> engine.comm.reduce_dtype. Left out, DeepSpeed reduces gradients
    in the training dtype (engine.py communication_data_type: fp16, else bf16, else fp32); dsl
    reduces in fp32 or bf16, so an fp16 reduction becomes an fp32 one, with a note. Runs after
    map_precision and the ZeRO mapping (zero_quantized_gradients)."""
    path = ("communication_data_type",)
    value = imp.get(*path)
    if value is not None and (not isinstance(value, str) or value.lower() not in ("fp16", "bf16", "fp32")):
        imp.refuse(path, f"DeepSpeed refuses it: Invalid communication_data_type. Supported data types: "
                         f"['fp16', 'bf16', 'fp32']. Got: {value}")
        return
    if imp.out.get("comm", {}).get("quantize_gradients"):
        if value is not None:
            imp.note(path, f"{value!r}: zero_quantized_gradients sends int8 gradients instead")
        return
    wire = value.lower() if isinstance(value, str) else imp.precision
    if wire == "fp16":
        imp.note(path if value is not None else (), "fp16 gradient reduction (DeepSpeed's with fp16 training "
                 "when communication_data_type is left out): dsl reduces them in fp32 "
                 "(engine.comm.reduce_dtype has fp32 and bf16)")
        wire = "fp32"
    imp.set("comm.reduce_dtype", wire)
