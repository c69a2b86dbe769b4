"""ONNX Runtime's two builds (issue 15): `onnxruntime` (CPU) and `onnxruntime-gpu` (CUDA) are one
module in two distributions, so clinbundle installs exactly one through its `cpu` or `gpu`
extra, pins the one installed and never lets an image mix them."""

from __future__ import annotations

import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from clinbundle.packaging.bento import pinned
from clinbundle.packaging.bento_image import image_pins
from clinbundle.runtime import ort_build
from clinbundle.runtime.errors import BundleError


def test_each_build_is_an_extra_and_neither_is_a_core_dependency() -> None:
    reqs = [Requirement(r) for r in md.requires("clinbundle") or []]
    builds = {r.name: str(r.marker) for r in reqs if r.name in ort_build.ORT_BUILDS.values()}
    assert builds == {"onnxruntime": 'extra == "cpu"', "onnxruntime-gpu": 'extra == "gpu"'}
    # the dev extra must not bring one: `.[dev,gpu]` would install both
    dev = [r for r in reqs if r.marker and r.marker.evaluate({"extra": "dev"})]
    assert not any({"cpu", "gpu"} & r.extras for r in dev), dev


def test_this_environment_has_one_build_and_pins_it_by_its_own_name() -> None:
    (build,) = ort_build.installed_builds()  # `make` installs ORT_EXTRA's (cpu here and in CI)
    assert ort_build.ORT_BUILDS[ort_build.ort_extra()] == build
    assert pinned(["onnxruntime"]) == [f"{build}=={md.version(build)}"]


@pytest.mark.parametrize("found", [[], ["onnxruntime", "onnxruntime-gpu"]])
def test_none_or_both_builds_installed_is_refused(monkeypatch, found: list[str]) -> None:
    monkeypatch.setattr(ort_build, "installed_builds", lambda: found)
    with pytest.raises(BundleError, match="exactly one ONNX Runtime build"):
        ort_build.ort_extra()
    assert ort_build.distribution("onnxruntime") == "onnxruntime"  # reported as asked


def test_an_image_keeps_its_own_build_over_the_bentos_pin() -> None:
    pins = ["onnxruntime==1.32.0", "torch==2.13.0", "openvino==2026.4.1"]
    assert image_pins(pins, "gpu") == ["torch==2.13.0", "openvino==2026.4.1"]
    assert image_pins(pins, "cpu") == pins
    assert image_pins(["onnxruntime-gpu==1.31.1", "numpy==2.3.0"], "cpu") == ["numpy==2.3.0"]


def test_a_command_without_onnx_runtime_names_both_extras_with_exit_2(tmp_path: Path) -> None:
    """A module set to None in sys.modules is how Python reports it not installed; a fresh
    interpreter, because this session has imported ONNX Runtime already."""
    code = (
        "import sys; sys.modules['onnxruntime'] = None; from clinbundle.cli import main; "
        "sys.exit(main(sys.argv[1:]))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, "verify", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert "pip install 'clinbundle[cpu]' (or 'clinbundle[gpu]' on a CUDA host)" in r.stderr
    assert "Traceback" not in r.stderr
