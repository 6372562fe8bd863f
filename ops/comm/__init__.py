"""Compressed communication: 1-bit sign compression with error feedback and the compressed
all-reduce of 1-bit Adam (signs.py, allreduce.py, fused CPU kernels in onebit_kernels.c built by
native.py), and the int8 block-quantized reduce-scatter of ZeRO++'s qgZ (qreduce.py).

Every module states its algorithm and what it sends; byte counts are payload bytes a rank sends
to other ranks. Imports torch (layer 2 of docs/DESIGN.md).
"""

from dsl.ops.comm.allreduce import CompressedAllReduce, fp32_allreduce_bytes, padded_numel

__all__ = ["CompressedAllReduce", "fp32_allreduce_bytes", "padded_numel"]
