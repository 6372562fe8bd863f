"""Field descriptions come from the docstring under each field, read lazily."""

from dsl.engine.config import EngineConfig, OptimizerConfig
from dsl.engine.fielddocs import field_doc


def test_the_docstring_under_a_field_is_its_description():
    assert field_doc(OptimizerConfig, "lr") == "Peak learning rate."
    assert field_doc(OptimizerConfig, "no_such_field") is None


def test_nested_models_are_found_through_the_schema():
    from dsl.launcher.spec import json_schema

    schema = json_schema()
    optimizer = schema["$defs"]["OptimizerConfig"]["properties"]["lr"]
    assert optimizer["description"] == "Peak learning rate."
    assert EngineConfig.__name__ in schema["$defs"]


def test_importing_the_spec_does_not_read_sources_with_inspect():
    import subprocess
    import sys

    code = ("import inspect, sys; calls = []; orig = inspect.getsource\n"
            "inspect.getsource = lambda *a, **k: calls.append(a) or orig(*a, **k)\n"
            "import dsl.launcher.spec; print(len(calls))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0"
