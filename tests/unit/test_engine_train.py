"""The demo trainer in one process: spec errors (exit 2, located), progress lines, metrics, summary."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dsl.engine.config import EngineConfig
from dsl.engine.errors import UserError
from dsl.engine.train import data_parallel_size, format_progress, load_run_spec, main
from dsl.engine.wire import STEP_LINE as LAUNCHER_RE  # the launcher's regex (the wire format's home)

# The full format of a progress line.
LINE_RE = re.compile(
    r"step (\d+)/(\d+) \| loss (\d+\.\d{4}) \| lr (\d\.\d\de[-+]\d\d) \| ([\d,]+) tok/s \| eta (\d+:\d\d)"
    r"( \| peak \d+\.\d\d GiB > plan \d+\.\d\d GiB)?"  # a rank's peak over the memory model's figure
)


@pytest.fixture(autouse=True)
def _no_torchrun_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return path


def test_format_progress_matches_launcher_regex() -> None:
    line = format_progress(120, 300, 2.34564, 2.5e-3, 12345.4, 7.2)
    assert line == "step 120/300 | loss 2.3456 | lr 2.50e-03 | 12,345 tok/s | eta 0:07"
    assert LAUNCHER_RE.match(line).groups() == ("120", "300", "2.3456")
    assert format_progress(1, 2, 1.0, 1.0, 1.0, 3725).endswith("eta 1:02:05")


def test_other_top_level_keys_are_ignored_and_defaults_apply(tmp_path: Path) -> None:
    spec = load_run_spec(
        _write(
            tmp_path,
            "name: demo\nhosts: {hostfile: x}\nrun:\n  command: [a]\n  train:\n    steps: 7\n"
            "engine:\n  grad_accum: 3\noutput_dir: out/run1\nplanner: {anything: 1}\n",
        )
    )
    assert spec.train.steps == 7 and spec.train.model.vocab_size == 256
    assert spec.engine.grad_accum == 3 and spec.engine.micro_batch == 8
    assert spec.output_dir == Path("out/run1")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("run:\n  train:\n    steps: 0\noutput_dir: o\n", r"spec\.yaml:3:12 run\.train\.steps: .*greater than or equal to 1"),
        (
            "run:\n  train:\n    model: {hidden_size: 64, num_attention_heads: 5}\noutput_dir: o\n",
            r"spec\.yaml:3:12 run\.train\.model: .*num_attention_heads \(5\) must divide hidden_size \(64\)",
        ),
        ("engine:\n  micro_bach: 4\noutput_dir: o\n", r"spec\.yaml:2:3 engine\.micro_bach: unknown field 'micro_bach'; did you mean 'micro_batch'\?"),
        (
            "engine:\n  low_precision_states: true\noutput_dir: o\n",
            r"spec\.yaml:2:25 engine\.low_precision_states: true keeps .* needs precision: bf16 \(got precision: fp32\)",
        ),
        ("engine: {}\n", r"output_dir: a directory path \(string\) is required"),
        ("run: [1, 2\n", r"spec\.yaml:2:1: YAML syntax error"),
    ],
)
def test_bad_spec_exits_2_with_one_located_message(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # output_dir: o must never land in the checkout
    assert main([str(_write(tmp_path, text))]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert re.search(message, captured.err), captured.err
    assert "Traceback" not in captured.err


def test_bad_spec_fails_before_importing_torch(tmp_path: Path) -> None:
    path = _write(tmp_path, "run:\n  train: {}\nengine:\n  optimizer: {lr: -1}\noutput_dir: o\n")
    code = "import sys; from dsl.engine.train import main; rc = main(sys.argv[1:]); print('torch' in sys.modules); sys.exit(rc)"
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stdout.strip() == "False"
    assert "engine.optimizer.lr: Input should be greater than 0" in proc.stderr


def test_single_process_run_logs_metrics_and_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "run"
    path = _write(
        tmp_path,
        "run:\n  train:\n    steps: 12\n    log_every: 5\n"
        "    model: {vocab_size: 64, hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, seq_len: 32}\n"
        f"engine:\n  micro_batch: 4\n  grad_accum: 2\n  scheduler: {{warmup_steps: 2}}\noutput_dir: {out_dir}\n",
    )
    assert main([str(path)]) == 0
    stdout = capsys.readouterr().out.splitlines()
    progress = [line for line in stdout if LAUNCHER_RE.match(line)]
    assert [LINE_RE.fullmatch(line).group(1, 2) for line in progress] == [("5", "12"), ("10", "12"), ("12", "12")]
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10, 12]
    assert set(rows[0]) >= {"step", "loss", "lr", "tokens_per_s", "elapsed_s"}
    # The printed loss and lr are the recorded ones; the lr follows the schedule (min at the end).
    for line, row in zip(progress, rows):
        assert float(LINE_RE.fullmatch(line).group(3)) == pytest.approx(row["loss"], abs=5e-5)
    assert rows[-1]["lr"] == pytest.approx(0.1 * 3e-3)
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert 0 < rows[0]["elapsed_s"] < rows[-1]["elapsed_s"]
    summary = "\n".join(stdout[stdout.index(progress[-1]) + 1 :])
    assert re.search(r"tokens seen\s*│\s*3,072\b", summary)  # 12 steps x 2 x 4 x 32 tokens
    assert re.search(r"world size\s*│\s*1\b", summary)
    assert f"{rows[-1]['loss']:.4f}" in summary
    # Peak memory on every logged step, per rank (engine/peak.py), next to the plan's figure.
    for row in rows:
        assert len(row["host_peak_rss_bytes"]) == 1 and row["host_peak_rss_bytes"][0] > 50 * 2**20
        assert row["device_peak_allocated_bytes"] == row["device_peak_reserved_bytes"] == [0]  # no CUDA
        assert 50 * 2**20 < row["host_peak_anon_bytes"][0] < row["host_peak_rss_bytes"][0]  # less the file pages
        assert row["predicted_peak_bytes"] > 0
        assert row["predicted_peak_phase"] in ("forward", "loss backward", "layer backward", "optimizer step")
    assert rows[0]["host_peak_rss_bytes"][0] <= rows[-1]["host_peak_rss_bytes"][0]  # a high-water mark
    match = re.search(r"peak rank 0\s*│\s*([0-9.]+) GiB resident \(plan: ([0-9.]+) GiB at "
                      + rows[-1]["predicted_peak_phase"], summary)
    assert match and float(match.group(2)) == pytest.approx(rows[-1]["predicted_peak_bytes"] / 2**30, abs=0.006)


# Schedule, batch checks, data sources, activation checkpointing ---------------------------

TINY_MODEL = "    model: {vocab_size: 64, hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2, seq_len: 16}\n"


def _rows(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_data_parallel_size_checks_train_batch_with_the_numbers() -> None:
    assert data_parallel_size(EngineConfig(micro_batch=4, grad_accum=2, train_batch=16), 2) == 2
    with pytest.raises(UserError, match=re.escape(
        "engine.train_batch: train_batch (16) != micro_batch (4) x grad_accum (2) x data-parallel size (1) = 8"
    )):
        data_parallel_size(EngineConfig(micro_batch=4, grad_accum=2, train_batch=16), 1)


def test_train_batch_mismatch_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, f"run:\n  train:\n    steps: 2\n{TINY_MODEL}engine:\n  micro_batch: 4\n  train_batch: 8\noutput_dir: {tmp_path / 'o'}\n")
    assert main([str(path)]) == 2
    assert "train_batch (8) != micro_batch (4) x grad_accum (1) x data-parallel size (1) = 4" in capsys.readouterr().err


def test_activation_checkpointing_trains_the_same_losses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    losses = {}
    for ac in ("false", "true"):
        out_dir = tmp_path / ac
        path = _write(tmp_path, f"run:\n  train:\n    steps: 6\n    log_every: 1\n{TINY_MODEL}"
                                f"engine:\n  micro_batch: 4\n  activation_checkpointing: {ac}\noutput_dir: {out_dir}\n")
        assert main([str(path)]) == 0
        losses[ac] = [r["loss"] for r in _rows(out_dir)]
    assert "activation checkpointing" in capsys.readouterr().err
    assert losses["true"] == losses["false"]  # bitwise: recomputation is exact
    assert losses["true"][-1] < losses["true"][0]


def test_token_file_data_trains(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import numpy as np

    # A learnable file: a repeating ramp 0..63, so every next token is determined.
    (np.arange(20_000) % 64).astype(np.uint16).tofile(tmp_path / "train.bin")
    out_dir = tmp_path / "o"
    path = _write(tmp_path, f"run:\n  train:\n    steps: 60\n    log_every: 20\n{TINY_MODEL}"
                            f"    data: {{kind: tokens, path: {tmp_path / 'train.bin'}}}\n"
                            f"engine:\n  micro_batch: 4\n  optimizer: {{lr: 1.0e-2}}\n  scheduler: {{warmup_steps: 2}}\n"
                            f"output_dir: {out_dir}\n")
    assert main([str(path)]) == 0
    rows = _rows(out_dir)
    assert rows[-1]["loss"] < 0.5  # from ln(64) = 4.16 (measured: 1.17, 0.31, 0.23)
    assert "tokens data" in capsys.readouterr().err


def test_missing_token_file_exits_2_naming_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, f"run:\n  train:\n    data: {{kind: tokens, path: {tmp_path / 'nope.bin'}}}\n"
                            f"engine: {{}}\noutput_dir: {tmp_path / 'o'}\n")
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert f"run.train.data.path: no such file: {tmp_path / 'nope.bin'}" in err and "Traceback" not in err


# Checkpoints (the engine's real save/load; the calls are recorded) -------------------------


@pytest.fixture
def saves(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Record every Engine.save_checkpoint call the trainer makes (the real method still runs)."""
    from dsl.engine import core

    saved: list[dict] = []
    real_save = core.Engine.save_checkpoint

    def save_checkpoint(self, directory, *, step, extra=None, keep=None):
        saved.append({"dir": Path(directory), "step": step, "extra": extra, "keep": keep})
        return real_save(self, directory, step=step, extra=extra, keep=keep)

    monkeypatch.setattr(core.Engine, "save_checkpoint", save_checkpoint)
    return saved


