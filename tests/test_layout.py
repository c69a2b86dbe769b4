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


def _clinbundle_imports(path: Path) -> set[str]:
    """Every `clinbundle...` module a file imports (at any depth, lazily or not)."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return {n for n in names if n == "clinbundle" or n.startswith("clinbundle.")}


def test_runtime_core_and_serving_import_no_build_or_training_code() -> None:
    """What every format vendors (the runtime core) and what serves (the bento's request
    handling, the MAP app, the pyfunc) import only the runtime core and the app itself."""
    pkg = REPO / "clinbundle"
    serving = [
        *sorted((pkg / "runtime").glob("*.py")),
        pkg / "apps" / "http_io.py",
        *sorted((pkg / "apps" / "map_app").glob("*.py")),
        pkg / "pyfunc_model.py",
        REPO / "bentos" / "service.py",
    ]
    allowed = ("clinbundle.runtime", "clinbundle.apps.http_io", "clinbundle.apps.map_app")
    for path in serving:
        imported = _clinbundle_imports(path) - {"clinbundle", "clinbundle.apps"}
        bad = {m for m in imported if not m.startswith(allowed)}
        assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"


def test_metric_definitions_and_statistics_need_no_training_code() -> None:
    """The demo and the model card read the metric registry; serving may not pull in training."""
    for path in (
        REPO / "clinbundle" / "metric_definitions.py",
        REPO / "clinbundle" / "analysis" / "stats.py",
    ):
        bad = {m for m in _clinbundle_imports(path) if not m.startswith("clinbundle.runtime")}
        assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"


def test_batch_inference_imports_no_training_code() -> None:
    """`clinbundle predict` (and the Ray actors that run it) open models, never train them."""
    for path in sorted((REPO / "clinbundle" / "cohort").glob("*.py")):
        bad = {m for m in _clinbundle_imports(path) if m.startswith("clinbundle.training")}
        assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"
