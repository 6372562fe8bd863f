"""A real (non-editable) install ships every subpackage and every kernel source.

The editable install the tests run from maps whole folders, so a package missing from
pyproject's list would only break for users who `pip install dsl`; this builds the wheel and
compares its contents with the tree.
"""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOP = {"launcher": "dsl/launcher", "engine": "dsl/engine", "topology": "dsl/topology", "ops": "dsl/ops",
       "configs": "dsl/configs", "templates": "dsl/templates"}


def _expected() -> set[str]:
    want = set()
    for folder, target in TOP.items():
        for path in (ROOT / folder).rglob("*"):
            if "__pycache__" in path.parts or not path.is_file():
                continue
            if path.suffix in (".py", ".c", ".cpp", ".yaml", ".json", ".tmpl") or path.parent.name == "hostfiles":
                want.add(f"{target}/{path.relative_to(ROOT / folder).as_posix()}")
    return want


def test_the_wheel_ships_every_module_and_kernel_source(tmp_path):
    # Build from a clean copy: setuptools' build/ folder in the checkout may hold stale files.
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in TOP:
        shutil.copytree(ROOT / folder, src / folder, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(src)], check=True, capture_output=True, timeout=300)
    wheel = next(tmp_path.glob("dsl-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(_expected() - names)
    assert missing == []
    assert not any(n.startswith(("engine/", "ops/", "launcher/")) for n in names)  # nothing bare
