"""Long context on 2 ranks: the longest sequence that fits a memory budget, with and without
Ulysses sequence parallelism and the long-sequence memory tricks, and the tokens/s there.

    python tests/bench/longctx.py [--budget-gib 0.62] [--configs NAME,...] [--no-write]
    python tests/bench/longctx.py --at 256,4096 [--configs NAME,...]   # peaks at given lengths only

Model: the bundled Llama at a small long-context shape (`MODEL`: hidden 128, 4 layers, 8 heads /
2 kv heads, a vocabulary of 8,192 = 64 x hidden, so the logits are the largest buffer as in real
models), fp32, ZeRO-1, AdamW, micro-batch 1, eager (`compile: false`, the
engine's default, said explicitly: `auto` would compile only the sp1 row, whose first step then
carries inductor's compile-time memory, 50-70 MiB here, into its peak, and the model predicts
eager autograd), one thread per rank. Two gloo ranks (this file with `--worker`), each configuration in `CONFIGS` in
its own fresh pair of processes:

- `sp1`: data parallel (each rank one whole sequence);
- `sp2`: Ulysses, each rank half of one sequence;
- `+tiled loss`, `+tiled MLP`, `+checkpointing`, `+offload`: cumulative on top of sp2.

A configuration builds its model and engine once (seq_len MAX_SEQ: a bound only) and trains one
warm-up step, so the optimizer states exist: every trial after it is a steady-state training step
(forward, backward, optimizer step) at one seq_len, whose peak resident memory per rank (VmHWM,
reset through /proc/self/clear_refs before the trial; glibc is told to return freed memory at
once: blocks above 64 KiB are unmapped on free, and malloc_trim(0) releases the heap's free pages
before the reset, so a trial does not inherit the previous one's heap; all_reduce(MAX) over the ranks, so both
make the same decisions) is compared with the budget.

The search, per row, finds a length that fits and the next one (+ STEP) that does not:
1. a trial at SHORT_SEQ, a point of the search;
2. a trial at COMMON_SEQ, timed (tokens/s at equal work for every row); the engine's memory model
   (`engine.memory.estimate`, CPU ranks), offset to this measured peak, predicts the longest
   length within the budget (the table's "memory model's longest": a prediction from one run at
   COMMON_SEQ, before any probe). Seeded at COMMON_SEQ rather than SHORT_SEQ because below ~2k
   tokens a rank's per-token tensors (320 tokens x 128 fp32 = 160 KiB, the kv projections 40 KiB)
   straddle glibc's 64 KiB mmap threshold of these workers and partly live in the heap: measured
   (2026-12-06, `--at`), the peak over the model grows by 1-1.8 MiB from 640 to 2,048 tokens in
   every row and by under 0.4 MiB from 2,048 to 8,192, while a STEP is 0.25 MiB of the
   checkpointing row's growth;
3. probes seeded by the model and corrected by the measurements: the next length is where the
   line through the two measured points nearest the boundary (in the model's bytes, so its
   non-linear terms such as the logits chunk keep their shape) crosses the budget, kept inside
   the bracket [longest fit + STEP, shortest over-budget - STEP]; bisection when the same end
   of the bracket moved twice in a row. It stops when the bracket is STEP wide ("memory").
A probe predicted to take longer than MAX_TRIAL_S a step (its time scaled by seq_len^2 from the
longest trial so far: an upper bound, attention being the only quadratic term) is shortened to
what fits that time; when that is no longer than the longest fit, the row stops there ("time",
shown as ">="). Lengths are capped at MAX_SEQ ("max_seq", never reached at the default budget).
Tokens/s (tokens of the whole job per second: dp x seq_len / step, the fastest step, max over
ranks): at COMMON_SEQ (fastest of 1 + COMMON_TIMED steps) and at the row's longest length
(fastest of its probe step and one more; the probe step alone when it takes over TIMED_PROBE_S).

On CPU the "device" is host memory: activation offload moves checkpoints from one part of the
same RAM to another, so it cannot raise the longest length here (it does on a GPU); its row is
timed at COMMON_SEQ only, to show that it runs and what the copies cost.

Prints a table and writes it with tests/bench/report.py (section `longctx` of
docs/benchmarks.md). Runtime about 15 minutes on the 2-core machine (the checkpointing row's
probes near 20k tokens, about a minute a step, dominate it: attention on CPU costs seq_len^2).
"""

