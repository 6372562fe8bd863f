"""The Slurm batch script: compared whole against a golden file; parsing of Slurm's answers."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from dsl.launcher.backends.slurm import exit_code, labelled, parse_job
from dsl.launcher.hosts import Host
from dsl.launcher.plan import RenderInputs
from dsl.launcher.render import render
from dsl.launcher.slurm import SCRIPT_NAME
from dsl.launcher.spec import load_spec
from tests.conftest import ROOT

GOLDEN = ROOT / "tests/golden"
INPUTS = RenderInputs(python="/opt/venv/bin/python", cwd="/home/alice/project", master_port="auto",
                      env_values={"NCCL_DEBUG": "WARN", "HF_TOKEN": "hf_secret_value",
                                  "TRICKY": "a b; echo pwned $(id) 'q' \"dq\""},
                      set_visible_devices=False)


def _script() -> tuple[str, object]:
    spec = load_spec(GOLDEN / "two-node.yaml")
    hosts = [Host(f"slurm-node{i}", (0, 1, 2, 3)) for i in range(2)]
    plan = render(spec, hosts, INPUTS)
    text = plan.files[f"/scratch/runs/two-node/{SCRIPT_NAME}"]
    # The only machine-dependent parts: where this checkout lives, and the version.
    return text.replace(str(ROOT), "<ROOT>").replace(f"dsl {_version()}", "dsl <VERSION>"), plan


def _version() -> str:
    from importlib import metadata

    return metadata.version("dsl")


def test_script_matches_golden_file():
    text, _ = _script()
    golden = GOLDEN / "two-node.sbatch.sh"
    if os.environ.get("DSL_REGEN_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text(), "run with DSL_REGEN_GOLDEN=1 to accept a deliberate change"


def test_secret_never_in_script_and_plan_submits_with_it():
    text, plan = _script()
    assert "hf_secret_value" not in text and "HF_TOKEN" in text  # named, not valued
    assert plan.submit.argv == ("sbatch", "--parsable", "/scratch/runs/two-node/sbatch.sh")
    assert plan.submit.env["HF_TOKEN"] == "hf_secret_value"  # reaches sbatch's environment only
    assert "hf_secret_value" not in plan.describe()


def test_script_is_valid_bash_and_exports_values_byte_for_byte(tmp_path):
    """Run the script's export lines and the node command through a real bash."""
    text, _ = _script()
    exports = "\n".join(line for line in text.splitlines() if line.startswith("export "))
    probe = tmp_path / "probe.sh"
    probe.write_text(exports + '\nprintf "%s" "$TRICKY"\n')
    out = subprocess.run(["bash", str(probe)], capture_output=True, text=True, check=True).stdout
    assert out == "a b; echo pwned $(id) 'q' \"dq\""
    assert subprocess.run(["bash", "-n", "-c", text]).returncode == 0  # parses


def test_srun_node_command_expands_slurm_variables(tmp_path):
    """The `bash -c '...'` of srun, run by bash with Slurm's variables set, yields the argv."""
    text, _ = _script()
    srun_line = next(line for line in text.splitlines() if line.startswith("srun "))
    node_command = srun_line.split(" bash -c ", 1)[1]
    fake_exec = tmp_path / "bin"
    fake_exec.mkdir()
    show = f'cd /; exec python3 -c "import sys, json; print(json.dumps(sys.argv[1:]))" '
    script = subprocess.run(["bash", "-c", f"printf %s {node_command}"], capture_output=True,
                            text=True, check=True).stdout
    # Replace the real program by one that prints its argv, keep everything else.
    script = script.replace("cd /home/alice/project && exec /opt/venv/bin/python", show + "/opt/venv/bin/python")
    env = {"SLURM_NODEID": "1", "MASTER_ADDR": "gpu-017", "MASTER_PORT": "23456",
           "SLURMD_NODENAME": "gpu-018", "NNODES": "3", "PATH": os.environ["PATH"]}
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, check=True)
    import json

    argv = json.loads(out.stdout)
    assert "--nnodes=3" in argv  # the allocation's node count (sbatch --nodes=N), not the spec's
    assert "--node-rank=1" in argv and "--master-addr=gpu-017" in argv and "--master-port=23456" in argv
    assert "--log-dir=/scratch/runs/two-node/logs/torchelastic/gpu-018" in argv
    assert argv[-3:] == ["-m", "dsl.engine.train", "/scratch/runs/two-node/resolved.yaml"]


def test_slurm_answers_are_parsed():
    job = parse_job("JobId=42 JobName=x JobState=FAILED Reason=NonZeroExitCode ExitCode=3:0 NodeList=n[1-2]")
    assert (job["JobState"], job["ExitCode"], job["NodeList"]) == ("FAILED", "3:0", "n[1-2]")
    assert exit_code("COMPLETED", "0:0") == 0
    assert exit_code("FAILED", "3:0") == 3
    assert exit_code("CANCELLED", "0:15") == 128 + 15
    assert exit_code("TIMEOUT", "0:0") == 124  # the time limit, as dsl launch --time-limit


def test_labels_map_to_hosts():
    seen = []
    sink = labelled(lambda host, stream, line: seen.append((host, line)), ["n1", "n2"], "job")
    sink("x", "stdout", "1: [dsl:3:1] hello")
    sink("x", "stdout", " 0: [dsl:0:0] hi")
    sink("x", "stdout", "srun: error: something")
    assert seen == [("n2", "[dsl:3:1] hello"), ("n1", "[dsl:0:0] hi"), ("job", "srun: error: something")]


def test_sbatch_command_writes_script_and_resolved_spec(tmp_path):
    from tests.conftest import run_dsl

    spec = tmp_path / "s.yaml"
    spec.write_text(f"name: j\nrun: {{train: {{steps: 5}}}}\nresources: {{nodes: 2, procs_per_node: 1}}\n"
                    f"output_dir: {tmp_path / 'out'}\n")
    proc = run_dsl("sbatch", str(spec), "-o", str(tmp_path / "job.sh"))
    assert proc.returncode == 0, proc.stderr
    script = (tmp_path / "job.sh").read_text()
    assert "#SBATCH --nodes=2" in script and "srun " in script
    assert (tmp_path / "out/resolved.yaml").exists()  # the script runs it
    assert os.access(tmp_path / "job.sh", os.X_OK)


@pytest.mark.parametrize("bad", ["--nodelist=a\n#SBATCH --x", "no-dash"])
def test_bad_extra_sbatch_lines_are_refused(tmp_path, bad):
    from dsl.engine.errors import UserError

    spec = tmp_path / "s.yaml"
    spec.write_text("name: j\nrun: {train: {}}\nresources:\n  backend: slurm\n  slurm:\n"
                    f"    extra_sbatch: [{bad!r}]\n".replace("'", '"'))
    with pytest.raises(UserError, match="resources.slurm.extra_sbatch"):
        load_spec(spec)
