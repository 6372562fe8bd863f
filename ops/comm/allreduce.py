"""Compressed all-reduce (mean) with worker and server error feedback, as in 1-bit Adam.

`CompressedAllReduce(block=B)(x)` replaces x (fp32 [N], the same N on every rank) by an
approximation of the mean of x over ranks. World size w; N is padded with zeros to Np, a
multiple of w x B; rank j owns chunk j (c = Np / w elements, c / B blocks):

1. worker: e_w <- x + e_w (worker error [Np], this rank's), 1-bit compression in blocks of B
   (signs.py: sign bits + one fp32 scale = mean |block| per block), e_w <- residual;
2. `all_to_all_single` of uint8 [w, c/8 + 4c/B]: rank j receives chunk j from every rank;
3. server: e_s <- e_s + mean over ranks of the decompressed chunks (server error [c]),
   compress it the same way, e_s <- residual;
4. `all_gather_single` of uint8 [c/8 + 4c/B] -> [w, c/8 + 4c/B]: every compressed chunk to all;
5. x <- the decompressed chunks (first N elements): identical on every rank.
Large tensors run this as a pipeline of up to PIPELINE_PIECES pieces (a slice of every chunk):
piece k's all_to_all and all_gather run asynchronously while piece k+1 is compressed or reduced.

Summed over calls, the outputs equal the summed means minus (mean_r e_w,r + e_s), per element of
the chunk (telescoping; tested), so the running mean converges to the true mean at O(1/T) for as
long as the error buffers stay bounded. Error buffers live in this object, one pair per N
(1-bit Adam compresses one flat momentum buffer); they are not checkpointed (DeepSpeed does not
save them either): after a restart they start from zero.

Bytes on the wire, counted per call in `last_wire_bytes` (summed in `wire_bytes`): the payload
this rank *sends* to other ranks (no TCP/IP or gloo headers):
    all_to_all: (w - 1) rows of (c/8 + 4c/B);  all_gather: (w - 1) x (c/8 + 4c/B)
    (a ring or direct all_gather forwards this rank's row once per other rank);
    total: 2 (w - 1) (c/8 + 4c/B).
The fp32 all-reduce it replaces, counted the same way (`fp32_allreduce_bytes`): a ring (or
reduce-scatter + all-gather) all-reduce sends 2 (w - 1) / w x 4N bytes per rank. Ratio:
(Np / N) (1/32 + 1/B): 1/28.4 for the default B = 256 and large N (<= 1/28 while the padding
is under 1.6%, i.e. N >= ~64 w B: 32,768 elements at w = 2).
At w = 1 steps 2 and 4 are skipped (0 bytes) and x still goes through both compressions.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as tdist

from dsl.ops.comm.native import kernels
from dsl.ops.comm.signs import compress_, decompress_into

__all__ = ["CompressedAllReduce", "fp32_allreduce_bytes", "padded_numel", "DEFAULT_BLOCK"]

DEFAULT_BLOCK = 256
"""Elements per compression block (one fp32 scale each): 1/32 + 1/256 = 1/28.4 of the fp32 bytes.
Smaller blocks track the momentum's magnitudes more closely: 1-bit Adam on the tiny model (2
ranks, 100 steps, freeze_step 20) ends +11.5% above AdamW's loss with 1024, +6.6% with 512,
+1.2% with 256 (150 steps, freeze 30: +6.6%, +3.9%, +1.8%)."""


PIPELINE_PIECES = 4
"""Pieces a call is cut into, so that one piece's all_to_all / all_gather overlaps the next
piece's compression (the wire bytes are the same; only the number of collectives grows)."""
MIN_PIECE_NUMEL = 1 << 20
"""Chunks smaller than this many elements per piece are not cut (latency would dominate)."""