from __future__ import annotations

import argparse
import ctypes
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
BASE = {"precision": "fp32", "micro_batch": 1, "zero_stage": 1, "optimizer": {"lr": 1e-3}, "compile": False,
        "cpu_allocator": "system"}
"""cpu_allocator system: the workers' MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ (below) make
freed memory leave the process at once; the engine's default (reuse, engine/cpu_alloc.py) would
override them and keep every trial at the heap's high-water mark."""
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


def _engine_config(name: str) -> dict:
    """BASE and the row's switches (BASE says compile: false, the engine's default, explicitly)."""
    return {**BASE, **dict(CONFIGS)[name]}


ONLY_AT_COMMON = {"sp2 +tiled +checkpointing +offload"}
"""Rows timed once at COMMON_SEQ instead of searched (offload cannot change the longest length on
CPU, see above; searching it would only double the runtime). Compare with the row above."""
BUDGET_GIB = 0.54
"""Peak resident memory per rank, one number for every row. About 0.46 GiB of it is fixed (torch,
gloo, model and optimizer states: measured 0.45-0.47 GiB at 256 tokens); the rest, ~80 MiB, is what
the rows' activations may use: small enough that the longest row stays near 10k tokens (a CPU step
there takes ~5-10 s). The budget was 0.62 GiB until 2026-12-05, when the fixed part measured
0.55 GiB (torch._dynamo was counted in it then; what changed was not isolated)."""
STEP = 128
"""Granularity of the search (a multiple of sp): a row is memory-bound when L fits and L + STEP
does not."""
SHORT_SEQ = 5 * STEP
"""The first trial of a row: fits every row's budget (the sp1 row's longest length is near it)."""
WARMUP_SEQ = 2048
"""The warm-up step's length (it creates the optimizer states). It also takes the process through
a long step once, so every trial of a row has the same history: measured, a process's peak at
one length is up to ~8 MiB higher after other lengths ran before it (the CPU kernels' buffers
and caches, not isolated). With the warm-up at 128 (until 2026-12-06) the seed trial alone ran
without that history, and the ~3.5 MiB that every later trial carried put the rows whose peak
grows slowly with length (tiled MLP, checkpointing: 2-11 KiB per token) 384-768 tokens short of
the model's prediction."""
MAX_SEQ = 32 * 1024
MAX_TRIAL_S = 100.0
"""No probe predicted (seq_len^2 from the longest trial so far) to take longer than this a step
(30 s until 2026-12-06 left the checkpointing row time-bound near 17.7k tokens, its memory bound
unmeasured)."""
TIMED_PROBE_S = 15.0
"""A probe predicted to take longer than this a step is not timed a second time (its one step
gives the tokens/s): the checkpointing row's probes near 20k+ tokens take a minute each."""
MAX_PROBES = 12
"""Probes after the short and common trials (the search needs 3-6; a guard against a loop)."""
COMMON_SEQ = 2048
"""Every configuration is also timed at this length, so tokens/s compare at equal work (without
regard to the budget: the rows shorter than this run it above the budget)."""
COMMON_TIMED = 5


# Worker ----------------------------------------------------------------------------------------


