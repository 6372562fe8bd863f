"""engine/cpu_alloc.py's `return_freed_blocks`: the resident set follows the live bytes.

A process allocates tensors of mixed sizes in an order that leaves holes (as a training step's
activations, gradients and logits do), frees them, and repeats with a different order. With
blocks returned, its peak resident set above the start is the live peak (within 10%) and its
resident set falls back to the start after each round; with `keep_freed_blocks` (the engine's
`reuse`) the freed blocks stay resident, which is what makes its peak exceed the live bytes.
Each case runs in its own process: the malloc setting is process-wide.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = r"""
import json, sys
import torch
from dsl.engine import cpu_alloc

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

applied = cpu_alloc.return_freed_blocks() if sys.argv[1] == "return" else cpu_alloc.keep_freed_blocks()
torch.ones(1)
start = status("VmRSS")
MiB = 2**20
live_peak = 0
after = []
for round in range(3):
    sizes = [(3 + (i * 7 + round) % 11) * MiB for i in range(24)]
    kept = [torch.ones(s // 4) for s in sizes]
    live_peak = max(live_peak, sum(sizes))
    for i in range(round % 2, len(kept), 2):  # free every other one: holes between live blocks
        kept[i] = None
    big = torch.ones((40 + 8 * round) * MiB // 4)  # larger than any hole
    live_peak = max(live_peak, sum(t.numel() * 4 for t in kept if t is not None) + big.numel() * 4)
    del kept, big
    after.append(status("VmRSS") - start)
print(json.dumps({"applied": applied, "peak": status("VmHWM") - start, "live_peak": live_peak, "after": after}))
"""


def _probe(mode: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_returned_blocks_keep_the_resident_set_at_the_live_bytes() -> None:
    returned, reused = _probe("return"), _probe("reuse")
    assert returned["applied"] is True and reused["applied"] is True
    # returned: the peak is the live peak, and every round gives its memory back
    assert 0.9 <= returned["peak"] / returned["live_peak"] <= 1.1, returned
    assert all(a < 8 * 2**20 for a in returned["after"]), returned
    # reuse keeps what it freed: resident after the rounds, and a peak above the live bytes
    assert min(reused["after"]) > 0.5 * reused["live_peak"], reused
    assert reused["peak"] > 1.1 * reused["live_peak"], reused
