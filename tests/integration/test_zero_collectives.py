"""engine/zero/collectives.py on real gloo ranks: the point-to-point reduce-scatter and the
broadcast all-gather give what gloo's own collectives give (2 ranks bit for bit, 3 ranks to
fp32 rounding), with several calls in flight at once."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def _worker(rank: int, world: int, store_path: str, out_path: str) -> None:
    import torch
    import torch.distributed as dist

    from dsl.engine.zero import collectives

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        gen = torch.Generator().manual_seed(100 + rank)
        fulls = [torch.randn(world * k, generator=gen).to(dtype) for k in (1, 7, 1000)]
        # Several reduce-scatters (then several all-gathers) in flight before the first wait.
        outs = [torch.empty(f.numel() // world, dtype=dtype) for f in fulls]
        pending = [collectives.reduce_scatter(o, f) for o, f in zip(outs, fulls)]
        for p in pending:
            p.wait()
        gathered = [torch.empty_like(f) for f in fulls]
        pending = [collectives.all_gather(g, o) for g, o in zip(gathered, outs)]
        for p in pending:
            p.wait()
        native_rs = []
        for f in fulls:
            o = torch.empty(f.numel() // world, dtype=dtype)
            dist.reduce_scatter_tensor(o, f.clone())
            native_rs.append(o)
        # In place: the part is this rank's slice of the output itself.
        inplace = [g.clone() for g in gathered]
        for g in inplace:
            k = g.numel() // world
            g[[i for i in range(g.numel()) if not rank * k <= i < (rank + 1) * k]] = 0
            collectives.all_gather(g, g[rank * k : (rank + 1) * k]).wait()
        results[str(dtype)] = {"rs": outs, "native_rs": native_rs, "ag": gathered, "inplace": inplace}
    torch.save(results, out_path)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_point_to_point_collectives_match_gloo(tmp_path: Path, world: int) -> None:
    import subprocess

    import torch

    procs = [
        subprocess.Popen([sys.executable, __file__, str(r), str(world), str(tmp_path / "store"),
                          str(tmp_path / f"out{r}.pt")])
        for r in range(world)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0] * world
    res = [torch.load(tmp_path / f"out{r}.pt") for r in range(world)]
    for dtype in res[0]:
        # 3 ranks: another summation order; bf16 rounds each partial sum to 8 bits.
        tol = {"atol": 0.05, "rtol": 0} if "bfloat16" in dtype else {"atol": 1e-6, "rtol": 1e-6}
        for r in range(world):
            for mine, native in zip(res[r][dtype]["rs"], res[r][dtype]["native_rs"]):
                if world == 2:
                    assert torch.equal(mine, native)
                else:
                    torch.testing.assert_close(mine, native, **tol)
        # Every rank gathers the same full buffer: the concatenation of the partitions.
        for i in range(3):
            expect = torch.cat([res[r][dtype]["rs"][i] for r in range(world)])
            for r in range(world):
                assert torch.equal(res[r][dtype]["ag"][i], expect)
                assert torch.equal(res[r][dtype]["inplace"][i], expect)


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
