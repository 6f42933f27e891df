"""`make setup` on a system Python that refuses pip installs (PEP 668, Debian 12 / Ubuntu 24.04).

The real Makefile and setup.sh run in a temporary project with a stand-in package (its own tiny
build backend, so pip needs no index and nothing is downloaded). The refusing interpreter is a
`python3` wrapper around this one: `-m pip install` fails with pip's externally-managed-environment
error, everything else runs as usual; shadowing `ensurepip` turns it into a Debian Python without
python3-venv.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT

BASE_PYTHON = Path(getattr(sys, "_base_executable", sys.executable))

REFUSING_PYTHON = """#!/bin/sh
echo "$*" >> "{log}"
if [ "$1 $2 $3" = "-m pip install" ]; then
    echo "error: externally-managed-environment" >&2
    exit 1
fi
PYTHONPATH="{shadow}" exec "{python}" "$@"
"""

STANDIN_PYPROJECT = """[build-system]
requires = []
build-backend = "standin_backend"
backend-path = ["."]

[project]
name = "titan-setup-standin"
version = "0"
"""

STANDIN_BACKEND = '''"""PEP 660 backend of the stand-in: an editable wheel holding one .pth file and its metadata."""
import os
import zipfile

NAME, DIST = "titan_setup_standin", "titan_setup_standin-0.dist-info"


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    files = {NAME + ".pth": os.getcwd() + "\\n",
             DIST + "/METADATA": "Metadata-Version: 2.1\\nName: titan-setup-standin\\nVersion: 0\\nProvides-Extra: dev\\n",
             DIST + "/WHEEL": "Wheel-Version: 1.0\\nGenerator: standin\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n"}
    wheel = NAME + "-0-py3-none-any.whl"
    with zipfile.ZipFile(os.path.join(wheel_directory, wheel), "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
        archive.writestr(DIST + "/RECORD", "".join(path + ",,\\n" for path in [*files, DIST + "/RECORD"]))
    return wheel


build_wheel = build_editable
'''


def _torch_fits(python: Path) -> bool:
    code = "import sys, torch; sys.exit(not (2, 11) <= tuple(map(int, torch.__version__.split('.')[:2])) < (2, 14))"
    return subprocess.run([str(python), "-c", code], capture_output=True).returncode == 0


pytestmark = pytest.mark.skipif(not _torch_fits(BASE_PYTHON) or shutil.which("make") is None,
                                reason="needs make and a base Python with torch 2.11-2.13 (else setup installs torch)")


def _project(tmp_path: Path, without_venv: bool) -> tuple[Path, Path, Path]:
    """A project folder (the real Makefile and setup.sh, the stand-in package), the refusing `python3`
    and the log of its invocations."""
    project, bin_dir, shadow = tmp_path / "project", tmp_path / "bin", tmp_path / "shadow"
    for folder in (project, bin_dir, shadow):
        folder.mkdir()
    for name in ("Makefile", "setup.sh"):
        shutil.copy(REPO_ROOT / name, project / name)
    (project / "pyproject.toml").write_text(STANDIN_PYPROJECT)
    (project / "standin_backend.py").write_text(STANDIN_BACKEND)
    if without_venv:
        (shadow / "ensurepip.py").write_text("raise ModuleNotFoundError(\"No module named 'ensurepip'\")\n")
    log, python = tmp_path / "python3.log", bin_dir / "python3"
    python.write_text(REFUSING_PYTHON.format(log=log, shadow=shadow, python=BASE_PYTHON))
    python.chmod(0o755)
    return project, python, log


def _make(project: Path, *args: str) -> subprocess.CompletedProcess:
    """`make args` with no virtual or conda environment active and no package index."""
    drop = ("VIRTUAL_ENV", "CONDA_PREFIX", "PYTHONPATH", "MAKEFLAGS", "MAKELEVEL")
    env = {key: value for key, value in os.environ.items() if key not in drop}
    env.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    return subprocess.run(["make", *args], cwd=project, capture_output=True, text=True, timeout=240, env=env)


def test_refused_system_python_gets_a_project_venv_that_everything_runs_in(tmp_path):
    project, python, log = _project(tmp_path, without_venv=False)
    refused = subprocess.run([str(python), "-m", "pip", "install", "x"], capture_output=True, text=True)
    assert refused.returncode == 1 and "externally-managed-environment" in refused.stderr
    log.unlink()
    proc = _make(project, "setup", f"PYTHON={python}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    venv_python = project / ".venv" / "bin" / "python"
    where = subprocess.run([str(venv_python), "-c", "import importlib.metadata as m, sys, torch; "
                            "print(sys.prefix); print(m.distribution('titan-setup-standin').locate_file(''))"],
                           capture_output=True, text=True)
    prefix, installed = where.stdout.split()
    assert Path(prefix) == project / ".venv" and Path(installed).is_relative_to(project / ".venv"), where.stderr
    calls = log.read_text().splitlines()
    assert "-m venv --system-site-packages .venv" in calls  # this torch is reused, not installed again
    assert not [call for call in calls if "pip install" in call]  # the refusing Python is never asked
    dry_run = _make(project, "-n", "test", "train", "bench", f"PYTHON={python}")
    runs = [line for line in dry_run.stdout.splitlines() if "-m " in line and "setup.sh" not in line]
    assert runs and all(".venv/bin/python -m" in line and str(python) not in line for line in runs)


def test_python_without_venv_says_what_to_install_and_fails(tmp_path):
    project, python, _ = _project(tmp_path, without_venv=True)
    proc = _make(project, "setup", f"PYTHON={python}")
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("make")]
    assert len(errors) == 1 and "apt install python3-venv" in errors[0], proc.stderr
    assert not (project / ".venv").exists()


def test_an_active_environment_is_installed_into_as_before(tmp_path):
    env = {**os.environ, "VIRTUAL_ENV": str(tmp_path / "env")}
    dry_run = subprocess.run(["make", "-n", "setup", "test", "PYTHON=/env/bin/python3"], cwd=REPO_ROOT,
                             capture_output=True, text=True, env=env)
    lines = [line.rstrip() for line in dry_run.stdout.splitlines()]
    assert 'sh setup.sh "/env/bin/python3"' in lines  # no project .venv: installs into the active environment
    assert "/env/bin/python3 -m pytest -q -m \"not slow\"" in lines and ".venv" not in dry_run.stdout
