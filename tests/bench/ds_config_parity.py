"""DeepSpeed configs run under DeepSpeed 0.19.8 and under dsl: the same losses and lr, step by step.

    make bench BENCH=ds_config_parity                 # or: python tests/bench/ds_config_parity.py
                                                      # (ranks in .venv-bench: setup_deepspeed.sh)
    torchrun --nproc-per-node 2 tests/bench/ds_config_parity.py --rank-run --impl dsl|deepspeed --config NAME

For each collected config in CONFIGS (tests/fixtures/deepspeed_configs; ZeRO 1, 2 and 3, CPU
offload of the optimizer and of the parameters, WarmupLR / WarmupDecayLR / WarmupCosineLR), two
torchrun jobs of 2 gloo ranks train dsl's tiny Llama from the same seed on the same tokens for 20
steps in fp32:

- dsl: `dsl.engine.initialize(model, {"deepspeed_config": path, **SPEC}, total_steps=20)`, the
  Python entry point a DeepSpeed script switches to (SPEC plays the spec: the settings the
  config's `"auto"` values take);
- DeepSpeed: `deepspeed.initialize(model=..., model_parameters=..., config=filled)`, where `filled`
  is the same file with every `"auto"` replaced the way Hugging Face's Trainer replaces it
  (`hf_fill`, from the same settings: lr, betas, eps, weight decay, clipping, micro batch,
  accumulation, warm-up, total steps, hidden-size buckets), and, without optimizer offload,
  `torch_adam: true` (DeepSpeed's FusedAdam needs CUDA; torch's AdamW is the same update).

Each rank prints, for every step, its loss and the lr the update ran with (DeepSpeed: the lr in
the optimizer before `engine.step()`; dsl: `engine.lr` after it). The comparison passes when every
loss agrees within 1e-4 and every lr within 1e-12 (relative); the table goes to
docs/benchmarks.md. Weight decay: dsl decays matrices and embeddings, DeepSpeed every parameter it
is passed; the `auto` configs take weight decay 0 from the spec, and the one config that sets it
(3e-7) moves the norms' gains by 1 - lr x 3e-7 per step, far below fp32 resolution in 20 steps.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "deepspeed_configs"
STEPS, MICRO, WORLD = 20, 2, 2
CONFIGS = {
    "axolotl_zero1": "ZeRO 1, AdamW (auto), constant lr",
    "qwen_finetune_zero2": "ZeRO 2, AdamW, WarmupLR (log warm-up)",
    "ms-swift_zero2": "ZeRO 2, AdamW, WarmupCosineLR",
    "hf-transformers_zero2": "ZeRO 2, optimizer offload to CPU, WarmupLR",
    "trl_stack_llama": "ZeRO 3, WarmupLR",
    "stanford-alpaca_offload_opt_param": "ZeRO 3, optimizer and parameter offload to CPU, WarmupDecayLR",
    "dsexamples_qanet_warmup": "ZeRO 0, no auto: Adam with its own betas and weight decay 3e-7, WarmupLR, "
                               "train_batch_size 32 = micro 16 derived on 2 ranks",
}
SPEC = {"micro_batch": MICRO, "grad_accum": 1, "grad_clip": 1.0, "optimizer": {"lr": 2e-3},
        "scheduler": {"warmup_steps": 6}}
"""What the configs' `auto` values take (the spec's part); explicit, so both sides see the same numbers.
The scheduler entry only for a config with a scheduler section (without one DeepSpeed keeps the lr
constant; a spec's warmup_steps there would be dsl's own warm-up, which the spec may ask for)."""


def spec_for(ds: dict) -> dict:
    if "auto" not in json.dumps(ds):
        return {}  # the file decides everything
    return SPEC if "scheduler" in ds else {k: v for k, v in SPEC.items() if k != "scheduler"}


def hf_fill(ds: dict, engine, dp: int, steps: int, hidden: int) -> dict:
    """`ds` with every "auto" Hugging Face's Trainer fills replaced as it replaces it
    (transformers' integrations/deepspeed.py), from the engine settings dsl resolved."""
    out = copy.deepcopy(ds)

    def fill(path: str, value) -> None:
        node = out
        *parents, last = path.split(".")
        for part in parents:
            node = node.get(part)
            if not isinstance(node, dict):
                return
        if node.get(last) == "auto":
            node[last] = value

    opt = engine.optimizer
    fill("train_micro_batch_size_per_gpu", engine.micro_batch)
    fill("gradient_accumulation_steps", engine.grad_accum)
    fill("train_batch_size", engine.micro_batch * engine.grad_accum * dp)
    fill("gradient_clipping", engine.grad_clip or 0.0)
    fill("optimizer.params.lr", opt.lr)
    fill("optimizer.params.betas", list(opt.betas))
    fill("optimizer.params.eps", opt.eps)
    fill("optimizer.params.weight_decay", opt.weight_decay)
    fill("scheduler.params.warmup_min_lr", 0)
    fill("scheduler.params.warmup_max_lr", opt.lr)
    fill("fp16.enabled", engine.precision == "fp16")
    fill("bf16.enabled", engine.precision == "bf16")
    fill("bfloat16.enabled", engine.precision == "bf16")
    fill("zero_optimization.reduce_bucket_size", hidden * hidden)
    fill("zero_optimization.stage3_prefetch_bucket_size", int(0.9 * hidden * hidden))
    fill("zero_optimization.stage3_param_persistence_threshold", 10 * hidden)
    fill("scheduler.params.total_num_steps", steps)
    fill("scheduler.params.warmup_num_steps", engine.scheduler.warmup_steps)
    return out


def rank_run(impl: str, name: str) -> int:
    import torch
    import torch.distributed as dist

    from dsl.engine import dist as dsl_dist
    from dsl.engine import initialize
    from dsl.engine.model import Llama
    from dsl.engine.presets import PRESETS
    from dsl.engine.train_config import ModelConfig

    ctx = dsl_dist.setup()
    rank = dist.get_rank()
    cfg = ModelConfig(**PRESETS["tiny"])
    torch.manual_seed(0)
    model = Llama(cfg)
    path = FIXTURES / f"{name}.json"
    # dsl's resolution of the file (what `auto` became) is also what the DeepSpeed side is filled from.
    spec = spec_for(json.loads(path.read_text()))
    from dsl.engine.config import EngineConfig
    from dsl.engine.dsconfig import Context, resolve

    merged, _ = resolve(str(path), Context(explicit=spec, steps=STEPS, hidden_size=cfg.hidden_size,
                                           dp=dist.get_world_size()))
    resolved = EngineConfig.model_validate(merged)
    micro = resolved.micro_batch
    assert resolved.grad_accum == 1, "the loop below runs one micro-batch per step"
    if impl == "dsl":
        engine = initialize(model, {"deepspeed_config": str(path), **spec}, total_steps=STEPS)

        def step(tokens, targets):
            loss = engine(tokens, targets)
            loss.backward()
            engine.step()
            lr = engine.lr
            engine.zero_grad()
            return loss, lr
    else:
        import deepspeed

        filled = hf_fill(json.loads(path.read_text()), resolved, dist.get_world_size(), STEPS, cfg.hidden_size)
        offload = (filled.get("zero_optimization", {}).get("offload_optimizer") or {}).get("device", "none")
        if offload == "none" and isinstance(filled.get("optimizer"), dict):
            filled["optimizer"].setdefault("params", {})["torch_adam"] = True
        if "optimizer" not in filled:  # the script's optimizer: what dsl's engine.optimizer is
            filled["optimizer"] = {"type": "AdamW", "params": {"lr": SPEC["optimizer"]["lr"], "torch_adam": offload == "none"}}
        filled.setdefault("steps_per_print", 10**9)
        ds_engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=filled)

        def step(tokens, targets):
            lr = ds_engine.get_lr()[0]
            loss = ds_engine(tokens, targets)
            ds_engine.backward(loss)
            ds_engine.step()
            return loss, lr
    gen = torch.Generator().manual_seed(1000 + rank)
    rows = []
    for _ in range(STEPS):
        tokens = torch.randint(0, cfg.vocab_size, (micro, cfg.seq_len + 1), generator=gen)
        loss, lr = step(tokens[:, :-1], tokens[:, 1:])
        rows.append((float(loss), float(lr)))
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, rows)
    if rank == 0:
        print("PARITY " + json.dumps({"impl": impl, "config": name, "ranks": everyone}), flush=True)
    dsl_dist.teardown(ctx)
    return 0