def _ckpt_spec(tmp_path: Path, out_dir: Path, steps: int, checkpoint_every: str = "5", resume: str = "true",
               engine: str = "micro_batch: 4") -> Path:
    return _write(tmp_path, f"run:\n  train:\n    steps: {steps}\n    log_every: 1\n    checkpoint_every: {checkpoint_every}\n"
                            f"    keep_checkpoints: 2\n    resume: {resume}\n{TINY_MODEL}"
                            f"engine:\n  {engine}\n  scheduler: {{type: constant, warmup_steps: 3}}\noutput_dir: {out_dir}\n")


def test_checkpoints_every_n_steps_and_at_the_end_with_the_data_position(
    tmp_path: Path, saves: list[dict]
) -> None:
    out_dir = tmp_path / "o"
    assert main([str(_ckpt_spec(tmp_path, out_dir, steps=12))]) == 0
    assert [c["step"] for c in saves] == [5, 10, 12]
    # keep_checkpoints: 2 -> the two newest remain, latest names the last one.
    assert sorted(p.name for p in (out_dir / "checkpoints").glob("step-*")) == ["step-000010", "step-000012"]
    assert (out_dir / "checkpoints" / "latest").read_text().strip() == "step-000012"
    for call in saves:
        assert call["dir"] == out_dir / "checkpoints" and call["keep"] == 2
        assert call["extra"]["samples_seen"] == 4 * call["step"]
        assert call["extra"]["global_batch"] == 4
        assert call["extra"]["data"] == {"kind": "synthetic", "seed": 1234, "path": None, "dtype": "uint16", "order": "shuffle"}


