"""The MONAI bundle of the session champion, checked with MONAI's own tools as a user runs them:
`python -m monai.bundle verify_metadata`, `verify_net_in_out` and `run`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import clinbundle.runtime.model_grid
from clinbundle.packaging.parity import ParityCase, Reference, Tolerances, compare
from clinbundle.packaging.runtimes import torch_runtime
from clinbundle.runtime.errors import ParityError

from conftest import package_champion


def monai_bundle_cli(root: Path, *args: str) -> subprocess.CompletedProcess:
    """`python -m monai.bundle ARGS` from the bundle's folder, without clinbundle on the path."""
    env = dict(os.environ, PYTHONPATH="")
    return subprocess.run(
        [sys.executable, "-m", "monai.bundle", *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def champion(trained):
    """The session champion as packaging resolves it (no other format built)."""
    import mlflow

    from clinbundle.packaging.model_source import resolve_model

    mlflow.set_tracking_uri(trained.tracking_uri)
    mlflow.set_registry_uri(trained.tracking_uri)
    return resolve_model(f"models:/{trained.name}@champion", trained.workdir / "cache" / "models")


@pytest.fixture(scope="module")
def bundle(trained, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("monai-bundle") / "vessels"
    assert package_champion(trained, "monai-bundle", out) == 0
    return out


def test_layout_and_metadata_come_from_the_contract(bundle: Path, champion) -> None:
    contract = champion.contract
    for rel in (
        "configs/metadata.json",
        "configs/metadata_schema.json",
        "configs/inference.json",
        "models/model.pt",
        "scripts/model_grid.py",
        "docs/README.md",
        "docs/parity_report.md",
        "LICENSE",
    ):
        assert (bundle / rel).is_file(), rel
    assert not list(bundle.parent.glob(".*partial*")) and not list(bundle.rglob("__pycache__"))
    meta = json.loads((bundle / "configs/metadata.json").read_text())
    image = meta["network_data_format"]["inputs"]["image"]
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert image["num_channels"] == contract.in_channels
    assert image["spatial_shape"] == pred["spatial_shape"] == list(contract.roi_size)
    assert pred["num_channels"] == contract.num_classes
    assert pred["channel_def"] == contract.labels
    inference = json.loads((bundle / "configs/inference.json").read_text())
    assert inference["network_def"]["_target_"].endswith(contract.network.family)
    assert inference["inferer"]["roi_size"] == list(contract.roi_size)
    assert inference["inferer"]["overlap"] == contract.overlap
    # the weights are data (a plain state dict) and are the champion's
    state = torch.load(bundle / "models/model.pt", weights_only=True)
    reference = champion.load_network().state_dict()
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in state)
    assert "MONAI Bundle Commands" in (bundle / "docs/README.md").read_text()
    # the bundle resamples with the very code every runtime does (runtime.geometry.plan)
    shipped = (bundle / "scripts/model_grid.py").read_bytes()
    assert shipped == Path(clinbundle.runtime.model_grid.__file__).read_bytes()


def test_monai_verifies_metadata_offline_and_the_network(bundle: Path, tmp_path: Path) -> None:
    r = monai_bundle_cli(
        bundle,
        "verify_metadata",
        "--meta_file",
        "configs/metadata.json",
        "--filepath",
        "configs/metadata_schema.json",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "metadata is verified with no error" in r.stdout + r.stderr
    r = monai_bundle_cli(
        bundle,
        "verify_net_in_out",
        "network_def",
        "--meta_file",
        "configs/metadata.json",
        "--config_file",
        "configs/inference.json",
        "--device",
        "cpu",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "data shape of network is verified with no error" in r.stdout + r.stderr
    # the shipped schema is a real check: metadata without its I/O declaration fails it
    from monai.bundle import verify_metadata

    meta = json.loads((bundle / "configs/metadata.json").read_text())
    del meta["network_data_format"]["outputs"]
    bad = tmp_path / "metadata.json"
    bad.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="outputs"):
        verify_metadata(meta_file=str(bad), filepath=str(bundle / "configs/metadata_schema.json"))


def test_monai_bundle_run_gives_the_pytorch_labels(
    bundle: Path, champion, trained, tmp_path: Path
) -> None:
    """The packaging check passed on the whole suite, and the user's command (inference.json
    alone) on held-out scans as stored (mixed spacings and orientations) gives PyTorch's labels."""
    report = json.loads((bundle / "docs/parity_report.json").read_text())
    assert report["passed"], report["summary"]
    names = {c["name"] for c in report["cases"]}
    for case in ("odd", "lps", "oblique", "aniso_0.5x0.5x2.5", "batch2"):
        assert {f"{case}:probabilities", f"{case}:labels"} <= names, names
    assert report["overall"]["max_abs"] <= 1e-4

    data = trained.data
    held_out = [data / p["image"] for p in json.loads((data / "dataset.json").read_text())["test"]]
    (tmp_path / "in").mkdir()
    for path in held_out:
        (tmp_path / "in" / path.name).symlink_to(path)
    r = monai_bundle_cli(
        bundle,
        "run",
        "--config_file",
        "configs/inference.json",
        "--dataset_dir",
        str(tmp_path / "in"),
        "--output_dir",
        str(tmp_path / "out"),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    contract = champion.contract
    runtime = torch_runtime(champion.load_network(), contract)
    for path in held_out:
        img = nib.load(path)
        volume = np.asarray(img.dataobj, dtype=np.float32)[None, None]
        seg = nib.load(tmp_path / "out" / path.name.replace(".nii.gz", "_seg.nii.gz"))
        assert np.allclose(seg.affine, img.affine, atol=1e-5)
        labels = np.asarray(seg.dataobj)[None].astype(np.int64)
        case = ParityCase(path.name, volume, affine=img.affine)
        result = compare(
            case, runtime.run(volume, img.affine), labels, contract, Tolerances(), (0, 0)
        )
        assert result.passed, result


def test_a_bundle_failing_parity_is_not_written(champion, tmp_path: Path) -> None:
    """A reference whose weights differ (the output layer's bias moved) is a real breach:
    nothing is left."""
    from clinbundle.packaging.monai_bundle import build_monai_bundle
    from clinbundle.packaging.parity import parity_suite

    model = champion
    other = model.load_network()
    with torch.no_grad():
        bias = [p for n, p in other.named_parameters() if n.endswith("bias")][-1]
        bias[1] += 0.5
    case = parity_suite(model.contract)[0]
    reference = Reference(torch_runtime(other, model.contract), [case])
    out = tmp_path / "bundle"
    with pytest.raises(ParityError, match="No bundle was written"):
        build_monai_bundle(model, out, reference=reference, record=False)
    assert not out.exists() and list(tmp_path.iterdir()) == []
