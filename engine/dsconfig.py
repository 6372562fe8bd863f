"""Read a DeepSpeed JSON config into the engine's settings (`engine: {deepspeed_config: ds.json}`).

Users coming from DeepSpeed keep their config file. Every key is either mapped onto an
EngineConfig setting, accepted as a no-op because dsl always behaves that way (listed in the
notes, never silently), or refused: one UserError names every unsupported key with its
`file:line:col`, so nothing is ignored without a word.

Mapped (DeepSpeed -> dsl):
- train_batch_size / train_micro_batch_size_per_gpu / gradient_accumulation_steps
  -> train_batch / micro_batch / grad_accum (DeepSpeed's rule train = micro x accum x world is
  checked at launch, when the data-parallel size is known);
- zero_optimization.stage -> zero_stage; .offload_optimizer.device (+ nvme_path) ->
  offload.optimizer (+ nvme_path); .offload_optimizer.pin_memory -> offload.pin_memory;
  .offload_param.device -> offload.params;
  .reduce_bucket_size (elements, fp32 gradients: 4 bytes each) -> bucket_mib;
  .sub_group_size (elements of fp32 state) -> offload.sub_group_mib;
  .zero_quantized_gradients (ZeRO++ qgZ) -> comm.quantize_gradients;
- bf16.enabled / fp16.enabled -> precision; fp16.loss_scale (0 = dynamic, else static),
  initial_scale_power, loss_scale_window, hysteresis, min_loss_scale -> loss_scale;
- gradient_clipping -> grad_clip (0 = off);
- optimizer {type: Adam|AdamW|SGD|OneBitAdam, params: lr, betas, eps, weight_decay, momentum,
  freeze_step} -> optimizer (DeepSpeed's Adam defaults to decoupled weight decay, i.e. AdamW;
  adam_w_mode: false is refused; OneBitAdam -> onebit_adam, its cuda_aware/comm_backend_name
  accepted without effect);
- scheduler WarmupLR / WarmupDecayLR / WarmupCosineLR {warmup_num_steps, warmup_max_lr,
  total_num_steps, cos_min_ratio} -> scheduler (constant / linear to 0 / cosine).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dsl.engine.errors import UserError
from dsl.engine.located import Locations, dotted, load_located

_MIB = 1 << 20
# Accepted without effect, with the reason shown to the user.
_NOOP = {
    ("zero_optimization", "overlap_comm"): (True, "dsl always overlaps gradient communication with backward"),
    ("zero_optimization", "contiguous_gradients"): (True, "dsl's gradient buckets are contiguous"),
    ("zero_optimization", "reduce_scatter"): (True, "stages 2-3 always reduce-scatter"),
    ("zero_optimization", "offload_param", "pin_memory"): (None, "dsl page-locks offload buffers on GPU hosts (offload.pin_memory)"),
    ("steps_per_print",): (None, "dsl prints every run.train.log_every steps"),
    ("wall_clock_breakdown",): (None, "dsl logs tokens/s per interval instead"),
    ("optimizer", "params", "torch_adam"): (None, "dsl picks its fused optimizer itself"),
    ("bf16", "immediate_grad_update"): (None, "no effect in dsl"),
    ("optimizer", "params", "cuda_aware"): (None, "dsl's 1-bit all-reduce runs over the job's process group"),
    ("optimizer", "params", "comm_backend_name"): (None, "dsl's 1-bit all-reduce runs over the job's process group"),
}


def load_deepspeed_config(path: Path, where: str) -> tuple[dict[str, Any], list[str]]:
    """(engine settings as a dict for EngineConfig, notes for the user). `where` names the spec
    field that points at the file, for a missing-file message."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"{where}: cannot read DeepSpeed config {path}: {exc.strerror or exc}") from None
    data, locations = load_located(text, str(path))  # JSON is YAML; we get line:col for free
    if not isinstance(data, dict):
        raise UserError(f"{path}:1:1: a DeepSpeed config is a JSON object")
    return _Mapper(data, locations).run()


