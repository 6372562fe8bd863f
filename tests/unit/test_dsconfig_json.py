"""A DeepSpeed config is parsed as JSON (engine/ds_json.py): JSON's numbers and whitespace, its own
line:col errors, the locations of every key and value."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsl.engine.ds_json import load_json_located
from dsl.engine.errors import UserError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "deepspeed_configs"


def test_every_collected_config_parses_as_python_json_does_or_fails_located():
    for path in sorted(FIXTURES.glob("*.json")):
        text = path.read_text()
        try:
            expected = json.loads(text)
        except json.JSONDecodeError as exc:
            with pytest.raises(UserError, match=rf"^{path.name}:{exc.lineno}:{exc.colno}: JSON syntax error"):
                load_json_located(text, path.name)
            continue
        assert load_json_located(text, path.name)[0] == expected, path.name


def test_tabs_and_exponents_are_json_not_yaml():
    text = '{\n\t"zero_optimization": {\n\t\t"reduce_bucket_size": 5e8,\n\t\t"stage": 2\n\t}\n}\n'
    data, locations = load_json_located(text, "ds.json")
    assert data == {"zero_optimization": {"reduce_bucket_size": 5e8, "stage": 2}}
    assert isinstance(data["zero_optimization"]["reduce_bucket_size"], float)
    assert isinstance(data["zero_optimization"]["stage"], int)
    assert locations.where(("zero_optimization", "stage"), key=True) == "ds.json:4:3"
    assert locations.where(("zero_optimization", "stage")) == "ds.json:4:12"


def test_a_tab_indented_collected_config_parses():
    text = (FIXTURES / "dsexamples_qanet_1cycle.json").read_text()
    assert "\t" in text
    data, locations = load_json_located(text, "q.json")
    assert data["scheduler"]["params"]["cycle_min_lr"] == 0.004
    assert locations.where(("scheduler", "type"), key=True) == "q.json:18:2"


@pytest.mark.parametrize("text, where, words", [
    ('{"a": 1 "b": 2}', "x.json:1:9", "expected ',' or '}' after the value of \"a\""),
    ('{a: 1}', "x.json:1:2", "JSON keys are written in double quotes"),
    ("{'a': 1}", "x.json:1:2", "JSON keys are written in double quotes"),
    ('{"a": 01}', "x.json:1:8", "expected ','"),
    ('{"a": "x\n"}', "x.json:1:7", "never closed"),
    ('{"a": TEMPLATE_VALUE}', "x.json:1:7", "a template placeholder?"),
    ('', "x.json:1:1", "the file is empty"),
    ('{"a": 1}\n{"b": 2}', "x.json:2:1", "after the end of the JSON value"),
    ('{"a": [1, 2}', "x.json:1:12", "expected ',' or ']' in a list"),
])
def test_syntax_errors_are_located_with_what_was_expected(text, where, words):
    with pytest.raises(UserError) as info:
        load_json_located(text, "x.json")
    assert str(info.value).startswith(f"{where}: JSON syntax error: ")
    assert words in str(info.value)


def test_duplicate_keys_are_refused_like_deepspeed_does():
    with pytest.raises(UserError, match=r"x.json:3:3 fp16.enabled: duplicate key \(first written at line 2\)"):
        load_json_located('{"fp16": {\n  "enabled": true,\n  "enabled": false}}', "x.json")


def test_comments_and_trailing_commas_deepspeed_reads_with_hjson_are_accepted():
    text = '{\n  // ZeRO\n  "zero_optimization": {"stage": 2,},  # two\n  /* off */ "fp16": {"enabled": false},\n}'
    assert load_json_located(text, "x.json")[0] == {"zero_optimization": {"stage": 2}, "fp16": {"enabled": False}}
