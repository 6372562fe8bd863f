"""Read a DeepSpeed JSON config into the engine's settings, with DeepSpeed's semantics.

Users coming from DeepSpeed keep their config file: `engine: {deepspeed_config: ds.json}` in a
spec, `dsl.engine.initialize(model, {"deepspeed_config": "ds.json"})`, or
`initialize(model, config=ds_dict)`. What happens to each key is the table of engine/ds_keys.py
(docs/deepspeed.md is generated from it); this module applies it:

- parsing: engine/ds_json.py (JSON as JSON, `file:line:col` of every key);
- `"auto"`: Hugging Face's meaning, resolved from the spec (engine/ds_auto.py);
- what a config leaves out gets DeepSpeed 0.19.8's default, not dsl's: clipping at 1.0 (0.19.8's
  default since 0.19.3), a constant lr without a scheduler, the optimizer's own defaults (lr 1e-3),
  WarmupLR's log warm-up from warmup_min_lr, WarmupCosineLR's cos_min_ratio 1e-4, the fp16 loss
  scale 2**16 / window 1000 / hysteresis 2 / min 1; DeepSpeed's schedulers run with its exact
  formulas and step timing (engine/schedule.py);
- batch: train_batch_size = micro x accumulation x data-parallel size, any two derive the third,
  DeepSpeed's own messages when they disagree (engine/ds_batch.py). With the data-parallel size
  known (initialize; a spec whose procs_per_node is a number and that has no hostfile) the three
  are derived here; otherwise the derived one is left to `dsl launch` (the planner fills it from
  the other two once the hosts are known, and the launch refuses a split that has no solution);
- refusals only for what changes the result, every one located at its key in the JSON with
  what to do instead; tuning keys are accepted with a note of what dsl does instead.

The result is `Imported`: the engine settings the JSON decides, located notes, and the `auto`
keys with the engine setting each one takes its value from. The spec's own engine settings
(written next to `deepspeed_config`) override the JSON's (`merge`; a spec scheduler with a
`type` replaces the JSON's scheduler whole). `report` says what every `auto` became, for
`dsl validate` / `dsl plan` and initialize's log.
"""

from __future__ import annotations

import difflib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from dsl.engine.ds_auto import EXTRA_AUTO, Auto, auto_rule
from dsl.engine.ds_batch import NEITHER, BatchError, derive
from dsl.engine.ds_keys import (KEYS, NO_DEFAULT, OPTIMIZER_PARAMS, OPTIMIZER_TYPES, SCHEDULER_PARAMS,
                                SCHEDULER_REFUSED, STRICT_SECTIONS, Key, find)
from dsl.engine.ds_json import load_json_located
from dsl.engine.errors import UserError
from dsl.engine.located import Locations, dotted

__all__ = ["Context", "Imported", "load_deepspeed_config", "import_deepspeed", "merge", "report",
           "is_deepspeed_config", "resolve"]

log = logging.getLogger(__name__)

_MIB = 1 << 20
_AUTO = "auto"
_Path = tuple[str, ...]


@dataclass(frozen=True)
class Context:
    """What the importer knows besides the JSON."""

    explicit: Mapping[str, Any] = field(default_factory=dict)
    """Engine settings written next to deepspeed_config (the spec's `engine:` or initialize's
    mapping): what an `auto` takes, and what overrides the JSON."""
    steps: int | None = None
    """The run's optimizer steps (run.train.steps, initialize's total_steps)."""
    hidden_size: int | None = None
    """The model's hidden size, for the bucket sizes Hugging Face derives from it."""
    dp: int | None = None
    """The data-parallel size, when known: the batch keys are then derived here."""


@dataclass
class AutoUse:
    """One `auto` in the JSON and where its value comes from."""

    path: _Path
    where: str
    rule: Auto
    value: Any = None
    """The value when the importer decides it (bucket sizes, warmup_min_lr, total steps), else None:
    the engine setting `rule.field` after the spec's settings apply."""
    origin: str = ""
    """Where a decided value comes from (default: the rule's text)."""


@dataclass
class Imported:
    engine: dict[str, Any]
    """Engine settings (an EngineConfig mapping) the JSON decides."""
    notes: list[str]
    """`file:line:col key: note` lines."""
    autos: list[AutoUse]
    source: str
    explicit: frozenset[str] = frozenset()
    """The engine settings (dotted) written next to deepspeed_config."""


def load_deepspeed_config(path: Path, where: str, context: Context = Context()) -> Imported:
    """Read and import a DeepSpeed JSON file. `where` names the field that points at the file,
    for a file that cannot be read."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise UserError(f"{where}: cannot read DeepSpeed config {path}: {reason}") from None
    data, locations = load_json_located(text, str(path))
    return import_deepspeed(data, locations, context)


def import_deepspeed(data: Any, locations: Locations, context: Context = Context()) -> Imported:
    """The engine settings of a parsed DeepSpeed config; a UserError names every key dsl cannot
    honour, each at its place in the file."""
    if not isinstance(data, dict):
        raise UserError(f"{locations.source}:1:1: a DeepSpeed config is a JSON object {{...}}, "
                        f"got {type(data).__name__}")
    return _Import(data, locations, context).run()


def resolve(source: str | Path | Mapping[str, Any], context: Context, *, where: str = "deepspeed_config",
            base: Path | None = None) -> tuple[dict[str, Any], Imported]:
    """(engine mapping: the JSON's settings under the explicit ones, the import) for a path (relative
    to `base`) or an already-loaded dict."""
    if isinstance(source, Mapping):
        data, locations = _dict_locations(dict(source))
        imported = import_deepspeed(data, locations, context)
    else:
        path = Path(source).expanduser()
        if base is not None and not path.is_absolute():
            path = base / path
        imported = load_deepspeed_config(path, where, context)
    return merge(imported.engine, dict(context.explicit)), imported


def merge(mapped: dict[str, Any], explicit: dict[str, Any]) -> dict[str, Any]:
    """The JSON's engine settings with the explicit ones over them (nested sections key by key;
    an explicit scheduler that names its `type` replaces the JSON's scheduler whole)."""
    out = dict(mapped)
    for key, value in explicit.items():
        if key == "deepspeed_config":
            continue
        if key == "scheduler" and isinstance(value, Mapping) and "type" in value:
            out[key] = dict(value)
        elif isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(dict(out[key]), dict(value))
        else:
            out[key] = value
    return out


