"""The spec loader: every error located (file:line:col field.path), with choices and hints."""

from __future__ import annotations

from pathlib import Path

import pytest

from dsl.engine.errors import UserError
from dsl.launcher.spec import json_schema, load_spec
from tests.conftest import ROOT

GOOD = """\
name: demo
run:
  train:
    steps: 10
resources:
  procs_per_node: 2
"""


def _error(write, text: str) -> str:
    with pytest.raises(UserError) as info:
        load_spec(write("spec.yaml", text))
    return str(info.value)


def test_typo_names_file_line_col_path_and_suggestion(write):
    message = _error(write, GOOD.replace("procs_per_node", "procs_per_nod"))
    assert message.startswith(f"{write('x', '').parent / 'spec.yaml'}:6:3 resources.procs_per_nod:")
    assert "did you mean 'procs_per_node'?" in message
    assert "valid fields: backend, bind, exclude, hostfile" in message


def test_bad_choice_lists_choices_and_nearest(write):
    message = _error(write, GOOD + "  backend: slrum\n")
    assert ":7:12 resources.backend:" in message
    assert "'local', 'ssh', 'slurm', 'mpi' or 'pernode'" in message
    assert "did you mean 'slurm'?" in message


def test_every_error_reported_in_file_order(write):
    text = GOOD + "  master_port: abc\nengine:\n  zero_stage: 7\n  micro_bach: 4\n"
    lines = _error(write, text).splitlines()
    assert [line.split(" ")[0].split(":")[1] for line in lines] == ["7", "9", "10"]
    assert "resources.master_port: expected a positive integer or 'auto', got 'abc'" in lines[0]
    assert "engine.zero_stage: Input should be 0, 1, 2, 3 or 'auto'" in lines[1]
    assert "engine.micro_bach: unknown field 'micro_bach'; did you mean 'micro_batch'?" in lines[2]


def test_nested_field_path_and_cross_field_numbers(write):
    text = GOOD.replace("    steps: 10\n", "    steps: 10\n    model:\n      hidden_size: 64\n      num_attention_heads: 5\n")
    message = _error(write, text)
    assert ":6:7 run.train.model: num_attention_heads (5) must divide hidden_size (64)" in message


def test_missing_name_and_two_programs(write):
    message = _error(write, "run:\n  script: a.py\n  module: b\n")
    assert ":1:1 name: required field is missing" in message
    assert ":2:3 run: set exactly one of train, script, module (got script and module)" in message


def test_duplicate_key_is_an_error(write):
    message = _error(write, GOOD + "resources:\n  backend: local\n")
    assert ":7:1 resources: duplicate key (first written at line 5)" in message


def test_yaml_syntax_error_is_located(write):
    message = _error(write, "name: [unclosed\nrun: {}\n")
    assert "spec.yaml:3:1: YAML syntax error" in message or "spec.yaml:2:" in message


def test_include_and_exclude_together(write):
    message = _error(write, GOOD + "  hostfile: hf\n  include: a\n  exclude: b\n")
    assert "resources: include and exclude are mutually exclusive" in message


def test_env_values_become_strings_and_bad_names_fail(write):
    spec = load_spec(write("ok.yaml", GOOD + "env:\n  vars: {A: 1, B: true}\n")).spec
    assert spec.env.vars == {"A": "1", "B": "1"}
    assert "'1X' is not a valid environment variable name" in _error(
        write, GOOD + "env:\n  vars: {1X: a}\n")


def test_missing_file_and_non_mapping(tmp_path, write):
    with pytest.raises(UserError, match="no such spec file"):
        load_spec(tmp_path / "nope.yaml")
    assert "a spec is a mapping" in _error(write, "- a\n- b\n")


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path: Path):
    assert load_spec(path).spec.name


def test_schema_describes_every_field():
    schema = json_schema()
    missing = []
    for name, definition in [("Spec", schema), *schema.get("$defs", {}).items()]:
        for field, prop in definition.get("properties", {}).items():
            if not prop.get("description"):
                missing.append(f"{name}.{field}")
    assert missing == []
    assert schema["properties"]["resources"]