class _Mapper:
    def __init__(self, data: dict[str, Any], locations: Locations):
        self.data, self.loc = data, locations
        self.used: set[tuple[str, ...]] = set()
        self.notes: list[str] = []
        self.errors: list[str] = []

    def get(self, *path: str) -> Any:
        node: Any = self.data
        for part in path:
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        self.used.add(path)
        return node

    def refuse(self, path: tuple[str, ...], why: str) -> None:
        self.errors.append(f"{self.loc.where(path)} {dotted(path)}: {why}")

    def run(self) -> tuple[dict[str, Any], list[str]]:
        out: dict[str, Any] = {}
        self._batch(out)
        self._zero(out)
        self._precision(out)
        clip = self.get("gradient_clipping")
        if clip is not None:
            out["grad_clip"] = None if float(clip) == 0 else float(clip)
        self._optimizer(out)
        self._scheduler(out)
        self._noops()
        self._leftovers(self.data, ())
        if self.errors:
            raise UserError("DeepSpeed config keys dsl cannot honour:\n" + "\n".join(self.errors))
        return out, self.notes

    def _batch(self, out: dict[str, Any]) -> None:
        for key, field in (("train_batch_size", "train_batch"), ("train_micro_batch_size_per_gpu", "micro_batch"),
                           ("gradient_accumulation_steps", "grad_accum")):
            value = self.get(key)
            if value is not None:
                out[field] = value

    def _zero(self, out: dict[str, Any]) -> None:
        stage = self.get("zero_optimization", "stage")
        if stage is not None:
            out["zero_stage"] = stage
        offload: dict[str, Any] = {}
        device = self.get("zero_optimization", "offload_optimizer", "device")
        if device is not None:
            offload["optimizer"] = {"none": "none", "cpu": "cpu", "nvme": "nvme"}.get(device, device)
        pin = self.get("zero_optimization", "offload_optimizer", "pin_memory")
        if isinstance(pin, bool):
            offload["pin_memory"] = pin
        nvme = self.get("zero_optimization", "offload_optimizer", "nvme_path")
        if nvme is not None:
            offload["nvme_path"] = nvme
        param_device = self.get("zero_optimization", "offload_param", "device")
        if param_device is not None:
            if param_device == "nvme":
                self.refuse(("zero_optimization", "offload_param", "device"),
                            "parameter offload to nvme is not supported (cpu is)")
            else:
                offload["params"] = param_device
        sub_group = self.get("zero_optimization", "sub_group_size")
        if sub_group is not None:
            offload["sub_group_mib"] = float(sub_group) * 4 / _MIB
        if offload:
            out["offload"] = offload
        if self.get("zero_optimization", "zero_quantized_gradients"):
            out["comm"] = {"quantize_gradients": True}
        bucket = self.get("zero_optimization", "reduce_bucket_size")
        if bucket is not None:
            out["bucket_mib"] = float(bucket) * 4 / _MIB

    def _precision(self, out: dict[str, Any]) -> None:
        bf16 = self.get("bf16", "enabled")
        fp16 = self.get("fp16", "enabled")
        if bf16 and fp16:
            self.refuse(("fp16", "enabled"), "bf16 and fp16 are both enabled; enable one")
        if bf16:
            out["precision"] = "bf16"
        elif fp16:
            out["precision"] = "fp16"
            scale: dict[str, Any] = {}
            static = self.get("fp16", "loss_scale")
            if static:
                scale["static"] = float(static)
            for key, field in (("initial_scale_power", "initial_scale_power"),
                               ("loss_scale_window", "growth_interval"), ("hysteresis", "hysteresis"),
                               ("min_loss_scale", "min_scale")):
                value = self.get("fp16", key)
                if value is not None:
                    scale[field] = value
            if scale:
                out["loss_scale"] = scale

    def _optimizer(self, out: dict[str, Any]) -> None:
        kind = self.get("optimizer", "type")
        if kind is None:
            return
        names = {"adam": "adamw", "adamw": "adamw", "sgd": "sgd", "onebitadam": "onebit_adam"}
        if str(kind).lower() not in names:
            self.refuse(("optimizer", "type"), f"optimizer {kind!r} is not supported "
                        "(Adam, AdamW, SGD, OneBitAdam are)")
            return
        opt: dict[str, Any] = {"type": names[str(kind).lower()]}
        if str(kind).lower() == "adam" and self.get("optimizer", "params", "adam_w_mode") is False:
            self.refuse(("optimizer", "params", "adam_w_mode"), "Adam with L2 weight decay is not "
                        "supported; dsl's Adam decouples weight decay (AdamW)")
        for key in ("lr", "betas", "eps", "weight_decay", "momentum", "freeze_step"):
            if key == "freeze_step" and opt["type"] != "onebit_adam":
                continue
            value = self.get("optimizer", "params", key)
            if value is not None:
                opt[key] = value
        out["optimizer"] = opt

    def _scheduler(self, out: dict[str, Any]) -> None:
        kind = self.get("scheduler", "type")
        if kind is None:
            return
        shapes = {"WarmupLR": "constant", "WarmupDecayLR": "linear", "WarmupCosineLR": "cosine"}
        if kind not in shapes:
            self.refuse(("scheduler", "type"), f"scheduler {kind!r} is not supported "
                        f"({', '.join(shapes)} are)")
            return
        sched: dict[str, Any] = {"type": shapes[kind]}
        warmup = self.get("scheduler", "params", "warmup_num_steps")
        if warmup is not None:
            sched["warmup_steps"] = warmup
        if kind == "WarmupDecayLR":
            sched["min_lr_ratio"] = 0.0
        ratio = self.get("scheduler", "params", "cos_min_ratio")
        if ratio is not None:
            sched["min_lr_ratio"] = ratio
        peak = self.get("scheduler", "params", "warmup_max_lr")
        if peak is not None:
            out.setdefault("optimizer", {})["lr"] = peak
        start = self.get("scheduler", "params", "warmup_min_lr")
        if start not in (None, 0, 0.0):
            self.refuse(("scheduler", "params", "warmup_min_lr"), "warm-up always starts at 0 in dsl")
        total = self.get("scheduler", "params", "total_num_steps")
        if total is not None:
            self.notes.append(f"scheduler total_num_steps {total}: dsl decays over run.train.steps")
        for key in ("warmup_type",):
            value = self.get("scheduler", "params", key)
            if value not in (None, "linear"):
                self.refuse(("scheduler", "params", key), "only a linear warm-up is supported")
        out["scheduler"] = sched

    def _noops(self) -> None:
        for path, (required, why) in _NOOP.items():
            value = self.get(*path)
            if value is None:
                continue
            if required is not None and value != required:
                self.refuse(path, f"{value!r} is not supported ({why})")
            else:
                self.notes.append(f"{dotted(path)}: accepted, no effect ({why})")

    def _leftovers(self, node: dict[str, Any], path: tuple[str, ...]) -> None:
        """Every leaf that no rule read is refused by name."""
        for key, value in node.items():
            sub = path + (key,)
            if isinstance(value, dict):
                self._leftovers(value, sub)
            elif sub not in self.used:
                self.refuse(sub, "not supported by dsl's engine")
