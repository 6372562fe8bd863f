"""Time limits without a cluster: the spec's checks, the batch script's options, `--time-limit`
parsing, supervise's warning/stop/checkpointed outcomes with fake hosts, the guard's and the
elastic agent's signal passing, and the trainer's own handling (in this process, 1 rank)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dsl.launcher.host.elastic import EXIT_CHECKPOINTED, Forwarder, _nproc, catches, checkpointed
from dsl.engine.errors import UserError
from dsl.launcher.hosts import Host
from dsl.launcher.plan import RenderInputs
from dsl.launcher.render import render
from dsl.launcher.slurm import SCRIPT_NAME
from dsl.launcher.spec import load_spec
from dsl.launcher.supervise import (EXIT_TIME_LIMIT, TimeLimit, parse_duration_s, supervise,
                                    time_limit_of)
from tests.conftest import run_dsl


def _spec(write, run: str = "train: {steps: 5}", slurm: str = "", backend: str = "slurm") -> Path:
    return write("job.yaml", f"name: tl\nrun: {{{run}}}\nresources:\n  backend: {backend}\n"
                             f"  slurm: {{{slurm}}}\noutput_dir: /scratch/tl\n")


# The spec: a warning due before the job starts is refused, located ------------------------------


def test_signal_at_or_beyond_the_time_limit_is_a_located_error(write):
    path = _spec(write, slurm="time_min: 1, signal_before_end_s: 60")
    with pytest.raises(UserError) as info:
        load_spec(path)
    message = str(info.value)
    assert message.startswith(f"{path}:5:45 resources.slurm.signal_before_end_s: 60 s is not less "
                              "than the time limit (time_min: 1 = 60 s)")
    assert "below 60 (e.g. 30)" in message


def test_the_trainers_default_signal_is_checked_too_at_time_min(write):
    path = _spec(write, slurm="time_min: 2")  # 120 s default == 120 s limit
    with pytest.raises(UserError, match=re.escape(
            f"{path}:5:21 resources.slurm.signal_before_end_s: 120 s (its default with run.train) "
            "is not less than the time limit (time_min: 2 = 120 s)")):
        load_spec(path)
    load_spec(_spec(write, slurm="time_min: 1, signal_before_end_s: 30"))
    load_spec(_spec(write, run="script: x.py", slurm="time_min: 1"))  # a script gets no signal


def test_validate_and_launch_refuse_it_with_exit_2(write):
    path = _spec(write, slurm="time_min: 1")
    for args in (("validate", str(path)), ("launch", str(path), "--dry-run")):
        proc = run_dsl(*args)
        assert proc.returncode == 2, proc.stderr
        assert "resources.slurm.signal_before_end_s: 120 s (its default with run.train)" in proc.stderr
        assert "Traceback" not in proc.stderr


# The batch script: which case adds what --------------------------------------------------------

INPUTS = RenderInputs(python="/py", cwd="/w", master_port="auto", env_values={}, set_visible_devices=False)


def _script(write, run: str, slurm: str, nodes: int = 2) -> str:
    spec = load_spec(_spec(write, run=run, slurm=slurm))
    plan = render(spec, [Host(f"n{i}", (0,)) for i in range(nodes)], INPUTS)
    return plan.files[f"/scratch/tl/{SCRIPT_NAME}"]


def test_trainer_jobs_get_the_signal_scripts_only_when_asked_requeue_only_when_asked(write):
    train = _script(write, "train: {steps: 5}", "time_min: 10")
    assert "#SBATCH --signal=USR1@120" in train
    assert "requeue" not in train  # neither --requeue nor --no-requeue: the cluster's default
    script = _script(write, "script: x.py", "time_min: 10")
    assert "--signal" not in script and "requeue" not in script
    asked = _script(write, "script: x.py", "time_min: 10, signal_before_end_s: 45, requeue: false")
    assert "#SBATCH --signal=USR1@45" in asked and "#SBATCH --no-requeue" in asked
    assert "scontrol requeue" not in asked


def test_requeue_true_requeues_on_exit_75_and_nodes_linger(write):
    text = _script(write, "train: {steps: 5}", "time_min: 10, requeue: true")
    assert "#SBATCH --requeue" in text
    assert "--checkpointed-linger-s=5 --" in text
    assert f'if [ "$code" -eq {EXIT_CHECKPOINTED} ]; then' in text
    assert 'scontrol requeue "$SLURM_JOB_ID"' in text and text.rstrip().endswith('exit "$code"')
    one_node = _script(write, "train: {steps: 5}", "time_min: 10, requeue: true", nodes=1)
    assert "--checkpointed-linger-s" not in one_node  # srun's kill-on-bad-exit has no peer to stop


@pytest.mark.parametrize("srun_code, requeued, scontrol_code", [(75, True, 0), (0, False, 0), (1, False, 0),
                                                                 (75, True, 1)])
def test_the_requeue_lines_run_in_bash(write, tmp_path, srun_code, requeued, scontrol_code):
    """The script's tail through a real bash, with srun and scontrol replaced by recorders."""
    text = _script(write, "train: {steps: 5}", "time_min: 10, requeue: true")
    tail = text[text.index("code=0\n"):]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f"#!/bin/sh\nexit {srun_code}\n")
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'scontrol.args'}\n"
                                      f"exit {scontrol_code}\n")
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    proc = subprocess.run(["bash", "-c", "set -euo pipefail\n" + tail], capture_output=True, text=True,
                          env={"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "42",
                               "NNODES": "1"})  # set by the script's head (the allocation's nodes)
    assert proc.returncode == srun_code
    if requeued:
        assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "42"]
        assert "requeueing job 42 to resume" in proc.stderr
        # Under salloc (not a batch job) the requeue fails: the 75 still says "resume me".
        assert ("scontrol requeue failed" in proc.stderr) == bool(scontrol_code)
    else:
        assert not (tmp_path / "scontrol.args").exists()


