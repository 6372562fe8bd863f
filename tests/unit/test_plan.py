"""The launch plan: what each host runs, with which environment, secrets never shown."""

from __future__ import annotations

import json
import shlex

import pytest

from dsl.engine.errors import UserError
from dsl.launcher.hosts import Host
from dsl.launcher.launch import Mode, prepare
from dsl.launcher.plan import REDACTED, RenderInputs
from dsl.launcher.render import render
from dsl.launcher.spec import load_spec


def _inputs(**over):
    base = dict(python="/opt/py/bin/python", cwd="/work/dir", master_port=29511,
                env_values={}, set_visible_devices=False)
    base.update(over)
    return RenderInputs(**base)


def test_local_train_plan(write):
    spec = load_spec(write("s.yaml", "name: t\nrun:\n  train: {steps: 5}\n"))
    plan = render(spec, [Host("localhost", (0, 1))], _inputs())
    (host,) = plan.hosts
    assert plan.world_size == 2 and plan.master_addr == "127.0.0.1" and plan.master_port == 29511
    assert host.ranks == (0, 1) and host.cwd == "/work/dir"
    argv = list(host.argv)
    assert argv[:3] == ["/opt/py/bin/python", "-m", "dsl.launcher.host.guard"]
    starter = argv[argv.index("--") + 1:]
    assert starter[:3] == ["/opt/py/bin/python", "-m", "dsl.launcher.host.elastic"]
    for flag in ("--nnodes=1", "--node-rank=0", "--nproc-per-node=2", "--master-addr=127.0.0.1",
                 "--master-port=29511", "--max-restarts=0", "--tee=3"):
        assert flag in starter
    assert starter[-3:] == ["-m", "dsl.engine.train", "/work/dir/runs/t/resolved.yaml"]
    assert host.env["PYTHONUNBUFFERED"] == "1"
    assert "/work/dir/runs/t/resolved.yaml" in plan.files


def test_multi_host_ranks_and_visible_devices(write):
    spec = load_spec(write("s.yaml", "name: t\nrun: {module: pkg.main, args: [--x, '1']}\n"
                                      "resources: {backend: ssh, hostfile: hf}\n"))
    hosts = [Host("a", (0, 1, 2)), Host("b", (1, 3))]
    plan = render(spec, hosts, _inputs(set_visible_devices=True))
    assert [h.ranks for h in plan.hosts] == [(0, 1, 2), (3, 4)]
    assert [h.node_rank for h in plan.hosts] == [0, 1]
    assert plan.master_addr == "a" and plan.world_size == 5
    assert plan.hosts[1].env["CUDA_VISIBLE_DEVICES"] == "1,3"
    assert "--nproc-per-node=2" in plan.hosts[1].argv
    assert list(plan.hosts[1].argv[-4:]) == ["-m", "pkg.main", "--x", "1"]


def test_script_path_is_relative_to_spec_and_args_kept(write, tmp_path):
    write("sub/train.py", "print(1)\n")
    spec = load_spec(write("sub/s.yaml", "name: t\nrun:\n  script: train.py\n  args: ['a b', '$HOME;x']\n"))
    plan = render(spec, [Host("localhost", (0,))], _inputs())
    assert list(plan.hosts[0].argv[-3:]) == [str(tmp_path / "sub" / "train.py"), "a b", "$HOME;x"]
    # The described command is valid shell that gives back exactly the argv.
    line = plan.describe().splitlines()[-1]
    assert shlex.split(line.split(" env ", 1)[1])[-2:] == ["a b", "$HOME;x"]


def test_secrets_never_shown(write, monkeypatch):
    monkeypatch.setenv("TOKEN_FROM_ENV", "s3cr3t-env")
    write("vars.env", "API_KEY='s3cr3t-file'\n")
    spec_path = write("s.yaml", "name: t\nrun: {train: {}}\nresources: {procs_per_node: 1}\n"
                                "env:\n  vars: {PASSWORD: s3cr3t-vars, PLAIN: visible}\n"
                                "  file: vars.env\n  forward: [TOKEN_FROM_ENV]\n"
                                "  secret: [PASSWORD, API_KEY, TOKEN_FROM_ENV]\n")
    prepared = prepare(spec_path, Mode.DRY_RUN)
    env = prepared.plan.hosts[0].env
    assert env["PASSWORD"] == "s3cr3t-vars" and env["API_KEY"] == "s3cr3t-file"
    shown = prepared.plan.describe() + json.dumps(prepared.plan.to_json())
    shown += "".join(prepared.plan.files.values())
    assert "s3cr3t" not in shown
    assert "PLAIN=visible" in prepared.plan.describe() and REDACTED in shown


