"""1-bit compressed all-reduce and 1-bit Adam on a 1 Gbit/s link between two test-cluster hosts.

    python tests/bench/onebit.py [--numel 100000000] [--reps 3] [--preset bench] [--steps 5]

Setup: the project's test cluster (tests/cluster; `lease` brings it up if needed and takes it
down afterwards if this run started it). Hosts node1 and node2 are network namespaces joined by a
bridge; each host's `eth0` gets `tc qdisc replace ... root tbf rate 1gbit burst 256kb latency
50ms`, which limits what that host sends to 1 Gbit/s (so both directions of the link are
limited). The qdiscs are removed in a `finally`, also after a failure or Ctrl-C, and removing a
qdisc that is not there is not an error (idempotent).

Two ranks, one per host, gloo over TCP on eth0, MASTER_ADDR = node1's address, one thread each:
1. all-reduce of a `--numel` fp32 gradient: `tdist.all_reduce` (fp32, SUM) against
   `CompressedAllReduce` (ops/comm/allreduce.py, after one warm-up call that allocates its
   buffers); median of `--reps` calls, plus the bytes eth0 actually sent per call (from
   /proc/self/net/dev inside the host: payload + TCP/IP headers) next to the payload counter;
2. step time of the bundled model (`--preset`, micro_batch 1: little compute per byte of
   gradient; at the preset's seq_len and at a quarter of it) with AdamW against 1-bit Adam
   after its warm-up (freeze_step 2): median of `--steps` steps after 3 warm-up steps.
The table goes to stdout and to docs/benchmarks.md (tests/bench/report.py, section "onebit").
The machine's 2 cores are shared by both "hosts" (and by anything else running): compression
time is CPU time, the fp32 all-reduce is link time, so a loaded machine lowers the speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HOSTS = ("node1", "node2")
TBF = ["tbf", "rate", "1gbit", "burst", "256kb", "latency", "50ms"]
TIMEOUT_S = 900
SEQ_LENS = (256, 64)
"""Sequence lengths of the step-time runs: the preset's own, and a quarter of it (a quarter of the
compute for the same gradient bytes: the regime compressed communication is for)."""


# Worker (one per host) ------------------------------------------------------------------------


def _tx_bytes(dev: str = "eth0") -> int:
    for line in Path("/proc/self/net/dev").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == dev:
            return int(rest.split()[8])
    return 0


def _median_time(fn, reps: int) -> tuple[float, int, float]:
    """(median wall time, median eth0 bytes sent, median CPU time of this process) per call."""
    import torch.distributed as tdist

    times, sent, cpu = [], [], []
    for _ in range(reps):
        tdist.barrier()
        tx0 = _tx_bytes()
        c0 = time.process_time()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        tdist.barrier()
        sent.append(_tx_bytes() - tx0)
    return statistics.median(times), int(statistics.median(sent)), statistics.median(cpu)


def _model_steps(optimizer: dict, preset: str, seq_len: int, steps: int) -> tuple[float, int]:
    import torch

    from dsl.engine import initialize
    from dsl.engine.model import Llama
    from dsl.engine.train_config import ModelConfig

    cfg = ModelConfig(preset=preset, seq_len=seq_len)
    torch.manual_seed(0)
    engine = initialize(Llama(cfg), {"optimizer": optimizer, "micro_batch": 1, "grad_clip": None}, lr=1e-4)
    gen = torch.Generator().manual_seed(engine.rank)
    times = []
    for i in range(3 + steps):
        tokens = torch.randint(0, cfg.vocab_size, (1, cfg.seq_len + 1), generator=gen)
        torch.distributed.barrier()
        t0 = time.perf_counter()
        engine(tokens[:, :-1], tokens[:, 1:]).backward()
        engine.step()
        engine.zero_grad()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    engine.close()
    return statistics.median(times), sum(p.numel() for p in engine.module.parameters())


def worker(out: str, numel: int, reps: int, preset: str, steps: int) -> None:
    import torch
    import torch.distributed as tdist

    from dsl.ops.comm import CompressedAllReduce
    from dsl.ops.comm.signs import native_available

    torch.set_num_threads(1)
    tdist.init_process_group("gloo")
    rank = tdist.get_rank()
    x = torch.randn(numel, generator=torch.Generator().manual_seed(rank))
    ar = CompressedAllReduce()
    ar(x.clone())  # warm-up: allocates the error and staging buffers
    load_before = os.getloadavg()[0]
    onebit_s, onebit_tx, onebit_cpu = _median_time(lambda: ar(x), reps)
    fp32_s, fp32_tx, _ = _median_time(lambda: tdist.all_reduce(x), reps)
    step_times = {}
    for seq_len in SEQ_LENS:
        adam_step, params = _model_steps({"type": "adamw"}, preset, seq_len, steps)
        onebit_step, _ = _model_steps({"type": "onebit_adam", "freeze_step": 2}, preset, seq_len, steps)
        step_times[seq_len] = (adam_step, onebit_step)
    result = {
        "numel": numel, "native": native_available(), "onebit_s": onebit_s, "fp32_s": fp32_s,
        "onebit_cpu_s": onebit_cpu, "load_before": load_before, "load_after": os.getloadavg()[0],
        "onebit_tx": onebit_tx, "fp32_tx": fp32_tx, "onebit_payload": ar.last_wire_bytes,
        "fp32_payload": ar.last_fp32_bytes, "preset": preset, "params": params,
        "step_s": step_times,
    }
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    tdist.barrier()
    tdist.destroy_process_group()


# Driver ---------------------------------------------------------------------------------------


def _tc(cluster, host: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cluster.on_host(host, ["tc", "qdisc", *args]), capture_output=True, text=True,
                          check=check, timeout=30)


def _limit(cluster) -> None:
    for host in HOSTS:
        _tc(cluster, host, "replace", "dev", "eth0", "root", *TBF)


def _unlimit(cluster) -> None:
    """Remove the tbf qdiscs; a missing one is fine (idempotent)."""
    for host in HOSTS:
        proc = _tc(cluster, host, "del", "dev", "eth0", "root", check=False)
        if proc.returncode != 0 and "No such file" not in proc.stderr and "Cannot find" not in proc.stderr \
                and "Invalid handle" not in proc.stderr:
            print(f"onebit bench: tc qdisc del on {host}: {proc.stderr.strip()}", file=sys.stderr)


def run(args: argparse.Namespace) -> dict:
    from tests.cluster import lease

    with lease(owner="bench-onebit", n_hosts=3, verbose=False) as cluster, \
            tempfile.TemporaryDirectory(prefix="onebit-bench-") as tmp:
        out = Path(tmp) / "result.json"
        port = random.randint(20000, 40000)
        _limit(cluster)
        procs = []
        try:
            shown = subprocess.run(cluster.on_host(HOSTS[0], ["tc", "qdisc", "show", "dev", "eth0"]),
                                   capture_output=True, text=True).stdout.strip()
            print(f"onebit bench: {HOSTS[0]} eth0: {shown}", file=sys.stderr)
            for rank, host in enumerate(HOSTS):
                env = dict(os.environ, MASTER_ADDR=cluster.ips[HOSTS[0]], MASTER_PORT=str(port),
                           WORLD_SIZE=str(len(HOSTS)), RANK=str(rank), LOCAL_RANK="0",
                           GLOO_SOCKET_IFNAME="eth0", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
                argv = [sys.executable, str(Path(__file__).resolve()), "--worker", str(out),
                        "--numel", str(args.numel), "--reps", str(args.reps), "--preset", args.preset,
                        "--steps", str(args.steps)]
                procs.append(subprocess.Popen(cluster.on_host(host, argv), env=env, cwd=ROOT))
            deadline = time.monotonic() + TIMEOUT_S
            for p in procs:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
            codes = [p.returncode for p in procs]
            if any(codes):
                raise SystemExit(f"onebit bench: ranks exited {codes}")
            return json.loads(out.read_text())
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            _unlimit(cluster)


def table(r: dict) -> str:
    mb = 1e6
    speedup = r["fp32_s"] / r["onebit_s"]
    lines = [
        f"2 ranks (node1, node2 of tests/cluster), gloo, link limited to 1 Gbit/s per direction "
        f"(`tc ... tbf rate 1gbit burst 256kb latency 50ms` on each host's eth0), one thread per rank; "
        f"C kernels: {'yes' if r['native'] else 'no (torch fallback)'}. Machine load average (1 min) "
        f"{r['load_before']:.1f} before, {r['load_after']:.1f} after (2 cores, shared with other work): "
        f"compression is CPU time, so a busy machine lowers the speed-up.",
        "",
        f"All-reduce of a {r['numel']:,}-element fp32 gradient (median of the timed calls):",
        "",
        "| all-reduce | time per call | payload sent per rank | eth0 bytes sent per rank | speed-up |",
        "|---|---|---|---|---|",
        f"| fp32 `all_reduce` (gloo) | {r['fp32_s']:.3f} s | {r['fp32_payload'] / mb:,.1f} MB (ring count) "
        f"| {r['fp32_tx'] / mb:,.1f} MB | 1.00x |",
        f"| 1-bit compressed (error feedback) | {r['onebit_s']:.3f} s | {r['onebit_payload'] / mb:,.2f} MB "
        f"(1/{r['fp32_payload'] / r['onebit_payload']:.1f}) | {r['onebit_tx'] / mb:,.2f} MB | {speedup:.2f}x |",
        "",
        f"CPU time of the compressed call on rank 0: {r['onebit_cpu_s']:.3f} s of its {r['onebit_s']:.3f} s "
        f"(the rest is waiting for the link, the peer, or a core).",
        "",
        f"Step time of the bundled model (preset `{r['preset']}`, {r['params']:,} parameters, micro_batch 1, "
        f"median after warm-up; 1-bit Adam past its freeze_step; AdamW's fp32 all-reduce overlaps the "
        f"backward, 1-bit Adam's compression runs after it):",
        "",
        "| seq_len | AdamW step | 1-bit Adam step | speed-up |",
        "|---|---|---|---|",
    ]
    for seq_len, (adam, onebit) in r["step_s"].items():
        lines.append(f"| {seq_len} | {adam:.3f} s | {onebit:.3f} s | {adam / onebit:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", metavar="OUT", help=argparse.SUPPRESS)
    parser.add_argument("--numel", type=int, default=100_000_000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--preset", default="bench")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--no-report", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.numel, args.reps, args.preset, args.steps)
        return 0
    sys.path.insert(0, str(ROOT))
    result = run(args)
    body = table(result)
    print(body)
    if not args.no_report:
        from tests.bench.report import write_section

        write_section("onebit", "1-bit compressed all-reduce and 1-bit Adam on a 1 Gbit/s link",
                      "make bench  (python tests/bench/onebit.py)", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