# --time-limit -----------------------------------------------------------------------------------


def test_durations():
    assert parse_duration_s("2h") == 7200 and parse_duration_s("90m") == 5400
    assert parse_duration_s("1h30m") == 5400 and parse_duration_s("45s") == 45
    assert parse_duration_s("1d") == 86400 and parse_duration_s("3") == 180  # minutes, as Slurm's --time
    for bad in ("", "2x", "h", "0s", "-5m", "1h 30m"):
        with pytest.raises(ValueError):
            parse_duration_s(bad)


def test_time_limit_of_a_spec(write):
    spec = load_spec(_spec(write, backend="local"))
    assert time_limit_of(spec, "1h", "local") == TimeLimit(3600, 120.0, "1h")
    script = load_spec(_spec(write, run="script: x.py", backend="local"))
    assert time_limit_of(script, "1h", "ssh").warn_before_s is None  # a script is not warned unasked
    with pytest.raises(UserError, match=r"job\.yaml:\d+:\d+ resources\.slurm\.signal_before_end_s: 120 s "
                                        r"\(its default with run\.train\) is not less than --time-limit "
                                        r"90s \(90 s\)"):
        time_limit_of(spec, "90s", "local")
    with pytest.raises(UserError, match="--time-limit applies to backends local, ssh and pernode, not slurm; set "
                                        "resources.slurm.time_min"):
        time_limit_of(spec, "1h", "slurm")


# supervise with fake hosts ----------------------------------------------------------------------


class FakeHost:
    """A host command that ends with `code` `after_s` after it starts, or at a warning when
    `on_warning` is set (that code, like a trainer that checkpoints), or when stopped (143)."""

    def __init__(self, host: str, code: int | None, after_s: float = 0.0, on_warning: int | None = None):
        self.host, self._code, self._at = host, code, time.monotonic() + after_s
        self._on_warning = on_warning
        self.ended: int | None = None
        self.warnings: list[tuple[int, float]] = []

    def poll(self) -> int | None:
        if self.ended is None and self._code is not None and time.monotonic() >= self._at:
            self.ended = self._code
        return self.ended

    def warn(self, sig: int) -> None:
        self.warnings.append((sig, time.monotonic()))
        if self._on_warning is not None:
            self._code, self._at = self._on_warning, time.monotonic() + 0.1

    def terminate(self) -> None:
        if self.ended is None:
            self.ended = 143

    def kill(self) -> None:
        self.terminate()

    def wait_output(self, timeout_s: float) -> None:
        pass


