"""Long context on 2 ranks: the longest sequence that fits a memory budget, with and without
Ulysses sequence parallelism and the long-sequence memory tricks, and the tokens/s there.

    python tests/bench/longctx.py [--budget-gib 0.65] [--configs NAME,...] [--no-write]

Model: the bundled Llama at a small long-context shape (`MODEL`: hidden 128, 4 layers, 8 heads /
2 kv heads, a vocabulary of 8,192 = 64 x hidden, so the logits are the largest buffer as in real
models), fp32, ZeRO-1, AdamW, micro-batch 1, one thread per rank. Two gloo ranks (this file with `--worker`),
each configuration in `CONFIGS` in turn:

- `sp1`: data parallel (each rank one whole sequence);
- `sp2`: Ulysses, each rank half of one sequence;
- `+tiled loss`, `+tiled MLP`, `+checkpointing`, `+offload`: cumulative on top of sp2.

For each, a doubling search over seq_len (from STEP = 512, at most MAX_SEQ), then
two bisection steps between the last length that fit and the first that did not, finds the
longest that trains one step (forward, backward, optimizer step) within the budget of peak
resident memory per rank (VmHWM, reset through /proc/self/clear_refs before each trial; glibc is
told to return freed memory at once, so a trial does not inherit the previous one's heap). The
ranks agree on fit/no-fit through an all_reduce(MAX) of their peaks. Tokens/s (tokens of the
whole job per second: dp x seq_len / step): the fastest of 3 more steps at COMMON_SEQ (every row: equal work), and one more step at
the row's longest length. The engine's memory model (`engine.memory.estimate`, CPU ranks) gives
the longest length it predicts within the budget, from the measured peak at the shortest trial
plus its per-token terms; rows that reach MAX_SEQ within the budget show ">=" and that
prediction says how much further they would go.

On CPU the "device" is host memory: activation offload moves checkpoints from one part of the
same RAM to another, so it cannot raise the longest length here (it does on a GPU); its row is
timed at COMMON_SEQ only, to show that it runs and what the copies cost.

Prints a table and writes it with tests/bench/report.py (section `longctx` of
docs/benchmarks.md). Runtime about 3-4 minutes on the 2-core machine (the rows that reach
MAX_SEQ dominate it: attention on CPU costs seq_len^2).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
ROOT = HERE.parents[2]

MODEL = dict(vocab_size=8192, hidden_size=128, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, intermediate_size=512, tie_word_embeddings=False)
CHUNK_TOKENS = 512
BASE = {"precision": "fp32", "micro_batch": 1, "zero_stage": 1, "optimizer": {"lr": 1e-3}}
TILED_LOSS = {"tiled_loss": {"enabled": True, "chunk_tokens": CHUNK_TOKENS}}
TILED_MLP = {"tiled_mlp": {"enabled": True, "chunk_tokens": CHUNK_TOKENS}}
CONFIGS: list[tuple[str, dict]] = [
    ("sp1", {}),
    ("sp2", {"sequence_parallel": 2}),
    ("sp2 +tiled loss", {"sequence_parallel": 2, **TILED_LOSS}),
    ("sp2 +tiled loss +tiled MLP", {"sequence_parallel": 2, **TILED_LOSS, **TILED_MLP}),
    ("sp2 +tiled +checkpointing", {"sequence_parallel": 2, **TILED_LOSS, **TILED_MLP,
                                   "activation_checkpointing": True}),
    ("sp2 +tiled +checkpointing +offload", {"sequence_parallel": 2, **TILED_LOSS, **TILED_MLP,
                                            "activation_checkpointing": True, "activation_offload": True}),
]
ONLY_AT_COMMON = {"sp2 +tiled +checkpointing +offload"}
"""Rows timed once at COMMON_SEQ instead of searched (offload cannot change the longest length on
CPU, see above; searching it would only double the runtime). Compare with the row above."""
STEP = 512
MAX_SEQ = 8 * 1024
MAX_TRIAL_S = 25.0
"""The doubling stops before a trial expected to be slower than this (3x the previous step: the
length is then time-bound, not memory-bound)."""
COMMON_SEQ = 2048
"""Every configuration is also timed at this length, so tokens/s compare at equal work."""


# Worker ----------------------------------------------------------------------------------------


def _peak_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def _trial(seq: int, extra: dict, timed: int) -> dict:
    """Build the model and engine at `seq`, train one step (its peak resident memory, max over
    ranks), then `timed` more steps (the fastest one's tokens/s: robust to other load)."""
    import torch
    import torch.distributed as tdist

    from dsl.engine import initialize
    from dsl.engine.model import Llama
    from dsl.engine.train_config import ModelConfig

    gc.collect()
    _reset_peak()
    cfg = ModelConfig(**MODEL, seq_len=seq)
    torch.manual_seed(0)
    model = Llama(cfg)
    engine = initialize(model, {**BASE, **extra})
    g = engine.groups
    shard = seq // g.sp
    gen = torch.Generator().manual_seed(g.dp_rank)
    seqs = torch.randint(cfg.vocab_size, (1, seq + 1), generator=gen)
    lo = g.sp_rank * shard
    tokens, targets = seqs[:, lo:lo + shard], seqs[:, lo + 1:lo + shard + 1]
    positions = torch.arange(lo, lo + shard)

    def step() -> float:
        start = time.perf_counter()
        loss = engine(tokens, targets, positions=positions)
        loss.backward()
        engine.step()
        engine.zero_grad()
        return time.perf_counter() - start

    first_s = step()
    peak = torch.tensor([_peak_bytes()], dtype=torch.int64)
    tdist.all_reduce(peak, op=tdist.ReduceOp.MAX)
    out = {"seq": seq, "peak_bytes": int(peak), "first_step_s": first_s, "dp": g.dp}
    if timed:
        t = torch.tensor([min(step() for _ in range(timed))], dtype=torch.float64)
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        out["step_s"] = float(t)
        out["tokens_per_s"] = g.dp * seq / float(t)
    engine.close()
    del engine, model
    gc.collect()
    return out


def _search(extra: dict, budget: int, log) -> dict:
    """Longest seq_len (multiple of STEP) whose first step peaks within `budget` bytes per rank."""
    fits: dict | None = None
    too_big: int | None = None
    trials = []
    seq = STEP
    common = None
    while seq <= MAX_SEQ:
        r = _trial(seq, extra, timed=3 if seq == COMMON_SEQ else 0)
        trials.append(r)
        log(f"  seq {seq:>6}: peak {r['peak_bytes'] / 2**30:.2f} GiB, step {r['first_step_s']:.1f} s")
        if seq == COMMON_SEQ:
            common = r["tokens_per_s"]
        if r["peak_bytes"] > budget:
            too_big = seq
            break
        fits = r
        if 3 * r.get("step_s", r["first_step_s"]) > MAX_TRIAL_S or seq == MAX_SEQ:
            seq *= 2
            break
        seq = min(2 * seq, MAX_SEQ)
    if common is None and too_big is not None and too_big < COMMON_SEQ:
        common = _trial(COMMON_SEQ, extra, timed=3)["tokens_per_s"]
    bound = "memory" if too_big is not None else ("time" if seq <= MAX_SEQ else f"max_seq {MAX_SEQ:,}")
    for _ in range(2):
        if fits is None or too_big is None or too_big - fits["seq"] <= STEP:
            break
        mid = (fits["seq"] + too_big) // 2 // STEP * STEP
        r = _trial(mid, extra, timed=0)
        trials.append(r)
        log(f"  seq {mid:>6}: peak {r['peak_bytes'] / 2**30:.2f} GiB, step {r['first_step_s']:.1f} s")
        if r["peak_bytes"] > budget:
            too_big = mid
        else:
            fits = r
    if fits is None:
        return {"seq": 0, "bound": bound, "trials": trials, "common_tokens_per_s": common}
    timed = _trial(fits["seq"], extra, timed=1)
    return {**timed, "bound": bound, "trials": trials, "common_tokens_per_s": common}


def worker(rank: int, out: str, budget: int, name: str, fixed_seq: int) -> None:
    """One configuration on this rank: search its longest length, or time `fixed_seq` (> 0)."""
    import torch
    import torch.distributed as tdist

    # torch.utils.checkpoint imports torch._dynamo on first use (~0.1 GiB resident, a few s): import
    # it in every configuration, so each row's baseline is the same process.
    import torch._dynamo  # noqa: F401

    torch.set_num_threads(1)
    tdist.init_process_group("gloo")
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if rank == 0 else (lambda msg: None)
    log(f"{name}:")
    extra = dict(CONFIGS)[name]
    if fixed_seq:
        r = _trial(fixed_seq, extra, timed=3)
        log(f"  seq {fixed_seq:>6}: peak {r['peak_bytes'] / 2**30:.2f} GiB, step {r['step_s']:.1f} s")
        result = {**r, "bound": f"timed at {fixed_seq:,} only", "trials": [r],
                  "common_tokens_per_s": r["tokens_per_s"]}
    else:
        result = _search(extra, budget, log)
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    tdist.barrier()
    tdist.destroy_process_group()


# Driver ----------------------------------------------------------------------------------------


def _predicted_bytes(name: str, seq: int) -> int:
    from dsl.engine.config import EngineConfig
    from dsl.engine.memory import estimate
    from dsl.engine.train_config import ModelConfig

    extra = dict(CONFIGS)[name]
    engine = EngineConfig(**{**BASE, **extra})
    sp = engine.sequence_parallel
    b = estimate(ModelConfig(**MODEL, seq_len=seq), engine, dp=2 // sp, sp=sp, accelerator=False)
    return b.device_bytes


def _predicted_longest(name: str, budget: int, base: dict) -> int:
    """The longest multiple of STEP that fits `budget` per rank by the memory model's growth over
    the measured peak at the shortest trial `base` (the model's fixed runtime term is a rough
    0.4 GiB; its per-token terms are what it predicts well), up to 1M."""
    offset = base["peak_bytes"] - _predicted_bytes(name, base["seq"])
    lo, hi = 0, (1 << 20) // STEP
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _predicted_bytes(name, mid * STEP) + offset <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo * STEP


def run(budget_gib: float, names: list[str], tmp: Path) -> dict:
    """Each configuration in a fresh pair of ranks, so no row inherits another's heap."""
    results: dict[str, dict] = {}
    for name, _ in CONFIGS:
        if name not in names:
            continue
        fixed = COMMON_SEQ if name in ONLY_AT_COMMON else 0
        results[name] = _run_config(name, budget_gib, fixed, tmp / f"{len(results)}.json")
    return results


def _run_config(name: str, budget_gib: float, fixed_seq: int, out: Path) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   # return freed memory to the OS at once, so one trial's peak is its own
                   MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
        procs.append(subprocess.Popen([sys.executable, str(HERE), "--worker", str(rank), str(out),
                                       str(int(budget_gib * 2**30)), name, str(fixed_seq)], env=env))
    codes = [p.wait(timeout=600) for p in procs]
    if any(codes):
        raise SystemExit(f"longctx: {name}: ranks exited {codes}")
    return json.loads(out.read_text())


def table(results: dict, budget_gib: float) -> str:
    base = results.get("sp1", {}).get("seq") or None
    lines = [
        f"Longest seq_len whose training step peaks within {budget_gib:g} GiB resident memory per rank, "
        f"2 ranks (gloo, 1 thread each), fp32, ZeRO-1, micro-batch 1; model: hidden "
        f"{MODEL['hidden_size']}, {MODEL['num_hidden_layers']} layers, {MODEL['num_attention_heads']} heads / "
        f"{MODEL['num_key_value_heads']} kv heads, vocab {MODEL['vocab_size']:,}; tiles of {CHUNK_TOKENS:,} tokens. "
        f"Search: doubling from {STEP:,}, then 2 bisection steps (granularity up to 1/4 of the last doubling).",
        "",
        f"| configuration | longest seq_len | vs sp1 | peak RSS/rank | memory model's longest | tokens/s there "
        f"| step s | tokens/s at {COMMON_SEQ:,} | bound by |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, _ in CONFIGS:
        r = results.get(name)
        if r is None:
            continue
        if name in ONLY_AT_COMMON:
            lines.append(f"| {name} | | | {r['peak_bytes'] / 2**30:.2f} GiB at {r['seq']:,} | | | "
                         f"{r['step_s']:.2f} | {r['common_tokens_per_s']:,.0f} | {r['bound']} |")
            continue
        longest = f"{_predicted_longest(name, int(budget_gib * 2**30), r['trials'][0]):,}"
        common = f"{r['common_tokens_per_s']:,.0f}" if r.get("common_tokens_per_s") else ""
        if not r["seq"]:
            lines.append(f"| {name} | < {STEP:,} | | | {longest} | | | {common} | {r['bound']} |")
            continue
        ratio = f"{r['seq'] / base:.1f}x" if base else ""
        seq = f"{r['seq']:,}" if r["bound"] == "memory" else f">= {r['seq']:,}"
        lines.append(f"| {name} | {seq} | {ratio} | {r['peak_bytes'] / 2**30:.2f} GiB | {longest} | "
                     f"{r['tokens_per_s']:,.0f} | {r['step_s']:.2f} | {common} | {r['bound']} |")
    lines += ["", "bound by: memory = the next longer length exceeded the budget; time = the next doubling "
              f"would take over {MAX_TRIAL_S:g} s a step (or {MAX_SEQ:,} was reached) while still within the "
              "budget, so the longest length is at least the one shown. memory model's longest: the longest "
              "length within the budget by `engine.memory.estimate` (CPU ranks: model states, saved activations, "
              f"logits, recomputation peak, buffers), added to the measured peak at {STEP:,} tokens. tokens/s: "
              "tokens of the whole job per second (dp x seq_len per step). On CPU, activation "
              "offload copies within the same RAM: no gain here by design (on a GPU the checkpoints leave the "
              "device); its row is only timed at the common length, against the row above it. Timings share 2 cores with "
              "other work on this machine: treat tokens/s differences under ~10% as noise."]
    return "\n".join(lines)


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        worker(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5], int(sys.argv[6]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-gib", type=float, default=0.65, help="peak resident memory per rank")
    parser.add_argument("--configs", default=",".join(n for n, _ in CONFIGS), help="comma-separated names")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    import tempfile

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        results = run(args.budget_gib, args.configs.split(","), Path(tmp))
    body = table(results, args.budget_gib) + f"\n\nRuntime {time.perf_counter() - start:.0f} s."
    print(body)
    if not args.no_write:
        sys.path.insert(0, str(ROOT))
        from tests.bench.report import write_section  # noqa: E402

        write_section("longctx", "Long context: longest sequence within a memory budget (2 ranks)",
                      "make bench  (python tests/bench/longctx.py)", body)


if __name__ == "__main__":
    main()
