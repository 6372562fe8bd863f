"""SlurmJob (launcher/backends/slurm.py) followed through Slurm's states with the stateful fake of
tests/unit/slurm_fake.py: a pending job, its output lines mapped to their node, a requeued job
that runs again on other nodes, a job that only sacct still knows, and scancel. Fast: POLL_S is
set to 10 ms."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from dsl.engine.errors import RunError
from dsl.launcher.backends import slurm
from dsl.launcher.backends.slurm import SlurmBackend, SlurmJob
from tests.unit.slurm_fake import FakeSlurm


@pytest.fixture(autouse=True)
def _fast(monkeypatch):
    monkeypatch.setattr(slurm, "POLL_S", 0.01)


def _plan(tmp_path):
    submit = SimpleNamespace(argv=("sbatch", "--parsable", "job.sh"), cwd=str(tmp_path), env={"A": "1"})
    return SimpleNamespace(name="job", world_size=4, max_restarts=0, submit=submit,
                           job_output=str(tmp_path / "slurm-%j.out"), output_dir=str(tmp_path))


def _follow(tmp_path, fake, timeout_s=5.0):
    lines = []
    job = SlurmJob(_plan(tmp_path), lambda host, stream, line: lines.append((host, line)), fake)
    job.wait_output(timeout_s)
    return job, lines


def test_a_pending_job_runs_and_its_lines_go_to_their_nodes(tmp_path, caplog):
    caplog.set_level("INFO", logger=slurm.__name__)
    fake = FakeSlurm([("PENDING", "(null)", 0, ()), ("PENDING", "(null)", 0, ()),
                      ("RUNNING", "n[1-2]", 0, ("0: [dsl:0:0] hello", "1: [dsl:2:0] from n2")),
                      ("RUNNING", "n[1-2]", 0, ("srun: a line of srun's",))],
                     output=tmp_path / "slurm-77.out")
    job, lines = _follow(tmp_path, fake)
    assert job.poll() == 0 and job.job_id == "77" and job.end_detail is None
    assert lines == [("n1", "[dsl:0:0] hello"), ("n2", "[dsl:2:0] from n2"),
                     ("slurm job 77", "srun: a line of srun's")]
    states = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Slurm job 77:")]
    assert states == ["Slurm job 77: PENDING", "Slurm job 77: RUNNING on n[1-2]", "Slurm job 77: COMPLETED on n[1-2]"]


def test_a_requeued_job_is_followed_through_its_second_run_on_other_nodes(tmp_path, caplog):
    caplog.set_level("INFO", logger=slurm.__name__)
    fake = FakeSlurm([("RUNNING", "n[1-2]", 0, ("1: [dsl:2:0] first run",)),
                      ("PENDING", "(null)", 1, ()),
                      ("RUNNING", "n[3-4]", 1, ("1: [dsl:2:0] second run",))],
                     output=tmp_path / "slurm-77.out",
                     hostnames={"n[1-2]": ["n1", "n2"], "n[3-4]": ["n3", "n4"]})
    job, lines = _follow(tmp_path, fake)
    assert job.poll() == 0
    assert lines == [("n2", "[dsl:2:0] first run"), ("n4", "[dsl:2:0] second run")]
    assert any("was requeued (restart 1)" in r.getMessage() for r in caplog.records)


def test_a_job_only_sacct_still_knows_ends_with_its_code(tmp_path):
    """scontrol has forgotten the job (MinJobAge): sacct's state and exit code decide."""
    fake = FakeSlurm([], end="FAILED", code="3:0", scontrol_knows=False)
    job, _ = _follow(tmp_path, fake)
    assert job.poll() == 3
    assert job.end_detail == f"Slurm job 77 ended FAILED: {slurm.STATE_MEANINGS['FAILED']}"
    assert fake.ran("sacct")


def test_scontrol_answers_while_running_then_sacct_once_it_forgot(tmp_path):
    fake = FakeSlurm([("RUNNING", "n[1-2]", 0, ()), ("RUNNING", "n[1-2]", 0, ())], end="TIMEOUT",
                     code="0:15", forget_after=2)
    job, _ = _follow(tmp_path, fake)
    assert len(fake.ran("sacct")) == 1  # asked only once scontrol stopped answering
    assert job.poll() == slurm.state_exit_code("TIMEOUT") and "ended TIMEOUT" in job.end_detail


def test_terminate_cancels_the_job_and_it_ends_cancelled(tmp_path):
    fake = FakeSlurm([("RUNNING", "n[1-2]", 0, ())] * 1000)
    job = SlurmJob(_plan(tmp_path), lambda *a: None, fake)
    job.terminate()
    job.wait_output(5.0)
    assert fake.ran("scancel") == [["scancel", "77"]]
    assert job.poll() == 128 + 15 and "ended CANCELLED" in job.end_detail
    job.kill()
    assert fake.ran("scancel")[-1] == ["scancel", "--signal=KILL", "--full", "77"]


def test_sbatch_refusing_the_job_is_a_run_error(tmp_path):
    def refuse(argv, **_kw):
        import subprocess

        return subprocess.CompletedProcess(argv, 1, "", "sbatch: error: invalid partition\n")

    with pytest.raises(RunError, match="sbatch refused the job: sbatch: error: invalid partition"):
        SlurmJob(_plan(tmp_path), lambda *a: None, refuse)


def test_the_backend_submits_with_sbatch_outside_an_allocation(tmp_path):
    fake = FakeSlurm([])
    (job,) = SlurmBackend(run=fake).start(_plan(tmp_path), lambda *a: None)
    job.wait_output(5.0)
    assert fake.calls[0] == ["sbatch", "--parsable", "job.sh"] and job.poll() == 0
