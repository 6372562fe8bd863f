"""`make bench BENCH=hf_engine`: a Hugging Face Llama trained by dsl and by DeepSpeed 0.19.8, paired.

The model: a `LlamaForCausalLM` config.json this script writes (vocab 16384, hidden 512, 6 layers,
8 heads, SwiGLU 1408, untied output; 36.0M parameters), seq 128, micro-batch 2 per rank, 2 gloo
ranks with one thread each, AdamW (lr 1e-3, no clipping), eager. dsl trains it as
`run.train.model: {hf: DIR}` does (engine/hf_model.py `build`, then `dsl.engine.initialize`);
DeepSpeed trains the same transformers model, built from the same config after the same seed,
with `deepspeed.initialize` (in its own virtualenv, tests/bench/setup_deepspeed.sh; bf16: its
`bf16.enabled`). Both compute the same loss: cross entropy over the fp32 logits.

Rows: ZeRO stages 2 and 3, fp32 and bf16. Each row is one paired run (tests/bench/run.py's method,
with tests/bench/engine_step.py's `Baton`): the two engines start together and take turns step by
step, so their k-th steps run seconds apart and this machine's drift cancels in the per-step
ratio; dsl/DS is the median over k of DS's k-th step time / dsl's k-th, with its interquartile
range.

    python tests/bench/hf_engine.py [--steps 20 --warmup 3 --stages 2,3 --precisions fp32,bf16]
    # one rank pair by hand (what the orchestrator starts under torchrun):
    torchrun --nproc-per-node 2 tests/bench/hf_engine.py --worker --impl dsl --stage 2 --model DIR
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
ROOT = HERE.parents[2]

CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 16384, "hidden_size": 512,
          "intermediate_size": 1408, "num_hidden_layers": 6, "num_attention_heads": 8, "num_key_value_heads": 8,
          "max_position_embeddings": 512, "tie_word_embeddings": False, "rms_norm_eps": 1e-5}
SEQ, MICRO, LR = 128, 2, 1e-3


# Worker: one engine on the ranks torchrun started ------------------------------------------


def _dsl(args):
    from dsl.engine import hf_model, initialize
    from dsl.engine.train_config import ModelConfig

    model = hf_model.build(ModelConfig(hf=args.model, seq_len=SEQ), seed=0)
    engine = initialize(model, {"zero_stage": args.stage, "precision": args.precision, "micro_batch": MICRO,
                                "grad_clip": None, "optimizer": {"type": "adamw", "lr": LR},
                                "scheduler": {"type": "constant", "warmup_steps": 0}})

    def step(tokens, targets):
        loss = engine(tokens, targets)
        loss.backward()
        engine.step()
        engine.zero_grad()
        return loss

    return step, model.num_params()


def _deepspeed(args):
    import deepspeed
    import torch
    import torch.nn.functional as F
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.model), dtype=torch.float32)
    model.train()
    params = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them
    config = {"train_micro_batch_size_per_gpu": MICRO, "zero_optimization": {"stage": args.stage},
              "gradient_clipping": 0.0, "steps_per_print": 10 ** 9,
              "optimizer": {"type": "AdamW", "params": {"lr": LR, "torch_adam": True}}}
    if args.precision == "bf16":
        config["bf16"] = {"enabled": True}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)

    def step(tokens, targets):
        logits = engine(input_ids=tokens, use_cache=False).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        engine.backward(loss)
        engine.step()
        return loss

    return step, params


def worker(args) -> int:
    import torch
    import torch.distributed as dist

    from engine_step import Baton

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result = {"impl": args.impl, "stage": args.stage, "precision": args.precision}
    baton = Baton(args.baton, args.slot, args.slots, rank)
    step, params = (_dsl if args.impl == "dsl" else _deepspeed)(args)
    result["params"] = params
    gen = torch.Generator().manual_seed(1000 + rank)
    baton.ready()
    times, cpu_times = [], []
    for i in range(args.warmup + args.steps):
        seq = torch.randint(0, CONFIG["vocab_size"], (MICRO, SEQ + 1), generator=gen)
        baton.take()
        profiler = None
        if args.profile and rank == 0 and i == args.warmup:
            from torch.profiler import ProfilerActivity, profile

            profiler = profile(activities=[ProfilerActivity.CPU])
        start, cpu = time.perf_counter(), time.process_time()
        with profiler or contextlib.nullcontext():
            loss = step(seq[:, :-1], seq[:, 1:])
        dist.barrier()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu)
        baton.give()
        if profiler is not None:
            Path(args.profile).write_text(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024])
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    measured = times[args.warmup:]
    result.update(step_s=statistics.median(measured), tokens_per_s=MICRO * SEQ * world / statistics.median(measured),
                  cpu_s=statistics.median(cpu_times[args.warmup:]), peak_rss_bytes=int(peak),
                  final_loss=float(loss), steps_s=[round(t, 4) for t in measured])
    if rank == 0:
        print("BENCH " + json.dumps(result), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0


# Orchestrator: paired runs, the table -------------------------------------------------------


def run_pair(model: Path, stage: int, precision: str, ds_python: str, steps: int, warmup: int,
             timeout: float = 1800) -> list[dict]:
    """dsl and DeepSpeed at (stage, precision), taking turns step by step; one result each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    impls = [(sys.executable, "dsl"), (ds_python, "deepspeed")]
    with tempfile.TemporaryDirectory(prefix="dsl-hf-bench-") as d:
        for i in range(len(impls)):
            os.mkfifo(os.path.join(d, f"baton{i}"))
        procs, outs = [], []
        for i, (python, impl) in enumerate(impls):
            out = open(os.path.join(d, f"out{i}"), "w+")
            argv = [python, "-m", "torch.distributed.run", "--nproc-per-node=2", "--rdzv-backend=c10d",
                    "--rdzv-endpoint=localhost:0", str(HERE), "--worker", "--impl", impl, "--stage", str(stage),
                    "--precision", precision, "--model", str(model), "--steps", str(steps), "--warmup", str(warmup),
                    "--baton", d, "--slot", str(i), "--slots", str(len(impls))]
            procs.append(subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                          start_new_session=True))
            outs.append(out)
        deadline, started, why = time.monotonic() + timeout, False, ""
        while any(p.poll() is None for p in procs):
            if not started and all(os.path.exists(os.path.join(d, f"ready{i}")) for i in range(len(impls))):
                fd = os.open(os.path.join(d, "baton0"), os.O_RDWR)
                os.write(fd, b"x")
                os.close(fd)
                started = True
            dead = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
            if dead or time.monotonic() > deadline:
                why = f"{impls[dead[0]][1]} exited {procs[dead[0]].returncode}" if dead else f"timeout {timeout:.0f}s"
                for p in procs:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(p.pid, signal.SIGKILL)
                break
            time.sleep(0.2)
        results = []
        for out, (_, impl), p in zip(outs, impls, procs):
            p.wait()
            out.seek(0)
            text = out.read()
            out.close()
            line = next((ln for ln in text.splitlines() if ln.startswith("BENCH ")), None)
            results.append(json.loads(line[6:]) if line else
                           {"impl": impl, "stage": stage, "precision": precision,
                            "error": f"{why or 'no result'}: {(text.strip().splitlines() or ['no output'])[-1][:200]}"})
        return results


