"""The training-loop keys of a DeepSpeed config: the batch split, gradient clipping, the sequence
parallel size and gradient_allreduce_op.

- train_batch_size / train_micro_batch_size_per_gpu / gradient_accumulation_steps ->
  engine.train_batch / micro_batch / grad_accum, with DeepSpeed's arithmetic and messages
  (engine/ds_batch.py) when the data-parallel size is known, else left to `dsl launch`;
- gradient_clipping -> engine.grad_clip (DeepSpeed 0.19.8's default 1.0 when left out);
- sequence_parallel_size -> engine.sequence_parallel; gradient_allreduce_op "mean" is accepted.

Part of the importer run by engine/dsconfig.py; the state and the helpers are engine/ds_state.py's.
"""

from __future__ import annotations

from dsl.engine.ds_batch import NEITHER, BatchError, derive
from dsl.engine.ds_state import AUTO, Importer

__all__ = ["map_batch", "map_clipping", "map_sequence_parallel", "map_allreduce_op"]

_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
_BATCH_FIELDS = {"train_batch_size": "train_batch", "train_micro_batch_size_per_gpu": "micro_batch",
                 "gradient_accumulation_steps": "grad_accum"}


def map_batch(imp: Importer) -> None:
    keys, fields = _BATCH_KEYS, _BATCH_FIELDS
    given: dict[str, int | None] = {}
    autos: set[str] = set()
    errors = len(imp.errors)
    for key in keys:
        if not imp.has(key):
            given[key] = None
            continue
        value = imp.get(key)
        if value == AUTO:
            imp.auto((key,))
            autos.add(key)
            given[key] = None
            continue
        given[key] = imp.number((key,), value, integer=True, positive=True)  # type: ignore[assignment]
    present = {k for k in keys if imp.has(k)}
    accum = given["gradient_accumulation_steps"]
    if not ({"train_batch_size", "train_micro_batch_size_per_gpu"} & present):
        # DeepSpeed alone refuses such a file; Hugging Face's accelerate fills the micro batch from
        # its arguments when the key is missing, as for "auto": dsl takes it from the spec.
        imp.note((), f"no train_batch_size or train_micro_batch_size_per_gpu: DeepSpeed alone refuses "
                     f"that (\"{NEITHER}\"); as Hugging Face's accelerate fills them from its "
                     "arguments, dsl takes them from the spec (engine.micro_batch and grad_accum, planned "
                     "when left out)")
        if accum is not None:
            imp.set("grad_accum", accum)
        return
    if len(imp.errors) > errors:
        return
    for key, value in given.items():
        if value is not None:
            imp.set(fields[key], value)
    if autos:
        return  # Hugging Face's meaning: the spec's (or the planner's) numbers complete the split
    # The numbers DeepSpeed's rule applies to: the spec's own settings replace the JSON's.
    train, micro, accum = (imp.explicit.get(fields[k], given[k]) for k in keys)
    # DeepSpeed's implied accumulation of 1 when only one batch key is given.
    if accum is None and (train is None) != (micro is None):
        imp.set("grad_accum", 1)
    if imp.ctx.dp is None:
        return
    try:
        batch = derive(train, micro, accum, imp.ctx.dp)
    except BatchError as exc:
        at = exc.key if imp.has(exc.key) else next(k for k in keys if imp.has(k))
        imp.refuse((at,), f"DeepSpeed's rule on {imp.ctx.dp} data-parallel rank(s): {exc}")
        return
    imp.set("train_batch", batch.train)
    imp.set("micro_batch", batch.micro)
    imp.set("grad_accum", batch.accum)


def map_clipping(imp: Importer) -> None:
    if not imp.has("gradient_clipping"):
        imp.set("grad_clip", 1.0)  # DeepSpeed 0.19.8's default (since 0.19.3)
        return
    value = imp.get("gradient_clipping")
    if value == AUTO:
        imp.auto(("gradient_clipping",))
        return
    number = imp.number(("gradient_clipping",), value)
    if number is not None:
        imp.set("grad_clip", number if number > 0 else None)


def map_sequence_parallel(imp: Importer) -> None:
    if "sequence_parallel_size" in imp.data:
        path = ("sequence_parallel_size",)
        number = imp.number(path, imp.get(*path), integer=True, positive=True)
        if number is not None:
            imp.set("sequence_parallel", number)


def map_allreduce_op(imp: Importer) -> None:
    """gradient_allreduce_op "mean" is what dsl does; any other value is left to the key table."""
    if "gradient_allreduce_op" in imp.data:
        value = imp.data["gradient_allreduce_op"]
        if isinstance(value, str) and value.lower() == "mean":
            imp.get("gradient_allreduce_op")
