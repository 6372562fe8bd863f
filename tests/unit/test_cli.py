"""The `dsl` command as a user meets it: exit codes, one-line errors, no torch on the fast path."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, run_dsl

NO_TORCH = """
import sys
sys.argv = ["dsl", *sys.argv[1:]]
from dsl.launcher.cli import main
try:
    main()
except SystemExit as exc:
    code = exc.code
print("TORCH_IMPORTED" if "torch" in sys.modules else "NO_TORCH", code, file=sys.stderr)
"""


@pytest.mark.parametrize("args", [
    ["--help"],
    ["launch", str(ROOT / "configs/tiny-cpu.yaml"), "--dry-run"],
    ["validate", str(ROOT / "configs/tiny-cpu.yaml")],
    ["hosts", "--json"],
    ["schema"],
], ids=lambda a: " ".join(a[:1] + a[2:]))
def test_fast_paths_never_import_torch(args):
    proc = subprocess.run([sys.executable, "-c", NO_TORCH, *args], capture_output=True, text=True,
                          timeout=60)
    assert proc.stderr.strip().splitlines()[-1] in ("NO_TORCH 0", "NO_TORCH None"), proc.stderr


def test_typo_in_spec_exits_2_with_location_and_no_traceback(write):
    spec = write("job.yaml", "name: x\nrun:\n  train: {}\nresources:\n  procs_per_nod: 2\n")
    proc = run_dsl("launch", str(spec))
    assert proc.returncode == 2
    assert f"{spec}:5:3 resources.procs_per_nod: unknown field 'procs_per_nod'; " \
           "did you mean 'procs_per_node'?" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    # DSL_DEBUG=1 shows where it came from.
    debug = run_dsl("validate", str(spec), env={"DSL_DEBUG": "1"})
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_validate_many_reports_each(write):
    good = ROOT / "configs/tiny-cpu.yaml"
    bad = write("bad.yaml", "name: 'has space'\nrun: {train: {}}\n")
    proc = run_dsl("validate", str(good), str(bad))
    assert proc.returncode == 2
    assert f"{good}: ok" in proc.stdout
    assert f"{bad}:1:7 name: 'has space' may hold only letters" in proc.stderr


def test_hosts_json_contract(write):
    hostfile = write("hostfile", "# cluster\nworker-0 slots=4\nworker-1 slots=4\n\nworker-2 slots=2\n")
    proc = run_dsl("hosts", "--hostfile", str(hostfile), "--include", "worker-0:0,2@worker-2", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"hosts": [{"name": "worker-0", "slots": [0, 2]},
                                                  {"name": "worker-2", "slots": [0, 1]}]}
    proc = run_dsl("hosts", "--hostfile", str(hostfile), "--exclude", "worker-1", "--num-procs", "1",
                   "--json")
    assert json.loads(proc.stdout) == {"hosts": [{"name": "worker-0", "slots": [0]},
                                                  {"name": "worker-2", "slots": [0]}]}
    local = run_dsl("hosts", "--num-procs", "3", "--json")
    assert json.loads(local.stdout) == {"hosts": [{"name": "localhost", "slots": [0, 1, 2]}]}


def test_hosts_rejects_what_deepspeed_gets_wrong(write):
    hostfile = write("hostfile", "worker-0 slots=4\nworker-1 slots=4\n")
    cases = [
        (["--include", "worker-0", "--exclude", "worker-1"], "mutually exclusive"),
        (["--include", "worker-9"], "worker-9"),
        (["--include", "worker-0:4"], "slot 4"),
    ]
    for extra, text in cases:
        proc = run_dsl("hosts", "--hostfile", str(hostfile), *extra, "--json")
        assert proc.returncode == 2, (extra, proc.stderr)
        assert text in proc.stderr and "Traceback" not in proc.stderr
        assert proc.stdout == ""
    bad = write("bad", "worker-0 slots=4\nworker-0 slots=2\n")
    proc = run_dsl("hosts", "--hostfile", str(bad))
    assert proc.returncode == 2 and f"{bad}:2" in proc.stderr


def test_dry_run_prints_commands_and_starts_nothing(tmp_path, monkeypatch, capsys):
    """In-process, with every way of starting a process made to fail."""
    from dsl.launcher import cli

    def forbidden(*_a, **_k):
        raise AssertionError("dry run started a process")

    monkeypatch.setattr(subprocess, "Popen", forbidden)
    monkeypatch.setattr(os, "fork", forbidden)
    monkeypatch.setattr(os, "posix_spawn", forbidden)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["dsl", "launch", str(ROOT / "configs/tiny-cpu.yaml"), "--dry-run"])
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code in (0, None)
    out = capsys.readouterr().out
    assert "[localhost] node_rank 0, ranks 0-1" in out
    assert "-m dsl.launcher.host.elastic" in out and "--nproc-per-node=2" in out
    assert "-m dsl.engine.train" in out
    assert not (tmp_path / "runs").exists()  # nothing written either


def test_dry_run_json_is_the_plan(write):
    spec = write("s.yaml", "name: j\nrun: {script: s.py, args: [a]}\nresources: {procs_per_node: 2}\n")
    write("s.py", "")
    proc = run_dsl("launch", str(spec), "--dry-run", "--json")
    plan = json.loads(proc.stdout)
    assert plan["world_size"] == 2 and plan["hosts"][0]["argv"][-2:] == [str(spec.parent / "s.py"), "a"]