def is_deepspeed_config(config: Mapping[str, Any]) -> bool:
    """Whether a mapping handed to initialize() is a DeepSpeed config rather than engine settings:
    a key DeepSpeed has and dsl's engine does not, or an optimizer/scheduler block with `params`."""
    from dsl.engine.config import EngineConfig

    fields = set(EngineConfig.model_fields)
    top = {key.parts[0] for key in KEYS}
    for key, value in config.items():
        if key in top and key not in fields:
            return True
        if key in ("optimizer", "scheduler") and isinstance(value, Mapping) and "params" in value:
            return True
    return False


def report(imported: Imported, engine: Any, planned: frozenset[str] = frozenset()) -> list[str]:
    """What each `auto` became, one located line each: the value and the engine setting it came
    from (`engine` is the final EngineConfig; `planned` the fields `dsl launch` still chooses)."""
    lines = []
    for use in imported.autos:
        rule = use.rule
        if use.value is not None:
            value, origin = use.value, use.origin or rule.dsl
        elif rule.field:
            value = _attr(engine, rule.field)
            name = f"engine.{rule.field}"
            if rule.field in planned:
                value, origin = "planned", f"{name}: dsl launch chooses it (dsl plan shows the choice)"
            elif rule.field in imported.explicit:
                origin = f"{name}, written in the spec"
            else:
                origin = f"{name}, dsl's default"
            if rule.path in ("fp16.enabled", "bf16.enabled"):
                want = rule.path.split(".")[0]
                value = engine.precision == want
                origin = f"engine.precision is {engine.precision}"
            if rule.path == "train_batch_size" and value is None:
                value, origin = "micro_batch x grad_accum x data-parallel size", "engine.train_batch unset"
        else:
            value, origin = "-", rule.dsl
        lines.append(f"{use.where} {dotted(use.path)}: auto -> {_show(value)} ({origin})")
    return lines


# ----------------------------------------------------------------------------------------------


def _attr(obj: Any, dotted_name: str) -> Any:
    for part in dotted_name.split("."):
        obj = getattr(obj, part)
    return obj


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value).lower() if isinstance(value, bool) else str(value)


def _dict_locations(data: dict[str, Any]) -> tuple[dict[str, Any], Locations]:
    """Locations for a config given as a dict: no file, so every key is named by its path."""
    return data, Locations("deepspeed_config")


