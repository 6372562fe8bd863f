"""Preflight turns each host's probe answer into rows; every failure names host and fix."""

from __future__ import annotations

import json
import subprocess
import sys

from dsl.engine.errors import UserError
from dsl.launcher.hosts import Host
from dsl.launcher.plan import RenderInputs
from dsl.launcher.render import render
from dsl.launcher.preflight import PROBE, failures, probe_argv, run_preflight
from dsl.launcher.spec import load_spec


def _plan(write, hosts):
    write("hf", "".join(f"{h.name} slots={len(h.slots)}\n" for h in hosts))
    spec = load_spec(write("s.yaml", "name: t\nrun: {train: {}}\nresources: {backend: ssh, hostfile: hf}\n"))
    return render(spec, hosts, RenderInputs(python="/py", cwd="/w", master_port=29500, env_values={},
                                            set_visible_devices=True))


def _answer(**over):
    base = {"python": "3.11.7", "torch": "2.13.0", "dsl": "0.1.0", "hostname": "h", "cpus": 8,
            "gpus": 8, "master_reachable": True, "master_ip": "10.0.0.1", "port_free": True}
    base.update(over)
    return base


def _runner(answers):
    def run(host, argv):
        answer = answers[host]
        if isinstance(answer, Exception):
            raise answer
        return 0, json.dumps(answer) + "\n", ""
    return run


def test_all_good(write):
    plan = _plan(write, [Host("a", (0, 1)), Host("b", (0, 1))])
    rows = run_preflight(plan, _runner({"a": _answer(), "b": _answer()}))
    assert failures(rows) is None
    assert {(r.host, r.name) for r in rows} >= {("a", "reachable"), ("b", "torch"), ("a", "port"),
                                                ("b", "master"), ("b", "slots")}


def test_each_problem_is_named(write, monkeypatch):
    monkeypatch.setattr("dsl.launcher.preflight.local_dsl_version", lambda: "0.1.0")
    plan = _plan(write, [Host("a", (0, 1)), Host("b", (0, 1, 2)), Host("c", (0,)), Host("d", (0,))])
    answers = {
        "a": _answer(port_free=False, port_error="[Errno 98] Address already in use"),
        "b": _answer(torch="2.4.0", gpus=2),
        "c": UserError("c: no answer on port 22 within 5 s"),
        "d": _answer(master_reachable=False, master_error="timed out", dsl=None),
    }
    message = failures(run_preflight(plan, _runner(answers)))
    assert "a: port: 29500 in use" in message
    assert "b: torch: torch 2.4.0, others have 2.13.0" in message
    assert "b: slots: slots [0, 1, 2] but only 2 GPU(s) found" in message
    assert "c: reachable: c: no answer on port 22 within 5 s" in message
    assert "d: master: a unreachable from d: timed out" in message
    assert "d: dsl: dsl is not installed" in message


def test_the_probe_itself_runs_and_answers(write):
    """The real probe program, run here: stdlib only, valid JSON, no torch import."""
    plan = _plan(write, [Host("a", (0,))])
    argv = probe_argv(plan, 0)
    argv[0] = sys.executable
    argv[3] = "127.0.0.1"
    proc = subprocess.run([*argv[:2], PROBE + "\nimport sys; assert 'torch' not in sys.modules", *argv[3:]],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    answer = json.loads(proc.stdout)
    assert answer["python"] == ".".join(map(str, sys.version_info[:3]))
    assert answer["torch"] and answer["gpus"] == 0 and answer["port_free"] is True