def _peak_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_peak() -> None:
    """Return the heap's free pages to the OS, then reset VmHWM to the resident set that is left.

    MALLOC_TRIM_THRESHOLD_=0 (the workers' environment) trims only the top of the heap; a free
    block below a live one stays resident, so without malloc_trim a trial would start from the
    previous trials' holes (measured: +4 MB at 256 tokens after a 4,736-token trial) and a long
    trial's resident peak would carry more of them than the trial that seeds the model."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


class Session:
    """One configuration's model and engine on this rank, trained at any seq_len <= MAX_SEQ."""

    def __init__(self, name: str) -> None:
        import torch

        from dsl.engine import initialize
        from dsl.engine.model import Llama
        from dsl.engine.train_config import ModelConfig

        self.cfg = ModelConfig(**MODEL, seq_len=MAX_SEQ)
        torch.manual_seed(0)
        self.model = Llama(self.cfg)
        self.engine = initialize(self.model, _engine_config(name))
        self.groups = self.engine.groups

    def _step(self, tokens, targets, positions) -> float:
        start = time.perf_counter()
        loss = self.engine(tokens, targets, positions=positions)
        loss.backward()
        self.engine.step()
        self.engine.zero_grad()
        return time.perf_counter() - start

    def trial(self, seq: int, timed: int = 0, budget: int | None = None) -> dict:
        """One step at `seq`: its peak resident memory (max over ranks) and time (max over ranks);
        then `timed` more steps (only if the peak is within `budget`, when given); step_s is the
        fastest step (robust to other load)."""
        import torch
        import torch.distributed as tdist

        g = self.groups
        shard = seq // g.sp
        gen = torch.Generator().manual_seed(g.dp_rank)
        seqs = torch.randint(self.cfg.vocab_size, (1, seq + 1), generator=gen)
        lo = g.sp_rank * shard
        tokens, targets = seqs[:, lo:lo + shard], seqs[:, lo + 1:lo + shard + 1]
        positions = torch.arange(lo, lo + shard)
        gc.collect()
        _reset_peak()
        first = self._step(tokens, targets, positions)
        stats = torch.tensor([_peak_bytes(), first], dtype=torch.float64)
        tdist.all_reduce(stats, op=tdist.ReduceOp.MAX)
        peak, first = int(stats[0]), float(stats[1])
        times = [first]
        if timed and (budget is None or peak <= budget):
            t = torch.tensor([min(self._step(tokens, targets, positions) for _ in range(timed))],
                             dtype=torch.float64)
            tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
            times.append(float(t))
        step_s = min(times)
        return {"seq": seq, "peak_bytes": peak, "first_step_s": first, "step_s": step_s,
                "tokens_per_s": g.dp * seq / step_s, "dp": g.dp}

    def close(self) -> None:
        self.engine.close()


def _log_trial(log, r: dict, budget: int | None, note: str = "") -> None:
    mark = "" if budget is None else ("  fits" if r["peak_bytes"] <= budget else "  over")
    log(f"  seq {r['seq']:>6}: peak {r['peak_bytes'] / 2**20:7.1f} MiB{mark}, step {r['first_step_s']:.2f} s"
        f" (fastest {r['step_s']:.2f} s){note}")


def _next_probe(name: str, budget: int, trials: list[dict], lo: dict | None, hi: dict | None) -> int:
    """Where the measured peaks, interpolated in the memory model's bytes, cross the budget."""
    if lo is not None and hi is not None:
        a, b = lo, hi
    else:
        by_seq = {t["seq"]: t for t in trials}
        pts = [by_seq[s] for s in sorted(by_seq)]
        a, b = (pts[-2], pts[-1]) if len(pts) > 1 else (pts[-1], pts[-1])
    dm = b["model_bytes"] - a["model_bytes"]
    k = (b["peak_bytes"] - a["peak_bytes"]) / dm if dm else 1.0
    k = 1.0 if k <= 0 else min(max(k, 0.25), 4.0)  # noise can make two close points disagree

    def fits(seq: int) -> bool:
        return b["peak_bytes"] + k * (_predicted_bytes(name, seq) - b["model_bytes"]) <= budget

    lo_n, hi_n = 0, MAX_SEQ // STEP + 1
    while lo_n < hi_n:  # the longest multiple of STEP predicted to fit
        mid = (lo_n + hi_n + 1) // 2
        if fits(mid * STEP):
            lo_n = mid
        else:
            hi_n = mid - 1
    return lo_n * STEP


