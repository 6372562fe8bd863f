"""docs/deepspeed.md is what the importer's tables say (engine/ds_docs.py renders it from them)."""

from __future__ import annotations

from pathlib import Path

from dsl.engine.ds_auto import HF_AUTO
from dsl.engine.ds_docs import render
from dsl.engine.ds_keys import KEYS

DOC = Path(__file__).resolve().parents[2] / "docs" / "deepspeed.md"


def test_the_committed_compatibility_table_is_up_to_date():
    assert DOC.read_text() == render(), (
        "docs/deepspeed.md is out of date with engine/ds_keys.py / ds_auto.py: run "
        "`python -m dsl.engine.ds_docs docs/deepspeed.md`")


def test_every_key_and_every_auto_appears_in_the_table():
    text = render()
    for key in KEYS:
        assert f"| `{key.path}`" in text, key.path
    for rule in HF_AUTO:
        assert f"| `{rule.path}` |" in text, rule.path
