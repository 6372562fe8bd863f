"""A DeepSpeed 0.19.8 run that saves a ZeRO checkpoint, for tests/integration/test_ds_import.py.

Run with the DeepSpeed virtualenv (tests/bench/setup_deepspeed.sh) under torchrun:

    .venv-bench/bin/python -m torch.distributed.run --standalone --nproc_per_node 2 \\
        tests/integration/ds_checkpoint_worker.py MODEL_DIR STAGE OUT_DIR [fp32|bf16 [FROZEN_PARAM]]

It trains the Hugging Face model of MODEL_DIR (config.json; weights drawn after
`torch.manual_seed(0)`, as engine/hf_model.py draws them) with `deepspeed.initialize`, fp32 (or bf16),
AdamW (torch's) in two parameter groups as dsl's optimizer splits them (weight decay on matrices
and embeddings only, engine/optim.py), on dsl's synthetic data laid out as dsl lays it out
(engine/data.py: rank r reads the r-th micro-batch of each global batch), and the loss dsl
computes (mean cross entropy over the next-token targets). It saves a checkpoint after step
SAVE_AT and goes on to STEPS without stopping; rank 0 writes OUT_DIR/losses.json with the global
mean loss of every step (DeepSpeed's own continuation after the save). FROZEN_PARAM names a
parameter left out of training (requires_grad False).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

SAVE_AT, STEPS = 10, 13
MICRO, SEQ, LR, WEIGHT_DECAY = 2, 16, 0.01, 0.1


def config(stage: int, precision: str = "fp32") -> dict:
    bf16 = {"bf16": {"enabled": True}} if precision == "bf16" else {}
    return {**bf16, "train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": stage}, "gradient_clipping": 0.0,
            "optimizer": {"type": "AdamW", "params": {"lr": LR, "betas": [0.9, 0.999], "eps": 1e-8,
                                                       "weight_decay": WEIGHT_DECAY, "torch_adam": True}},
            "steps_per_print": 10 ** 9, "wall_clock_breakdown": False}


def main(model_dir: str, stage: int, out: str, precision: str = "fp32", frozen: str = "") -> None:
    import deepspeed
    import torch
    import torch.distributed as tdist
    import torch.nn.functional as F
    from transformers import AutoConfig, AutoModelForCausalLM

    from dsl.engine.data import SyntheticData
    from dsl.engine.train_config import DataConfig

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = tdist.get_rank(), tdist.get_world_size()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=torch.float32)
    model.train()
    if frozen:
        model.get_parameter(frozen).requires_grad_(False)
    decay = [p for p in model.parameters() if p.dim() >= 2 and p.requires_grad]
    other = [p for p in model.parameters() if p.dim() < 2 and p.requires_grad]
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": other, "weight_decay": 0.0}]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=config(stage, precision))
    data = SyntheticData(DataConfig(), vocab_size=model.config.vocab_size, seq_len=SEQ, micro_batch=MICRO,
                         rank=rank, dp_size=world)
    losses = []
    for step in range(1, STEPS + 1):
        tokens, targets = data.batch(step)
        logits = engine(input_ids=tokens, use_cache=False).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        engine.backward(loss)
        engine.step()
        mean = loss.detach().clone()
        tdist.all_reduce(mean)
        losses.append(float(mean) / world)
        if step == SAVE_AT:
            engine.save_checkpoint(out)
    if rank == 0:
        Path(out, "losses.json").write_text(json.dumps(losses))
    tdist.barrier()
    tdist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(*sys.argv[1:2], int(sys.argv[2]), *sys.argv[3:6])