def _search(session: Session, name: str, budget: int, log) -> dict:
    """Longest seq_len (multiple of STEP) whose steady-state step peaks within `budget` bytes per
    rank, with the next length measured over it (module docstring)."""
    trials: list[dict] = []
    lo: dict | None = None  # longest length that fits
    hi: dict | None = None  # shortest length over the budget

    def run(seq: int, timed: int, note: str = "") -> dict:
        nonlocal lo, hi
        r = session.trial(seq, timed=timed, budget=budget)
        r["model_bytes"] = _predicted_bytes(name, seq)
        trials.append(r)
        _log_trial(log, r, budget, note)
        if r["peak_bytes"] <= budget:
            if lo is None or seq > lo["seq"]:
                lo = r
        elif hi is None or seq < hi["seq"]:
            hi = r
        return r

    run(SHORT_SEQ, timed=1, note="  (short)")
    common = run(COMMON_SEQ, timed=COMMON_TIMED, note="  (common length, timed; seeds the memory model)")
    predicted = _predicted_longest(name, budget, common)
    log(f"  memory model: longest {predicted:,} within the budget")
    moved: list[str] = []
    bound = ""
    probes = 0
    while True:
        floor = lo["seq"] if lo is not None else 0
        if hi is not None and hi["seq"] - floor <= STEP:
            bound = "memory"
            break
        if lo is not None and lo["seq"] >= MAX_SEQ:
            bound = f"max_seq {MAX_SEQ:,}"
            break
        if probes >= MAX_PROBES:
            bound = f"{MAX_PROBES} probes"
            break
        ceiling = hi["seq"] if hi is not None else MAX_SEQ + STEP
        if hi is not None and lo is not None and len(moved) >= 2 and moved[-1] == moved[-2]:
            target, how = (floor + ceiling) // 2 // STEP * STEP, "bisect"
        else:
            target, how = _next_probe(name, budget, trials, lo, hi), "model"
        target = min(max(target, floor + STEP), ceiling - STEP)
        longest = max(trials, key=lambda t: t["seq"])
        if target > longest["seq"]:
            allowed = int(longest["seq"] * (MAX_TRIAL_S / longest["first_step_s"]) ** 0.5) // STEP * STEP
            if allowed < target:
                if allowed <= floor:
                    bound = "time"
                    log(f"  next length {floor + STEP:,} would take over {MAX_TRIAL_S:g} s a step: stop")
                    break
                target, how = allowed, "time-capped"
        probes += 1
        expect_s = longest["first_step_s"] * (target / longest["seq"]) ** 2
        r = run(target, timed=1 if expect_s <= TIMED_PROBE_S else 0, note=f"  ({how})")
        moved.append("lo" if r["peak_bytes"] <= budget else "hi")
    result = {"bound": bound, "trials": trials, "predicted": predicted, "probes": probes,
              "common_tokens_per_s": common["tokens_per_s"], "common_step_s": common["step_s"],
              "common_peak_bytes": common["peak_bytes"],
              "over": None if hi is None else {"seq": hi["seq"], "peak_bytes": hi["peak_bytes"]}}
    if lo is None:
        return {**result, "seq": 0}
    return {**result, **{k: lo[k] for k in ("seq", "peak_bytes", "step_s", "tokens_per_s", "first_step_s")}}


def worker(rank: int, out: str, budget: int, name: str, fixed: list[int]) -> None:
    """One configuration on this rank: search its longest length, or time the lengths `fixed`."""
    import torch
    import torch.distributed as tdist

    # torch.utils.checkpoint imports torch._dynamo on first use (~0.17 GiB resident, a few s): import
    # it in every configuration, so each row's baseline is the same process.
    import torch._dynamo  # noqa: F401

    torch.set_num_threads(1)
    tdist.init_process_group("gloo")
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if rank == 0 else (lambda msg: None)
    log(f"{name}:")
    session = Session(name)
    session.trial(WARMUP_SEQ)  # creates the optimizer states: every later trial is a steady step
    if fixed:
        rows = []
        for seq in fixed:
            r = session.trial(seq, timed=COMMON_TIMED)
            r["model_bytes"] = _predicted_bytes(name, seq)
            _log_trial(log, r, None)
            rows.append(r)
        result = {"fixed": rows}
    else:
        result = _search(session, name, budget, log)
    session.close()
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    tdist.barrier()
    tdist.destroy_process_group()


# Driver ----------------------------------------------------------------------------------------


