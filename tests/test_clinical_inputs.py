"""Issue 13: volumes as a hospital has them, through the pyfunc, the ONNX bundle and the bento.

The session model is trained on a set with mixed spacings and orientations; the held-out
vessels are segmented as stored, resampled to 0.5 x 0.5 x 2.5 mm and stored LPS, each scored
against the truth on its own grid. The MAP's share of this is in test_map.py.
"""

from __future__ import annotations

import gzip
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import mlflow
import nibabel as nib
import numpy as np
import pytest

from clinbundle.packaging.bento import free_port, stop_process_group
from clinbundle.runtime.bundle_reader import load_bundle
from clinbundle.training.synth import synthetic_ct

from conftest import assert_same_vessels, geometry_variants, mean_dice_by_variant

pytestmark = pytest.mark.slow
#: The served bento's memory budget in these tests: a 512 x 512 x 300 CT fits, a coarse
#: volume that resamples to 600^3 on the model's grid does not.
BUDGET_GIB = 4.5


@pytest.fixture(scope="module")
def variants(trained) -> list:
    return geometry_variants(trained.data)


def test_the_contract_carries_the_training_grid(packaged) -> None:
    c = packaged.model.contract
    assert c.contract_version == 2 and c.modality == "CT"
    assert c.geometry.spacing == (1.0, 1.0, 1.0), "median of the mixed training spacings"
    assert c.geometry.orientation == "RAS"
    assert c.label_codes["1"].value == "59820001"
    params = mlflow.get_run(packaged.model.run_id).data.params
    assert params["sys_target_spacing"] == "[1.0, 1.0, 1.0]"
    assert params["sys_target_spacing_source"] == "auto"


def test_pyfunc_segments_the_same_vessels_at_any_spacing_and_orientation(
    tracking, variants
) -> None:
    model = mlflow.pyfunc.load_model(f"models:/{tracking.name}@champion")

    def segment(image, affine):
        params = {"affine": np.asarray(affine).ravel().tolist(), "output": "labels"}
        return model.predict(image[None, None], params=params)[0]

    assert_same_vessels(mean_dice_by_variant(variants, segment))
    # spacing alone (axis-aligned RAS) is the other way to say where voxels are
    variant, image, _, affine = variants[1]
    assert variant == "0.5x0.5x2.5"
    by_spacing = model.predict(image[None, None], params={"spacing": [0.5, 0.5, 2.5]})
    by_affine = model.predict(image[None, None], params={"affine": affine.ravel().tolist()})
    assert by_spacing.shape == (1, 2, *image.shape)
    np.testing.assert_allclose(by_spacing, by_affine, atol=1e-5)


def test_onnx_bundle_segments_the_same_vessels(packaged, variants) -> None:
    bundle = load_bundle(packaged.bundle, "cpu")
    dice = mean_dice_by_variant(
        variants, lambda image, affine: bundle.predict(image[None, None], affine, "labels")[0]
    )
    assert_same_vessels(dice)
    cases = {c.name for c in packaged.report.cases}
    assert {"aniso_0.5x0.5x2.5", "lps", "oblique"} <= cases, "the parity suite's geometry cases"


@pytest.fixture(scope="module")
def served(bento_archive: Path, tmp_path_factory: pytest.TempPathFactory):
    """The bento with its default limits (no voxel cap) and a known memory budget."""
    home = tmp_path_factory.mktemp("clinical-serve")
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLINBUNDLE_")}
    env |= {
        "BENTOML_HOME": str(home / "bentoml"),
        "TMPDIR": str(home),
        "CLINBUNDLE_MEMORY_SHARE": str(BUDGET_GIB * 2**30 / total),
    }
    port = free_port()
    log = home / "server.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "clinbundle", "serve", str(bento_archive), "--port", str(port)],
        env=env,
        stdout=open(log, "wb"),  # noqa: SIM115 (lives as long as the server)
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=home,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(url + "/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield url, log
    finally:
        stop_process_group(proc)


def _post_nifti(url: str, image: np.ndarray, affine: np.ndarray, **data) -> httpx.Response:
    body = gzip.compress(nib.Nifti1Image(image, affine).to_bytes(), compresslevel=1)
    files = {"file": ("scan.nii.gz", body, "application/gzip")}
    return httpx.post(url + "/segment", files=files, data=data, timeout=900)


def _labels(response: httpx.Response) -> nib.Nifti1Image:
    assert response.status_code == 200, response.text[:500]
    return nib.Nifti1Image.from_bytes(gzip.decompress(response.content))


def test_served_bento_segments_the_same_vessels_from_the_nifti_header(served, variants) -> None:
    url, _ = served

    def segment(image, affine):
        seg = _labels(_post_nifti(url, image, affine))
        np.testing.assert_allclose(seg.affine, affine, atol=1e-5)
        return np.asarray(seg.dataobj)

    assert_same_vessels(mean_dice_by_variant(variants, segment))


def test_served_bento_takes_a_whole_512x512x300_int16_ct(served) -> None:
    """A CT as a scanner sends it: int16 HU, 0.7 x 0.7 x 1.5 mm, stored LPS; labels come back
    on its grid with its affine. The limits behind it are in /metadata."""
    url, _ = served
    affine = np.diag([-0.7, -0.7, 1.5, 1.0])
    ct = synthetic_ct((512, 512, 300))
    assert ct.dtype == np.int16
    seg = _labels(_post_nifti(url, ct, affine))
    assert seg.shape == ct.shape and seg.get_data_dtype() == np.uint8
    np.testing.assert_allclose(seg.affine, affine, atol=1e-5)
    limits = httpx.get(url + "/metadata", timeout=30).json()["limits"]
    assert limits["max_voxels"] >= 512 * 512 * 300
    assert abs(limits["memory_budget_bytes"] - BUDGET_GIB * 2**30) < 2**20


def test_a_volume_that_would_not_fit_is_a_413_with_the_numbers(served) -> None:
    """120^3 voxels at 5 mm is a small upload, but 600^3 voxels on the model's 1 mm grid."""
    url, _ = served
    coarse = np.zeros((120, 120, 120), dtype=np.int16)
    r = _post_nifti(url, coarse, np.diag([5.0, 5.0, 5.0, 1.0]))
    assert r.status_code == 413, r.text
    assert "GiB" in r.json()["error"] and "memory budget of 4.5 GiB" in r.json()["error"]
    ok = _post_nifti(url, np.zeros((20, 20, 20), np.int16), np.eye(4))  # still serving
    assert ok.status_code == 200


@pytest.mark.parametrize(
    "rows, needle",
    [
        ([[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0]], "zero voxel spacing"),
        ([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0]], "singular"),
    ],
)
def test_bad_geometry_is_a_400_naming_the_problem(served, rows, needle) -> None:
    """A header whose sform cannot place the voxels (written byte by byte: nibabel itself
    refuses to make such an image)."""
    url, _ = served
    good = nib.Nifti1Image(np.zeros((16, 16, 16), np.float32), np.eye(4)).to_bytes()
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(good))
    header["qform_code"], header["sform_code"] = 0, 1
    header["srow_x"], header["srow_y"], header["srow_z"] = rows
    body = header.binaryblock + good[header.sizeof_hdr :]
    r = httpx.post(url + "/segment", files={"file": ("bad.nii", body)}, timeout=60)
    assert r.status_code == 400 and needle in r.json()["error"], r.text
