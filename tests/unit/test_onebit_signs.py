"""1-bit sign compression (ops/comm/signs.py, the C kernels of native.py) in one process:
packing round-trips, kernels vs the torch reference, the compression error, error feedback,
and the compressed all-reduce's byte count at world size 1."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dsl.ops.comm import CompressedAllReduce, fp32_allreduce_bytes, padded_numel
from dsl.ops.comm.signs import (compress_, compressed_nbytes, decompress, decompress_into, native_available,
                                pack_bits, pack_bits_reference, unpack_bits, unpack_bits_reference)

SIZES = [0, 8, 16, 24, 64, 1000, 4096, 65536 + 8]
BACKENDS = [False, True] if native_available() else [False]


@pytest.mark.parametrize("n", SIZES)
def test_pack_round_trip_matches_numpy_and_reference(n):
    bits = torch.rand(n, generator=torch.Generator().manual_seed(n)) > 0.5
    packed = pack_bits(bits)
    assert packed.dtype == torch.uint8 and packed.numel() == n // 8
    assert np.array_equal(packed.numpy(), np.packbits(bits.numpy(), bitorder="little"))
    assert torch.equal(packed, pack_bits_reference(bits))
    assert torch.equal(unpack_bits(packed), bits)
    if n <= 4096:
        assert torch.equal(unpack_bits_reference(packed), bits)


def test_pack_refuses_partial_bytes():
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_bits(torch.ones(9, dtype=torch.bool))


def test_native_kernels_built_here():
    # g++/cc is installed on this project's machines (Makefile); a silent fallback to torch
    # would make the 1 Gbit/s benchmark compute-bound without anyone noticing.
    assert native_available()


@pytest.mark.parametrize("block", [8, 256, 1024])
def test_kernels_match_the_torch_reference(block):
    gen = torch.Generator().manual_seed(block)
    n = 4 * 4096
    x = torch.randn(n, generator=gen)
    x[:17] = 0.0
    x[17:29] = -0.0
    e0 = torch.randn(n, generator=gen) * 0.1
    results = []
    for native in BACKENDS:
        e = e0.clone()
        packed, scales = compress_(x, e, block, native=native)
        out = torch.randn(n - 5, generator=torch.Generator().manual_seed(1))
        decompress_into(packed, scales, block, out, weight=0.5, accumulate=True, native=native)
        results.append((packed, scales, e, out, decompress(packed, scales, block, native=native)))
    for got in results[1:]:
        assert torch.equal(got[0], results[0][0])  # identical bits
        for a, b in zip(got[1:], results[0][1:]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("native", BACKENDS)
def test_one_compression_error_is_the_least_squares_residual(native):
    """x_hat = mean|x| sign(x) per block: ||x - x_hat||^2 = ||x||^2 - block * sum(s^2); for
    Gaussian data the relative error is sqrt(1 - 2/pi) = 0.603."""
    x = torch.randn(1 << 18, generator=torch.Generator().manual_seed(0))
    e = x.clone()
    packed, scales = compress_(None, e, 256, native=native)
    x_hat = decompress(packed, scales, 256)
    torch.testing.assert_close(x - x_hat, e, rtol=0, atol=1e-5)
    assert torch.equal(torch.signbit(x_hat), torch.signbit(x))
    torch.testing.assert_close(scales, x.view(-1, 256).abs().mean(1), rtol=1e-5, atol=0)
    rel = float(e.norm() / x.norm())
    assert abs(rel - math.sqrt(1 - 2 / math.pi)) < 0.01, rel
    assert compressed_nbytes(x.numel(), 256) == packed.numel() + 4 * scales.numel()


@pytest.mark.parametrize("native", BACKENDS)
def test_error_feedback_telescopes(native):
    """Sum over T calls of the decompressed outputs = sum of inputs - final error buffer."""
    gen = torch.Generator().manual_seed(3)
    n, block = 4096, 256
    e = torch.zeros(n)
    sent = torch.zeros(n, dtype=torch.float64)
    total = torch.zeros(n, dtype=torch.float64)
    for _ in range(50):
        x = torch.rand(n, generator=gen) * 2 - 1
        total += x.double()
        packed, scales = compress_(x, e, block, native=native)
        sent += decompress(packed, scales, block).double()
    torch.testing.assert_close(sent, total - e.double(), rtol=0, atol=1e-4)
    assert float((sent - total).norm() / total.norm()) < 0.1  # vs 0.6 for one call


def test_allreduce_world_1_counts_no_bytes_and_keeps_shape():
    ar = CompressedAllReduce()
    x = torch.randn(1001)
    y = ar(x.clone())
    assert y.shape == x.shape and ar.last_wire_bytes == 0 and ar.calls == 1
    assert float((y - x).norm() / x.norm()) < 0.9  # one call: ~0.6 relative error


def test_byte_counts_as_documented():
    n, w = 100_000_000, 2
    assert fp32_allreduce_bytes(n, w) == 4 * n  # 2 (w-1)/w x 4N
    padded = padded_numel(n, w, 256)
    sent = 2 * (w - 1) * (padded // w // 8 + 4 * (padded // w // 256))
    assert sent / fp32_allreduce_bytes(n, w) <= 1 / 28


@pytest.mark.skipif(not native_available(), reason="C kernels not built")
def test_allreduce_native_matches_torch_over_calls():
    """The fused server kernel and the C codec against the torch reference, with error feedback
    carried over 20 calls (world size 1 runs both compression levels)."""
    gen = torch.Generator().manual_seed(5)
    native, reference = CompressedAllReduce(native=True), CompressedAllReduce(native=False)
    for _ in range(20):
        x = torch.randn(5000, generator=gen)
        a, b = native(x.clone()), reference(x.clone())
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for got, want in zip(native.errors(5000), reference.errors(5000)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