def _predicted_bytes(name: str, seq: int) -> int:
    from dsl.engine.config import EngineConfig
    from dsl.engine.memory import estimate
    from dsl.engine.train_config import ModelConfig

    engine = EngineConfig(**_engine_config(name))
    sp = engine.sequence_parallel
    b = estimate(ModelConfig(**MODEL, seq_len=seq), engine, dp=2 // sp, sp=sp, accelerator=False)
    return b.device_bytes


def _predicted_longest(name: str, budget: int, base: dict) -> int:
    """The longest multiple of STEP that fits `budget` per rank by the memory model's growth over
    the measured peak of trial `base` (the model's fixed runtime term is a rough 0.4 GiB; its
    per-token terms are what it predicts), up to 1M."""
    offset = base["peak_bytes"] - _predicted_bytes(name, base["seq"])
    lo, hi = 0, (1 << 20) // STEP
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _predicted_bytes(name, mid * STEP) + offset <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo * STEP


def run(budget_gib: float, names: list[str], tmp: Path, at: list[int] | None = None) -> dict:
    """Each configuration in a fresh pair of ranks, so no row inherits another's heap."""
    results: dict[str, dict] = {}
    for name, _ in CONFIGS:
        if name not in names:
            continue
        fixed = at or ([COMMON_SEQ] if name in ONLY_AT_COMMON else [])
        results[name] = _run_config(name, budget_gib, fixed, tmp / f"{len(results)}.json")
    return results


def _run_config(name: str, budget_gib: float, fixed: list[int], out: Path) -> dict:
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
                                       str(int(budget_gib * 2**30)), name,
                                       ",".join(map(str, fixed)) or "-"], env=env))
    codes = [p.wait(timeout=900) for p in procs]
    if any(codes):
        raise SystemExit(f"longctx: {name}: ranks exited {codes}")
    return json.loads(out.read_text())


def _mib(b: int) -> str:
    return f"{b / 2**20:,.1f} MiB"


