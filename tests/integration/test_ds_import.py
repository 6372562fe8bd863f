"""Import from DeepSpeed (engine/ds_import.py): DeepSpeed 0.19.8 itself trains a tiny Hugging Face
Llama on 2 CPU ranks at ZeRO stage 1, 2 or 3 (tests/integration/ds_checkpoint_worker.py, in the
DeepSpeed virtualenv that `make test` sets up: tests/bench/setup_deepspeed.sh), saves after step
10 and goes on to step 13. dsl imports that checkpoint, loads it on 1 rank (grad_accum 2: the
two micro-batches are DeepSpeed's two ranks' batches) at another ZeRO stage, and trains steps
11-13: the losses equal DeepSpeed's own continuation within 1e-5 (fp32). Step 11's loss depends
on the weights alone; steps 12-13 also on the Adam moments and step count, which a weights-only
import (a fresh optimizer) visibly misses.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from dsl.engine.errors import UserError
from tests.hf_tiny import write_model

pytestmark = pytest.mark.integration
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
DS_PYTHON = ROOT / ".venv-bench" / "bin" / "python"
WORKER = Path(__file__).with_name("ds_checkpoint_worker.py")
TOL = 1e-5
SAVE_AT, STEPS = 10, 13

if not DS_PYTHON.exists():
    pytest.skip(f"{DS_PYTHON} is absent: `make test` creates it (tests/bench/setup_deepspeed.sh installs "
                f"DeepSpeed 0.19.8 there)", allow_module_level=True)


class DeepSpeedRuns:
    """DeepSpeed's runs, made once per module and shared by the tests (each costs ~20 s)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.model = write_model(tmp / "m", "llama")
        self._done: dict[tuple[int, str, str], Path] = {}

    def get(self, stage: int, precision: str = "fp32", frozen: str = "") -> Path:
        if (stage, precision, frozen) not in self._done:
            self._done[stage, precision, frozen] = _deepspeed_run(self.tmp, self.model, stage, precision, frozen)
        return self._done[stage, precision, frozen]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> DeepSpeedRuns:
    return DeepSpeedRuns(tmp_path_factory.mktemp("deepspeed"))