def run(impl: str, name: str, python: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}",
                           __file__, "--rank-run", "--impl", impl, "--config", name],
                          capture_output=True, text=True, env=env, timeout=1800, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("PARITY "):
            return json.loads(line[len("PARITY "):])
    raise RuntimeError(f"{impl} {name} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank-run", action="store_true")
    parser.add_argument("--impl", choices=["dsl", "deepspeed"])
    parser.add_argument("--config", choices=sorted(CONFIGS))
    parser.add_argument("--python", default=str(ROOT / ".venv-bench/bin/python"))
    parser.add_argument("--only", nargs="*", default=None, help="run these configs only")
    args = parser.parse_args()
    if args.rank_run:
        return rank_run(args.impl, args.config)
    ok = True
    lines = ["| config | what | steps | max loss diff | max lr diff (rel) | parity |", "|---|---|---|---|---|---|"]
    for name, what in CONFIGS.items():
        if args.only and name not in args.only:
            continue
        dsl, ds = run("dsl", name, args.python), run("deepspeed", name, args.python)
        loss_diff = max(abs(a[0] - b[0]) for ra, rb in zip(dsl["ranks"], ds["ranks"]) for a, b in zip(ra, rb))
        lr_diff = max(abs(a[1] - b[1]) / max(abs(b[1]), 1e-30) if a[1] != b[1] else 0.0
                      for ra, rb in zip(dsl["ranks"], ds["ranks"]) for a, b in zip(ra, rb))
        good = loss_diff <= 1e-4 and lr_diff <= 1e-12
        ok &= good
        lines.append(f"| {name} | {what} | {STEPS} | {loss_diff:.2e} | {lr_diff:.1e} | {'yes' if good else 'NO'} |")
        print(lines[-1], flush=True)
        if not good:
            for step, (a, b) in enumerate(zip(dsl["ranks"][0], ds["ranks"][0]), 1):
                print(f"    step {step}: dsl loss {a[0]:.6f} lr {a[1]:.6g} | deepspeed loss {b[0]:.6f} lr {b[1]:.6g}")
    print("\n".join(lines))
    if not args.only:
        from report import write_section

        body = (f"{len(CONFIGS)} collected DeepSpeed configs (tests/fixtures/deepspeed_configs), 2 gloo ranks, dsl's "
                f"tiny Llama from the same seed on the same tokens, {STEPS} steps, fp32: `dsl.engine.initialize(model, "
                "{'deepspeed_config': path})` against DeepSpeed 0.19.8's `deepspeed.initialize` with the file's "
                "`auto` values filled as Hugging Face's Trainer fills them. Pass: every loss within 1e-4, every lr "
                "within 1e-12 (relative).\n\n" + "\n".join(lines) + "\n")
        write_section("ds_config_parity", "DeepSpeed configs: dsl vs DeepSpeed 0.19.8, step by step",
                      "make bench BENCH=ds_config_parity  (python tests/bench/ds_config_parity.py)", body)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
