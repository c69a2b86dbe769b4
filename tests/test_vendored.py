"""The pyfunc and the bundle reader work where clinbundle is not installed: in a fresh venv that
sees this environment's libraries (torch, MONAI, MLflow, ONNX Runtime) but not clinbundle, they
run on the runtime core they carry (the pyfunc's code_paths, a vendored copy beside a bundle).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import numpy as np
import pytest

from clinbundle.vendoring import vendor_runtime

pytestmark = pytest.mark.slow

SCRIPT = r"""
import importlib.util, json, sys
from pathlib import Path
import numpy as np
assert importlib.util.find_spec("clinbundle") is None, "clinbundle is installed here"
volume = np.load(sys.argv[3])
affine = np.diag([0.8, 0.8, 1.5, 1.0])
if sys.argv[1] == "pyfunc":
    import mlflow
    mlflow.set_tracking_uri(sys.argv[2])
    model = mlflow.pyfunc.load_model(sys.argv[4])
    out = model.predict(volume, params={"affine": affine.ravel().tolist(), "output": "labels"})
else:
    sys.path.insert(0, sys.argv[2])
    from clinbundle.runtime.bundle_reader import load_bundle
    out = load_bundle(Path(sys.argv[4]), "cpu").predict(volume, affine, "labels")
import clinbundle
np.save(sys.argv[5], out)
print(json.dumps({"clinbundle": clinbundle.__file__}))
"""


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv whose only link to this environment is a .pth naming its site-packages: the
    libraries import, but clinbundle's editable install (a .pth of its own there) does not."""
    root = tmp_path_factory.mktemp("bare-venv")
    venv.create(root, with_pip=False)
    site = next((root / "lib").glob("python3*/site-packages"))
    (site / "libraries.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return root / "bin" / "python"


def _run(python: Path, *args: str, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.run(
        [str(python), "-c", SCRIPT, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["clinbundle"]


@pytest.fixture(scope="module")
def case(packaged, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    from clinbundle.training.synth import synthesize_volume

    volume = synthesize_volume((30, 26, 20), np.random.default_rng(5))[0][None, None]
    path = tmp_path_factory.mktemp("case") / "volume.npy"
    np.save(path, volume)
    return path, volume


def test_the_pyfunc_loads_and_predicts_without_clinbundle(
    bare_python, tracking, case, tmp_path: Path
) -> None:
    path, volume = case
    uri = f"models:/{tracking.name}@champion"
    out = tmp_path / "labels.npy"
    where = _run(
        bare_python, "pyfunc", tracking.tracking_uri, str(path), uri, str(out), cwd=tmp_path
    )
    assert sys.prefix not in where and "code" in where, where  # the model's own copy ran
    import mlflow

    expected = mlflow.pyfunc.load_model(uri).predict(
        volume,
        params={"affine": np.diag([0.8, 0.8, 1.5, 1.0]).ravel().tolist(), "output": "labels"},
    )
    np.testing.assert_array_equal(np.load(out), expected)


def test_the_bundle_reader_loads_and_predicts_without_clinbundle(
    bare_python, packaged, case, tmp_path: Path
) -> None:
    path, volume = case
    vendored = vendor_runtime(tmp_path / "vendor").parent
    out = tmp_path / "labels.npy"
    where = _run(
        bare_python,
        "bundle",
        str(vendored),
        str(path),
        str(packaged.bundle),
        str(out),
        cwd=tmp_path,
    )
    assert where.startswith(str(vendored)), where
    from clinbundle.runtime.bundle_reader import load_bundle

    expected = load_bundle(packaged.bundle, "cpu").predict(
        volume, np.diag([0.8, 0.8, 1.5, 1.0]), "labels"
    )
    np.testing.assert_array_equal(np.load(out), expected)
