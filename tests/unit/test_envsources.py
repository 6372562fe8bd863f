"""The ranks' environment sources (launcher/envsources.py): DeepSpeed's prefixes, its
`.deepspeed_env` file read its way, `.dsl_env`, their documented precedence, and secrets that
stay masked in what dsl prints (dry run, plan.json) however they came in."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dsl.engine.errors import UserError
from dsl.launcher.envfile import parse_deepspeed_env
from dsl.launcher.envsources import env_values
from dsl.launcher.spec import load_spec
from tests.conftest import run_dsl


def _spec(tmp_path: Path, env: str = "") -> Path:
    path = tmp_path / "job.yaml"
    (tmp_path / "x.py").write_text("")
    path.write_text(f"name: e\nrun:\n  script: x.py\n{env}output_dir: {tmp_path / 'out'}\n")
    return path


def test_deepspeed_env_lines_are_read_as_deepspeed_reads_them():
    text = "A=1\n B = two words \nC=x=y\nD='q' # not a comment\n\n# skipped\nE=\n"
    assert parse_deepspeed_env(text, "f") == {"A": "1", "B": "two words", "C": "x=y",
                                               "D": "'q' # not a comment", "E": ""}
    with pytest.raises(UserError, match=r"^f:2: expected NAME=value, got 'NOEQUALS'$"):
        parse_deepspeed_env("A=1\nNOEQUALS\n", "f")


def test_default_prefixes_are_deepspeeds_and_sources_override_in_the_documented_order(tmp_path):
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir(), cwd.mkdir()
    (home / ".deepspeed_env").write_text("ORDER=home-ds\nHOME_ONLY=1\nNCCL_DEBUG=WARN\n")
    (home / ".dsl_env").write_text("ORDER=home-dsl\n")
    (cwd / ".deepspeed_env").write_text("ORDER=cwd-ds\n")
    (cwd / ".dsl_env").write_text("ORDER=cwd-dsl\nFROM_FILE=dotfile\n")
    (tmp_path / "spec.env").write_text("FROM_FILE=spec-file\nFWD=from-file\n")
    spec = load_spec(_spec(tmp_path, "env:\n  file: spec.env\n  forward: [FWD]\n  vars: {V: spec}\n"))
    shell = {"NCCL_DEBUG": "INFO", "PYTHONPATH": "/p", "UCX_TLS": "tcp", "MLFLOW_RUN": "r",
             "MV2_X": "1", "FI_PROVIDER": "efa", "OTHER": "no", "FWD": "from-shell", "V": "shell"}
    got = env_values(spec, shell, home, cwd)
    assert got.values == {
        "NCCL_DEBUG": "WARN",  # a file overrides the shell, as in DeepSpeed
        "PYTHONPATH": "/p", "UCX_TLS": "tcp", "MLFLOW_RUN": "r", "MV2_X": "1",
        "ORDER": "cwd-dsl", "HOME_ONLY": "1", "FROM_FILE": "spec-file", "FWD": "from-shell", "V": "spec"}
    assert got.sources == [str(home / ".deepspeed_env"), str(home / ".dsl_env"),
                           str(cwd / ".deepspeed_env"), str(cwd / ".dsl_env")]


def test_ds_env_file_renames_the_deepspeed_file_and_both_switches_turn_sources_off(tmp_path):
    (tmp_path / "my_env").write_text("X=renamed\n")
    (tmp_path / ".deepspeed_env").write_text("X=default\n")
    spec = load_spec(_spec(tmp_path))
    assert env_values(spec, {"DS_ENV_FILE": "my_env"}, tmp_path / "nohome", tmp_path).values == {"X": "renamed"}
    spec = load_spec(_spec(tmp_path, "env:\n  dotfiles: false\n  forward_prefixes: []\n"))
    assert env_values(spec, {"NCCL_DEBUG": "INFO"}, tmp_path, tmp_path).values == {}


def test_a_bad_prefix_is_a_located_error(tmp_path):
    with pytest.raises(UserError, match=r"job.yaml:5:\d+ env.forward_prefixes"):
        load_spec(_spec(tmp_path, "env:\n  forward_prefixes: [NCCL, 'A B']\n"))


def test_credential_like_values_from_files_and_the_shell_are_masked_in_dry_run_and_plan(tmp_path):
    (tmp_path / ".deepspeed_env").write_text("HF_TOKEN=hf_dotfile_value\nPLAIN=shown\n")
    spec = _spec(tmp_path)
    env = {"NCCL_IB_PASSWORD": "nccl_pw_value", "HOME": str(tmp_path / "nohome")}
    for args in (["--dry-run"], ["--dry-run", "--json"]):
        proc = run_dsl("launch", str(spec), *args, cwd=tmp_path, env=env, check=True)
        assert "hf_dotfile_value" not in proc.stdout + proc.stderr
        assert "nccl_pw_value" not in proc.stdout + proc.stderr
        assert "PLAIN=shown" in proc.stdout or '"PLAIN": "shown"' in proc.stdout
    plan = json.loads(proc.stdout)
    assert plan["hosts"][0]["env"]["HF_TOKEN"] == "<secret>"
    assert plan["hosts"][0]["env"]["NCCL_IB_PASSWORD"] == "<secret>"
    assert plan["secrets"] == ["HF_TOKEN", "NCCL_IB_PASSWORD"]
