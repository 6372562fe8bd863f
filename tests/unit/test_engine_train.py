"""The demo trainer in one process: spec errors (exit 2, located), progress lines, metrics, summary."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dsl.engine.train import format_progress, load_run_spec, main

# The launcher's regex, and the full format of a progress line.
LAUNCHER_RE = re.compile(r"^step (\d+)/(\d+) \| loss ([0-9.]+)")
LINE_RE = re.compile(
    r"step (\d+)/(\d+) \| loss (\d+\.\d{4}) \| lr (\d\.\d\de[-+]\d\d) \| ([\d,]+) tok/s \| eta (\d+:\d\d)"
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
        ("engine:\n  zero_stage: 2\noutput_dir: o\n", r"spec\.yaml:2:3 engine: zero_stage 2 is not implemented"),
        ("engine: {}\n", r"output_dir: a directory path \(string\) is required"),
        ("run: [1, 2\n", r"spec\.yaml:2:1: YAML syntax error"),
    ],
)
def test_bad_spec_exits_2_with_one_located_message(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str) -> None:
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