class FakeBackend:
    name = "local"

    def __init__(self, *hosts: FakeHost):
        self.hosts = list(hosts)
        self.starts = 0

    def start(self, plan, sink):
        self.starts += 1
        return self.hosts


class FakeOutput:
    def __init__(self):
        self.failures: dict = {}
        self.rank_hosts: dict = {}

    def note(self, text, ranks=None):
        pass


def _plan(max_restarts: int = 0):
    from types import SimpleNamespace

    return SimpleNamespace(name="job", world_size=2, max_restarts=max_restarts)


def test_the_warning_comes_warn_before_s_ahead_and_a_checkpoint_ends_the_job_with_75():
    hosts = (FakeHost("a", None, on_warning=EXIT_CHECKPOINTED), FakeHost("b", None, on_warning=EXIT_CHECKPOINTED))
    started = time.monotonic()
    outcome = supervise(_plan(max_restarts=3), FakeBackend(*hosts), FakeOutput(), TimeLimit(1.0, 0.6, "1s"))
    assert outcome.exit_code == EXIT_CHECKPOINTED and outcome.checkpointed and outcome.attempts == 1
    for host in hosts:
        assert [sig for sig, _ in host.warnings] == [signal.SIGUSR1]
        assert 0.3 < host.warnings[0][1] - started < 0.6  # at limit - warn_before_s = 0.4 s


def test_a_host_still_finishing_its_checkpoint_is_waited_for_not_stopped():
    early, late = FakeHost("a", EXIT_CHECKPOINTED, after_s=0.1), FakeHost("b", EXIT_CHECKPOINTED, after_s=1.0)
    outcome = supervise(_plan(), FakeBackend(early, late), FakeOutput())
    assert outcome.checkpointed and late.ended == EXIT_CHECKPOINTED  # not 143


def test_a_failure_beside_a_checkpoint_is_a_failure():
    outcome = supervise(_plan(), FakeBackend(FakeHost("a", EXIT_CHECKPOINTED, 0.1), FakeHost("b", 3, 0.3)),
                        FakeOutput())
    assert outcome.exit_code == 3 and not outcome.checkpointed


def test_the_limit_stops_hosts_that_ignore_the_warning_with_124_and_no_restart():
    host = FakeHost("a", None)
    backend = FakeBackend(host)
    outcome = supervise(_plan(max_restarts=2), backend, FakeOutput(), TimeLimit(0.5, 0.2, "500ms"))
    assert outcome.exit_code == EXIT_TIME_LIMIT and outcome.timed_out
    assert host.ended == 143 and len(host.warnings) == 1 and backend.starts == 1


# The host side: elastic's report, its forwarder, the guard ----------------------------------------


def _failure(code):
    from types import SimpleNamespace

    return SimpleNamespace(exitcode=code, timestamp=100)


def test_a_host_whose_ranks_checkpointed_is_not_a_failed_host():
    assert checkpointed({0: _failure(75), 1: _failure(75)})
    assert checkpointed({0: _failure(75), 1: _failure(-15)})  # torchrun stopped it after rank 0 ended
    assert not checkpointed({0: _failure(75), 1: _failure(1)})
    assert not checkpointed({0: _failure(-15)})


def test_nproc_is_read_before_torch_parses_the_arguments():
    assert _nproc(["--nnodes=1", "--nproc-per-node=4", "-m", "x"]) == 4
    assert _nproc(["--nproc_per_node", "2", "s.py"]) == 2
    assert _nproc(["--nproc-per-node=gpu", "s.py"]) is None
    assert _nproc(["s.py", "--nproc-per-node=3"]) is None  # the script's own argument


