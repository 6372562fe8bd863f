"""Int8 block quantization of the ZeRO++-style reduce-scatter (ops/comm/qreduce.py), one process."""

from __future__ import annotations

import pytest
import torch

from dsl.ops.comm.qreduce import (dequantize_blocks, fp32_reduce_scatter_bytes, quantize_blocks,
                                  quantized_bytes, quantized_reduce_scatter)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_error_is_at_most_half_a_step(dtype):
    x = (torch.randn(8, 4096, generator=torch.Generator().manual_seed(0)) * torch.logspace(-6, 2, 8)[:, None]).to(dtype)
    x[3] = 0  # an all-zero row: scale 0, values 0
    q, scales = quantize_blocks(x, 512)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 127
    back = dequantize_blocks(q, scales)
    step = scales.repeat_interleave(512, dim=-1)
    # fp32 rounding of x / scale and q * scale can add a few ulps at exact ties (bf16 inputs).
    assert bool(((back - x.float()).abs() <= step / 2 * (1 + 1e-4)).all())
    assert bool((back[3] == 0).all())


def test_world_1_path_is_the_quantized_identity():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    out = quantized_reduce_scatter(x, world_size=1, block_numel=256).wait()
    assert out.shape == x.shape
    assert float((out - x).abs().max()) <= float(x.abs().max()) / 254 * 1.0001


def test_bytes_are_about_a_quarter_of_fp32():
    ratio = quantized_bytes(1 << 20, 2, 512) / fp32_reduce_scatter_bytes(1 << 20, 2)
    assert abs(ratio - (1 + 4 / 512) / 4) < 1e-9
