"""`dsl render SPEC --format k8s` (launcher/k8s.py): an Indexed Job + headless Service that pass
the Kubernetes API schema (kubernetes-validate, strict: no unknown field), whose pods each run the
per-node start of launcher/backends/pernode.py with the node rank from the completion index."""

from __future__ import annotations

import sys

import kubernetes_validate
import pytest
import yaml

from dsl.launcher import cli

SPEC = """name: Tiny_K8s.job
run:
  train:
    model: {preset: tiny}
    steps: 3
resources:
  nodes: 3
  procs_per_node: 2
  master_port: 29444
engine: {zero_stage: 0, precision: fp32, micro_batch: 2, grad_accum: 1}
"""


def _dsl(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["dsl", *args])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    out, err = capsys.readouterr()
    return exit_.value.code, out, err


@pytest.fixture
def spec(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(SPEC)
    return path


def _docs(monkeypatch, capsys, spec, *extra: str) -> dict[str, dict]:
    code, out, err = _dsl(monkeypatch, capsys, "render", str(spec), "--format", "k8s", *extra)
    assert code in (0, None), err
    return {doc["kind"]: doc for doc in yaml.safe_load_all(out)}


def test_the_manifest_passes_the_kubernetes_schema(monkeypatch, capsys, spec):
    docs = _docs(monkeypatch, capsys, spec, "--image", "registry.example/dsl:1", "--gpus-per-node", "2")
    assert sorted(docs) == ["ConfigMap", "Job", "Service"]
    for doc in docs.values():
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_a_broken_manifest_is_refused_by_the_same_validator(monkeypatch, capsys, spec):
    """The check above can fail: the validator knows the Job's fields and their types."""
    job = _docs(monkeypatch, capsys, spec)["Job"]
    job["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError, match="imagePullPolicyy"):
        kubernetes_validate.validate(job, kubernetes_validate.latest_version(), strict=True)


def test_an_indexed_job_and_a_headless_service_run_one_pod_per_node(monkeypatch, capsys, spec):
    docs = _docs(monkeypatch, capsys, spec, "--image", "img:1")
    job, service, config = docs["Job"], docs["Service"], docs["ConfigMap"]
    name = "tiny-k8s-job"
    assert job["metadata"]["name"] == service["metadata"]["name"] == name
    assert (job["spec"]["completionMode"], job["spec"]["completions"], job["spec"]["parallelism"]) == ("Indexed", 3, 3)
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["selector"] == {"dsl-job": name}
    pod = job["spec"]["template"]
    assert pod["metadata"]["labels"]["dsl-job"] == name and pod["spec"]["subdomain"] == name
    (container,) = pod["spec"]["containers"]
    assert container["image"] == "img:1"
    assert container["command"] == ["dsl", "launch", "/etc/dsl/spec.yaml", "--node-rank=$(JOB_COMPLETION_INDEX)",
                                    "--nnodes=3", f"--master-addr={name}-0.{name}", "--master-port=29444"]
    (index,) = [e for e in container["env"] if e["name"] == "JOB_COMPLETION_INDEX"]
    assert index["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert config["data"] == {"spec.yaml": SPEC}
    assert pod["spec"]["volumes"][0]["configMap"]["name"] == config["metadata"]["name"]


def test_the_pods_command_is_a_per_node_launch_of_the_spec(monkeypatch, capsys, spec):
    """Pod 2's command, with its index filled in as Kubernetes does, run as a dry run here."""
    container = _docs(monkeypatch, capsys, spec)["Job"]["spec"]["template"]["spec"]["containers"][0]
    argv = [a.replace("$(JOB_COMPLETION_INDEX)", "2").replace("/etc/dsl/spec.yaml", str(spec))
            for a in container["command"][1:]]
    code, out, err = _dsl(monkeypatch, capsys, *argv, "--dry-run")
    assert code in (0, None), err
    assert "6 rank(s)" in out and "backend pernode, master tiny-k8s-job-0.tiny-k8s-job:29444" in out
    assert "node_rank 2, ranks 4-5" in out and "--nnodes=3 --node-rank=2" in out


def test_other_formats_and_backends_are_refused(monkeypatch, capsys, spec, tmp_path):
    code, _, err = _dsl(monkeypatch, capsys, "render", str(spec), "--format", "helm")
    assert code == 2 and "--format helm: dsl render writes k8s" in err
    spec.write_text(SPEC.replace("  nodes: 3\n", "  nodes: 3\n  backend: slurm\n"))
    code, _, err = _dsl(monkeypatch, capsys, "render", str(spec), "--format", "k8s")
    assert code == 2 and "resources.backend: a Kubernetes Job starts one pod per node itself" in err
    assert "Traceback" not in err


def test_a_hostfile_is_refused_as_the_pods_would_refuse_it(monkeypatch, capsys, spec):
    spec.write_text(SPEC.replace("  nodes: 3\n", "  nodes: 3\n  hostfile: hf\n"))
    code, _, err = _dsl(monkeypatch, capsys, "render", str(spec), "--format", "k8s")
    assert code == 2 and "resources.hostfile: backend pernode runs on the machine it is started on" in err


def test_the_manifest_matches_the_golden_file(monkeypatch, capsys):
    """The whole manifest of tests/golden/pernode-k8s.yaml (DSL_REGEN_GOLDEN=1 rewrites it)."""
    import os

    from tests.conftest import ROOT

    spec, golden = ROOT / "tests/golden/pernode-k8s.yaml", ROOT / "tests/golden/pernode-k8s.manifest.yaml"
    code, out, err = _dsl(monkeypatch, capsys, "render", str(spec), "--format", "k8s",
                          "--image", "registry.example/train:1")
    assert code in (0, None), err
    if os.environ.get("DSL_REGEN_GOLDEN"):
        golden.write_text(out)
    assert out == golden.read_text(), "run with DSL_REGEN_GOLDEN=1 to accept a deliberate change"
    for doc in yaml.safe_load_all(out):
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
