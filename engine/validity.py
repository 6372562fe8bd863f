"""Which engine configurations are valid: the one home of the rules that combine settings (torch-free).

`problems(engine, ...)` returns every rule the configuration breaks, as `Problem(path, message)`:
`path` is the field inside `engine:` to point at, `message` what is wrong, with the numbers and
the fix. Each caller locates the same text its own way, so the words after the location are
identical everywhere:

- `dsl validate` and `dsl launch` (launcher/spec.py `check_engine`, called by `load_spec` and,
  with the hosts it resolved, by launcher/launch.py `prepare`):
  `file:line:col engine.<path>: <message>`, exit 2;
- `dsl.engine.initialize()` (engine/core.py): `UserError("engine.<path>: <message>")`;
- the trainer on every rank (engine/train.py `load_run_spec`): the located line, as validate.

What a caller knows decides which rules can run; a rule whose inputs are unknown passes:
- the configuration alone: every rule below not listed under the next two;
- `model` (the spec's run.train.model, or the bundled Llama's config in initialize): the
  sequence-parallel degree against heads, kv heads and seq_len (engine/long/degrees.py);
- `world_size` / `ranks_per_host`: sequence_parallel divides the ranks, and it and the ranks of one
  host divide one another (an SP group is part of one host or whole hosts), and
  train_batch = micro_batch x grad_accum x dp. `dsl validate` knows them when the spec fixes
  them (launcher/spec.py `spec_world`: procs_per_node a number and no hostfile), `dsl launch`
  from the hosts it resolved, initialize from the process group (LOCAL_WORLD_SIZE when set), a
  rank from WORLD_SIZE / LOCAL_WORLD_SIZE.
`planned` names the fields the planner still chooses (micro_batch, grad_accum when the spec leaves
them out): the batch rule then asks only for a split to exist. An `auto` value passes every rule:
the planner only picks candidates that pass (launcher/planner.py marks the others with
`unsupported_reason`), and the engine runs an unresolved `auto` as stage 0 / no offload / sp 1.

Decisions:
- a model given by its counts (run.train.model params) is described by `dsl plan` but refused
  for training (`model_problems`, applied by `dsl launch` and the ranks): there are no weights to
  build. A Hugging Face model (hf, hf_config) trains (engine/hf_model.py); the ranks also refuse
  it when transformers/safetensors (the extra dsl[hf]) are missing, with the install hint.
- `data_reason`: run.train.data with kind: text needs data.tokenizer unless the model is a
  Hugging Face folder (`hf`: the trainer hands that folder to the data as the default
  tokenizer); checked by TrainConfig itself, so every caller that reads run.train locates it.
- optimizer offload needs ZeRO stage 1-3, DeepSpeed's rule (its ZeRO config documents
  offload_optimizer as "valid for ZeRO stage 1, 2, 3"): offload moves the partitioned optimizer
  states and their update to the host, and stage 0 partitions none.
- offload.ratio below 1 needs offload.optimizer: cpu (partial offload splits the update between
  device and host memory); with none it would change nothing, which is an error here, not a
  silent no-op. A `ratio: 1.0` next to none is the default value and passes: the resolved spec
  the ranks read writes every default, so a written 1.0 cannot be told from an unwritten one.
- compile: true with a layer that runs its own autograd (sequence_parallel > 1, tiled_mlp,
  activation_offload) is refused from the configuration; the refusals that need the model or
  the host (no C++ compiler, `auto` on a model other than the bundled Llama) stay in
  engine/compile.py, as do tiled_loss / tiled_mlp / sequence parallelism on a model without the
  bundled layers (engine/long/setup.py) and whether a plan fits the hosts' memory
  (launcher/planner.py).
- pin_memory and tf32 set on a CPU device are notes, not errors (engine/core.py device_notes):
  the same spec is valid on a GPU host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable

from dsl.engine.errors import UserError
from dsl.engine.located import dotted
from dsl.engine.onebit_config import onebit_reason, quantize_reason

if TYPE_CHECKING:
    from pydantic import ValidationError

    from dsl.engine.config import EngineConfig
    from dsl.engine.located import Locations
    from pathlib import Path

    from dsl.engine.train_config import DataConfig, ModelConfig

__all__ = ["Problem", "Refusal", "hf_missing", "problems", "batch_reason", "compile_conflicts", "field_problems",
           "model_problems", "data_reason", "refuse", "refuse_located"]


@dataclass(frozen=True)
class Problem:
    """One broken rule: the field inside `engine:` to point at, and what is wrong."""

    path: tuple[str | int, ...]
    message: str
    root: tuple[str, ...] = ("engine",)
    """The section `path` is inside: `engine`, or `run.train.model` for `model_problems`."""

    def __str__(self) -> str:
        """`engine.<path>: <message>`: the text every caller prints after its location."""
        return f"{dotted((*self.root, *self.path))}: {self.message}"


def problems(engine: "EngineConfig", *, model: "ModelConfig | None" = None, world_size: int | None = None,
             ranks_per_host: int | None = None, planned: Iterable[str] = ()) -> list[Problem]:
    """Every rule `engine` breaks (empty: valid), in a fixed order (see the module docstring)."""
    found: list[Problem] = []

    def add(path: str, message: str | None) -> None:
        if message:
            found.append(Problem(tuple(path.split(".")), message))

    stage, offload = engine.zero_stage, engine.offload
    add("low_precision_states", _low_precision(engine))
    add("precision_layout", _layout(engine))
    if offload.optimizer in ("cpu", "nvme") and stage == 0:
        add("offload.optimizer",
            f"{offload.optimizer} needs zero_stage 1, 2 or 3 (got zero_stage: 0): offload moves the partitioned "
            f"optimizer states and their update to the host, and stage 0 partitions none (DeepSpeed: "
            f"offload_optimizer is valid for ZeRO stage 1, 2, 3); set zero_stage: 1, 2, 3 or auto, or "
            f"offload.optimizer: none")
    if offload.optimizer == "nvme" and not offload.nvme_path:
        add("offload.optimizer", "nvme needs offload.nvme_path (a folder on a fast local disk)")
    if offload.params != "none" and (stage not in (3, "auto") or offload.optimizer not in ("cpu", "nvme", "auto")):
        add("offload.params",
            f"{offload.params} (ZeRO-Infinity parameter offload) needs zero_stage: 3 and offload.optimizer: cpu "
            f"or nvme (got zero_stage: {stage}, offload.optimizer: {offload.optimizer}): the offloaded "
            f"optimizer updates the offloaded partitions off the device")
    if offload.params == "nvme" and not offload.nvme_path:
        add("offload.params", "nvme needs offload.nvme_path (a folder on a fast local disk)")
    s3 = engine.stage3
    s3_set = [f for f, v in (("gather", s3.gather != "layer"), ("max_live_params", s3.max_live_params is not None),
                             ("prefetch_params", s3.prefetch_params is not None)) if v]
    if s3_set and stage not in (3, "auto"):
        add(f"stage3.{s3_set[0]}",
            f"{getattr(s3, s3_set[0])} sets how ZeRO stage 3 gathers parameters, but zero_stage is {stage} "
            f"(parameters are not partitioned); set zero_stage: 3, or remove engine.stage3")
    if offload.ratio < 1.0 and offload.optimizer not in ("cpu", "auto"):
        why = ("which offloads nothing, so ratio would have no effect" if offload.optimizer == "none"
               else "partial offload splits the update between the device and host memory, not NVMe")
        add("offload.ratio",
            f"{offload.ratio:g} puts that fraction of the optimizer state and update on the host; it needs "
            f"offload.optimizer: cpu (got offload.optimizer: {offload.optimizer}, {why}); set "
            f"offload.optimizer: cpu, or remove ratio")
    if offload.params != "none" and offload.ratio < 1.0:
        add("offload.ratio",
            f"{offload.ratio:g} keeps part of the update on the device, but offload.params: {offload.params} "
            f"moves every parameter partition to the host, where the whole update then has to run; "
            f"remove ratio (1.0) or offload.params")
    if engine.activation_offload and engine.activation_checkpointing is False:
        add("activation_offload", "true moves activation checkpoints to host memory; it needs "
                                  "activation_checkpointing: true (or auto)")
    if engine.checkpoint_module is not None and engine.activation_checkpointing is False:
        add("checkpoint_module", f"{engine.checkpoint_module} names the blocks activation checkpointing "
                                 f"recomputes; it needs activation_checkpointing: true (or auto), or remove it")
    if engine.optimizer.type == "onebit_adam":
        add("optimizer", onebit_reason(stage, engine.precision, engine.low_precision_states))
        add("offload.optimizer", onebit_reason(None, offload_optimizer=offload.optimizer))
    if engine.comm.quantize_gradients:
        add("comm", quantize_reason(stage))
        if engine.comm.reduce_dtype != "fp32":
            add("comm.reduce_dtype", f"{engine.comm.reduce_dtype} cannot apply with quantize_gradients, which "
                                     "sends int8 blocks; remove one of them")
    conflicts = compile_conflicts(engine)
    if engine.compile is True and conflicts:
        add("compile", f"true cannot be used with {'; '.join(conflicts)}: those layers run their own "
                       f"autograd.Function, which the engine does not compile (engine/compile.py); set "
                       f"compile: auto (which then stays eager) or false")
    if engine.deepspeed_config is not None:
        add("deepspeed_config", "is read into engine settings before these rules run (launcher/spec.py for a "
                                "spec, dsl.engine.initialize() for a mapping or an EngineConfig naming it; "
                                "engine/dsconfig.py); an unresolved one reached the rules, which is a bug")
    sp = engine.sequence_parallel
    if sp != "auto":
        add("sequence_parallel", _degree(sp, model, world_size, ranks_per_host))
    if world_size is not None and sp != "auto" and sp >= 1 and world_size % sp == 0:
        add("train_batch", batch_reason(engine, world_size // sp, planned))
    return found


TRAIN_COUNTS_UNSUPPORTED = "a model known only by its counts has no weights to train; dsl plan describes it"


def model_problems(model: "ModelConfig", *, check_installed: bool = False,
                   base: "Path | None" = None) -> list[Problem]:
    """Rules on `run.train.model` for training it, not for describing it. A model given by its
    counts (`params`) is refused: there is nothing to build (the trainer would otherwise train the
    default Llama in its place). A Hugging Face model (`hf`, `hf_config`) trains through
    engine/hf_model.py; with `check_installed` (the ranks, engine/train.py `load_run_spec`) it
    is refused when the extra dsl[hf] is not installed. `dsl launch` (launcher/planspec.py
    `resolve` with refuse) applies them; `dsl plan` does not: it describes every form
    (engine/train_config.py ModelConfig)."""
    if model.form == "llama":
        return []
    field = model.form_field
    if model.form == "hf":
        kind = _hf_kind(model, base)
        if kind is not None and kind != "decoder":
            return [Problem((field,), f"a Hugging Face {kind} is described by `dsl plan`, not trained: the trainer "
                                      f"builds causal language models (engine/hf_model.py)",
                            root=("run", "train", "model"))]
        if not check_installed:
            return []
        missing = hf_missing()
        if not missing:
            return []
        return [Problem((field,), f"training a Hugging Face model needs {' and '.join(missing)} (the optional "
                                  f"extra dsl[hf]): pip install 'dsl[hf]'", root=("run", "train", "model"))]
    return [Problem((field,), f"{TRAIN_COUNTS_UNSUPPORTED}: `dsl plan SPEC` shows the memory and the plan for "
                              f"this model; to train, give its config.json (hf: DIR) or describe the bundled "
                              f"Llama (preset, or its dimensions: hidden_size, num_hidden_layers, ...)",
                    root=("run", "train", "model"))]


def _hf_kind(model: "ModelConfig", base: "Path | None") -> str | None:
    """decoder / encoder / encoder-decoder of a Hugging Face model's config.json (relative paths
    from `base`, the spec's folder), or None when it cannot be read here (the ranks read it and
    locate what is wrong)."""
    from pathlib import Path

    from dsl.engine.modeldesc.registry import describe_file

    written = Path(str(model.hf if model.hf is not None else model.hf_config)).expanduser()
    path = written if written.is_absolute() or base is None else base / written
    if model.hf is not None:
        path = path / "config.json"
    try:
        return describe_file(path, "run.train.model").kind
    except (UserError, OSError):
        return None


def data_reason(data: "DataConfig", model: "ModelConfig") -> str | None:
    """Why `run.train.data` cannot feed `run.train.model` (checked by engine/train_config.py
    TrainConfig, so `dsl validate`, `dsl launch` and the ranks all locate it), or None. Text data
    is tokenized with the tokenizer data.tokenizer names, by default the Hugging Face model's
    folder (`model.hf`, which the trainer hands to the data: engine/train.py); any other model
    needs data.tokenizer."""
    if data.kind == "text" and data.tokenizer is None and model.hf is None:
        return ("data.kind: text tokenizes the documents with the model's tokenizer: set data.tokenizer to the "
                "folder holding one whose ids fit run.train.model.vocab_size, or use kind: tokens")
    return None


def hf_missing() -> list[str]:
    """The packages of the extra dsl[hf] (transformers, safetensors) this environment lacks,
    found without importing them."""
    import importlib.util

    return [name for name in ("transformers", "safetensors") if importlib.util.find_spec(name) is None]


def compile_conflicts(engine: "EngineConfig") -> list[str]:
    """The settings of `engine` whose layers torch.compile cannot take (each with why)."""
    out = []
    sp = engine.sequence_parallel
    if sp != "auto" and sp > 1:
        out.append(f"sequence_parallel {sp} (Ulysses all-to-all inside attention)")
    if engine.tiled_mlp.enabled:
        out.append("tiled_mlp (per-chunk recomputation inside the MLP)")
    if engine.activation_offload:
        out.append("activation_offload (host copies of each layer's input)")
    return out


def _low_precision(engine: "EngineConfig") -> str | None:
    if engine.low_precision_states and engine.precision != "bf16":
        return (f"true keeps bf16 parameters and optimizer states with no fp32 master copy; it needs "
                f"precision: bf16 (got precision: {engine.precision})")
    return None


def _layout(engine: "EngineConfig") -> str | None:
    if engine.precision_layout is None or not (engine.precision == "fp32" or engine.low_precision_states):
        return None
    setting, held = (("precision: fp32", "fp32 parameters") if engine.precision == "fp32"
                     else ("low_precision_states", "bf16 parameters and states"))
    return (f"{engine.precision_layout} chooses where bf16/fp16 training keeps its fp32 master weights; "
            f"with {setting} there are none ({held}): remove precision_layout")


def _degree(sp: int, model: "ModelConfig | None", world_size: int | None, ranks_per_host: int | None) -> str | None:
    from dsl.engine.long.degrees import placement_reason, sp_reason

    if sp < 1:
        return f"sequence_parallel must be >= 1, got {sp}"
    if model is not None and model.form == "llama":  # an hf / counts model's heads are not these fields
        reason = sp_reason(sp, heads=model.num_attention_heads, kv_heads=model.kv_heads, seq_len=model.seq_len)
        if reason:
            return reason
    return placement_reason(sp, world_size=world_size, ranks_per_host=ranks_per_host)


def batch_reason(engine: "EngineConfig", dp: int, planned: Iterable[str] = ()) -> str | None:
    """Why train_batch disagrees with micro_batch x grad_accum x dp (`planned` fields only need a
    whole-number value to exist), or None."""
    planned = frozenset(planned)
    want = engine.train_batch
    if want is None:
        return None
    micro, accum = engine.micro_batch, engine.grad_accum
    if "micro_batch" in planned and "grad_accum" in planned:
        if want % dp:
            return (f"train_batch ({want}) must be a multiple of the data-parallel size ({dp}) so that every "
                    f"data-parallel rank gets the same number of sequences")
        return None
    if "grad_accum" in planned:
        if want % (micro * dp):
            return (f"train_batch ({want}) must be a multiple of micro_batch ({micro}) x data-parallel size "
                    f"({dp}) = {micro * dp}, so that grad_accum is a whole number")
        return None
    if "micro_batch" in planned:
        if want % (accum * dp):
            return (f"train_batch ({want}) must be a multiple of grad_accum ({accum}) x data-parallel size "
                    f"({dp}) = {accum * dp}, so that micro_batch is a whole number")
        return None
    product = micro * accum * dp
    if product != want:
        return (f"train_batch ({want}) != micro_batch ({micro}) x grad_accum ({accum}) x "
                f"data-parallel size ({dp}) = {product}")
    return None


def field_problems(exc: "ValidationError") -> list[Problem]:
    """pydantic's errors of an `EngineConfig` mapping as Problems, in the words `dsl validate`
    prints for the same fields (engine/located.py: choices, did-you-mean)."""
    from dsl.engine.config import EngineConfig
    from dsl.engine.located import field_errors

    return [Problem(path, message) for path, message, _ in field_errors(exc, EngineConfig)]


class Refusal(UserError):
    """A UserError made of Problems: a caller that holds the spec's locations (engine/train.py)
    can print them located (`refuse_located`)."""

    def __init__(self, found: list[Problem]) -> None:
        super().__init__("\n".join(str(p) for p in found))
        self.problems = list(found)


def refuse(found: list[Problem]) -> None:
    """Raise one Refusal of `engine.<path>: <message>` lines (no file: the caller has none)."""
    if found:
        raise Refusal(found)


def refuse_located(found: list[Problem], locations: "Locations", prefix: tuple[Any, ...] | None = None) -> None:
    """Raise one UserError of `file:line:col engine.<path>: <message>` lines, in file order; a
    field the file does not write points at its nearest written parent. `prefix` (default: each
    problem's root) is where the problems' paths start in the file."""
    if not found:
        return
    lines = []
    for problem in found:
        mark = locations.of(tuple(problem.root if prefix is None else prefix) + problem.path)
        lines.append(((mark.line, mark.col), f"{locations.source}:{mark.line}:{mark.col} {problem}"))
    raise UserError("\n".join(text for _, text in sorted(lines, key=lambda item: item[0])))
