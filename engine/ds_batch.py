"""DeepSpeed's batch arithmetic: train_batch_size = micro x accumulation x data-parallel size.

`derive(train, micro, accum, dp)` is DeepSpeed 0.19.8's `_set_batch_related_parameters` and
`_batch_assertion` (deepspeed/runtime/config.py): given any two of the three the third is
derived with its floor divisions, given only train_batch_size accumulation is 1 and micro is
train // dp, given only micro accumulation is 1, and a result that does not multiply back to
train_batch_size fails with DeepSpeed's own message. `BatchError.key` names the JSON key the
error is located at.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BatchError", "derive", "NEITHER"]

NEITHER = "Either train_batch_size or train_micro_batch_size_per_gpu needs to be provided"
"""DeepSpeed's message when neither is given."""


class BatchError(ValueError):
    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class Batch:
    train: int
    micro: int
    accum: int
    derived: tuple[str, ...]
    """The DeepSpeed keys computed rather than given."""


def derive(train: int | None, micro: int | None, accum: int | None, dp: int) -> Batch:
    """The three batch numbers as DeepSpeed sets them on `dp` data-parallel ranks."""
    derived: list[str] = []
    if train is not None and micro is not None and accum is not None:
        pass
    elif train is not None and micro is not None:
        accum = train // micro // dp
        derived.append("gradient_accumulation_steps")
    elif train is not None and accum is not None:
        micro = train // dp // accum
        derived.append("train_micro_batch_size_per_gpu")
    elif micro is not None and accum is not None:
        train = micro * accum * dp
        derived.append("train_batch_size")
    elif train is not None:
        accum, micro = 1, train // dp
        derived += ["gradient_accumulation_steps", "train_micro_batch_size_per_gpu"]
    elif micro is not None:
        train, accum = micro * dp, 1
        derived += ["train_batch_size", "gradient_accumulation_steps"]
    else:
        raise BatchError("train_batch_size", NEITHER)
    assert train is not None and micro is not None and accum is not None
    for key, value, name in (("train_batch_size", train, "Train batch size"),
                             ("train_micro_batch_size_per_gpu", micro, "Micro batch size per gpu"),
                             ("gradient_accumulation_steps", accum, "Gradient accumulation steps")):
        if value <= 0:
            at = key if key not in derived else "train_batch_size"
            raise BatchError(at, f"{name}: {value} has to be greater than 0"
                             + (f" (derived: {_why(train, micro, accum, dp)})" if key in derived else ""))
    if train != micro * accum * dp:
        raise BatchError("train_batch_size",
                         "Check batch related parameters. train_batch_size is not equal to micro_batch_per_gpu * "
                         f"gradient_acc_step * world_size {train} != {micro} * {accum} * {dp}")
    return Batch(train, micro, accum, tuple(derived))


def _why(train: int, micro: int, accum: int, dp: int) -> str:
    return f"train_batch_size {train}, micro {micro}, accumulation {accum}, data-parallel size {dp}"