def _child(handler: bool, ready: Path, sleep_s: float = 3) -> subprocess.Popen:
    code = (f"import signal, sys, time, pathlib\n"
            + ("signal.signal(signal.SIGUSR1, lambda *a: print('GOT USR1', flush=True))\n" if handler else "")
            + f"pathlib.Path({str(ready)!r}).write_text('')\n"
            f"time.sleep({sleep_s})\nprint('DONE', flush=True)\n")
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


def test_catches_reads_the_handler_mask(tmp_path):
    with_handler, without = _child(True, tmp_path / "a"), _child(False, tmp_path / "b")
    try:
        while not ((tmp_path / "a").exists() and (tmp_path / "b").exists()):
            time.sleep(0.02)
        assert catches(with_handler.pid, signal.SIGUSR1) and not catches(without.pid, signal.SIGUSR1)
    finally:
        with_handler.kill(), without.kill()
        with_handler.wait(), without.wait()


def test_forwarder_waits_for_a_rank_to_catch_the_signal(tmp_path):
    """A warning that comes before the rank installed its handler is delivered once it has.

    The forwarder signals the children of its process, as in the agent (whose children are the
    ranks). It runs in a driver process of its own: pytest's children include the test cluster's
    daemons, which would receive the warning instead."""
    ready = tmp_path / "ready"
    rank = ("import signal, time, pathlib\n"
            "got = []\n"
            "signal.signal(signal.SIGUSR1, lambda *a: (got.append(1), print('GOT USR1', flush=True)))\n"
            f"pathlib.Path({str(ready)!r}).write_text('')\n"
            "deadline = time.monotonic() + 20\n"
            "while not got and time.monotonic() < deadline:\n    time.sleep(0.05)\n"
            "print('DONE', flush=True)\n")
    driver = ("import json, signal, subprocess, sys, time\n"
              "from dsl.launcher.host.elastic import Forwarder\n"
              "forwarder = Forwarder(expected=1)\n"
              "forwarder.install()\n"
              "forwarder._on_signal(signal.SIGUSR1, None)  # what the handler does: one byte into the pipe\n"
              "time.sleep(0.3)  # no rank yet: the warning waits\n"
              f"child = subprocess.Popen([sys.executable, '-c', {rank!r}], stdout=subprocess.PIPE, text=True)\n"
              "out, _ = child.communicate(timeout=30)\n"
              "print(json.dumps({'out': out.split(), 'delivered': forwarder.delivered, 'pid': child.pid}))\n")
    proc = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["out"] == ["GOT", "USR1", "DONE"]  # delivered once, after the handler, not fatal
    assert result["delivered"] == [[signal.SIGUSR1, result["pid"]]]