def padded_numel(numel: int, world_size: int, block: int = DEFAULT_BLOCK) -> int:
    """numel rounded up to a multiple of world_size x block (whole blocks in every chunk)."""
    unit = world_size * block
    return max(unit, -(-numel // unit) * unit)


def fp32_allreduce_bytes(numel: int, world_size: int) -> int:
    """Bytes one rank sends in a ring all-reduce of `numel` fp32 values: 2 (w-1)/w x 4 numel."""
    return 2 * (world_size - 1) * 4 * numel // world_size


class _Piece:
    """Elements [lo, hi) of every chunk: the unit of the pipeline (its own wire buffers)."""

    def __init__(self, lo: int, hi: int, world: int, block: int, device: torch.device) -> None:
        self.lo, self.hi = lo, hi
        self.bits = (hi - lo) // 8
        self.row = self.bits + 4 * ((hi - lo) // block)
        self.send = torch.empty(world, self.row, dtype=torch.uint8, device=device)
        self.recv = torch.empty(world, self.row, dtype=torch.uint8, device=device)
        self.mine = torch.empty(self.row, dtype=torch.uint8, device=device)
        self.gathered = torch.empty(world, self.row, dtype=torch.uint8, device=device)
        self.work: Any = None

    def tensors(self) -> list[torch.Tensor]:
        return [self.send, self.recv, self.mine, self.gathered]


class _Buffers:
    """Persistent per-size buffers (fresh 100M-element buffers would page-fault every call)."""

    def __init__(self, numel: int, world: int, block: int, device: torch.device) -> None:
        self.padded = padded_numel(numel, world, block)
        self.chunk = self.padded // world
        blocks = self.chunk // block
        pieces = max(1, min(PIPELINE_PIECES, blocks * block // MIN_PIECE_NUMEL))
        edges = [round(k * blocks / pieces) * block for k in range(pieces + 1)]
        self.pieces = [_Piece(lo, hi, world, block, device) for lo, hi in zip(edges, edges[1:]) if hi > lo]
        self.row = sum(p.row for p in self.pieces)
        self.worker_error = torch.zeros(self.padded, dtype=torch.float32, device=device)
        self.server_error = torch.zeros(self.chunk, dtype=torch.float32, device=device)
        self.padded_input = (torch.zeros(self.padded, dtype=torch.float32, device=device)
                             if self.padded > numel else None)

    def nbytes(self) -> int:
        tensors = [self.worker_error, self.server_error, *(t for p in self.pieces for t in p.tensors())]
        if self.padded_input is not None:
            tensors.append(self.padded_input)
        return sum(t.untyped_storage().nbytes() for t in tensors)


def _scales(row: torch.Tensor, bits: int) -> torch.Tensor:
    return row[bits:].view(torch.float32)


class CompressedAllReduce:
    """1-bit all-reduce (mean) with error feedback; see the module docstring for the plan."""

    def __init__(self, group: tdist.ProcessGroup | None = None, *, block: int = DEFAULT_BLOCK,
                 native: bool | None = None) -> None:
        if block <= 0 or block % 8:
            raise ValueError(f"block must be a positive multiple of 8, got {block}")
        self.group = group
        self.block = block
        self.native = native
        """None: the C kernels when they build (native.py), False: the torch reference."""
        distributed = tdist.is_available() and tdist.is_initialized()
        self.world_size = tdist.get_world_size(group) if distributed else 1
        self.rank = tdist.get_rank(group) if distributed else 0
        self._buffers: dict[int, _Buffers] = {}
        self.calls = 0
        """Calls so far."""
        self.wire_bytes = 0
        """Bytes this rank sent to other ranks over all calls (payload; see the module docstring)."""
        self.last_wire_bytes = 0
        """Bytes this rank sent in the last call."""
        self.last_fp32_bytes = 0
        """Bytes an fp32 ring all-reduce of the last call's tensor would have sent."""

    def reset(self) -> None:
        """Forget the error buffers (e.g. after loading a checkpoint)."""
        self._buffers.clear()

    def buffer_bytes(self) -> int:
        """Bytes of the persistent buffers (error feedback and staging)."""
        return sum(b.nbytes() for b in self._buffers.values())

    def errors(self, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(worker error [Np], server error [c]) for tensors of `numel` (zeros before any call)."""
        b = self._buffers.get(numel)
        if b is None:
            return torch.zeros(0), torch.zeros(0)
        return b.worker_error, b.server_error

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Average x (fp32 [N], contiguous) over ranks in place, approximately; returns x."""
        if x.dtype != torch.float32 or not x.is_contiguous() or x.dim() != 1:
            raise ValueError(f"CompressedAllReduce needs a contiguous 1-D fp32 tensor, got {x.dtype} {tuple(x.shape)}")
        n, w, block = x.numel(), self.world_size, self.block
        b = self._buffers.get(n)
        if b is None:
            b = self._buffers[n] = _Buffers(n, w, block, x.device)
        c = b.chunk
        xin = x
        if b.padded_input is not None:  # its tail stays zero
            xin = b.padded_input
            xin[:n].copy_(x)
        b.worker_error[n:].zero_()  # the padding carries no error from call to call
        lib = kernels() if self.native is not False and x.device.type == "cpu" else None

        # 1-2. worker: compress x + e_w piece by piece (row j of a piece's send buffer holds
        # chunk j's part and goes to rank j); each piece's all_to_all runs while the next
        # piece is compressed.
        for p in b.pieces:
            for j in range(w):
                lo, hi = j * c + p.lo, j * c + p.hi
                packed, scales = compress_(xin[lo:hi], b.worker_error[lo:hi], block, native=self.native)
                p.send[j, : p.bits].copy_(packed)
                p.send[j, p.bits :].copy_(scales.view(torch.uint8))
            if w > 1:
                p.work = tdist.all_to_all_single(p.recv.view(-1), p.send.view(-1), group=self.group,
                                                 async_op=True)

        # 3-4. server: e_s += mean_j decompress(row j); compress e_s; e_s <- residual; then the
        # piece's all_gather runs while the next piece is reduced.
        for p in b.pieces:
            recv = p.send
            if w > 1:
                p.work.wait()
                recv = p.recv
            mine = p.gathered[0] if w == 1 else p.mine
            err = b.server_error[p.lo : p.hi]
            if lib is not None:  # fused: one pass over e_s
                lib.dsl_server_blocks(recv.data_ptr(), recv.data_ptr() + p.bits, p.row, w, 1.0 / w,
                                      err.data_ptr(), p.hi - p.lo, block, mine[p.bits :].data_ptr(),
                                      mine.data_ptr())
            else:
                for j in range(w):
                    decompress_into(recv[j, : p.bits], _scales(recv[j], p.bits), block, err,
                                    weight=1.0 / w, accumulate=True, native=self.native)
                spacked, sscales = compress_(None, err, block, native=self.native)
                mine[: p.bits].copy_(spacked)
                mine[p.bits :].copy_(sscales.view(torch.uint8))
            if w > 1:
                p.work = tdist.all_gather_single(p.gathered.view(-1), p.mine, group=self.group,
                                                 async_op=True)

        # 5. decompress every chunk's pieces into x (its first n elements).
        for p in b.pieces:
            if w > 1:
                p.work.wait()
                p.work = None
            for j in range(w):
                lo, hi = j * c + p.lo, min(n, j * c + p.hi)
                if hi > lo:
                    row = p.gathered[j]
                    decompress_into(row[: p.bits], _scales(row, p.bits), block, x[lo:hi], native=self.native)

        sent = 2 * (w - 1) * b.row
        self.calls += 1
        self.last_wire_bytes = sent
        self.wire_bytes += sent
        self.last_fp32_bytes = fp32_allreduce_bytes(n, w)
        return x
