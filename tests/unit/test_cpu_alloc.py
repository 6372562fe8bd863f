"""engine/cpu_alloc.py: with `cpu_allocator: reuse` a freed large tensor's pages are reused by the
next allocations (no page faults once the heap has settled, as in a training loop's steady
state), with `system` every allocation faults its pages in again.
Each case runs in its own process: the malloc setting is process-wide."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = r"""
import json, resource, sys
import torch
from dsl.engine import initialize
from dsl.engine.model import Llama
from dsl.engine.train_config import ModelConfig

engine = initialize(Llama(ModelConfig(preset="tiny")), {"cpu_allocator": sys.argv[1]})
faults = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.ones(16 * 2**20)  # 64 MiB: above glibc's largest mmap threshold
    del t
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
rss = []  # "return": a freed 2 MiB block leaves the resident set at once
for _ in range(3):
    t = torch.ones(512 * 1024)  # 2 MiB: below glibc's dynamic mmap threshold after a large free
    t.add_(1)
    before = int(open("/proc/self/statm").read().split()[1])
    del t
    rss.append(before - int(open("/proc/self/statm").read().split()[1]))
print(json.dumps({"reuse": engine.cpu_allocator_reuse, "return": engine.cpu_allocator_return,
                  "faults": faults, "returned_pages": rss}))
"""


def _probe(mode: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_reuse_keeps_freed_pages_and_system_does_not() -> None:
    pages = 64 * 2**20 // 4096
    reuse, system = _probe("reuse"), _probe("system")
    assert reuse["reuse"] is True and system["reuse"] is False
    # system: every 64 MiB allocation is a fresh mapping, all its pages fault in again
    assert all(f >= pages * 0.9 for f in system["faults"]), system
    # reuse: once the heap has settled (the first few rounds may still extend it), the same heap
    # pages come back already mapped
    assert all(f < pages * 0.05 for f in reuse["faults"][5:]), reuse


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_return_gives_a_freed_2_mib_block_back_and_reuse_keeps_it() -> None:
    pages = 2 * 2**20 // 4096
    ret, reuse = _probe("return"), _probe("reuse")
    assert ret["return"] is True and ret["reuse"] is False and reuse["return"] is False
    assert all(p >= pages * 0.9 for p in ret["returned_pages"]), ret
    assert all(p < pages * 0.1 for p in reuse["returned_pages"]), reuse


def test_cpu_allocator_set_for_a_gpu_rank_is_a_note() -> None:
    import torch

    from dsl.engine.config import EngineConfig
    from dsl.engine.core_config import device_notes

    notes = device_notes(EngineConfig(cpu_allocator="return"), torch.device("cuda", 0))
    assert notes == ["engine.cpu_allocator: return has no effect on cuda (it sets the host malloc of a rank that "
                     "trains on the CPU)"]
    assert device_notes(EngineConfig(), torch.device("cuda", 0)) == []