def cpu_name() -> tuple[str, str]:
    """(lscpu's model name, the CPU's bf16/AMX/AVX-512 flags)."""
    info = Path("/proc/cpuinfo").read_text()
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "unknown")
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    shown = sorted(f for f in flags if "bf16" in f or f.startswith("amx") or f in ("avx512f", "avx2"))
    return model, " ".join(shown)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", action="store_true", help="run one engine (under torchrun)")
    parser.add_argument("--impl", choices=["dsl", "deepspeed"], default="dsl")
    parser.add_argument("--stage", type=int, default=2)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--model", default=None, help="worker: the folder holding config.json")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--profile", default=None, help="worker: a torch.profiler table of one step of rank 0")
    parser.add_argument("--baton", default=None)
    parser.add_argument("--slot", type=int, default=0)
    parser.add_argument("--slots", type=int, default=1)
    parser.add_argument("--stages", default="2,3")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--deepspeed-python", default=str(ROOT / ".venv-bench/bin/python"))
    parser.add_argument("--out", default=str(ROOT / "docs/benchmarks.md"))
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    from report import write_section
    from run import paired

    results = []
    with tempfile.TemporaryDirectory(prefix="dsl-hf-model-") as d:
        model = Path(d)
        (model / "config.json").write_text(json.dumps(CONFIG))
        for precision in args.precisions.split(","):
            for stage in (int(s) for s in args.stages.split(",")):
                pair = run_pair(model, stage, precision, args.deepspeed_python, args.steps, args.warmup)
                for r in pair:
                    print(json.dumps(r), file=sys.stderr, flush=True)
                results.append(pair)
    name, flags = cpu_name()
    lines = ["| precision | ZeRO | dsl tok/s | DeepSpeed tok/s | dsl/DS [IQR] | dsl CPU s/step | DS CPU s/step | "
             "dsl peak GiB | DS peak GiB |", "|---|---|---|---|---|---|---|---|---|"]
    ok = True
    for dsl, ds in results:
        r = paired(dsl, ds)
        ok = ok and r is not None

        def tps(x):
            return f"{x['tokens_per_s']:,.0f}" if "tokens_per_s" in x else f"n/a ({x.get('error', '?')[:80]})"

        def gib(x):
            return f"{x['peak_rss_bytes'] / 2**30:.2f}" if "peak_rss_bytes" in x else "-"

        def cpu(x):
            return f"{x['cpu_s']:.3f}" if "cpu_s" in x else "-"

        ratio = "-" if r is None else f"{r[0]:.2f}x [{r[1]:.2f}-{r[2]:.2f}]"
        lines.append(f"| {dsl['precision']} | {dsl['stage']} | {tps(dsl)} | {tps(ds)} | {ratio} | {cpu(dsl)} | "
                     f"{cpu(ds)} | {gib(dsl)} | {gib(ds)} |")
    params = next((r["params"] for pair in results for r in pair if "params" in r), None)
    table = "\n".join(lines)
    print(table)
    body = (f"CPU: {name} (flags: {flags}); {os.cpu_count()} cores seen. A Hugging Face `LlamaForCausalLM` from "
            f"the config.json this bench writes (vocab 16384, hidden 512, 6 layers, 8 heads, SwiGLU 1408, untied "
            f"output; {params:,} parameters), seq {SEQ}, micro-batch {MICRO} per rank, 2 gloo ranks x 1 thread, "
            f"AdamW lr {LR:g}, no clipping, eager. dsl: `run.train.model: {{hf: DIR}}`'s path (engine/hf_model.py); "
            "DeepSpeed 0.19.8: `deepspeed.initialize` on the same transformers model (bf16: its `bf16.enabled`). "
            f"Each row is one paired run ({args.steps} measured steps each after {args.warmup} warm-up steps, the "
            "two engines taking turns step by step); dsl/DS = median over k of DeepSpeed's k-th step time / "
            "dsl's k-th, [interquartile range]; CPU s/step = rank 0's CPU seconds per step (all its threads); "
            "peak = the largest rank's peak resident memory.\n\n" + table + "\n\nRaw results:\n\n```\n"
            + "\n".join(json.dumps(r) for pair in results for r in pair) + "\n```\n")
    write_section("hf_engine", "Hugging Face Llama (36M): dsl vs DeepSpeed 0.19.8", "make bench BENCH=hf_engine  "
                  "(python tests/bench/hf_engine.py)", body, Path(args.out))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
