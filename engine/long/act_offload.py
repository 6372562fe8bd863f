"""Activation-checkpoint offload: each checkpointed layer's saved input lives in host memory.

With activation checkpointing a decoder layer keeps only its inputs for backward (the residual
stream x [B, T, h] and the RoPE tables); `ActivationOffload.hooks()` is a
`torch.autograd.graph.saved_tensors_hooks` pair entered around each `checkpoint(layer, ...)`
call, where checkpoint saves those inputs, so they are packed to host memory and unpacked when
backward recomputes the layer. Tensors inside the checkpointed region are checkpoint's own (its
hooks are innermost) and are recomputed, never offloaded.

Copies (no collective):
- CUDA: pack allocates a pinned host buffer and copies device -> host with `non_blocking=True`
  on a side stream that first waits for the compute stream; `record_stream` keeps the device
  memory from being reused until that copy ran, so the forward of the next layer overlaps the
  copy. Unpack copies host -> device on the side stream and makes the compute stream wait; it
  also starts the copy of the previously packed input (the next one backward will need), so the
  next layer's input arrives while this layer is recomputed (prefetch one ahead).
- CPU (the device is host memory): pack makes a separate host copy (the same code path, no
  saving), unpack returns it.
A tensor packed twice in one forward (the RoPE tables every layer shares) is copied once.

`offloaded_bytes` is the host bytes the last forward offloaded (not in
Engine.state_summary()'s activations_bytes, which counts what stays on the device). The saved-activation bytes the engine measures on the device
drop by exactly that much (engine/memory.py `activations`, activation_offload).
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch.autograd.graph import saved_tensors_hooks

__all__ = ["ActivationOffload"]


class _Packed:
    __slots__ = ("host", "device", "event", "on_device", "prev")

    def __init__(self, host: torch.Tensor, device: torch.device, event: Any, prev: "_Packed | None") -> None:
        self.host = host
        self.device = device
        self.event = event
        self.on_device: torch.Tensor | None = None
        self.prev = prev
        """The input packed before this one: backward needs it right after this one."""


class ActivationOffload:
    """Offload of checkpointed inputs for one model (see the module docstring)."""

    def __init__(self) -> None:
        self._stream: Any = None
        self._seen: dict[int, tuple[weakref.ref, _Packed]] = {}
        self._last: _Packed | None = None
        self.offloaded_bytes = 0

    def begin_forward(self) -> None:
        """Forget the previous forward's bookkeeping (its packed tensors live on in its graph)."""
        self._seen = {}
        self._last = None
        self.offloaded_bytes = 0

    def _side_stream(self, device: torch.device) -> Any:
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        return self._stream

    def _pack(self, t: torch.Tensor) -> Any:
        key = id(t)
        hit = self._seen.get(key)
        if hit is not None and hit[0]() is t:
            return hit[1]
        if t.device.type == "cuda":
            stream = self._side_stream(t.device)
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            stream.wait_stream(torch.cuda.current_stream(t.device))
            with torch.cuda.stream(stream):
                host.copy_(t, non_blocking=True)
            t.record_stream(stream)
            event = stream.record_event()
        else:
            host = torch.empty(t.shape, dtype=t.dtype).copy_(t)
            event = None
        packed = _Packed(host, t.device, event, self._last)
        self._last = packed
        self._seen[key] = (weakref.ref(t), packed)
        self.offloaded_bytes += host.untyped_storage().nbytes()
        return packed

    def _fetch(self, packed: _Packed) -> None:
        if packed.on_device is not None or packed.device.type != "cuda":
            return
        stream = self._side_stream(packed.device)
        with torch.cuda.stream(stream):
            stream.wait_event(packed.event)
            packed.on_device = packed.host.to(packed.device, non_blocking=True)
        packed.event = stream.record_event()

    def _unpack(self, packed: _Packed) -> torch.Tensor:
        if packed.device.type != "cuda":
            return packed.host
        self._fetch(packed)
        current = torch.cuda.current_stream(packed.device)
        current.wait_event(packed.event)
        out, packed.on_device = packed.on_device, None  # device memory lives as long as backward uses it
        out.record_stream(current)
        if packed.prev is not None:
            self._fetch(packed.prev)  # prefetch the input the next recomputed layer needs
        return out

    @contextmanager
    def hooks(self) -> Iterator[None]:
        """Pack what autograd saves inside this context to host memory."""
        with saved_tensors_hooks(self._pack, self._unpack):
            yield
