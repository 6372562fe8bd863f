"""The zero_optimization section of a DeepSpeed config: the ZeRO stage, optimizer and parameter
offload, and the bucket sizes.

- stage (and the old `zero_optimization: true/false`) -> engine.zero_stage (0..3);
- offload_optimizer (and the old cpu_offload) -> engine.offload.optimizer / nvme_path /
  pin_memory / ratio; offload_param (and cpu_offload_param) -> engine.offload.params (cpu only,
  together with optimizer offload at stage 3); nothing offloaded when left out, DeepSpeed's default;
- reduce_bucket_size / sub_group_size (elements) -> engine.bucket_mib / offload.sub_group_mib
  (fp32 MiB); zero_quantized_gradients -> engine.comm.quantize_gradients; the `auto` bucket sizes
  Hugging Face derives from the hidden size.

The other zero_optimization keys are the table's (engine/ds_keys.py, walked by engine/ds_table.py).
Part of the importer run by engine/dsconfig.py; the state and the helpers are engine/ds_state.py's.
"""

from __future__ import annotations

from dsl.engine.ds_state import AUTO, MIB, Importer, Path_

__all__ = ["map_zero"]


def map_zero(imp: Importer) -> None:
    z = imp.data.get("zero_optimization")
    stage = 0
    if isinstance(z, bool):
        imp.get("zero_optimization")
        stage = 1 if z else 0
        imp.note(("zero_optimization",), f"{str(z).lower()}: DeepSpeed's old form, read as stage {stage}")
    elif z is not None and not isinstance(z, dict):
        imp.refuse(("zero_optimization",), f"{z!r} is not a section {{...}}")
        return
    elif isinstance(z, dict) and "stage" in z:
        value = imp.get("zero_optimization", "stage")
        number = imp.number(("zero_optimization", "stage"), value, integer=True, minimum=0)
        if number is not None and number > 3:
            imp.refuse(("zero_optimization", "stage"), f"{number}: DeepSpeed's maximum ZeRO stage is 3")
        elif number is not None:
            stage = int(number)
    imp.set("zero_stage", stage)
    # DeepSpeed's default: nothing offloaded (set, so that the planner does not choose otherwise).
    imp.set("offload.optimizer", "none")
    imp.set("offload.params", "none")
    if not isinstance(z, dict):
        return
    _offload(imp, stage)
    if "reduce_bucket_size" in z:
        value = imp.get("zero_optimization", "reduce_bucket_size")
        path = ("zero_optimization", "reduce_bucket_size")
        if value == AUTO:
            if imp.ctx.hidden_size:
                elements = imp.ctx.hidden_size * imp.ctx.hidden_size
                imp.auto(path, elements, f"hidden_size {imp.ctx.hidden_size} squared, as Hugging Face fills it; "
                                         f"engine.bucket_mib {elements * 4 / MIB:g}")
                imp.set("bucket_mib", elements * 4 / MIB)
            else:
                imp.auto(path, "unfilled", "the model's hidden size is not known here; engine.bucket_mib "
                                           "keeps its value (a tuning key)")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0:
            imp.note(path, f"{value!r}: DeepSpeed 0.19.8 refuses it (it must be > 0); dsl keeps "
                           "engine.bucket_mib (a tuning key)")
        else:
            number = imp.number(path, value, positive=True)
            if number is not None:
                imp.set("bucket_mib", number * 4 / MIB)
    if "sub_group_size" in z:
        path = ("zero_optimization", "sub_group_size")
        value = imp.get(*path)
        number = imp.number(path, value, minimum=0)
        if number:
            imp.set("offload.sub_group_mib", number * 4 / MIB)
        elif number == 0:
            imp.note(path, "0: dsl keeps engine.offload.sub_group_mib (the NVMe swap unit)")
    if "zero_quantized_gradients" in z:
        path = ("zero_optimization", "zero_quantized_gradients")
        value = imp.get(*path)
        if not isinstance(value, bool):
            imp.refuse(path, f"{value!r} is not true or false")
        elif value:
            imp.set("comm.quantize_gradients", True)
    if stage == 3:
        _stage3_gathers(imp, z)
    for key in ("stage3_param_persistence_threshold", "param_persistence_threshold"):
        if z.get(key) == AUTO:
            path = ("zero_optimization", key)
            h = imp.ctx.hidden_size
            if stage == 3 and h:
                imp.auto(path, 10 * h, "10 x hidden_size, as Hugging Face fills it at ZeRO-3; a tuning key "
                                       "dsl's stage 3 does not use")
            else:
                imp.auto(path, "DeepSpeed's default", "Hugging Face fills it at ZeRO-3 only, from the "
                                                      "hidden size; a tuning key dsl does not use")


# DeepSpeed 0.19.8's defaults (deepspeed/runtime/zero/config.py).
_DS_MAX_LIVE = 1_000_000_000
_DS_PREFETCH = 50_000_000


def _stage3_gathers(imp: Importer, z: dict) -> None:
    """Stage 3 gathers as DeepSpeed does: one module at a time (engine.stage3.gather: module), at
    most stage3_max_live_parameters gathered and stage3_prefetch_bucket_size prefetched
    (DeepSpeed's defaults when left out; Hugging Face's "auto" prefetch is 0.9 x hidden_size^2)."""
    imp.set("stage3.gather", "module")
    live, prefetch = _DS_MAX_LIVE, _DS_PREFETCH
    for key in ("stage3_max_live_parameters", "max_live_parameters"):
        if key in z:
            path = ("zero_optimization", key)
            value = imp.number(path, imp.get(*path), integer=True, minimum=0)
            if value is not None:
                live = int(value)
    for key in ("stage3_prefetch_bucket_size", "prefetch_bucket_size"):
        if key not in z:
            continue
        path = ("zero_optimization", key)
        if z[key] == AUTO:
            h = imp.ctx.hidden_size
            if h:
                prefetch = int(0.9 * h * h)
                imp.auto(path, prefetch, "0.9 x hidden_size squared, as Hugging Face fills it at ZeRO-3")
            else:
                imp.auto(path, "DeepSpeed's default", "Hugging Face fills it from the hidden size, which is "
                                                      "unknown here")
            continue
        value = imp.number(path, imp.get(*path), integer=True, minimum=0)
        if value is not None:
            prefetch = int(value)
    imp.set("stage3.max_live_params", live)
    imp.set("stage3.prefetch_params", prefetch)


