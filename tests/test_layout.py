"""The repo's layout must not shadow installed libraries (pip, pytest, mlflow import `packaging`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def _assert_pypi_packaging() -> None:
    import packaging
    import packaging.version

    where = Path(packaging.__file__).resolve()
    assert REPO not in where.parents or ".venv" in where.parts, f"packaging imported from {where}"
    assert packaging.version.Version("1.2") < packaging.version.Version("1.10")


def test_import_packaging_is_pypi_library_in_process() -> None:
    _assert_pypi_packaging()


def test_import_packaging_is_pypi_library_under_python_m_pytest() -> None:
    """`python -m pytest` puts the cwd first on sys.path: run it from the repo root."""
    if os.environ.get("CLINBUNDLE_LAYOUT_PROBE"):
        return  # this is the inner run; the in-process test above does the checking
    env = os.environ | {"CLINBUNDLE_LAYOUT_PROBE": "1"}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_layout.py::test_import_packaging_is_pypi_library_in_process",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 passed" in out.stdout


def test_python_c_from_repo_root_gets_pypi_packaging() -> None:
    code = "import packaging, sys; print(packaging.__file__)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    where = Path(out.stdout.strip()).resolve()
    assert REPO not in where.parents or ".venv" in where.parts, where


def test_only_one_top_level_import_name() -> None:
    """Top-level folders that Python could import are `clinbundle` alone."""
    importable = {
        p.name
        for p in REPO.iterdir()
        if p.is_dir() and (p / "__init__.py").exists() and not p.name.startswith(".")
    }
    modules = {p.stem for p in REPO.glob("*.py")}
    assert importable == {"clinbundle"}, importable
    assert not modules, f"top-level modules would be importable from the repo root: {modules}"
    for name in ("training", "packaging", "apps"):
        assert not (REPO / name / "__init__.py").exists()
