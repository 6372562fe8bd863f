"""Every crossing between device memory and host memory, in one place.

The engine reads a device value in Python, or copies between the device and CPU memory, only
through these functions:

- `host_floats(t)`: the values of a small device tensor as Python floats (one synchronisation
  on CUDA). The engine reads device values nowhere else, so the number of host syncs per step
  is visible here.
- `host_empty(numel, dtype, pinned)`: a host buffer; `pinned` page-locks it (CUDA only:
  `pin_memory()` raises without an accelerator). Pinned buffers are what let a copy from or to
  the GPU run asynchronously; a pageable buffer makes every copy a blocking one.
- `to_host(dst, src)` / `to_device(dst, src)`: start a copy and return a `Pending` whose
  `wait()` returns once the host may read `dst` (to_host) or overwrite `src` (to_device). On
  CUDA with a pinned host side the copy is `non_blocking` on the current stream and `wait()`
  synchronises on an event recorded after it; elsewhere the copy is done when the call returns
  and `wait()` is free. Kernels queued on the stream after a copy see its result without any
  wait (stream order); only the CPU must wait.
- `use_pinned(device)`: whether buffers meant for `device` should be pinned (a CUDA device).

Why one module: a device tensor that reaches CPU code (or a CPU tensor that reaches device
math) fails only on a GPU, which this project's CI does not have. tests/unit/test_meta_device.py
runs the engine's device math on PyTorch's `meta` device, which raises on any tensor mixed in
from the CPU, by replacing these functions (a meta tensor has no values to read or copy).
"""

from __future__ import annotations

from typing import Protocol

import torch

__all__ = ["DONE", "Pending", "host_floats", "host_empty", "to_host", "to_device", "use_pinned", "wait_device"]


class Pending(Protocol):
    def wait(self) -> None: ...


class _Done:
    """A copy that finished before the call returned."""

    def wait(self) -> None:
        return None


class _Event:
    """A CUDA copy in flight: an event recorded after it on the current stream."""

    def __init__(self, device: torch.device) -> None:
        self._event = torch.cuda.Event()
        self._event.record(torch.cuda.current_stream(device))

    def wait(self) -> None:
        self._event.synchronize()


_DONE = _Done()
DONE: Pending = _DONE
"""A Pending for work done synchronously."""


def use_pinned(device: torch.device) -> bool:
    """Host buffers exchanged with `device` are page-locked (CUDA devices only)."""
    return device.type == "cuda"


def host_empty(numel: int, dtype: torch.dtype, *, pinned: bool) -> torch.Tensor:
    """An uninitialised 1-D host buffer of `numel` elements, page-locked when `pinned`."""
    return torch.empty(numel, dtype=dtype, pin_memory=pinned)


def to_host(dst: torch.Tensor, src: torch.Tensor) -> Pending:
    """Copy device tensor `src` into host tensor `dst` (same numel); wait() before reading dst."""
    return _copy(dst, src, gpu=src, host=dst)


def to_device(dst: torch.Tensor, src: torch.Tensor) -> Pending:
    """Copy host tensor `src` into device tensor `dst`; wait() before overwriting src."""
    return _copy(dst, src, gpu=dst, host=src)


def _copy(dst: torch.Tensor, src: torch.Tensor, *, gpu: torch.Tensor, host: torch.Tensor) -> Pending:
    """Asynchronous (an event to wait on) between a CUDA tensor and a pinned one; else done now."""
    if gpu.device.type == "cuda" and host.is_pinned():
        dst.copy_(src, non_blocking=True)
        return _Event(gpu.device)
    dst.copy_(src)
    return _DONE


def wait_device(device: torch.device) -> None:
    """Wait until the work queued on `device`'s current stream has finished (CUDA; else free)."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def host_floats(t: torch.Tensor) -> list[float]:
    """The values of `t` (a few elements) as Python floats; synchronises with the device."""
    return [float(v) for v in t.detach().reshape(-1).tolist()]