def _offload(imp: Importer, stage: int) -> None:
    z = imp.data["zero_optimization"]
    device = "none"
    oo = ("zero_optimization", "offload_optimizer")
    if z.get("cpu_offload") is not None:
        legacy = imp.get("zero_optimization", "cpu_offload")
        if legacy is True and not imp.has(*oo, "device"):
            device = "cpu"
        imp.note(("zero_optimization", "cpu_offload"),
                 f"{str(legacy).lower()}: DeepSpeed's old name, read as offload_optimizer.device: {device}")
    if isinstance(z.get("offload_optimizer"), dict):
        node = z["offload_optimizer"]
        if "device" in node:
            value = imp.get(*oo, "device")
            if value not in ("none", "cpu", "nvme"):
                imp.refuse(oo + ("device",), f"{value!r} is not none, cpu or nvme")
            else:
                device = value
        if device != "none":
            if "nvme_path" in node:
                path_value = imp.get(*oo, "nvme_path")
                if path_value is not None:
                    imp.set("offload.nvme_path", str(path_value))
            if "pin_memory" in node:
                pin = imp.get(*oo, "pin_memory")
                if isinstance(pin, bool):
                    imp.set("offload.pin_memory", pin)
                else:
                    imp.refuse(oo + ("pin_memory",), f"{pin!r} is not true or false")
            if "ratio" in node:
                ratio = imp.number(oo + ("ratio",), imp.get(*oo, "ratio"), minimum=0)
                if ratio is not None and ratio > 1:
                    imp.refuse(oo + ("ratio",), f"{ratio:g} is above 1")
                elif ratio is not None and ratio < 1 and stage != 3:
                    imp.refuse(oo + ("ratio",), f"{ratio:g}: DeepSpeed's rule: Partial offloading only "
                                                f"supported for ZeRO Stage 3 (stage is {stage})")
                elif ratio is not None:
                    imp.set("offload.ratio", ratio)
        else:
            for key in ("nvme_path", "pin_memory", "ratio"):
                if key in node:
                    imp.get(*oo, key)  # settings of an offload that is off: no effect
    if device != "none" and stage == 0:
        imp.refuse(oo + ("device",) if imp.has(*oo, "device") else ("zero_optimization", "cpu_offload"),
                   f"{device}: optimizer offload needs ZeRO stage 1, 2 or 3 (DeepSpeed: offload_optimizer "
                   "is valid for ZeRO stage 1, 2, 3); set zero_optimization.stage")
        return
    if device != "none":
        imp.set("offload.optimizer", device)
    op = ("zero_optimization", "offload_param")
    param = "none"
    at: Path_ = op + ("device",)
    if z.get("cpu_offload_param") is not None:
        legacy = imp.get("zero_optimization", "cpu_offload_param")
        if legacy is True and not imp.has(*op, "device"):
            param, at = "cpu", ("zero_optimization", "cpu_offload_param")
        imp.note(("zero_optimization", "cpu_offload_param"),
                 f"{str(legacy).lower()}: DeepSpeed's old name, read as offload_param.device: {param}")
    if isinstance(z.get("offload_param"), dict) and "device" in z["offload_param"]:
        value = imp.get(*op, "device")
        if value not in ("none", "cpu", "nvme"):
            imp.refuse(at, f"{value!r} is not none, cpu or nvme")
            return
        param = value
    if param in ("cpu", "nvme") and stage != 3:
        imp.note(at, f"{param}: DeepSpeed offloads parameters at ZeRO stage 3 only and ignores it at stage "
                     f"{stage}; so does dsl")
    elif param in ("cpu", "nvme") and device not in ("cpu", "nvme"):
        imp.note(at, f"{param} without offload_optimizer.device cpu or nvme (it is {device}): dsl offloads "
                     "parameters only together with the optimizer (the offloaded optimizer updates them "
                     "off the device), so they stay on the device: the same training, more device memory "
                     "(dsl plan shows whether it fits)")
    elif param in ("cpu", "nvme"):
        imp.set("offload.params", param)
        if param == "nvme":
            _param_nvme_path(imp, op, device)


def _param_nvme_path(imp: Importer, op: Path_, optimizer_device: str) -> None:
    """offload_param.nvme_path: dsl keeps one folder for both offloads (engine.offload.nvme_path)."""
    given = imp.get(*op, "nvme_path") if imp.has(*op, "nvme_path") else None
    if given is None:
        if optimizer_device != "nvme":
            imp.refuse(op + ("device",), "nvme needs offload_param.nvme_path (a folder on a fast local disk)")
        return
    if optimizer_device == "nvme" and imp.has("zero_optimization", "offload_optimizer", "nvme_path"):
        other = imp.get("zero_optimization", "offload_optimizer", "nvme_path")
        if other is not None and str(other) != str(given):
            imp.note(op + ("nvme_path",), f"{given}: dsl keeps the parameter and optimizer files in one folder, "
                                          f"offload_optimizer.nvme_path ({other})")
            return
    imp.set("offload.nvme_path", str(given))
