"""`pip install .` without the extra dsl[hf] (issue 16): `dsl --help` works, `dsl plan` describes a
Hugging Face model (config.json is read without transformers), and launching one exits 2 with the
install hint, located in the spec the ranks read (the run folder's resolved.yaml).

The environment is real, not a patched import: a fresh virtualenv into which pip installs a copy
of this repository (a wheel build, no editable finder), whose other dependencies (torch, typer,
pydantic, ...) come from the test's own virtualenv through a folder of links that leaves out
transformers, safetensors, tokenizers, huggingface_hub and what needs them (a `.pth` file points at it). No
network: pip installs with --no-index --no-deps --no-build-isolation.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

from tests.hf_tiny import write_model

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
HF_PACKAGES = ("transformers", "safetensors", "tokenizers", "huggingface_hub", "hf_xet", "kernels")
SOURCES = ("launcher", "engine", "topology", "ops", "configs", "templates", "pyproject.toml", "README.md", "LICENSE")


def _site_packages() -> Path:
    return Path(next(p for p in site.getsitepackages() if p.endswith("site-packages")))


@pytest.fixture(scope="module")
def bare(tmp_path_factory) -> Path:
    """bin/ of a virtualenv holding dsl without its hf extra."""
    tmp = tmp_path_factory.mktemp("bare")
    deps = tmp / "deps"
    deps.mkdir()
    for entry in _site_packages().iterdir():
        name = entry.name.lower()
        if (name.startswith(HF_PACKAGES) or name.startswith(("dsl-", "__editable__", "_dsl"))
                or name.endswith(".pth") or name == "__pycache__"):
            continue
        (deps / entry.name).symlink_to(entry)
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.so", "build"))
        elif path.exists():
            shutil.copy2(path, src / name)
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "deps.pth").write_text(f"{deps}\n")
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([str(py), "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                           "--no-build-isolation", str(src)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check = subprocess.run([str(py), "-c", "import importlib.util as u, dsl.engine, sys; "
                            "print(u.find_spec('transformers'), dsl.engine.__file__)"],
                           capture_output=True, text=True, cwd=tmp, timeout=120)
    missing, where = check.stdout.split()
    assert missing == "None" and where.startswith(purelib), check  # really absent; the installed copy
    return venv / "bin"


def _run(bare: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{bare}:{env.get('PATH', '')}", OMP_NUM_THREADS="1")
    return subprocess.run([str(bare / "dsl"), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def test_dsl_help_works_without_the_extra(bare: Path, tmp_path: Path) -> None:
    proc = _run(bare, "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "launch" in proc.stdout and "Traceback" not in proc.stderr


def test_an_hf_spec_is_planned_and_refused_at_launch_with_the_install_hint(bare: Path, tmp_path: Path) -> None:
    write_model(tmp_path / "m", "llama")
    spec = tmp_path / "job.yaml"
    spec.write_text("name: hf\nrun:\n  train:\n    model: {hf: m, seq_len: 16}\n    steps: 2\n"
                    f"resources: {{backend: local, procs_per_node: 1}}\noutput_dir: {tmp_path / 'out'}\n")
    plan = _run(bare, "plan", str(spec), cwd=tmp_path)
    assert plan.returncode == 0, plan.stderr
    launch = _run(bare, "launch", str(spec), cwd=tmp_path)
    assert launch.returncode == 2, (launch.stdout, launch.stderr[-3000:])
    assert "run.train.model.hf: training a Hugging Face model needs transformers and safetensors" in launch.stderr
    assert "pip install 'dsl[hf]'" in launch.stderr
    # The rank refuses it (the launching host may lack the extra while the ranks' hosts have it),
    # located in the spec the ranks read.
    assert f"{tmp_path / 'out' / 'resolved.yaml'}:7:11 run.train.model.hf:" in launch.stderr
    assert "Traceback" not in launch.stderr
