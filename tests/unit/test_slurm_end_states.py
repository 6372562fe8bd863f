"""A Slurm job that ends in TIMEOUT, NODE_FAIL, OUT_OF_MEMORY or PREEMPTED is reported by its
state and what it means, with the exit code the state stands for (launcher/backends/slurm.py),
and the rank that failed when a rank's report says so. A stateful fake of sbatch/scontrol (tests/unit/slurm_fake.py) drives
the real SlurmJob through supervise (launcher/supervise.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from dsl.launcher.backends import slurm
from dsl.launcher.backends.slurm import SlurmJob, exit_code
from dsl.launcher.output import Failure
from dsl.launcher.supervise import EXIT_LOST_HOST, EXIT_TIME_LIMIT, supervise
from tests.unit.slurm_fake import FakeSlurm


def _FakeSlurm(end: str, code: str = "0:15") -> FakeSlurm:
    """sbatch answers job 77; scontrol shows it PENDING, RUNNING twice, then `end` for good."""
    return FakeSlurm(end=end, code=code)


def _plan(tmp_path):
    submit = SimpleNamespace(argv=("sbatch", "--parsable", "job.sh"), cwd=str(tmp_path), env={})
    return SimpleNamespace(name="job", world_size=2, max_restarts=0, submit=submit, job_output=None,
                           output_dir=str(tmp_path))


class _Output:
    def __init__(self, failures=None):
        self.failures, self.rank_hosts = dict(failures or {}), {}

    def __call__(self, host, stream, line):
        pass

    def note(self, text, ranks=None):
        pass


def _run(tmp_path, monkeypatch, fake, output):
    monkeypatch.setattr(slurm, "POLL_S", 0.01)
    backend = SimpleNamespace(start=lambda plan, sink: [SlurmJob(plan, sink, fake)])
    return supervise(_plan(tmp_path), backend, output)


@pytest.mark.parametrize(("state", "code", "words"), [
    ("TIMEOUT", EXIT_TIME_LIMIT, "reached its time limit"),
    ("NODE_FAIL", EXIT_LOST_HOST, "a node of its allocation failed"),
    ("OUT_OF_MEMORY", 137, "exceeded its memory allocation"),
    ("PREEMPTED", 143, "preempted"),
])
def test_the_end_state_is_named_with_its_exit_code(tmp_path, monkeypatch, state, code, words):
    outcome = _run(tmp_path, monkeypatch, _FakeSlurm(state), _Output())
    assert outcome.exit_code == code
    assert outcome.detail == f"Slurm job 77 ended {state}: {slurm.STATE_MEANINGS[state]}" and words in outcome.detail


def test_a_rank_report_names_the_rank_and_the_state_keeps_its_code(tmp_path, monkeypatch):
    """Ranks killed at the time limit report SIGTERM; the job's code is still the time limit's."""
    output = _Output({"slurm job 77": Failure("slurm job 77", 1, -15, "SIGTERM")})
    outcome = _run(tmp_path, monkeypatch, _FakeSlurm("TIMEOUT"), output)
    assert (outcome.exit_code, outcome.failed_rank) == (EXIT_TIME_LIMIT, 1)
    assert "ended TIMEOUT" in outcome.detail


def test_exit_codes_of_states_without_one_follow_the_job_code():
    assert exit_code("COMPLETED", "0:0") == 0
    assert exit_code("FAILED", "3:0") == 3
    assert exit_code("CANCELLED", "0:15") == 128 + 15
    assert exit_code("FAILED", "0:0") == 1
    assert exit_code("TIMEOUT", "0:15") == EXIT_TIME_LIMIT