class _Import:
    def __init__(self, data: dict[str, Any], locations: Locations, context: Context) -> None:
        self.data, self.loc, self.ctx = data, locations, context
        self.explicit = dict(context.explicit)
        self.out: dict[str, Any] = {}
        self.notes: list[str] = []
        self.errors: list[tuple[tuple[int, int], str]] = []
        self.autos: list[AutoUse] = []
        self.done: set[_Path] = set()
        self.disabled: set[str] = set()
        """Sections that are off (fp16, bf16): their keys are accepted silently."""
        self.precision = "fp32"
        """The training precision as the file (and, for an `auto`, the spec) sets it."""

    # -- access ---------------------------------------------------------------------------------

    def has(self, *path: str) -> bool:
        node: Any = self.data
        for part in path:
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True

    def get(self, *path: str, default: Any = None) -> Any:
        """The value at `path` (marked as handled), or `default` when absent."""
        node: Any = self.data
        for part in path:
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        self.done.add(tuple(path))
        return node

    def where(self, path: _Path) -> str:
        if self.loc.source == "deepspeed_config" and not self.loc.values:
            return "deepspeed_config"
        return self.loc.where(path, key=True)

    def _mark(self, path: _Path) -> tuple[int, int]:
        mark = self.loc.of(path, key=True)
        return mark.line, mark.col

    def refuse(self, path: _Path, why: str) -> None:
        self.done.add(path)
        self.errors.append((self._mark(path), f"{self.where(path)} {dotted(path) or '(file)'}: {why}"))

    def note(self, path: _Path, text: str) -> None:
        self.notes.append(f"{self.where(path)} {dotted(path) or '(file)'}: {text}")

    def auto(self, path: _Path, value: Any = None, origin: str = "") -> None:
        rule = auto_rule(".".join(_canonical(path)))
        assert rule is not None, path
        self.done.add(path)
        self.autos.append(AutoUse(path, self.where(path), rule, value, origin))

    def set(self, dotted_field: str, value: Any) -> None:
        node = self.out
        parts = dotted_field.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value

    def spec(self, dotted_field: str) -> Any:
        """The engine setting `dotted_field` as the explicit settings give it, else dsl's default."""
        from dsl.engine.config import EngineConfig

        node: Any = self.explicit
        for part in dotted_field.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return _attr(EngineConfig(), dotted_field)
            node = node[part]
        return node

    def number(self, path: _Path, value: Any, *, integer: bool = False, positive: bool = False,
               minimum: float | None = None) -> float | int | None:
        """A JSON number as int/float, or None after refusing it (bools and strings are not numbers)."""
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if ok and integer:
            ok = float(value).is_integer()
        if ok and positive:
            ok = value > 0
        if ok and minimum is not None:
            ok = value >= minimum
        if not ok and value == _AUTO:
            self.refuse(path, "\"auto\" is filled by neither Hugging Face nor DeepSpeed here; write a value")
            return None
        if not ok:
            kind = "a whole number" if integer else "a number"
            if positive:
                kind = "a positive " + kind.removeprefix("a ")
            elif minimum is not None:
                kind += f" >= {minimum:g}"
            self.refuse(path, f"{value!r} is not {kind}")
            return None
        return int(value) if integer else float(value)

    # -- the import -----------------------------------------------------------------------------

    def run(self) -> Imported:
        self._precision()
        self._batch()
        self._clipping()
        self._zero()
        self._optimizer()
        self._scheduler()
        self._misc()
        self._walk(self.data, ())
        if self.errors:
            lines = [text for _, text in sorted(self.errors, key=lambda item: item[0])]
            raise UserError("DeepSpeed config keys dsl cannot honour:\n" + "\n".join(lines))
        return Imported(self.out, self.notes, self.autos, self.loc.source, frozenset(_flatten(self.explicit)))

    def _precision(self) -> None:
        flags = {}
        for section in ("fp16", "bf16"):
            name = section
            if section == "bf16" and not self.has("bf16") and self.has("bfloat16"):
                name = "bfloat16"
                self.note(("bfloat16",), "DeepSpeed's old name of the bf16 section, read as bf16")
            node = self.data.get(name)
            if node is not None and not isinstance(node, dict):
                self.refuse((name,), f"{node!r} is not a section {{...}}")
                flags[section] = False
                continue
            value = self.get(name, "enabled", default=False)
            if value == _AUTO:
                self.auto((name, "enabled"))
                value = self.spec("precision") == section
            elif not isinstance(value, bool):
                self.refuse((name, "enabled"), f"{value!r} is not true, false or \"auto\"")
                value = False
            flags[section] = value
            if not value:
                self.disabled.add(name)
        self.precision = "bf16" if flags["bf16"] else "fp16" if flags["fp16"] else "fp32"
        if flags["fp16"] and flags["bf16"]:
            at = ("bf16" if self.has("bf16") else "bfloat16", "enabled")
            self.refuse(at, "DeepSpeed's rule: bfloat16 and fp16 modes cannot be simultaneously enabled; "
                            "enable one of them")
            return
        any_auto = any(use.path[-1] == "enabled" for use in self.autos)
        if flags["bf16"] and not self._auto_at("bf16", "bfloat16"):
            self.set("precision", "bf16")
        elif flags["fp16"] and not self._auto_at("fp16"):
            self.set("precision", "fp16")
        elif not any_auto:
            self.set("precision", "fp32")
        if flags["fp16"]:
            self._loss_scale()

    def _auto_at(self, *sections: str) -> bool:
        return any(use.path[0] in sections and use.path[-1] == "enabled" for use in self.autos)

    def _loss_scale(self) -> None:
        scale: dict[str, Any] = {}
        static = self.get("fp16", "loss_scale", default=0)
        static = self.number(("fp16", "loss_scale"), static, minimum=0)
        if static:
            scale["static"] = static
        for key, target, lowest in (("initial_scale_power", "initial_scale_power", 0),
                                    ("loss_scale_window", "growth_interval", 1),
                                    ("hysteresis", "hysteresis", 1), ("min_loss_scale", "min_scale", None)):
            if not self.has("fp16", key):
                continue
            value = self.get("fp16", key)
            if key == "min_loss_scale":
                number = self.number(("fp16", key), value, positive=True)
            else:
                number = self.number(("fp16", key), value, integer=True, minimum=lowest)
            if number is not None:
                scale[target] = number
        if scale:
            self.set("loss_scale", scale)

    def _batch(self) -> None:
        keys = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
        fields = {"train_batch_size": "train_batch", "train_micro_batch_size_per_gpu": "micro_batch",
                  "gradient_accumulation_steps": "grad_accum"}
        given: dict[str, int | None] = {}
        autos: set[str] = set()
        errors = len(self.errors)
        for key in keys:
            if not self.has(key):
                given[key] = None
                continue
            value = self.get(key)
            if value == _AUTO:
                self.auto((key,))
                autos.add(key)
                given[key] = None
                continue
            given[key] = self.number((key,), value, integer=True, positive=True)  # type: ignore[assignment]
        present = {k for k in keys if self.has(k)}
        accum = given["gradient_accumulation_steps"]
        if not ({"train_batch_size", "train_micro_batch_size_per_gpu"} & present):
            # DeepSpeed alone refuses such a file; Hugging Face's accelerate fills the micro batch from
            # its arguments when the key is missing, as for "auto": dsl takes it from the spec.
            self.note((), f"no train_batch_size or train_micro_batch_size_per_gpu: DeepSpeed alone refuses "
                          f"that (\"{NEITHER}\"); as Hugging Face's accelerate fills them from its "
                          "arguments, dsl takes them from the spec (engine.micro_batch and grad_accum, planned "
                          "when left out)")
            if accum is not None:
                self.set("grad_accum", accum)
            return
        if len(self.errors) > errors:
            return
        for key, value in given.items():
            if value is not None:
                self.set(fields[key], value)
        if autos:
            return  # Hugging Face's meaning: the spec's (or the planner's) numbers complete the split
        # The numbers DeepSpeed's rule applies to: the spec's own settings replace the JSON's.
        train, micro, accum = (self.explicit.get(fields[k], given[k]) for k in keys)
        # DeepSpeed's implied accumulation of 1 when only one batch key is given.
        if accum is None and (train is None) != (micro is None):
            self.set("grad_accum", 1)
        if self.ctx.dp is None:
            return
        try:
            batch = derive(train, micro, accum, self.ctx.dp)
        except BatchError as exc:
            at = exc.key if self.has(exc.key) else next(k for k in keys if self.has(k))
            self.refuse((at,), f"DeepSpeed's rule on {self.ctx.dp} data-parallel rank(s): {exc}")
            return
        self.set("train_batch", batch.train)
        self.set("micro_batch", batch.micro)
        self.set("grad_accum", batch.accum)

    def _clipping(self) -> None:
        if not self.has("gradient_clipping"):
            self.set("grad_clip", 1.0)  # DeepSpeed 0.19.8's default (since 0.19.3)
            return
        value = self.get("gradient_clipping")
        if value == _AUTO:
            self.auto(("gradient_clipping",))
            return
        number = self.number(("gradient_clipping",), value)
        if number is not None:
            self.set("grad_clip", number if number > 0 else None)

    def _zero(self) -> None:
        z = self.data.get("zero_optimization")
        stage = 0
        if isinstance(z, bool):
            self.get("zero_optimization")
            stage = 1 if z else 0
            self.note(("zero_optimization",), f"{str(z).lower()}: DeepSpeed's old form, read as stage {stage}")
        elif z is not None and not isinstance(z, dict):
            self.refuse(("zero_optimization",), f"{z!r} is not a section {{...}}")
            return
        elif isinstance(z, dict) and "stage" in z:
            value = self.get("zero_optimization", "stage")
            number = self.number(("zero_optimization", "stage"), value, integer=True, minimum=0)
            if number is not None and number > 3:
                self.refuse(("zero_optimization", "stage"), f"{number}: DeepSpeed's maximum ZeRO stage is 3")
            elif number is not None:
                stage = int(number)
        self.set("zero_stage", stage)
        # DeepSpeed's default: nothing offloaded (set, so that the planner does not choose otherwise).
        self.set("offload.optimizer", "none")
        self.set("offload.params", "none")
        if not isinstance(z, dict):
            return
        self._offload(stage)
        if "reduce_bucket_size" in z:
            value = self.get("zero_optimization", "reduce_bucket_size")
            path = ("zero_optimization", "reduce_bucket_size")
            if value == _AUTO:
                if self.ctx.hidden_size:
                    elements = self.ctx.hidden_size * self.ctx.hidden_size
                    self.auto(path, elements, f"hidden_size {self.ctx.hidden_size} squared, as Hugging Face fills it; "
                                              f"engine.bucket_mib {elements * 4 / _MIB:g}")
                    self.set("bucket_mib", elements * 4 / _MIB)
                else:
                    self.auto(path, "unfilled", "the model's hidden size is not known here; engine.bucket_mib "
                                                "keeps its value (a tuning key)")
            elif isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0:
                self.note(path, f"{value!r}: DeepSpeed 0.19.8 refuses it (it must be > 0); dsl keeps "
                                "engine.bucket_mib (a tuning key)")
            else:
                number = self.number(path, value, positive=True)
                if number is not None:
                    self.set("bucket_mib", number * 4 / _MIB)
        if "sub_group_size" in z:
            path = ("zero_optimization", "sub_group_size")
            value = self.get(*path)
            number = self.number(path, value, minimum=0)
            if number:
                self.set("offload.sub_group_mib", number * 4 / _MIB)
            elif number == 0:
                self.note(path, "0: dsl keeps engine.offload.sub_group_mib (the NVMe swap unit)")
        if "zero_quantized_gradients" in z:
            path = ("zero_optimization", "zero_quantized_gradients")
            value = self.get(*path)
            if not isinstance(value, bool):
                self.refuse(path, f"{value!r} is not true or false")
            elif value:
                self.set("comm.quantize_gradients", True)
        for name, paths in (("stage3_prefetch_bucket_size", ("stage3_prefetch_bucket_size", "prefetch_bucket_size")),
                            ("stage3_param_persistence_threshold",
                             ("stage3_param_persistence_threshold", "param_persistence_threshold"))):
            for key in paths:
                if z.get(key) == _AUTO:
                    path = ("zero_optimization", key)
                    h = self.ctx.hidden_size
                    formula = "0.9 x hidden_size squared" if name.endswith("bucket_size") else "10 x hidden_size"
                    if stage == 3 and h:
                        hf = 0.9 * h * h if name.endswith("bucket_size") else 10 * h
                        self.auto(path, hf, f"{formula}, as Hugging Face fills it at ZeRO-3; a tuning key dsl's "
                                            "stage 3 does not use")
                    else:
                        self.auto(path, "DeepSpeed's default", "Hugging Face fills it at ZeRO-3 only, from the "
                                                               "hidden size; a tuning key dsl does not use")

    def _offload(self, stage: int) -> None:
        z = self.data["zero_optimization"]
        device = "none"
        oo = ("zero_optimization", "offload_optimizer")
        if z.get("cpu_offload") is not None:
            legacy = self.get("zero_optimization", "cpu_offload")
            if legacy is True and not self.has(*oo, "device"):
                device = "cpu"
            self.note(("zero_optimization", "cpu_offload"),
                      f"{str(legacy).lower()}: DeepSpeed's old name, read as offload_optimizer.device: {device}")
        if isinstance(z.get("offload_optimizer"), dict):
            node = z["offload_optimizer"]
            if "device" in node:
                value = self.get(*oo, "device")
                if value not in ("none", "cpu", "nvme"):
                    self.refuse(oo + ("device",), f"{value!r} is not none, cpu or nvme")
                else:
                    device = value
            if device != "none":
                if "nvme_path" in node:
                    path_value = self.get(*oo, "nvme_path")
                    if path_value is not None:
                        self.set("offload.nvme_path", str(path_value))
                if "pin_memory" in node:
                    pin = self.get(*oo, "pin_memory")
                    if isinstance(pin, bool):
                        self.set("offload.pin_memory", pin)
                    else:
                        self.refuse(oo + ("pin_memory",), f"{pin!r} is not true or false")
                if "ratio" in node:
                    ratio = self.number(oo + ("ratio",), self.get(*oo, "ratio"), minimum=0)
                    if ratio is not None and ratio > 1:
                        self.refuse(oo + ("ratio",), f"{ratio:g} is above 1")
                    elif ratio is not None and ratio < 1 and stage != 3:
                        self.refuse(oo + ("ratio",), f"{ratio:g}: DeepSpeed's rule: Partial offloading only "
                                                     f"supported for ZeRO Stage 3 (stage is {stage})")
                    elif ratio is not None:
                        self.set("offload.ratio", ratio)
            else:
                for key in ("nvme_path", "pin_memory", "ratio"):
                    if key in node:
                        self.get(*oo, key)  # settings of an offload that is off: no effect
        if device != "none" and stage == 0:
            self.refuse(oo + ("device",) if self.has(*oo, "device") else ("zero_optimization", "cpu_offload"),
                        f"{device}: optimizer offload needs ZeRO stage 1, 2 or 3 (DeepSpeed: offload_optimizer "
                        "is valid for ZeRO stage 1, 2, 3); set zero_optimization.stage")
            return
        if device != "none":
            self.set("offload.optimizer", device)
        op = ("zero_optimization", "offload_param")
        param = "none"
        at: _Path = op + ("device",)
        if z.get("cpu_offload_param") is not None:
            legacy = self.get("zero_optimization", "cpu_offload_param")
            if legacy is True and not self.has(*op, "device"):
                param, at = "cpu", ("zero_optimization", "cpu_offload_param")
            self.note(("zero_optimization", "cpu_offload_param"),
                      f"{str(legacy).lower()}: DeepSpeed's old name, read as offload_param.device: {param}")
        if isinstance(z.get("offload_param"), dict) and "device" in z["offload_param"]:
            value = self.get(*op, "device")
            if value not in ("none", "cpu", "nvme"):
                self.refuse(at, f"{value!r} is not none, cpu or nvme")
                return
            param = value
        if param == "nvme":
            self.refuse(at, "parameter offload to NVMe (ZeRO-Infinity) is not implemented; use device: cpu "
                            "(with offload_optimizer.device: cpu)")
        elif param == "cpu" and stage != 3:
            self.note(at, f"cpu: DeepSpeed offloads parameters at ZeRO stage 3 only and ignores it at stage "
                          f"{stage}; so does dsl")
        elif param == "cpu" and device != "cpu":
            self.note(at, f"cpu without offload_optimizer.device: cpu (it is {device}): dsl offloads "
                          "parameters only together with the optimizer (its CPU optimizer updates them in "
                          "place), so they stay on the device: the same training, more device memory "
                          "(dsl plan shows whether it fits)")
        elif param == "cpu":
            self.set("offload.params", "cpu")

    def _optimizer(self) -> None:
        opt = self.data.get("optimizer")
        if opt is None:
            self.note((), "no optimizer section: DeepSpeed would use the optimizer the script passes it "
                          "(Hugging Face's Trainer: AdamW from its arguments); dsl uses engine.optimizer "
                          f"({self.spec('optimizer.type')}, lr {self.spec('optimizer.lr'):g})")
            return
        if not isinstance(opt, dict):
            self.refuse(("optimizer",), f"{opt!r} is not a section {{...}}")
            return
        kind = self.get("optimizer", "type")
        if not isinstance(kind, str):
            self.refuse(("optimizer", "type") if "type" in opt else ("optimizer",),
                        "an optimizer section needs a type (Adam, AdamW, SGD, OneBitAdam)")
            return
        name = OPTIMIZER_TYPES.get(kind.lower())
        if name is None:
            self.refuse(("optimizer", "type"), _unsupported_optimizer(kind))
            return
        self.set("optimizer.type", name)
        if name == "onebit_adam":
            self.note(("optimizer", "type"), f"{kind}: removed from DeepSpeed 0.19.8 (it no longer runs there); dsl runs "
                                             "its own 1-bit Adam (engine/onebit.py) with the earlier DeepSpeed's semantics")
        params = opt.get("params", {})
        if "params" in opt:
            self.get("optimizer", "params")
        if not isinstance(params, dict):
            self.refuse(("optimizer", "params"), f"{params!r} is not a section {{...}}")
            return
        table = {key.path: key for key in OPTIMIZER_PARAMS[name]}
        lower = kind.lower()
        for key, value in params.items():
            path = ("optimizer", "params", key)
            self.done.add(path)
            entry = table.get(key)
            if entry is None:
                close = difflib.get_close_matches(key, list(table), n=1, cutoff=0.6)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                self.refuse(path, f"not a parameter of DeepSpeed's {kind} (its constructor refuses it){hint}")
                continue
            if value == _AUTO:
                if auto_rule(".".join(path)) is None:
                    self.refuse(path, f"\"auto\" is filled by neither Hugging Face nor DeepSpeed here; write a "
                                      f"value (DeepSpeed's default: {_show_default(entry.default)})")
                else:
                    self.auto(path)
                continue
            if entry.use == "mapped":
                self._optimizer_param(path, key, value, entry)
            elif entry.use == "default":
                if key == "adam_w_mode" and lower == "adamw":
                    if value is not True:
                        self.note(path, f"{value!r}: no effect with type AdamW (DeepSpeed keeps AdamW: 'Optimizer "
                                        "name of Adam forces AdamW logic unless adam_w_mode is explicitly set')")
                elif not _same(value, entry.default):
                    self.refuse(path, f"{value!r}: {entry.why}")
            elif entry.use == "note":
                if not _same(value, entry.default):
                    self.note(path, f"{value!r}: {entry.why}")
            else:
                self.refuse(path, entry.why)
        decay = params.get("weight_decay", 0.01 if name == "adamw" and params.get("torch_adam") is True else 0.0)
        if decay == _AUTO:
            decay = self.spec("optimizer.weight_decay")
        if name != "sgd" and isinstance(decay, (int, float)) and decay > 0:
            self.note(("optimizer", "params", "weight_decay") if "weight_decay" in params else ("optimizer",),
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
            self.set(target, tuple(default) if isinstance(default, list) else default)

    def _optimizer_param(self, path: _Path, key: str, value: Any, entry: Key) -> None:
        target = entry.to.removeprefix("engine.")
        if key == "betas":
            if (not isinstance(value, list) or len(value) != 2
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
                self.refuse(path, f"{value!r} is not a list of two numbers")
                return
            self.set(target, (float(value[0]), float(value[1])))
            return
        if key == "freeze_step":
            number = self.number(path, value, integer=True, positive=True)
        elif key in ("lr", "eps"):
            number = self.number(path, value, positive=True)
        else:
            number = self.number(path, value, minimum=0)
        if number is not None:
            self.set(target, number)

    def _scheduler(self) -> None:
        sched = self.data.get("scheduler")
        if sched is None:
            self.set("scheduler", {"type": "constant", "warmup_steps": 0})
            return
        if not isinstance(sched, dict):
            self.refuse(("scheduler",), f"{sched!r} is not a section {{...}}")
            return
        kind = self.get("scheduler", "type")
        if kind not in SCHEDULER_PARAMS:
            at = ("scheduler", "type") if "type" in sched else ("scheduler",)
            if kind in SCHEDULER_REFUSED:
                self.refuse(at, SCHEDULER_REFUSED[kind])
            elif isinstance(kind, str):
                self.refuse(at, f"scheduler {kind!r} is not supported: dsl has DeepSpeed's WarmupLR, WarmupDecayLR "
                                "and WarmupCosineLR (and its own cosine, linear, constant in engine.scheduler)")
            else:
                self.refuse(at, "a scheduler section needs a type (WarmupLR, WarmupDecayLR, WarmupCosineLR)")
            for key in sched.get("params", {}) if isinstance(sched.get("params"), dict) else ():
                self.done.add(("scheduler", "params", key))
            return
        params = sched.get("params", {})
        if "params" in sched:
            self.get("scheduler", "params")
        if not isinstance(params, dict):
            self.refuse(("scheduler", "params"), f"{params!r} is not a section {{...}}")
            return
        table = {key.path: key for key in SCHEDULER_PARAMS[kind]}
        out: dict[str, Any] = {"type": kind}
        resolved: dict[str, Any] = {}
        for key, value in params.items():
            path = ("scheduler", "params", key)
            self.done.add(path)
            entry = table.get(key)
            if entry is None:
                close = difflib.get_close_matches(key, list(table), n=1, cutoff=0.6)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                extra = (" (WarmupCosineLR's peak is optimizer.params.lr; its warm-up starts at warmup_min_ratio)"
                         if kind == "WarmupCosineLR" and key in ("warmup_min_lr", "warmup_max_lr") else "")
                self.refuse(path, f"not a parameter of DeepSpeed's {kind} (its constructor refuses it){extra}{hint}")
                continue
            if value == _AUTO:
                rule = auto_rule(".".join(path))
                if rule is None:
                    self.refuse(path, f"\"auto\" is filled by neither Hugging Face nor DeepSpeed here; write a value")
                    continue
                resolved[key] = self._scheduler_auto(path, key)
                continue
            if entry.use == "default":
                if not _same(value, entry.default):
                    self.refuse(path, f"{value!r}: {entry.why}")
                continue
            resolved[key] = value
        for entry in SCHEDULER_PARAMS[kind]:
            if entry.use == "mapped" and entry.path not in resolved and entry.path not in params:
                if entry.default is NO_DEFAULT:
                    self.refuse(("scheduler", "params") if "params" in sched else ("scheduler",),
                                f"{kind} needs {entry.path} (DeepSpeed's constructor has no default for it)")
                    return
                resolved[entry.path] = entry.default
        # warmup_num_steps: a positive whole number (DeepSpeed checks isinstance(int) and > 0).
        warmup = resolved.get("warmup_num_steps")
        wpath = ("scheduler", "params", "warmup_num_steps")
        if warmup is not _SPEC:
            if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup <= 0:
                self.refuse(wpath if "warmup_num_steps" in params else ("scheduler", "type"),
                            f"{warmup!r}: DeepSpeed's rule: warmup_num_steps must be a positive integer")
            else:
                out["warmup_steps"] = warmup
        wtype = resolved.get("warmup_type", "log")
        if wtype not in ("log", "linear"):
            self.note(("scheduler", "params", "warmup_type"),
                      f"{wtype!r}: DeepSpeed warns 'Using unknown warmup_type' and warms up with log; so does dsl")
            wtype = "log"
        out["warmup_type"] = wtype
        total = resolved.get("total_num_steps")
        if kind != "WarmupLR" and total is not _SPEC and total is not None:
            number = self.number(("scheduler", "params", "total_num_steps"), total, integer=True, positive=True)
            if number is not None:
                out["total_steps"] = number
        if kind == "WarmupCosineLR":
            for key, target in (("warmup_min_ratio", "warmup_min_ratio"), ("cos_min_ratio", "min_lr_ratio")):
                number = self.number(("scheduler", "params", key), resolved[key], minimum=0)
                if number is not None:
                    out[target] = number
        else:
            low = resolved.get("warmup_min_lr")
            if low is not _SPEC:
                number = self.number(("scheduler", "params", "warmup_min_lr"), low, minimum=0)
                if number is not None:
                    out["warmup_min_lr"] = number
            peak = resolved.get("warmup_max_lr")
            if peak is not _SPEC and peak is not None:
                number = self.number(("scheduler", "params", "warmup_max_lr"), peak, positive=True)
                if number is not None:
                    opt_lr = self.data.get("optimizer", {}).get("params", {}).get("lr") \
                        if isinstance(self.data.get("optimizer"), dict) and isinstance(
                            self.data["optimizer"].get("params"), dict) else None
                    if isinstance(opt_lr, (int, float)) and not isinstance(opt_lr, bool) and opt_lr != number:
                        self.note(("scheduler", "params", "warmup_max_lr"),
                                  f"{number:g} is the peak lr; optimizer.params.lr {opt_lr:g} is replaced by it, "
                                  "as in DeepSpeed (the scheduler sets the lr from the first step on)")
                    self.set("optimizer.lr", number)
        self.set("scheduler", out)

    def _scheduler_auto(self, path: _Path, key: str) -> Any:
        if key == "warmup_min_lr":
            self.auto(path, 0.0, "Hugging Face fills 0")
            return 0.0
        if key == "total_num_steps":
            if self.ctx.steps is None:
                self.refuse(path, "auto is the run's length (Hugging Face: num_training_steps), which is not "
                                  "known here: set run.train.steps, pass initialize(..., total_steps=N), or "
                                  "write the number")
                return _SPEC
            self.auto(path, self.ctx.steps, "the run's optimizer steps (Hugging Face: num_training_steps)")
            return self.ctx.steps
        if key == "warmup_num_steps":
            steps = self.spec("scheduler.warmup_steps")
            self.auto(path)
            if isinstance(steps, int) and steps <= 0:
                self.refuse(path, f"auto is engine.scheduler.warmup_steps = {steps}; DeepSpeed's rule: "
                                  "warmup_num_steps must be a positive integer")
            return _SPEC
        self.auto(path)  # warmup_max_lr: the spec's engine.optimizer.lr
        return _SPEC

    def _misc(self) -> None:
        if "sequence_parallel_size" in self.data:
            path = ("sequence_parallel_size",)
            number = self.number(path, self.get(*path), integer=True, positive=True)
            if number is not None:
                self.set("sequence_parallel", number)
        self._communication()
        if "gradient_allreduce_op" in self.data:
            value = self.data["gradient_allreduce_op"]
            if isinstance(value, str) and value.lower() == "mean":
                self.get("gradient_allreduce_op")

    def _communication(self) -> None:
        """communication_data_type -> engine.comm.reduce_dtype. Left out, DeepSpeed reduces gradients
        in the training dtype (engine.py communication_data_type: fp16, else bf16, else fp32); dsl
        reduces in fp32 or bf16, so an fp16 reduction becomes an fp32 one, with a note."""
        path = ("communication_data_type",)
        value = self.get(*path)
        if value is not None and (not isinstance(value, str) or value.lower() not in ("fp16", "bf16", "fp32")):
            self.refuse(path, f"DeepSpeed refuses it: Invalid communication_data_type. Supported data types: "
                              f"['fp16', 'bf16', 'fp32']. Got: {value}")
            return
        if self.out.get("comm", {}).get("quantize_gradients"):
            if value is not None:
                self.note(path, f"{value!r}: zero_quantized_gradients sends int8 gradients instead")
            return
        wire = value.lower() if isinstance(value, str) else self.precision
        if wire == "fp16":
            self.note(path if value is not None else (), "fp16 gradient reduction (DeepSpeed's with fp16 training "
                      "when communication_data_type is left out): dsl reduces them in fp32 "
                      "(engine.comm.reduce_dtype has fp32 and bf16)")
            wire = "fp32"
        self.set("comm.reduce_dtype", wire)

    # -- every other key: the table ----------------------------------------------------------

    def _walk(self, node: dict[str, Any], path: _Path) -> None:
        for key, value in node.items():
            sub = path + (key,)
            if sub in self.done or sub[:2] in (("optimizer", "params"), ("scheduler", "params")):
                continue
            entry = find(_canonical(sub))
            if entry is not None and entry.block:
                self._block(sub, value, entry)
                continue
            if isinstance(value, dict):
                if entry is None and not self._known_section(sub):
                    self._unknown(sub)
                    continue
                self._walk(value, sub)
                continue
            if entry is None and self._known_section(sub):
                self.done.add(sub)
                if value not in (None, False):  # null / false: the section left out
                    self.refuse(sub, f"{_json(value)} is not a section {{...}}")
                continue
            if entry is None:
                self._unknown(sub)
                continue
            self._leaf(sub, value, entry)

    def _known_section(self, path: _Path) -> bool:
        prefix = tuple(_canonical(path))
        return any(key.parts[:len(prefix)] == prefix for key in KEYS)

    def _unknown(self, path: _Path) -> None:
        canonical = _canonical(path)
        parent = ".".join(canonical[:-1])
        siblings = sorted({key.parts[len(canonical) - 1] for key in KEYS
                           if key.parts[:len(canonical) - 1] == canonical[:-1] and len(key.parts) >= len(canonical)})
        close = difflib.get_close_matches(canonical[-1], siblings, n=1, cutoff=0.75)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        if parent in STRICT_SECTIONS:
            self.refuse(path, f"unknown key in {parent} (DeepSpeed 0.19.8 refuses it too){hint}")
        else:
            self.done.add(path)
            self.note(path, f"not a key DeepSpeed 0.19.8 reads: it ignores it, and so does dsl{hint}")

    def _leaf(self, path: _Path, value: Any, entry: Key) -> None:
        self.done.add(path)
        section = path[0]
        if value == _AUTO:
            rule = auto_rule(".".join(_canonical(path)))
            if rule is not None:
                self.auto(path, "-", rule.dsl)
            elif ".".join(_canonical(path)) in EXTRA_AUTO:
                self.note(path, f"auto ({EXTRA_AUTO['.'.join(_canonical(path))]})")
            else:
                self.refuse(path, f"\"auto\" is filled by neither Hugging Face nor DeepSpeed here; write a value "
                                  f"(DeepSpeed's default: {_show_default(entry.default)})")
            return
        if section in self.disabled:
            return  # a key of a disabled fp16/bf16 section: no effect
        if entry.use == "mapped":
            return
        if entry.use == "default":
            if not _same(value, entry.default):
                self.refuse(path, f"{_json(value)}: {entry.why}")
            return
        if entry.use == "note":
            if not _same(value, entry.default):
                self.note(path, f"{_json(value)}: {entry.why}")
            return
        if entry.use == "legacy":
            if entry.path == "zero_allow_untested_optimizer":
                if value is not False:
                    self.note(path, f"{_json(value)}: {entry.why}")
                return
            if entry.path.endswith("stage3_gather_fp16_weights_on_model_save"):
                self.note(path, f"{_json(value)}: DeepSpeed's old name of stage3_gather_16bit_weights_on_model_save, "
                                "a save format: dsl's checkpoints hold the full fp32 weights in its own format")
                return
            self.note(path, f"{_json(value)}: {entry.why}")
            return
        self.refuse(path, entry.why)

    def _block(self, path: _Path, value: Any, entry: Key) -> None:
        self.done.add(path)
        if entry.use == "note":
            if isinstance(value, dict) and value.get("enabled") is False:
                return
            if value in ({}, None, False):
                return
            self.note(path, entry.why)
            return
        if entry.use == "legacy":
            return
        enabled = value.get("enabled") if isinstance(value, dict) else value
        if isinstance(value, dict) and value and "enabled" not in value and entry.path in _PRESENCE_ENABLES:
            enabled = True  # DeepSpeed turns these on by the section's presence
        if isinstance(value, dict) and enabled == _AUTO and entry.path == "amp":
            self.auto(path + ("enabled",), False, "Hugging Face fills true only for its apex backend, which dsl "
                                                  "does not have")
            enabled = False
            if value.get("opt_level") == _AUTO:
                self.auto(path + ("opt_level",), "-", "unused: amp is disabled")
        if isinstance(value, dict) and entry.path == "tensor_parallel":
            size = value.get("autotp_size", value.get("tp_size", 1))
            enabled = isinstance(size, int) and size > 1
        if enabled in (False, None, 0) or value == {}:
            if entry.path in ("amp", "curriculum_learning", "sparse_attention", "progressive_layer_drop",
                              "elasticity", "eigenvalue", "quantize_training", "compression_training", "nebula"):
                self.note(path, "disabled: accepted (DeepSpeed 0.19.8 refuses the key, which it removed; "
                                "dsl ignores a disabled block)")
            return
        self.refuse(path, entry.why)


_PRESENCE_ENABLES = {"sparse_attention", "zenflow", "weight_quantization", "compression_training", "expert_parallel",
                     "tensor_parallel"}
"""Sections DeepSpeed turns on by being there (the others have an `enabled` that defaults to false)."""

_SPEC = object()
"""A scheduler parameter the spec decides (an `auto` that is not a number here)."""


def _canonical(path: _Path) -> _Path:
    return ("bf16",) + path[1:] if path and path[0] == "bfloat16" else path


def _flatten(node: Mapping[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, value in node.items():
        name = f"{prefix}{key}"
        out.append(name)
        if isinstance(value, Mapping):
            out += _flatten(value, name + ".")
    return out


def _same(value: Any, default: Any) -> bool:
    if default is NO_DEFAULT:
        return False
    if isinstance(value, bool) or isinstance(default, bool):
        return value is default
    if isinstance(value, (int, float)) and isinstance(default, (int, float)):
        return float(value) == float(default)
    if isinstance(value, str) and isinstance(default, str):
        return value.lower() == default.lower()
    return bool(value == default)


def _json(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, float) and value.is_integer() and abs(value) >= 1e6:
        return f"{value:g}"
    return repr(value) if isinstance(value, str) else str(value)


def _show_default(default: Any) -> str:
    return "none" if default is NO_DEFAULT else _json(default)


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
