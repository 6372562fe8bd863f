"""Every DeepSpeed config key the mappings leave: walked against the key table of engine/ds_keys.py.

After the mappings (engine/ds_precision.py, ds_training.py, ds_zero.py, ds_optimizer.py,
ds_scheduler.py) have read the keys they turn into engine settings, `walk` visits the rest of
the JSON and applies the table: a key at DeepSpeed's default is accepted silently, a tuning,
logging or checkpoint-format key gets a note of what dsl does instead, a key that would change
the result is refused with `why`, and an unknown key is refused in a section DeepSpeed validates
strictly (else noted), with a did-you-mean. A whole block (`block=True`) is refused unless it is
disabled. The notes and refusals go to the `Importer` (engine/ds_state.py); engine/dsconfig.py
raises the refusals as one located error.
"""

from __future__ import annotations

import difflib
from typing import Any

from dsl.engine.ds_auto import EXTRA_AUTO, auto_rule
from dsl.engine.ds_keys import KEYS, STRICT_SECTIONS, Key, find
from dsl.engine.ds_state import AUTO, NOT_AUTO, Importer, Path_, canonical, json_text, same, show_default

__all__ = ["walk"]


def walk(imp: Importer, node: dict[str, Any], path: Path_) -> None:
    for key, value in node.items():
        sub = path + (key,)
        if sub in imp.done or sub[:2] in (("optimizer", "params"), ("scheduler", "params")):
            continue
        entry = find(canonical(sub))
        if entry is not None and entry.block:
            _block(imp, sub, value, entry)
            continue
        if isinstance(value, dict):
            if entry is None and not _known_section(imp, sub):
                _unknown(imp, sub)
                continue
            walk(imp, value, sub)
            continue
        if entry is None and _known_section(imp, sub):
            imp.done.add(sub)
            if value not in (None, False):  # null / false: the section left out
                imp.refuse(sub, f"{json_text(value)} is not a section {{...}}")
            continue
        if entry is None:
            _unknown(imp, sub)
            continue
        _leaf(imp, sub, value, entry)


def _known_section(imp: Importer, path: Path_) -> bool:
    prefix = tuple(canonical(path))
    return any(key.parts[:len(prefix)] == prefix for key in KEYS)


def _unknown(imp: Importer, path: Path_) -> None:
    parts = canonical(path)
    parent = ".".join(parts[:-1])
    siblings = sorted({key.parts[len(parts) - 1] for key in KEYS
                       if key.parts[:len(parts) - 1] == parts[:-1] and len(key.parts) >= len(parts)})
    close = difflib.get_close_matches(parts[-1], siblings, n=1, cutoff=0.75)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    if parent in STRICT_SECTIONS:
        imp.refuse(path, f"unknown key in {parent} (DeepSpeed 0.19.8 refuses it too){hint}")
    else:
        imp.done.add(path)
        imp.note(path, f"not a key DeepSpeed 0.19.8 reads: it ignores it, and so does dsl{hint}")


def _leaf(imp: Importer, path: Path_, value: Any, entry: Key) -> None:
    imp.done.add(path)
    section = path[0]
    if value == AUTO:
        rule = auto_rule(".".join(canonical(path)))
        if rule is not None:
            imp.auto(path, "-", rule.dsl)
        elif ".".join(canonical(path)) in EXTRA_AUTO:
            imp.note(path, f"auto ({EXTRA_AUTO['.'.join(canonical(path))]})")
        else:
            imp.refuse(path, f"{NOT_AUTO} (DeepSpeed's default: {show_default(entry.default)})")
        return
    if section in imp.disabled:
        return  # a key of a disabled fp16/bf16 section: no effect
    if entry.use == "mapped":
        return
    if entry.use == "default":
        if not same(value, entry.default):
            imp.refuse(path, f"{json_text(value)}: {entry.why}")
        return
    if entry.use == "note":
        if not same(value, entry.default):
            imp.note(path, f"{json_text(value)}: {entry.why}")
        return
    if entry.use == "legacy":
        if entry.path == "zero_allow_untested_optimizer":
            if value is not False:
                imp.note(path, f"{json_text(value)}: {entry.why}")
            return
        if entry.path.endswith("stage3_gather_fp16_weights_on_model_save"):
            imp.note(path, f"{json_text(value)}: DeepSpeed's old name of stage3_gather_16bit_weights_on_model_save, "
                           "a save format: dsl's checkpoints hold the full fp32 weights in its own format")
            return
        imp.note(path, f"{json_text(value)}: {entry.why}")
        return
    imp.refuse(path, entry.why)


def _block(imp: Importer, path: Path_, value: Any, entry: Key) -> None:
    imp.done.add(path)
    if entry.use == "note":
        if isinstance(value, dict) and value.get("enabled") is False:
            return
        if value in ({}, None, False):
            return
        imp.note(path, entry.why)
        return
    if entry.use == "legacy":
        return
    enabled = value.get("enabled") if isinstance(value, dict) else value
    if isinstance(value, dict) and value and "enabled" not in value and entry.path in _PRESENCE_ENABLES:
        enabled = True  # DeepSpeed turns these on by the section's presence
    if isinstance(value, dict) and enabled == AUTO and entry.path == "amp":
        imp.auto(path + ("enabled",), False, "Hugging Face fills true only for its apex backend, which dsl "
                                             "does not have")
        enabled = False
        if value.get("opt_level") == AUTO:
            imp.auto(path + ("opt_level",), "-", "unused: amp is disabled")
    if isinstance(value, dict) and entry.path == "tensor_parallel":
        size = value.get("autotp_size", value.get("tp_size", 1))
        enabled = isinstance(size, int) and size > 1
    if enabled in (False, None, 0) or value == {}:
        if entry.path in ("amp", "curriculum_learning", "sparse_attention", "progressive_layer_drop",
                          "elasticity", "eigenvalue", "quantize_training", "compression_training", "nebula"):
            imp.note(path, "disabled: accepted (DeepSpeed 0.19.8 refuses the key, which it removed; "
                           "dsl ignores a disabled block)")
        return
    imp.refuse(path, entry.why)


_PRESENCE_ENABLES = {"sparse_attention", "zenflow", "weight_quantization", "compression_training", "expert_parallel",
                     "tensor_parallel"}
"""Sections DeepSpeed turns on by being there (the others have an `enabled` that defaults to false)."""