def test_guard_passes_a_stdin_control_line_on_as_sigusr1(tmp_path):
    ready = tmp_path / "ready"
    program = ("import signal, time, pathlib\n"
               "signal.signal(signal.SIGUSR1, lambda *a: print('GOT USR1', flush=True))\n"
               f"pathlib.Path({str(ready)!r}).write_text('')\n"
               "time.sleep(1)\n")
    guard = subprocess.Popen([sys.executable, "-m", "dsl.launcher.host.guard", "--grace-s=1", "--env-stdin",
                              "--watch-stdin", "--", sys.executable, "-c", program],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    guard.stdin.write(json.dumps({}) + "\n")
    guard.stdin.flush()
    deadline = time.monotonic() + 20
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    guard.stdin.write("signal USR1\n")
    guard.stdin.flush()
    assert guard.wait(timeout=20) == 0  # the program ended on its own; stdin stayed open
    assert guard.stdout.read() == "GOT USR1\n"


def test_guard_lingers_on_75_and_a_sigterm_meanwhile_keeps_the_code():
    guard = subprocess.Popen([sys.executable, "-m", "dsl.launcher.host.guard", "--grace-s=1",
                              "--checkpointed-linger-s=10", "--", "sh", "-c", f"exit {EXIT_CHECKPOINTED}"])
    time.sleep(1.5)
    assert guard.poll() is None  # lingering
    guard.send_signal(signal.SIGTERM)  # what srun --kill-on-bad-exit sends when another node exits first
    assert guard.wait(timeout=5) == EXIT_CHECKPOINTED


# The trainer in this process ----------------------------------------------------------------------

TINY = "    model: {vocab_size: 64, hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, seq_len: 16}\n"


@pytest.fixture
def signal_at_step(monkeypatch: pytest.MonkeyPatch):
    """signal_at_step(N, sig): the trainer receives `sig` during optimizer step N (a real signal)."""
    from dsl.engine import core

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    plan: dict[str, int] = {}
    real_step = core.Engine.step

    def step(self):
        real_step(self)
        if self.global_step == plan.get("step"):
            os.kill(os.getpid(), plan["signal"])

    monkeypatch.setattr(core.Engine, "step", step)

    def arm(at: int, sig: int = signal.SIGUSR1) -> None:
        plan.update(step=at, signal=sig)

    return arm


def _train_spec(tmp_path: Path, steps: int, checkpoint_every: str = "null") -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(f"run:\n  train:\n    steps: {steps}\n    log_every: 100\n    checkpoint_every: {checkpoint_every}\n"
                    f"{TINY}engine:\n  micro_batch: 2\noutput_dir: {tmp_path / 'out'}\n")
    return path


def _noted(signum, frame):  # the test's own handler: without the trainer's, a signal lands here
    _noted.count += 1


_noted.count = 0


@pytest.fixture
def own_handler():
    previous = {sig: signal.signal(sig, _noted) for sig in (signal.SIGUSR1, signal.SIGUSR2)}
    yield
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def test_trainer_checkpoints_at_the_step_of_the_signal_exits_75_and_resumes(
        tmp_path, signal_at_step, own_handler, capsys):
    from dsl.engine.train import main

    signal_at_step(3)
    assert main([str(_train_spec(tmp_path, steps=8))]) == EXIT_CHECKPOINTED
    err = capsys.readouterr().err
    checkpoints = tmp_path / "out/checkpoints"
    assert (f"SIGUSR1 received: checkpointed step 3 to {checkpoints}; exiting with code 75" in err)
    assert (checkpoints / "latest").read_text().strip() == "step-000003"
    assert [json.loads(line)["step"] for line in (tmp_path / "out/metrics.jsonl").read_text().splitlines()] \
        == [3]  # the stop step is logged like a log_every step
    assert signal.getsignal(signal.SIGUSR1) is _noted  # main() put the previous handler back
    signal_at_step(0)
    assert main([str(_train_spec(tmp_path, steps=8))]) == 0
    assert f"resumed from {checkpoints} at step 3" in capsys.readouterr().err
    assert (checkpoints / "latest").read_text().strip() == "step-000003"  # no checkpoint_every: none new
    rows = [json.loads(line)["step"] for line in (tmp_path / "out/metrics.jsonl").read_text().splitlines()]
    assert rows == [3, 8]


def test_sigusr2_too_and_a_checkpoint_step_is_saved_once(tmp_path, signal_at_step, own_handler, capsys,
                                                         monkeypatch):
    from dsl.engine import core
    from dsl.engine.train import main

    saved = []
    real_save = core.Engine.save_checkpoint
    monkeypatch.setattr(core.Engine, "save_checkpoint",
                        lambda self, d, **kw: saved.append(kw["step"]) or real_save(self, d, **kw))
    signal_at_step(4, signal.SIGUSR2)
    assert main([str(_train_spec(tmp_path, steps=8, checkpoint_every="2"))]) == EXIT_CHECKPOINTED
    assert saved == [2, 4]
    assert "SIGUSR2 received: checkpointed step 4" in capsys.readouterr().err


def test_a_signal_in_the_last_step_just_finishes(tmp_path, signal_at_step, own_handler):
    from dsl.engine.train import main

    signal_at_step(5)
    before = _noted.count
    assert main([str(_train_spec(tmp_path, steps=5))]) == 0
    assert _noted.count == before  # the trainer's handler got it (without one, the test's would)
    assert not (tmp_path / "out/checkpoints").exists()
