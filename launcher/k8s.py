"""`dsl render SPEC --format k8s`: an example Kubernetes Indexed Job that runs SPEC per node.

Kubernetes starts one pod per node itself; each pod runs the pernode backend
(launcher/backends/pernode.py):

    dsl launch /etc/dsl/SPEC --node-rank=$(JOB_COMPLETION_INDEX) --nnodes=N --master-addr=JOB-0.JOB --master-port=P

The manifest (templates/k8s-indexed-job.yaml.tmpl, values filled in here) holds a ConfigMap with
the spec file as written (mounted at /etc/dsl; paths the spec names, such as data.path, must exist
in the image), a headless Service named like the Job (pod i of an Indexed Job with that subdomain
is reachable as JOB-i.JOB, so node 0's name is known before any pod starts), and the Job itself
(completionMode Indexed, completions = parallelism = nodes, restartPolicy Never, backoffLimit 0).
The image must have dsl, torch and the job's code installed (`--image`). Names follow Kubernetes'
DNS label rule: the spec's name lowercased, other characters turned into '-'.
"""

from __future__ import annotations

import re
from importlib import resources

import yaml

from dsl.engine.errors import UserError
from dsl.launcher.spec import SpecFile

TEMPLATE = "k8s-indexed-job.yaml.tmpl"
SPEC_DIR = "/etc/dsl"
DEFAULT_IMAGE = "dsl:latest"
_MAX_JOB_NAME = 63 - len("-99999")  # pod hostnames are JOB-INDEX, a DNS label (<= 63)


def job_name(spec_file: SpecFile) -> str:
    """The spec's name as a Kubernetes DNS label."""
    name = re.sub(r"[^a-z0-9-]+", "-", spec_file.spec.name.lower()).strip("-")
    if not name or len(name) > _MAX_JOB_NAME:
        raise UserError(f"{spec_file.where('name')}: {spec_file.spec.name!r} gives no Kubernetes name "
                        f"(lowercase letters, digits and '-', at most {_MAX_JOB_NAME} characters)")
    return name


def render_k8s(spec_file: SpecFile, *, image: str = DEFAULT_IMAGE, gpus_per_node: int | None = None) -> str:
    """The manifests (YAML documents) of an Indexed Job running SPEC on resources.nodes pods."""
    from dsl.launcher.backends.pernode import DEFAULT_PORT, NodeArgs, with_node_args

    name, res = job_name(spec_file), spec_file.spec.resources
    port = res.master_port if isinstance(res.master_port, int) else DEFAULT_PORT
    # What every pod's `dsl launch --node-rank` will check, checked here first.
    spec_file = with_node_args(spec_file, NodeArgs(master_addr=f"{name}-0.{name}", master_port=port),
                               "a Kubernetes Job starts one pod per node itself (backend pernode)")
    nodes = spec_file.spec.resources.nodes or 1
    spec_name = "spec.yaml"  # a ConfigMap key allows [-._a-zA-Z0-9] only: not any file's name
    config_map, service, job = yaml.safe_load_all(resources.files("dsl.templates").joinpath(TEMPLATE).read_text())

    def labels() -> dict[str, str]:  # a fresh dict each time: YAML would otherwise print anchors
        return {"app.kubernetes.io/name": "dsl", "dsl-job": name}

    config_map["metadata"].update(name=f"{name}-spec", labels=labels())
    config_map["data"] = {spec_name: spec_file.path.read_text(encoding="utf-8")}

    service["metadata"].update(name=name, labels=labels())
    service["spec"]["selector"] = {"dsl-job": name}
    service["spec"]["ports"][0].update(port=port, targetPort=port)

    job["metadata"].update(name=name, labels=labels())
    job["spec"].update(completions=nodes, parallelism=nodes)
    pod = job["spec"]["template"]
    pod["metadata"]["labels"] = labels()
    pod["spec"]["subdomain"] = name
    container = pod["spec"]["containers"][0]
    container["image"] = image
    container["command"] = ["dsl", "launch", f"{SPEC_DIR}/{spec_name}",
                            "--node-rank=$(JOB_COMPLETION_INDEX)", f"--nnodes={nodes}",
                            f"--master-addr={name}-0.{name}", f"--master-port={port}"]
    container["ports"][0]["containerPort"] = port
    if gpus_per_node:
        container["resources"] = {"limits": {"nvidia.com/gpu": gpus_per_node}}
    pod["spec"]["volumes"][0]["configMap"]["name"] = f"{name}-spec"
    header = (f"# dsl render {spec_file.path.name} --format k8s: {nodes} pod(s), one per node, each running "
              f"`dsl launch --node-rank` (launcher/k8s.py).\n"
              f"# Apply: kubectl apply -f THIS_FILE; logs: kubectl logs -l dsl-job={name} --prefix\n")
    return header + yaml.dump_all([config_map, service, job], Dumper=_Dumper, sort_keys=False)


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the spec in the ConfigMap) as literal blocks, readable as written."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value and not any(c in value for c in "\t\r") and \
        all(line == line.rstrip() for line in value.splitlines()) else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)