def test_resume_continues_with_the_losses_of_an_uninterrupted_run(
    tmp_path: Path, saves: list[dict], capsys: pytest.CaptureFixture[str]
) -> None:
    whole = tmp_path / "whole"
    assert main([str(_ckpt_spec(tmp_path, whole, steps=20, checkpoint_every="null"))]) == 0
    split = tmp_path / "split"
    assert main([str(_ckpt_spec(tmp_path, split, steps=10))]) == 0
    capsys.readouterr()
    # Same folder, more steps, and another split of the same global batch (grad_accum 2 x 2).
    assert main([str(_ckpt_spec(tmp_path, split, steps=20, engine="micro_batch: 2\n  grad_accum: 2"))]) == 0
    captured = capsys.readouterr()
    assert f"resumed from {split / 'checkpoints'} at step 10 (40 samples seen)" in captured.err
    progress = [line for line in captured.out.splitlines() if LAUNCHER_RE.match(line)]
    assert LAUNCHER_RE.match(progress[0]).groups()[:2] == ("11", "20") and len(progress) == 10
    assert re.search(r"resumed at step\s*│\s*10\b", captured.out)
    assert re.search(r"tokens seen\s*│\s*640\b", captured.out)  # 10 steps x 4 x 16
    rows = _rows(split)
    assert [r["step"] for r in rows] == list(range(1, 21))  # metrics.jsonl continued
    expected = [r["loss"] for r in _rows(whole)]
    assert [r["loss"] for r in rows] == pytest.approx(expected, abs=2e-6)
    # The comparison can fail: a resumed run that restarted the data stream would differ.
    assert abs(rows[10]["loss"] - rows[0]["loss"]) > 0.1


def test_resume_off_or_without_latest_starts_from_step_1(tmp_path: Path, saves: list[dict]) -> None:
    out_dir = tmp_path / "o"
    assert main([str(_ckpt_spec(tmp_path, out_dir, steps=5))]) == 0
    assert main([str(_ckpt_spec(tmp_path, out_dir, steps=6, resume="false"))]) == 0
    assert [r["step"] for r in _rows(out_dir)] == [1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 6]


def test_resume_at_or_past_steps_trains_nothing(tmp_path: Path, saves: list[dict], capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "o"
    assert main([str(_ckpt_spec(tmp_path, out_dir, steps=5))]) == 0
    capsys.readouterr()
    assert main([str(_ckpt_spec(tmp_path, out_dir, steps=5))]) == 0
    captured = capsys.readouterr()
    assert "checkpoint is at step 5 and run.train.steps is 5: nothing to train" in captured.err
    assert not LAUNCHER_RE.search(captured.out)


def test_a_rank_refuses_a_model_it_cannot_build(tmp_path: Path):
    """A resolved spec naming a model by its counts reaches the ranks only if someone starts them
    by hand; they refuse it, located, instead of training the default Llama in its place."""
    from dsl.engine.errors import UserError

    spec = tmp_path / "resolved.yaml"
    spec.write_text(f"run:\n  train:\n    model: {{params: 1000, largest_layer_params: 100}}\nengine: {{}}\n"
                    f"output_dir: {tmp_path / 'out'}\n")
    with pytest.raises(UserError, match=r"resolved.yaml:3:\d+ .*counts has no weights to train"):
        load_run_spec(spec)