def table(results: dict, budget_gib: float) -> str:
    budget = int(budget_gib * 2**30)
    base = results.get("sp1", {}).get("seq") or None
    lines = [
        f"Longest seq_len whose training step peaks within {budget_gib:g} GiB ({_mib(budget)}) resident memory "
        f"per rank, 2 ranks (gloo, 1 thread each), fp32, ZeRO-1, AdamW, micro-batch 1, eager; model: hidden "
        f"{MODEL['hidden_size']}, {MODEL['num_hidden_layers']} layers, {MODEL['num_attention_heads']} heads / "
        f"{MODEL['num_key_value_heads']} kv heads, vocab {MODEL['vocab_size']:,}; tiles of {CHUNK_TOKENS:,} tokens. "
        f"Search: granularity {STEP:,}; a trial at {SHORT_SEQ:,} and one at {COMMON_SEQ:,}, then probes where "
        f"the memory model, fitted to the measured peaks, crosses the budget (module docstring).",
        "",
        f"| configuration | longest seq_len | vs sp1 | peak RSS/rank there | next length: peak | memory model's "
        f"longest | measured / model | tokens/s there | step s | tokens/s at {COMMON_SEQ:,} | trials | bound by |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, _ in CONFIGS:
        r = results.get(name)
        if r is None:
            continue
        if name in ONLY_AT_COMMON:
            f = r["fixed"][0]
            lines.append(f"| {name} | | | {_mib(f['peak_bytes'])} at {f['seq']:,} | | | | | {f['step_s']:.2f} | "
                         f"{f['tokens_per_s']:,.0f} | 1 | timed at {f['seq']:,} only |")
            continue
        pred = r["predicted"]
        over = r["over"]
        nxt = f"{over['seq']:,}: {_mib(over['peak_bytes'])}" if over and r["bound"] == "memory" else ""
        common = f"{r['common_tokens_per_s']:,.0f}"
        trials = len(r["trials"])
        if not r["seq"]:
            lines.append(f"| {name} | < {SHORT_SEQ:,} | | | {nxt} | {pred:,} | | | | {common} | {trials} "
                         f"| {r['bound']} |")
            continue
        ratio = f"{r['seq'] / base:.1f}x" if base else ""
        seq = f"{r['seq']:,}" if r["bound"] == "memory" else f">= {r['seq']:,}"
        vs_model = f"{r['seq'] / pred:.2f}" if pred else ""
        lines.append(f"| {name} | {seq} | {ratio} | {_mib(r['peak_bytes'])} | {nxt} | {pred:,} | {vs_model} | "
                     f"{r['tokens_per_s']:,.0f} | {r['step_s']:.2f} | {common} | {trials} | {r['bound']} |")
    lines += ["", "bound by: memory = the longest length shown fits and the next length (+ "
              f"{STEP:,}, measured, \"next length\") exceeds the budget; time = the next length would take over "
              f"{MAX_TRIAL_S:g} s a step (predicted by seq_len^2 from the longest trial) while still within the budget, "
              "so the longest length is at least the one shown. Peaks are of a steady-state step (the optimizer states "
              f"exist: a warm-up step at {WARMUP_SEQ:,} tokens precedes every trial, so all of a row's trials share its "
              "history), VmHWM per rank, max of the 2 ranks. memory model's longest: "
              "the longest length within the budget by `engine.memory.estimate` (CPU ranks: model states, saved "
              "activations, logits, recomputation peak, buffers), offset to the measured peak at "
              f"{COMMON_SEQ:,} tokens, before any probe (module docstring); measured / model: the found length over that "
              "prediction. The search itself moves from the model's prediction by the measured peaks (trials: "
              f"all of the row's trials, the {SHORT_SEQ:,} and {COMMON_SEQ:,} ones included). tokens/s: tokens of the "
              f"whole job per second (dp x seq_len per step), fastest step; at {COMMON_SEQ:,} every row does the same "
              "work (rows whose longest length is shorter run it above the budget). On CPU, activation offload "
              "copies within the same RAM: no gain here by design (on a GPU the checkpoints leave the device); "
              "its row is only timed at the common length, against the row above it. Timings share the 2 cores with "
              "other work on this machine (load average under the table; above 2 the cores are oversubscribed): "
              "under load tokens/s vary up to 2-3x between rows and runs, so only a quiet run's tokens/s compare; "
              "the lengths do not depend on load, but a row whose next length peaks within ~0.5 MiB of the budget "
              f"(RSS varies that much between runs) can come out one step ({STEP:,}) shorter or longer in another run."]
    return "\n".join(lines)


def at_table(results: dict) -> str:
    lines = ["| configuration | seq_len | peak RSS/rank | memory model | measured - model | step s |",
             "|---|---|---|---|---|---|"]
    for name, r in results.items():
        for f in r["fixed"]:
            lines.append(f"| {name} | {f['seq']:,} | {_mib(f['peak_bytes'])} | {_mib(f['model_bytes'])} | "
                         f"{_mib(f['peak_bytes'] - f['model_bytes'])} | {f['step_s']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        fixed = [] if sys.argv[6] == "-" else [int(s) for s in sys.argv[6].split(",")]
        worker(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5], fixed)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-gib", type=float, default=BUDGET_GIB, help="peak resident memory per rank")
    parser.add_argument("--configs", default=",".join(n for n, _ in CONFIGS), help="comma-separated names")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    parser.add_argument("--at", default="", help="comma-separated lengths: only measure the peaks there (no write)")
    args = parser.parse_args()
    import tempfile

    names = args.configs.split(",")
    unknown = set(names) - {n for n, _ in CONFIGS}
    if unknown:
        raise SystemExit(f"longctx: unknown configurations {sorted(unknown)}")
    start, load_start = time.perf_counter(), os.getloadavg()[0]
    at = [int(s) for s in args.at.split(",")] if args.at else None
    with tempfile.TemporaryDirectory() as tmp:
        results = run(args.budget_gib, names, Path(tmp), at)
    if at:
        print(at_table(results) + f"\n\nRuntime {time.perf_counter() - start:.0f} s.")
        return
    body = table(results, args.budget_gib) + (f"\n\nRuntime {time.perf_counter() - start:.0f} s; load average "
                                              f"(1 min) {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end.")
    print(body)
    if not args.no_write:
        sys.path.insert(0, str(ROOT))
        from tests.bench.report import write_section  # noqa: E402

        write_section("longctx", "Long context: longest sequence within a memory budget (2 ranks)",
                      "make bench  (python tests/bench/longctx.py)", body)


if __name__ == "__main__":
    main()
