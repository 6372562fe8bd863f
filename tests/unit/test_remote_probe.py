"""Remote hosts are probed over the plan's backend; the planner plans for the weakest."""

import json

import pytest

from dsl.engine.errors import UserError
from dsl.launcher import remote_probe
from dsl.topology.probe import FIXTURES


def recording(fixture: str) -> str:
    return json.dumps(json.loads((FIXTURES / f"{fixture}.json").read_text()))


class FakePlan:
    backend = "ssh"

    def __init__(self, hosts):
        from types import SimpleNamespace

        self.hosts = tuple(SimpleNamespace(host=h, argv=["/opt/venv/bin/python", "-m", "x"]) for h in hosts)


def test_every_host_is_probed_with_the_plans_python_and_the_weakest_is_chosen():
    answers = {"big": recording("h100-sxm-8x"), "small": recording("l40s-8x-pcie")}
    seen = []

    def run(host, argv):
        seen.append((host, argv))
        return 0, "some banner\n" + answers[host] + "\n", ""

    topos = remote_probe.probe_hosts(FakePlan(["big", "small"]), run)
    assert sorted(seen) == [(h, ["/opt/venv/bin/python", "-m", "dsl.topology.probe"]) for h in ("big", "small")]
    assert topos["big"].source == "probe of big" and len(topos["big"].accelerators) == 8
    name, topo = remote_probe.weakest(topos)
    assert name == "small"  # 48 GB L40S < 80 GB H100
    assert topo is topos["small"]


def test_hosts_that_cannot_be_probed_are_all_named():
    def run(host, argv):
        if host == "down":
            raise UserError("down: cannot connect: Connection refused")
        return 1, "", "Traceback...\nModuleNotFoundError: No module named 'dsl'"

    with pytest.raises(UserError) as err:
        remote_probe.probe_hosts(FakePlan(["down", "old"]), run)
    text = str(err.value)
    assert "down: cannot connect" in text and "old: the probe failed: ModuleNotFoundError" in text
    assert "dsl preflight" in text


def test_the_probe_module_prints_this_hosts_recording():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "dsl.topology.probe"], capture_output=True, text=True, check=True)
    data = json.loads(out.stdout.strip().splitlines()[-1])
    assert data["schema"] == "dsl.topology.recording/1" and data["host"]["cpu"]["logical_cpus"] >= 1
    assert "torch" not in out.stderr
