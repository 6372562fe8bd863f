"""Rank output is demultiplexed into [host:rank] lines, per-rank logs and a failure report."""

from __future__ import annotations

import io

from dsl.launcher.output import RankOutput


def test_lines_are_prefixed_logged_and_reported(tmp_path):
    out, err, steps = io.StringIO(), io.StringIO(), []
    sink = RankOutput(tmp_path / "logs", stdout=out, stderr=err,
                      on_step=lambda s, t, loss: steps.append((s, t, loss)))
    sink("node-a", "stdout", "[dsl:0:0] step 20/300 | loss 4.5000 | lr 1e-3")
    sink("node-b", "stderr", "[dsl:5:1] Traceback: boom")
    sink("node-b", "stderr", "W1122 torchrun says something")
    sink("node-b", "stderr", '[dsl-agent] {"event": "failed", "rank": 5, "local_rank": 1, '
                             '"exitcode": -9, "signal": "SIGKILL", "failures": {"5": -9}}')
    sink.close()
    assert out.getvalue() == "[node-a:0] step 20/300 | loss 4.5000 | lr 1e-3\n"
    assert err.getvalue() == "[node-b:5] Traceback: boom\n[node-b] W1122 torchrun says something\n"
    assert steps == [(20, 300, 4.5)]
    assert (tmp_path / "logs" / "rank5.log").read_text() == "Traceback: boom\n"  # no note yet
    agent_log = (tmp_path / "logs" / "node-b.agent.log").read_text()
    assert "torchrun says something" in agent_log and "[dsl-agent]" in agent_log
    failure = sink.failures["node-b"]
    assert (failure.rank, failure.exitcode, failure.signal) == (5, -9, "SIGKILL")
    assert list(sink.tails[5]) == ["Traceback: boom"]


def test_logs_are_appended_not_overwritten(tmp_path):
    for attempt in (1, 2):
        sink = RankOutput(tmp_path, stdout=io.StringIO(), stderr=io.StringIO())
        sink.note(f"attempt {attempt}")
        sink("h", "stdout", f"[dsl:0:0] line {attempt}")
        sink.close()
    assert (tmp_path / "rank0.log").read_text() == "# dsl: attempt 1\nline 1\n# dsl: attempt 2\nline 2\n"
