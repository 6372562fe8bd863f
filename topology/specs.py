"""Datasheet figures NVML does not report: peak FLOP/s and memory bandwidth per accelerator model.

Dense (no 2:4 sparsity) peak TFLOP/s from NVIDIA's datasheets: `bf16` is the tensor-core rate
with fp32 accumulation (what bf16/fp16 training uses), `fp32` the plain (non-TF32) rate, which is
what fp32 training gets because PyTorch leaves TF32 matmuls off by default. Matched against
NVML's device name, most specific pattern first. The planner uses these for a *rough* compute
time at a stated MFU; an unknown device gets None and the planner says so.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AcceleratorSpec:
    family: str
    bf16_tflops: float
    fp32_tflops: float
    memory_bandwidth_gb_s: float


# (substring of the NVML name, spec); first match wins.
SPECS: tuple[tuple[str, AcceleratorSpec], ...] = (
    ("GH200", AcceleratorSpec("GH200 (H100 96GB HBM3)", 989.0, 67.0, 4000.0)),
    ("H100 PCIe", AcceleratorSpec("H100 PCIe", 756.0, 51.0, 2000.0)),
    ("H100 NVL", AcceleratorSpec("H100 NVL", 835.0, 60.0, 3900.0)),
    ("H100", AcceleratorSpec("H100 SXM", 989.0, 67.0, 3350.0)),
    ("H200", AcceleratorSpec("H200 SXM", 989.0, 67.0, 4800.0)),
    ("B200", AcceleratorSpec("B200", 2250.0, 75.0, 8000.0)),
    ("A100 80GB PCIe", AcceleratorSpec("A100 80GB PCIe", 312.0, 19.5, 1935.0)),
    ("A100-PCIE", AcceleratorSpec("A100 40GB PCIe", 312.0, 19.5, 1555.0)),
    ("A100", AcceleratorSpec("A100 SXM", 312.0, 19.5, 2039.0)),
    ("L40S", AcceleratorSpec("L40S", 362.0, 91.6, 864.0)),
    ("L40", AcceleratorSpec("L40", 181.0, 90.5, 864.0)),
    ("L4", AcceleratorSpec("L4", 121.0, 30.3, 300.0)),
    ("A10", AcceleratorSpec("A10", 125.0, 31.2, 600.0)),
    ("RTX 4090", AcceleratorSpec("GeForce RTX 4090", 82.6, 82.6, 1008.0)),
    ("RTX 6000 Ada", AcceleratorSpec("RTX 6000 Ada", 364.0, 91.1, 960.0)),
    ("V100", AcceleratorSpec("V100", 125.0, 15.7, 900.0)),
)


def accelerator_spec(name: str) -> AcceleratorSpec | None:
    for pattern, spec in SPECS:
        if pattern.lower() in name.lower():
            return spec
    return None