def test_secret_without_value_is_an_error(write):
    with pytest.raises(UserError, match=r"s.yaml:\d+:\d+ env.secret: secret NOPE_X has no value"):
        prepare(write("s.yaml", "name: t\nrun: {train: {}}\nenv: {secret: [NOPE_X]}\n"), Mode.DRY_RUN)


def test_unsupported_engine_is_refused_at_plan_time(write):
    with pytest.raises(UserError, match=r"s.yaml:4:23 engine\.activation_offload: true moves .* needs activation_checkpointing"):
        prepare(write("s.yaml", "name: t\nrun: {train: {}}\nengine:\n  activation_offload: true\n"), Mode.DRY_RUN)


def test_missing_script_and_hostfile_errors_are_located(write):
    with pytest.raises(UserError, match=r"s.yaml:2:15 run.script: no such script"):
        prepare(write("s.yaml", "name: t\nrun: {script: nope.py}\n"), Mode.DRY_RUN)
    write("hf", "a slots=2\nb slots=2\n")
    with pytest.raises(UserError, match=r"resources.include: .*'c'"):
        prepare(write("s2.yaml", "name: t\nrun: {train: {}}\n"
                                 "resources: {backend: ssh, hostfile: hf, include: c}\n"), Mode.DRY_RUN)
    with pytest.raises(UserError, match="local backend runs on this machine only"):
        prepare(write("s3.yaml", "name: t\nrun: {train: {}}\nresources: {hostfile: hf}\n"), Mode.DRY_RUN)


def test_hostfile_selection_reaches_the_plan(write):
    write("hf", "# two hosts\nworker-1 slots=4\nworker-2 slots=4\n")
    spec_path = write("s.yaml", "name: t\nrun: {train: {}}\nresources:\n  backend: ssh\n"
                                "  hostfile: hf\n  include: worker-1:1,3@worker-2\n  procs_per_node: 2\n"
                                "  master_port: 29600\n")
    plan = prepare(spec_path, Mode.DRY_RUN).plan
    assert [(h.host, h.slots) for h in plan.hosts] == [("worker-1", (1, 3)), ("worker-2", (0, 1))]
    assert plan.master_port == 29600 and plan.world_size == 4


def test_token_file_path_is_resolved_against_the_spec(write, tmp_path):
    import yaml

    spec = load_spec(write("sub/s.yaml", "name: t\nrun:\n  train:\n    data: {kind: tokens, path: data/tok.bin}\n"))
    plan = render(spec, [Host("localhost", (0,))], _inputs())
    resolved = yaml.safe_load(next(iter(plan.files.values())))
    assert resolved["run"]["train"]["data"]["path"] == str(tmp_path / "sub/data/tok.bin")


def test_a_hugging_face_model_path_is_resolved_against_the_spec(write, tmp_path):
    """The ranks read resolved.yaml from the run folder: a relative hf / hf_config path there
    would name another folder (README: "Train a Hugging Face model")."""
    import yaml

    write("sub/model/config.json", '{"model_type": "llama"}')
    for key, rel in (("hf", "model"), ("hf_config", "model/config.json")):
        spec = load_spec(write(f"sub/{key}.yaml", f"name: t\nrun:\n  train:\n    model: {{{key}: {rel}}}\n"))
        plan = render(spec, [Host("localhost", (0,))], _inputs())
        resolved = yaml.safe_load(next(iter(plan.files.values())))
        assert resolved["run"]["train"]["model"][key] == str(tmp_path / "sub" / rel)


def test_a_tokenizer_and_an_init_from_folder_are_resolved_against_the_spec(write, tmp_path):
    """The same for data.tokenizer and run.train.init_from (deepspeed / hf)."""
    import yaml

    write("sub/model/config.json", '{"model_type": "llama"}')
    for init in ("deepspeed: ds/ckpt", "hf: pretrained"):
        spec = load_spec(write("sub/s.yaml", "name: t\nrun:\n  train:\n    model: {hf: model}\n"
                                             "    data: {kind: text, path: docs.jsonl, tokenizer: tok}\n"
                                             f"    init_from: {{{init}}}\n"))
        plan = render(spec, [Host("localhost", (0,))], _inputs())
        train = yaml.safe_load(next(iter(plan.files.values())))["run"]["train"]
        assert train["data"]["tokenizer"] == str(tmp_path / "sub/tok")
        key, rel = init.split(": ")
        assert train["init_from"][key] == str(tmp_path / "sub" / rel)
