"""The scheduler section of a DeepSpeed config -> engine.scheduler, with DeepSpeed's schedulers.

WarmupLR, WarmupDecayLR and WarmupCosineLR run with DeepSpeed 0.19.8's formulas and step timing
(engine/schedule.py); their parameters are treated as engine/ds_keys.py's SCHEDULER_PARAMS says,
with the constructors' defaults for what is left out (WarmupLR's log warm-up from warmup_min_lr 0,
WarmupCosineLR's cos_min_ratio 1e-4); warmup_max_lr replaces optimizer.params.lr, as in DeepSpeed.
The other DeepSpeed schedulers are refused with what to use; no scheduler section is a constant
lr, DeepSpeed's default. `auto` takes Hugging Face's values (the run's length for
total_num_steps, the spec's engine settings for the others).

Part of the importer run by engine/dsconfig.py; the state and the helpers are engine/ds_state.py's.
"""

from __future__ import annotations

from typing import Any

from dsl.engine.ds_auto import auto_rule
from dsl.engine.ds_keys import NO_DEFAULT, SCHEDULER_PARAMS, SCHEDULER_REFUSED
from dsl.engine.ds_state import AUTO, NOT_AUTO, Importer, Path_, same

__all__ = ["map_scheduler"]

_SPEC = object()
"""A scheduler parameter the spec decides (an `auto` that is not a number here)."""


def map_scheduler(imp: Importer) -> None:
    sched = imp.data.get("scheduler")
    if sched is None:
        imp.set("scheduler", {"type": "constant", "warmup_steps": 0})
        return
    if not isinstance(sched, dict):
        imp.refuse(("scheduler",), f"{sched!r} is not a section {{...}}")
        return
    kind = imp.get("scheduler", "type")
    if kind not in SCHEDULER_PARAMS:
        at = ("scheduler", "type") if "type" in sched else ("scheduler",)
        if kind in SCHEDULER_REFUSED:
            imp.refuse(at, SCHEDULER_REFUSED[kind])
        elif isinstance(kind, str):
            imp.refuse(at, f"scheduler {kind!r} is not supported: dsl has DeepSpeed's WarmupLR, WarmupDecayLR "
                           "and WarmupCosineLR (and its own cosine, linear, constant in engine.scheduler)")
        else:
            imp.refuse(at, "a scheduler section needs a type (WarmupLR, WarmupDecayLR, WarmupCosineLR)")
        for key in sched.get("params", {}) if isinstance(sched.get("params"), dict) else ():
            imp.done.add(("scheduler", "params", key))
        return
    params = imp.params("scheduler")
    if params is None:
        return
    table = {key.path: key for key in SCHEDULER_PARAMS[kind]}
    out: dict[str, Any] = {"type": kind}
    resolved: dict[str, Any] = {}
    for key, value in params.items():
        path = ("scheduler", "params", key)
        extra = (" (WarmupCosineLR's peak is optimizer.params.lr; its warm-up starts at warmup_min_ratio)"
                 if kind == "WarmupCosineLR" and key in ("warmup_min_lr", "warmup_max_lr") else "")
        entry = imp.param_entry("scheduler", key, table, kind, extra)
        if entry is None:
            continue
        if value == AUTO:
            rule = auto_rule(".".join(path))
            if rule is None:
                imp.refuse(path, NOT_AUTO)
                continue
            resolved[key] = _scheduler_auto(imp, path, key)
            continue
        if entry.use == "default":
            if not same(value, entry.default):
                imp.refuse(path, f"{value!r}: {entry.why}")
            continue
        resolved[key] = value
    for entry in SCHEDULER_PARAMS[kind]:
        if entry.use == "mapped" and entry.path not in resolved and entry.path not in params:
            if entry.default is NO_DEFAULT:
                imp.refuse(("scheduler", "params") if "params" in sched else ("scheduler",),
                           f"{kind} needs {entry.path} (DeepSpeed's constructor has no default for it)")
                return
            resolved[entry.path] = entry.default
    # warmup_num_steps: a positive whole number (DeepSpeed checks isinstance(int) and > 0).
    warmup = resolved.get("warmup_num_steps")
    wpath = ("scheduler", "params", "warmup_num_steps")
    if warmup is not _SPEC:
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup <= 0:
            imp.refuse(wpath if "warmup_num_steps" in params else ("scheduler", "type"),
                       f"{warmup!r}: DeepSpeed's rule: warmup_num_steps must be a positive integer")
        else:
            out["warmup_steps"] = warmup
    wtype = resolved.get("warmup_type", "log")
    if wtype not in ("log", "linear"):
        imp.note(("scheduler", "params", "warmup_type"),
                 f"{wtype!r}: DeepSpeed warns 'Using unknown warmup_type' and warms up with log; so does dsl")
        wtype = "log"
    out["warmup_type"] = wtype
    total = resolved.get("total_num_steps")
    if kind != "WarmupLR" and total is not _SPEC and total is not None:
        number = imp.number(("scheduler", "params", "total_num_steps"), total, integer=True, positive=True)
        if number is not None:
            out["total_steps"] = number
    if kind == "WarmupCosineLR":
        for key, target in (("warmup_min_ratio", "warmup_min_ratio"), ("cos_min_ratio", "min_lr_ratio")):
            number = imp.number(("scheduler", "params", key), resolved[key], minimum=0)
            if number is not None:
                out[target] = number
    else:
        low = resolved.get("warmup_min_lr")
        if low is not _SPEC:
            number = imp.number(("scheduler", "params", "warmup_min_lr"), low, minimum=0)
            if number is not None:
                out["warmup_min_lr"] = number
        peak = resolved.get("warmup_max_lr")
        if peak is not _SPEC and peak is not None:
            number = imp.number(("scheduler", "params", "warmup_max_lr"), peak, positive=True)
            if number is not None:
                opt_lr = imp.data.get("optimizer", {}).get("params", {}).get("lr") \
                    if isinstance(imp.data.get("optimizer"), dict) and isinstance(
                        imp.data["optimizer"].get("params"), dict) else None
                if isinstance(opt_lr, (int, float)) and not isinstance(opt_lr, bool) and opt_lr != number:
                    imp.note(("scheduler", "params", "warmup_max_lr"),
                             f"{number:g} is the peak lr; optimizer.params.lr {opt_lr:g} is replaced by it, "
                             "as in DeepSpeed (the scheduler sets the lr from the first step on)")
                imp.set("optimizer.lr", number)
    imp.set("scheduler", out)


def _scheduler_auto(imp: Importer, path: Path_, key: str) -> Any:
    if key == "warmup_min_lr":
        imp.auto(path, 0.0, "Hugging Face fills 0")
        return 0.0
    if key == "total_num_steps":
        if imp.ctx.steps is None:
            imp.refuse(path, "auto is the run's length (Hugging Face: num_training_steps), which is not "
                             "known here: set run.train.steps, pass initialize(..., total_steps=N), or "
                             "write the number")
            return _SPEC
        imp.auto(path, imp.ctx.steps, "the run's optimizer steps (Hugging Face: num_training_steps)")
        return imp.ctx.steps
    if key == "warmup_num_steps":
        steps = imp.spec("scheduler.warmup_steps")
        imp.auto(path)
        if isinstance(steps, int) and steps <= 0:
            imp.refuse(path, f"auto is engine.scheduler.warmup_steps = {steps}; DeepSpeed's rule: "
                             "warmup_num_steps must be a positive integer")
        return _SPEC
    imp.auto(path)  # warmup_max_lr: the spec's engine.optimizer.lr
    return _SPEC