def _deepspeed_run(tmp: Path, model: Path, stage: int, precision: str, frozen: str) -> Path:
    out = tmp / f"ds-stage{stage}-{precision}{'-frozen' if frozen else ''}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for attempt in range(2):
        proc = subprocess.run([str(DS_PYTHON), "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                               "2", str(WORKER), str(model), str(stage), str(out), precision, frozen],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        # The reference run, not the code under test: DeepSpeed's process once aborted at exit
        # (SIGABRT, "terminate called without an active exception": a C++ thread left joinable;
        # CI 2026-12-06, passed on rerun). That one signature is run again, once.
        if proc.returncode == 0 or "terminate called without an active exception" not in proc.stderr:
            break
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def _dsl_losses(tmp: Path, model_dir: Path, ds_out: Path, dsl_stage: int, *, optimizer: bool = True,
                precision: str = "fp32", frozen: str = "") -> tuple[list[float], dict]:
    from dsl.engine import hf_model, initialize
    from dsl.engine.data import SyntheticData
    from dsl.engine.ds_import import import_deepspeed
    from dsl.engine.train_config import DataConfig, ModelConfig
    from tests.integration.ds_checkpoint_worker import LR, MICRO, SEQ, WEIGHT_DECAY

    checkpoints = tmp / f"dsl-from-{ds_out.name}-s{dsl_stage}-{optimizer}"
    if frozen:
        checkpoints = checkpoints.with_name(checkpoints.name + "-frozen")
    folder = import_deepspeed(ds_out, checkpoints, optimizer=optimizer)
    assert folder == checkpoints / f"step-{SAVE_AT:06d}"
    # Another seed: every weight the loss sees must come from the checkpoint.
    model = hf_model.build(ModelConfig(hf=str(model_dir), seq_len=SEQ), seed=99)
    if frozen:
        model.lm.get_parameter(frozen).requires_grad_(False)
    engine = initialize(model, {"zero_stage": dsl_stage, "precision": precision, "micro_batch": MICRO, "grad_accum": 2, "grad_clip": None,
                                "optimizer": {"lr": LR, "weight_decay": WEIGHT_DECAY},
                                "scheduler": {"type": "constant", "warmup_steps": 0}})
    extra = engine.load_checkpoint(checkpoints)
    ranks = [SyntheticData(DataConfig(), vocab_size=128, seq_len=SEQ, micro_batch=MICRO, rank=r, dp_size=2,
                           resume_step=extra["step"], resume_sample=extra["samples_seen"]) for r in range(2)]
    losses = []
    for step in range(SAVE_AT + 1, STEPS + 1):
        total = 0.0
        for micro, data in enumerate(ranks):  # micro-step m reads what DeepSpeed's rank m read
            loss = engine(*data.batch(step))
            loss.backward()
            total += loss.item()
        engine.step()
        engine.zero_grad()
        losses.append(total / 2)
    return losses, extra


@pytest.mark.parametrize(("ds_stage", "dsl_stage"), [(1, 2), (2, 0), (3, 3)])
def test_dsl_continues_a_deepspeed_run_as_deepspeed_does(runs: DeepSpeedRuns, tmp_path: Path, ds_stage: int,
                                                        dsl_stage: int) -> None:
    ds_out = runs.get(ds_stage)
    deepspeed = json.loads((ds_out / "losses.json").read_text())
    losses, extra = _dsl_losses(tmp_path, runs.model, ds_out, dsl_stage)
    continuation = deepspeed[SAVE_AT:]
    assert max(abs(a - b) for a, b in zip(losses, continuation)) <= TOL, (losses, continuation)
    assert extra["step"] == SAVE_AT and extra["samples_seen"] == SAVE_AT * 2 * 2
    assert extra["imported_from"]["zero_stage"] == ds_stage and extra["imported_from"]["world_size"] == 2
    if ds_stage == 3:
        # The optimizer state is what makes steps 12-13 agree: without it (a fresh AdamW) step
        # 11 still matches (same weights) and the next steps do not.
        fresh, _ = _dsl_losses(tmp_path, runs.model, ds_out, dsl_stage, optimizer=False)
        assert abs(fresh[0] - continuation[0]) <= TOL
        assert max(abs(a - b) for a, b in zip(fresh[1:], continuation[1:])) > 100 * TOL, (fresh, continuation)


def test_a_frozen_parameter_comes_from_the_stage_3_fragments(runs: DeepSpeedRuns, tmp_path: Path) -> None:
    """At stage 3 DeepSpeed saves a frozen parameter as one fragment per rank (in the model files,
    not the optimizer's); the import joins them into the dsl checkpoint's module/ entry."""
    frozen = "model.embed_tokens.weight"
    ds_out = runs.get(3, frozen=frozen)
    deepspeed = json.loads((ds_out / "losses.json").read_text())
    losses, _ = _dsl_losses(tmp_path, runs.model, ds_out, 3, frozen=frozen)
    assert max(abs(a - b) for a, b in zip(losses, deepspeed[SAVE_AT:])) <= TOL, (losses, deepspeed[SAVE_AT:])
    # dsl built its model from seed 99: the frozen embedding the losses need is DeepSpeed's only
    # if the import carried it.


def test_a_bf16_deepspeed_checkpoint_brings_its_fp32_masters(runs: DeepSpeedRuns, tmp_path: Path) -> None:
    """bf16 at ZeRO stage 1 is DeepSpeed's BF16_Optimizer (bf16_zero_pp_rank_* files): the import
    takes its fp32 masters, whose bf16 rounding is exactly the bf16 module DeepSpeed saved, and dsl
    in bf16 continues close to DeepSpeed's bf16 continuation."""
    import torch

    from dsl.engine.checkpoint import load_full

    ds_out = runs.get(1, "bf16")
    assert list((ds_out / "global_step10").glob("bf16_zero_pp_rank_*_optim_states.pt"))
    losses, extra = _dsl_losses(tmp_path, runs.model, ds_out, 2, precision="bf16")
    imported = load_full(tmp_path / f"dsl-from-{ds_out.name}-s2-True" / f"step-{SAVE_AT:06d}")
    module = torch.load(ds_out / "global_step10" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert module["lm_head.weight"].dtype == torch.bfloat16
    for name, weight in module.items():
        master = imported["param"][f"lm.{name}"]
        assert master.dtype == torch.float32 and torch.equal(master.to(torch.bfloat16), weight), name
    assert int(imported["exp_avg"]["lm.lm_head.weight"].ne(0).sum()) > 0
    deepspeed = json.loads((ds_out / "losses.json").read_text())[SAVE_AT:]
    assert max(abs(a - b) for a, b in zip(losses, deepspeed)) < 0.02, (losses, deepspeed)


def _trainer_continues_deepspeed(runs: DeepSpeedRuns, tmp_path: Path, monkeypatch, *, stage: int,
                                 init_from: str = "") -> Path:
    """The trainer (engine/train.py) on output_dir tmp_path/out after DeepSpeed's stage-2 run:
    its steps 11-13 are DeepSpeed's continuation within TOL. Returns the spec it wrote."""
    from dsl.engine.train import main
    from tests.integration.ds_checkpoint_worker import LR, MICRO, SEQ, WEIGHT_DECAY

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"run:\n  train:\n    model: {{hf: {runs.model}, seq_len: {SEQ}}}\n    steps: {STEPS}\n"
                    f"    log_every: 1\n{init_from}"
                    f"engine: {{zero_stage: {stage}, micro_batch: {MICRO}, grad_accum: 2, grad_clip: null, optimizer: "
                    f"{{lr: {LR}, weight_decay: {WEIGHT_DECAY}}}, scheduler: {{type: constant, warmup_steps: 0}}}}\n"
                    f"output_dir: {tmp_path / 'out'}\n")
    assert main([str(spec)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(SAVE_AT + 1, STEPS + 1))
    deepspeed = json.loads((runs.get(2) / "losses.json").read_text())[SAVE_AT:]
    assert max(abs(r["loss"] - d) for r, d in zip(rows, deepspeed)) <= TOL, (rows, deepspeed)
    return spec


def test_a_dsl_run_whose_output_dir_holds_the_import_resumes_from_it(runs: DeepSpeedRuns, tmp_path: Path,
                                                                    monkeypatch) -> None:
    """The user's path: `python -m dsl.engine.ds_import DS_DIR OUT/checkpoints`, then the trainer
    with output_dir OUT resumes there (run.train.resume) and continues as DeepSpeed did."""
    from dsl.engine.ds_import import main as import_main

    assert import_main([str(runs.get(2)), str(tmp_path / "out" / "checkpoints")]) == 0
    _trainer_continues_deepspeed(runs, tmp_path, monkeypatch, stage=1)


def test_init_from_deepspeed_imports_once_and_continues_as_deepspeed_does(runs: DeepSpeedRuns, tmp_path: Path,
                                                                         monkeypatch) -> None:
    """run.train.init_from: {deepspeed: DIR}: the trainer imports the checkpoint into its own
    output_dir/checkpoints (a relative folder starts at the spec's), then resumes from it."""
    rel = os.path.relpath(runs.get(2), tmp_path)
    spec = _trainer_continues_deepspeed(runs, tmp_path, monkeypatch, stage=2,
                                        init_from=f"    init_from: {{deepspeed: {rel}}}\n")
    # A folder that does not exist is a located error of the spec.
    spec.write_text(spec.read_text().replace(rel, "no-such-folder"))
    with pytest.raises(UserError, match=r"spec.yaml:\d+:\d+ run.train.init_from.deepspeed: no such folder"):
        from dsl.engine.train import load_run_spec

        load_run_spec(spec)


def test_what_is_not_a_deepspeed_checkpoint_is_refused_with_its_path(tmp_path: Path) -> None:
    from dsl.engine.ds_import import import_deepspeed, main
    from dsl.engine.errors import UserError

    with pytest.raises(UserError, match=rf"{tmp_path / 'none'}: no such DeepSpeed checkpoint folder"):
        import_deepspeed(tmp_path / "none", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"empty: no zero_pp_rank_\*_optim_states.pt files: not a DeepSpeed"):
        import_deepspeed(tmp_path / "empty", tmp_path / "out")
    assert main([str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out" / "latest").exists()
